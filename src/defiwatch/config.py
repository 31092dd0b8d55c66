"""Settings: read once from `DEFIWATCH_*` environment variables and an optional `defiwatch.toml`.

Precedence: environment, then `defiwatch.toml` in the working directory (or the file named by
`DEFIWATCH_CONFIG`), then the defaults below. The defaults are the embedded deployment: SQLite
under `./var/`, in-process stream and cache. Setting `DEFIWATCH_DATABASE_URL` to PostgreSQL and
`DEFIWATCH_REDIS_URL` to Redis selects the production backends; nothing else changes.
"""

from __future__ import annotations

import os
from datetime import UTC, date, datetime
from email.utils import parseaddr
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from defiwatch.errors import ConfigError

__all__ = ["ROLES", "Settings", "TierLimits", "load_settings"]

ENV_PREFIX = "DEFIWATCH_"

# What `defiwatch run` can run in one process (app.py wires each).
ROLES = ("api", "processor", "gateway", "alerts", "notifier", "replay", "poller")


class TierLimits(BaseModel, frozen=True):
    """Limits of one API key tier. Counts are per key; rates per minute."""

    ws_connections: int = Field(ge=0)  # open WebSocket connections per key (per gateway node)
    ws_messages_per_minute: int = Field(ge=0)  # inbound WebSocket messages per connection
    # Subscriptions per WebSocket connection. A default keeps tier tables written before this
    # field valid; 0 means the key may connect but not subscribe.
    ws_subscriptions: int = Field(default=10, ge=0)
    api_requests_per_minute: int = Field(ge=0)
    alert_rules: int = Field(ge=0)


DEFAULT_TIERS = {
    "free": TierLimits(ws_connections=5, ws_messages_per_minute=100, ws_subscriptions=10,
                       api_requests_per_minute=60, alert_rules=5),
    "pro": TierLimits(ws_connections=50, ws_messages_per_minute=1_000, ws_subscriptions=100,
                      api_requests_per_minute=600, alert_rules=100),
    "enterprise": TierLimits(ws_connections=1_000, ws_messages_per_minute=10_000, ws_subscriptions=1_000,
                             api_requests_per_minute=6_000, alert_rules=1_000),
}


