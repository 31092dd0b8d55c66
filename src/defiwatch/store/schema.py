"""The schema as SQLAlchemy Core tables; migrations/ create it, repositories query it.

Table names are those users of the original product know (`users`, `api_keys`, ...).
Timestamps of observations are integer epoch seconds (portable bucketing); bookkeeping times are
float epoch seconds.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

__all__ = ["api_keys", "change_log", "metadata", "points", "processor_cursors", "protocols",
           "query_latest", "query_refresh", "query_snapshot", "users"]

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

# Query read model (migration 0003, maintained by query/index.py from change_log, never by
# ingest): the newest point of every series, and per protocol its total TVL, windowed changes
# and token market cap. `query_refresh` holds how far change_log has been applied.
query_latest = Table(
    "query_latest",
    metadata,
    Column("metric", String(40), primary_key=True),
    Column("subject", String(160), primary_key=True),
    Column("chain", String(120), primary_key=True),
    Column("ts", BigInteger, nullable=False),
    Column("value", Double, nullable=False),
)

query_snapshot = Table(
    "query_snapshot",
    metadata,
    Column("slug", String(160), primary_key=True),
    Column("tvl", Double),
    Column("tvl_ts", BigInteger),
    Column("change_1h", Double),
    Column("change_24h", Double),
    Column("change_7d", Double),
    Column("mcap", Double),
    Column("mcap_ts", BigInteger),
)

query_refresh = Table(
    "query_refresh",
    metadata,
    Column("name", String(40), primary_key=True),
    Column("watermark", Text),  # SQLite: change_log id; PostgreSQL: pg_snapshot text; NULL: never
    Column("locked_at", Double, nullable=False),
    Column("refreshed_at", Double, nullable=False),
)


# --- alerts (migration 0002; store/alerts.py) ---------------------------------------------------

# Rules are soft-deleted (`deleted_at`) so that the alert engine, which follows `revision`, sees
# deletions like any other change. `watch` lists the series keys the condition names, space
# separated with a leading and trailing space, for the API's filters (LIKE '% key %').
alert_rules = Table(
    "alert_rules",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("user_id", BigInteger, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(120), nullable=False),
    Column("description", String(1000)),
    Column("condition", JSON, nullable=False),
    Column("channels", JSON, nullable=False),
    Column("for_seconds", Double, nullable=False),
    Column("throttle_minutes", Double, nullable=False),
    Column("repeat_minutes", Double),
    Column("notify_on_resolve", Boolean, nullable=False),
    Column("severity", String(16), nullable=False),
    Column("paused", Boolean, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("watch", String(4000), nullable=False),
    Column("revision", BigInteger, nullable=False),
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
    Column("deleted_at", Double),
    Index("ix_alert_rules_user_id", "user_id", "id"),
    Index("ix_alert_rules_revision", "revision"),
)

# One row (id 1): the revision of the newest rule change. Every rule write increments it in its
# own transaction, which also serialises rule writers (tier limits cannot be raced past).
alert_rule_revision = Table(
    "alert_rule_revision",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("revision", BigInteger, nullable=False),
)

# The lifecycle state of each alert instance (alerts/lifecycle.py InstanceState as JSON).
# `series` is how the engine finds the rows an event can touch: the instance's series for a
# wildcard rule and for a rule on one series, '' for a rule on several series (found by id).
alert_states = Table(
    "alert_states",
    metadata,
    Column("rule_id", BigInteger, ForeignKey("alert_rules.id", ondelete="CASCADE"),
           primary_key=True),
    Column("instance", String(400), primary_key=True),
    Column("series", String(400), nullable=False),
    Column("phase", String(16), nullable=False),
    Column("state", JSON, nullable=False),
    Column("due_at", Double),
    Column("updated_at", Double, nullable=False),
    Index("ix_alert_states_series", "series"),
    Index("ix_alert_states_due_at", "due_at"),
)

# Per series, the newest observation the alert engine applied: its ts (an older event of the
# series arriving later, at another worker of the consumer group, is skipped instead of applied
# out of order) and its measures ({"0": value, "3600": change_1h, ...}): the rule index looks up
# the comparisons that flip between these and the next event's (alerts/index.py).
alert_series = Table(
    "alert_series",
    metadata,
    Column("series", String(400), primary_key=True),
    Column("last_ts", BigInteger, nullable=False),
    Column("measures", JSON),
    Column("updated_at", Double, nullable=False),
)

# Per consumer group, the newest stream entry whose outcome the alert engine committed, with the
# stream's epoch (one life of the stream): a group Redis lost is recreated after it, or at the
# start of a stream that was lost too, instead of at the newest entry (stream/group.py).
stream_group_positions = Table(
    "stream_group_positions",
    metadata,
    Column("group_name", String(120), primary_key=True),
    Column("epoch", String(64), nullable=False),
    Column("last_offset", BigInteger, nullable=False),
    Column("updated_at", Double, nullable=False),
)

# One row per fired alert (episode); a resolve updates it. `dedup_key` (rule, instance,
# triggering series and observation ts) makes a replayed transition a no-op.
alert_history = Table(
    "alert_history",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("rule_id", BigInteger, ForeignKey("alert_rules.id", ondelete="SET NULL")),
    Column("user_id", BigInteger, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("rule_name", String(120), nullable=False),
    Column("severity", String(16), nullable=False),
    Column("instance", String(400), nullable=False),
    Column("metric", String(40), nullable=False),
    Column("subject", String(160), nullable=False),
    Column("chain", String(120), nullable=False),
    Column("state", String(16), nullable=False),
    Column("reason", String(40), nullable=False),
    Column("suppressed", String(40)),
    Column("value", Double),
    Column("event", JSON),
    Column("fired_at", Double, nullable=False),
    Column("resolved_at", Double),
    Column("resolve_reason", String(40)),
    Column("resolved_event", JSON),
    Column("acked_at", Double),
    Column("acked_by", String(120)),
    Column("snoozed_until", Double),
    Column("dedup_key", String(1000), nullable=False),
    Column("updated_at", Double, nullable=False),
    UniqueConstraint("dedup_key", name="uq_alert_history_dedup_key"),
    Index("ix_alert_history_user_id", "user_id", "id"),
    Index("ix_alert_history_rule_id", "rule_id", "id"),
)

# The notification outbox: one row per (alert, kind, repeat number, channel target). The alert
# engine writes rows `pending` with attempt 0; notifiers claim them (status `sending`, a lease
# until `lease_until`, one `notification_attempts` row per try) and settle them: `delivered`,
# `dead` (gave up), back to `pending` for a retry at `next_attempt_at`, `held` (throttled or
# quiet hours), `digested` into the digest row `parent_id`, or `expanded` (a push to every
# device, split into one row per device). `host` is the receiving host (breaker and per-host
# concurrency); `retry_from` the attempt a redelivery restarted the retry budget at;
# `dispatched_at` the first claim (per-user throttling counts these).
notification_logs = Table(
    "notification_logs",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("alert_id", BigInteger, ForeignKey("alert_history.id", ondelete="CASCADE")),
    Column("user_id", BigInteger, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("rule_id", BigInteger),
    Column("kind", String(16), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("channel", String(16), nullable=False),
    Column("target", String(2000), nullable=False),
    Column("config", JSON, nullable=False),
    Column("payload", JSON, nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("next_attempt_at", Double, nullable=False),
    Column("last_error", String(2000)),
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
    Column("sent_at", Double),
    Column("host", String(300), nullable=False, server_default=""),
    Column("claimed_by", String(120)),
    Column("lease_until", Double),
    Column("retry_from", Integer, nullable=False, server_default="0"),
    Column("dispatched_at", Double),
    Column("parent_id", BigInteger),
    Column("response_code", Integer),
    UniqueConstraint("alert_id", "kind", "seq", "channel", "target",
                     name="uq_notification_logs_target"),
    Index("ix_notification_logs_status_due", "status", "next_attempt_at"),
    Index("ix_notification_logs_alert_id", "alert_id"),
    Index("ix_notification_logs_user_id", "user_id", "id"),
    Index("ix_notification_logs_dispatched", "user_id", "channel", "dispatched_at"),
    Index("ix_notification_logs_parent_id", "parent_id"),
)

# --- delivery (migration 0004; store/delivery.py) -----------------------------------------------

# One row per delivery attempt: `sending` while in flight, then `delivered`, `failed` (a retry
# follows) or `dead` (the last one). A worker killed mid-send leaves `sending`; the next claim
# of the notification marks it `failed` ("worker lost").
notification_attempts = Table(
    "notification_attempts",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("notification_id", BigInteger, ForeignKey("notification_logs.id", ondelete="CASCADE"),
           nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("response_code", Integer),
    Column("error", String(2000)),
    Column("latency_ms", Double),
    Column("worker", String(120), nullable=False),
    Column("started_at", Double, nullable=False),
    Column("finished_at", Double),
    UniqueConstraint("notification_id", "attempt", name="uq_notification_attempts"),
)

# A user's delivery endpoint (webhook URL, chat URL, email address): webhook signing secrets
# (`[{"secret": "whsec_...", "expires_at": null | epoch}]`, current first), and the failure
# clock that disables it after continuous failure.
notification_endpoints = Table(
    "notification_endpoints",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("user_id", BigInteger, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("channel", String(16), nullable=False),
    Column("target", String(2000), nullable=False),
    Column("secrets", JSON, nullable=False),
    Column("failing_since", Double),
    Column("last_error", String(2000)),
    Column("disabled_at", Double),
    Column("disabled_reason", String(400)),
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
    UniqueConstraint("user_id", "channel", "target", name="uq_notification_endpoints"),
)

# Web Push subscriptions (`PushSubscription.toJSON()`), named per user by `device`.
user_devices = Table(
    "user_devices",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("user_id", BigInteger, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("device", String(120), nullable=False),
    Column("endpoint", String(2000), nullable=False),
    Column("p256dh", String(200), nullable=False),
    Column("auth", String(100), nullable=False),
    Column("user_agent", String(300)),
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
    Column("disabled_at", Double),
    Column("disabled_reason", String(400)),
    UniqueConstraint("user_id", "device", name="uq_user_devices"),
)

# Per-user delivery preferences; a user without a row gets the settings' defaults. Quiet hours
# are local wall-clock "HH:MM" in `timezone` (IANA); `max_per_minute` is {channel: n}.
notification_preferences = Table(
    "notification_preferences",
    metadata,
    Column("user_id", BigInteger, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("timezone", String(64), nullable=False),
    Column("quiet_start", String(5)),
    Column("quiet_end", String(5)),
    Column("quiet_allow_critical", Boolean, nullable=False),
    Column("max_per_minute", JSON, nullable=False),
    Column("updated_at", Double, nullable=False),
)

# Alert events committed with their transition but not yet on the alerts stream (transactional
# outbox): published right after the commit, or by any engine's sweep if that worker died first.
alert_stream_outbox = Table(
    "alert_stream_outbox",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("payload", JSON, nullable=False),
    Column("created_at", Double, nullable=False),
)
