"""A real HTTP server on 127.0.0.1 (ephemeral port) that plays DefiLlama in poller tests.

It serves fixed bytes for `GET /protocols` and `GET /prices/current/{coins}`, 404 elsewhere.
`script(path_prefix, *replies)` queues answers (429 with Retry-After, 503, ...) that are served,
in order, before the default one. Every request is recorded (path and headers).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Seen:
    path: str
    headers: dict[str, str]


class LlamaServer:
    def __init__(self, *, protocols: bytes, prices: bytes) -> None:
        self._defaults = {
            "/protocols": Reply(200, protocols, {"Content-Type": "application/json"}),
            "/prices/current/": Reply(200, prices, {"Content-Type": "application/json"}),
        }
        self._queued: dict[str, list[Reply]] = {}
        self._lock = threading.Lock()
        self.requests: list[Seen] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                reply = owner._answer(self.path, dict(self.headers.items()))
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # keep test output quiet

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def script(self, path_prefix: str, *replies: Reply) -> None:
        """Serve `replies` (in order) to requests whose path starts with `path_prefix`."""
        with self._lock:
            self._queued.setdefault(path_prefix, []).extend(replies)

    def paths(self, prefix: str) -> list[str]:
        with self._lock:
            return [r.path for r in self.requests if r.path.startswith(prefix)]

    def _answer(self, path: str, headers: dict[str, str]) -> Reply:
        with self._lock:
            self.requests.append(Seen(path, headers))
            for prefix, queue in self._queued.items():
                if path.startswith(prefix) and queue:
                    return queue.pop(0)
            for prefix, reply in self._defaults.items():
                if path == prefix or (prefix.endswith("/") and path.startswith(prefix)):
                    return reply
        return Reply(404, b'{"message":"not found"}', {"Content-Type": "application/json"})

    def __enter__(self) -> LlamaServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
