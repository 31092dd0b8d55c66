"""The WebSocket gateway: a `websockets` server that moves the hub's bytes to sockets.

One `Gateway` per process serves `/v1/realtime`. It runs one reader task per stream (events and,
when given, fired alerts), not one per client: each reader follows its stream from the offset it
found at start and hands every event to the hub, which fans it out. Several gateways can run at
once (each reads the Redis stream and serves its own clients); nothing is shared between them
but the streams.

Sending. An event frame for a connection is written straight to its socket while the socket's
write buffer is under its high-water mark: a synchronous `transport.write` of the frame's wire
bytes, which are the same for every connection and built once per frame (`_WireFrames`; no
task switch, no per-connection framing). When it is over (the client reads slowly) frames wait
in the connection's bounded `Outbox`, drained by a writer task that honours the socket's flow
control; when the outbox is full it conflates, and when that is not enough the connection is
closed with 4008 and the client recovers with `since`. So a slow client costs its own memory (bounded by
`gateway_send_queue` frames plus the write limit) and never delays anyone else.

Refusals. Per node: a connection cap and a connect-rate cap refuse at the handshake with HTTP
503 and `Retry-After` (`process_request`). Per key (counted on this node): the tier's connection
limit closes with 4030 after authentication. Bad keys get an `error` frame, then 4001.

Keys (auth.py). Verified keys are cached for `key_cache_ttl_s` (60 s), so a connect storm does
not queue behind the database. Every `revalidate_interval_s` (10 s) one query re-checks the keys
of all open connections: a revoked key's connections get an `error` frame (`unauthorized`) and
close with 4001, reason "api key revoked" (`REVOKED_REASON`), and the key leaves the cache.

Shutdown (`stop`): stop listening, stop the key re-checks and the readers, close every
connection with 1012 so clients reconnect to another gateway and resume with `since`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import time
import uuid
from collections.abc import Awaitable, Callable, Hashable
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

import structlog
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from defiwatch import __version__
from defiwatch.cache import HotCache
from defiwatch.config import Settings, TierLimits
from defiwatch.domain import Event
from defiwatch.errors import BackendUnavailable, ConfigError
from defiwatch.gateway import metrics
from defiwatch.gateway.auth import KEY_CACHE_TTL_S, REVALIDATE_INTERVAL_S, Authenticator
from defiwatch.gateway.hub import Hub
from defiwatch.gateway.limits import ConnectionCounter, TokenBucket
from defiwatch.gateway.outbox import Outbox, PushResult
from defiwatch.gateway.protocol import (
    ALERTS_CHANNEL,
    PATH,
    Auth,
    CloseCode,
    ErrorCode,
    Rejection,
    api_key_from_request,
    error_frame,
    parse_client_frame,
)
from defiwatch.gateway.session import Session
from defiwatch.ops import health
from defiwatch.ops.supervisor import Backoff
from defiwatch.store.keys import Principal
from defiwatch.stream import EventStream

__all__ = ["MAX_INBOUND_BYTES", "REVOKED_REASON", "WRITE_LIMIT_BYTES", "Gateway"]

log = structlog.get_logger(__name__)

# Clients send small JSON commands; a larger frame is refused by websockets with 1009.
MAX_INBOUND_BYTES = 64 * 1024
# The socket write buffer's high-water mark: below it frames are written straight through,
# above it they wait in the connection's outbox (websockets' write_limit, same meaning).
WRITE_LIMIT_BYTES = 64 * 1024
_READ_BATCH = 1_000  # events per stream read of a reader
_WAIT_S = 5.0  # one blocking wait of a reader (XREAD BLOCK on Redis); cancelled at stop
_YIELD_EVERY = 5_000  # deliveries after which a reader yields to the event loop
_READER_BACKOFF = Backoff(first_s=0.5, cap_s=10.0)  # reader retries while a stream fails
_NODE_FULL_RETRY_AFTER_S = 5


LISTEN_BACKLOG = 4096  # pending connections the kernel may queue for accept
REVOKED_REASON = "api key revoked"  # close reason (with 4001) of a connection whose key was revoked


class _WireFrames:
    """The WebSocket bytes of the frame being fanned out, built once for every connection.

    Server-to-client frames are not masked (RFC 6455 5.3) and compression is off, so one text
    frame's bytes on the wire (header + payload) are the same for every connection: the hub
    hands every subscriber the same payload object, and this keeps the wire bytes of the last
    payload seen (by identity; the reference held keeps the identity from being reused). It
    replaces websockets' per-connection framing (`send_text` -> `send_frame` -> `serialize`,
    then `send_data`): 28 % less CPU per connection write, the syscall included (5.4 vs 7.5 us,
    interleaved on the same 2,000 connections); `bench/ws_fanout.py --profile` shows the rest.
    """

    __slots__ = ("_payload", "_wire")

    def __init__(self) -> None:
        self._payload = b""
        self._wire = b""

    def text(self, payload: bytes) -> bytes:
        if payload is not self._payload:
            self._payload, self._wire = payload, _text_frame(payload)
        return self._wire


def _text_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented text frame (RFC 6455 5.2: FIN + opcode 1, then the length in
    7 bits, or 126 + 16 bits, or 127 + 64 bits)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 1 << 16:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


class _Connection:
    """The outgoing side of one WebSocket connection: the hub's subscriber and the session's
    `Output` (see the module docstring for the write path).

    Invariant: frames wait in the outbox only while the writer task runs, so "no writer" means
    "nothing queued" and `_direct` (no writer, not closing) is the whole fast-path test.
    """

    __slots__ = ("_direct", "_low", "_outbox", "_protocol", "_raw", "_send_data", "_space",
                 "_tasks", "_transport", "_wire", "_writer", "close_code", "closing", "ws")

    def __init__(self, ws: ServerConnection, *, capacity: int, tasks: set[asyncio.Task[Any]],
                 wire: _WireFrames) -> None:
        self.ws = ws
        # Bound once: the hot path below runs once per event per connection.
        self._transport = ws.transport
        self._protocol = ws.protocol
        self._send_data = ws.send_data
        self._wire = wire
        # Prepared bytes are only valid without extensions (the gateway negotiates none).
        self._raw = not ws.protocol.extensions
        self._outbox = Outbox(capacity)
        self._low = capacity // 2  # drained() waits for the outbox to fall to this
        self._space = asyncio.Event()
        self._space.set()
        self._writer: asyncio.Task[None] | None = None
        self._direct = True
        self._tasks = tasks
        self.closing = False
        self.close_code: int | None = None

    # Subscriber (hot path: once per event per subscribed connection).
    def deliver(self, channel: str, event: Event, frame: bytes) -> None:
        if self._direct and self._transport.get_write_buffer_size() < WRITE_LIMIT_BYTES:
            if self._raw and self._protocol.state is State.OPEN:
                # The frame's wire bytes, shared (see _WireFrames); the protocol object is
                # bypassed, which is safe: on one loop thread a whole frame is written at once,
                # and the protocol keeps no state about data frames sent (only `state`, which
                # is checked here as `websockets.broadcast` does).
                try:
                    self._transport.write(self._wire.text(frame))
                except Exception as exc:  # a dying transport; the handler sees the close
                    log.debug("gateway.write_failed", connection=str(self.ws.id),
                              error=repr(exc))
            else:
                self._write(frame)
        elif not self.closing:
            # Slow path: the key lets a newer frame of the same series replace this one when
            # the outbox is full. Alerts are never replaced (key None).
            self._queue(frame, None if channel == ALERTS_CHANNEL else (channel, event.series))

    def _write(self, frame: bytes) -> None:
        # What `websockets.broadcast` does for each connection (the same two calls, the same
        # skip of a connection that is not open), minus its per-call argument checks: about
        # 10-15 % of a fan-out's CPU (docs/gateway-notes.md). No await: nothing can interleave.
        protocol = self._protocol
        if protocol.state is not State.OPEN:
            return
        try:
            protocol.send_text(frame)
            self._send_data()
        except Exception as exc:  # a dying transport; the handler sees the close, cleans up
            log.debug("gateway.write_failed", connection=str(self.ws.id), error=repr(exc))

    # Output.
    def send(self, frame: bytes) -> None:
        if self._direct and self._transport.get_write_buffer_size() < WRITE_LIMIT_BYTES:
            self._write(frame)
        elif not self.closing:
            self._queue(frame, None)

    @property
    def closed(self) -> bool:
        return self.closing

    def close(self, code: int, reason: str) -> None:
        if self.closing:
            return
        self.closing = True
        self._direct = False
        self.close_code = code
        dropped = self._outbox.clear()
        if dropped:
            metrics.FRAMES_DROPPED.inc(dropped)
        self._space.set()
        self._spawn(self.ws.close(code, reason))

    async def drained(self) -> None:
        while len(self._outbox) > self._low and not self.closing:
            self._space.clear()
            await self._space.wait()

    def _queue(self, frame: bytes, key: Hashable | None) -> None:
        before = self._outbox.conflated
        result = self._outbox.push(frame, key)
        if result is PushResult.OVERFLOW:
            log.warning("gateway.slow_consumer", connection=str(self.ws.id),
                        queued=len(self._outbox))
            self.close(CloseCode.TOO_SLOW, "too slow: send buffer full")
            return
        if result is PushResult.CONFLATED:
            metrics.FRAMES_CONFLATED.labels("buffer").inc(self._outbox.conflated - before)
        if self._writer is None:
            self._direct = False
            self._writer = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self._outbox and not self.closing:
                frame = self._outbox.popleft()
                if len(self._outbox) <= self._low:
                    self._space.set()
                # send() writes, then waits while the socket is over its high-water mark.
                await self.ws.send(frame, text=True)
        except ConnectionClosed:
            pass
        finally:
            self._writer = None
            self._direct = not self.closing
            self._space.set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # keep a reference until done (asyncio holds tasks weakly)
        task.add_done_callback(self._tasks.discard)


class Gateway:
    """The WebSocket gateway of one process (see the module docstring).

    Args:
        settings: `gateway_*` settings (host, port, TLS, caps, heartbeat) and `tiers`.
        engine: the database, to authenticate API keys.
        stream: the event stream (read by this gateway's reader; replays).
        cache: the hot cache (`latest` after an unrecoverable gap).
        alerts: the fired-alerts stream (events `alert_fired`/`alert_resolved` with
            `detail.user_id`); None: the `alerts` channel accepts subscriptions but stays quiet.
        hub: the hub to fan out through (default: a new one); pass one to share it with
            another transport (Socket.IO) in the same process.
        node_id: this gateway's name in welcome frames and logs (default: host and a random id).
        key_cache_ttl_s: seconds a verified API key is served from memory instead of the
            database (0: ask the database on every connect); see auth.py.
        revalidate_interval_s: seconds between re-checks of the keys of open connections (one
            query for all): a revoked key's connections are closed with 4001 within about this
            long. 0 or less: never re-checked (only `revalidate_keys()` does it).

    Use `await serve(stop)` (start, wait for `stop`, stop), or `start()` / `stop()`.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        engine: AsyncEngine,
        stream: EventStream,
        cache: HotCache,
        alerts: EventStream | None = None,
        hub: Hub | None = None,
        node_id: str | None = None,
        key_cache_ttl_s: float = KEY_CACHE_TTL_S,
        revalidate_interval_s: float = REVALIDATE_INTERVAL_S,
    ) -> None:
        self.settings = settings
        self.hub = hub if hub is not None else Hub()
        self.node_id = node_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self._auth = Authenticator(engine, ttl_s=key_cache_ttl_s)
        self._revalidate_interval_s = revalidate_interval_s
        self._revalidator: asyncio.Task[None] | None = None
        self._by_key: dict[int, set[_Connection]] = {}  # open connections per API key id
        self._wire = _WireFrames()  # shared by every connection of this gateway
        self._stream = stream
        self._cache = cache
        self._alerts = alerts
        self._ssl = _ssl_context(settings)
        self._server: Server | None = None
        self._port: int | None = None
        self._readers: list[asyncio.Task[None]] = []
        self._handlers: dict[ServerConnection, _Connection | None] = {}
        self._per_key = ConnectionCounter()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._connect_bucket: TokenBucket | None = None
        self._monotonic: Callable[[], float] = time.monotonic
        self._stopping = False
        self._log = log.bind(node=self.node_id)

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port listened on (the real one when settings asked for 0), from `start` on."""
        if self._port is None:
            raise RuntimeError("the gateway is not started")
        return self._port

    @property
    def url(self) -> str:
        scheme = "wss" if self._ssl is not None else "ws"
        return f"{scheme}://{self.settings.gateway_host}:{self.port}{PATH}"

    @property
    def connection_count(self) -> int:
        """Connections whose handler runs on this node (authenticating or open)."""
        return len(self._handlers)

    async def start(self) -> None:
        """Listen and start the stream readers; live delivery begins at the streams' current
        last offsets (clients catch up on anything older with `since`).

        Raises:
            BackendUnavailable: a stream could not be reached.
            OSError: the port could not be bound.
        """
        if self._server is not None:
            raise RuntimeError("the gateway is already started")
        s = self.settings
        self._connect_bucket = TokenBucket(s.gateway_connect_rate, max(1.0, s.gateway_connect_rate),
                                           self._monotonic())
        positions: list[tuple[EventStream, str, Callable[[Event], Awaitable[int]], int]] = [
            (self._stream, "events", self.hub.publish_async, await self._stream.last_offset())]
        if self._alerts is not None:
            positions.append((self._alerts, "alerts", self.hub.publish_alert_async,
                              await self._alerts.last_offset()))
        self._server = await serve(
            self._handle, s.gateway_host, s.gateway_port,
            process_request=self._process_request,
            # Per-message deflate would compress every frame once per connection, undoing the
            # encode-once fan-out (and costing ~300 KiB of zlib state per connection).
            compression=None,
            ping_interval=s.gateway_ping_interval_s, ping_timeout=s.gateway_ping_timeout_s,
            close_timeout=s.gateway_close_timeout_s,
            max_size=MAX_INBOUND_BYTES, write_limit=WRITE_LIMIT_BYTES,
            # asyncio's default accept queue of 100 overflows in a connect storm: the kernel
            # drops the SYNs and clients retry after 1-3 s (bench/ws_fanout.py: connect p95
            # 1.55 s at 500 connects/s, 1,282 dropped; 0.44 s and none with 4096). The kernel
            # caps it at net.core.somaxconn.
            backlog=LISTEN_BACKLOG,
            ssl=self._ssl, server_header=f"defiwatch/{__version__}",
        )
        self._port = int(next(iter(self._server.sockets)).getsockname()[1])
        for stream, name, publish, position in positions:
            self._readers.append(asyncio.create_task(
                self._read(stream, name, publish, position), name=f"gateway-reader-{name}"))
        if self._revalidate_interval_s > 0:
            self._revalidator = asyncio.create_task(self._revalidate_periodically(),
                                                    name="gateway-revalidator")
        self._log.info("gateway.started", url=self.url, tls=self._ssl is not None,
                       positions={name: pos for _, name, _, pos in positions})

    async def stop(self) -> None:
        """Stop listening and reading, close every connection with 1012 and wait for their
        handlers to finish. Idempotent."""
        if self._server is None or self._stopping:
            return
        self._stopping = True
        server = self._server
        server.close(close_connections=False)  # stop accepting; open connections are ours
        if self._revalidator is not None:
            self._revalidator.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._revalidator
        await self._stop_readers()
        self._close_all(CloseCode.SERVICE_RESTART, "server restart")
        await server.wait_closed()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._log.info("gateway.stopped")

    async def _stop_readers(self) -> None:
        # redis-py can swallow a cancellation that lands on a blocking read's own deadline
        # (seen under load with XREAD BLOCK): then the reader goes on. It also checks
        # `_stopping` after every wait, so it ends within one wait (_WAIT_S) at the latest; we
        # cancel again meanwhile, which normally lands.
        pending = {reader for reader in self._readers if not reader.done()}
        deadline = asyncio.get_running_loop().time() + _WAIT_S + 1
        while pending:
            for reader in pending:
                reader.cancel()
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                self._log.error("gateway.reader_stop_timeout", readers=len(pending))
                return
            _, pending = await asyncio.wait(pending, timeout=min(1.0, remaining))
            if pending:
                self._log.warning("gateway.reader_slow_to_stop", readers=len(pending))

    async def serve(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set, then shut down gracefully (1012)."""
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()

    def _close_all(self, code: int, reason: str) -> None:
        for ws, conn in list(self._handlers.items()):
            if conn is not None:
                conn.close(code, reason)
            else:  # still authenticating
                self._spawn(ws.close(code, reason))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- handshake ------------------------------------------------------------------------

    def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        """Refuse at the HTTP handshake: wrong path (404), node full or connecting too fast
        (503 with Retry-After). Runs before any WebSocket frame, so it is cheap to say no."""
        if urlsplit(request.path).path != PATH:
            metrics.HANDSHAKES_REFUSED.labels("not_found").inc()
            return ws.respond(HTTPStatus.NOT_FOUND, f"not found: the endpoint is {PATH}\n")
        if self._stopping:
            return self._unavailable(ws, "stopping", 1, "the gateway is shutting down")
        if len(self._handlers) >= self.settings.gateway_max_connections:
            return self._unavailable(ws, "node_full", _NODE_FULL_RETRY_AFTER_S,
                                     "this gateway is at its connection cap")
        bucket = self._connect_bucket
        assert bucket is not None
        now = self._monotonic()
        if not bucket.take(now):
            return self._unavailable(ws, "connect_rate", bucket.retry_after(now),
                                     "too many new connections")
        return None

    def _unavailable(self, ws: ServerConnection, reason: str, retry_after: int, text: str
                     ) -> Response:
        metrics.HANDSHAKES_REFUSED.labels(reason).inc()
        self._log.info("gateway.refused", reason=reason, retry_after_s=retry_after)
        response = ws.respond(HTTPStatus.SERVICE_UNAVAILABLE,
                              f"{text}; retry in {retry_after} s or use another gateway\n")
        response.headers["Retry-After"] = str(retry_after)
        return response

    # --- connections ----------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        self._handlers[ws] = None
        principal: Principal | None = None
        conn: _Connection | None = None
        session: Session | None = None
        welcomed = False
        connection_id = uuid.uuid4().hex
        clog = self._log.bind(connection_id=connection_id)
        try:
            principal = await self._authenticate(ws)
            if principal is None:
                return
            limits = self._limits(principal.tier)
            if not self._per_key.acquire(principal.key_id, limits.ws_connections):
                await self._refuse(ws, Rejection(
                    ErrorCode.TOO_MANY_CONNECTIONS,
                    f"this key already has {limits.ws_connections} connections open on this "
                    "gateway (its tier's limit); close one first"),
                    CloseCode.TOO_MANY_CONNECTIONS, "too_many_connections")
                principal = None  # nothing acquired, nothing to release
                return
            conn = _Connection(ws, capacity=self.settings.gateway_send_queue, tasks=self._tasks,
                               wire=self._wire)
            self._handlers[ws] = conn
            self._by_key.setdefault(principal.key_id, set()).add(conn)
            session = Session(connection_id=connection_id, principal=principal, limits=limits,
                              hub=self.hub, output=conn, events=self._stream,
                              alerts=self._alerts, cache=self._cache,
                              replay_page=min(500, max(1, self.settings.gateway_send_queue // 4)))
            if self._stopping:
                conn.close(CloseCode.SERVICE_RESTART, "server restart")
                return
            await session.start(node=self.node_id)
            welcomed = True
            metrics.CONNECTIONS.inc()
            metrics.CONNECTIONS_OPENED.inc()
            clog.info("gateway.connected", user=principal.user, tier=principal.tier)
            async for message in ws:
                await session.handle(message)
        except ConnectionClosed:
            pass
        except BackendUnavailable as exc:
            clog.warning("gateway.backend_unavailable", error=exc.message)
            await self._refuse(ws, Rejection(ErrorCode.BACKEND_UNAVAILABLE, exc.message,
                                             temporary=True),
                               CloseCode.TRY_AGAIN_LATER, "backend_unavailable")
        except Exception:
            clog.exception("gateway.handler_failed")
            if conn is not None:
                conn.close(CloseCode.INTERNAL_ERROR, "internal error")
            else:
                await ws.close(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            self._handlers.pop(ws, None)
            if session is not None:
                session.close()
            if principal is not None:
                self._per_key.release(principal.key_id)
                if conn is not None:
                    same_key = self._by_key.get(principal.key_id)
                    if same_key is not None:
                        same_key.discard(conn)
                        if not same_key:
                            del self._by_key[principal.key_id]
            if welcomed:
                metrics.CONNECTIONS.dec()
            code = ws.close_code if ws.close_code is not None else (
                conn.close_code if conn is not None and conn.close_code is not None else 1006)
            metrics.CLOSES.labels(str(code)).inc()
            clog.info("gateway.disconnected", code=code)

    async def _authenticate(self, ws: ServerConnection) -> Principal | None:
        """The connection's principal, or None after refusing it (error frame, then 4001)."""
        request = ws.request
        assert request is not None  # the handler runs after the handshake
        key = api_key_from_request(request.headers, request.path)
        if key is None:
            timeout = self.settings.gateway_auth_timeout_s
            try:
                async with asyncio.timeout(timeout):
                    raw = await ws.recv()
            except TimeoutError:
                await self._refuse(ws, Rejection(
                    ErrorCode.UNAUTHORIZED,
                    f"no API key: send 'Authorization: Bearer <key>', 'X-API-Key', ?apiKey= or "
                    f"a first message {{\"type\": \"auth\", \"api_key\": ...}} within {timeout:g} s",
                    "api_key"), CloseCode.UNAUTHORIZED, "unauthorized")
                return None
            command = parse_client_frame(raw)
            if not isinstance(command, Auth):
                await self._refuse(ws, Rejection(
                    ErrorCode.UNAUTHORIZED,
                    "the handshake carried no API key, so the first message must be "
                    "{\"type\": \"auth\", \"api_key\": ...}",
                    command.field if isinstance(command, Rejection) else "type",
                    None if isinstance(command, Rejection) else command.id),
                    CloseCode.UNAUTHORIZED, "unauthorized")
                return None
            key = command.api_key
        try:
            result = await self._auth.authenticate(key)
        except (SQLAlchemyError, OSError) as exc:
            raise BackendUnavailable(
                f"the database could not be reached to check the API key ({type(exc).__name__}); "
                "reconnect later") from exc
        if isinstance(result, Rejection):
            code = (CloseCode.FORBIDDEN if result.code is ErrorCode.FORBIDDEN
                    else CloseCode.UNAUTHORIZED)
            await self._refuse(ws, result, code, result.code.value)
            return None
        return result

    async def _refuse(self, ws: ServerConnection, rejection: Rejection, code: int, reason: str
                      ) -> None:
        metrics.HANDSHAKES_REFUSED.labels(reason).inc()
        self._log.info("gateway.refused", reason=reason, code=code)
        with contextlib.suppress(ConnectionClosed):
            await ws.send(error_frame(rejection), text=True)
            await ws.close(code, reason)

    def _limits(self, tier: str) -> TierLimits:
        tiers = self.settings.tiers
        return tiers.get(tier) or tiers["free"]

    # --- revocation -----------------------------------------------------------------------

    async def revalidate_keys(self) -> int:
        """Re-check the keys of every open connection (and of the key cache) in one query and
        close the connections of revoked keys: an `error` frame (`unauthorized`), then 4001
        "api key revoked". Runs every `revalidate_interval_s`; callable at any time. Returns
        the connections closed.

        Raises:
            sqlalchemy.exc.SQLAlchemyError, OSError: the database could not be reached.
        """
        revoked = await self._auth.revoked(self._by_key.keys())
        closed = 0
        # Connections of these keys that opened while the query ran are in `_by_key` by now:
        # read it after the await, not before.
        for key_id in revoked:
            conns = [conn for conn in self._by_key.get(key_id, ()) if not conn.closing]
            for conn in conns:
                conn.send(error_frame(Rejection(
                    ErrorCode.UNAUTHORIZED,
                    "this API key was revoked; connect again with a valid key", "api_key")))
                conn.close(CloseCode.UNAUTHORIZED, REVOKED_REASON)
            closed += len(conns)
            self._log.info("gateway.key_revoked", key_id=key_id, closed=len(conns))
        return closed

    async def _revalidate_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._revalidate_interval_s)
            try:
                await self.revalidate_keys()
            except (SQLAlchemyError, OSError) as exc:
                # Connections stay open; the next period tries again.
                self._log.warning("gateway.revalidate_unavailable", error=repr(exc),
                                  retry_in_s=self._revalidate_interval_s)
            except Exception:
                self._log.exception("gateway.revalidate_failed")

    # --- stream readers -------------------------------------------------------------------

    async def _read(self, stream: EventStream, name: str,
                    publish: Callable[[Event], Awaitable[int]], position: int) -> None:
        """Follow one stream from `position`, handing each event to the hub, until cancelled
        (or, should a cancellation get lost in the Redis client, until `_stopping`)."""
        delay: float | None = None
        rlog = self._log.bind(stream=name)
        epoch: str | None = None
        check_first = True  # at start, and after a failure or a gap: before blocking again
        while not self._stopping:
            try:
                if check_first:
                    position, epoch = await self._check_epoch(stream, name, position, epoch)
                    check_first = False
                await stream.wait(position, _WAIT_S)
                # Again after every wake-up, before reading: a new stream that already grew
                # past `position` would otherwise pass for the continuation of the old one.
                position, epoch = await self._check_epoch(stream, name, position, epoch)
                while not self._stopping:
                    page = await stream.read(position, _READ_BATCH)
                    if page.gap:
                        position = self._on_gap(name, position, page.first_offset,
                                                page.last_offset)
                        # Everyone was closed: learn the (maybe new) epoch, close no one again.
                        epoch, check_first = None, True
                        continue
                    fanout = 0
                    for event in page.events:
                        position = event.offset
                        fanout += await publish(event)
                        if fanout >= _YIELD_EVERY:
                            # Never hold the loop for a whole page of a big fan-out.
                            await asyncio.sleep(0)
                            fanout = 0
                    if len(page.events) < _READ_BATCH:
                        break
                delay = None
                health.beat("gateway", idle_s=_WAIT_S)
            except asyncio.CancelledError:
                raise
            except BackendUnavailable as exc:
                delay = _READER_BACKOFF.delay(delay)
                rlog.warning("gateway.reader_unavailable", error=exc.message, retry_in_s=delay)
                health.beat("gateway", error=exc.message, idle_s=delay)
                await asyncio.sleep(delay)
                check_first = True
            except Exception as exc:
                delay = _READER_BACKOFF.delay(delay)
                rlog.exception("gateway.reader_failed", error=str(exc), retry_in_s=delay)
                health.beat("gateway", error=str(exc), idle_s=delay)
                await asyncio.sleep(delay)
                check_first = True

    async def _check_epoch(self, stream: EventStream, name: str, position: int,
                           known: str | None) -> tuple[int, str]:
        """Compare the stream's epoch with the one the reader knows; return (position, epoch).

        After Redis lost its data (a restart without it, a FLUSHALL) the stream starts again at
        offset 1 under a new epoch. Offsets alone show that only once a read finds `position`
        beyond the newest offset, and not at all once the new stream has grown past it; and a
        blocking wait at an old position would sleep until it did. So the epoch is checked
        after each wake-up and, after a failure, before blocking again (one GET each), and a
        new one is a gap: every connection is closed with 1012 and recovers with `since` and
        `epoch`.
        """
        epoch = await stream.epoch()
        if known is None or epoch == known:
            return position, epoch
        self._log.warning("stream.epoch_changed", stream=name, position=position,
                          old_epoch=known, epoch=epoch)
        metrics.READER_GAPS.labels(name).inc()
        self._close_all(CloseCode.SERVICE_RESTART, f"{name} stream restarted")
        return 0, epoch

    def _on_gap(self, name: str, position: int, first: int, last: int) -> int:
        """The reader lost events (it fell behind retention) or the stream restarted: every
        connection may now hold a hole, so close them all with 1012; clients resubscribe with
        `since` and learn `recovered: false`. Returns where to read on from."""
        metrics.READER_GAPS.labels(name).inc()
        restarted = position > last
        self._log.warning("gateway.reader_gap", stream=name, position=position,
                          first_offset=first, last_offset=last, restarted=restarted)
        self._close_all(CloseCode.SERVICE_RESTART, f"{name} stream gap")
        if restarted:
            return 0
        return first - 1 if first else last


def _ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """TLS 1.3 or nothing: the certificate chain and key from settings, when both are set.

    Raises:
        ConfigError: only one of them is set, or they cannot be loaded.
    """
    cert, key = settings.gateway_tls_cert, settings.gateway_tls_key
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ConfigError(
            "set both DEFIWATCH_GATEWAY_TLS_CERT and DEFIWATCH_GATEWAY_TLS_KEY (or neither)",
            field="gateway_tls_cert" if cert is None else "gateway_tls_key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the gateway TLS certificate {cert} and key {key}: {exc}",
                          field="gateway_tls_cert") from exc
    return context
