"""`make run` as a newcomer sees it: the whole platform in one process with its default settings,
replaying the bundled real data (history backfilled at full speed, then streamed), with real
tvl_change and price_change events, protocols, latest values and a first query answering for the
printed demo key, and the banner's `tail` command working from a shell whose PATH lacks the venv."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from loopback import free_port


def start(env: dict[str, str], cwd: Path, log: Path, *roles: str) -> subprocess.Popen[bytes]:
    """`defiwatch run [roles]` as a child process, its output in `log`."""
    with log.open("wb") as sink:
        return subprocess.Popen([sys.executable, "-m", "defiwatch", "run", *roles], cwd=cwd,
                                env=env, stdout=sink, stderr=subprocess.STDOUT)


def banner_tail_command(log: Path) -> list[str]:
    """The command the banner's `follow` line tells the user to run, up to and with `tail`."""
    found = re.search(r"^\s+follow\s+(.*\btail)\b", log.read_text(), re.MULTILINE)
    assert found, log.read_text()
    return shlex.split(found.group(1))


def without_venv_on_path(env: dict[str, str]) -> dict[str, str]:
    """A newcomer's shell: `make run` does not put the venv's bin on PATH."""
    venv_bin = str(Path(sys.executable).parent)
    path = [d for d in env.get("PATH", os.defpath).split(os.pathsep) if d and d != venv_bin]
    return {**env, "PATH": os.pathsep.join(path)}


async def tail_lines(env: dict[str, str], cwd: Path, command: list[str], args: list[str],
                     count: int, timeout: float) -> list[dict[str, Any]]:
    tail = await asyncio.create_subprocess_exec(
        *command, *args, cwd=cwd, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    assert tail.stdout is not None
    lines: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(timeout):
            while len(lines) < count:
                lines.append(json.loads(await tail.stdout.readline()))
    finally:
        tail.kill()
        await tail.wait()
    return lines


def demo_key(cwd: Path) -> str | None:
    key_file = cwd / "var" / "demo-key"
    return key_file.read_text().strip() if key_file.exists() else None


async def shows_data(client: httpx.AsyncClient, key: str | None) -> bool:
    """Whether the platform answers what a newcomer tries first: tvl_change and price_change
    events, the latest ether price, and DefiLlama's /protocols."""
    if key is None:
        return False
    auth = {"Authorization": f"Bearer {key}"}
    try:
        events = (await client.get("/v1/events", params={"limit": 1000}, headers=auth)).json()
        price = (await client.get("/v1/latest", params={"metric": "price"}, headers=auth)).json()
        protocols = (await client.get(f"/{key}/protocols")).json()
    except httpx.TransportError:
        return False  # not listening yet
    types = {e["type"] for e in events["data"]}
    return ({"tvl_change", "price_change"} <= types and len(protocols) > 100
            and any(x["subject"] == "coingecko:ethereum" for x in price["data"]))


async def test_run_replays_real_data_into_events(tmp_path: Path, timeout_factor: float) -> None:
    port, ws_port, sio_port = free_port(), free_port(), free_port()
    env = without_venv_on_path({k: v for k, v in os.environ.items()
                                if not k.startswith("DEFIWATCH_")})
    env.update({"DEFIWATCH_API_PORT": str(port), "DEFIWATCH_GATEWAY_PORT": str(ws_port),
                "DEFIWATCH_SOCKETIO_PORT": str(sio_port), "DEFIWATCH_LOG_LEVEL": "warning"})
    log = tmp_path / "run.log"
    proc = start(env, tmp_path, log)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            async with asyncio.timeout(120 * timeout_factor):
                while not await shows_data(client, demo_key(tmp_path)):
                    await asyncio.sleep(0.2)  # polling a live server for a condition
                    assert proc.poll() is None, log.read_text()
            key = demo_key(tmp_path)
            assert key and key in log.read_text()  # the banner printed the key
            # docs/query.md's first example, as a newcomer pastes it.
            top = await client.post("/v1/query/advanced", headers={"X-API-Key": key}, json={
                "select": ["slug", "tvl", "change_24h"], "sort": ["-tvl"], "limit": 5})
            assert top.status_code == 200 and len(top.json()["data"]) == 5, top.text
        assert "replay     bundled real data 2020-01-01 to " in log.read_text()
        # The banner's `tail` command follows the gateway of the running platform, replaying
        # from offset 0, from a shell without the venv on PATH.
        lines = await tail_lines(env, tmp_path, banner_tail_command(log),
                                 ["price_changes", "--since", "0", "--json"], 3,
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
