"""Alerts: rules (with a revision counter), instance states, series cursors, history, the
notification outbox and the alerts-stream outbox.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "alert_rules",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.BigInteger, sa.ForeignKey("users.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("name", sa.String(120), nullable=False),
        sa.Column("description", sa.String(1000)),
        sa.Column("condition", sa.JSON, nullable=False),
        sa.Column("channels", sa.JSON, nullable=False),
        sa.Column("for_seconds", sa.Double, nullable=False),
        sa.Column("throttle_minutes", sa.Double, nullable=False),
        sa.Column("repeat_minutes", sa.Double),
        sa.Column("notify_on_resolve", sa.Boolean, nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("paused", sa.Boolean, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("watch", sa.String(4000), nullable=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.Column("deleted_at", sa.Double),
    )
    op.create_index("ix_alert_rules_user_id", "alert_rules", ["user_id", "id"])
    op.create_index("ix_alert_rules_revision", "alert_rules", ["revision"])
    revisions = op.create_table(
        "alert_rule_revision",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("revision", sa.BigInteger, nullable=False),
    )
    op.bulk_insert(revisions, [{"id": 1, "revision": 0}])
    op.create_table(
        "alert_states",
        sa.Column("rule_id", sa.BigInteger, sa.ForeignKey("alert_rules.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("instance", sa.String(400), primary_key=True),
        sa.Column("series", sa.String(400), nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("state", sa.JSON, nullable=False),
        sa.Column("due_at", sa.Double),
        sa.Column("updated_at", sa.Double, nullable=False),
    )
    op.create_index("ix_alert_states_series", "alert_states", ["series"])
    op.create_index("ix_alert_states_due_at", "alert_states", ["due_at"])
    op.create_table(
        "alert_series",
        sa.Column("series", sa.String(400), primary_key=True),
        sa.Column("last_ts", sa.BigInteger, nullable=False),
        sa.Column("measures", sa.JSON),
        sa.Column("updated_at", sa.Double, nullable=False),
    )
    op.create_table(
        "alert_history",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("rule_id", sa.BigInteger, sa.ForeignKey("alert_rules.id", ondelete="SET NULL")),
        sa.Column("user_id", sa.BigInteger, sa.ForeignKey("users.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("rule_name", sa.String(120), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("instance", sa.String(400), nullable=False),
        sa.Column("metric", sa.String(40), nullable=False),
        sa.Column("subject", sa.String(160), nullable=False),
        sa.Column("chain", sa.String(120), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(40), nullable=False),
        sa.Column("suppressed", sa.String(40)),
        sa.Column("value", sa.Double),
        sa.Column("event", sa.JSON),
        sa.Column("fired_at", sa.Double, nullable=False),
        sa.Column("resolved_at", sa.Double),
        sa.Column("resolve_reason", sa.String(40)),
        sa.Column("resolved_event", sa.JSON),
        sa.Column("acked_at", sa.Double),
        sa.Column("acked_by", sa.String(120)),
        sa.Column("snoozed_until", sa.Double),
        sa.Column("dedup_key", sa.String(1000), nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.UniqueConstraint("dedup_key", name="uq_alert_history_dedup_key"),
    )
    op.create_index("ix_alert_history_user_id", "alert_history", ["user_id", "id"])
    op.create_index("ix_alert_history_rule_id", "alert_history", ["rule_id", "id"])
    op.create_table(
        "notification_logs",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("alert_id", sa.BigInteger,
                  sa.ForeignKey("alert_history.id", ondelete="CASCADE"), nullable=False),
        sa.Column("user_id", sa.BigInteger, sa.ForeignKey("users.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("rule_id", sa.BigInteger),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("target", sa.String(2000), nullable=False),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.Double, nullable=False),
        sa.Column("last_error", sa.String(2000)),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.Column("sent_at", sa.Double),
        sa.UniqueConstraint("alert_id", "kind", "seq", "channel", "target",
                            name="uq_notification_logs_target"),
    )
    op.create_index("ix_notification_logs_status_due", "notification_logs",
                    ["status", "next_attempt_at"])
    op.create_index("ix_notification_logs_alert_id", "notification_logs", ["alert_id"])
    op.create_table(
        "alert_stream_outbox",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
    )


def downgrade() -> None:
    for table in ("alert_stream_outbox", "notification_logs", "alert_history", "alert_series",
                  "alert_states", "alert_rule_revision", "alert_rules"):
        op.drop_table(table)
