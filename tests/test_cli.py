"""The `defiwatch` command line as a person uses it, run as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


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
