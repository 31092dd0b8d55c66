"""The notifier's per-row decisions (notify/plan.py), without a database."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from defiwatch.notify.plan import PlanInput, digest_payload, plan, quiet_until
from defiwatch.store.delivery import Device, Endpoint, OutboxRow, Preferences
from defiwatch.store.endpoints import live_secrets

NOW = 1_790_000_000.0  # 2026-09-21 14:13:20 UTC
URL = "https://hooks.example.com/a"


def row(id: int, *, status: str = "pending", kind: str = "alert_fired", channel: str = "webhook",
        target: str = URL, dispatched_at: float | None = None, attempt: int = 0,
        payload: dict[str, Any] | None = None, created_at: float = NOW) -> OutboxRow:
    return OutboxRow(id=id, alert_id=id, user_id=1, rule_id=7, kind=kind, seq=0, channel=channel,
                     target=target, host="hooks.example.com", config={"type": channel},
                     payload=payload or {"type": kind, "detail": {"severity": "warning"}},
                     status=status, attempt=attempt, retry_from=0, created_at=created_at,
                     dispatched_at=dispatched_at)


def given(*, prefs: Preferences | None = None, dispatched: Sequence[float] = (), free: int = 100,
          host_free: int = 100, per_minute: int = 30, disabled: bool = False,
          devices: Sequence[Device] = (), admit: float | None = None) -> PlanInput:
    endpoint = Endpoint(id=5, user_id=1, channel="webhook", target=URL,
                        secrets=[{"secret": "whsec_a", "expires_at": None}], failing_since=None,
                        last_error=None, disabled_at=NOW - 1 if disabled else None,
                        disabled_reason=None, created_at=NOW, updated_at=NOW)
    return PlanInput(now=NOW, preferences={1: prefs} if prefs else {},
                     endpoints={(1, "webhook", URL): endpoint}, devices={1: list(devices)},
                     dispatched={(1, "webhook"): list(dispatched)},
                     default_per_minute=per_minute, free=free,
                     host_free=lambda _host: host_free, admit=lambda _host: admit)


def device(id: int, name: str, *, disabled_at: float | None) -> Device:
    return Device(id=id, user_id=1, device=name, endpoint=f"https://push.example/{id}",
                  p256dh="k", auth="a", user_agent=None, created_at=NOW, updated_at=NOW,
                  disabled_at=disabled_at, disabled_reason=None)


def prefs(start: str | None = None, end: str | None = None, tz: str = "UTC", *,
          critical: bool = True, per_minute: dict[str, int] | None = None) -> Preferences:
    return Preferences(user_id=1, timezone=tz, quiet_start=start, quiet_end=end,
                       quiet_allow_critical=critical, max_per_minute=per_minute or {})


def test_sends_what_has_room_and_defers_the_rest() -> None:
    out = plan([row(1), row(2), row(3)], given(free=2))
    assert [s.row.id for s in out.sends] == [1, 2]
    assert [s.attempt for s in out.sends] == [1, 1]
    assert out.sends[0].endpoint_id == 5 and out.deferred == 1


def test_the_host_limit_defers_too() -> None:
    out = plan([row(1), row(2)], given(host_free=1))
    assert len(out.sends) == 1 and out.deferred == 1


def test_the_per_minute_limit_holds_until_the_window_has_room() -> None:
    out = plan([row(1), row(2)], given(dispatched=[NOW - 50, NOW - 10], per_minute=3))
    assert [s.row.id for s in out.sends] == [1]
    [held] = out.releases
    assert held["status"] == "held" and held["next_attempt_at"] == NOW - 50 + 60


def test_a_users_own_limit_wins_and_zero_means_unlimited() -> None:
    out = plan([row(i) for i in range(5)], given(prefs=prefs(per_minute={"webhook": 0}),
                                                  per_minute=1))
    assert len(out.sends) == 5


def test_retries_and_tests_are_never_held() -> None:
    rows = [row(1, dispatched_at=NOW - 5, attempt=1), row(2, kind="test")]
    out = plan(rows, given(dispatched=[NOW - 1] * 10, per_minute=1))
    assert [(s.row.id, s.attempt) for s in out.sends] == [(1, 2), (2, 1)]


def test_held_rows_due_together_fold_into_one_digest() -> None:
    rows = [row(1, status="held"), row(2, status="held"), row(3, status="held", target="x@y.z",
                                                            channel="email")]
    out = plan(rows, given())
    [group] = out.digests
    assert [r.id for r in group] == [1, 2]
    assert [s.row.id for s in out.sends] == [3]


def test_digest_payload_keeps_order_and_flattens_an_earlier_digest() -> None:
    earlier = row(1, kind="digest", created_at=NOW - 100,
                  payload={"events": [{"n": 1}, {"n": 2}], "since": NOW - 200, "until": NOW - 100})
    later = row(2, created_at=NOW - 50, payload={"n": 3})
    payload = digest_payload([later, earlier])
    assert payload["events"] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert (payload["since"], payload["until"]) == (NOW - 100, NOW - 50)


def test_disabled_endpoints_and_unknown_devices_end_dead() -> None:
    out = plan([row(1), row(2, channel="push", target="tablet")], given(disabled=True))
    assert [(r["id"], r["status"]) for r in out.releases] == [(1, "dead"), (2, "dead")]
    assert out.releases[0]["last_error"].startswith("endpoint disabled")
    assert "not registered" in out.releases[1]["last_error"]


def test_push_to_every_device_expands_to_the_enabled_ones() -> None:
    devices = [device(1, "phone", disabled_at=None), device(2, "old", disabled_at=NOW - 10)]
    out = plan([row(1, channel="push", target="*")], given(devices=devices))
    assert out.expansions == [(row(1, channel="push", target="*"), ["phone"])]
    out = plan([row(1, channel="push", target="*")], given(devices=devices[1:]))
    assert out.releases[0]["status"] == "dead" and "no push device" in out.releases[0]["last_error"]


def test_an_open_circuit_postpones_without_an_attempt() -> None:
    out = plan([row(1)], given(admit=NOW + 60))
    assert not out.sends
    assert out.releases == [{"id": 1, "status": "pending", "next_attempt_at": NOW + 60,
                             "last_error": "circuit open for hooks.example.com: receiver failing"}]


def test_expired_secrets_stop_signing() -> None:
    stored = [{"secret": "whsec_new", "expires_at": None},
              {"secret": "whsec_old", "expires_at": NOW + 1},
              {"secret": "whsec_older", "expires_at": NOW - 1}]
    assert [s["secret"] for s in live_secrets(stored, NOW)] == ["whsec_new", "whsec_old"]


def _at(local: str, tz: str) -> float:
    return dt.datetime.fromisoformat(local).replace(tzinfo=ZoneInfo(tz)).timestamp()


@pytest.mark.parametrize(("now", "start", "end", "until"), [
    ("2026-03-10 23:30", "22:00", "07:00", "2026-03-11 07:00"),  # across midnight, evening
    ("2026-03-11 06:59", "22:00", "07:00", "2026-03-11 07:00"),  # across midnight, morning
    ("2026-03-11 07:00", "22:00", "07:00", None),  # the end is outside
    ("2026-03-11 12:00", "22:00", "07:00", None),
    ("2026-03-11 13:00", "12:30", "14:00", "2026-03-11 14:00"),  # same day
    ("2026-03-28 23:00", "22:00", "07:00", "2026-03-29 07:00"),  # DST starts that night (Paris)
])
def test_quiet_hours_in_the_users_time_zone(now: str, start: str, end: str,
                                            until: str | None) -> None:
    tz = "Europe/Paris"
    got = quiet_until(prefs(start, end, tz), _at(now, tz))
    assert got == (None if until is None else _at(until, tz))


def test_critical_alerts_pass_quiet_hours_unless_the_user_says_no() -> None:
    critical = {"type": "alert_fired", "detail": {"severity": "critical"}}
    window = ("14:00", "15:00")  # NOW is 14:13 UTC
    assert plan([row(1, payload=critical)], given(prefs=prefs(*window))).sends
    out = plan([row(1, payload=critical)], given(prefs=prefs(*window, critical=False)))
    assert out.releases[0]["status"] == "held"
    assert out.releases[0]["next_attempt_at"] == _at("2026-09-21 15:00", "UTC")
