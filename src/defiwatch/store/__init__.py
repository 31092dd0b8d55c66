"""The source of truth: schema, migrations and repositories (SQLite embedded, PostgreSQL in production)."""

from defiwatch.store.db import create_engine, is_postgres
from defiwatch.store.migrate import upgrade

__all__ = ["create_engine", "is_postgres", "upgrade"]
