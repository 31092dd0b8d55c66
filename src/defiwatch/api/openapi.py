"""The OpenAPI document as the real contract, derived from the routes themselves.

FastAPI documents what it infers: a 422 on every route with parameters (we answer 400, see
api/errors.py), no error shape, no authentication. `install_openapi` post-processes its document
once, route by route, from facts the routes already state:

- a dependency on `require(scope)` or on the compat reader: the security schemes (Bearer,
  `X-API-Key`, `?apiKey=`), 401 and 403;
- path parameters: 404; a method that may carry a body: 413 (api/bodylimit.py caps them);
- not in ratelimit.EXEMPT_PATHS: 429 with `Retry-After`; every route but liveness: 503;
- any parameter or body: 400 (instead of FastAPI's 422).

Every error response gets the one `Error` schema; statuses a route declares itself (403
rule_limit_reached, 409, 410) keep their descriptions. tests/api/test_openapi.py walks the routes
and checks every status they answer is documented and every body validates.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

from defiwatch.api.bodylimit import BODY_METHODS
from defiwatch.api.ratelimit import EXEMPT_PATHS
from defiwatch.api.routes.llama import compat_reader
from defiwatch.api.schemas import ErrorBody, extra_components, ref

__all__ = ["DOCS_STATIC_URL", "SECURITY_SCHEMES", "api_routes", "auth_of", "build_openapi", "install_openapi"]

DOCS_STATIC_URL = "/docs/static"  # Swagger UI and ReDoc assets, served locally (no CDN)

SECURITY_SCHEMES: dict[str, dict[str, str]] = {
    "bearer": {"type": "http", "scheme": "bearer",
               "description": "`Authorization: Bearer <key>` (create one with "
                              "`defiwatch keys create`)"},
    "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    "apiKeyQuery": {"type": "apiKey", "in": "query", "name": "apiKey"},
}
_ANY_KEY: list[dict[str, list[str]]] = [{name: []} for name in SECURITY_SCHEMES]

_LIVENESS = frozenset({"/healthz"})
_RATE_HEADERS = {
    "X-RateLimit-Limit": "requests a minute allowed for the caller's tier",
    "X-RateLimit-Remaining": "requests left in the current minute",
    "X-RateLimit-Reset": "seconds until the full quota is back",
}
_STANDARD: dict[int, str] = {
    400: "Invalid input; `error.field` is the JSON path or parameter at fault.",
    401: "Missing, unknown or revoked API key.",
    403: "The key lacks the scope this route needs.",
    404: "Nothing of yours by that id or name.",
    413: "The body is larger than the server accepts (DEFIWATCH_API_MAX_*BODY_BYTES).",
    429: "Too many requests for the caller's tier; retry after `Retry-After` seconds.",
    503: "A backend (database, Redis) cannot be reached; `error.temporary` is true.",
}


def _header(description: str, *, required: bool = False) -> dict[str, Any]:
    return {"description": description, "required": required, "schema": {"type": "integer"}}


def api_routes(routes: Sequence[BaseRoute]) -> Iterator[APIRoute]:
    """The documented API routes, also inside included routers (FastAPI >= 0.165 keeps those
    as one entry in `app.routes`; older versions copy their routes in)."""
    for route in routes:
        if isinstance(route, APIRoute):
            if route.include_in_schema:
                yield route
        elif (router := getattr(route, "original_router", None)) is not None:
            yield from api_routes(router.routes)


def _calls(dependant: Dependant) -> Iterator[Any]:
    for dep in dependant.dependencies:
        yield dep.call
        yield from _calls(dep)


def auth_of(route: APIRoute) -> tuple[bool, str | None]:
    """(needs a key, the scope it needs): from the route's `require(scope)` or compat reader."""
    for call in _calls(route.dependant):
        # require() makes one closure per scope: known by its qualified name, the scope read
        # from its closure, so the routes need no second declaration that could drift.
        if call is compat_reader:
            return True, "read"
        if getattr(call, "__qualname__", "").startswith("require.<locals>"):
            return True, inspect.getclosurevars(call).nonlocals.get("scope")
    return False, None


def _statuses(route: APIRoute, method: str) -> list[int]:
    dependant = route.dependant
    has_input = bool(dependant.path_params or dependant.query_params or dependant.header_params
                     or dependant.body_params or route.openapi_extra)
    keyed, _ = auth_of(route)
    statuses = [400] if has_input or keyed else []
    statuses += [401, 403] if keyed else []
    statuses += [404] if dependant.path_params else []
    statuses += [413] if method.upper() in BODY_METHODS else []
    statuses += [429] if route.path not in EXEMPT_PATHS else []
    statuses += [503] if route.path not in _LIVENESS else []
    return statuses


def _operation(op: dict[str, Any], route: APIRoute, method: str, public_compat: bool) -> None:
    responses: dict[str, Any] = op.setdefault("responses", {})
    responses.pop("422", None)
    for status in _statuses(route, method):
        responses.setdefault(str(status), {"description": _STANDARD[status]})
    error = {"application/json": {"schema": ref("Error")}}
    for code, response in responses.items():
        if code[0] in "45" and not response.get("content"):
            response["content"] = error
    if "429" in responses:
        responses["429"]["headers"] = {"Retry-After": _header("seconds to wait", required=True)}
        for code, response in responses.items():
            if code[0] in "23":
                response.setdefault("headers", {}).update(
                    {name: _header(text) for name, text in _RATE_HEADERS.items()})
    if "401" in responses:
        responses["401"]["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    keyed, scope = auth_of(route)
    if keyed:
        public = public_compat and any(c is compat_reader for c in _calls(route.dependant))
        op["security"] = [*_ANY_KEY, *([{}] if public else [])]
        op["description"] = (op.get("description", "") + f"\n\nNeeds a key with the `{scope}` "
                             "scope (or `admin`).").strip()


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document with our errors, security and the components the models refer to."""
    spec = get_openapi(title=app.title, version=app.version, description=app.description,
                       routes=app.routes)
    public_compat = bool(getattr(app.state.ctx, "compat_public", False))
    for route in api_routes(app.routes):
        item = spec["paths"].get(route.path_format, {})
        for method in route.methods or ():
            if method.lower() in item:
                _operation(item[method.lower()], route, method.lower(), public_compat)
    components = spec.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    error = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(error.pop("$defs"), Error=error)
    schemas.update(extra_components())
    components["securitySchemes"] = SECURITY_SCHEMES
    return spec


def install_openapi(app: FastAPI) -> None:
    """Serve build_openapi's document at /openapi.json (built on first request, then kept)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
