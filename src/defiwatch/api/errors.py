"""Exception handlers: every error leaves the API as `{"error": {code, message, field, temporary}}`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import Any

import msgspec
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from defiwatch.errors import BackendUnavailable, DefiwatchError, RateLimited
from defiwatch.store.db import DATABASE_ERRORS, database_unreachable

__all__ = ["BACKEND_RETRY_AFTER_S", "database_down", "install_error_handlers", "send_error"]

log = structlog.get_logger(__name__)

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large", 429: "rate_limited"}

# Retry-After (seconds) on a 503: a database or Redis restart usually takes a few seconds.
BACKEND_RETRY_AFTER_S = 5


def _error(status: int, code: str, message: str, field: str | None = None,
           temporary: bool = False, headers: Mapping[str, str] | None = None) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "field": field, "temporary": temporary}}
    return JSONResponse(body, status_code=status, headers=headers)


def _json_path(loc: tuple[Any, ...]) -> str:
    """FastAPI's ("body", "points", 3, "ts") -> "points[3].ts" (the JSON path at fault)."""
    path = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or str(loc[0] if loc else "")


def _headers_for(exc: DefiwatchError) -> dict[str, str]:
    if exc.http_status == 401:
        return {"WWW-Authenticate": "Bearer"}
    if isinstance(exc, RateLimited):
        return {"Retry-After": str(exc.retry_after)}
    if exc.http_status == 503:
        return {"Retry-After": str(BACKEND_RETRY_AFTER_S)}
    return {}


async def _defiwatch_error(_req: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DefiwatchError)
    if exc.http_status >= 500:
        log.warning("api.error", code=exc.code, message=exc.message)
    return _error(exc.http_status, exc.code, exc.message, exc.field, exc.temporary,
                  _headers_for(exc))


def database_down() -> BackendUnavailable:
    """The client-facing error for a database outage (the cause goes to the log only)."""
    return BackendUnavailable("the database cannot be reached right now; retry in a few seconds")


async def _database_error(req: Request, exc: Exception) -> JSONResponse:
    """A database outage is a 503 the client may retry, not a 500 with a traceback."""
    if not database_unreachable(exc):
        return await _unexpected(req, exc)
    log.warning("api.database_unreachable", error_type=type(exc).__name__, error=str(exc))
    return await _defiwatch_error(req, database_down())


async def _validation_error(_req: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0]
    return _error(400, "invalid_request", first["msg"], _json_path(tuple(first["loc"])))


async def _http_error(_req: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return _error(exc.status_code, code, str(exc.detail), headers=exc.headers)


async def _unexpected(_req: Request, exc: Exception) -> JSONResponse:
    log.exception("api.unexpected_error", error_type=type(exc).__name__, error=str(exc))
    return _error(500, "internal", "internal error; it was logged", temporary=True)


_Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


async def send_error(send: _Send, exc: DefiwatchError,
                     headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """Answer `exc` from a pure ASGI middleware, in the shape and with the headers the
    registered handlers give (middlewares run outside them)."""
    body = msgspec.json.encode(exc.as_payload())
    given = list(headers)
    names = {name for name, _ in given}
    usual = [(k.lower().encode(), v.encode()) for k, v in _headers_for(exc).items()]
    await send({"type": "http.response.start", "status": exc.http_status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        *(h for h in usual if h[0] not in names), *given]})
    await send({"type": "http.response.body", "body": body})


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DefiwatchError, _defiwatch_error)
    # Registered per class (not under Exception) so Starlette's ExceptionMiddleware answers
    # them: the catch-all handler's ServerErrorMiddleware re-raises and uvicorn logs a traceback.
    for error_class in DATABASE_ERRORS:
        app.add_exception_handler(error_class, _database_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
