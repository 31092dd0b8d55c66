"""The lifecycle state machine (alerts/lifecycle.py) as table-driven timelines: each row is
(seconds since start, enter truth, stay truth) -> the expected action and reason."""

from __future__ import annotations

import pytest

from defiwatch.alerts.lifecycle import (
    OK_STATE,
    Action,
    InstanceState,
    Phase,
    Policy,
    Reason,
    Suppression,
    due_at,
    step,
    tick,
)
from defiwatch.domain.conditions import Truth

T, F, U = Truth.TRUE, Truth.FALSE, Truth.UNKNOWN
T0 = 1_000_000.0

Row = tuple[float, str, int, int, Action, Reason]


def run(policy: Policy, rows: list[Row], state: InstanceState = OK_STATE) -> InstanceState:
    """Apply rows of (t, kind, enter, stay, action, reason); kind "event" or "tick"."""
    for i, (t, kind, enter, stay, action, reason) in enumerate(rows):
        now = T0 + t
        result = (step(policy, state, enter, stay, ts=1000 + i, series="tvl|aave|-", now=now)
                  if kind == "event" else tick(policy, state, now))
        assert (result.action, result.reason) == (action, reason), f"row {i}: {rows[i]}"
        state = result.state
    return state


def test_fires_at_once_resolves_and_refires_after_the_cooldown() -> None:
    policy = Policy(throttle_s=300)
    state = run(policy, [
        (0, "event", F, F, Action.NONE, Reason.NOT_MET),
        (1, "event", U, U, Action.NONE, Reason.NO_DATA),
        (2, "event", T, T, Action.FIRED, Reason.CONDITION_MET),
        (3, "event", T, T, Action.NONE, Reason.STILL_FIRING),
        (4, "event", U, U, Action.NONE, Reason.NO_DATA),  # no data keeps the last state
        (5, "event", F, F, Action.RESOLVED, Reason.RECOVERED),
        (6, "event", T, T, Action.HELD, Reason.THROTTLED),  # inside the 300 s cooldown
        (100, "tick", F, F, Action.NONE, Reason.THROTTLED),
        (302, "tick", F, F, Action.FIRED, Reason.COOLDOWN_OVER),
    ])
    assert state.phase is Phase.FIRING and state.episode_ts == 1006  # the held observation


def test_a_held_fire_is_dropped_when_the_condition_clears() -> None:
    policy = Policy(throttle_s=300)
    state = run(policy, [
        (0, "event", T, T, Action.FIRED, Reason.CONDITION_MET),
        (1, "event", F, F, Action.RESOLVED, Reason.RECOVERED),
        (2, "event", T, T, Action.HELD, Reason.THROTTLED),
        (3, "event", F, F, Action.CLEARED, Reason.HOLD_CLEARED),
        (400, "tick", F, F, Action.NONE, Reason.NOT_MET),
    ])
    assert state.phase is Phase.OK and state.held_at is None


def test_pending_for_a_duration() -> None:
    policy = Policy(for_s=60, throttle_s=0)
    run(policy, [
        (0, "event", T, T, Action.PENDING, Reason.PENDING),
        (30, "event", T, T, Action.NONE, Reason.STILL_PENDING),
        (31, "event", F, F, Action.CLEARED, Reason.PENDING_CLEARED),
        (40, "event", T, T, Action.PENDING, Reason.PENDING),
        (70, "event", U, U, Action.NONE, Reason.NO_DATA),
        (100, "event", T, T, Action.NONE, Reason.STILL_PENDING),  # time is the tick's
        (100, "tick", T, T, Action.FIRED, Reason.FOR_ELAPSED),
        (200, "event", F, F, Action.RESOLVED, Reason.RECOVERED),
        (210, "event", T, T, Action.PENDING, Reason.PENDING),
        (271, "tick", U, U, Action.FIRED, Reason.FOR_ELAPSED),  # no new event needed
    ])


def test_hysteresis_keeps_firing_between_threshold_and_recovery() -> None:
    policy = Policy(throttle_s=0)
    run(policy, [
        (0, "event", T, T, Action.FIRED, Reason.CONDITION_MET),
        (1, "event", F, T, Action.NONE, Reason.RECOVERY_NOT_REACHED),
        (2, "event", F, F, Action.RESOLVED, Reason.RECOVERED),
    ])


def test_repeats_until_acknowledged_and_wait_for_a_snooze() -> None:
    policy = Policy(throttle_s=0, repeat_s=600)
    state = run(policy, [
        (0, "event", T, T, Action.FIRED, Reason.CONDITION_MET),
        (599, "tick", T, T, Action.NONE, Reason.STILL_FIRING),
        (600, "tick", T, T, Action.REPEATED, Reason.REPEAT),
        (1200, "event", T, T, Action.NONE, Reason.STILL_FIRING),  # repeats are the tick's
        (1200, "tick", T, T, Action.REPEATED, Reason.REPEAT),
    ])
    assert state.repeats == 2 and due_at(policy, state) == T0 + 1800
    snoozed = InstanceState(**{**_fields(state), "snoozed_until": T0 + 5000})
    assert due_at(policy, snoozed) == T0 + 5000
    assert tick(policy, snoozed, T0 + 1800).action is Action.NONE
    assert tick(policy, snoozed, T0 + 5000).action is Action.REPEATED
    acked = InstanceState(**{**_fields(state), "acked": True})
    assert due_at(policy, acked) is None and tick(policy, acked, T0 + 9000).action is Action.NONE


def _fields(state: InstanceState) -> dict[str, object]:
    return {f: getattr(state, f) for f in state.__struct_fields__}


@pytest.mark.parametrize("notify_on_resolve", [True, False])
def test_snooze_and_resolve_notifications(notify_on_resolve: bool) -> None:
    policy = Policy(throttle_s=0, notify_on_resolve=notify_on_resolve)
    snoozed = InstanceState(snoozed_until=T0 + 100)
    fired = step(policy, snoozed, T, T, ts=1, series="s", now=T0)
    assert fired.action is Action.FIRED and not fired.notify
    assert fired.suppressed is Suppression.SNOOZED
    resolved = step(policy, fired.state, F, F, ts=2, series="s", now=T0 + 200)
    assert resolved.action is Action.RESOLVED and resolved.notify is notify_on_resolve
    if not notify_on_resolve:
        assert resolved.suppressed is Suppression.RESOLVE_NOT_REQUESTED


def test_due_at_names_the_next_tick() -> None:
    policy = Policy(for_s=60, throttle_s=300, repeat_s=None)
    assert due_at(policy, OK_STATE) is None
    pending = step(policy, OK_STATE, T, T, ts=1, series="s", now=T0).state
    assert due_at(policy, pending) == T0 + 60
    firing = tick(policy, pending, T0 + 60).state
    assert firing.phase is Phase.FIRING and due_at(policy, firing) is None
