"""Measurement helpers the benchmarks share: percentiles, latency summaries, CPU time of
processes (from /proc), the machine's busy share, a free loopback port and the result file."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CpuMeter", "dist_ms", "free_port", "machine_busy", "pct", "postgres_pids",
           "proc_cpu", "write_result"]

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


@dataclass
class CpuMeter:
    """CPU seconds over one phase of this process (`own`), of named groups of other processes,
    and of every PostgreSQL process, with the machine's busy share."""

    own: str
    others: Mapping[str, Sequence[int]]
    start: dict[str, float] = field(default_factory=dict)
    pg_start: dict[int, float] = field(default_factory=dict)
    machine_start: tuple[float, float] = (0.0, 0.0)
    wall_start: float = 0.0

    def _sample(self) -> dict[str, float]:
        s = {self.own: time.process_time()}
        for name, pids in self.others.items():
            s[name] = sum(proc_cpu(pid) for pid in pids)
        return s

    def begin(self) -> None:
        self.wall_start = time.perf_counter()
        self.start = self._sample()
        self.pg_start = {pid: proc_cpu(pid) for pid in postgres_pids()}
        self.machine_start = machine_busy()

    def end(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.wall_start
        now = self._sample()
        out: dict[str, Any] = {k: round(now[k] - self.start[k], 2) for k in now}
        # Backends that exited during the phase are lost; those that started count from 0.
        out["postgres_all_processes"] = round(
            sum(proc_cpu(pid) - self.pg_start.get(pid, 0.0) for pid in postgres_pids()), 2)
        busy, total = machine_busy()
        b0, t0 = self.machine_start
        out["machine_busy_pct_of_all_cores"] = round(100 * (busy - b0) / max(total - t0, 1), 1)
        out["wall_s"] = round(wall, 2)
        return out


def free_port() -> int:
    """A loopback port free at the moment of asking, for a server the benchmark starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


RESULTS = Path(__file__).resolve().parent / "results"


def write_result(name: str, doc: Mapping[str, Any], out: Path | None) -> None:
    """Print a benchmark's result and keep it in `out`, by default
    bench/results/<name>-<date>.json, so every benchmark files its numbers alike."""
    text = json.dumps(doc, indent=2, default=str)
    print(text)
    path = out or RESULTS / f"{name}-{dt.date.today().isoformat()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
