"""Apply Alembic migrations programmatically (`defiwatch db upgrade`, and `run` on start)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config

__all__ = ["alembic_config", "upgrade"]

_MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def _upgrade_sync(database_url: str, revision: str) -> None:
    command.upgrade(alembic_config(database_url), revision)


async def upgrade(database_url: str, revision: str = "heads") -> None:
    """Bring the database to `revision` (default: every head, so independent migration
    branches all apply). Runs in a thread: env.py drives its own event loop."""
    await asyncio.to_thread(_upgrade_sync, database_url, revision)
