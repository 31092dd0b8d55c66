"""Notification delivery: claims and leases on the outbox, one row per attempt, endpoints (with
webhook secrets and the disabled switch), push devices and per-user delivery preferences.

Revision ID: 0004
Revises: 0002

`notification_logs` stays the outbox (one row per notification); its `alert_id` becomes
nullable for notifications that are not about one alert (tests, digests). What happened on each
try is in `notification_attempts`.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0002"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("notification_logs") as batch:
        batch.alter_column("alert_id", existing_type=sa.BigInteger, nullable=True)
        batch.add_column(sa.Column("host", sa.String(300), nullable=False, server_default=""))
        batch.add_column(sa.Column("claimed_by", sa.String(120)))
        batch.add_column(sa.Column("lease_until", sa.Double))
        batch.add_column(sa.Column("retry_from", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("dispatched_at", sa.Double))
        batch.add_column(sa.Column("parent_id", sa.BigInteger))
        batch.add_column(sa.Column("response_code", sa.Integer))
    op.create_index("ix_notification_logs_user_id", "notification_logs", ["user_id", "id"])
    op.create_index("ix_notification_logs_dispatched", "notification_logs",
                    ["user_id", "channel", "dispatched_at"])
    op.create_index("ix_notification_logs_parent_id", "notification_logs", ["parent_id"])
    op.create_table(
        "notification_attempts",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("notification_id", sa.BigInteger,
                  sa.ForeignKey("notification_logs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("response_code", sa.Integer),
        sa.Column("error", sa.String(2000)),
        sa.Column("latency_ms", sa.Double),
        sa.Column("worker", sa.String(120), nullable=False),
        sa.Column("started_at", sa.Double, nullable=False),
        sa.Column("finished_at", sa.Double),
        sa.UniqueConstraint("notification_id", "attempt", name="uq_notification_attempts"),
    )
    op.create_table(
        "notification_endpoints",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.BigInteger, sa.ForeignKey("users.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("target", sa.String(2000), nullable=False),
        sa.Column("secrets", sa.JSON, nullable=False),
        sa.Column("failing_since", sa.Double),
        sa.Column("last_error", sa.String(2000)),
        sa.Column("disabled_at", sa.Double),
        sa.Column("disabled_reason", sa.String(400)),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.UniqueConstraint("user_id", "channel", "target", name="uq_notification_endpoints"),
    )
    op.create_table(
        "user_devices",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.BigInteger, sa.ForeignKey("users.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("device", sa.String(120), nullable=False),
        sa.Column("endpoint", sa.String(2000), nullable=False),
        sa.Column("p256dh", sa.String(200), nullable=False),
        sa.Column("auth", sa.String(100), nullable=False),
        sa.Column("user_agent", sa.String(300)),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.Column("disabled_at", sa.Double),
        sa.Column("disabled_reason", sa.String(400)),
        sa.UniqueConstraint("user_id", "device", name="uq_user_devices"),
    )
    op.create_table(
        "notification_preferences",
        sa.Column("user_id", sa.BigInteger, sa.ForeignKey("users.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("timezone", sa.String(64), nullable=False),
        sa.Column("quiet_start", sa.String(5)),
        sa.Column("quiet_end", sa.String(5)),
        sa.Column("quiet_allow_critical", sa.Boolean, nullable=False),
        sa.Column("max_per_minute", sa.JSON, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
    )


def downgrade() -> None:
    for table in ("notification_preferences", "user_devices", "notification_endpoints",
                  "notification_attempts"):
        op.drop_table(table)
    for index in ("ix_notification_logs_parent_id", "ix_notification_logs_dispatched",
                  "ix_notification_logs_user_id"):
        op.drop_index(index, table_name="notification_logs")
    with op.batch_alter_table("notification_logs") as batch:
        for column in ("response_code", "parent_id", "dispatched_at", "retry_from",
                       "lease_until", "claimed_by", "host"):
            batch.drop_column(column)
        batch.alter_column("alert_id", existing_type=sa.BigInteger, nullable=False)
