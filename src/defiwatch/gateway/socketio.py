"""Socket.IO compatibility: the original spec's API over `python-socketio`, on the shared hub.

Clients of the original API connect with `io(url, {auth: {apiKey}})` (path `/socket.io`, port
`socketio_port`), `emit('subscribe', {type: 'protocol', protocol, chain?})` (or `tvl_changes`
with `threshold`, `token` with `token`, `price_changes`) and receive `tvl_change` and
`price_change` events in the original shape. Under that, every Socket.IO connection is a
`Session` (session.py) on the same `Hub` as the native gateway, so limits, filters and the
per-subscription rules are the native ones. This module only translates:

- subscribe payloads -> protocol v1 subscribe frames (`_channel_frame`);
- protocol v1 control frames -> Socket.IO events (`error` with our error shape, `subscribed`,
  `unsubscribed`, `welcome`);
- events -> `tvl_change` {protocol, chain, previousTvl, currentTvl, changePercent, timestamp}
  (protocol TVL, metric `tvl`; `chain` null for the total over all chains) and `price_change`
  {token, previousPrice, currentPrice, changePercent, timestamp} (metric `price`); `timestamp`
  is the observation time in ISO 8601 UTC. Other events (sub-metrics, chain TVL, market caps,
  protocol updates) have no shape in the original API and are not sent.

Encode once. Why not `AsyncServer.emit(..., room=channel)` (one encode per emit, then the
manager loops over the room): a room has no per-member filter (each client's `threshold`),
no dedup of one event reaching a client through two of its channels, and no bounded, conflating
send buffer per client. So delivery goes through the hub per session, and the Socket.IO packet
text is encoded once per event by `_Encoder` (the hub hands the same `Event` object to every
subscription during one fan-out) and shared by every session; per session only Engine.IO's own
one-character prefix is added when written. Measured cost is not redone here: it is the
native gateway's per-connection bookkeeping (~1 us, docs/gateway-notes.md) plus Engine.IO's
queue put per client.

Backpressure. Engine.IO queues packets per socket without a bound. Each session therefore has
our `Outbox` (`gateway_send_queue` frames, conflating per series, then closing the connection
when still full) drained by a writer task that hands Engine.IO at most `_EIO_QUEUE_FRAMES`
packets before waiting for its writer to take them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import engineio
import msgspec
import socketio
import structlog
import uvicorn
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from defiwatch.cache import HotCache
from defiwatch.config import Settings, TierLimits
from defiwatch.domain import NO_CHAIN, Event, EventType
from defiwatch.errors import BackendUnavailable
from defiwatch.gateway import metrics
from defiwatch.gateway.hub import Hub
from defiwatch.gateway.limits import ConnectionCounter
from defiwatch.gateway.outbox import Outbox, PushResult
from defiwatch.gateway.protocol import CloseCode, ErrorCode, Rejection, api_key_from_request
from defiwatch.gateway.session import Session, authenticate_key
from defiwatch.stream import EventStream

__all__ = ["SOCKETIO_PATH", "SocketIOServer"]

log = structlog.get_logger(__name__)

SOCKETIO_PATH = "/socket.io"
_NAMESPACE = "/"
_EIO_QUEUE_FRAMES = 64  # packets handed to Engine.IO's per-socket queue before we wait for it
_RECENT_OFFSETS = 64  # offsets remembered per session to send an event once across channels
_json = msgspec.json.Encoder()
_decode = msgspec.json.Decoder()


def _error(rejection: Rejection) -> dict[str, Any]:
    return {"error": {"code": rejection.code.value, "message": rejection.message,
                      "field": rejection.field, "temporary": rejection.temporary}}


def _iso(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def compat_event(event: Event) -> tuple[str, dict[str, Any]] | None:
    """The original API's event name and payload for `event`, or None if it has none."""
    if event.type == EventType.TVL_CHANGE and event.metric == "tvl":
        return "tvl_change", {
            "protocol": event.subject,
            "chain": None if event.chain == NO_CHAIN else event.chain,
            "previousTvl": event.previous, "currentTvl": event.value,
            "changePercent": event.change_pct, "timestamp": _iso(event.ts)}
    if event.type == EventType.PRICE_CHANGE and event.metric == "price":
        return "price_change", {
            "token": event.subject, "previousPrice": event.previous,
            "currentPrice": event.value, "changePercent": event.change_pct,
            "timestamp": _iso(event.ts)}
    return None


