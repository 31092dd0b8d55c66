"""An async Python client for the real-time gateway (docs/protocol.md, version 1).

    async with RealtimeClient(["ws://127.0.0.1:8001/v1/realtime"], api_key,
                              [Subscription("protocol:aave"), Subscription("token:ethereum")]) as client:
        async for message in client:
            if message.type == "event":
                print(message.channel, message.offset, message.data["value"])

It reconnects on its own (with backoff and jitter, rotating through the given gateway URLs),
resubscribes, and recovers from the last offset it delivered: missed events arrive first, nothing
is delivered twice. When the gateway can no longer recover the gap (it was trimmed, or the
stream restarted), the iterator yields a `gap` message followed by `latest` values, so a caller
is never silently left with a hole.

A position is an offset *in one epoch* of a stream (the welcome frame names it). When Redis lost
its data the stream starts again at offset 1 under a new epoch: the client then resubscribes with
its old position and epoch, the gateway replays the new stream from its start, and the client
starts counting offsets afresh, so the new stream's events are delivered rather than dropped as
"already seen".
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any

import msgspec
import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI

from defiwatch.errors import AuthError, DefiwatchError

__all__ = ["Message", "RealtimeClient", "Subscription"]

log = structlog.get_logger(__name__)

# Close codes after which reconnecting with the same key cannot help (docs/protocol.md).
_FINAL_CLOSE_CODES = {1000: "closed by the server", 4001: "unauthorized"}
_SLOW_RETRY_CODES = {4029, 4030}  # rate limited / too many connections: back off longer


class Subscription(msgspec.Struct, frozen=True):
    """A channel with optional filter and conflation interval (`max_rate_ms`)."""

    channel: str
    filter: dict[str, Any] | None = None
    max_rate_ms: int | None = None


class Message(msgspec.Struct, frozen=True):
    """What the iterator yields.

    `type` is `event` (a stream event: `offset`, `data`), `latest` (current values after a gap:
    `data` is a list), or `gap` (the gateway could not replay what was missed on `channel`).
    """

    type: str
    channel: str
    offset: int = 0
    data: Any = None


class _Position:
    """Where the caller is in one stream: the epoch its offsets belong to (None until a welcome
    named it) and the newest offset delivered (None: none yet, and no `since` was given)."""

    __slots__ = ("epoch", "offset")

    def __init__(self, offset: int | None) -> None:
        self.epoch: str | None = None
        self.offset = offset


class _Epoch(msgspec.Struct, frozen=True):
    """Queued at each welcome, in order with the events: the epoch of a stream (`stream` or
    `alerts_stream`, the welcome's keys) on this connection."""

    stream: str
    epoch: str


_EVENTS, _ALERTS = "stream", "alerts_stream"  # the welcome's names of the two streams


def _stream_of(channel: str) -> str:
    # The private `alerts` channel reads a stream of its own, with offsets of its own.
    return _ALERTS if channel == "alerts" else _EVENTS


class _Closed(Exception):
    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"closed with {code}: {reason}")
        self.code = code
        self.reason = reason


