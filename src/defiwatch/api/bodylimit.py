"""The body gate: authenticate before a request body is read, and cap its size.

FastAPI reads and parses a route's body before the route's dependencies run, so the key check
in auth.py comes only after the whole body is in memory: a 300 MB body without a key grew the
API to 1.06 GB (issue 10). This pure ASGI middleware runs before any route and, for requests
that may carry a body (POST, PUT, PATCH, DELETE):

1. answers 401 (the usual error shape) when the key is missing or unknown, before reading a
   single body byte; keys are found where the routes find them (`key_from_scope`) and looked
   up through the `KeyCache` the rate limiter shares, so a busy key costs no query per request;
2. answers 413 at once when `Content-Length` is above the route's cap;
3. counts the bytes of a body sent without a length (chunked) as the route reads them, and
   makes the read fail with 413 as soon as they cross the cap, so no more is buffered.

Caps: `DEFIWATCH_API_MAX_INGEST_BODY_BYTES` for the ingest routes (large batches are their
purpose), `DEFIWATCH_API_MAX_BODY_BYTES` elsewhere. FastAPI's own `max_body_size` also counts
bytes, but cannot authenticate first; one gate doing both keeps the order in one place.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.exceptions import HTTPException

from defiwatch.api.auth import invalid_key, missing_key
from defiwatch.api.errors import database_down, send_error
from defiwatch.api.keycache import KeyCache
from defiwatch.api.ratelimit import EXEMPT_PATHS, key_from_scope
from defiwatch.errors import DefiwatchError
from defiwatch.store.db import DATABASE_ERRORS, database_unreachable

if TYPE_CHECKING:
    from defiwatch.config import Settings

__all__ = ["BODY_METHODS", "CLOSE", "BodyGateMiddleware", "BodyLimits", "BodyTooLarge"]

BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_MIB = 1_048_576

_Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
_Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
_ASGIApp = Callable[[MutableMapping[str, Any], _Receive, _Send], Awaitable[None]]


class BodyTooLarge(DefiwatchError):
    """The request body is above the route's cap (HTTP 413)."""

    code = "too_large"
    http_status = 413


@dataclass(frozen=True)
class BodyLimits:
    """Body caps in bytes: `ingest_bytes` under `ingest_paths`, `default_bytes` elsewhere."""

    default_bytes: int = _MIB
    ingest_bytes: int = 16 * _MIB
    ingest_paths: tuple[str, ...] = ("/v1/ingest",)

    @classmethod
    def from_settings(cls, settings: Settings) -> BodyLimits:
        return cls(settings.api_max_body_bytes, settings.api_max_ingest_body_bytes)

    def for_path(self, path: str) -> int:
        return self.ingest_bytes if path.startswith(self.ingest_paths) else self.default_bytes


# On a refusal with body bytes still unread: uvicorn would otherwise read a kept-alive
# request's whole body (300 MB, say) to reach the next request; told to close, it drops it.
CLOSE = (b"connection", b"close")


def _too_large(cap: int) -> BodyTooLarge:
    return BodyTooLarge(f"the request body is larger than {cap} bytes, the most this route "
                        "accepts; send smaller batches")


def _content_length(scope: MutableMapping[str, Any]) -> int | None:
    for name, value in scope.get("headers") or ():
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses a malformed length before we run
    return None


class BodyGateMiddleware:
    """See the module docstring. Order: after the rate limiter (so guessing keys is
    limited), before everything that reads a body.

    Args:
        app: the next ASGI app.
        keys: the key lookups shared with the rate limiter.
        limits: the body caps.
    """

    def __init__(self, app: _ASGIApp, keys: KeyCache, limits: BodyLimits) -> None:
        self._app = app
        self._keys = keys
        self._limits = limits

    async def __call__(self, scope: MutableMapping[str, Any], receive: _Receive,
                       send: _Send) -> None:
        if (scope["type"] != "http" or scope.get("method") not in BODY_METHODS
                or scope.get("path") in EXEMPT_PATHS):
            await self._app(scope, receive, send)
            return
        refusal = await self._refusal(scope)
        if refusal is not None:
            await send_error(send, refusal, headers=[CLOSE])
            return
        await self._app(scope, self._counting(receive, self._limits.for_path(scope["path"])),
                        send)

    async def _refusal(self, scope: MutableMapping[str, Any]) -> DefiwatchError | None:
        """Why the request is refused before its body is read, or None to let it in."""
        key = key_from_scope(scope)
        if not key:
            return missing_key()
        try:
            principal = await self._keys.principal(key)
        except DATABASE_ERRORS as exc:
            if not database_unreachable(exc):
                raise
            return database_down()
        if principal is None:
            return invalid_key()
        cap = self._limits.for_path(scope["path"])
        length = _content_length(scope)
        return _too_large(cap) if length is not None and length > cap else None

    @staticmethod
    def _counting(receive: _Receive, cap: int) -> _Receive:
        """`receive` that fails the read with 413 once more than `cap` body bytes came."""
        seen = 0

        async def counted() -> MutableMapping[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > cap:
                    # An HTTPException, because FastAPI turns any other error raised while it
                    # reads a body into a 400; the API's handler renders it as `too_large`.
                    raise HTTPException(413, _too_large(cap).message,
                                        headers={"Connection": "close"})
            return message

        return counted