def _packet(name: str, payload: Any) -> bytes:
    # Socket.IO protocol v5 EVENT packet ("2"), default namespace (omitted), JSON array.
    return b"2" + _json.encode([name, payload])


class _Encoder:
    """Socket.IO packet text of an event, encoded once per event for every session: a hub
    fan-out offers one `Event` object to all subscriptions, so the last one is cached."""

    def __init__(self) -> None:
        self._event: Event | None = None
        self._packet: bytes | None = None

    def packet(self, event: Event) -> bytes | None:
        if event is not self._event:
            mapped = compat_event(event)
            self._event = event
            self._packet = None if mapped is None else _packet(*mapped)
        return self._packet


def channel_frame(kind: str, payload: object, request_id: int) -> bytes | Rejection:
    """The protocol v1 `subscribe`/`unsubscribe` frame for an original-API payload."""
    if not isinstance(payload, dict):
        return Rejection(ErrorCode.INVALID_REQUEST,
                         "the payload must be an object such as {type: 'protocol', protocol}",
                         None, request_id)
    sub_type = payload.get("type")

    def text(name: str) -> str | Rejection:
        value = payload.get(name)
        if not isinstance(value, str) or not value.strip():
            return Rejection(ErrorCode.INVALID_REQUEST,
                             f"{sub_type} subscriptions need {name}, a non-empty string", name,
                             request_id)
        return value.strip()

    if sub_type == "protocol":
        slug = text("protocol")
        if isinstance(slug, Rejection):
            return slug
        chain = payload.get("chain")
        if chain is None:
            channel = f"protocol:{slug}"
        elif isinstance(chain, str) and chain.strip() and ":" not in chain:
            channel = f"protocol:{slug}:{chain.strip()}"
        else:
            return Rejection(ErrorCode.INVALID_REQUEST, "chain must be a chain name", "chain",
                             request_id)
    elif sub_type == "token":
        coin = text("token")
        if isinstance(coin, Rejection):
            return coin
        channel = f"token:{coin}"
    elif sub_type in ("tvl_changes", "price_changes"):
        channel = str(sub_type)
    else:
        return Rejection(ErrorCode.INVALID_REQUEST,
                         f"unknown subscription type {sub_type!r}; known: protocol, tvl_changes, "
                         "token, price_changes", "type", request_id)
    frame: dict[str, Any] = {"type": kind, "id": request_id, "channel": channel}
    threshold = payload.get("threshold")
    if threshold is not None and kind == "subscribe":
        frame["filter"] = {"min_change_pct": threshold}
    return _json.encode(frame)


