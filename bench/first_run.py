#!/usr/bin/env python
"""First-run benchmark (issue 11): how many seconds a newcomer's `defiwatch run` takes to show data.

What runs: `.venv/bin/defiwatch run` as a child process, the embedded deployment exactly as
`make run` starts it (every role, SQLite, in-process stream and cache, default replay of the
bundled real data), in a fresh temp directory: `DEFIWATCH_STATE_DIR` and the SQLite file
(`DEFIWATCH_DATABASE_URL`) under it, free loopback ports for the API, gateway and Socket.IO
(`DEFIWATCH_API_PORT`, `_GATEWAY_PORT`, `_SOCKETIO_PORT`), JSON logs (`DEFIWATCH_LOG_FORMAT`) so
the replay's end can be read from stderr. Every other `DEFIWATCH_*` variable of this shell is
dropped. The server is pinned with `taskset -c 1`; this process (the pollers) pins itself to
core 0.

Measured, in seconds from spawning the child (interpreter start, migrations and demo key
included), the first successful answer of each milestone:
  healthz              GET /healthz answers 200
  latest               GET /v1/latest has at least one row
  latest_price         GET /v1/latest?metric=price has at least one row
  protocols_500        GET /protocols lists at least 500 protocols
  query_first_example  docs/query.md's first example POSTed to /v1/query/advanced gives 5 rows
  replay_finished      the `replay.finished` log line (the paced tail of the replay included)
Each milestone has its own poller (the demo key is read from `$STATE_DIR/demo-key` once it
exists) that asks again `--poll-s` after an answer (50 ms after a refused connection), so a time
is late by at most one interval plus one request. A milestone stops being polled once reached
(the demo key's pro tier allows 600 requests a minute at once; 429s are counted in `requests`).

Phases per run: `first` (empty state directory), then `restart` (SIGTERM, then the same command
on the same state directory and ports). Children are stopped with SIGTERM, killed after 20 s.
`--runs` runs (default 3); the summary gives min/median/max per phase and milestone. Before
starting it waits (up to `--quiet-wait-s`) for the 1-minute load average to drop below
`--max-load`, and records the load average of every phase.

Prints one JSON document and writes bench/results/first_run-<date>.json (or `--out`). Loopback
only. Exit code 1 if a milestone was not reached within `--timeout` s (or the child exited).

    .venv/bin/python bench/first_run.py                  # 3 runs, about 5 minutes
    .venv/bin/python bench/first_run.py --runs 1 --no-replay-wait
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from measure import free_port, write_result

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
SERVER_CORE, CLIENT_CORE = 1, 0
TARGET_S = 30.0  # issue 11: non-empty /protocols, /v1/latest and the docs examples within 30 s
STOP_GRACE_S = 20.0
CONNECT_RETRY_S = 0.05  # a refused connection costs the server nothing: retry sooner
# docs/query.md, first example: the five largest protocols by TVL.
FIRST_EXAMPLE = {"select": ["slug", "tvl", "change_24h"], "sort": ["-tvl"], "limit": 5}


@dataclass(frozen=True)
class Milestone:
    """One thing a newcomer checks: a request, and when its answer counts as showing data."""

    name: str
    method: str
    path: str
    done: Callable[[Any], bool]  # on the parsed JSON of a 200 answer
    body: dict[str, Any] | None = None
    keyed: bool = True


def _rows(doc: Any) -> int:
    return len(doc["data"]) if isinstance(doc, dict) and isinstance(doc.get("data"), list) else 0


MILESTONES = (
    Milestone("healthz", "GET", "/healthz", lambda _doc: True, keyed=False),
    Milestone("latest", "GET", "/v1/latest", lambda doc: _rows(doc) > 0),
    Milestone("latest_price", "GET", "/v1/latest?metric=price", lambda doc: _rows(doc) > 0),
    Milestone("protocols_500", "GET", "/protocols",
              lambda doc: isinstance(doc, list) and len(doc) >= 500),
    Milestone("query_first_example", "POST", "/v1/query/advanced", lambda doc: _rows(doc) == 5,
              body=FIRST_EXAMPLE),
)
REPLAY_FINISHED = "replay_finished"


class Failed(Exception):
    """The child exited before every milestone was reached."""


@dataclass
class Child:
    """A running `defiwatch run` and what its JSON logs said so far."""

    proc: asyncio.subprocess.Process
    started: float
    replay_done: asyncio.Event = field(default_factory=asyncio.Event)
    replay_finished_s: float | None = None
    replay_stats: dict[str, Any] = field(default_factory=dict)
    levels: Counter[str] = field(default_factory=Counter)
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=20))

    async def read_logs(self) -> None:
        """Drain stderr (a full pipe would block the server), noting the replay's end."""
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.tail.append(line)
            try:
                record = json.loads(line)
            except ValueError:  # the banner and progress bars (rich), or a traceback
                self.levels["traceback" if line.startswith("Traceback") else "plain"] += 1
                continue
            if not isinstance(record, dict):
                continue
            self.levels[str(record.get("level"))] += 1
            if record.get("event") == "replay.finished":
                self.replay_finished_s = time.perf_counter() - self.started
                self.replay_stats = {k: v for k, v in record.items()
                                     if k not in ("event", "level", "timestamp")}
                self.replay_done.set()


