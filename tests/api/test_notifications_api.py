"""The delivery log, redelivery, test sends and preferences through the real API on both
deployments."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from sqlalchemy import select, update

from defiwatch.store.schema import alert_history, notification_logs

from .conftest import Api

CONDITION = {"metric": "tvl", "subject": "aave", "op": "lt", "threshold": 1e9}
CHANNELS = [{"type": "webhook", "url": "https://example.com/hook?k=secret"},
            {"type": "email", "address": "ops@example.com"},
            {"type": "push"},
            {"type": "chat", "platform": "discord",
             "url": "https://discord.com/api/webhooks/1/token"}]


async def _alert(api: Api, user_id: int) -> int:
    now = time.time()
    async with api.platform.engine.begin() as conn:
        return int((await conn.execute(alert_history.insert().values(
            rule_id=None, user_id=user_id, rule_name="r", severity="warning", instance="",
            metric="tvl", subject="aave", chain="-", state="firing", reason="condition_met",
            fired_at=now, dedup_key=f"k{now}", updated_at=now,
        ).returning(alert_history.c.id))).scalar_one())


async def test_the_log_filters_pages_and_lists_attempts(api: Api) -> None:
    auth = await api.key()
    user_id = await api.user_id(auth)
    alert_id = await _alert(api, user_id)
    t0 = time.time()
    delivered = await api.notification(user_id, attempts=2, status="delivered",
                                       alert_id=alert_id, rule_id=7, created_at=t0 - 100,
                                       target="https://example.com/hook?k=secret")
    dead = await api.notification(user_id, attempts=3, status="dead", channel="email",
                                  target="ops@example.com", created_at=t0 - 50,
                                  last_error="SMTP 550")
    test = await api.notification(user_id, kind="test", channel="chat", rule_id=7,
                                  target="https://discord.com/api/webhooks/1/token",
                                  created_at=t0)
    bob = await api.key("bob")
    await api.notification(await api.user_id(bob), status="delivered", attempts=1)

    async def ids(**params: Any) -> list[int]:
        response = await api.client.get("/v1/notifications", headers=auth, params=params)
        assert response.status_code == 200, response.text
        return [n["id"] for n in response.json()["data"]]

    assert await ids() == [test, dead, delivered]  # newest first, Bob's not among them
    assert await ids(status="dead") == [dead]
    assert await ids(channel="chat") == [test]
    assert await ids(kind="test") == [test]
    assert await ids(rule_id=7) == [test, delivered]
    assert await ids(alert_id=alert_id) == [delivered]
    assert await ids(since=t0 - 60) == [test, dead]
    assert await ids(until=t0 - 60) == [delivered]
    first = (await api.client.get("/v1/notifications", headers=auth,
                                  params={"limit": 2})).json()
    assert [n["id"] for n in first["data"]] == [test, dead]
    assert await ids(before=first["meta"]["next_before"]) == [delivered]
    assert (await api.client.get("/v1/notifications", headers=auth, params={
        "before": delivered})).json()["meta"] == {"count": 0, "next_before": None}

    page = {n["id"]: n for n in (await api.client.get("/v1/notifications",
                                                      headers=auth)).json()["data"]}
    assert [(a["attempt"], a["status"], a["response_code"]) for a in page[delivered][
        "attempts"]] == [(1, "failed", 503), (2, "delivered", 200)]
    assert [a["status"] for a in page[dead]["attempts"]] == ["failed", "failed", "dead"]
    assert page[test]["attempts"] == []
    assert set(page[dead]["attempts"][0]) == {"attempt", "status", "response_code", "error",
                                              "latency_ms", "started_at", "finished_at"}
    assert page[delivered]["target"] == "https://example.com/hook?…"
    assert page[test]["target"] == "https://discord.com/…"
    assert "payload" not in page[dead]

    one = await api.client.get(f"/v1/notifications/{dead}", headers=auth)
    assert one.status_code == 200
    assert one.json()["payload"] == {"type": "alert_fired"} and len(one.json()["attempts"]) == 3
    theirs = await api.client.get(f"/v1/notifications/{dead}", headers=bob)
    assert theirs.status_code == 404 and theirs.json()["error"]["field"] == "id"
    bad = await api.client.get("/v1/notifications", headers=auth, params={"status": "lost"})
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "status"


@pytest.mark.parametrize(("status", "allowed"), [
    ("delivered", True), ("dead", True), ("pending", False), ("sending", False),
    ("held", False), ("digested", False), ("expanded", False)])
async def test_redeliver_only_final_notifications(api: Api, status: str, allowed: bool) -> None:
    auth = await api.key()
    nid = await api.notification(await api.user_id(auth), attempts=3, status=status,
                                 last_error="HTTP 500", claimed_by="w1", lease_until=1.0,
                                 next_attempt_at=1.0, retry_from=1)
    before = time.time()
    response = await api.client.post(f"/v1/notifications/{nid}/redeliver", headers=auth)
    row = await api.row(nid)
    if allowed:
        assert response.status_code == 202, response.text
        assert response.json()["status"] == "pending"
        assert (row["status"], row["attempt"], row["retry_from"], row["last_error"],
                row["claimed_by"], row["lease_until"]) == ("pending", 3, 3, None, None, None)
        assert row["next_attempt_at"] >= before
        listed = (await api.client.get(f"/v1/notifications/{nid}", headers=auth)).json()
        assert len(listed["attempts"]) == 3  # the history stays
    else:
        assert response.status_code == 409
        assert response.json()["error"]["code"] == "invalid_state"
        assert (row["status"], row["retry_from"], row["last_error"]) == (status, 1, "HTTP 500")


async def test_redeliver_someone_elses_notification_is_404(api: Api) -> None:
    alice, bob = await api.key("alice"), await api.key("bob")
    nid = await api.notification(await api.user_id(alice), status="dead", attempts=1)
    assert (await api.client.post(f"/v1/notifications/{nid}/redeliver",
                                  headers=bob)).status_code == 404
    assert (await api.row(nid))["status"] == "dead"


async def test_redelivery_wakes_the_notifier_on_postgresql(api: Api, timeout_factor: float
                                                           ) -> None:
    if api.platform.engine.dialect.name != "postgresql":
        pytest.skip("NOTIFY is PostgreSQL's; SQLite notifiers poll")
    import asyncpg

    from defiwatch.store.db import raw_dsn

    auth = await api.key()
    nid = await api.notification(await api.user_id(auth), status="dead", attempts=1)
    woken: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    listener = await asyncpg.connect(raw_dsn(api.platform.settings.database_url))
    try:
        await listener.add_listener("defiwatch_notify",
                                    lambda *args: woken.done() or woken.set_result(args[2]))
        response = await api.client.post(f"/v1/notifications/{nid}/redeliver", headers=auth)
        assert response.status_code == 202
        assert await asyncio.wait_for(woken, 10 * timeout_factor) == "defiwatch_notify"
    finally:
        await listener.close()


async def test_a_test_send_queues_one_notification_per_channel(api: Api) -> None:
    auth = await api.key()
    rule = (await api.client.post("/v1/alerts/rules", headers=auth, json={
        "name": "tvl watch", "condition": CONDITION, "channels": CHANNELS,
        "severity": "critical"})).json()
    dry = (await api.client.post(f"/v1/alerts/rules/{rule['id']}/test", headers=auth)).json()
    assert "queued" not in dry
    sent = await api.client.post(f"/v1/alerts/rules/{rule['id']}/test", headers=auth,
                                 params={"send": "true"})
    assert sent.status_code == 200, sent.text
    body = sent.json()
    assert "would_fire" in body and len(body["queued"]) == 4
    async with api.platform.engine.connect() as conn:
        rows = [dict(r._mapping) for r in await conn.execute(
            select(notification_logs).where(notification_logs.c.id.in_(body["queued"]))
            .order_by(notification_logs.c.id))]
    assert [(r["channel"], r["target"], r["host"]) for r in rows] == [
        ("webhook", "https://example.com/hook?k=secret", "example.com"),
        ("email", "ops@example.com", "smtp"), ("push", "*", ""),
        ("chat", "https://discord.com/api/webhooks/1/token", "discord.com")]
    for row, channel in zip(rows, rule["channels"], strict=True):
        assert (row["kind"], row["alert_id"], row["seq"], row["status"], row["attempt"],
                row["rule_id"], row["user_id"]) == (
            "test", None, 0, "pending", 0, rule["id"], await api.user_id(auth))
        assert row["config"] == channel
        assert row["next_attempt_at"] == row["created_at"]
        payload = row["payload"]
        assert (payload["type"], payload["metric"], payload["subject"]) == ("test", "tvl", "aave")
        assert {k: payload["detail"][k] for k in ("rule_id", "rule_name", "severity", "state",
                                                  "reason")} == {
            "rule_id": rule["id"], "rule_name": "tvl watch", "severity": "critical",
            "state": "test", "reason": "test"}
    listed = (await api.client.get("/v1/notifications", headers=auth,
                                   params={"kind": "test"})).json()["data"]
    assert sorted(n["id"] for n in listed) == sorted(body["queued"])

    again = await api.client.post(f"/v1/alerts/rules/{rule['id']}/test", headers=auth,
                                  params={"send": "true"})
    assert again.status_code == 429
    assert again.json()["error"] | {"message": ""} == {
        "code": "rate_limited", "message": "", "field": "send", "temporary": True}
    assert 1 <= int(again.headers["retry-after"]) <= 10
    # Ten seconds later (moved back in the database rather than waited for) it is allowed.
    async with api.platform.engine.begin() as conn:
        await conn.execute(update(notification_logs).where(
            notification_logs.c.id.in_(body["queued"])).values(
            created_at=notification_logs.c.created_at - 11))
    later = await api.client.post(f"/v1/alerts/rules/{rule['id']}/test", headers=auth,
                                  params={"send": "true"})
    assert later.status_code == 200 and len(later.json()["queued"]) == 4
    bob = await api.key("bob")
    assert (await api.client.post(f"/v1/alerts/rules/{rule['id']}/test", headers=bob,
                                  params={"send": "true"})).status_code == 404


async def test_preferences_default_then_replace(api: Api) -> None:
    auth = await api.key()
    default = (await api.client.get("/v1/notifications/preferences", headers=auth)).json()
    assert default == {"timezone": "UTC", "quiet_start": None, "quiet_end": None,
                       "quiet_allow_critical": True, "max_per_minute": {},
                       "updated_at": None,
                       "default_max_per_minute": api.platform.settings.notify_max_per_minute}
    wanted = {"timezone": "Europe/Paris", "quiet_start": "22:00", "quiet_end": "07:30",
              "quiet_allow_critical": False, "max_per_minute": {"email": 5, "push": 0}}
    put = await api.client.put("/v1/notifications/preferences", headers=auth, json=wanted)
    assert put.status_code == 200, put.text
    got = (await api.client.get("/v1/notifications/preferences", headers=auth)).json()
    assert {k: got[k] for k in wanted} == wanted and got["updated_at"] is not None
    cleared = (await api.client.put("/v1/notifications/preferences", headers=auth,
                                    json={})).json()
    assert (cleared["timezone"], cleared["quiet_start"], cleared["max_per_minute"]) == (
        "UTC", None, {})
    bob = await api.key("bob")
    assert (await api.client.get("/v1/notifications/preferences", headers=bob)).json()[
        "updated_at"] is None


@pytest.mark.parametrize(("body", "field"), [
    ({"timezone": "Mars/Olympus"}, "timezone"),
    ({"timezone": "../etc/passwd"}, "timezone"),
    ({"quiet_start": "22:00"}, "quiet_end"),
    ({"quiet_end": "07:00"}, "quiet_start"),
    ({"quiet_start": "24:00", "quiet_end": "07:00"}, "quiet_start"),
    ({"quiet_start": "22:00", "quiet_end": "7:00"}, "quiet_end"),
    ({"quiet_start": "22:00", "quiet_end": "22:00"}, "quiet_end"),
    ({"max_per_minute": {"fax": 1}}, "max_per_minute.fax"),
    ({"max_per_minute": {"email": -1}}, "max_per_minute.email"),
    ({"max_per_minute": {"email": "many"}}, "max_per_minute.email"),
    ({"quiet_allow_critical": "sometimes"}, "quiet_allow_critical"),
    ({"colour": "red"}, "colour"),
])
async def test_invalid_preferences_name_the_field(api: Api, body: dict[str, Any],
                                                  field: str) -> None:
    auth = await api.key()
    response = await api.client.put("/v1/notifications/preferences", headers=auth, json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["field"] == field
    assert (await api.client.get("/v1/notifications/preferences", headers=auth)).json()[
        "updated_at"] is None


async def test_openapi_documents_the_delivery_api(api: Api) -> None:
    spec = (await api.client.get("/openapi.json")).json()
    paths = spec["paths"]
    for path in ("/v1/devices", "/v1/devices/{device}", "/v1/devices/vapid-public-key",
                 "/v1/endpoints", "/v1/endpoints/{endpoint_id}/rotate-secret",
                 "/v1/endpoints/{endpoint_id}/enable", "/v1/notifications",
                 "/v1/notifications/{notification_id}",
                 "/v1/notifications/{notification_id}/redeliver",
                 "/v1/notifications/preferences"):
        assert path in paths, path
    assert "/v1/alerts/notifications" not in paths  # moved to /v1/notifications
    written = spec["components"]["schemas"]["RuleWritten"]["properties"]["webhook_secrets"]
    assert "only in this response" in written["description"]