class _Output:
    """One Socket.IO connection's outgoing side (`session.Output`)."""

    def __init__(self, server: SocketIOServer, sid: str, eio_sid: str, capacity: int) -> None:
        self._server = server
        self._sid = sid
        self._eio_sid = eio_sid
        self._outbox = Outbox(capacity)
        self._low = capacity // 2
        self._space = asyncio.Event()
        self._space.set()
        self._writer: asyncio.Task[None] | None = None
        self._open = False  # the CONNECT packet went out; frames before it wait in the outbox
        self._recent: dict[int, None] = {}
        self.closing = False

    # Subscriber.
    def deliver(self, channel: str, event: Event, frame: bytes) -> None:
        packet = self._server.encoder.packet(event)
        if packet is None or self.closing or event.offset in self._recent:
            return  # no original shape, or already sent through another of its channels
        self._recent[event.offset] = None
        if len(self._recent) > _RECENT_OFFSETS:
            del self._recent[next(iter(self._recent))]
        self._queue(packet, (channel, event.series))

    # Output.
    def send(self, frame: bytes) -> None:
        obj = _decode.decode(frame)
        kind = obj.get("type")
        if kind == "error":
            error = obj["error"]
            if error.get("field") == "filter.min_change_pct":
                error["field"] = "threshold"  # the original API's name for it
            packet = _packet("error", {"error": error})
        elif kind == "ack":
            packet = _packet("unsubscribed" if obj.get("id") in self._server.unsubscribes
                             else "subscribed", {"channel": obj["channel"]})
        elif kind == "welcome":
            packet = _packet("welcome", {k: obj[k] for k in ("connection_id", "user", "tier",
                                                             "limits", "node")})
        else:
            return  # pong, latest: no counterpart in the original API
        if not self.closing:
            self._queue(packet, None)

    @property
    def closed(self) -> bool:
        return self.closing

    def close(self, code: int, reason: str) -> None:
        if self.closing:
            return
        self.closing = True
        dropped = self._outbox.clear()
        if dropped:
            metrics.FRAMES_DROPPED.inc(dropped)
        self._space.set()
        log.info("gateway.socketio_closing", sid=self._sid, code=code, reason=reason)
        self._server.spawn(self._server.sio.disconnect(self._sid))

    async def drained(self) -> None:
        while len(self._outbox) > self._low and not self.closing:
            self._space.clear()
            await self._space.wait()

    def opened(self) -> None:
        self._open = True
        self._start_writer()

    def _queue(self, packet: bytes, key: Any) -> None:
        result = self._outbox.push(packet, key)
        if result is PushResult.OVERFLOW:
            log.warning("gateway.slow_consumer", sid=self._sid, queued=len(self._outbox))
            self.close(CloseCode.TOO_SLOW, "too slow: send buffer full")
            return
        self._start_writer()

    def _start_writer(self) -> None:
        if self._writer is None and self._open and self._outbox:
            self._writer = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        eio = self._server.sio.eio
        try:
            while self._outbox and not self.closing:
                packet = self._outbox.popleft()
                if len(self._outbox) <= self._low:
                    self._space.set()
                await eio.send_packet(self._eio_sid, engineio.packet.Packet(
                    engineio.packet.MESSAGE, data=packet.decode()))
                try:
                    queue = eio._get_socket(self._eio_sid).queue
                except KeyError:
                    return  # gone; the disconnect handler cleans up
                if queue.qsize() > _EIO_QUEUE_FRAMES:
                    # Engine.IO's writer takes a packet once the previous one was written (or,
                    # long-polling, when the client polls): wait for it instead of piling up.
                    await queue.join()
        finally:
            self._writer = None
            self._space.set()
            if not self.closing:
                self._start_writer()


