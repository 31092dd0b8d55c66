"""Role health: which roles make a process not ready, from values alone (a clock we move)."""

from __future__ import annotations

import asyncio

import pytest

from defiwatch.ops.health import Health, RoleState, beat


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def health(clock: Clock) -> Health:
    h = Health(stale_s=10.0, clock=clock)
    h.expect("processor")
    return h


def state(health: Health, role: str = "processor") -> RoleState:
    return {r.role: r.state for r in health.readiness().roles}[role]


def test_an_expected_role_has_stale_s_for_its_first_beat(health: Health, clock: Clock) -> None:
    clock.now += 10.0
    assert health.readiness().ready
    clock.now += 0.1
    readiness = health.readiness()
    assert not readiness.ready
    assert readiness.failing == ["processor"]
    assert state(health) is RoleState.STALE


def test_a_beat_keeps_a_role_ready_for_stale_s(health: Health, clock: Clock) -> None:
    clock.now += 8.0
    health.beat("processor")
    clock.now += 9.0
    assert state(health) is RoleState.OK
    clock.now += 2.0
    assert state(health) is RoleState.STALE


def test_an_announced_idle_wait_extends_the_allowance(health: Health, clock: Clock) -> None:
    health.beat("processor", idle_s=300.0)  # e.g. the poller's interval
    clock.now += 305.0
    assert state(health) is RoleState.OK
    clock.now += 6.0
    assert state(health) is RoleState.STALE


def test_an_error_degrades_until_an_iteration_goes_well(health: Health) -> None:
    health.beat("processor", error="connection refused")
    readiness = health.readiness()
    assert not readiness.ready
    assert readiness.roles[0].state is RoleState.DEGRADED
    assert readiness.as_dict()["roles"] == {
        "processor": {"state": "degraded", "age_s": 0.0, "error": "connection refused"}}
    health.beat("processor")
    assert health.readiness().ready


def test_a_failed_role_is_not_ready_until_it_beats_again(health: Health) -> None:
    health.failed("processor", "boom")
    assert state(health) is RoleState.FAILED
    health.beat("processor")
    assert state(health) is RoleState.OK


def test_a_finished_role_no_longer_counts(health: Health, clock: Clock) -> None:
    health.expect("replay")
    health.finished("replay")
    clock.now += 1_000.0
    health.beat("processor")
    assert health.readiness().ready
    assert state(health, "replay") is RoleState.FINISHED


def test_beats_of_roles_never_expected_are_ignored(health: Health) -> None:
    health.beat("gateway")
    health.failed("gateway", "x")
    assert [r.role for r in health.readiness().roles] == ["processor"]


def test_stale_s_must_be_positive() -> None:
    with pytest.raises(ValueError, match="stale_s"):
        Health(stale_s=0)


async def test_beat_reaches_the_registry_bound_in_this_task_and_its_children(
    health: Health, clock: Clock
) -> None:
    async def child() -> None:
        beat("processor", error="from a child task")

    beat("processor", error="unbound")  # no registry bound here: goes nowhere
    assert state(health) is RoleState.OK
    with health.bound():
        await asyncio.create_task(child())
    assert state(health) is RoleState.DEGRADED
    beat("processor")  # bound() has ended: goes nowhere again
    assert state(health) is RoleState.DEGRADED
