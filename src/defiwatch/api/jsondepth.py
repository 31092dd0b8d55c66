"""The API's JSON nesting limit: request bodies nested too deep get a 400 naming the path
before a route decodes them (the measure itself is defiwatch/jsondepth.py)."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from defiwatch.api.bodylimit import BODY_METHODS, CLOSE, BodyTooLarge
from defiwatch.api.errors import send_error
from defiwatch.errors import ValidationError
from defiwatch.jsondepth import MAX_JSON_DEPTH, too_deep

__all__ = ["JsonDepthMiddleware"]


class JsonDepthMiddleware:
    """Refuse request bodies nested deeper than MAX_JSON_DEPTH with a 400 naming the path.

    Pure ASGI: it gathers the body (already authenticated and size-capped by the middleware
    outside it), checks it, and hands the same bytes on in one message.
    """

    def __init__(self, app: ASGIApp, limit: int = MAX_JSON_DEPTH) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        try:
            body, ended = await _gather(receive)
        except HTTPException as exc:  # the body gate failing the read: over the cap (413)
            if exc.status_code != BodyTooLarge.http_status:
                raise
            await send_error(send, BodyTooLarge(str(exc.detail)), headers=[CLOSE])
            return
        path = too_deep(body, self.limit)
        if path is not None:
            await send_error(send, ValidationError(
                f"the JSON nests deeper than {self.limit} levels", field=path))
            return
        queue: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]
        if ended is not None:
            queue.append(ended)

        async def replayed() -> Message:
            return queue.pop(0) if queue else await receive()

        await self.app(scope, replayed, send)


async def _gather(receive: Receive) -> tuple[bytes, Message | None]:
    """The whole body, and the disconnect message when the client left before sending it."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), message
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), None