def child_env(state: Path, ports: dict[str, int]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEFIWATCH_")}
    env.update({
        "DEFIWATCH_STATE_DIR": str(state / "var"),
        "DEFIWATCH_DATABASE_URL": f"sqlite+aiosqlite:///{state / 'var' / 'defiwatch.db'}",
        "DEFIWATCH_LOG_FORMAT": "json",
        **{f"DEFIWATCH_{name.upper()}_PORT": str(port) for name, port in ports.items()},
    })
    return env


async def start(state: Path, ports: dict[str, int], pinned: bool) -> Child:
    cmd = [str(VENV_BIN / "defiwatch"), "run"]
    if pinned:
        cmd = ["taskset", "-c", str(SERVER_CORE), *cmd]
    with (state / "stdout.txt").open("ab") as out:  # banner and progress bars
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *cmd, cwd=state, env=child_env(state, ports), stdin=asyncio.subprocess.DEVNULL,
            stdout=out, stderr=asyncio.subprocess.PIPE)
    return Child(proc, started)


async def stop(child: Child) -> dict[str, Any]:
    """SIGTERM, then SIGKILL after STOP_GRACE_S; how long it took and the exit code."""
    began = time.perf_counter()
    killed = False
    if child.proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            child.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(child.proc.wait(), STOP_GRACE_S)
        except TimeoutError:
            killed = True
            with contextlib.suppress(ProcessLookupError):
                child.proc.kill()
            await child.proc.wait()
    return {"exit_code": child.proc.returncode, "killed": killed,
            "stop_s": round(time.perf_counter() - began, 2)}


async def poll(m: Milestone, child: Child, client: httpx.AsyncClient, key_file: Path,
               interval: float, statuses: Counter[str]) -> float:
    """Seconds from spawn to the first answer showing `m` done.

    Raises:
        Failed: the child exited first.
    """
    while True:
        if child.proc.returncode is not None:
            raise Failed(f"defiwatch run exited with {child.proc.returncode} before {m.name}")
        key = demo_key(key_file) if m.keyed else None
        pause = CONNECT_RETRY_S  # nothing to ask yet, or the API is not listening yet
        if key is not None or not m.keyed:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            try:
                resp = await client.request(m.method, m.path, json=m.body, headers=headers)
            except httpx.TransportError as exc:
                statuses[type(exc).__name__] += 1
            else:
                statuses[str(resp.status_code)] += 1
                if resp.status_code == 200 and m.done(resp.json()):
                    return time.perf_counter() - child.started
                pause = interval
        await asyncio.sleep(pause)  # a client's polling interval, not synchronisation


def demo_key(path: Path) -> str | None:
    """The key `run` prints, once it has written it (after migrating)."""
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


async def phase(state: Path, ports: dict[str, int], args: argparse.Namespace) -> dict[str, Any]:
    """Start `defiwatch run`, time every milestone, stop it."""
    out: dict[str, Any] = {"loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}
    statuses: Counter[str] = Counter()
    child = await start(state, ports, args.pinned)
    reader = asyncio.create_task(child.read_logs())
    key_file = state / "var" / "demo-key"
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports['api']}",
                                     timeout=30.0) as client:
            pollers = [poll(m, child, client, key_file, args.poll_s, statuses) for m in MILESTONES]
            try:
                times = await asyncio.wait_for(asyncio.gather(*pollers), args.timeout)
                out["milestones_s"] = {m.name: round(t, 2) for m, t in zip(MILESTONES, times,
                                                                             strict=True)}
            except (Failed, TimeoutError) as exc:
                out["error"] = str(exc) or f"not every milestone within {args.timeout} s"
        if args.replay_wait and "error" not in out:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(child.replay_done.wait(), args.replay_timeout)
            out.setdefault("milestones_s", {})[REPLAY_FINISHED] = (
                None if child.replay_finished_s is None else round(child.replay_finished_s, 2))
            out["replay"] = child.replay_stats
    finally:
        out.update(await stop(child))
        await reader
    out["requests"] = dict(statuses)
    out["log_levels"] = dict(child.levels)
    out["database_bytes"] = sum(f.stat().st_size for f in (state / "var").glob("defiwatch.db*"))
    if "error" in out or child.levels["error"] or child.levels["traceback"]:
        out["log_tail"] = list(child.tail)
    return out


