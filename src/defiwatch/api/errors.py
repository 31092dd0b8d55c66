"""Exception handlers: every error leaves the API as `{"error": {code, message, field, temporary}}`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from defiwatch.errors import DefiwatchError, RateLimited

__all__ = ["install_error_handlers"]

log = structlog.get_logger(__name__)

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large", 429: "rate_limited"}


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


async def _defiwatch_error(_req: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DefiwatchError)
    if exc.http_status >= 500:
        log.warning("api.error", code=exc.code, message=exc.message)
    headers = {"WWW-Authenticate": "Bearer"} if exc.http_status == 401 else None
    if isinstance(exc, RateLimited):
        headers = {"Retry-After": str(exc.retry_after)}
    return _error(exc.http_status, exc.code, exc.message, exc.field, exc.temporary, headers)


async def _validation_error(_req: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0]
    return _error(400, "invalid_request", first["msg"], _json_path(tuple(first["loc"])))


async def _http_error(_req: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return _error(exc.status_code, code, str(exc.detail), headers=exc.headers)


async def _unexpected(_req: Request, exc: Exception) -> JSONResponse:
    log.exception("api.unexpected_error", error_type=type(exc).__name__)
    return _error(500, "internal", "internal error; it was logged", temporary=True)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DefiwatchError, _defiwatch_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
