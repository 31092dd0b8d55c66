"""One topology for the whole module: PostgreSQL, Redis and every role as its own process, under
a steady workload, shared by the scenarios (each heals what the previous one left)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from .topology import Topology, missing_binaries
from .workload import (
    SETUP_DEADLINE_S,
    STATIC,
    Harness,
    Ingestor,
    WebhookReceiver,
    alert_rule,
    latest_complete,
    poll,
)


@pytest.fixture(scope="module")
def faults_root() -> Iterator[Path]:
    """A directory the `postgres` user can reach (pytest's tmp dirs are private to root)."""
    missing = missing_binaries()
    if missing:
        reason = f"the fault suite starts its own servers and needs {', '.join(missing)}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason)
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="dw-faults-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def harness(faults_root: Path) -> AsyncIterator[Harness]:
    topology = Topology(faults_root)
    receiver = WebhookReceiver()
    try:
        api_key = await topology.start()
        await receiver.start()
        async with httpx.AsyncClient(base_url=topology.api_url,
                                     headers={"Authorization": f"Bearer {api_key}"}) as api:
            await poll(lambda: topology.all_ready(api), SETUP_DEADLINE_S, "roles ready", topology)
            rule = await api.post("/v1/alerts/rules", json=alert_rule(receiver.url))
            assert rule.status_code == 201, rule.text
            h = Harness(topology, api, api_key, Ingestor(api, base_ts=int(time.time()) - 100_000),
                        receiver, static={})
            await _store_static(h)
            h.ingestor.start()
            try:
                await poll(lambda: latest_complete(api, h.latest_wanted(1)), SETUP_DEADLINE_S,
                           "/v1/latest with the workload", topology)
                # A webhook proves that the engine has loaded the rule: it evaluates every later
                # tick, so each scenario can account for every transition after its start.
                await poll(lambda: _has(receiver.hooks), SETUP_DEADLINE_S, "a first webhook", topology)
                yield h
            finally:
                await h.ingestor.close()
    finally:
        await receiver.close()
        topology.stop()


async def _store_static(h: Harness) -> None:
    """Two points per STATIC series (the second a change, so it surely reaches the cache)."""
    base = h.ingestor.base_ts
    for ts, value in ((base - 2, 1.0e9), (base - 1, 1.5e9)):
        assert await h.ingestor.ingest([{"metric": "tvl", "subject": s, "ts": ts, "value": value}
                                        for s in STATIC])
        h.static.update({s: (ts, value) for s in STATIC})


async def _has(items: list[Any]) -> bool:
    return bool(items)
