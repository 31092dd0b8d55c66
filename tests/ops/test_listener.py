"""The ops listener on a real loopback port: health, readiness from the roles, metrics."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest
from structlog.testing import capture_logs

from defiwatch.config import ROLES, Settings
from defiwatch.ops.health import Health
from defiwatch.ops.listener import ROLE_PORTS, listener_port, serve_ops


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port some other socket holds."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


async def test_serves_healthz_readyz_and_metrics() -> None:
    clock = Clock()
    health = Health(stale_s=5.0, clock=clock)
    health.expect("processor")
    async with serve_ops("127.0.0.1", 0, health) as port, httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}") as client:
        assert port
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["roles"]["processor"]["state"] == "ok"

        clock.now += 6.0  # the processor stopped beating
        stale = await client.get("/readyz")
        assert stale.status_code == 503
        assert stale.json()["failing"] == ["processor"]
        assert stale.json()["roles"]["processor"]["state"] == "stale"

        health.beat("processor", error="database unreachable")
        degraded = await client.get("/readyz")
        assert degraded.status_code == 503
        assert degraded.json()["roles"]["processor"]["error"] == "database unreachable"

        metrics = await client.get("/metrics")
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain")
        assert 'defiwatch_build_info{python="' in metrics.text
        assert "_created" not in metrics.text


async def test_a_port_in_use_logs_one_warning_and_serves_nothing(taken_port: int) -> None:
    with capture_logs() as logs:
        async with serve_ops("127.0.0.1", taken_port, Health()) as port:
            assert port is None
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [e["event"] for e in warnings] == ["ops.listener_unavailable"]
    assert warnings[0]["port"] == taken_port
    assert warnings[0]["error"]  # the OS's text, not only a class name


@pytest.mark.parametrize(("env", "roles", "expected"), [
    ({}, ["processor"], 9101),
    ({}, ["gateway", "alerts"], 9102),
    ({}, ["alerts"], 9103),
    ({}, ["notifier"], 9104),
    ({}, ["poller"], 9105),
    ({}, ["replay"], 9106),
    ({}, ["api", "processor"], None),  # the API serves the routes itself
    ({"ops_port": 9200}, ["api", "processor"], 9200),
    ({"ops_port": 0}, ["processor"], None),
    ({"ops_enabled": False}, ["processor"], None),
])
def test_the_port_follows_the_first_role(env: dict[str, object], roles: list[str],
                                         expected: int | None) -> None:
    assert listener_port(Settings(**env), roles) == expected  # type: ignore[arg-type]


def test_every_role_but_api_has_a_distinct_default_port() -> None:
    assert set(ROLE_PORTS) == set(ROLES) - {"api"}
    assert len(set(ROLE_PORTS.values())) == len(ROLE_PORTS)