async def one_run(args: argparse.Namespace) -> dict[str, Any]:
    ports = {"api": free_port(), "gateway": free_port(), "socketio": free_port()}
    with tempfile.TemporaryDirectory(prefix="dw-first-run-") as tmp:
        first = await phase(Path(tmp), ports, args)
        restart = await phase(Path(tmp), ports, args) if "error" not in first else {
            "error": "skipped: the first phase failed"}
    return {"ports": ports, "first": first, "restart": restart}


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """min/median/max seconds per phase and milestone over the runs that reached it."""
    names = [m.name for m in MILESTONES] + [REPLAY_FINISHED]
    out: dict[str, Any] = {}
    for ph in ("first", "restart"):
        out[ph] = {}
        for name in names:
            values = [v for r in runs if (v := r[ph].get("milestones_s", {}).get(name)) is not None]
            out[ph][name] = {"n": len(values), "min_s": min(values, default=None),
                             "median_s": round(statistics.median(values), 2) if values else None,
                             "max_s": max(values, default=None)}
    keyed = [m.name for m in MILESTONES if m.keyed]
    out["target_s"] = TARGET_S
    out["every_data_milestone_within_target_every_run"] = all(
        r[ph].get("milestones_s", {}).get(n) is not None
        and r[ph]["milestones_s"][n] < TARGET_S
        for r in runs for ph in ("first", "restart") for n in keyed)
    return out


def wait_quiet(max_load: float, wait_s: float) -> float:
    """Wait (at most wait_s) for the 1-minute load average to drop below max_load; returns
    the seconds waited. The load average is a minute-long moving figure: polled, not awaited."""
    began = time.monotonic()
    while os.getloadavg()[0] > max_load and time.monotonic() - began < wait_s:
        time.sleep(10)
    return round(time.monotonic() - began, 1)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from defiwatch import __version__

    doc: dict[str, Any] = {
        "benchmark": "first_run", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "conditions": {
            "defiwatch": __version__, "nproc": os.cpu_count(),
            "python": platform.python_version(), "kernel": platform.release(),
            "host": socket.gethostname(), "runs": args.runs, "poll_s": args.poll_s,
            "timeout_s": args.timeout, "replay_wait": args.replay_wait,
            "quiet_wait_s": wait_quiet(args.max_load, args.quiet_wait_s),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            "pinning": (f"server taskset -c {SERVER_CORE}; pollers sched_setaffinity "
                        f"{{{CLIENT_CORE}}}" if args.pinned else "none (fewer than 2 cores)"),
            "deployment": "embedded defaults (SQLite, in-process stream/cache, every role, "
                          "default replay); only ports, state dir, database path, JSON logs set",
        },
        "runs": [],
    }
    cores = os.sched_getaffinity(0)
    if args.pinned:
        os.sched_setaffinity(0, {CLIENT_CORE})
    try:
        for i in range(args.runs):
            print(f"run {i + 1}/{args.runs}", file=sys.stderr, flush=True)
            doc["runs"].append(await one_run(args))
    finally:
        os.sched_setaffinity(0, cores)
    doc["summary"] = summarise(doc["runs"])
    doc["failed"] = any("error" in r[ph] for r in doc["runs"] for ph in ("first", "restart"))
    return doc


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3, help="fresh state directories (3)")
    parser.add_argument("--poll-s", type=float, default=0.25,
                        help="pause between a poller's answer and its next request (0.25 s)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds per phase for the HTTP milestones (120)")
    parser.add_argument("--replay-timeout", type=float, default=300.0,
                        help="further seconds to wait for the replay.finished log line (300)")
    parser.add_argument("--no-replay-wait", dest="replay_wait", action="store_false",
                        help="stop as soon as the HTTP milestones are reached")
    parser.add_argument("--max-load", type=float, default=2.0,
                        help="wait for a 1-minute load average below this first (2.0)")
    parser.add_argument("--quiet-wait-s", type=float, default=300.0,
                        help="longest wait for that quiet moment (300 s)")
    parser.add_argument("--out", type=Path, default=None,
                        help="result file (bench/results/first_run-<date>.json)")
    args = parser.parse_args(argv)
    args.pinned = len(os.sched_getaffinity(0)) >= 2
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    doc = asyncio.run(main_async(args))
    write_result("first_run", doc, args.out)
    return 1 if doc["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
