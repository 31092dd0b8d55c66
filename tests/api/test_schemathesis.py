"""Schemathesis against the served /openapi.json: no 5xx, and every answer as documented.

A real `defiwatch run api processor` on loopback, on PostgreSQL and Redis (where hostile
input differs most from SQLite: int64 columns, no NUL in text), with an enterprise key and a
VAPID key (so only an outage could answer 5xx). Bounded and derandomized, so a CI run is
stable and takes well under a minute: `--generation-deterministic`, a few examples per
operation, no shrinking, and no `--max-time` (with it, fuzzing repeats until it is spent).
A failure prints schemathesis' report with a curl command reproducing each case.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from defiwatch.notify import VapidKey
from loopback import free_port

_EXAMPLES = 25  # per operation; ~30 s on a 2-core machine
_CHECKS = ("not_a_server_error", "response_schema_conformance", "status_code_conformance",
           "content_type_conformance")




@pytest.fixture
def server_env(tmp_path: Path, postgres_url: str, redis_url: str, redis_prefix: str
               ) -> dict[str, str]:
    return {**os.environ, "DEFIWATCH_DATABASE_URL": postgres_url,
            "DEFIWATCH_REDIS_URL": redis_url, "DEFIWATCH_REDIS_PREFIX": redis_prefix,
            "DEFIWATCH_STATE_DIR": str(tmp_path), "DEFIWATCH_REPLAY_ENABLED": "false",
            "DEFIWATCH_DEMO_KEY": "false", "DEFIWATCH_API_HOST": "127.0.0.1",
            "DEFIWATCH_API_PORT": str(free_port()),
            "DEFIWATCH_NOTIFY_VAPID_PRIVATE_KEY": VapidKey.generate().private_pem().decode()}


@pytest.fixture
def key(server_env: dict[str, str]) -> str:
    """An enterprise key with every user scope (`keys create` migrates the database first)."""
    out = subprocess.run(
        [sys.executable, "-m", "defiwatch", "keys", "create", "--user", "fuzz", "--tier",
         "enterprise", "--scopes", "read,ingest,alerts"],
        env=server_env, capture_output=True, text=True, check=True).stdout
    return next(w for w in out.split() if w.startswith("dw_"))


@pytest.fixture
def base_url(server_env: dict[str, str], tmp_path: Path, timeout_factor: float
             ) -> Iterator[str]:
    """The API and the processor as one child process; its log is printed on failure."""
    url = f"http://127.0.0.1:{server_env['DEFIWATCH_API_PORT']}"
    log = tmp_path / "server.log"
    with log.open("wb") as sink:
        server = subprocess.Popen([sys.executable, "-m", "defiwatch", "run", "api", "processor"],
                                  env=server_env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30 * timeout_factor
        while True:  # a child process: polling its port is the only signal it gives
            assert server.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def _seed(base_url: str, key: str) -> None:
    """Something for the read routes to find: points of each dataset and a rule."""
    auth = {"Authorization": f"Bearer {key}"}
    now = int(time.time())
    points = [{"metric": "tvl", "subject": "aave", "chain": c, "ts": now - 100 + i, "value": v}
              for i, (c, v) in enumerate([("-", 1e10), ("ethereum", 8e9), ("-", 1.1e10)])]
    points += [{"metric": "price", "subject": "coingecko:ethereum", "ts": now, "value": 3e3},
               {"metric": "chain_tvl", "subject": "ethereum", "ts": now, "value": 5e10}]
    assert httpx.post(f"{base_url}/v1/ingest", json={"points": points}, headers=auth
                      ).status_code == 200
    assert httpx.post(f"{base_url}/v1/alerts/rules", headers=auth, json={
        "name": "aave", "channels": [{"type": "push"}],
        "condition": {"metric": "tvl", "subject": "aave", "op": "lt", "threshold": 1e9}},
    ).status_code == 201


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.timeout(300)  # ~40 s alone; room for a loaded CI machine
def test_schemathesis_finds_no_server_error(base_url: str, key: str, tmp_path: Path) -> None:
    _seed(base_url, key)
    run = subprocess.run(
        [str(Path(sys.executable).parent / "st"), "run", f"{base_url}/openapi.json",
         "--checks", ",".join(_CHECKS), "--max-examples", str(_EXAMPLES),
         "--generation-deterministic", "--no-shrink", "--phases", "examples,fuzzing",
         "--header", f"Authorization: Bearer {key}", "--workers", "1", "--no-color",
         "--request-timeout", "20", "--warnings", "off"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stdout[-20_000:] + run.stderr[-2_000:]
