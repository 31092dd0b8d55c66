"""`make run` as a newcomer sees it: the whole platform in one process, replaying the bundled real
data, with real tvl_change and price_change events on /v1/events for the printed demo key."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(env: dict[str, str], cwd: Path, log: Path, *roles: str) -> subprocess.Popen[bytes]:
    """`defiwatch run [roles]` as a child process, its output in `log`."""
    with log.open("wb") as sink:
        return subprocess.Popen([sys.executable, "-m", "defiwatch", "run", *roles], cwd=cwd,
                                env=env, stdout=sink, stderr=subprocess.STDOUT)


async def tail_lines(env: dict[str, str], cwd: Path, args: list[str], count: int,
                     timeout: float) -> list[dict[str, object]]:
    tail = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "defiwatch", "tail", *args, cwd=cwd, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    assert tail.stdout is not None
    lines: list[dict[str, object]] = []
    try:
        async with asyncio.timeout(timeout):
            while len(lines) < count:
                lines.append(json.loads(await tail.stdout.readline()))
    finally:
        tail.kill()
        await tail.wait()
    return lines


async def test_run_replays_real_data_into_events(tmp_path: Path, timeout_factor: float) -> None:
    port, ws_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEFIWATCH_")}
    env.update({"DEFIWATCH_API_PORT": str(port), "DEFIWATCH_GATEWAY_PORT": str(ws_port),
                "DEFIWATCH_REPLAY_SPEED": "0", "DEFIWATCH_LOG_LEVEL": "warning"})
    log = tmp_path / "run.log"
    proc = start(env, tmp_path, log)
    try:
        key_file = tmp_path / "var" / "demo-key"
        types: set[str] = set()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            async with asyncio.timeout(120 * timeout_factor):
                while not ({"tvl_change", "price_change"} <= types):
                    await asyncio.sleep(0.2)  # polling a live server for a condition
                    assert proc.poll() is None, log.read_text()
                    if not key_file.exists():
                        continue
                    key = key_file.read_text().strip()
                    try:
                        page = await client.get("/v1/events", params={"limit": 1000},
                                                headers={"Authorization": f"Bearer {key}"})
                    except httpx.TransportError:
                        continue  # not listening yet
                    types |= {e["type"] for e in page.json()["data"]}
            assert key in log.read_text()  # the banner printed the key
            price = (await client.get("/v1/latest", params={"metric": "price"},
                                      headers={"X-API-Key": key})).json()["data"]
            assert any(x["subject"] == "coingecko:ethereum" for x in price)
        # `defiwatch tail` follows the gateway of the running platform, replaying from offset 0.
        lines = await tail_lines(env, tmp_path, ["price_changes", "--since", "0", "--json"], 3,
                                 60 * timeout_factor)
        assert [line["type"] for line in lines] == ["event"] * 3
        assert all(line["data"]["type"] == "price_change" for line in lines)
        assert [line["offset"] for line in lines] == sorted(line["offset"] for line in lines)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30 * timeout_factor) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
