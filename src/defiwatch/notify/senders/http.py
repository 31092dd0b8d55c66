"""The HTTP side shared by the webhook, chat and push senders: one guarded aiohttp session and
one `post` that turns whatever happens into a SendResult.

The client (`HttpClient`): HTTP/1.1 with keep-alive, at most `per_host` connections to one
receiving host and no overall cap (a slow host fills only its own share: aiohttp's
`limit_per_host`), redirects not followed, proxies from the environment ignored, no cookies,
and the SSRF guard on every destination (ssrf.py): names are resolved by `GuardedResolver`
(resolve once, check, connect to exactly the checked addresses); IP-literal hosts, which
aiohttp connects to without asking the resolver, are checked by `HttpClient.check_target`
before each request. Each attempt has an overall deadline (`timeout_s`, 10 s for webhooks) and
reads at most `MAX_ANSWER_BYTES` of the answer, so a slow or chatty receiver cannot hold a
worker.

aiohttp rather than httpx: one POST costs ~0.13 ms of CPU against ~2.2 ms with httpx (600 bytes,
local keep-alive server, 64 in flight), and the notifier must send 500/s on one core.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable, Collection, Mapping

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.client_exceptions import TooManyRedirects, UnixClientConnectorError  # not exported
from aiohttp.helpers import is_ip_address
from yarl import URL

from defiwatch.notify.redact import redact_url
from defiwatch.notify.retry import classify_http
from defiwatch.notify.senders.base import Outcome, Reason, SendResult
from defiwatch.notify.ssrf import AddressGuard, BlockedDestination, check_addresses

__all__ = [
    "MAX_ANSWER_BYTES",
    "TRANSPORT_ERRORS",
    "USER_AGENT",
    "GuardedResolver",
    "HttpClient",
    "classify_transport_error",
    "create_http_client",
    "post",
]

USER_AGENT = "defiwatch-notify/1"
MAX_ANSWER_BYTES = 16_384  # of a receiver's answer body; the rest is not read
_SNIPPET = 200  # characters of the answer kept in `error`

# aiohttp's exceptions (aiohttp/client_exceptions.py) -> outcome. Walked by MRO, so a subclass
# aiohttp adds later inherits its parent's mapping; tests/notify/test_http.py checks every
# subclass of ClientError is listed.
TRANSPORT_ERRORS: dict[type[Exception], tuple[Outcome, Reason]] = {
    aiohttp.ConnectionTimeoutError: (Outcome.RETRY, Reason.TIMEOUT),
    aiohttp.SocketTimeoutError: (Outcome.RETRY, Reason.TIMEOUT),  # read timeout
    aiohttp.ServerTimeoutError: (Outcome.RETRY, Reason.TIMEOUT),
    aiohttp.ClientConnectorDNSError: (Outcome.RETRY, Reason.NETWORK),  # name does not resolve
    aiohttp.ClientConnectorCertificateError: (Outcome.RETRY, Reason.NETWORK),  # bad certificate
    aiohttp.ClientConnectorSSLError: (Outcome.RETRY, Reason.NETWORK),  # TLS handshake
    aiohttp.ClientSSLError: (Outcome.RETRY, Reason.NETWORK),
    aiohttp.ClientProxyConnectionError: (Outcome.RETRY, Reason.NETWORK),  # no proxies are used
    UnixClientConnectorError: (Outcome.RETRY, Reason.NETWORK),  # no unix sockets either
    aiohttp.ClientConnectorError: (Outcome.RETRY, Reason.NETWORK),  # refused, unreachable
    aiohttp.ClientConnectionResetError: (Outcome.RETRY, Reason.NETWORK),
    aiohttp.ClientOSError: (Outcome.RETRY, Reason.NETWORK),
    aiohttp.ServerDisconnectedError: (Outcome.RETRY, Reason.PROTOCOL),  # peer closed mid-answer
    aiohttp.ServerFingerprintMismatch: (Outcome.RETRY, Reason.NETWORK),  # not used: no pinning
    aiohttp.ServerConnectionError: (Outcome.RETRY, Reason.NETWORK),
    aiohttp.ClientConnectionError: (Outcome.RETRY, Reason.NETWORK),
    aiohttp.UploadAbortedError: (Outcome.RETRY, Reason.NETWORK),  # body not fully sent
    aiohttp.ClientPayloadError: (Outcome.RETRY, Reason.PROTOCOL),  # truncated / malformed body
    # A malformed status line or headers (aiohttp wraps its parser's error); statuses
    # themselves are read, never raised.
    aiohttp.ClientResponseError: (Outcome.RETRY, Reason.PROTOCOL),
    aiohttp.ClientHttpProxyError: (Outcome.RETRY, Reason.NETWORK),
    TooManyRedirects: (Outcome.FAILED_FINAL, Reason.REDIRECT),
    aiohttp.InvalidUrlRedirectClientError: (Outcome.FAILED_FINAL, Reason.REDIRECT),
    aiohttp.NonHttpUrlRedirectClientError: (Outcome.FAILED_FINAL, Reason.REDIRECT),
    aiohttp.RedirectClientError: (Outcome.FAILED_FINAL, Reason.REDIRECT),
    aiohttp.InvalidUrlClientError: (Outcome.FAILED_FINAL, Reason.INVALID_TARGET),
    aiohttp.InvalidURL: (Outcome.FAILED_FINAL, Reason.INVALID_TARGET),
    aiohttp.NonHttpUrlClientError: (Outcome.FAILED_FINAL, Reason.INVALID_TARGET),  # not http(s)
    aiohttp.ClientError: (Outcome.RETRY, Reason.NETWORK),
    # We misused the client (JSON decoding, WebSockets): a bug, raised to observed() which logs
    # it with its traceback.
    aiohttp.ContentTypeError: (Outcome.FAILED_FINAL, Reason.INTERNAL),
    aiohttp.WSServerHandshakeError: (Outcome.FAILED_FINAL, Reason.INTERNAL),
}

_URL_ERRORS = (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError)  # their text quotes the URL


def _blocked(exc: BaseException) -> BlockedDestination | None:
    """The guard's refusal behind `exc`, if any (aiohttp may wrap what its resolver raises)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, BlockedDestination):
            return seen
        seen = seen.__cause__
    return None


