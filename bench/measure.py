"""Measurement helpers the benchmarks share: percentiles, latency summaries, CPU time of
processes (from /proc), the machine's busy share."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["dist_ms", "machine_busy", "pct", "postgres_pids", "proc_cpu"]

_TICKS = os.sysconf("SC_CLK_TCK")


def pct(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * len(s) + 0.5) - 1))
    return s[k]


def dist_ms(values: Sequence[float]) -> dict[str, Any]:
    """Count, percentiles, max and mean of durations in seconds, as milliseconds."""
    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 3)

    return {"n": len(values), "p50_ms": ms(pct(values, 50)), "p95_ms": ms(pct(values, 95)),
            "p99_ms": ms(pct(values, 99)), "p999_ms": ms(pct(values, 99.9)),
            "max_ms": ms(max(values) if values else None),
            "mean_ms": ms(sum(values) / len(values) if values else None)}


def proc_cpu(pid: int) -> float:
    """user+system CPU seconds of a process (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


def postgres_pids() -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                if (p / "comm").read_text().strip().startswith("postgres"):
                    pids.append(int(p.name))
    return pids


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies over all cores since boot."""
    parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = parts[3] + parts[4]
    total = sum(parts[:8])
    return total - idle, total
