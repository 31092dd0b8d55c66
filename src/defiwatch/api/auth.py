"""API key authentication and scope checks, as FastAPI dependencies."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import Request

from defiwatch.errors import AuthError, ScopeError
from defiwatch.store.db import read_retrying
from defiwatch.store.keys import Principal, authenticate, touch_key

__all__ = ["key_from_request", "require"]

_TOUCH_EVERY_S = 60.0  # last_used_at is informative; one write a minute per key is plenty


def key_from_request(request: Request) -> str | None:
    """The key from `Authorization: Bearer`, `X-API-Key` or `?apiKey=` (in that order)."""
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.headers.get("x-api-key") or request.query_params.get("apiKey")


def require(scope: str) -> Callable[[Request], Awaitable[Principal]]:
    """A dependency that authenticates the caller and checks they hold `scope`."""

    async def dependency(request: Request) -> Principal:
        key = key_from_request(request)
        if not key:
            raise AuthError("missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key'")
        ctx = request.app.state.ctx
        principal = await read_retrying(ctx.reads or ctx.engine,
                                        lambda conn: authenticate(conn, key))
        if principal is None:
            raise AuthError("invalid or revoked API key")
        if scope not in principal.scopes and "admin" not in principal.scopes:
            raise ScopeError(
                f"this key lacks the '{scope}' scope (it has: {', '.join(sorted(principal.scopes))})"
            )
        now = time.time()
        touched: dict[int, float] = ctx.touched
        if now - touched.get(principal.key_id, 0.0) > _TOUCH_EVERY_S:
            touched[principal.key_id] = now
            async with ctx.engine.begin() as conn:
                await touch_key(conn, principal.key_id, now)
        return principal

    return dependency
