"""A point is one observed value of a series; `validate_point` is the one gate every source uses."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import msgspec

from defiwatch.domain.series import (
    METRICS,
    NO_CHAIN,
    SeriesKey,
    name_problem,
    normalize_chain,
    normalize_subject,
)

__all__ = ["MAX_FUTURE_SECONDS", "MIN_TS", "Point", "PointRejection", "validate_point"]

MAX_FUTURE_SECONDS = 3600  # a point more than an hour ahead of our clock is a clock or unit bug
MIN_TS = 1_230_768_000  # 2009-01-01: nothing in DeFi is older; catches millisecond/second mix-ups
# USD; 10,000x the whole of DeFi, anything beyond is a unit bug. Negative values are real:
# DefiLlama reports them (a protocol's Polygon TVL of -21,442.50 in the 2024-03 /protocols),
# and dropping them would make per-chain sums disagree with the source's totals.
_MAX_VALUE = 1e16


class Point(msgspec.Struct, frozen=True, gc=False):
    metric: str
    subject: str
    chain: str
    ts: int
    value: float
    source: str = "api"

    @property
    def series(self) -> SeriesKey:
        return SeriesKey(self.metric, self.subject, self.chain)


class PointRejection(msgspec.Struct, frozen=True):
    """Why one input point was refused; `field` names the offending key of that point."""

    index: int
    field: str
    reason: str


def validate_point(
    raw: Mapping[str, Any], *, index: int, now: float, source: str
) -> Point | PointRejection:
    """Check and normalise one raw point; never raises for bad input, returns the rejection."""

    def reject(field: str, reason: str) -> PointRejection:
        return PointRejection(index=index, field=field, reason=reason)

    metric = raw.get("metric")
    if not isinstance(metric, str) or metric not in METRICS:
        return reject("metric", f"unknown metric {metric!r}; known: {', '.join(sorted(METRICS))}")
    subject = raw.get("subject")
    if not isinstance(subject, str) or not subject.strip():
        return reject("subject", "must be a non-empty string")
    if problem := name_problem(subject):
        return reject("subject", problem)
    chain = raw.get("chain", NO_CHAIN)
    if chain is not None and not isinstance(chain, str):
        return reject("chain", "must be a string or null")
    if chain is not None and (problem := name_problem(chain)):
        return reject("chain", problem)
    ts = raw.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
        return reject("ts", "must be epoch seconds (an integer)")
    if ts != int(ts):
        return reject("ts", "must be whole epoch seconds")
    if ts < MIN_TS:
        return reject("ts", f"{int(ts)} is before 2009-01-01; epoch seconds expected")
    if ts > now + MAX_FUTURE_SECONDS:
        if ts > now * 100:
            return reject("ts", "looks like milliseconds; epoch seconds expected")
        return reject("ts", f"is {int(ts - now)} s in the future (at most {MAX_FUTURE_SECONDS})")
    value = raw.get("value")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return reject("value", "must be a number")
    if not math.isfinite(value):
        return reject("value", "must be a finite number")
    if abs(value) > _MAX_VALUE:
        return reject("value", f"is beyond ±{_MAX_VALUE:.0e}; check units")
    norm_subject = normalize_subject(metric, subject)
    if not norm_subject:
        return reject("subject", "has no usable characters")
    return Point(
        metric=metric,
        subject=norm_subject,
        chain=normalize_chain(chain),
        ts=int(ts),
        value=float(value),
        source=source,
    )
