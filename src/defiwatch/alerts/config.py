"""Settings of the alert engine and the rules API, derived once from `Settings`."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from defiwatch.config import Settings

__all__ = ["AlertsApiConfig", "EngineConfig", "default_consumer_name"]

# Rules per user when no Settings were given (README, Tiers: free 5, pro 100, enterprise 1,000).
_DEFAULT_LIMITS = {"free": 5, "pro": 100, "enterprise": 1_000}


def default_consumer_name() -> str:
    """A consumer name unique per live worker: host and pid. A restarted worker gets a new name;
    its predecessor's pending entries are claimed after `claim_idle_s`."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How the alert engine reads and when it does housekeeping. Seconds unless named.

    Args:
        batch: stream entries per batch (one database transaction).
        rule_refresh_s: how often the rules revision is polled; rule changes take effect within
            this (plus one batch).
        claim_idle_s: entries pending at another worker this long are taken over (it died).
        tick_s: how often due instances are advanced (pending `for`, cooldown ends, repeats)
            and the alerts-stream outbox swept.
        block_s: longest wait for new events in one read.
        republish_after_s: an outbox row this old is published by the sweep (its writer is
            presumed dead; publishing twice is harmless, the stream deduplicates).
        start: where a new consumer group starts: "latest" (events from now on) or
            "earliest" (the oldest retained event).
        consumer: this worker's name in the group.
    """

    batch: int = 1_000
    rule_refresh_s: float = 0.5
    claim_idle_s: float = 30.0
    tick_s: float = 1.0
    block_s: float = 1.0
    republish_after_s: float = 5.0
    start: str = "latest"
    consumer: str = field(default_factory=default_consumer_name)

    @classmethod
    def from_settings(cls, settings: Settings, *, consumer: str | None = None) -> EngineConfig:
        return cls(
            batch=settings.alerts_batch,
            rule_refresh_s=settings.alerts_rule_refresh_s,
            claim_idle_s=settings.alerts_claim_idle_s,
            consumer=consumer or default_consumer_name(),
        )


@dataclass(frozen=True, slots=True)
class AlertsApiConfig:
    """What the rules API needs from the settings.

    Args:
        rule_limits: tier -> most rules a user of that tier may have (unknown tiers get the
            `free` limit).
        default_throttle_minutes: cooldown of a rule created without `throttle_minutes`.
    """

    rule_limits: Mapping[str, int] = field(default_factory=lambda: dict(_DEFAULT_LIMITS))
    default_throttle_minutes: float = 5.0

    @classmethod
    def from_settings(cls, settings: Settings) -> AlertsApiConfig:
        return cls(
            rule_limits={name: t.alert_rules for name, t in settings.tiers.items()},
            default_throttle_minutes=settings.alerts_default_throttle_minutes,
        )

    def limit_for(self, tier: str) -> int:
        return self.rule_limits.get(tier, self.rule_limits.get("free", 5))
