"""API key authentication and scope checks, as FastAPI dependencies."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import Request

from defiwatch.api.ratelimit import key_from_scope
from defiwatch.errors import AuthError, ScopeError
from defiwatch.store.db import read_retrying
from defiwatch.store.keys import Principal, authenticate, touch_key

__all__ = ["invalid_key", "key_from_request", "missing_key", "require"]

_TOUCH_EVERY_S = 60.0  # last_used_at is informative; one write a minute per key is plenty


def missing_key() -> AuthError:
    """The 401 for a request without a key: one text for the routes and the body gate."""
    return AuthError("missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key'")


def invalid_key() -> AuthError:
    """The 401 for a key that matches no live key, wherever it is checked."""
    return AuthError("invalid or revoked API key")


def key_from_request(request: Request) -> str | None:
    """The key from `Authorization: Bearer`, `X-API-Key` or `?apiKey=` (in that order): found
    as the rate limiter and the body gate find it, so all three judge the same key."""
    return key_from_scope(request.scope)


def require(scope: str) -> Callable[[Request], Awaitable[Principal]]:
    """A dependency that authenticates the caller and checks they hold `scope`."""

    async def dependency(request: Request) -> Principal:
        key = key_from_request(request)
        if not key:
            raise missing_key()
        ctx = request.app.state.ctx
        principal = await read_retrying(ctx.reads or ctx.engine,
                                        lambda conn: authenticate(conn, key))
        if principal is None:
            raise invalid_key()
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
