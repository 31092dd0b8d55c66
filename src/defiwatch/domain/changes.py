"""Change detection: from a series' recent history and a new point, decide whether to emit.

Pure: state in, decision out. The processor owns one `SeriesState` per series and persists
nothing here; after a restart it rebuilds the state from stored points and the stream's record of
what was last published, so a replayed point yields the same decision.
"""

from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass, field

from defiwatch.domain.events import Event, event_type_for
from defiwatch.domain.points import Point
from defiwatch.domain.series import PRICE_METRICS

__all__ = ["WINDOWS", "ChangeDetector", "Decision", "SeriesState", "Thresholds", "pct_change"]

# Windowed changes reported on every event: name -> seconds. A reference point counts for a
# window W when it lies in [ts - 1.5 W, ts - W]: daily data then has a 24h and 7d change but no
# 1h change, instead of a day-old value passed off as "1h".
WINDOWS = {"change_1h": 3600, "change_24h": 86_400, "change_7d": 7 * 86_400}
_KEEP_SECONDS = int(WINDOWS["change_7d"] * 1.5) + 1


class Decision(enum.Enum):
    """Why a point did or did not become an event."""

    SIGNIFICANT = "significant"
    FIRST_POINT = "first_point"  # cold start: no reference, so no bogus +100 %
    BELOW_THRESHOLD = "below_threshold"
    ALREADY_PUBLISHED = "already_published"  # seen before a restart: the stream has it
    OUT_OF_ORDER = "out_of_order"  # older than the newest point: history, not a change


@dataclass(frozen=True, slots=True)
class Thresholds:
    """A change is significant when it reaches either bound (percent, or absolute units).

    None disables a bound. Defaults follow the product brief: TVL 1 % or $10,000; price 0.1 %.
    """

    tvl_pct: float | None = 1.0
    tvl_abs: float | None = 10_000.0
    price_pct: float | None = 0.1
    price_abs: float | None = None

    def significant(self, metric: str, change_abs: float, change_pct: float | None) -> bool:
        pct, absolute = (
            (self.price_pct, self.price_abs) if metric in PRICE_METRICS
            else (self.tvl_pct, self.tvl_abs)
        )
        if pct is not None and change_pct is not None and abs(change_pct) >= pct:
            return True
        if absolute is None:
            # A move away from zero has no percentage; with no absolute bound to judge it,
            # any move counts (otherwise a price leaving 0 would never be reported).
            return pct is not None and change_pct is None and change_abs != 0
        return abs(change_abs) >= absolute


def pct_change(value: float, reference: float) -> float | None:
    """Percent change from `reference`; None when the reference is zero (undefined, not inf).

    Relative to `|reference|`, so the sign says the direction even across zero (DefiLlama
    reports negative TVL): -100 -> 50 is +150 %, 100 -> -50 is -150 %.
    """
    if reference == 0:
        return None
    return (value - reference) / abs(reference) * 100.0


@dataclass(slots=True)
class SeriesState:
    """Recent history of one series (about 10.5 days) and what subscribers last saw of it.

    `published` is `(ts, value)` of the last event the stream holds for the series, or None.
    """

    ts: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    published: tuple[int, float] | None = None

    @property
    def newest_ts(self) -> int | None:
        return self.ts[-1] if self.ts else None

    def add(self, ts: int, value: float) -> None:
        """Insert a point keeping time order (out-of-order points still serve as references)."""
        i = bisect.bisect_left(self.ts, ts)
        if i < len(self.ts) and self.ts[i] == ts:
            self.values[i] = value
            return
        self.ts.insert(i, ts)
        self.values.insert(i, value)
        horizon = self.ts[-1] - _KEEP_SECONDS
        if self.ts[0] < horizon:
            cut = bisect.bisect_left(self.ts, horizon)
            del self.ts[:cut], self.values[:cut]

    def value_before(self, ts: int) -> float | None:
        i = bisect.bisect_left(self.ts, ts)
        return self.values[i - 1] if i else None

    def reference(self, ts: int, window: int) -> float | None:
        """Value at `ts - window`: the newest point in [ts - 1.5 window, ts - window]."""
        i = bisect.bisect_right(self.ts, ts - window)
        if not i or self.ts[i - 1] < ts - window - window // 2:
            return None
        return self.values[i - 1]

    def windowed(self, ts: int, value: float) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for name, seconds in WINDOWS.items():
            ref = self.reference(ts, seconds)
            out[name] = None if ref is None else pct_change(value, ref)
        return out


@dataclass(frozen=True, slots=True)
class ChangeDetector:
    thresholds: Thresholds = Thresholds()

    def observe(
        self, state: SeriesState, point: Point, *, now: float
    ) -> tuple[Decision, Event | None, dict[str, float | None]]:
        """Apply `point` to `state`; return the decision, the event if any, and windowed changes.

        The reference for `change_abs`/`change_pct` is what subscribers last saw (the last
        published value), so slow drifts add up to an event and `previous` always matches the
        value a client holds. Before anything was published it is the previous stored point.
        """
        newest = state.newest_ts
        if newest is not None and point.ts < newest:
            state.add(point.ts, point.value)
            return Decision.OUT_OF_ORDER, None, state.windowed(point.ts, point.value)
        if state.published is not None and point.ts <= state.published[0]:
            # After a restart, history stops before the re-read batch, so this is a replay.
            state.add(point.ts, point.value)
            return Decision.ALREADY_PUBLISHED, None, state.windowed(point.ts, point.value)
        reference = state.published[1] if state.published else state.value_before(point.ts)
        state.add(point.ts, point.value)
        windowed = state.windowed(point.ts, point.value)
        if reference is None:
            return Decision.FIRST_POINT, None, windowed
        change_abs = point.value - reference
        change_pct = pct_change(point.value, reference)
        if not self.thresholds.significant(point.metric, change_abs, change_pct):
            return Decision.BELOW_THRESHOLD, None, windowed
        event = Event(
            type=event_type_for(point.metric).value,
            metric=point.metric,
            subject=point.subject,
            chain=point.chain,
            value=point.value,
            previous=reference,
            change_abs=change_abs,
            change_pct=change_pct,
            change_1h=windowed["change_1h"],
            change_24h=windowed["change_24h"],
            change_7d=windowed["change_7d"],
            ts=point.ts,
            emitted_at=now,
            source=point.source,
        )
        state.published = (point.ts, point.value)
        return Decision.SIGNIFICANT, event, windowed
