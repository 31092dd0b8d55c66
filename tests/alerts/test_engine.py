"""The alert engine end to end on both deployments, as timelines: ingest a point, the processor
emits an event, the engine fires, and the alert is in alert_history, the outbox and the alerts
stream."""

from __future__ import annotations

from typing import Any

import httpx
from sqlalchemy import select

from defiwatch.domain import Event
from defiwatch.store.schema import alert_history, alert_states, notification_logs

from .conftest import HOUR, T0, Alerting, point

WEBHOOK = {"type": "webhook", "url": "https://example.com/hook"}
EMAIL = {"type": "email", "address": "ops@example.com"}


async def create_rule(client: httpx.AsyncClient, auth: dict[str, str], **body: Any) -> dict[str, Any]:
    body.setdefault("name", "rule")
    body.setdefault("channels", [WEBHOOK])
    response = await client.post("/v1/alerts/rules", json=body, headers=auth)
    assert response.status_code == 201, response.text
    return dict(response.json())


async def rows(alerting: Alerting, table: Any, *where: Any) -> list[dict[str, Any]]:
    """Rows of a Core table (JSON columns decoded on both databases), by id."""
    stmt = select(table).where(*where)
    if "id" in table.c:
        stmt = stmt.order_by(table.c.id)
    async with alerting.platform.engine.connect() as conn:
        return [dict(r._mapping) for r in await conn.execute(stmt)]


async def alert_events(alerting: Alerting) -> list[Event]:
    return (await alerting.alerts.read(0, 1000)).events


async def test_a_point_fires_a_rule_into_history_outbox_and_alerts_stream(
    alerting: Alerting, client: httpx.AsyncClient, make_key: Any
) -> None:
    auth = await make_key()
    rule = await create_rule(client, auth, name="Aave below 1B", channels=[WEBHOOK, EMAIL],
                             condition={"metric": "tvl", "subject": "Aave", "op": "lt",
                                        "threshold": 1e9})
    engine = alerting.engine()
    await engine.start()
    # t0: 1.2B, above the line: nothing.
    await alerting.ingest(point("aave", T0, 1.2e9))
    await alerting.ingest(point("aave", T0 + HOUR, 1.1e9))
    await engine.drain()
    assert await rows(alerting, alert_history) == []
    # t0+2h: 0.9B: fires once.
    await alerting.ingest(point("aave", T0 + 2 * HOUR, 0.9e9))
    assert await engine.drain() == 1
    history = await rows(alerting, alert_history)
    assert len(history) == 1
    alert = history[0]
    assert (alert["rule_id"], alert["state"], alert["reason"], alert["subject"]) == (
        rule["id"], "firing", "condition_met", "aave")
    assert alert["event"]["value"] == 0.9e9 and alert["event"]["ts"] == T0 + 2 * HOUR
    outbox = sorted(await rows(alerting, notification_logs), key=lambda o: o["channel"])
    assert [(o["channel"], o["target"], o["kind"], o["status"], o["attempt"]) for o in outbox] == [
        ("email", "ops@example.com", "alert_fired", "pending", 0),
        ("webhook", "https://example.com/hook", "alert_fired", "pending", 0)]
    [fired] = await alert_events(alerting)
    assert fired.type == "alert_fired" and fired.subject == "aave" and fired.value == 0.9e9
    assert fired.detail is not None
    assert fired.detail["rule_id"] == rule["id"] and fired.detail["alert_id"] == alert["id"]
    assert fired.detail["state"] == "firing" and fired.detail["reason"] == "condition_met"
    assert isinstance(fired.detail["user_id"], int)
    assert fired.detail["dedup_key"] == alert["dedup_key"]
    # The alert names the stream event that fired it; the outbox payload carries the same.
    [source] = [e for e in (await alerting.platform.stream.read(0, 1000)).events
                if e.ts == T0 + 2 * HOUR]
    assert source.type == "tvl_change" and source.offset > 0
    assert fired.detail["trigger"] == {"type": "tvl_change", "offset": source.offset}
    assert all(o["payload"]["detail"]["trigger"] == fired.detail["trigger"] for o in outbox)
    # Still below: no second alert (a level rule fires on entry, not on every tick).
    await alerting.ingest(point("aave", T0 + 3 * HOUR, 0.8e9))
    await engine.drain()
    assert len(await rows(alerting, alert_history)) == 1
    assert len(await alert_events(alerting)) == 1


