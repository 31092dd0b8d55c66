"""Shared fixtures: real PostgreSQL and Redis on loopback, isolated per test.

Locally a missing service skips the tests that need it, with the reason; in CI (`CI=true`) a
missing service fails them, so a green CI run always exercised both deployments. The raw real
captures (`../shared/defi-data`, next to the repository) are treated the same way.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from defiwatch.config import Settings

PG_HOST = os.environ.get("DEFIWATCH_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("DEFIWATCH_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("DEFIWATCH_TEST_PG_USER", "postgres")
PG_ADMIN_DB = os.environ.get("DEFIWATCH_TEST_PG_DB", "test")
REDIS_URL = os.environ.get("DEFIWATCH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# The raw captures the bundled demo data is built from (see its SOURCES.md).
REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "defi-data"

# Scale for the few timeouts tests wait on (slow machines set e.g. 3).
TIMEOUT_FACTOR = float(os.environ.get("DEFIWATCH_TEST_TIMEOUT_FACTOR", "1"))


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_service(name: str, host: str, port: int) -> None:
    """Skip (locally) or fail (CI) when a service the test needs is not listening."""
    if _reachable(host, port):
        return
    reason = f"{name} is not reachable on {host}:{port}"
    if _in_ci():
        pytest.fail(f"{reason}; CI must run every backend (.ci/run starts it)")
    pytest.skip(f"{reason}; start it to run this test")


def require_real_data(relative: str = "") -> Path:
    """The path of a raw real capture under REAL_DATA (the folder itself by default).

    Skips locally when it is missing, with the reason; fails in CI (`CI=true`), where those
    tests must run: a green CI run has checked the bundled data against the captures.
    """
    path = REAL_DATA / relative
    if path.exists():
        return path
    reason = f"real capture not found at {path} (see shared/defi-data/SOURCES.md)"
    if _in_ci():
        pytest.fail(f"{reason}; CI must provide ../shared/defi-data next to the repository")
    pytest.skip(reason)


def pg_url(database: str) -> str:
    return f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"


async def _pg_admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=PG_ADMIN_DB)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    require_service("PostgreSQL", PG_HOST, PG_PORT)
    name = f"dw_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield pg_url(name)
    finally:
        asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def redis_url() -> str:
    require_service("Redis", *_redis_host_port())
    return REDIS_URL


def _redis_host_port() -> tuple[str, int]:
    rest = REDIS_URL.split("://", 1)[1].split("/", 1)[0]
    host, _, port = rest.rpartition(":")
    return host or "127.0.0.1", int(port or 6379)


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A unique key prefix for one test; its keys are deleted afterwards."""
    from stream.redis_loss import delete_prefix

    prefix = f"dwtest:{uuid.uuid4().hex[:12]}:"
    yield prefix
    delete_prefix(redis_url, prefix)


@pytest.fixture
def sqlite_url(tmp_path: os.PathLike[str]) -> str:
    return f"sqlite+aiosqlite:///{tmp_path}/defiwatch.db"


@pytest.fixture(params=["embedded", "production"])
def settings(request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> Settings:
    """Settings for both deployments: SQLite + in-process, and PostgreSQL + Redis."""
    from defiwatch.config import Settings

    common = {"state_dir": tmp_path, "replay_enabled": False, "demo_key": False,
              "processor_poll_s": 0.2}
    if request.param == "embedded":
        return Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/defiwatch.db", **common)
    return Settings(
        database_url=request.getfixturevalue("postgres_url"),
        redis_url=request.getfixturevalue("redis_url"),
        redis_prefix=request.getfixturevalue("redis_prefix"),
        **common,
    )


@pytest.fixture
def timeout_factor() -> float:
    """Multiply the few timeouts tests wait on by this (DEFIWATCH_TEST_TIMEOUT_FACTOR)."""
    return TIMEOUT_FACTOR
