"""SSRF guard: verdicts on addresses (pure tables), then the guarded client against a real
server on loopback, with a table resolver playing DNS where a test needs names."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import pytest

from defiwatch.errors import ValidationError
from defiwatch.notify.senders.base import Outcome, Reason
from defiwatch.notify.senders.http import HttpClient, create_http_client, post
from defiwatch.notify.ssrf import (
    AddressGuard,
    AllowList,
    BlockedDestination,
    Resolver,
    Verdict,
    check_address,
    check_addresses,
)
from notify.receiver import Receiver
from notify.tls import self_signed

V = Verdict


@pytest.mark.parametrize(
    ("address", "verdict"),
    [
        ("8.8.8.8", V.GLOBAL),
        ("93.184.216.34", V.GLOBAL),
        ("2606:4700:4700::1111", V.GLOBAL),
        ("127.0.0.1", V.LOOPBACK),
        ("127.9.8.7", V.LOOPBACK),
        ("::1", V.LOOPBACK),
        ("0.0.0.0", V.UNSPECIFIED),
        ("::", V.UNSPECIFIED),
        ("10.1.2.3", V.PRIVATE),
        ("172.16.0.1", V.PRIVATE),
        ("192.168.1.1", V.PRIVATE),
        ("fd12:3456::1", V.PRIVATE),
        ("fec0::1", V.PRIVATE),
        ("0.1.2.3", V.PRIVATE),
        ("169.254.1.1", V.LINK_LOCAL),
        ("fe80::1", V.LINK_LOCAL),
        ("224.0.0.1", V.MULTICAST),
        ("239.255.255.250", V.MULTICAST),
        ("ff02::1", V.MULTICAST),
        ("100.64.0.1", V.NOT_GLOBAL),  # carrier-grade NAT
        ("::127.0.0.1", V.RESERVED),  # IPv4-compatible (deprecated)
        # cloud metadata, private or not
        ("169.254.169.254", V.METADATA),
        ("169.254.170.2", V.METADATA),
        ("fd00:ec2::254", V.METADATA),
        ("fd20:ce::254", V.METADATA),
        ("100.100.100.200", V.METADATA),
        ("168.63.129.16", V.METADATA),
        ("192.0.0.192", V.METADATA),
        # IPv6 forms that deliver to an IPv4 address are judged by that address
        ("::ffff:127.0.0.1", V.LOOPBACK),
        ("::ffff:10.0.0.1", V.PRIVATE),
        ("::ffff:169.254.169.254", V.METADATA),
        ("::ffff:8.8.8.8", V.GLOBAL),
        ("2002:7f00:1::", V.LOOPBACK),  # 6to4 of 127.0.0.1
        ("2002:a9fe:a9fe::", V.METADATA),  # 6to4 of 169.254.169.254
        ("2002:808:808::", V.GLOBAL),
        ("64:ff9b::7f00:1", V.LOOPBACK),  # NAT64 of 127.0.0.1
        ("64:ff9b::808:808", V.GLOBAL),
    ],
)
def test_verdicts_without_allow_list(address: str, verdict: Verdict) -> None:
    assert check_address(ipaddress.ip_address(address)) is verdict


ALLOW = AllowList.parse(["127.0.0.1", "10.0.0.0/8", "169.254.0.0/16", "fd00::/8"])


@pytest.mark.parametrize(
    ("address", "verdict"),
    [
        ("127.0.0.1", V.ALLOW_LISTED),
        ("::ffff:127.0.0.1", V.ALLOW_LISTED),
        ("127.0.0.2", V.LOOPBACK),
        ("10.200.0.1", V.ALLOW_LISTED),
        ("169.254.1.1", V.ALLOW_LISTED),
        ("169.254.169.254", V.METADATA),  # a broad range does not unlock metadata
        ("fd00:ec2::254", V.METADATA),
        ("fd00::1", V.ALLOW_LISTED),
        ("192.168.0.1", V.PRIVATE),
        ("8.8.8.8", V.GLOBAL),
    ],
)
def test_verdicts_with_allow_list(address: str, verdict: Verdict) -> None:
    assert check_address(ipaddress.ip_address(address), ALLOW) is verdict


def test_metadata_needs_an_exact_entry() -> None:
    allow = AllowList.parse(["169.254.169.254"])
    assert check_address(ipaddress.ip_address("169.254.169.254"), allow) is V.ALLOW_LISTED


@pytest.mark.parametrize(
    ("host", "addresses", "allow", "verdict", "address"),
    [
        ("example.com", ["93.184.216.34"], [], V.GLOBAL, "93.184.216.34"),
        ("example.com", ["2606:2800:220:1::1", "93.184.216.34"], [], V.GLOBAL, "2606:2800:220:1::1"),
        ("mixed.test", ["93.184.216.34", "127.0.0.1"], [], V.LOOPBACK, "127.0.0.1"),
        ("mixed.test", ["93.184.216.34", "10.0.0.1"], ["10.0.0.0/8"], V.GLOBAL, "93.184.216.34"),
        ("hooks.internal", ["10.0.0.5"], ["hooks.internal"], V.ALLOW_LISTED, "10.0.0.5"),
        ("HOOKS.internal.", ["10.0.0.5"], ["hooks.internal"], V.ALLOW_LISTED, "10.0.0.5"),
        ("a.corp.example", ["10.0.0.5"], ["*.corp.example"], V.ALLOW_LISTED, "10.0.0.5"),
        ("corp.example", ["10.0.0.5"], ["*.corp.example"], V.PRIVATE, "10.0.0.5"),
        ("hooks.internal", ["169.254.169.254"], ["hooks.internal"], V.METADATA, "169.254.169.254"),
    ],
)
def test_host_verdicts(host: str, addresses: list[str], allow: list[str], verdict: Verdict,
                       address: str) -> None:
    assert check_addresses(host, addresses, AllowList.parse(allow)) == (verdict, address)


@pytest.mark.parametrize("entry", ["http://x.example", "10.0.0.0/33", "bad host", "a..b", "*"])
def test_allow_list_refuses_garbage(entry: str) -> None:
    with pytest.raises(ValueError, match="neither"):
        AllowList.parse([entry])


def test_allow_list_forms() -> None:
    allow = AllowList.parse([" 127.0.0.1 ", "::1", "Hooks.Internal.", "*.corp.example", ""])
    assert allow.hosts == frozenset({"hooks.internal"})
    assert allow.suffixes == (".corp.example",)
    assert [str(n) for n in allow.networks] == ["127.0.0.1/32", "::1/128"]


def table(answers: dict[str, list[str]], calls: list[str] | None = None) -> Resolver:
    """A resolver that plays DNS from a table (a name missing from it does not resolve)."""
    async def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return answers[host]
    return resolve


async def send(client: HttpClient, url: str) -> tuple[Outcome, Reason, str | None]:
    result = await post(client, url, content=b"{}", headers={}, timeout_s=5.0)
    return result.outcome, result.reason, result.error


async def test_loopback_is_refused_before_any_byte_is_sent(receiver: Receiver) -> None:
    client = create_http_client(AddressGuard())  # no allow-list
    try:
        outcome, reason, error = await send(client, receiver.url())
        assert (outcome, reason) == (Outcome.FAILED_FINAL, Reason.BLOCKED)
        assert error is not None and "loopback" in error
        outcome, reason, _ = await send(client, f"http://localhost:{receiver.port}/hook")
        assert (outcome, reason) == (Outcome.FAILED_FINAL, Reason.BLOCKED)
        outcome, reason, _ = await send(client, "http://169.254.169.254/latest/meta-data/")
        assert (outcome, reason) == (Outcome.FAILED_FINAL, Reason.BLOCKED)
        outcome, reason, _ = await send(client, "http://[::ffff:127.0.0.1]:1/")
        assert (outcome, reason) == (Outcome.FAILED_FINAL, Reason.BLOCKED)
    finally:
        await client.aclose()
    assert receiver.requests == []


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://[::1]:{port}/hook", Reason.BLOCKED),
        ("http://[::ffff:7f00:1]:{port}/hook", Reason.BLOCKED),
        ("HTTP://127.0.0.1:{port}/hook", Reason.BLOCKED),
        # numeric forms the OS would map to 127.0.0.1 and aiohttp would not resolve
        ("http://127.1:{port}/hook", Reason.INVALID_TARGET),
        ("http://2130706433:{port}/hook", Reason.INVALID_TARGET),
        ("http://0x7f.0.0.1:{port}/hook", Reason.BLOCKED),  # a "name": resolved, then judged
        ("ws://127.0.0.1:{port}/hook", Reason.INVALID_TARGET),  # aiohttp would take ws://
    ],
)
async def test_literal_hosts_are_judged_like_resolved_names(receiver: Receiver, url: str,
                                                            reason: Reason) -> None:
    """aiohttp connects to IP literals without asking the resolver: the client checks them
    itself, with the verdicts of resolved addresses."""
    client = create_http_client(AddressGuard())  # no allow-list
    try:
        outcome, got, _ = await send(client, url.format(port=receiver.port))
    finally:
        await client.aclose()
    assert (outcome, got) == (Outcome.FAILED_FINAL, reason)
    assert receiver.requests == []


async def test_allow_listed_loopback_is_delivered(receiver: Receiver, client: HttpClient
                                                  ) -> None:
    assert (await send(client, receiver.url()))[:2] == (Outcome.DELIVERED, Reason.ACCEPTED)
    assert len(receiver.requests) == 1


async def test_connects_to_the_address_it_checked(receiver: Receiver) -> None:
    """The name is resolved once, inside the connection: the request reaches the checked
    address while keeping the URL's host name (Host header, and TLS SNI when https)."""
    calls: list[str] = []
    guard = AddressGuard(AllowList.parse(["127.0.0.1"]),
                         table({"hooks.example": ["127.0.0.1"]}, calls))
    client = create_http_client(guard)
    try:
        outcome, _, _ = await send(client, f"http://hooks.example:{receiver.port}/hook")
    finally:
        await client.aclose()
    assert outcome is Outcome.DELIVERED
    assert calls == ["hooks.example"]
    assert receiver.requests[0].headers["host"] == f"hooks.example:{receiver.port}"


