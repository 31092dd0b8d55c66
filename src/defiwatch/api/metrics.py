"""Request metrics of the HTTP API: count and latency by route template, method and status.

Labelled by the route's template (`/v1/alerts/rules/{rule_id}`), never the raw path: raw paths
would make a series per id (and put DefiLlama-style keys `/{api_key}/...` into the labels).
A pure ASGI middleware, outermost, so answers of other middleware (401, 413, 429) count too.
"""

from __future__ import annotations

import re
import time
from typing import Any

from prometheus_client import Counter, Histogram
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["REQUESTS", "REQUEST_SECONDS", "RequestMetricsMiddleware"]

REQUESTS = Counter("defiwatch_api_requests_total", "HTTP API requests answered.",
                   ["route", "method", "status"])
REQUEST_SECONDS = Histogram(
    "defiwatch_api_request_seconds", "HTTP API request duration, first byte in to last out.",
    ["route", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)

UNMATCHED = "<unmatched>"  # a path no route serves (404): one series for all of them


class RequestMetricsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._templates: list[tuple[re.Pattern[str], str]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the server answers when the app raises before a response

        async def send_observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            route, method = self._route(scope), scope["method"]
            REQUESTS.labels(route, method, str(status)).inc()
            REQUEST_SECONDS.labels(route, method).observe(time.perf_counter() - started)

    def _route(self, scope: Scope) -> str:
        """The template of the route that served the request: routing puts the route in the
        scope. A request answered before routing (rate limit, body limit) is matched here
        against the documented paths."""
        path = getattr(scope.get("route"), "path", None)
        if isinstance(path, str):
            return path
        if self._templates is None:
            self._templates = _templates(scope.get("app"))
        raw = str(scope.get("path", ""))
        return next((template for regex, template in self._templates if regex.match(raw)),
                    UNMATCHED)


def _templates(app: Any) -> list[tuple[re.Pattern[str], str]]:
    """The app's OpenAPI path templates, static ones first (`/preferences` before `/{id}`).
    From the schema rather than the router, whose nesting is FastAPI's private business."""
    schema = app.openapi() if hasattr(app, "openapi") else {}
    templates = sorted(schema.get("paths", {}), key=lambda t: (t.count("{"), t))
    return [(compile_path(t)[0], t) for t in templates]