def classify_transport_error(exc: BaseException) -> tuple[Outcome, Reason]:
    """The outcome of an exception raised while sending (aiohttp's, the guard's, or OS errors)."""
    if _blocked(exc) is not None:
        return Outcome.FAILED_FINAL, Reason.BLOCKED
    for cls in type(exc).__mro__:
        if cls in TRANSPORT_ERRORS:
            return TRANSPORT_ERRORS[cls]
    if isinstance(exc, TimeoutError):
        return Outcome.RETRY, Reason.TIMEOUT
    if isinstance(exc, OSError):
        return Outcome.RETRY, Reason.NETWORK
    return Outcome.FAILED_FINAL, Reason.INTERNAL


class GuardedResolver(AbstractResolver):
    """aiohttp resolver that resolves and checks in one step (ssrf.py).

    The connector calls it for every new connection to a host *name* (the DNS cache is off) and
    connects to exactly the addresses it returns, in order (happy eyeballs between families):
    the addresses the guard resolved once and checked, so there is no second lookup to rebind.
    A refused address raises `BlockedDestination`; a failed lookup raises `socket.gaierror`
    (aiohttp turns it into `ClientConnectorDNSError`). TLS still verifies the certificate
    against the URL's host name. IP literals never reach a resolver: see
    `HttpClient.check_target`.
    """

    def __init__(self, guard: AddressGuard) -> None:
        self.guard = guard

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        # `family` is the connector's preference (AF_UNSPEC unless configured): every checked
        # address is returned, the connector filters.
        addresses = await self.guard.resolve(host, port)
        return [
            ResolveResult(hostname=host, host=address, port=port,
                          family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                          proto=socket.IPPROTO_TCP, flags=0)
            for address in addresses
        ]

    async def close(self) -> None:
        pass  # nothing held: the guard's resolver is the loop's getaddrinfo


