"""Delivery endpoints through the real API on both deployments: created with rules (a webhook's
secret shown once), listed without secrets, secret rotation with a grace period, re-enabling
with redelivery of what was dropped while disabled."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select, update

from defiwatch.store.schema import notification_endpoints

from .conftest import GRACE_S, Api

HOOK = "https://user:pw@example.com/hooks/a?token=s3cret"
CHAT = "https://hooks.slack.com/services/T0/B0/chat-token"
CONDITION = {"metric": "tvl", "subject": "aave", "op": "lt", "threshold": 1e9}


def rule(*channels: dict[str, Any], name: str = "r") -> dict[str, Any]:
    return {"name": name, "condition": CONDITION, "channels": list(channels)}


async def _stored_secrets(api: Api, endpoint_id: int) -> list[dict[str, Any]]:
    async with api.platform.engine.connect() as conn:
        secrets = (await conn.execute(select(notification_endpoints.c.secrets).where(
            notification_endpoints.c.id == endpoint_id))).scalar_one()
    assert isinstance(secrets, list)
    return secrets


async def test_rules_create_endpoints_and_show_a_new_webhook_secret_once(api: Api) -> None:
    auth = await api.key()
    created = await api.client.post("/v1/alerts/rules", headers=auth, json=rule(
        {"type": "webhook", "url": HOOK}, {"type": "chat", "platform": "slack", "url": CHAT},
        {"type": "email", "address": "ops@example.com"}, {"type": "push"}))
    assert created.status_code == 201, created.text
    secrets = created.json()["webhook_secrets"]
    assert list(secrets) == [HOOK] and secrets[HOOK].startswith("whsec_")

    listing = await api.client.get("/v1/endpoints", headers=auth)
    endpoints = {e["channel"]: e for e in listing.json()["data"]}
    assert set(endpoints) == {"webhook", "chat", "email"}  # push has devices, not endpoints
    assert endpoints["webhook"]["target"] == "https://***@example.com/hooks/a?…"
    assert endpoints["chat"]["target"] == "https://hooks.slack.com/…"
    assert endpoints["email"]["target"] == "ops@example.com"
    assert [(e["status"], e["secrets_count"]) for e in (endpoints[c] for c in (
        "webhook", "chat", "email"))] == [("active", 1), ("active", 0), ("active", 0)]
    assert endpoints["webhook"]["secrets"][0]["expires_at"] is None
    for leaked in ("whsec_", "s3cret", "chat-token", ":pw@"):
        assert leaked not in listing.text
    assert await _stored_secrets(api, endpoints["webhook"]["id"]) == [
        {"secret": secrets[HOOK], "expires_at": None}]

    # Another rule on the same URL reuses the endpoint: no new secret, nothing shown.
    second = await api.client.post("/v1/alerts/rules", headers=auth, json=rule(
        {"type": "webhook", "url": HOOK}, name="second"))
    assert second.status_code == 201 and "webhook_secrets" not in second.json()
    # A patch adding a webhook shows the secret of the new endpoint only.
    other = "https://example.org/other"
    patched = await api.client.patch(f"/v1/alerts/rules/{second.json()['id']}", headers=auth,
                                     json={"channels": [{"type": "webhook", "url": HOOK},
                                                        {"type": "webhook", "url": other}]})
    assert patched.status_code == 200, patched.text
    assert list(patched.json()["webhook_secrets"]) == [other]
    got = (await api.client.get(f"/v1/alerts/rules/{second.json()['id']}", headers=auth)).json()
    assert "webhook_secrets" not in got
    assert len((await api.client.get("/v1/endpoints", headers=auth)).json()["data"]) == 4

    # Bob's rule on the same URL is his own endpoint, with its own secret.
    bob = await api.key("bob")
    theirs = (await api.client.post("/v1/alerts/rules", headers=bob, json=rule(
        {"type": "webhook", "url": HOOK}))).json()
    assert theirs["webhook_secrets"][HOOK] != secrets[HOOK]
    assert len((await api.client.get("/v1/endpoints", headers=bob)).json()["data"]) == 1


async def test_rotation_returns_the_new_secret_once_and_keeps_the_old_one_signing(
    api: Api,
) -> None:
    auth = await api.key()
    old = (await api.client.post("/v1/alerts/rules", headers=auth, json=rule(
        {"type": "webhook", "url": HOOK}, {"type": "email", "address": "a@example.com"})
    )).json()["webhook_secrets"][HOOK]
    endpoints = {e["channel"]: e for e in (await api.client.get(
        "/v1/endpoints", headers=auth)).json()["data"]}
    hook_id = endpoints["webhook"]["id"]

    before = time.time()
    rotated = await api.client.post(f"/v1/endpoints/{hook_id}/rotate-secret", headers=auth)
    after = time.time()
    assert rotated.status_code == 200, rotated.text
    body = rotated.json()
    new = body["secret"]
    assert new.startswith("whsec_") and new != old
    assert before + GRACE_S <= body["previous_expires_at"] <= after + GRACE_S
    shown = body["endpoint"]["secrets"]
    assert body["endpoint"]["secrets_count"] == 2
    assert shown[0]["expires_at"] is None
    assert shown[1]["expires_at"] == body["previous_expires_at"]
    assert shown[0]["fingerprint"] != shown[1]["fingerprint"]
    assert await _stored_secrets(api, hook_id) == [
        {"secret": new, "expires_at": None},
        {"secret": old, "expires_at": body["previous_expires_at"]}]
    listing = await api.client.get("/v1/endpoints", headers=auth)
    assert new not in listing.text and old not in listing.text

    # A second rotation keeps only the secret it replaces.
    newest = (await api.client.post(f"/v1/endpoints/{hook_id}/rotate-secret",
                                     headers=auth)).json()["secret"]
    assert [s["secret"] for s in await _stored_secrets(api, hook_id)] == [newest, new]

    email = await api.client.post(f"/v1/endpoints/{endpoints['email']['id']}/rotate-secret",
                                  headers=auth)
    assert email.status_code == 400 and email.json()["error"]["field"] == "id"
    bob = await api.key("bob")
    assert (await api.client.post(f"/v1/endpoints/{hook_id}/rotate-secret",
                                  headers=bob)).status_code == 404
    assert (await api.client.post("/v1/endpoints/999999/rotate-secret",
                                  headers=auth)).status_code == 404


async def test_an_expired_previous_secret_is_dropped(api: Api) -> None:
    auth = await api.key()
    await api.client.post("/v1/alerts/rules", headers=auth, json=rule(
        {"type": "webhook", "url": HOOK}))
    [hook] = (await api.client.get("/v1/endpoints", headers=auth)).json()["data"]
    new = (await api.client.post(f"/v1/endpoints/{hook['id']}/rotate-secret",
                                 headers=auth)).json()["secret"]
    secrets = await _stored_secrets(api, hook["id"])
    secrets[1]["expires_at"] = time.time() - 1  # its grace period is over
    async with api.platform.engine.begin() as conn:
        await conn.execute(update(notification_endpoints).where(
            notification_endpoints.c.id == hook["id"]).values(secrets=secrets))
    [listed] = (await api.client.get("/v1/endpoints", headers=auth)).json()["data"]
    assert listed["secrets_count"] == 1
    newest = (await api.client.post(f"/v1/endpoints/{hook['id']}/rotate-secret",
                                    headers=auth)).json()["secret"]
    assert [s["secret"] for s in await _stored_secrets(api, hook["id"])] == [newest, new]


async def test_enable_clears_the_failure_clock_and_can_redeliver_what_was_dropped(
    api: Api,
) -> None:
    auth = await api.key()
    user_id = await api.user_id(auth)
    url = "https://example.com/hook"
    await api.client.post("/v1/alerts/rules", headers=auth, json=rule(
        {"type": "webhook", "url": url}, {"type": "email", "address": "a@example.com"}))
    endpoints = {e["channel"]: e for e in (await api.client.get(
        "/v1/endpoints", headers=auth)).json()["data"]}
    hook_id = endpoints["webhook"]["id"]
    now = time.time()
    async with api.platform.engine.begin() as conn:
        await conn.execute(update(notification_endpoints).where(
            notification_endpoints.c.id == hook_id).values(
            failing_since=now - 86_400 * 3, disabled_at=now, last_error="HTTP 503",
            disabled_reason="failing for 3 days"))
    [disabled] = [e for e in (await api.client.get("/v1/endpoints", headers=auth)).json()[
        "data"] if e["id"] == hook_id]
    assert (disabled["status"], disabled["disabled_reason"]) == ("disabled", "failing for 3 days")

    dropped = await api.notification(user_id, attempts=2, status="dead", target=url,
                                     last_error="endpoint disabled")
    failed = await api.notification(user_id, attempts=8, status="dead", target=url,
                                    last_error="HTTP 500 after 8 attempts")
    elsewhere = await api.notification(user_id, status="dead", channel="email",
                                       target="a@example.com", last_error="endpoint disabled")
    bob = await api.key("bob")
    assert (await api.client.post(f"/v1/endpoints/{hook_id}/enable",
                                  headers=bob)).status_code == 404

    enabled = await api.client.post(f"/v1/endpoints/{hook_id}/enable", headers=auth,
                                    params={"redeliver": "true"})
    assert enabled.status_code == 200, enabled.text
    body = enabled.json()
    assert body["redelivered"] == 1
    assert (body["endpoint"]["status"], body["endpoint"]["disabled_at"],
            body["endpoint"]["failing_since"]) == ("active", None, None)
    requeued = await api.row(dropped)
    assert (requeued["status"], requeued["retry_from"], requeued["attempt"],
            requeued["last_error"]) == ("pending", 2, 2, None)
    assert (await api.row(failed))["status"] == "dead"
    assert (await api.row(elsewhere))["status"] == "dead"

    # Without redeliver only the endpoint changes.
    email_id = endpoints["email"]["id"]
    plain = (await api.client.post(f"/v1/endpoints/{email_id}/enable", headers=auth)).json()
    assert plain["redelivered"] == 0 and (await api.row(elsewhere))["status"] == "dead"
