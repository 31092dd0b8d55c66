"""The schema as SQLAlchemy Core tables; migrations/ create it, repositories query it.

Table names are those users of the original product know (`users`, `api_keys`, ...).
Timestamps of observations are integer epoch seconds (portable bucketing); bookkeeping times are
float epoch seconds.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
)

__all__ = ["api_keys", "change_log", "metadata", "points", "processor_cursors", "protocols", "users"]

metadata = MetaData()

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
Id = BigInteger().with_variant(Integer, "sqlite")

protocols = Table(
    "protocols",
    metadata,
    Column("slug", String(120), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("category", String(80)),
    Column("chains", JSON, nullable=False),
    Column("gecko_id", String(120)),
    Column("symbol", String(40)),
    Column("url", String(400)),
    Column("listed_at", BigInteger),
    Column("first_seen", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)

points = Table(
    "points",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("metric", String(40), nullable=False),
    Column("subject", String(160), nullable=False),
    Column("chain", String(120), nullable=False),
    Column("ts", BigInteger, nullable=False),
    Column("value", Double, nullable=False),
    Column("source", String(40), nullable=False),
    UniqueConstraint("metric", "subject", "chain", "ts", name="uq_points_series_ts"),
    Index("ix_points_ts", "ts"),
)

# Written by a trigger on `points` (kind='point') in the inserting transaction, and by the ingest
# service for protocol metadata changes (kind='protocol'). On PostgreSQL the migration adds
# `txid xid8` (the writing transaction), which the processor's cursor follows; see
# store/changelog.py for why an id alone is not a safe cursor there.
change_log = Table(
    "change_log",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),
    Column("point_id", BigInteger),
    Column("metric", String(40), nullable=False),
    Column("subject", String(160), nullable=False),
    Column("chain", String(120), nullable=False),
    Column("ts", BigInteger, nullable=False),
    Column("value", Double),
    Column("source", String(40), nullable=False),
    Column("detail", JSON),
    Column("created_at", Double, nullable=False),
)

processor_cursors = Table(
    "processor_cursors",
    metadata,
    Column("name", String(60), primary_key=True),
    Column("position", BigInteger, nullable=False),
    Column("position_id", BigInteger, nullable=False),
    Column("updated_at", Double, nullable=False),
)

users = Table(
    "users",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("name", String(120), nullable=False, unique=True),
    Column("tier", String(40), nullable=False),
    Column("created_at", Double, nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("user_id", BigInteger, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("prefix", String(24), nullable=False, unique=True),
    Column("key_hash", String(64), nullable=False),
    Column("name", String(120), nullable=False),
    Column("scopes", String(200), nullable=False),
    Column("created_at", Double, nullable=False),
    Column("revoked_at", Double),
    Column("last_used_at", Double),
)
