"""The ops listener: `/healthz`, `/readyz` and `/metrics` of a role process without the API.

`defiwatch run processor` (or alerts, notifier, gateway, poller, replay) serves these on
`DEFIWATCH_OPS_HOST:DEFIWATCH_OPS_PORT`, by default a port per role so that roles sharing a
host do not collide. aiohttp (already a dependency) rather than a second uvicorn: three tiny
routes, no ASGI stack, no OpenAPI.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

import structlog
from aiohttp import web

from defiwatch.config import Settings
from defiwatch.ops.health import Health
from defiwatch.ops.metrics import CONTENT_TYPE, exposition

__all__ = ["ROLE_PORTS", "listener_port", "ops_app", "serve_ops"]

log = structlog.get_logger(__name__)

# Default ops port by the process's first role. The API serves the same routes itself.
ROLE_PORTS = {"processor": 9101, "gateway": 9102, "alerts": 9103, "notifier": 9104,
              "poller": 9105, "replay": 9106}


def listener_port(settings: Settings, roles: Sequence[str]) -> int | None:
    """The port to serve on for these roles; None = no listener (disabled, 0, or no default
    for the first role)."""
    if not settings.ops_enabled or not roles:
        return None
    port = settings.ops_port if settings.ops_port is not None else ROLE_PORTS.get(roles[0])
    return port or None


def ops_app(health: Health) -> web.Application:
    """The three routes, answering from `health` and the process's metrics."""

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        readiness = health.readiness()
        return web.json_response(readiness.as_dict(), status=200 if readiness.ready else 503)

    async def metrics(_request: web.Request) -> web.Response:
        # aiohttp refuses a charset inside content_type=; pass the whole header instead.
        return web.Response(body=exposition(), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


@contextlib.asynccontextmanager
async def serve_ops(host: str, port: int | None, health: Health) -> AsyncIterator[int | None]:
    """Serve the ops routes while the block runs; yield the bound port (None: not serving).

    A port already in use logs one warning and the roles run without the listener: losing
    the scrape target must never stop the work it observes.
    """
    if port is None:
        yield None
        return
    runner = web.AppRunner(ops_app(health), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            log.warning("ops.listener_unavailable", host=host, port=port, error=str(exc),
                        consequence="no /healthz, /readyz, /metrics in this process; set "
                                    "DEFIWATCH_OPS_PORT")
            yield None
            return
        bound = _bound_port(runner) or port
        log.info("ops.listening", url=f"http://{host}:{bound}")
        yield bound
    finally:
        await runner.cleanup()


def _bound_port(runner: web.AppRunner) -> int | None:
    """The actual port (the one the kernel picked when asked for port 0)."""
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return None