async def test_hysteresis_resolves_past_recovery_and_notifies_on_resolve(
    alerting: Alerting, client: httpx.AsyncClient, make_key: Any
) -> None:
    auth = await make_key()
    await create_rule(client, auth, notify_on_resolve=True, throttle_minutes=0,
                      condition={"metric": "tvl", "subject": "aave", "op": "lt",
                                 "threshold": 1e9, "recovery": 1.05e9})
    engine = alerting.engine()
    await engine.start()
    await alerting.ingest(point("aave", T0, 1.2e9), point("aave", T0 + HOUR, 0.9e9))
    await engine.drain()
    # Back over the line but not over the recovery threshold: still firing (no flap).
    await alerting.ingest(point("aave", T0 + 2 * HOUR, 1.02e9))
    await alerting.ingest(point("aave", T0 + 3 * HOUR, 0.99e9))
    await alerting.ingest(point("aave", T0 + 4 * HOUR, 1.03e9))
    await engine.drain()
    [alert] = await rows(alerting, alert_history)
    assert alert["state"] == "firing"
    # Past recovery: resolved, and notified because the rule asks for it.
    await alerting.ingest(point("aave", T0 + 5 * HOUR, 1.06e9))
    await engine.drain()
    [alert] = await rows(alerting, alert_history)
    assert (alert["state"], alert["resolve_reason"]) == ("resolved", "recovered")
    assert alert["resolved_event"]["value"] == 1.06e9
    kinds = [o["kind"] for o in await rows(alerting, notification_logs)]
    assert kinds == ["alert_fired", "alert_resolved"]
    events = await alert_events(alerting)
    assert [e.type for e in events] == ["alert_fired", "alert_resolved"]
    assert events[1].detail is not None and events[1].detail["alert_id"] == alert["id"]
    assert events[1].ts > events[0].ts


async def test_cooldown_holds_a_refire_until_it_ends_or_drops_it(
    alerting: Alerting, client: httpx.AsyncClient, make_key: Any
) -> None:
    auth = await make_key()
    await create_rule(client, auth, throttle_minutes=5,
                      condition={"metric": "tvl", "subject": "aave", "op": "lt", "threshold": 1e9})
    engine, clock = alerting.engine(), alerting.clock
    await engine.start()
    await alerting.ingest(point("aave", T0, 1.2e9), point("aave", T0 + HOUR, 0.9e9))
    await engine.drain()  # fired at clock t
    clock.advance(60)
    await alerting.ingest(point("aave", T0 + 2 * HOUR, 1.1e9))
    await engine.drain()  # resolved at t+60
    clock.advance(60)
    await alerting.ingest(point("aave", T0 + 3 * HOUR, 0.95e9))
    await engine.drain()  # t+120: inside the cooldown: held, not fired
    assert len(await rows(alerting, alert_history)) == 1
    clock.advance(120)
    await engine.drain()  # t+240: still inside
    assert len(await rows(alerting, alert_history)) == 1
    clock.advance(61)
    await engine.drain()  # t+301: the tick releases the held fire
    history = await rows(alerting, alert_history)
    assert [(a["state"], a["reason"]) for a in history] == [
        ("resolved", "condition_met"), ("firing", "cooldown_over")]
    assert history[1]["event"]["ts"] == T0 + 3 * HOUR  # the observation that was held
    # A held fire whose condition clears before the cooldown ends is dropped.
    await alerting.ingest(point("aave", T0 + 4 * HOUR, 1.1e9))
    await engine.drain()  # resolved at t+301
    clock.advance(10)
    await alerting.ingest(point("aave", T0 + 5 * HOUR, 0.95e9))
    await engine.drain()  # held
    await alerting.ingest(point("aave", T0 + 6 * HOUR, 1.1e9))
    await engine.drain()  # cleared
    clock.advance(600)
    await engine.drain()
    assert len(await rows(alerting, alert_history)) == 2


