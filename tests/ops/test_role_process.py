"""`defiwatch run processor` as its own process on SQLite: its ops listener answers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import httpx

from loopback import free_port, readiness_until


async def next_log(stream: asyncio.StreamReader, event: str) -> dict[str, Any]:
    """The first JSON log line with this event (other output, e.g. the banner, is skipped)."""
    while line := await stream.readline():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("event") == event:
            return entry
    raise AssertionError(f"the process ended before logging {event}")


async def test_a_processor_process_serves_health_readiness_and_metrics(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "DEFIWATCH_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/dw.db",
           "DEFIWATCH_STATE_DIR": str(tmp_path), "DEFIWATCH_OPS_PORT": str(port),
           "DEFIWATCH_LOG_FORMAT": "json", "DEFIWATCH_PROCESSOR_POLL_S": "0.2"}
    env.pop("DEFIWATCH_REDIS_URL", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "defiwatch", "run", "processor", cwd=tmp_path, env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    try:
        listening = await next_log(proc.stderr, "ops.listening")
        assert listening["url"] == f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=listening["url"]) as client:
            assert (await client.get("/healthz")).json() == {"status": "ok"}
            ready = await client.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json()["roles"]["processor"]["state"] == "ok"
            metrics = (await client.get("/metrics")).text
        assert 'defiwatch_build_info{python="' in metrics
        assert "defiwatch_processor_rows_total" in metrics  # the role's own series
        assert "_created" not in metrics
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        await proc.wait()
    assert proc.returncode == 0


async def test_a_processor_that_cannot_publish_is_not_ready_and_says_why(tmp_path: Path) -> None:
    """Its loop beats with the error while it retries: /readyz answers 503 naming it."""
    from defiwatch.app import open_platform, run_roles
    from defiwatch.config import Settings

    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/dw.db",
                        redis_url="redis://127.0.0.1:1/0",  # nobody listens there
                        state_dir=tmp_path, replay_enabled=False, demo_key=False,
                        ops_port=free_port(), processor_poll_s=0.2)
    stop = asyncio.Event()
    async with open_platform(settings) as platform:
        await platform.ingest.ingest_points(
            [{"metric": "tvl", "subject": "aave", "ts": 1_710_115_200, "value": 1.0}],
            source="test")
        roles = asyncio.create_task(run_roles(platform, ["processor"], stop))
        try:
            body = await readiness_until(f"http://127.0.0.1:{settings.ops_port}/readyz",
                                         lambda status, _: status == 503)
        finally:
            stop.set()
            await roles
    assert body["failing"] == ["processor"]
    processor = body["roles"]["processor"]
    assert processor["state"] in ("degraded", "failed")
    assert processor["error"]  # the error text, for the operator

