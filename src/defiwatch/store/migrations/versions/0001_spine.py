"""The spine: protocols, points, change_log (+ capture triggers), cursors, users, api_keys.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer, "sqlite")

# SQLite has one writer at a time, so change_log ids are handed out in commit order and a row
# trigger is enough. The float clock is julianday-based because unixepoch() needs SQLite 3.38.
SQLITE_TRIGGER = """
CREATE TRIGGER points_change_log AFTER INSERT ON points
BEGIN
  INSERT INTO change_log (kind, point_id, metric, subject, chain, ts, value, source, created_at)
  VALUES ('point', NEW.id, NEW.metric, NEW.subject, NEW.chain, NEW.ts, NEW.value, NEW.source,
          (julianday('now') - 2440587.5) * 86400.0);
END
"""

# PostgreSQL: one statement-level trigger per INSERT (transition table), so a 5,000-row batch
# costs one INSERT ... SELECT, not 5,000 trigger calls. NOTIFY is only a wake-up hint (identical
# payloads in one transaction are folded into one); the processor reads change_log by cursor.
PG_FUNCTION = """
CREATE FUNCTION defiwatch_points_change_log() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE n bigint;
BEGIN
  INSERT INTO change_log (kind, point_id, metric, subject, chain, ts, value, source, created_at)
  SELECT 'point', id, metric, subject, chain, ts, value, source,
         extract(epoch from clock_timestamp())
  FROM new_points ORDER BY id;
  GET DIAGNOSTICS n = ROW_COUNT;
  IF n > 0 THEN
    PERFORM pg_notify('defiwatch_change_log', '');
  END IF;
  RETURN NULL;
END
$$
"""
PG_TRIGGER = """
CREATE TRIGGER points_change_log AFTER INSERT ON points
REFERENCING NEW TABLE AS new_points
FOR EACH STATEMENT EXECUTE FUNCTION defiwatch_points_change_log()
"""
PG_PROTOCOL_NOTIFY = """
CREATE FUNCTION defiwatch_change_log_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('defiwatch_change_log', '');
  RETURN NULL;
END
$$
"""
PG_PROTOCOL_TRIGGER = """
CREATE TRIGGER change_log_protocol_notify AFTER INSERT ON change_log
FOR EACH ROW WHEN (NEW.kind <> 'point') EXECUTE FUNCTION defiwatch_change_log_notify()
"""


def upgrade() -> None:
    op.create_table(
        "protocols",
        sa.Column("slug", sa.String(120), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("category", sa.String(80)),
        sa.Column("chains", sa.JSON, nullable=False),
        sa.Column("gecko_id", sa.String(120)),
        sa.Column("symbol", sa.String(40)),
        sa.Column("url", sa.String(400)),
        sa.Column("listed_at", sa.BigInteger),
        sa.Column("first_seen", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "points",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("metric", sa.String(40), nullable=False),
        sa.Column("subject", sa.String(160), nullable=False),
        sa.Column("chain", sa.String(120), nullable=False),
        sa.Column("ts", sa.BigInteger, nullable=False),
        sa.Column("value", sa.Double, nullable=False),
        sa.Column("source", sa.String(40), nullable=False),
        sa.UniqueConstraint("metric", "subject", "chain", "ts", name="uq_points_series_ts"),
    )
    op.create_index("ix_points_ts", "points", ["ts"])
    op.create_table(
        "change_log",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("point_id", sa.BigInteger),
        sa.Column("metric", sa.String(40), nullable=False),
        sa.Column("subject", sa.String(160), nullable=False),
        sa.Column("chain", sa.String(120), nullable=False),
        sa.Column("ts", sa.BigInteger, nullable=False),
        sa.Column("value", sa.Double),
        sa.Column("source", sa.String(40), nullable=False),
        sa.Column("detail", sa.JSON),
        sa.Column("created_at", sa.Double, nullable=False),
    )
    op.create_table(
        "processor_cursors",
        sa.Column("name", sa.String(60), primary_key=True),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.Column("position_id", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
    )
    op.create_table(
        "users",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(120), nullable=False, unique=True),
        sa.Column("tier", sa.String(40), nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.BigInteger,
                  sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("prefix", sa.String(24), nullable=False, unique=True),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("name", sa.String(120), nullable=False),
        sa.Column("scopes", sa.String(200), nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("revoked_at", sa.Double),
        sa.Column("last_used_at", sa.Double),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE change_log ADD COLUMN txid xid8 NOT NULL DEFAULT pg_current_xact_id()")
        op.create_index("ix_change_log_txid_id", "change_log", ["txid", "id"])
        op.execute(PG_FUNCTION)
        op.execute(PG_TRIGGER)
        op.execute(PG_PROTOCOL_NOTIFY)
        op.execute(PG_PROTOCOL_TRIGGER)
    else:
        op.execute(SQLITE_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS points_change_log ON points")
        op.execute("DROP TRIGGER IF EXISTS change_log_protocol_notify ON change_log")
        op.execute("DROP FUNCTION IF EXISTS defiwatch_points_change_log()")
        op.execute("DROP FUNCTION IF EXISTS defiwatch_change_log_notify()")
    else:
        op.execute("DROP TRIGGER IF EXISTS points_change_log")
    for table in ("api_keys", "users", "processor_cursors", "change_log", "points", "protocols"):
        op.drop_table(table)