async def test_for_duration_fires_on_the_tick_without_a_new_event(
    alerting: Alerting, client: httpx.AsyncClient, make_key: Any
) -> None:
    auth = await make_key()
    await create_rule(client, auth, for_seconds=600,
                      condition={"metric": "price", "subject": "ethereum", "op": "gt",
                                 "threshold": 3000})
    engine, clock = alerting.engine(), alerting.clock
    await engine.start()
    await alerting.ingest(point("ethereum", T0, 2900, metric="price"),
                          point("ethereum", T0 + 300, 3100, metric="price"))
    await engine.drain()
    [state] = await rows(alerting, alert_states)
    assert state["phase"] == "pending" and state["due_at"] == clock.now + 600
    clock.advance(300)
    await engine.drain()
    assert await rows(alerting, alert_history) == []
    clock.advance(301)
    await engine.drain()  # the price did not change again: the tick fires it
    [alert] = await rows(alerting, alert_history)
    assert alert["reason"] == "for_elapsed" and alert["event"]["value"] == 3100
    # A pending that clears before `for` passes never fires.
    await alerting.ingest(point("ethereum", T0 + 600, 2900, metric="price"))
    await engine.drain()
    clock.advance(400)
    await alerting.ingest(point("ethereum", T0 + 900, 3200, metric="price"))
    await engine.drain()  # pending again
    await alerting.ingest(point("ethereum", T0 + 1200, 2950, metric="price"))
    await engine.drain()  # cleared
    clock.advance(1000)
    await engine.drain()
    assert len(await rows(alerting, alert_history)) == 1


async def test_repeat_while_firing_until_acknowledged(
    alerting: Alerting, client: httpx.AsyncClient, make_key: Any
) -> None:
    auth = await make_key()
    await create_rule(client, auth, repeat_minutes=10,
                      condition={"metric": "tvl", "subject": "aave", "op": "lt", "threshold": 1e9})
    engine, clock = alerting.engine(), alerting.clock
    await engine.start()
    await alerting.ingest(point("aave", T0, 1.2e9), point("aave", T0 + HOUR, 0.9e9))
    await engine.drain()
    clock.advance(601)
    await engine.drain()
    clock.advance(601)
    await engine.drain()
    outbox = await rows(alerting, notification_logs)
    assert [(o["kind"], o["seq"]) for o in outbox] == [
        ("alert_fired", 0), ("alert_fired", 1), ("alert_fired", 2)]
    assert outbox[1]["payload"]["detail"]["reason"] == "repeat"
    [alert] = await rows(alerting, alert_history)
    ack = await client.post(f"/v1/alerts/history/{alert['id']}/ack", headers=auth)
    assert ack.status_code == 200 and ack.json()["acknowledged_at"] is not None
    clock.advance(3600)
    await engine.drain()
    assert len(await rows(alerting, notification_logs)) == 3


async def test_snooze_records_but_does_not_notify(
    alerting: Alerting, client: httpx.AsyncClient, make_key: Any
) -> None:
    auth = await make_key()
    await create_rule(client, auth, throttle_minutes=0, notify_on_resolve=True,
                      condition={"metric": "tvl", "subject": "aave", "op": "lt", "threshold": 1e9})
    engine, clock = alerting.engine(), alerting.clock
    await engine.start()
    await alerting.ingest(point("aave", T0, 1.2e9), point("aave", T0 + HOUR, 0.9e9))
    await engine.drain()
    [alert] = await rows(alerting, alert_history)
    until = clock.now + 3600
    snooze = await client.post(f"/v1/alerts/history/{alert['id']}/snooze",
                               json={"until": until}, headers=auth)
    assert snooze.status_code == 200, snooze.text
    assert snooze.json()["snoozed_until"] == until
    await alerting.ingest(point("aave", T0 + 2 * HOUR, 1.1e9))  # resolves: not notified
    await engine.drain()
    await alerting.ingest(point("aave", T0 + 3 * HOUR, 0.9e9))  # fires again: recorded only
    await engine.drain()
    history = await rows(alerting, alert_history)
    assert [(a["state"], a["suppressed"]) for a in history] == [
        ("resolved", None), ("firing", "snoozed")]
    assert [o["kind"] for o in await rows(alerting, notification_logs)] == ["alert_fired"]
    clock.advance(3601)  # the snooze is over
    await alerting.ingest(point("aave", T0 + 4 * HOUR, 1.1e9))
    await alerting.ingest(point("aave", T0 + 5 * HOUR, 0.9e9))
    await engine.drain()
    outbox = await rows(alerting, notification_logs)
    assert [o["kind"] for o in outbox] == ["alert_fired", "alert_resolved", "alert_fired"]


