"""Supervised roles: one that raises is logged and started again; a finite one just ends."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from defiwatch.ops.health import Health, RoleState, beat
from defiwatch.ops.supervisor import Backoff, describe, supervise, wait_or_stop

FAST = Backoff(first_s=0.001, cap_s=0.002)


def restarts(role: str) -> float:
    return REGISTRY.get_sample_value("defiwatch_role_restarts_total", {"role": role}) or 0.0


def role_state(health: Health, role: str) -> RoleState:
    return {r.role: r.state for r in health.readiness().roles}[role]


async def test_a_failing_role_is_restarted_until_it_runs() -> None:
    health = Health()
    health.expect("unit-flaky")
    stop = asyncio.Event()
    starts: list[RoleState] = []
    running = asyncio.Event()

    async def flaky() -> None:
        starts.append(role_state(health, "unit-flaky"))
        if len(starts) < 3:
            raise RuntimeError(f"attempt {len(starts)} broke")
        beat("unit-flaky")  # the supervisor bound the registry for us
        running.set()
        await stop.wait()

    before = restarts("unit-flaky")
    with capture_logs() as logs:
        task = asyncio.create_task(supervise("unit-flaky", flaky, stop, health=health,
                                             backoff=FAST))
        await running.wait()
        assert role_state(health, "unit-flaky") is RoleState.OK
        stop.set()
        await task
    assert starts == [RoleState.OK, RoleState.FAILED, RoleState.FAILED]
    failed = [e for e in logs if e["event"] == "role.failed"]
    assert [e["error"] for e in failed] == ["attempt 1 broke", "attempt 2 broke"]
    assert all(e["log_level"] == "error" and e["role"] == "unit-flaky" for e in failed)
    assert restarts("unit-flaky") == before + 2


async def test_a_finite_role_ends_and_no_longer_counts_for_readiness() -> None:
    health = Health()
    health.expect("unit-replay")
    runs = 0

    async def finite() -> None:
        nonlocal runs
        runs += 1

    await supervise("unit-replay", finite, asyncio.Event(), health=health, backoff=FAST)
    assert runs == 1
    assert role_state(health, "unit-replay") is RoleState.FINISHED


async def test_stop_during_a_backoff_ends_the_supervisor() -> None:
    stop = asyncio.Event()
    failed = asyncio.Event()
    runs = 0

    async def broken() -> None:
        nonlocal runs
        runs += 1
        failed.set()
        raise RuntimeError("broken")

    task = asyncio.create_task(supervise("unit-broken", broken, stop, health=Health(),
                                         backoff=Backoff(first_s=3_600, cap_s=3_600)))
    await failed.wait()
    stop.set()
    await task  # returns without waiting the hour out (pytest-timeout guards)
    assert runs == 1


@pytest.mark.parametrize(("previous", "ran_s", "expected"), [
    (None, 0.0, 0.5),   # the first failure
    (0.5, 0.1, 1.0),    # doubles while failing fast
    (16.0, 0.1, 30.0),  # capped
    (30.0, 0.1, 30.0),
    (30.0, 30.0, 0.5),  # a run that lasted the cap was healthy: start over
])
def test_backoff(previous: float | None, ran_s: float, expected: float) -> None:
    assert Backoff(first_s=0.5, cap_s=30.0).delay(previous, ran_s) == expected


def test_a_retry_loops_consecutive_failures_double_from_half_a_second_to_30() -> None:
    delays: list[float] = []
    delay: float | None = None
    for _ in range(9):
        delay = Backoff().delay(delay)
        delays.append(delay)
    assert delays == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]


async def test_a_backoff_wait_ends_as_soon_as_stop_is_set() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().call_soon(stop.set)
    assert await wait_or_stop(stop, 3_600) is True  # an hour: only `stop` ends it in time
    assert await wait_or_stop(asyncio.Event(), 0.001) is False


def test_a_task_groups_failure_is_described_by_its_members() -> None:
    group = ExceptionGroup("unhandled errors in a TaskGroup", [
        OSError(98, "address already in use"), ExceptionGroup("inner", [ValueError()])])
    assert describe(group) == "[Errno 98] address already in use; ValueError"
