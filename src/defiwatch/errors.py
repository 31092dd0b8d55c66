"""Errors of defiwatch, one tree with a stable code per kind.

    DefiwatchError                     base; `code`, `message`, `field`, `temporary`
    ├── ConfigError                    a setting is invalid (names the DEFIWATCH_* variable)
    ├── ValidationError                input rejected; `field` is the JSON path at fault
    ├── AuthError                      missing, unknown or revoked API key (HTTP 401)
    ├── ScopeError                     key lacks the scope a route needs (HTTP 403)
    ├── NotFoundError                  the thing asked for does not exist (HTTP 404)
    ├── RateLimited                    too soon; `retry_after` seconds (HTTP 429 + Retry-After)
    └── BackendUnavailable             database or Redis could not be reached (temporary)

Errors reaching clients are rendered by `as_payload()` in one shape for REST, WebSocket and logs:
`{"error": {"code", "message", "field", "temporary"}}`. Messages never hold secrets.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuthError",
    "BackendUnavailable",
    "ConfigError",
    "DefiwatchError",
    "NotFoundError",
    "RateLimited",
    "ScopeError",
    "ValidationError",
]


class DefiwatchError(Exception):
    """Base of every error defiwatch raises on purpose."""

    code = "internal"
    http_status = 500
    temporary = False

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def as_payload(self) -> dict[str, Any]:
        """The client-facing shape, identical for REST, WebSocket frames and logs."""
        return {
            "error": {
                "code": self.code,
                "message": self.message,
                "field": self.field,
                "temporary": self.temporary,
            }
        }


class ConfigError(DefiwatchError):
    code = "config_invalid"


class ValidationError(DefiwatchError):
    code = "invalid_request"
    http_status = 400


class AuthError(DefiwatchError):
    code = "unauthorized"
    http_status = 401


class ScopeError(DefiwatchError):
    code = "forbidden"
    http_status = 403


class NotFoundError(DefiwatchError):
    code = "not_found"
    http_status = 404


class RateLimited(DefiwatchError):
    code = "rate_limited"
    http_status = 429
    temporary = True

    def __init__(self, message: str, *, retry_after: int, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.retry_after = retry_after


class BackendUnavailable(DefiwatchError):
    code = "backend_unavailable"
    http_status = 503
    temporary = True
