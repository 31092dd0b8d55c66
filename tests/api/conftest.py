"""Fixtures for the delivery API tests: a platform on both deployments, the API built with
delivery settings (a VAPID key, an SSRF allow-list entry, a secret grace period), keys of
several users, and helpers writing outbox rows as the engine and the notifier would."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import SecretStr

from defiwatch.alerts import AlertsApiConfig
from defiwatch.api import ApiContext, create_app
from defiwatch.app import Platform, open_platform
from defiwatch.config import Settings
from defiwatch.notify import VapidKey
from defiwatch.store.keys import create_key
from defiwatch.store.schema import notification_attempts, notification_logs

VAPID = VapidKey.generate()
ALLOWED_HTTP = "10.9.8.7"  # on the test SSRF allow-list: http:// is accepted there
GRACE_S = 3_600.0


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def subscription(endpoint: str = "https://1.1.1.1/push/v2/token-abc") -> dict[str, Any]:
    """A subscription as `PushSubscription.toJSON()` gives it, with real keys."""
    point = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return {"endpoint": endpoint, "expirationTime": None,
            "keys": {"p256dh": b64url(point), "auth": b64url(bytes(range(16)))}}


@dataclass
class Api:
    platform: Platform
    client: httpx.AsyncClient

    async def key(self, user: str = "alice", scopes: tuple[str, ...] = ("alerts",)
                  ) -> dict[str, str]:
        async with self.platform.engine.begin() as conn:
            key, _ = await create_key(conn, user=user, tier="pro", scopes=list(scopes),
                                      tiers=list(self.platform.settings.tiers))
        return {"Authorization": f"Bearer {key}"}

    async def user_id(self, auth: dict[str, str]) -> int:
        from defiwatch.store.keys import authenticate

        async with self.platform.engine.connect() as conn:
            principal = await authenticate(conn, auth["Authorization"].split(" ", 1)[1])
        assert principal is not None
        return principal.user_id

    async def notification(self, user_id: int, attempts: int = 0, **values: Any) -> int:
        """Insert an outbox row (defaults: a pending webhook alert_fired) with `attempts`
        attempt rows, the last one ending as the row's status says."""
        now = time.time()
        row: dict[str, Any] = {
            "alert_id": None, "user_id": user_id, "rule_id": None, "kind": "alert_fired",
            "seq": 0, "channel": "webhook", "target": "https://example.com/hook",
            "config": {"type": "webhook", "url": "https://example.com/hook"},
            "payload": {"type": "alert_fired"}, "status": "pending", "attempt": attempts,
            "next_attempt_at": now, "created_at": now, "updated_at": now, "host": "example.com",
            **values}
        async with self.platform.engine.begin() as conn:
            nid = int((await conn.execute(notification_logs.insert().values(**row)
                                          .returning(notification_logs.c.id))).scalar_one())
            for n in range(1, attempts + 1):
                last = n == attempts
                status = {"delivered": "delivered", "dead": "dead"}.get(row["status"], "failed")
                await conn.execute(notification_attempts.insert().values(
                    notification_id=nid, attempt=n, status=status if last else "failed",
                    response_code=200 if last and status == "delivered" else 503,
                    error=None if last and status == "delivered" else "HTTP 503",
                    latency_ms=12.5, worker="w1", started_at=now + n, finished_at=now + n + 1))
        return nid

    async def row(self, notification_id: int) -> dict[str, Any]:
        from sqlalchemy import select

        async with self.platform.engine.connect() as conn:
            found = (await conn.execute(select(notification_logs).where(
                notification_logs.c.id == notification_id))).one()
        return dict(found._mapping)


def delivery_settings(settings: Settings, **over: Any) -> Settings:
    values: dict[str, Any] = {
        "notify_vapid_private_key": SecretStr(VAPID.private_pem().decode()),
        "notify_ssrf_allow": [ALLOWED_HTTP], "notify_secret_grace_s": GRACE_S, **over}
    return settings.model_copy(update=values)


@pytest.fixture
async def platform(settings: Settings) -> AsyncIterator[Platform]:
    async with open_platform(settings) as p:
        yield p


@pytest.fixture
def make_client(platform: Platform) -> Callable[..., httpx.AsyncClient]:
    """An API client whose delivery settings differ by `over` (close it yourself)."""

    def make(**over: Any) -> httpx.AsyncClient:
        p = platform
        ctx = ApiContext(p.engine, p.stream, p.cache, p.ingest,
                         alerts=AlertsApiConfig.from_settings(p.settings),
                         settings=delivery_settings(p.settings, **over))
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(ctx)),
                                 base_url="http://defiwatch.test")

    return make


@pytest.fixture
async def api(platform: Platform, make_client: Callable[..., httpx.AsyncClient]
              ) -> AsyncIterator[Api]:
    async with make_client() as client:
        yield Api(platform, client)
