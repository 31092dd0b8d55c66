"""The stream position the alert engine committed, per consumer group.

Revision ID: 0005
Revises: 0004

A worker started after Redis lost its data finds its consumer group gone; it recreates it after
this position (same stream epoch) or at the start of the new stream (another epoch), so the
events published while no worker ran are still evaluated.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stream_group_positions",
        sa.Column("group_name", sa.String(120), primary_key=True),
        sa.Column("epoch", sa.String(64), nullable=False),
        sa.Column("last_offset", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("stream_group_positions")
