"""Query read model: newest point per series, per-protocol snapshot, refresh watermark.

Revision ID: 0003
Revises: 0001

An independent branch off the spine (`upgrade()` applies every head). These tables are a cache
of what `points`, `protocols` and `change_log` already hold: query/index.py fills them from
change_log on demand, and rebuilds them from scratch when they are empty or behind a pruned
change_log. Nothing writes them on the ingest path.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "query_latest",
        sa.Column("metric", sa.String(40), primary_key=True),
        sa.Column("subject", sa.String(160), primary_key=True),
        sa.Column("chain", sa.String(120), primary_key=True),
        sa.Column("ts", sa.BigInteger, nullable=False),
        sa.Column("value", sa.Double, nullable=False),
    )
    op.create_table(
        "query_snapshot",
        sa.Column("slug", sa.String(160), primary_key=True),
        sa.Column("tvl", sa.Double),
        sa.Column("tvl_ts", sa.BigInteger),
        sa.Column("change_1h", sa.Double),
        sa.Column("change_24h", sa.Double),
        sa.Column("change_7d", sa.Double),
        sa.Column("mcap", sa.Double),
        sa.Column("mcap_ts", sa.BigInteger),
    )
    refresh = op.create_table(
        "query_refresh",
        sa.Column("name", sa.String(40), primary_key=True),
        sa.Column("watermark", sa.Text),
        sa.Column("locked_at", sa.Double, nullable=False),
        sa.Column("refreshed_at", sa.Double, nullable=False),
    )
    op.bulk_insert(refresh, [{"name": "index", "watermark": None, "locked_at": 0.0,
                              "refreshed_at": 0.0}])


def downgrade() -> None:
    for table in ("query_refresh", "query_snapshot", "query_latest"):
        op.drop_table(table)