async def test_wildcard_rule_fires_per_protocol_on_the_chain(
    alerting: Alerting, client: httpx.AsyncClient, make_key: Any
) -> None:
    """"Any protocol on arbitrum whose TVL drops 10 % in 1h": one alert per protocol."""
    auth = await make_key()
    await create_rule(client, auth, condition={
        "metric": "change_pct", "of": "tvl", "window": "1h", "subject": "*",
        "chain": "arbitrum", "op": "lte", "threshold": -10})
    engine = alerting.engine()
    await engine.start()
    await alerting.ingest(
        point("aave", T0, 1e9, chain="arbitrum"), point("gmx", T0, 5e8, chain="arbitrum"),
        point("radiant", T0, 2e8, chain="arbitrum"), point("aave", T0, 1e10, chain="ethereum"))
    await alerting.ingest(
        point("aave", T0 + HOUR, 0.85e9, chain="arbitrum"),  # -15 %: fires
        point("gmx", T0 + HOUR, 4.9e8, chain="arbitrum"),  # -2 %: no
        point("radiant", T0 + HOUR, 1.7e8, chain="arbitrum"),  # -15 %: fires
        point("aave", T0 + HOUR, 0.8e10, chain="ethereum"))  # another chain: no
    await engine.drain()
    history = await rows(alerting, alert_history)
    assert sorted(a["instance"] for a in history) == [
        "tvl|aave|arbitrum", "tvl|radiant|arbitrum"]
    assert {a["dedup_key"] for a in history} == {
        f"{history[0]['rule_id']}:tvl|aave|arbitrum:tvl|aave|arbitrum:{T0 + HOUR}",
        f"{history[0]['rule_id']}:tvl|radiant|arbitrum:tvl|radiant|arbitrum:{T0 + HOUR}"}


async def test_crossing_fires_on_the_transition_not_on_every_tick_above(
    alerting: Alerting, client: httpx.AsyncClient, make_key: Any
) -> None:
    auth = await make_key()
    await create_rule(client, auth, throttle_minutes=0, condition={
        "metric": "price", "subject": "ethereum", "op": "crosses_above", "threshold": 2000})
    engine = alerting.engine()
    await engine.start()
    prices = [1900, 2100, 2200, 2300, 1950, 2050]
    for i, price in enumerate(prices):
        await alerting.ingest(point("ethereum", T0 + 60 * i, price, metric="price"))
        await engine.drain()
    history = await rows(alerting, alert_history)
    assert [(a["event"]["value"], a["state"]) for a in history] == [
        (2100, "resolved"), (2050, "firing")]


async def test_a_crossing_rule_created_above_the_line_waits_for_a_crossing(
    alerting: Alerting, client: httpx.AsyncClient, make_key: Any
) -> None:
    auth = await make_key()
    engine = alerting.engine()
    await engine.start()
    await alerting.ingest(point("ethereum", T0, 2100, metric="price"))
    await create_rule(client, auth, condition={
        "metric": "price", "subject": "ethereum", "op": "crosses_above", "threshold": 2000})
    await create_rule(client, auth, name="level", condition={
        "metric": "price", "subject": "ethereum", "op": "gt", "threshold": 2000})
    await alerting.ingest(point("ethereum", T0 + 60, 2200, metric="price"))
    await engine.drain()
    # The level rule fires (the condition holds); the crossing has not happened.
    assert [a["rule_name"] for a in await rows(alerting, alert_history)] == ["level"]


