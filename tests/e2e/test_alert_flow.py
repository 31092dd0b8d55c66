"""The alert path through a running platform, as a user drives it over HTTP: create a rule,
ingest points, find the fired alert in the history and receive its signed webhook
(`defiwatch run api processor alerts notifier`)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import standardwebhooks

from loopback import free_port
from notify.receiver import Receiver

from .test_quickstart import start


async def test_rule_fires_on_ingested_points(tmp_path: Path, timeout_factor: float) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEFIWATCH_")}
    env.update({"DEFIWATCH_API_PORT": str(port), "DEFIWATCH_LOG_LEVEL": "warning",
                "DEFIWATCH_NOTIFY_SSRF_ALLOW": "127.0.0.1"})
    log = tmp_path / "run.log"
    proc = start(env, tmp_path, log, "api", "processor", "alerts", "notifier")
    receiver = Receiver().__enter__()
    try:
        key_file = tmp_path / "var" / "demo-key"
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            async with asyncio.timeout(60 * timeout_factor):
                while True:  # wait for the API to answer with the printed demo key
                    assert proc.poll() is None, log.read_text()
                    try:
                        if key_file.exists() and (await client.get("/healthz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await asyncio.sleep(0.2)
            auth = {"Authorization": f"Bearer {key_file.read_text().strip()}"}
            rule = await client.post("/v1/alerts/rules", headers=auth, json={
                "name": "Aave under $1B",
                "condition": {"metric": "tvl", "subject": "aave", "op": "lt", "threshold": 1e9},
                "channels": [{"type": "webhook", "url": receiver.url()}]})
            assert rule.status_code == 201, rule.text
            secret = rule.json()["webhook_secrets"][receiver.url()]
            base = int(time.time()) - 1_000
            async with asyncio.timeout(60 * timeout_factor):
                history: list[dict[str, object]] = []
                for step in range(0, 1_000, 2):
                    # The engine loads rule changes within a second; until then each round
                    # ingests a fresh rise and drop, so some tvl_change reaches the loaded rule.
                    points = [{"metric": "tvl", "subject": "aave", "ts": base + step, "value": 1.2e9},
                              {"metric": "tvl", "subject": "aave", "ts": base + step + 1,
                               "value": 0.9e9}]
                    await client.post("/v1/ingest", headers=auth, json={"points": points})
                    await asyncio.sleep(0.3)
                    history = (await client.get("/v1/alerts/history", headers=auth)).json()["data"]
                    if history:
                        break
            assert history[0]["rule_id"] == rule.json()["id"]
            async with asyncio.timeout(30 * timeout_factor):
                while not receiver.requests:  # the notifier delivers it
                    assert proc.poll() is None, log.read_text()
                    await asyncio.sleep(0.1)
            seen = receiver.requests[0]
            payload = standardwebhooks.Webhook(secret).verify(seen.body, seen.headers)
            assert payload["type"] == "alert_fired"
            assert payload["data"]["rule"]["id"] == rule.json()["id"]
            # The body names the event that fired the rule; the events API returns it.
            trigger = payload["data"]["event"]["detail"]["trigger"]
            [source] = (await client.get("/v1/events", headers=auth, params={
                "since": trigger["offset"] - 1, "limit": 1})).json()["data"]
            assert trigger["type"] == source["type"] == "tvl_change"
            assert (source["offset"], source["subject"]) == (trigger["offset"], "aave")
            assert source["value"] == payload["data"]["event"]["value"] == 0.9e9
            async with asyncio.timeout(30 * timeout_factor):
                while True:  # settled right after the receiver answered
                    [row] = (await client.get("/v1/notifications", headers=auth)).json()["data"]
                    if row["status"] != "sending":
                        break
                    await asyncio.sleep(0.1)
            assert row["status"] == "delivered" and row["id"] == int(seen.headers["webhook-id"][4:])
            assert [a["response_code"] for a in row["attempts"]] == [200]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30 * timeout_factor) == 0, log.read_text()
    finally:
        receiver.__exit__(None, None, None)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
