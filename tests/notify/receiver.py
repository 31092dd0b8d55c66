"""A real HTTP server on 127.0.0.1 (ephemeral port) that plays webhook, chat and push receivers.

Every request is recorded (method, path, headers, body, client port) before it is answered, so
a test that awaited its send can read `requests` without waiting. Answers come from `script()`
(in order) or from `answer`, a function of the request (default: 200 with `ok`). A `HANG`
reply holds the request until the server closes: the sender's timeout is what ends it.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: bytes = b"ok"
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False


HANG = Reply(hang=True)


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes
    client_port: int


class Receiver:
    def __init__(self, answer: Callable[[Seen], Reply] | None = None, *,
                 tls: ssl.SSLContext | None = None) -> None:
        self.answer = answer or (lambda _seen: Reply())
        self.requests: list[Seen] = []
        self._queued: list[Reply] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the senders use

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                seen = Seen("POST", self.path, {k.lower(): v for k, v in self.headers.items()},
                            body, self.client_address[1])
                reply = owner._record(seen)
                if reply.hang:
                    owner._closing.wait(30)
                    self.close_connection = True
                    return
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # keep test output quiet

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._scheme = "https" if tls else "http"
        if tls is not None:
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True)
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def origin(self) -> str:
        return f"{self._scheme}://127.0.0.1:{self.port}"

    def url(self, path: str = "/hook") -> str:
        return self.origin + path

    def script(self, *replies: Reply) -> None:
        """Answer the next requests with `replies`, in order, then with `answer` again."""
        with self._lock:
            self._queued.extend(replies)

    def _record(self, seen: Seen) -> Reply:
        with self._lock:
            self.requests.append(seen)
            if self._queued:
                return self._queued.pop(0)
        return self.answer(seen)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()
