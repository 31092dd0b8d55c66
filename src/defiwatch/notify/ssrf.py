"""SSRF guard: outgoing notifications reach only public addresses, unless an operator allows more.

Webhook, chat and push URLs come from users. Without a guard, a rule could make the notifier
POST to `http://169.254.169.254/` (cloud credentials), to `localhost:6379`, or to anything on
the private network. The guard refuses loopback, private, link-local, multicast, reserved,
unspecified and other non-global addresses and the cloud metadata endpoints (`METADATA`),
judging the addresses a host name *resolves to*, not the name.

DNS rebinding (a name that resolves to a public address when checked and to 127.0.0.1 when
connected) is prevented by construction: the check happens where the connection is made
(`senders.http` gives aiohttp's connector a resolver, `GuardedResolver`, that resolves the name
once with the event loop's getaddrinfo through `AddressGuard.resolve`, checks every address,
and returns exactly the checked addresses for the connector to connect to; aiohttp's DNS cache
is off, so every new connection asks again). There is no second resolution to rebind; TLS
still verifies the certificate against the URL's host name. aiohttp connects to IP-literal
hosts (`http://127.0.0.1/`, `http://[::1]/`) without a resolver, so `senders.http` judges those
before each request with the same verdicts (`check_addresses`), and refuses numeric hosts that
are not canonical addresses (`127.1`).
Proxies from the environment are ignored (a proxy would connect on our behalf, unchecked), and
redirects are not followed.

The operator allow-list (`notify_ssrf_allow`: CIDRs, addresses, host names, `*.suffix`) lifts
the refusal for trusted destinations, e.g. an internal alert gateway. Metadata addresses stay
refused unless listed as exact addresses (a broad `169.254.0.0/16` does not unlock them).

A name is refused when any of its addresses is: a record set mixing public and private
addresses is a rebinding trick, not a configuration anyone needs.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from defiwatch.errors import ValidationError

__all__ = [
    "METADATA_ADDRESSES",
    "AddressGuard",
    "AllowList",
    "BlockedDestination",
    "Resolver",
    "Verdict",
    "check_address",
    "check_addresses",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Instance metadata and platform services of the big clouds. Most are link-local or ULA, so
# refused anyway; they are named here so that an allow-list of a whole private range does not
# unlock them, and because some (Azure's WireServer, Oracle's 192.0.0.192) are not private.
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, ... instance metadata
        "169.254.170.2",  # AWS ECS task metadata and credentials
        "169.254.169.253",  # AWS VPC DNS
        "169.254.169.123",  # AWS time sync
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "fd00:ec2::253",  # AWS VPC DNS over IPv6
        "fd20:ce::254",  # GCP metadata over IPv6
        "100.100.100.200",  # Alibaba Cloud metadata
        "168.63.129.16",  # Azure WireServer
        "192.0.0.192",  # Oracle Cloud legacy metadata
    )
)

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052 well-known prefix
_HOST_RE = re.compile(r"^(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")


class Verdict(enum.StrEnum):
    """Why an address may or may not be connected to."""

    GLOBAL = "global"  # a public address: permitted
    ALLOW_LISTED = "allow_listed"  # permitted by the operator allow-list
    METADATA = "metadata"
    UNSPECIFIED = "unspecified"
    LOOPBACK = "loopback"
    LINK_LOCAL = "link_local"
    MULTICAST = "multicast"
    PRIVATE = "private"
    RESERVED = "reserved"
    NOT_GLOBAL = "not_global"  # shared (CGNAT), documentation, benchmarking, ... ranges

    @property
    def permitted(self) -> bool:
        return self in (Verdict.GLOBAL, Verdict.ALLOW_LISTED)


class BlockedDestination(ValidationError):
    """A notification target resolves to an address the SSRF guard refuses.

    Attributes:
        host: the URL's host.
        address: the refused address (for logs only: it is not in the message, so that
            errors shown to users do not map internal names to addresses).
        verdict: why it is refused.
    """

    code = "destination_blocked"

    def __init__(self, host: str, address: str, verdict: Verdict, *, field: str | None = None) -> None:
        super().__init__(
            f"refusing to deliver to {host!r}: it resolves to a {verdict.value.replace('_', '-')} "
            "address; notifications go to public addresses only (an operator can allow a "
            "destination with DEFIWATCH_NOTIFY_SSRF_ALLOW)",
            field=field,
        )
        self.host = host
        self.address = address
        self.verdict = verdict


@dataclass(frozen=True, slots=True)
class AllowList:
    """Destinations the operator trusts despite their addresses.

    Attributes:
        networks: addresses and CIDRs.
        hosts: exact host names, lower case.
        suffixes: `*.example.internal` entries, stored as `.example.internal`.
    """

    networks: tuple[IPNetwork, ...] = ()
    hosts: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> AllowList:
        """From settings entries: `10.0.0.0/8`, `127.0.0.1`, `::1`, `hooks.internal`,
        `*.corp.example`.

        Raises:
            ValueError: an entry is neither a network nor a host name (names the entry).
        """
        networks: list[IPNetwork] = []
        hosts: set[str] = set()
        suffixes: list[str] = []
        for raw in entries:
            entry = raw.strip().lower().rstrip(".")
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            if not _HOST_RE.match(entry):
                raise ValueError(f"{raw!r} is neither an address, a CIDR nor a host name")
            if entry.startswith("*."):
                suffixes.append(entry[1:])
            else:
                hosts.add(entry)
        return cls(tuple(networks), frozenset(hosts), tuple(suffixes))

    def allows_host(self, host: str) -> bool:
        name = host.lower().rstrip(".")
        return name in self.hosts or any(name.endswith(s) for s in self.suffixes)

    def allows_address(self, ip: IPAddress) -> bool:
        return any(ip.version == net.version and ip in net for net in self.networks)

    def lists_exactly(self, ip: IPAddress) -> bool:
        return any(net.num_addresses == 1 and ip in net for net in self.networks
                   if ip.version == net.version)


_NOTHING = AllowList()


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries to its destination (mapped, 6to4, NAT64)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    return None


def check_address(ip: IPAddress, allow: AllowList | None = None) -> Verdict:
    """Whether `ip` may be connected to. Pure."""
    allow = allow or _NOTHING
    if ip in METADATA_ADDRESSES and not allow.lists_exactly(ip):
        return Verdict.METADATA
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:  # the packet goes to the IPv4 address: judge that one
            return check_address(inner, allow)
    if allow.allows_address(ip):
        return Verdict.ALLOW_LISTED
    if ip.is_unspecified:
        return Verdict.UNSPECIFIED
    if ip.is_loopback:
        return Verdict.LOOPBACK
    if ip.is_link_local:
        return Verdict.LINK_LOCAL
    if ip.is_multicast:
        return Verdict.MULTICAST
    if ip.is_private or (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local):
        return Verdict.PRIVATE  # site-local (fec0::/10) is deprecated, still not public
    if ip.is_reserved:
        return Verdict.RESERVED
    if not ip.is_global:
        return Verdict.NOT_GLOBAL
    return Verdict.GLOBAL


def check_addresses(host: str, addresses: Sequence[str], allow: AllowList | None = None
                    ) -> tuple[Verdict, str]:
    """The verdict on a host from all the addresses it resolved to. Pure.

    Returns:
        (verdict, address): the first refusal and its address, else a permitted verdict and
        the first address. A host on the allow-list is permitted whatever its addresses, except
        metadata addresses not listed exactly.
    """
    if not addresses:
        raise ValueError("no addresses to check")
    allow = allow or _NOTHING
    host_listed = allow.allows_host(host)
    for text in addresses:
        ip = ipaddress.ip_address(text)
        verdict = check_address(ip, allow)
        if verdict is Verdict.METADATA:
            return verdict, text
        if not verdict.permitted and not host_listed:
            return verdict, text
    if host_listed:
        return Verdict.ALLOW_LISTED, addresses[0]
    return check_address(ipaddress.ip_address(addresses[0]), allow), addresses[0]


Resolver = Callable[[str, int], Awaitable[list[str]]]


async def _getaddrinfo(host: str, port: int) -> list[str]:
    """Resolve with the running loop's getaddrinfo (a thread pool: never blocks the loop)."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    seen: dict[str, None] = {}
    for _family, _type, _proto, _canon, sockaddr in infos:
        seen.setdefault(str(sockaddr[0]), None)
    return list(seen)