class HttpClient:
    """The senders' shared HTTP client: an aiohttp session behind the SSRF guard.

    The session is made on first use (aiohttp binds it to the running event loop) and closed
    by `aclose`. Build it with `create_http_client`.
    """

    def __init__(self, guard: AddressGuard, *, timeout_s: float, per_host: int,
                 keepalive_s: float, verify: ssl.SSLContext | bool) -> None:
        self.guard = guard
        self._timeout_s = timeout_s
        self._per_host = per_host
        self._keepalive_s = keepalive_s
        self._verify = verify
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The aiohttp session, made now if this is the first use (needs a running loop)."""
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=0,  # no overall cap: the notifier bounds requests in flight
                limit_per_host=self._per_host,
                keepalive_timeout=self._keepalive_s,
                use_dns_cache=False,  # every new connection asks the guard
                resolver=GuardedResolver(self.guard),
                ssl=self._verify,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self._timeout_s),
                headers={"User-Agent": USER_AGENT},
                # Our bytes go out as given: no Content-Type guessed for a body sent without one.
                skip_auto_headers=("Content-Type",),
                trust_env=False,  # a proxy would connect on our behalf, unchecked
                cookie_jar=aiohttp.DummyCookieJar(),  # one receiver's cookies are not another's
                auto_decompress=False,  # the answer is only a log snippet: read it raw
            )
        return self._session

    def check_target(self, url: URL) -> None:
        """Refuse a URL before any connection when the guard cannot see it in the resolver.

        aiohttp accepts ws:// and wss:// for requests too, and connects to IP-literal hosts
        (`http://127.0.0.1/`, `http://[::1]/`) without calling the resolver; both are
        checked here, with the same verdicts as resolved names.

        Raises:
            aiohttp.NonHttpUrlClientError: not an http(s) URL.
            aiohttp.InvalidUrlClientError: no host, or a numeric host that is not a canonical
                IP address (`127.1`, `2130706433`: the OS would map them to an address).
            BlockedDestination: the host is a refused address.
        """
        if url.scheme not in ("http", "https"):
            raise aiohttp.NonHttpUrlClientError(url)
        host = url.raw_host
        if not host:
            raise aiohttp.InvalidUrlClientError(url, "no host")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            # Not an address we can judge; aiohttp's own test (the one its connector uses)
            # decides whether it would skip the resolver with it.
            if is_ip_address(host):
                raise aiohttp.InvalidUrlClientError(url, "not a canonical IP address") from None
            return  # a name: GuardedResolver checks what it resolves to
        verdict, address = check_addresses(host, [host], self.guard.allow)
        if not verdict.permitted:
            raise BlockedDestination(host, address, verdict)

    async def aclose(self) -> None:
        """Close the session and its connections (a no-op if it was never used)."""
        if self._session is not None:
            await self._session.close()
            self._session = None


def create_http_client(
    guard: AddressGuard,
    *,
    timeout_s: float = 10.0,
    per_host: int = 32,
    keepalive_s: float = 30.0,
    verify: ssl.SSLContext | bool = True,
) -> HttpClient:
    """The shared client of the HTTP senders (close it with `aclose` at shutdown).

    Args:
        guard: the SSRF guard every destination goes through.
        timeout_s: aiohttp's overall timeout of one request, seconds (`post` also puts its own
            deadline on each attempt).
        per_host: open connections to one receiving host (the notifier sends at most this
            many to one host at once, so no request waits for a connection).
        keepalive_s: how long an idle connection is kept for reuse, seconds.
        verify: TLS verification (an SSLContext to trust a private CA; False only in tests).
    """
    return HttpClient(guard, timeout_s=timeout_s, per_host=per_host, keepalive_s=keepalive_s,
                      verify=verify)


async def post(
    client: HttpClient,
    url: str,
    *,
    content: bytes,
    headers: Mapping[str, str],
    timeout_s: float,
    gone: Collection[int] = (),
    clock: Callable[[], float] = time.time,
) -> SendResult:
    """POST `content` to `url` once and classify what happened (retry.classify_http).

    Args:
        timeout_s: deadline of the whole attempt (DNS to last byte), seconds.
        gone: statuses meaning the target no longer exists (push: 404, 410).
        clock: epoch seconds, for an HTTP-date Retry-After.

    Returns:
        A SendResult; never raises except on cancellation.
    """
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            try:
                target = URL(url)
            except (TypeError, ValueError) as exc:
                raise aiohttp.InvalidUrlClientError(url) from exc
            client.check_target(target)
            response = await client.session.post(target, data=content, headers=dict(headers),
                                                 allow_redirects=False)
            try:
                answer = await _read_some(response)
            finally:
                if response.content.at_eof():
                    response.release()  # read to the end: the connection can be reused
                else:
                    response.close()  # half-read: drop the connection, never reuse it
    except TimeoutError:
        return SendResult(Outcome.RETRY, Reason.TIMEOUT, error=f"no answer within {timeout_s:g} s",
                          latency_s=time.perf_counter() - started)
    except Exception as exc:
        outcome, reason = classify_transport_error(exc)
        if reason is Reason.INTERNAL:
            raise
        return SendResult(outcome, reason, error=_describe(exc, url),
                          latency_s=time.perf_counter() - started)
    latency = time.perf_counter() - started
    verdict = classify_http(response.status, retry_after=response.headers.get("retry-after"),
                            now=clock(), gone=gone)
    error = None
    if verdict.outcome is not Outcome.DELIVERED:
        error = f"HTTP {response.status}"
        if verdict.reason is Reason.REDIRECT:
            error += " (redirects are not followed: configure the final URL)"
        snippet = _snippet(answer)
        if snippet:
            error += f": {snippet}"
    return SendResult(verdict.outcome, verdict.reason, status_code=response.status,
                      error=error, latency_s=latency, retry_after_s=verdict.retry_after_s)


async def _read_some(response: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < MAX_ANSWER_BYTES:
        chunk = await response.content.read(MAX_ANSWER_BYTES - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _snippet(answer: bytes) -> str:
    text = answer.decode("utf-8", "replace")
    text = " ".join(text.split())
    return text[:_SNIPPET] + ("…" if len(text) > _SNIPPET else "")


def _describe(exc: BaseException, url: str) -> str:
    """A one-line error without the URL's secrets (aiohttp messages may quote the URL)."""
    blocked = _blocked(exc)
    if blocked is not None:
        return blocked.message
    if isinstance(exc, _URL_ERRORS):
        # Their text is the URL as yarl normalized it, which the redaction below might miss.
        text = f"{redact_url(url)} is not a valid http:// or https:// URL"
    else:
        text = str(exc) or type(exc).__name__
        text = text.replace(url, redact_url(url))
    return f"{type(exc).__name__}: {' '.join(text.split())}"[:300]