async def test_rebinding_after_validation_is_refused_at_connect(receiver: Receiver) -> None:
    """A name that was public when the rule was saved and points to loopback when the
    notification is sent: the connection's own check refuses it."""
    answers = {"rebind.example": ["93.184.216.34"]}
    guard = AddressGuard(resolver=table(answers))
    await guard.check_url(f"http://rebind.example:{receiver.port}/hook")  # passes: public
    answers["rebind.example"] = ["127.0.0.1"]  # the attacker's DNS flips
    client = create_http_client(guard)
    try:
        outcome, reason, _ = await send(client, f"http://rebind.example:{receiver.port}/hook")
    finally:
        await client.aclose()
    assert (outcome, reason) == (Outcome.FAILED_FINAL, Reason.BLOCKED)
    assert receiver.requests == []


async def test_a_name_that_does_not_resolve_is_retried() -> None:
    client = create_http_client(AddressGuard(resolver=table({})))
    try:
        outcome, reason, error = await send(client, "http://nowhere.example/hook")
    finally:
        await client.aclose()
    assert (outcome, reason) == (Outcome.RETRY, Reason.NETWORK)
    assert error is not None and "nowhere.example" in error


async def test_check_url_names_the_field_and_hides_the_address() -> None:
    guard = AddressGuard(resolver=table({"intranet.example": ["10.1.2.3"]}))
    with pytest.raises(BlockedDestination) as caught:
        await guard.check_url("https://intranet.example/x", field="channels[0].url")
    assert caught.value.field == "channels[0].url"
    assert caught.value.verdict is V.PRIVATE and caught.value.address == "10.1.2.3"
    assert "10.1.2.3" not in caught.value.message
    assert caught.value.as_payload()["error"]["code"] == "destination_blocked"
    with pytest.raises(ValidationError, match="absolute http"):
        await guard.check_url("ftp://example.com/x", field="url")


@pytest.mark.parametrize(("host", "outcome"), [("localhost", Outcome.DELIVERED),
                                               ("hooks.example", Outcome.RETRY)])
async def test_tls_verifies_the_url_host_not_the_address(tmp_path: Path, host: str,
                                                         outcome: Outcome) -> None:
    """Connecting to the checked address keeps TLS honest: the certificate (valid for
    localhost) is checked against the URL's host, whatever address the guard connected to."""
    cert = self_signed(tmp_path)
    guard = AddressGuard(AllowList.parse(["127.0.0.1"]), table({host: ["127.0.0.1"]}))
    client = create_http_client(guard, verify=cert.client_context())
    try:
        with Receiver(tls=cert.server_context()) as server:
            result = await post(client, f"https://{host}:{server.port}/hook", content=b"{}",
                                headers={}, timeout_s=5.0)
    finally:
        await client.aclose()
    assert result.outcome is outcome, result.error
