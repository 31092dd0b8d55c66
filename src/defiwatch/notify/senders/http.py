"""The HTTP side shared by the webhook, chat and push senders: one guarded httpx client and
one `post` that turns whatever happens into a SendResult.

The client: HTTP/1.1 with keep-alive in one connection pool per receiving host (`PerHostPools`:
a slow host fills only its own pool, and each pool stays small, where httpcore's bookkeeping
per request grows with the pool's size), redirects not followed, proxies from the environment
ignored, every TCP connection made through the SSRF guard (`GuardedBackend`). Each attempt has
an overall deadline (`timeout_s`, 10 s for webhooks) on top of httpx's per-phase timeouts, and
reads at most `MAX_ANSWER_BYTES` of the answer, so a slow or chatty receiver cannot hold a
worker.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping

import httpcore
import httpx

from defiwatch.notify.redact import redact_url
from defiwatch.notify.retry import classify_http
from defiwatch.notify.senders.base import Outcome, Reason, SendResult
from defiwatch.notify.ssrf import AddressGuard, BlockedDestination

__all__ = [
    "MAX_ANSWER_BYTES",
    "TRANSPORT_ERRORS",
    "USER_AGENT",
    "GuardedBackend",
    "GuardedTransport",
    "PerHostPools",
    "classify_transport_error",
    "create_http_client",
    "post",
]

USER_AGENT = "defiwatch-notify/1"
MAX_ANSWER_BYTES = 16_384  # of a receiver's answer body; the rest is not read
_SNIPPET = 200  # characters of the answer kept in `error`

# httpx's exceptions (httpx/_exceptions.py) -> outcome. Walked by MRO, so a subclass httpx adds
# later inherits its parent's mapping; tests/notify/test_http.py checks every class is listed.
TRANSPORT_ERRORS: dict[type[Exception], tuple[Outcome, Reason]] = {
    httpx.ConnectTimeout: (Outcome.RETRY, Reason.TIMEOUT),
    httpx.ReadTimeout: (Outcome.RETRY, Reason.TIMEOUT),
    httpx.WriteTimeout: (Outcome.RETRY, Reason.TIMEOUT),
    httpx.PoolTimeout: (Outcome.RETRY, Reason.TIMEOUT),
    httpx.TimeoutException: (Outcome.RETRY, Reason.TIMEOUT),
    httpx.ConnectError: (Outcome.RETRY, Reason.NETWORK),  # DNS, refused, TLS handshake
    httpx.ReadError: (Outcome.RETRY, Reason.NETWORK),
    httpx.WriteError: (Outcome.RETRY, Reason.NETWORK),
    httpx.CloseError: (Outcome.RETRY, Reason.NETWORK),
    httpx.NetworkError: (Outcome.RETRY, Reason.NETWORK),
    httpx.ProxyError: (Outcome.RETRY, Reason.NETWORK),
    httpx.RemoteProtocolError: (Outcome.RETRY, Reason.PROTOCOL),  # peer closed mid-answer
    httpx.LocalProtocolError: (Outcome.FAILED_FINAL, Reason.INVALID_TARGET),  # unsendable request
    httpx.ProtocolError: (Outcome.RETRY, Reason.PROTOCOL),
    httpx.UnsupportedProtocol: (Outcome.FAILED_FINAL, Reason.INVALID_TARGET),  # not http(s)
    httpx.TransportError: (Outcome.RETRY, Reason.NETWORK),
    httpx.DecodingError: (Outcome.RETRY, Reason.PROTOCOL),
    httpx.TooManyRedirects: (Outcome.FAILED_FINAL, Reason.REDIRECT),
    httpx.RequestError: (Outcome.RETRY, Reason.NETWORK),
    httpx.HTTPStatusError: (Outcome.RETRY, Reason.HTTP_STATUS),  # not raised: we read statuses
    httpx.HTTPError: (Outcome.RETRY, Reason.NETWORK),
    httpx.InvalidURL: (Outcome.FAILED_FINAL, Reason.INVALID_TARGET),
    httpx.CookieConflict: (Outcome.FAILED_FINAL, Reason.INTERNAL),
    # We misused a stream: a bug, raised to observed() which logs it with its traceback.
    httpx.StreamConsumed: (Outcome.FAILED_FINAL, Reason.INTERNAL),
    httpx.StreamClosed: (Outcome.FAILED_FINAL, Reason.INTERNAL),
    httpx.RequestNotRead: (Outcome.FAILED_FINAL, Reason.INTERNAL),
    httpx.ResponseNotRead: (Outcome.FAILED_FINAL, Reason.INTERNAL),
    httpx.StreamError: (Outcome.FAILED_FINAL, Reason.INTERNAL),
}


def classify_transport_error(exc: BaseException) -> tuple[Outcome, Reason]:
    """The outcome of an exception raised while sending (httpx's, the guard's, or OS errors)."""
    if isinstance(exc, BlockedDestination):
        return Outcome.FAILED_FINAL, Reason.BLOCKED
    for cls in type(exc).__mro__:
        if cls in TRANSPORT_ERRORS:
            return TRANSPORT_ERRORS[cls]
    if isinstance(exc, TimeoutError):
        return Outcome.RETRY, Reason.TIMEOUT
    if isinstance(exc, OSError):
        return Outcome.RETRY, Reason.NETWORK
    return Outcome.FAILED_FINAL, Reason.INTERNAL


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore network backend that resolves, checks and connects in one step (ssrf.py).

    `host` arrives as written in the URL; the guard resolves it once with the loop's
    getaddrinfo, refuses the connection if any address is forbidden, and connects to the checked
    addresses in order (the first that accepts wins). The caller's TLS layer then verifies the
    certificate against the URL's host name, as without the guard.
    """

    def __init__(self, guard: AddressGuard, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self.guard = guard
        self._inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                addresses = await self.guard.resolve(host, port)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from exc
        except BlockedDestination:
            raise
        except OSError as exc:
            raise httpcore.ConnectError(f"could not resolve {host}: {exc}") from exc
        failure: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address,
                    socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None  # resolve() returns at least one address
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not notification targets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport with the SSRF guard under every connection.

    httpx does not take an httpcore network backend as an argument, so this replaces the
    connection pool httpx builds (`_pool`, httpx/_transports/default.py) with one built the
    same way plus `network_backend`. If httpx ever renames it, the SSRF tests fail loudly
    (they check that a loopback URL is refused), rather than the guard silently vanishing.
    """

    def __init__(self, guard: AddressGuard, *, verify: ssl.SSLContext | bool = True,
                 limits: httpx.Limits | None = None) -> None:
        limits = limits or httpx.Limits(max_connections=100, max_keepalive_connections=20,
                                        keepalive_expiry=30.0)
        ssl_context = verify if isinstance(verify, ssl.SSLContext) else httpx.create_ssl_context(
            verify=verify, trust_env=False)
        super().__init__(verify=ssl_context, trust_env=False, http1=True, http2=False, limits=limits)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=True,
            http2=False,
            network_backend=GuardedBackend(guard),
        )


class PerHostPools(httpx.AsyncBaseTransport):
    """One `GuardedTransport` (connection pool) per (scheme, host, port), made on first use.

    The least recently used pools beyond `max_hosts` are closed (their connections would have
    expired anyway after `keepalive_expiry` of idleness)."""

    def __init__(self, guard: AddressGuard, *, verify: ssl.SSLContext | bool, limits: httpx.Limits,
                 max_hosts: int = 1_000) -> None:
        self._guard = guard
        self._verify = verify if isinstance(verify, ssl.SSLContext) else httpx.create_ssl_context(
            verify=verify, trust_env=False)
        self._limits = limits
        self._max_hosts = max_hosts
        self._pools: OrderedDict[tuple[bytes, str, int | None], GuardedTransport] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        key = (request.url.raw_scheme, request.url.host, request.url.port)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = GuardedTransport(self._guard, verify=self._verify,
                                                       limits=self._limits)
            while len(self._pools) > self._max_hosts:
                _, evicted = self._pools.popitem(last=False)
                task = asyncio.create_task(evicted.aclose())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
        else:
            self._pools.move_to_end(key)
        return await pool.handle_async_request(request)

    async def aclose(self) -> None:
        pools, self._pools = list(self._pools.values()), OrderedDict()
        await asyncio.gather(*(p.aclose() for p in pools), *self._closing)


def create_http_client(
    guard: AddressGuard,
    *,
    timeout_s: float = 10.0,
    per_host: int = 32,
    keepalive_s: float = 30.0,
    verify: ssl.SSLContext | bool = True,
) -> httpx.AsyncClient:
    """The shared client of the HTTP senders (close it with `aclose` at shutdown).

    Args:
        guard: the SSRF guard every connection goes through.
        timeout_s: per-phase timeout (connect, read, write, pool), seconds.
        per_host: open connections to one receiving host (the notifier sends at most this
            many to one host at once, so no request waits for a connection).
        keepalive_s: how long an idle connection is kept for reuse, seconds.
        verify: TLS verification (an SSLContext to trust a private CA; False only in tests).
    """
    limits = httpx.Limits(max_connections=per_host, max_keepalive_connections=per_host,
                          keepalive_expiry=keepalive_s)
    return httpx.AsyncClient(
        transport=PerHostPools(guard, verify=verify, limits=limits),
        timeout=httpx.Timeout(timeout_s),
        follow_redirects=False,
        trust_env=False,
        headers={"User-Agent": USER_AGENT},
    )


async def post(
    client: httpx.AsyncClient,
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
            request = client.build_request("POST", url, content=content, headers=dict(headers))
            response = await client.send(request, stream=True)
            try:
                answer = await _read_some(response)
            finally:
                await response.aclose()
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
    verdict = classify_http(response.status_code, retry_after=response.headers.get("retry-after"),
                            now=clock(), gone=gone)
    error = None
    if verdict.outcome is not Outcome.DELIVERED:
        error = f"HTTP {response.status_code}"
        if verdict.reason is Reason.REDIRECT:
            error += " (redirects are not followed: configure the final URL)"
        snippet = _snippet(answer)
        if snippet:
            error += f": {snippet}"
    return SendResult(verdict.outcome, verdict.reason, status_code=response.status_code,
                      error=error, latency_s=latency, retry_after_s=verdict.retry_after_s)


async def _read_some(response: httpx.Response) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        chunks.append(chunk)
        size += len(chunk)
        if size >= MAX_ANSWER_BYTES:
            break
    return b"".join(chunks)[:MAX_ANSWER_BYTES]


def _snippet(answer: bytes) -> str:
    text = answer.decode("utf-8", "replace")
    text = " ".join(text.split())
    return text[:_SNIPPET] + ("…" if len(text) > _SNIPPET else "")


def _describe(exc: BaseException, url: str) -> str:
    """A one-line error without the URL's secrets (httpx messages may quote the URL)."""
    if isinstance(exc, BlockedDestination):
        return exc.message
    text = str(exc) or type(exc).__name__
    text = text.replace(url, redact_url(url))
    return f"{type(exc).__name__}: {' '.join(text.split())}"[:300]
