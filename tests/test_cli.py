"""The `defiwatch` command line as a person uses it, run as a real process."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PG_HOST, PG_PORT


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DEFIWATCH_")}
    return subprocess.run([sys.executable, "-m", "defiwatch", *args], cwd=cwd, text=True,
                          capture_output=True, env={**base, **(env or {})}, timeout=120)


def test_help_explains_where_to_start(tmp_path: Path) -> None:
    result = cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    for word in ("run", "db", "keys", "replay", "ingest-file", "defiwatch run"):
        assert word in result.stdout


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"DEFIWATCH_API_PORT": "eighty"}, "DEFIWATCH_API_PORT"),
        ({"DEFIWATCH_DATABASE_URL": "mysql://x"}, "DEFIWATCH_DATABASE_URL"),
        ({"DEFIWATCH_REDIS_URL": "http://localhost"}, "DEFIWATCH_REDIS_URL"),
        ({"DEFIWATCH_LOG_FORMAT": "xml"}, "DEFIWATCH_LOG_FORMAT"),
    ],
)
def test_a_bad_setting_stops_with_one_line_naming_it(
    tmp_path: Path, env: dict[str, str], name: str
) -> None:
    result = cli("keys", "list", cwd=tmp_path, env=env)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert name in lines[0]


def test_a_bad_toml_setting_is_named_too(tmp_path: Path) -> None:
    (tmp_path / "defiwatch.toml").write_text("stream_retention = 5\n")
    result = cli("keys", "list", cwd=tmp_path)
    assert result.returncode == 2
    assert "DEFIWATCH_STREAM_RETENTION" in result.stderr


def test_keys_create_list_revoke(tmp_path: Path) -> None:
    created = cli("keys", "create", "--user", "alice", "--tier", "pro", "--scopes", "read,ingest",
                  cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("dw_") and "not shown again" in created.stderr
    prefix = key.split("_")[1]
    listed = cli("keys", "list", cwd=tmp_path)
    assert prefix in listed.stdout and "alice" in listed.stdout and key not in listed.stdout
    assert "active" in listed.stdout
    assert cli("keys", "revoke", prefix, cwd=tmp_path).returncode == 0
    assert "revoked" in cli("keys", "list", cwd=tmp_path).stdout
    again = cli("keys", "revoke", prefix, cwd=tmp_path)
    assert again.returncode == 2 and "no active key" in again.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--tier", "gold"), "unknown tier"),
        (("--scopes", "read,launch"), "unknown scope"),
    ],
)
def test_keys_create_refuses_bad_input(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    result = cli("keys", "create", "--user", "bob", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr


def test_ingest_file_reports_accepted_duplicates_and_rejections(tmp_path: Path) -> None:
    data = tmp_path / "points.csv"
    data.write_text(
        "metric,subject,chain,ts,value\n"
        "tvl,aave,ethereum,1710115200,1000000000\n"
        "tvl,aave,ethereum,1710118800,1010000000\n"
        "tvl,aave,ethereum,1710118800,1010000000\n"
        "volume,aave,ethereum,1710118800,5\n"
    )
    result = cli("ingest-file", str(data), cwd=tmp_path)
    assert result.returncode == 1  # something was rejected
    assert "2 accepted, 1 duplicates, 1 rejected" in result.stderr
    assert "record 4: metric" in result.stderr
    lines = tmp_path / "points.jsonl"
    lines.write_text('{"metric": "price", "subject": "ethereum", "ts": 1710115200, "value": 3900}\n')
    result = cli("ingest-file", str(lines), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "1 accepted" in result.stderr


def test_replay_command_loads_a_window_of_real_data(tmp_path: Path) -> None:
    result = cli("replay", "--sources", "coinbase_daily_eth_btc.jsonl.gz", "--from", "2024-01-01",
                 "--until", "2024-02-01", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "accepted=62" in result.stderr  # 31 days x ETH and BTC closes
    bad = cli("replay", "--from", "January", cwd=tmp_path)
    assert bad.returncode == 2 and "not a date" in bad.stderr


@pytest.mark.parametrize(
    ("roles", "setting"),
    [(("api",), "DEFIWATCH_API_PORT or --port"), (("gateway",), "DEFIWATCH_GATEWAY_PORT")],
)
def test_run_on_a_port_in_use_stops_with_one_line_before_the_banner(
    tmp_path: Path, roles: tuple[str, ...], setting: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("run", *roles, cwd=tmp_path, env={
            "DEFIWATCH_API_PORT": str(port), "DEFIWATCH_GATEWAY_PORT": str(port),
            "DEFIWATCH_SOCKETIO_PORT": "0", "DEFIWATCH_OPS_PORT": "0"})
    assert result.returncode == 2
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert lines == [f"defiwatch: port {port} is in use: set {setting}"]


async def relay_to_postgres(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One client connection of a loopback TCP relay to the test PostgreSQL."""
    upstream_reader, upstream_writer = await asyncio.open_connection(PG_HOST, PG_PORT)

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65_536):
                dst.write(data)
                await dst.drain()
        finally:
            dst.close()

    await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer),
                         return_exceptions=True)


async def test_run_waits_for_a_database_that_starts_later(
    tmp_path: Path, postgres_url: str, timeout_factor: float
) -> None:
    # The relay's port stands in for a PostgreSQL that is down when `run replay` starts.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = postgres_url.replace(f"@{PG_HOST}:{PG_PORT}/", f"@127.0.0.1:{port}/")
    base = {k: v for k, v in os.environ.items() if not k.startswith("DEFIWATCH_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "defiwatch", "run", "replay", cwd=tmp_path,
        env={**base, "DEFIWATCH_DATABASE_URL": url, "DEFIWATCH_OPS_PORT": "0",
             "DEFIWATCH_REPLAY_FROM": "2025-12-18", "DEFIWATCH_REPLAY_SPEED": "0"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None
    stdout, seen = proc.stdout, list[str]()

    async def until(marker: str) -> str:
        """The first output line holding `marker`."""
        while marker not in (line := (await stdout.readline()).decode()):
            assert line, "".join(seen)  # the process ended first
            seen.append(line)
        return line

    try:
        async with asyncio.timeout(60 * timeout_factor):
            # Waited for, with the error's own text in the log.
            assert "Connect call failed" in await until("database.unreachable")
            relay = await asyncio.start_server(relay_to_postgres, "127.0.0.1", port)
            async with relay:
                await until("replay.finished")
                assert await proc.wait() == 0  # the finite role ended: the process with it
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
