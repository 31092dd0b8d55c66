"""Web Push devices through the real API on both deployments: register, list, update, delete,
validation of subscriptions, the SSRF check on save, the per-user cap, the VAPID key."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from defiwatch.api.routes.devices import MAX_DEVICES
from defiwatch.store import endpoints as store
from defiwatch.store.schema import user_devices

from .conftest import ALLOWED_HTTP, VAPID, Api, b64url, subscription


async def test_register_list_update_and_delete_a_device(api: Api) -> None:
    auth = await api.key()
    sub = subscription("https://1.1.1.1/wpush/v2/secret-token")
    created = await api.client.post("/v1/devices", headers=auth, json={
        "device": "laptop", "subscription": sub, "user_agent": "Firefox"})
    assert created.status_code == 201, created.text
    device = created.json()
    assert device["device"] == "laptop" and device["status"] == "enabled"
    assert device["endpoint_origin"] == "https://1.1.1.1"
    assert sub["keys"]["auth"] not in created.text and "secret-token" not in created.text

    # The push service said 410: the notifier disabled it; the list shows why.
    async with api.platform.engine.begin() as conn:
        await conn.execute(update(user_devices).values(disabled_at=time.time(),
                                                       disabled_reason="gone: 410"))
    [listed] = (await api.client.get("/v1/devices", headers=auth)).json()["data"]
    assert (listed["status"], listed["disabled_reason"]) == ("disabled", "gone: 410")

    # Subscribing again under the same name replaces the subscription and re-enables it.
    again = subscription("https://8.8.8.8/fcm/send/other")
    updated = await api.client.post("/v1/devices", headers=auth, json={
        "device": "laptop", "subscription": again})
    assert updated.status_code == 200, updated.text
    assert (updated.json()["status"], updated.json()["disabled_reason"]) == ("enabled", None)
    async with api.platform.engine.connect() as conn:
        [row] = await store.list_devices(conn, await api.user_id(auth))
    assert (row.endpoint, row.p256dh, row.auth) == (
        again["endpoint"], again["keys"]["p256dh"], again["keys"]["auth"])

    unnamed = (await api.client.post("/v1/devices", headers=auth, json={
        "subscription": subscription("https://9.9.9.9/push/x")})).json()
    assert unnamed["device"].startswith("dev_") and len(unnamed["device"]) == 12
    # The same browser posting again without a name keeps its generated name.
    same = await api.client.post("/v1/devices", headers=auth, json={
        "subscription": subscription("https://9.9.9.9/push/x")})
    assert same.status_code == 200 and same.json()["device"] == unnamed["device"]

    page = (await api.client.get("/v1/devices", headers=auth)).json()
    assert [d["device"] for d in page["data"]] == ["laptop", unnamed["device"]]
    assert page["meta"] == {"count": 2, "max": MAX_DEVICES}

    assert (await api.client.delete("/v1/devices/laptop", headers=auth)).status_code == 204
    gone = await api.client.delete("/v1/devices/laptop", headers=auth)
    assert gone.status_code == 404 and gone.json()["error"]["field"] == "device"
    assert [d["device"] for d in (await api.client.get("/v1/devices", headers=auth)).json()[
        "data"]] == [unnamed["device"]]


async def test_users_only_see_and_delete_their_own_devices(api: Api) -> None:
    alice, bob = await api.key("alice"), await api.key("bob")
    assert (await api.client.post("/v1/devices", headers=alice, json={
        "device": "phone", "subscription": subscription()})).status_code == 201
    assert (await api.client.get("/v1/devices", headers=bob)).json()["data"] == []
    assert (await api.client.delete("/v1/devices/phone", headers=bob)).status_code == 404
    # Bob may use the same name for his own device: names are per user.
    assert (await api.client.post("/v1/devices", headers=bob, json={
        "device": "phone", "subscription": subscription()})).status_code == 201
    assert len((await api.client.get("/v1/devices", headers=alice)).json()["data"]) == 1


def _with(path: str, value: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"device": "d1", "subscription": subscription()}
    node = body
    *parents, last = path.split(".")
    for part in parents:
        node = node[part]
    if value is _DROP:
        del node[last]
    else:
        node[last] = value
    return body


_DROP = object()
_NOT_ON_CURVE = b64url(b"\x04" + b"\x01" * 64)


@pytest.mark.parametrize(
    ("path", "value", "status", "code", "field"),
    [
        ("subscription.keys.p256dh", "not base64!", 400, "invalid_request",
         "subscription.keys.p256dh"),
        ("subscription.keys.p256dh", b64url(b"\x04" + b"\x01" * 10), 400, "invalid_request",
         "subscription.keys.p256dh"),
        ("subscription.keys.p256dh", _NOT_ON_CURVE, 400, "invalid_request",
         "subscription.keys.p256dh"),
        ("subscription.keys.auth", b64url(b"\x00" * 8), 400, "invalid_request",
         "subscription.keys.auth"),
        ("subscription.keys.auth", _DROP, 400, "invalid_request", "subscription.keys.auth"),
        ("subscription.endpoint", "ftp://1.1.1.1/push", 400, "invalid_request",
         "subscription.endpoint"),
        ("subscription.endpoint", "http://1.1.1.1/push", 400, "invalid_request",
         "subscription.endpoint"),
        ("subscription.endpoint", "https://127.0.0.1/push", 400, "destination_blocked",
         "subscription.endpoint"),
        ("subscription.endpoint", "https://169.254.169.254/latest", 400,
         "destination_blocked", "subscription.endpoint"),
        ("subscription.endpoint", "https://10.0.0.1/push", 400, "destination_blocked",
         "subscription.endpoint"),
        ("device", "no spaces allowed", 400, "invalid_request", "device"),
        ("user_agent", "x" * 301, 400, "invalid_request", "user_agent"),
        ("subscription.extra", 1, 400, "invalid_request", "subscription.extra"),
    ],
)
async def test_invalid_subscriptions_are_refused_with_the_field(
    api: Api, path: str, value: Any, status: int, code: str, field: str
) -> None:
    auth = await api.key()
    response = await api.client.post("/v1/devices", headers=auth, json=_with(path, value))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["field"]) == (code, field)
    assert (await api.client.get("/v1/devices", headers=auth)).json()["data"] == []


async def test_http_is_accepted_only_for_allow_listed_destinations(api: Api) -> None:
    auth = await api.key()
    allowed = await api.client.post("/v1/devices", headers=auth, json={
        "device": "internal", "subscription": subscription(f"http://{ALLOWED_HTTP}:8080/push")})
    assert allowed.status_code == 201, allowed.text
    assert allowed.json()["endpoint_origin"] == f"http://{ALLOWED_HTTP}:8080"


async def test_devices_are_capped_per_user(api: Api) -> None:
    auth = await api.key()
    user_id = await api.user_id(auth)
    sub = subscription()
    async with api.platform.engine.begin() as conn:
        for i in range(MAX_DEVICES):
            await store.upsert_device(conn, user_id, f"d{i}", endpoint=f"{sub['endpoint']}/{i}",
                                      p256dh=sub["keys"]["p256dh"], auth=sub["keys"]["auth"],
                                      user_agent=None, now=time.time())
    refused = await api.client.post("/v1/devices", headers=auth, json={
        "device": "one-too-many", "subscription": subscription()})
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "device_limit_reached"
    # Updating an existing device is not adding one.
    assert (await api.client.post("/v1/devices", headers=auth, json={
        "device": "d3", "subscription": subscription()})).status_code == 200


async def test_the_vapid_public_key_is_served_when_push_is_configured(
    api: Api, make_client: Callable[..., httpx.AsyncClient]
) -> None:
    auth = await api.key()
    response = await api.client.get("/v1/devices/vapid-public-key", headers=auth)
    assert response.status_code == 200
    assert response.json() == {"public_key": VAPID.application_server_key}
    async with make_client(notify_vapid_private_key=None) as unconfigured:
        missing = await unconfigured.get("/v1/devices/vapid-public-key", headers=auth)
    assert missing.status_code == 503
    assert missing.json()["error"]["code"] == "push_not_configured"
    assert "DEFIWATCH_NOTIFY_VAPID_PRIVATE_KEY" in missing.json()["error"]["message"]


async def test_devices_need_the_alerts_scope(api: Api) -> None:
    reader = await api.key("reader", scopes=("read",))
    assert (await api.client.get("/v1/devices", headers=reader)).status_code == 403