class AddressGuard:
    """Resolves a host and returns only addresses it may connect to.

    Args:
        allow: the operator allow-list.
        resolver: `(host, port) -> addresses`; the loop's getaddrinfo by default (tests pass
            a table to play DNS).
    """

    def __init__(self, allow: AllowList | None = None, resolver: Resolver | None = None) -> None:
        self.allow = allow or AllowList()
        self._resolve = resolver or _getaddrinfo

    async def resolve(self, host: str, port: int) -> list[str]:
        """The addresses to connect to for `host`, each checked, in resolver order.

        Raises:
            BlockedDestination: an address of `host` is refused.
            OSError: resolution failed (`socket.gaierror`), or gave no address.
        """
        addresses = await self._resolve(host, port)
        if not addresses:
            raise socket.gaierror(socket.EAI_NONAME, f"{host} has no address")
        verdict, address = check_addresses(host, addresses, self.allow)
        if not verdict.permitted:
            raise BlockedDestination(host, address, verdict)
        return addresses

    async def check_url(self, url: str, *, field: str | None = None) -> None:
        """Validate a target URL now (e.g. when a rule is saved); the connection checks again.

        Raises:
            ValidationError: not an absolute http(s) URL.
            BlockedDestination: its host resolves to a refused address.
            OSError: its host does not resolve.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValidationError("url must be an absolute http:// or https:// URL", field=field)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise ValidationError("url has an invalid port", field=field) from exc
        try:
            await self.resolve(parts.hostname, port)
        except BlockedDestination as exc:
            raise BlockedDestination(exc.host, exc.address, exc.verdict, field=field) from None
