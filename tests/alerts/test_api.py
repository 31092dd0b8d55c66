"""The rules API through the real ASGI app on both deployments: CRUD, validation with named
fields and reasons, ownership isolation, tier limits, dry runs, history, ack and snooze."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from .conftest import HOUR, T0, Alerting, point

WEBHOOK = {"type": "webhook", "url": "https://example.com/hook"}
AAVE_LOW = {"metric": "tvl", "subject": "Aave", "op": "lt", "threshold": 1e9}


def _deep(levels: int) -> dict[str, Any]:
    node: dict[str, Any] = AAVE_LOW
    for _ in range(levels):
        node = {"not": node}
    return node


def rule_body(**over: Any) -> dict[str, Any]:
    return {"name": "r", "condition": AAVE_LOW, "channels": [WEBHOOK], **over}


async def test_create_read_list_update_delete(client: httpx.AsyncClient, make_key: Any) -> None:
    auth = await make_key()
    created = await client.post("/v1/alerts/rules", headers=auth, json=rule_body(
        name="ETH crash", description="tell me", severity="critical", repeat_minutes=30,
        condition={"any": [{"metric": "price", "subject": "Ethereum", "op": "crosses_below",
                            "threshold": 2000},
                           {"metric": "change_pct", "subject": "ethereum", "of": "price",
                            "window": "24h", "op": "lte", "threshold": -15}]},
        channels=[WEBHOOK, {"type": "email", "address": "me@example.com"}, {"type": "push"},
                  {"type": "chat", "platform": "slack", "url": "https://hooks.slack.com/x"}]))
    assert created.status_code == 201, created.text
    rule = created.json()
    # The new webhook endpoint's signing secret is shown in this response only.
    assert list(rule.pop("webhook_secrets")) == [WEBHOOK["url"]]
    # Stored canonical: subjects normalised, defaults filled in.
    assert rule["condition"]["any"][0]["subject"] == "coingecko:ethereum"
    assert rule["condition"]["any"][1]["window"] == "24h"
    assert rule["throttle_minutes"] == 5.0 and rule["paused"] is False
    assert rule["kind"] == "single"
    assert [c["type"] for c in rule["channels"]] == ["webhook", "email", "push", "chat"]
    got = (await client.get(f"/v1/alerts/rules/{rule['id']}", headers=auth)).json()
    assert got == rule
    patched = await client.patch(f"/v1/alerts/rules/{rule['id']}", headers=auth,
                                 json={"name": "ETH crash!", "repeat_minutes": None})
    assert patched.status_code == 200, patched.text
    assert patched.json()["name"] == "ETH crash!" and patched.json()["repeat_minutes"] is None
    assert patched.json()["condition"] == rule["condition"]
    listed = (await client.get("/v1/alerts/rules", headers=auth)).json()
    assert [r["id"] for r in listed["data"]] == [rule["id"]] and listed["meta"]["total"] == 1
    assert (await client.delete(f"/v1/alerts/rules/{rule['id']}", headers=auth)).status_code == 204
    assert (await client.get(f"/v1/alerts/rules/{rule['id']}", headers=auth)).status_code == 404
    assert (await client.get("/v1/alerts/rules", headers=auth)).json()["data"] == []


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        (rule_body(condition={**AAVE_LOW, "metric": "volume"}), "condition.metric",
         "unknown_metric"),
        (rule_body(condition={**AAVE_LOW, "threshold": "high"}), "condition.threshold",
         "wrong_type"),
        (rule_body(condition={"metric": "change_pct", "subject": "aave", "window": 30 * 86_400,
                              "op": "lte", "threshold": -10}), "condition.window",
         "window_too_long"),
        (rule_body(condition={"metric": "change_pct", "subject": "aave", "window": "2w",
                              "op": "lte", "threshold": -10}), "condition.window", "bad_window"),
        (rule_body(condition={"all": [AAVE_LOW, {"any": []}]}), "condition.all[1].any",
         "empty_group"),
        (rule_body(condition={**AAVE_LOW, "op": "above"}), "condition.op", "unknown_operator"),
        (rule_body(condition={**AAVE_LOW, "recovery": 0.9e9}), "condition.recovery",
         "recovery_wrong_side"),
        (rule_body(condition={"not": {**AAVE_LOW, "recovery": 1.1e9}}),
         "condition.not.recovery", "recovery_not_allowed"),
        (rule_body(condition={"metric": "change_pct", "subject": "aave", "window": "1h",
                              "op": "crosses_above", "threshold": 5}), "condition.op",
         "crossing_on_change"),
        (rule_body(condition={"all": [{**AAVE_LOW, "subject": "*", "chain": "arbitrum"},
                                      {**AAVE_LOW, "subject": "*", "chain": "base"}]}),
         "condition.all[1]", "mixed_wildcards"),
        (rule_body(condition={**AAVE_LOW, "colour": "red"}), "condition.colour",
         "unknown_field"),
        (rule_body(condition={"metric": "price", "subject": "bitcoin", "chain": "ethereum",
                              "op": "gt", "threshold": 1}), "condition.chain",
         "chain_not_allowed"),
        (rule_body(condition=_deep(7)), "condition" + ".not" * 6, "too_deep"),
        (rule_body(channels=[]), "channels", None),
        (rule_body(channels=[{"type": "email", "address": "not-an-address"}]),
         "channels[0].address", None),
        (rule_body(channels=[{"type": "webhook", "url": "ftp://x"}]), "channels[0].url", None),
        (rule_body(channels=[{"type": "pager"}]), "channels[0].type", None),
        (rule_body(throttle_minutes=-1), "throttle_minutes", None),
        (rule_body(for_seconds=10**9), "for_seconds", None),
        (rule_body(severity="panic"), "severity", None),
        (rule_body(nonsense=1), "nonsense", None),
        ({"name": "r", "channels": [WEBHOOK]}, "condition", None),
    ],
)
@pytest.mark.parametrize("settings", ["embedded"], indirect=True)  # pure validation: one is enough
async def test_validation_errors_name_the_field_and_the_reason(
    client: httpx.AsyncClient, make_key: Any, body: dict[str, Any], field: str,
    reason: str | None,
) -> None:
    response = await client.post("/v1/alerts/rules", headers=await make_key(), json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["field"] == field, error
    if reason is not None:
        assert f"({reason})" in error["message"]


@pytest.mark.parametrize("settings", ["embedded"], indirect=True)
@pytest.mark.parametrize("url", ["http://10.1.2.3/hook", "http://169.254.169.254/latest",
                                 "http://[::1]:8080/hook", "https://127.0.0.1/hook"])
async def test_webhook_urls_to_internal_addresses_are_refused_when_saved(
    client: httpx.AsyncClient, make_key: Any, url: str
) -> None:
    auth = await make_key()
    response = await client.post("/v1/alerts/rules", headers=auth, json=rule_body(
        channels=[{"type": "email", "address": "a@b.co"}, {"type": "webhook", "url": url}]))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["field"]) == ("destination_blocked", "channels[1].url")
    created = await client.post("/v1/alerts/rules", headers=auth, json=rule_body())
    patched = await client.patch(f"/v1/alerts/rules/{created.json()['id']}", headers=auth,
                                 json={"channels": [{"type": "chat", "url": url}]})
    assert patched.status_code == 400
    assert patched.json()["error"]["field"] == "channels[0].url"


async def test_a_threshold_that_is_not_finite_is_refused(
    client: httpx.AsyncClient, make_key: Any
) -> None:
    raw = (b'{"name": "r", "channels": [{"type": "push"}], "condition": '
           b'{"metric": "tvl", "subject": "aave", "op": "gt", "threshold": NaN}}')
    response = await client.post("/v1/alerts/rules", content=raw, headers={
        **await make_key(), "content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "condition.threshold"
    assert "(not_finite)" in response.json()["error"]["message"]


async def test_users_only_see_and_change_their_own_rules_and_alerts(
    alerting: Alerting, client: httpx.AsyncClient, make_key: Any
) -> None:
    alice, bob = await make_key("alice"), await make_key("bob")
    mine = (await client.post("/v1/alerts/rules", headers=alice, json=rule_body())).json()
    theirs = (await client.post("/v1/alerts/rules", headers=bob, json=rule_body())).json()
    for method, path, body in [
        ("GET", f"/v1/alerts/rules/{theirs['id']}", None),
        ("PATCH", f"/v1/alerts/rules/{theirs['id']}", {"name": "mine now"}),
        ("DELETE", f"/v1/alerts/rules/{theirs['id']}", None),
        ("POST", f"/v1/alerts/rules/{theirs['id']}/pause", None),
        ("POST", f"/v1/alerts/rules/{theirs['id']}/test", None),
        ("GET", "/v1/alerts/rules/999999", None),
    ]:
        response = await client.request(method, path, headers=alice, json=body)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["error"]["code"] == "not_found"
    listed = (await client.get("/v1/alerts/rules", headers=alice)).json()
    assert [r["id"] for r in listed["data"]] == [mine["id"]]
    # Bob's rule fires; Alice cannot see, acknowledge or snooze his alert.
    engine = alerting.engine()
    await engine.start()
    await alerting.ingest(point("aave", T0, 2e9), point("aave", T0 + HOUR, 0.5e9))
    await engine.drain()
    bobs = (await client.get("/v1/alerts/history", headers=bob)).json()["data"]
    alices = (await client.get("/v1/alerts/history", headers=alice)).json()["data"]
    assert len(bobs) == 1 and len(alices) == 1 and bobs[0]["id"] != alices[0]["id"]
    for path in (f"/v1/alerts/history/{bobs[0]['id']}", f"/v1/alerts/history/{bobs[0]['id']}/ack"):
        method = "POST" if path.endswith("ack") else "GET"
        assert (await client.request(method, path, headers=alice)).status_code == 404
    snooze = await client.post(f"/v1/alerts/history/{bobs[0]['id']}/snooze", headers=alice,
                               json={"minutes": 10})
    assert snooze.status_code == 404
    events = (await alerting.alerts.read(0, 10)).events
    assert sorted(e.detail["user_id"] for e in events if e.detail) == sorted(
        {e.detail["user_id"] for e in events if e.detail})


async def test_rule_count_is_limited_per_tier(client: httpx.AsyncClient, make_key: Any) -> None:
    free = await make_key("frugal", tier="free")
    ids = []
    for i in range(5):
        response = await client.post("/v1/alerts/rules", headers=free, json=rule_body(name=f"{i}"))
        assert response.status_code == 201
        ids.append(response.json()["id"])
    refused = await client.post("/v1/alerts/rules", headers=free, json=rule_body())
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "rule_limit_reached"
    assert "5" in refused.json()["error"]["message"]
    await client.delete(f"/v1/alerts/rules/{ids[0]}", headers=free)
    assert (await client.post("/v1/alerts/rules", headers=free, json=rule_body())).status_code == 201


async def test_the_alerts_scope_is_required(client: httpx.AsyncClient, make_key: Any) -> None:
    reader = await make_key("reader", scopes=("read",))
    response = await client.get("/v1/alerts/rules", headers=reader)
    assert response.status_code == 403
    assert (await client.get("/v1/alerts/rules")).status_code == 401


async def test_list_filters_and_pages(client: httpx.AsyncClient, make_key: Any) -> None:
    auth = await make_key()
    for i in range(7):
        subject = "aave" if i % 2 else "compound"
        await client.post("/v1/alerts/rules", headers=auth, json=rule_body(
            name=f"rule {i}", paused=i == 3, severity="critical" if i == 5 else "warning",
            condition={**AAVE_LOW, "subject": subject}))
    first = (await client.get("/v1/alerts/rules", params={"limit": 3}, headers=auth)).json()
    assert [r["name"] for r in first["data"]] == ["rule 0", "rule 1", "rule 2"]
    assert first["meta"]["total"] == 7 and first["meta"]["next_after"] is not None
    second = (await client.get("/v1/alerts/rules", params={
        "limit": 3, "after": first["meta"]["next_after"]}, headers=auth)).json()
    assert [r["name"] for r in second["data"]] == ["rule 3", "rule 4", "rule 5"]

    async def names(**params: Any) -> list[str]:
        page = (await client.get("/v1/alerts/rules", params=params, headers=auth)).json()
        return [r["name"] for r in page["data"]]

    assert await names(subject="AAVE") == ["rule 1", "rule 3", "rule 5"]
    assert await names(paused="true") == ["rule 3"]
    assert await names(severity="critical") == ["rule 5"]
    assert await names(metric="price") == []
    assert await names(name="RULE 6") == ["rule 6"]


async def test_dry_run_says_whether_and_why_it_would_fire(
    alerting: Alerting, client: httpx.AsyncClient, make_key: Any
) -> None:
    auth = await make_key()
    await alerting.ingest(point("aave", T0, 1.2e9), point("aave", T0 + HOUR, 0.9e9),
                          point("gmx", T0, 5e8, chain="arbitrum"),
                          point("gmx", T0 + HOUR, 4e8, chain="arbitrum"),
                          point("radiant", T0, 2e8, chain="arbitrum"),
                          point("radiant", T0 + HOUR, 1.99e8, chain="arbitrum"))
    low = (await client.post("/v1/alerts/rules", headers=auth, json=rule_body())).json()
    result = (await client.post(f"/v1/alerts/rules/{low['id']}/test", headers=auth)).json()
    assert result["would_fire"] is True
    [instance] = result["instances"]
    assert instance["action"] == "fired" and instance["reason"] == "condition_met"
    assert "tvl|aave|- lt 1e+09 (value 9e+08)" in instance["explanation"]
    assert instance["leaves"][0]["value"] == 0.9e9 and instance["leaves"][0]["truth"] == "true"
    high = (await client.post("/v1/alerts/rules", headers=auth, json=rule_body(
        condition={**AAVE_LOW, "op": "gt"}))).json()
    result = (await client.post(f"/v1/alerts/rules/{high['id']}/test", headers=auth)).json()
    assert result["would_fire"] is False
    assert "does not hold" in result["instances"][0]["explanation"]
    wild = (await client.post("/v1/alerts/rules", headers=auth, json=rule_body(condition={
        "metric": "change_pct", "window": "1h", "subject": "*", "chain": "arbitrum",
        "op": "lte", "threshold": -10}))).json()
    result = (await client.post(f"/v1/alerts/rules/{wild['id']}/test", headers=auth)).json()
    assert result["matched_series"] == 2
    assert [(i["series"], i["would_fire"]) for i in result["instances"]] == [
        ("tvl|gmx|arbitrum", True), ("tvl|radiant|arbitrum", False)]
    nothing = (await client.post("/v1/alerts/rules", headers=auth, json=rule_body(
        condition={**AAVE_LOW, "subject": "unknown-protocol"}))).json()
    result = (await client.post(f"/v1/alerts/rules/{nothing['id']}/test", headers=auth)).json()
    assert result["would_fire"] is False and result["instances"][0]["reason"] == "no_data"


async def test_history_filters_ack_snooze_and_notifications(
    alerting: Alerting, client: httpx.AsyncClient, make_key: Any
) -> None:
    auth = await make_key()
    low = (await client.post("/v1/alerts/rules", headers=auth, json=rule_body(
        throttle_minutes=0))).json()
    other = (await client.post("/v1/alerts/rules", headers=auth, json=rule_body(
        condition={**AAVE_LOW, "threshold": 0.5e9}))).json()
    engine = alerting.engine()
    await engine.start()
    for i, value in enumerate([1.2e9, 0.9e9, 1.1e9, 0.4e9]):
        await alerting.ingest(point("aave", T0 + i * HOUR, value))
        await engine.drain()
    page = (await client.get("/v1/alerts/history", headers=auth)).json()
    assert page["meta"]["total"] == 3
    assert sorted((a["rule_id"], a["state"]) for a in page["data"]) == sorted([
        (other["id"], "firing"), (low["id"], "firing"), (low["id"], "resolved")])
    assert [a["id"] for a in page["data"]] == sorted((a["id"] for a in page["data"]),
                                                     reverse=True)  # newest first
    newest = page["data"][0]
    assert newest["event"]["value"] == 0.4e9 and newest["series"]["subject"] == "aave"
    only_low = (await client.get("/v1/alerts/history", params={"rule_id": low["id"],
                                                               "state": "resolved"},
                                 headers=auth)).json()
    assert len(only_low["data"]) == 1
    paged = (await client.get("/v1/alerts/history", params={"limit": 2}, headers=auth)).json()
    rest = (await client.get("/v1/alerts/history", params={
        "before": paged["meta"]["next_before"]}, headers=auth)).json()
    assert len(paged["data"]) == 2 and len(rest["data"]) == 1
    one = (await client.get(f"/v1/alerts/history/{newest['id']}", headers=auth)).json()
    assert [(n["kind"], n["status"], n["attempt"]) for n in one["notifications"]] == [
        ("alert_fired", "pending", 0)]
    acked = (await client.post(f"/v1/alerts/history/{newest['id']}/ack", headers=auth)).json()
    assert acked["acknowledged_by"] == "alice"
    assert (await client.get("/v1/alerts/history", params={"acknowledged": "true"},
                             headers=auth)).json()["meta"]["total"] == 1
    bad = await client.post(f"/v1/alerts/history/{newest['id']}/snooze", headers=auth,
                            json={"until": 1})
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "until"
    snoozed = (await client.post(f"/v1/alerts/history/{newest['id']}/snooze", headers=auth,
                                 json={"minutes": 30})).json()
    assert snoozed["snoozed_until"] is not None
    cleared = (await client.delete(f"/v1/alerts/history/{newest['id']}/snooze",
                                   headers=auth)).json()
    assert cleared["snoozed_until"] is None
    outbox = (await client.get("/v1/notifications", headers=auth)).json()
    assert outbox["meta"]["count"] == 3
    assert {n["status"] for n in outbox["data"]} == {"pending"}


async def test_editing_the_condition_closes_open_alerts(
    alerting: Alerting, client: httpx.AsyncClient, make_key: Any
) -> None:
    auth = await make_key()
    rule = (await client.post("/v1/alerts/rules", headers=auth, json=rule_body())).json()
    engine = alerting.engine()
    await engine.start()
    await alerting.ingest(point("aave", T0, 1.2e9), point("aave", T0 + HOUR, 0.9e9))
    await engine.drain()
    await client.patch(f"/v1/alerts/rules/{rule['id']}", headers=auth,
                       json={"condition": {**AAVE_LOW, "threshold": 0.8e9}})
    [alert] = (await client.get("/v1/alerts/history", headers=auth)).json()["data"]
    assert (alert["state"], alert["resolve_reason"]) == ("resolved", "rule_changed")


async def test_openapi_documents_the_alerts_api(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    paths = spec["paths"]
    for path in ("/v1/alerts/rules", "/v1/alerts/rules/{rule_id}",
                 "/v1/alerts/rules/{rule_id}/test", "/v1/alerts/rules/{rule_id}/pause",
                 "/v1/alerts/history", "/v1/alerts/history/{alert_id}/ack",
                 "/v1/alerts/history/{alert_id}/snooze", "/v1/notifications"):
        assert path in paths, path
    schema = spec["components"]["schemas"]["RuleCreate"]["properties"]["condition"]
    assert schema["title"] == "Condition"