class RealtimeClient:
    """A self-healing subscription to one or more gateways.

    Args:
        urls: gateway endpoints (`ws://host:8001/v1/realtime`); tried in turn on reconnect.
        api_key: sent as `Authorization: Bearer`.
        subscriptions: channels to (re)subscribe on every connection.
        since: start after this stream offset (None = only new events).
        max_backoff_s: cap of the reconnect delay (full jitter, starting at 0.1 s).
        open_timeout_s: how long one connection attempt may take.
        ssl: an `ssl.SSLContext` for `wss://` gateways with a private CA.
    """

    def __init__(
        self,
        urls: Sequence[str],
        api_key: str,
        subscriptions: Sequence[Subscription],
        *,
        since: int | None = None,
        max_backoff_s: float = 10.0,
        open_timeout_s: float = 10.0,
        ssl: Any = None,
    ) -> None:
        if not urls:
            raise ValueError("at least one gateway URL is needed")
        if not subscriptions:
            raise ValueError("at least one subscription is needed")
        self._urls = list(urls)
        self._key = api_key
        self._subscriptions = list(subscriptions)
        # Per stream, owned by the iterator (`_messages`): it advances as events are delivered.
        self._positions = {_EVENTS: _Position(since), _ALERTS: _Position(since)}
        self._max_backoff_s = max_backoff_s
        self._open_timeout_s = open_timeout_s
        self._ssl = ssl
        self._queue: asyncio.Queue[Message | _Epoch | BaseException] = asyncio.Queue(
            maxsize=10_000)
        self._task: asyncio.Task[None] | None = None
        self.reconnects = 0
        self.welcome: dict[str, Any] | None = None

    @property
    def last_offset(self) -> int | None:
        """The newest event-stream offset delivered to the caller (resume point on reconnect);
        the `alerts` channel has its own, `last_alert_offset`."""
        return self._positions[_EVENTS].offset

    @property
    def last_alert_offset(self) -> int | None:
        return self._positions[_ALERTS].offset

    @property
    def epoch(self) -> str | None:
        """The event stream's epoch `last_offset` belongs to (None before the first welcome)."""
        return self._positions[_EVENTS].epoch

    async def __aenter__(self) -> RealtimeClient:
        self._task = asyncio.create_task(self._run(), name="defiwatch-client")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[Message]:
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, _Epoch):
                self._enter_epoch(item)
                continue
            if item.type == "event":
                # Offsets are delivered in order on a connection; a replay after a reconnect
                # may overlap what was already delivered: drop that, deliver each event once.
                position = self._positions[_stream_of(item.channel)]
                if position.offset is not None and item.offset <= position.offset:
                    continue
                position.offset = item.offset
            yield item

    def _enter_epoch(self, mark: _Epoch) -> None:
        """Follow a stream into a new epoch: its offsets start again, so the position restarts
        at 0 (everything in the new stream is news). Done here, in order with the events, so
        no event of the old epoch is compared with offsets of the new one."""
        position = self._positions[mark.stream]
        if position.epoch is not None and position.epoch != mark.epoch:
            log.warning("stream.epoch_changed", stream=mark.stream, old_epoch=position.epoch,
                        epoch=mark.epoch, last_offset=position.offset)
            position.offset = 0
        position.epoch = mark.epoch

    async def _run(self) -> None:
        delay = 0.1
        for url in itertools.cycle(self._urls):
            try:
                await self._session(url)
                delay = 0.1
            except _Closed as closed:
                if closed.code in _FINAL_CLOSE_CODES:
                    error: DefiwatchError = (
                        AuthError(f"gateway refused the key: {closed.reason}")
                        if closed.code == 4001
                        else DefiwatchError(f"gateway {_FINAL_CLOSE_CODES[closed.code]}")
                    )
                    await self._queue.put(error)
                    return
                if closed.code in _SLOW_RETRY_CODES:
                    delay = max(delay, self._max_backoff_s / 2)
                log.info("client.disconnected", url=url, code=closed.code, reason=closed.reason)
            except (OSError, TimeoutError, InvalidStatus, ConnectionClosed) as exc:
                log.info("client.connect_failed", url=url, error=repr(exc))
            except InvalidURI as exc:
                await self._queue.put(DefiwatchError(f"bad gateway URL {url!r}: {exc}"))
                return
            self.reconnects += 1
            await asyncio.sleep(random.uniform(0, delay))
            delay = min(delay * 2, self._max_backoff_s)

    async def _session(self, url: str) -> None:
        async with connect(
            url, additional_headers={"Authorization": f"Bearer {self._key}"},
            open_timeout=self._open_timeout_s, ssl=self._ssl, max_queue=1024,
        ) as ws:
            welcome = await self._recv(ws)
            if welcome.get("type") == "error":
                await self._dispatch(welcome)  # an unauthorized key ends here, for good
            if welcome.get("type") != "welcome":
                raise _Closed(None, f"expected a welcome frame, got {welcome.get('type')!r}")
            self.welcome = welcome
            for stream in (_EVENTS, _ALERTS):
                if isinstance(info := welcome.get(stream), dict) and info.get("epoch"):
                    await self._queue.put(_Epoch(stream, str(info["epoch"])))
            await self._subscribe_all(ws)
            while True:
                await self._dispatch(await self._recv(ws))

    async def _subscribe_all(self, ws: ClientConnection) -> None:
        for i, sub in enumerate(self._subscriptions):
            frame: dict[str, Any] = {"id": i, "type": "subscribe", "channel": sub.channel}
            if sub.filter is not None:
                frame["filter"] = sub.filter
            if sub.max_rate_ms is not None:
                frame["max_rate_ms"] = sub.max_rate_ms
            # The iterator's position: if it has not yet taken in a new epoch, the gateway sees
            # the old one and replays the restarted stream from its start.
            position = self._positions[_stream_of(sub.channel)]
            if position.offset is not None:
                frame["since"] = position.offset
                if position.epoch is not None:
                    frame["epoch"] = position.epoch
            await ws.send(msgspec.json.encode(frame).decode())

    async def _dispatch(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "event":
            await self._queue.put(Message("event", frame["channel"], int(frame["offset"]),
                                          frame["data"]))
        elif kind == "latest":
            await self._queue.put(Message("latest", frame["channel"], 0, frame["data"]))
        elif kind == "ack" and frame.get("recovered") is False:
            await self._queue.put(Message("gap", str(frame.get("channel", "")), 0, None))
        elif kind == "error":
            error = frame.get("error") or {}
            if error.get("code") == "unauthorized":
                raise _Closed(4001, str(error.get("message")))
            log.warning("client.error_frame", code=error.get("code"), message=error.get("message"),
                        field=error.get("field"))

    @staticmethod
    async def _recv(ws: ClientConnection) -> dict[str, Any]:
        try:
            raw = await ws.recv()
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            raise _Closed(rcvd.code if rcvd else None, rcvd.reason if rcvd else "no close frame") from exc
        decoded = msgspec.json.decode(raw)
        if not isinstance(decoded, dict):
            raise _Closed(None, "frame is not a JSON object")
        return decoded