class Settings(BaseSettings):
    """Every knob of defiwatch. Units are in the names (`_s` seconds, `_pct` percent)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="forbid", env_nested_delimiter="__"
    )

    # Backends. sqlite+aiosqlite:///path or postgresql+asyncpg://user@host/db; redis://host:port/db.
    database_url: str = "sqlite+aiosqlite:///./var/defiwatch.db"
    redis_url: SecretStr | None = None
    redis_prefix: str = "dw:"  # every Redis key starts with this (lets tests and tenants share one)
    # Seconds one Redis call of an API request may take (rate limiter, result cache, latest
    # values, /v1/events, /readyz): a hung Redis then costs a request this much, not the
    # stream client's 35 s. Over it the limiter lets the request pass and caches count a miss.
    redis_request_timeout_s: float = Field(default=0.5, gt=0, le=30)

    # HTTP API.
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=0, le=65535)
    # Request body caps, bytes: larger bodies get 413 (at once when Content-Length says so,
    # else as soon as the streamed bytes cross the cap). The ingest routes have their own.
    api_max_body_bytes: int = Field(default=1_048_576, ge=1_024)
    api_max_ingest_body_bytes: int = Field(default=16_777_216, ge=1_024)

    # Event stream: how many events are retained for replay (approximate on Redis).
    stream_retention: int = Field(default=100_000, ge=100)

    # Processor: significance thresholds (None disables a bound) and batching.
    tvl_threshold_pct: float | None = Field(default=1.0, ge=0)
    tvl_threshold_abs: float | None = Field(default=10_000.0, ge=0)
    price_threshold_pct: float | None = Field(default=0.1, ge=0)
    price_threshold_abs: float | None = Field(default=None, ge=0)
    processor_batch: int = Field(default=5_000, ge=1, le=100_000)
    processor_poll_s: float = Field(default=1.0, gt=0)  # fallback when no wake-up arrives
    # Seconds between checks that the hot cache still holds its refill marker; a missing marker
    # (Redis lost its data) rebuilds the cache from the database (processor/fill.py).
    processor_cache_check_s: float = Field(default=5.0, gt=0)

    # Sources.
    defillama_api_url: str = "https://api.llama.fi"
    defillama_coins_url: str = "https://coins.llama.fi"
    poller_enabled: bool = False  # needs internet; `make run` replays bundled data instead
    poller_interval_s: float = Field(default=300.0, ge=1)
    poller_coins: list[str] = ["coingecko:ethereum", "coingecko:bitcoin"]
    replay_enabled: bool = True
    replay_speed: float = Field(default=86_400.0, ge=0)  # data seconds per wall second; 0 = max
    replay_loop: bool = False
    # Data window `run` replays: from 2020 both TVL and prices are dense, so a newcomer sees
    # both kinds of event within seconds. None = from the oldest (2013) / to the newest point.
    replay_from: date | None = date(2020, 1, 1)
    replay_until: date | None = None
    # Data before this date is loaded at full speed, later data paced by replay_speed, so the
    # first `run` has current values within seconds. None = 30 days before the newest data of
    # the window; set it to replay_from's date to pace the whole window.
    replay_backfill_until: date | None = None

    # WebSocket gateway (gateway/). Limits per node; tier limits per key come from `tiers`.
    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(default=8001, ge=0, le=65535)
    socketio_port: int = Field(default=8002, ge=0, le=65535)  # Socket.IO compatibility server
    gateway_tls_cert: Path | None = None  # PEM certificate chain; with gateway_tls_key enables wss
    gateway_tls_key: Path | None = None
    gateway_max_connections: int = Field(default=20_000, ge=1)  # per node
    gateway_connect_rate: float = Field(default=1_000.0, gt=0)  # new connections per second per node
    gateway_send_queue: int = Field(default=1_000, ge=10)  # frames buffered per connection
    gateway_ping_interval_s: float = Field(default=20.0, gt=0)
    gateway_ping_timeout_s: float = Field(default=20.0, gt=0)
    gateway_auth_timeout_s: float = Field(default=5.0, gt=0)  # for a first `auth` message
    gateway_key_cache_ttl_s: float = Field(default=60.0, ge=0)  # verified keys served from memory
    gateway_revalidate_s: float = Field(default=10.0, ge=0)  # revoked keys closed within this; 0 = never
    gateway_gc_freeze: bool = True  # freeze GC survivors (gateway/gcpolicy.py): no storm-long pauses
    # How long a closing connection waits for the client's close frame before dropping TCP
    # (a dead or stalled client never sends it).
    gateway_close_timeout_s: float = Field(default=5.0, gt=0)

    # Alert engine (alerts/).
    alerts_stream_retention: int = Field(default=100_000, ge=100)  # fired alerts kept for replay
    alerts_consumer_group: str = "alerts"  # Redis consumer group shared by alert workers
    alerts_batch: int = Field(default=1_000, ge=1)
    alerts_rule_refresh_s: float = Field(default=0.5, gt=0)  # rule changes visible within this
    alerts_default_throttle_minutes: float = Field(default=5.0, ge=0)
    alerts_claim_idle_s: float = Field(default=30.0, gt=0)  # reclaim a dead worker's entries after

    # Keys and tiers.
    tiers: dict[str, TierLimits] = DEFAULT_TIERS
    demo_key: bool = True  # `run` creates a demo key once, keeps it in state_dir, prints it
    state_dir: Path = Path("var")  # local state of the embedded deployment (demo key file)

    # Logging: "console" for people, "json" for machines.
    log_format: str = "console"
    log_level: str = "info"

    # Ops listener (ops/listener.py): /healthz, /readyz, /metrics of a role process.
    ops_enabled: bool = True
    ops_host: str = "127.0.0.1"
    # None: by the first role (processor 9101, gateway 9102, alerts 9103, notifier 9104,
    # poller 9105, replay 9106; none for api, which serves them itself); 0 = no listener.
    ops_port: int | None = Field(default=None, ge=0, le=65535)
    ops_stale_s: float = Field(default=30.0, gt=0)  # a role silent this long makes /readyz 503

    # Analytic queries (query/, POST /v1/query/advanced, DefiLlama-compatible routes).
    query_statement_timeout_ms: int = Field(default=5_000, ge=10)  # per statement; over = 400
    query_max_rows: int = Field(default=10_000, ge=1)  # rows per page: the ceiling of `limit`
    query_default_rows: int = Field(default=100, ge=1)  # `limit` when the request has none
    query_max_depth: int = Field(default=6, ge=1)  # nesting of and/or/not in where and having
    query_max_conditions: int = Field(default=64, ge=1)  # leaf conditions in where + having
    query_max_in_values: int = Field(default=1_000, ge=1)  # values in one in/nin list
    query_max_aggregations: int = Field(default=16, ge=1)
    query_max_group_by: int = Field(default=4, ge=1)  # group keys (fields and one time bucket)
    query_max_sort: int = Field(default=4, ge=1)  # sort keys
    query_max_body_bytes: int = Field(default=65_536, ge=1_024)  # request body of one query
    query_cache_ttl_s: float = Field(default=300.0, ge=0)  # result cache lifetime; 0 = no cache
    query_snapshot_ttl_s: float = Field(default=600.0, ge=0)  # pinned protocols pages; 0 = keyset only
    query_cache_max_entries: int = Field(default=10_000, ge=1)  # in-process result cache only
    # DefiLlama-compatible routes without a key (then rate-limited per client IP, free tier).
    query_compat_public: bool = False
    # Per-tier API rate limits (tiers.*.api_requests_per_minute); off only for local benchmarks.
    query_rate_limit_enabled: bool = True

    # Notification delivery (notify/): SMTP, Web Push, HTTP, SSRF allow-list, retries, breaker.
    notify_smtp_host: str = "localhost"
    notify_smtp_port: int | None = Field(default=None, ge=1, le=65535)  # None: 25/587/465 by mode
    notify_smtp_mode: Literal["plain", "starttls", "tls"] = "starttls"  # tls = implicit (465)
    notify_smtp_user: str | None = None  # no AUTH when None
    notify_smtp_password: SecretStr | None = None
    notify_smtp_from: str = "defiwatch <alerts@localhost>"  # From header; its domain ends Message-IDs
    notify_smtp_timeout_s: float = Field(default=30.0, gt=0)  # per SMTP command
    notify_smtp_ca_file: Path | None = None  # PEM bundle to trust a private relay; None = system
    # VAPID key (RFC 8292) for Web Push: a PEM or base64url raw private key, inline or in a file.
    # Neither set = push not configured (push notifications fail with reason not_configured).
    notify_vapid_private_key: SecretStr | None = None
    notify_vapid_private_key_file: Path | None = None
    notify_vapid_subject: str = "mailto:admin@localhost"  # contact for push services: mailto:/https:
    # How long a push service keeps a message for an offline device, seconds; 0 = now or never.
    notify_push_ttl_s: int = Field(default=86_400, ge=0, le=2_419_200)
    notify_webhook_timeout_s: float = Field(default=10.0, gt=0, le=120)  # one HTTP attempt, DNS to last byte
    # SSRF allow-list: CIDRs, addresses, host names, `*.suffix`; JSON list or comma-separated.
    # Empty = public addresses only. Cloud metadata addresses need an exact entry.
    notify_ssrf_allow: Annotated[list[str], NoDecode] = []
    notify_retry_max_attempts: int = Field(default=8, ge=1, le=100)  # attempts in all, first included
    notify_retry_base_delay_s: float = Field(default=10.0, ge=1)  # ceiling of the first wait
    notify_retry_max_delay_s: float = Field(default=36_000.0, ge=1)  # cap of any wait (and Retry-After)
    notify_breaker_failures: int = Field(default=5, ge=1)  # consecutive failures opening a host's circuit
    notify_breaker_open_s: float = Field(default=60.0, gt=0)  # first open interval
    notify_breaker_max_open_s: float = Field(default=1_800.0, gt=0)  # cap as failed probes double it
    # The notifier (notify/worker.py): how much it sends at once and how it claims work.
    notifier_concurrency: int = Field(default=256, ge=1)  # sends in flight per notifier
    notifier_per_host: int = Field(default=32, ge=1)  # of which to one receiving host (its pool size)
    notifier_batch: int = Field(default=200, ge=1, le=5_000)  # rows per claim
    notifier_lease_s: float = Field(default=60.0, gt=0)  # a claim not settled by then is retaken
    notifier_poll_s: float = Field(default=1.0, gt=0)  # claim at least this often (NOTIFY wakes sooner)
    notifier_id: str | None = None  # the worker's name in attempt rows; None: host:pid
    # Per user and channel, unless the user's preferences say otherwise. 0 = unlimited.
    notify_max_per_minute: int = Field(default=30, ge=0)
    # An endpoint failing without a single success for this long is disabled and its owner told.
    notify_disable_after_s: float = Field(default=3 * 86_400.0, gt=0)
    notify_secret_grace_s: float = Field(default=86_400.0, ge=0)  # old webhook secret signs this long

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, v: str) -> str:
        if not v.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://", "postgresql://",
                             "sqlite://")):
            raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        if v.startswith("postgresql://"):
            v = "postgresql+asyncpg://" + v.removeprefix("postgresql://")
        if v.startswith("sqlite://") and not v.startswith("sqlite+aiosqlite://"):
            v = "sqlite+aiosqlite://" + v.removeprefix("sqlite://")
        return v

    @field_validator("redis_url")
    @classmethod
    def _known_redis(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value():
            return None
        if v is not None and not v.get_secret_value().startswith(("redis://", "rediss://")):
            raise ValueError("must start with redis:// or rediss://")
        return v

    @field_validator("log_format")
    @classmethod
    def _known_format(cls, v: str) -> str:
        if v not in ("console", "json"):
            raise ValueError("must be 'console' or 'json'")
        return v

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, v: str) -> str:
        if v.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError("must be one of debug, info, warning, error")
        return v.lower()

    @field_validator("tiers", mode="before")
    @classmethod
    def _merge_tiers(cls, v: Any) -> Any:
        """Overrides merge into the defaults: DEFIWATCH_TIERS__PRO__ALERT_RULES=200 changes one
        limit of one tier and keeps the rest."""
        if not isinstance(v, dict):
            return v
        merged: dict[str, Any] = {name: limits.model_dump() for name, limits in DEFAULT_TIERS.items()}
        for name, limits in v.items():
            given = limits.model_dump() if isinstance(limits, TierLimits) else limits
            merged[name] = {**merged.get(name, {}), **given} if isinstance(given, dict) else given
        return merged

    @field_validator("tiers")
    @classmethod
    def _has_free(cls, v: dict[str, TierLimits]) -> dict[str, TierLimits]:
        if "free" not in v:
            raise ValueError("must define a 'free' tier")
        return v

    @field_validator("notify_ssrf_allow", mode="before")
    @classmethod
    def _split_allow(cls, v: Any) -> Any:
        if isinstance(v, str):
            text = v.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return v

    @field_validator("notify_ssrf_allow")
    @classmethod
    def _valid_allow(cls, v: list[str]) -> list[str]:
        if v:  # imported only when used: notify/ pulls in the HTTP and crypto stacks
            from defiwatch.notify.ssrf import AllowList

            AllowList.parse(v)
        return v

    @field_validator("notify_smtp_from")
    @classmethod
    def _from_address(cls, v: str) -> str:
        _, address = parseaddr(v)
        if "@" not in address or any(c in v for c in "\r\n"):
            raise ValueError("must be an address, e.g. 'defiwatch <alerts@example.com>'")
        return v

    @field_validator("notify_vapid_subject")
    @classmethod
    def _vapid_subject(cls, v: str) -> str:
        if not v.startswith(("mailto:", "https://")):
            raise ValueError("must be a mailto: or https:// contact URI")
        return v

    @field_validator("notify_retry_max_delay_s")
    @classmethod
    def _retry_bounds(cls, v: float, info: ValidationInfo) -> float:
        base = info.data.get("notify_retry_base_delay_s")
        if base is not None and v < base:
            raise ValueError("must be at least notify_retry_base_delay_s")
        return v

    @field_validator("notify_breaker_max_open_s")
    @classmethod
    def _breaker_bounds(cls, v: float, info: ValidationInfo) -> float:
        first = info.data.get("notify_breaker_open_s")
        if first is not None and v < first:
            raise ValueError("must be at least notify_breaker_open_s")
        return v

    @property
    def replay_window(self) -> tuple[int | None, int | None]:
        """`replay_from` / `replay_until` as epoch seconds (UTC midnight)."""
        return _epoch(self.replay_from), _epoch(self.replay_until)

    @property
    def replay_backfill_ts(self) -> int | None:
        """`replay_backfill_until` as epoch seconds (UTC midnight); None = the default."""
        return _epoch(self.replay_backfill_until)

    @property
    def is_postgres(self) -> bool:
        return self.database_url.startswith("postgresql")

    @property
    def redis_dsn(self) -> str | None:
        return self.redis_url.get_secret_value() if self.redis_url else None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_path = Path(os.environ.get(f"{ENV_PREFIX}CONFIG", "defiwatch.toml"))
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_path))


def _epoch(day: date | None) -> int | None:
    """A date as the epoch seconds of its UTC midnight."""
    if day is None:
        return None
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())


def load_settings(**overrides: Any) -> Settings:
    """Read settings; raise ConfigError with one line naming the first bad setting."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = ".".join(str(p) for p in err["loc"]) or "settings"
        env = ENV_PREFIX + name.split(".")[0].upper()
        reason = str(err["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"invalid setting {env} ({name}): {reason}", field=name) from exc
