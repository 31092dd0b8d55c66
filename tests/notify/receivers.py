"""Fast webhook receivers on 127.0.0.1 for whole-notifier runs: tests/e2e and bench/notify.py.

`WebhookSink` is a small HTTP/1.1 server (keep-alive) on an ephemeral loopback port, running on
the caller's asyncio loop. Every POST is recorded as a `Hit` (the `webhook-id` header, the
receive time in epoch seconds, the path) *before* it is answered, so a hit means "the receiver
got it", whatever the sender then makes of the answer. The answer is `status` after `delay_s`
(a SLOW receiver), optionally held until `gate` is set. `refusing_port()` gives a DOWN receiver:
a port bound but never listening, so a connect is refused at once.

Written on raw asyncio streams instead of uvicorn/starlette: a benchmark receiver must cost far
less CPU per request than the notifier it measures (one core for the load generator and every
receiver), and the test needs nothing an ASGI stack adds.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType

__all__ = ["Hit", "WebhookSink", "refusing_port"]

_REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 500: "Internal Server Error",
            503: "Service Unavailable"}


@dataclass(frozen=True, slots=True)
class Hit:
    webhook_id: str  # "" when the header is missing
    received_at: float  # epoch s (time.time), when the body was read
    path: str
    signed: bool  # a webhook-signature header was present


class WebhookSink:
    """A webhook receiver recording every request (see the module docstring).

    Args:
        delay_s: wait this long before answering each request, seconds (0: answer at once).
        status: HTTP status of every answer.
        gate: when given, answers wait until it is set (requests are still recorded at once).
    """

    def __init__(self, *, delay_s: float = 0.0, status: int = 200,
                 gate: asyncio.Event | None = None) -> None:
        self.delay_s = delay_s
        self.status = status
        self.gate = gate
        self.hits: list[Hit] = []
        self.counts: Counter[str] = Counter()  # webhook-id -> times received
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        reason = _REASONS.get(status, "Status")
        self._answer = (f"HTTP/1.1 {status} {reason}\r\nContent-Length: 2\r\n"
                        "Content-Type: text/plain\r\n\r\nok").encode()

    # -- lifecycle

    async def start(self) -> WebhookSink:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=1024)
        return self

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 5)
        self._server = None

    async def __aenter__(self) -> WebhookSink:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def host(self) -> str:
        """The notification row's `host` (breaker key): host:port."""
        return f"127.0.0.1:{self.port}"

    def url(self, path: str = "/hook") -> str:
        return f"http://{self.host}{path}"

    # -- what was received

    @property
    def distinct(self) -> int:
        """Distinct webhook-ids received: the receiver honouring the idempotency key."""
        return len(self.counts)

    def duplicates(self) -> dict[str, int]:
        """webhook-id -> times received, for the ids received more than once."""
        return {k: n for k, n in self.counts.items() if n > 1}

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Return once `predicate()` is true; it is checked now and after every request."""
        if predicate():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (predicate, future)
        self._waiters.append(entry)
        try:
            await future
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)

    # -- the server

    def _record(self, hit: Hit) -> None:
        self.hits.append(hit)
        self.counts[hit.webhook_id] += 1
        for predicate, future in self._waiters:
            if not future.done() and predicate():
                future.set_result(None)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                _method, path, _version = lines[0].split(" ", 2)
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0"))
                if length:
                    await reader.readexactly(length)
                self._record(Hit(headers.get("webhook-id", ""), time.time(), path,
                                 "webhook-signature" in headers))
                if self.gate is not None:
                    await self.gate.wait()
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                writer.write(self._answer)
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
                ValueError):
            pass  # the client went away (or sent something that is not HTTP/1.1)
        finally:
            self._writers.discard(writer)
            writer.close()


@contextlib.contextmanager
def refusing_port() -> Iterator[socket.socket]:
    """Yield a socket bound to 127.0.0.1:<port> that never listens: connects are refused, and
    no other process can take the port while it is held."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield sock
    finally:
        sock.close()
