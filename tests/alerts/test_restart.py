"""Restart safety on both deployments: the state lives in the database, a transition replayed
after a crash is recorded once, and an alert committed but not published is published once."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from defiwatch.store import delivery as store_delivery
from defiwatch.store.schema import alert_history, notification_logs

from .conftest import HOUR, T0, Alerting, point
from .test_engine import alert_events, create_rule, rows

BELOW = {"metric": "tvl", "subject": "aave", "op": "lt", "threshold": 1e9}


class Crash(Exception):
    """Stands for the process dying at this point."""


async def test_state_survives_a_restart(
    alerting: Alerting, client: httpx.AsyncClient, make_key: Any
) -> None:
    await create_rule(client, await make_key(), condition=BELOW)
    first = alerting.engine()
    await first.start()
    await alerting.ingest(point("aave", T0, 1.2e9), point("aave", T0 + HOUR, 0.9e9))
    await first.drain()
    # A new engine (a restarted process) knows nothing in memory: the firing state is stored.
    second = alerting.engine()
    await alerting.ingest(point("aave", T0 + 2 * HOUR, 0.8e9))
    await second.drain()
    assert len(await rows(alerting, alert_history)) == 1
    assert len(await alert_events(alerting)) == 1


async def test_crash_after_commit_before_publish_and_ack(
    alerting: Alerting, client: httpx.AsyncClient, make_key: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await create_rule(client, await make_key(), condition=BELOW)
    engine = alerting.engine()
    await engine.start()
    await alerting.ingest(point("aave", T0, 1.2e9), point("aave", T0 + HOUR, 0.9e9))

    async def die(*_args: Any, **_kwargs: Any) -> Any:
        raise Crash

    monkeypatch.setattr(alerting.alerts, "publish", die)
    with pytest.raises(Crash):
        await engine.drain()
    monkeypatch.undo()
    assert len(await rows(alerting, alert_history)) == 1  # committed
    assert await alert_events(alerting) == []  # not published, not acked
    # The restarted worker (same consumer name) gets its pending entries back: the series
    # cursor says they were applied, so nothing is recorded twice; the sweep publishes the
    # committed alert event exactly once.
    restarted = alerting.engine()
    assert await restarted.drain() >= 1
    assert len(await rows(alerting, alert_history)) == 1
    assert len(await rows(alerting, notification_logs)) == 1
    assert [e.type for e in await alert_events(alerting)] == ["alert_fired"]
    await restarted.republish(older_than_s=0)
    assert len(await alert_events(alerting)) == 1


async def test_crash_before_commit_loses_nothing(
    alerting: Alerting, client: httpx.AsyncClient, make_key: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await create_rule(client, await make_key(), condition=BELOW)
    engine = alerting.engine()
    await engine.start()
    await alerting.ingest(point("aave", T0, 1.2e9), point("aave", T0 + HOUR, 0.9e9))

    async def die(*_args: Any, **_kwargs: Any) -> Any:
        raise Crash

    monkeypatch.setattr(store_delivery, "queue_notifications", die)
    with pytest.raises(Crash):
        await engine.drain()
    monkeypatch.undo()
    assert await rows(alerting, alert_history) == []  # rolled back
    restarted = alerting.engine()
    await restarted.drain()
    assert len(await rows(alerting, alert_history)) == 1
    assert len(await rows(alerting, notification_logs)) == 1
    assert len(await alert_events(alerting)) == 1