async def test_rule_changes_take_effect_without_a_restart(
    alerting: Alerting, client: httpx.AsyncClient, make_key: Any
) -> None:
    auth = await make_key()
    rule = await create_rule(client, auth, throttle_minutes=0, condition={
        "metric": "tvl", "subject": "aave", "op": "lt", "threshold": 1e9})
    engine = alerting.engine()
    await engine.start()
    await alerting.ingest(point("aave", T0, 2e9), point("aave", T0 + HOUR, 1.5e9))
    await engine.drain()
    assert await rows(alerting, alert_history) == []
    # Raise the line: the running engine picks it up on its next batch.
    patched = await client.patch(f"/v1/alerts/rules/{rule['id']}", headers=auth, json={
        "condition": {"metric": "tvl", "subject": "aave", "op": "lt", "threshold": 1.4e9}})
    assert patched.status_code == 200, patched.text
    await alerting.ingest(point("aave", T0 + 2 * HOUR, 1.3e9))
    await engine.drain()
    assert len(await rows(alerting, alert_history)) == 1
    # Paused: not evaluated (it would have resolved); resumed: evaluated again.
    assert (await client.post(f"/v1/alerts/rules/{rule['id']}/pause", headers=auth)).json()[
        "paused"] is True
    await alerting.ingest(point("aave", T0 + 3 * HOUR, 1.5e9))
    await engine.drain()
    assert [a["state"] for a in await rows(alerting, alert_history)] == ["firing"]
    await client.post(f"/v1/alerts/rules/{rule['id']}/resume", headers=auth)
    await alerting.ingest(point("aave", T0 + 4 * HOUR, 1.55e9))
    await engine.drain()
    assert [a["state"] for a in await rows(alerting, alert_history)] == ["resolved"]
    # Deleted: gone from the engine.
    assert (await client.delete(f"/v1/alerts/rules/{rule['id']}", headers=auth)).status_code == 204
    await alerting.ingest(point("aave", T0 + 5 * HOUR, 1e8))
    await engine.drain()
    assert len(await rows(alerting, alert_history)) == 1
    assert len(engine.index) == 0


async def test_a_window_in_seconds_is_computed_from_stored_points(
    alerting: Alerting, client: httpx.AsyncClient, make_key: Any
) -> None:
    auth = await make_key()
    await create_rule(client, auth, condition={
        "metric": "change_pct", "subject": "aave", "window": 7200, "op": "lte", "threshold": -10})
    engine = alerting.engine()
    await engine.start()
    # -5 % an hour: no 2h reference yet at +1h; at +2h the change over 2h is -9.75 %; at +3h,
    # against +1h, -9.75 % again; the fall to 0.8 at +4h is -15.8 % against +2h: fires.
    for i, value in enumerate([1.0e9, 0.95e9, 0.9025e9, 0.857e9, 0.76e9]):
        await alerting.ingest(point("aave", T0 + i * HOUR, value))
    await engine.drain()
    [alert] = await rows(alerting, alert_history)
    assert alert["event"]["ts"] == T0 + 4 * HOUR


async def test_a_gate_on_another_series_reads_its_newest_value(
    alerting: Alerting, client: httpx.AsyncClient, make_key: Any
) -> None:
    auth = await make_key()
    await create_rule(client, auth, condition={"all": [
        {"metric": "tvl", "subject": "aave", "op": "lt", "threshold": 1e9},
        {"metric": "price", "subject": "ethereum", "op": "lt", "threshold": 2000}]})
    engine = alerting.engine()
    await engine.start()
    await alerting.ingest(point("ethereum", T0, 2500, metric="price"),
                          point("aave", T0, 2e9))
    await alerting.ingest(point("aave", T0 + HOUR, 0.9e9))  # aave below; ETH not
    await engine.drain()
    assert await rows(alerting, alert_history) == []
    await alerting.ingest(point("ethereum", T0 + 2 * HOUR, 1900, metric="price"))  # now both
    await engine.drain()
    [alert] = await rows(alerting, alert_history)
    assert alert["instance"] == "" and alert["subject"] == "coingecko:ethereum"