class _Uvicorn(uvicorn.Server):
    """uvicorn that reports when it listens and leaves signals to the caller."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class SocketIOServer:
    """The Socket.IO compatibility server of one process (see the module docstring).

    Args:
        settings: `gateway_host`, `socketio_port` (0: an ephemeral port), `gateway_send_queue`,
            ping interval/timeout, and `tiers`.
        engine: the database, to authenticate API keys.
        hub: the hub to subscribe on: the native gateway's (`gateway.hub`), whose stream
            reader feeds it. This server starts no reader of its own.
        stream: the event stream (welcome positions). cache: the hot cache.
        node_id: this server's name in welcome events and logs.
    """

    def __init__(self, *, settings: Settings, engine: AsyncEngine, hub: Hub,
                 stream: EventStream, cache: HotCache, node_id: str | None = None) -> None:
        self.settings = settings
        self.hub = hub
        self.node_id = node_id or f"{socket.gethostname()}-sio-{uuid.uuid4().hex[:8]}"
        self.encoder = _Encoder()
        self.unsubscribes: set[int] = set()  # request ids of unsubscribes awaiting their ack
        self._engine = engine
        self._stream = stream
        self._cache = cache
        self._per_key = ConnectionCounter()
        self._sessions: dict[str, tuple[Session, _Output, int]] = {}
        self._ids = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self.sio = socketio.AsyncServer(
            async_mode="asgi", cors_allowed_origins="*",
            # One message at a time per client, in order (a subscribe then an unsubscribe).
            async_handlers=False,
            ping_interval=settings.gateway_ping_interval_s,
            ping_timeout=settings.gateway_ping_timeout_s,
            max_http_buffer_size=64 * 1024, logger=False, engineio_logger=False)
        self.sio.on("connect", self._connect)
        self.sio.on("disconnect", self._disconnect)
        self.sio.on("subscribe", self._on_subscribe)
        self.sio.on("unsubscribe", self._on_unsubscribe)
        self._app = socketio.ASGIApp(self.sio, socketio_path=SOCKETIO_PATH.strip("/"))
        self._server: _Uvicorn | None = None
        self._serving: asyncio.Task[None] | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the Socket.IO server is not started")
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.settings.gateway_host}:{self.port}"

    @property
    def connection_count(self) -> int:
        return len(self._sessions)

    async def start(self) -> None:
        """Listen on `gateway_host`:`socketio_port`.

        Raises:
            OSError: the port could not be bound.
        """
        if self._server is not None:
            raise RuntimeError("the Socket.IO server is already started")
        s = self.settings
        sock = socket.socket(socket.AF_INET6 if ":" in s.gateway_host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((s.gateway_host, s.socketio_port))
        except OSError:
            sock.close()
            raise
        self._port = int(sock.getsockname()[1])
        config = uvicorn.Config(self._app, log_config=None, access_log=False, lifespan="off",
                                ws="websockets-sansio", ws_per_message_deflate=False)
        self._server = _Uvicorn(config)
        self._serving = asyncio.create_task(self._server.serve(sockets=[sock]),
                                            name="socketio-server")
        ready = asyncio.create_task(self._server.ready.wait())
        await asyncio.wait({ready, self._serving}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            await self._serving  # raises why it could not start
            raise OSError(f"the Socket.IO server could not start on port {self._port}")
        log.info("gateway.socketio_started", url=self.url, path=SOCKETIO_PATH)

    async def stop(self) -> None:
        """Disconnect every client and stop listening. Idempotent."""
        if self._server is None or self._serving is None or self._server.should_exit:
            return
        for sid in list(self._sessions):
            self._sessions[sid][1].close(CloseCode.SERVICE_RESTART, "server restart")
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._server.should_exit = True
        await asyncio.gather(self._serving, return_exceptions=True)
        log.info("gateway.socketio_stopped")

    async def serve(self, stop: asyncio.Event) -> None:
        """Start, wait for `stop`, stop. Stops also when cancelled while starting (a
        supervised restart must find the port free)."""
        try:
            await self.start()
            await stop.wait()
        finally:
            await self.stop()

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # keep a reference until done (asyncio holds tasks weakly)
        task.add_done_callback(self._tasks.discard)

    def _limits(self, tier: str) -> TierLimits:
        return self.settings.tiers.get(tier) or self.settings.tiers["free"]

    def _refuse(self, rejection: Rejection, reason: str) -> socketio.exceptions.ConnectionRefusedError:
        # The client's `connect_error` gets err.message and err.data = our error shape.
        metrics.HANDSHAKES_REFUSED.labels(reason).inc()
        log.info("gateway.refused", transport="socketio", reason=reason)
        return socketio.exceptions.ConnectionRefusedError(rejection.message, _error(rejection))

    async def _connect(self, sid: str, environ: dict[str, Any], auth: Any) -> None:
        key = auth.get("apiKey") if isinstance(auth, dict) else None
        if not isinstance(key, str) or not key.strip():
            headers = {k[5:].replace("_", "-").lower(): v for k, v in environ.items()
                       if k.startswith("HTTP_") and isinstance(v, str)}
            key = api_key_from_request(headers, "?" + str(environ.get("QUERY_STRING", "")))
        if not key:
            raise self._refuse(Rejection(ErrorCode.UNAUTHORIZED,
                                         "no API key: connect with io(url, {auth: {apiKey}})",
                                         "apiKey"), "unauthorized")
        try:
            result = await authenticate_key(self._engine, key.strip())
        except (SQLAlchemyError, OSError) as exc:
            raise self._refuse(Rejection(
                ErrorCode.BACKEND_UNAVAILABLE,
                f"the database could not be reached to check the API key ({type(exc).__name__}); "
                "reconnect later", None, temporary=True), "backend_unavailable") from exc
        if isinstance(result, Rejection):
            raise self._refuse(msgspec.structs.replace(
                result, field="apiKey" if result.field == "api_key" else result.field),
                result.code.value)
        limits = self._limits(result.tier)
        if not self._per_key.acquire(result.key_id, limits.ws_connections):
            raise self._refuse(Rejection(
                ErrorCode.TOO_MANY_CONNECTIONS,
                f"this key has {limits.ws_connections} Socket.IO connections open on this node "
                "(its tier's limit); close one first", None, temporary=True),
                "too_many_connections")
        output = _Output(self, sid, self.sio.manager.eio_sid_from_sid(sid, _NAMESPACE),
                         self.settings.gateway_send_queue)
        session = Session(connection_id=sid, principal=result, limits=limits, hub=self.hub,
                          output=output, events=self._stream, alerts=None, cache=self._cache)
        try:
            await session.start(node=self.node_id)  # welcome, queued until connected
        except BackendUnavailable as exc:
            self._per_key.release(result.key_id)
            raise self._refuse(Rejection(ErrorCode.BACKEND_UNAVAILABLE, exc.message,
                                         temporary=True), "backend_unavailable") from exc
        self._sessions[sid] = (session, output, result.key_id)
        metrics.CONNECTIONS.inc()
        metrics.CONNECTIONS_OPENED.inc()
        # python-socketio sends the CONNECT packet after this handler returns, without
        # suspending in between (Engine.IO's queue is unbounded): the task below runs after it,
        # so nothing of ours reaches the client before its `connect`.
        self.spawn(self._opened(sid))
        log.info("gateway.connected", transport="socketio", user=result.user, tier=result.tier)

    async def _opened(self, sid: str) -> None:
        entry = self._sessions.get(sid)
        if entry is not None:
            entry[1].opened()

    async def _disconnect(self, sid: str, reason: Any = None) -> None:
        entry = self._sessions.pop(sid, None)
        if entry is None:
            return
        session, output, key_id = entry
        output.closing = True
        session.close()
        self._per_key.release(key_id)
        metrics.CONNECTIONS.dec()
        log.info("gateway.disconnected", transport="socketio", reason=str(reason))

    async def _on_subscribe(self, sid: str, payload: Any = None) -> None:
        await self._command(sid, "subscribe", payload)

    async def _on_unsubscribe(self, sid: str, payload: Any = None) -> None:
        await self._command(sid, "unsubscribe", payload)

    async def _command(self, sid: str, kind: str, payload: Any) -> None:
        entry = self._sessions.get(sid)
        if entry is None:
            return
        session, output, _ = entry
        self._ids += 1
        request_id = self._ids
        frame = channel_frame(kind, payload, request_id)
        if isinstance(frame, Rejection):
            output.send(_json.encode({"type": "error", "id": request_id,
                                      **_error(frame)}))
            return
        if kind == "unsubscribe":
            self.unsubscribes.add(request_id)
        try:
            await session.handle(frame)
        finally:
            self.unsubscribes.discard(request_id)
