#!/usr/bin/env python
"""Notification delivery benchmark (issue 5): fired-to-received latency through the outbox.

Pipeline measured: a row queued in `notification_logs` (`store.delivery.queue_notifications`,
which also runs NOTIFY defiwatch_notify) -> `defiwatch run notifier` claims it -> signed
webhook POST -> a receiver on 127.0.0.1 records (webhook-id, receive time). Latency per
notification = first receive time - the row's `created_at` (the moment the alert fired and the
row was queued); both are wall-clock epoch seconds on this one machine.

Receivers (tests/notify/receivers.py, raw asyncio HTTP/1.1 keep-alive, 200 `ok`): `--receivers`
of them, each its own port and so its own receiving host (breaker key, per-host limit).

Scenarios, each with a fresh PostgreSQL database (created, migrated, dropped), fresh receivers
and fresh notifier processes, run one after another in this one run:

healthy
    every receiver answers at once.
degraded
    receiver 0 is DOWN (a port bound but not listening: connect refused), receiver 1 (or 1..N
    with `--slow-receivers N`) is SLOW (answers after `--slow-s`; its receive time is when the
    request arrived), the others answer at once. The healthy receivers' latency here
    vs in `healthy` is the point: one dead receiver must not delay the others.
burst
    (capacity) `--burst` rows queued at once to healthy receivers: notifications/s to drain.

Load: `--rate` rows/s for `--duration` s in ticks of `--tick-ms` (one transaction per tick),
round-robin over the receivers; user 1, kind alert_fired, channel webhook, payload an alert
event (`build_alert_event`). Before the clock starts, one warm-up notification per healthy
receiver must arrive (the notifiers are up, connections open); those rows are not counted.
After the load, healthy receivers get `--drain-s` to receive the rest.

Counted: `lost` = queued for a healthy receiver and never received by the end of the drain;
`duplicated` = a webhook-id received more than once (any receiver); the rows' final status and
the attempt rows' statuses from the database.

Processes: `--notifiers` x `taskset -c 0 .venv/bin/defiwatch run notifier`; this process (load
generator + every receiver, one asyncio loop) pinned to core 1; PostgreSQL unpinned. Per-user
throttling is off for the run (DEFIWATCH_NOTIFY_MAX_PER_MINUTE=0): one user queues 500/s.
Touches only loopback.

Prints one JSON document; `--out PATH` also writes it (bench/results/notify-<date>.json).

    .venv/bin/python bench/notify.py --out bench/results/notify-2026-11-28.json
    .venv/bin/python bench/notify.py --rate 200 --duration 5 --scenarios healthy
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import secrets
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from measure import CpuMeter, dist_ms
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from defiwatch.alerts.events import AlertEventType, build_alert_event, event_dict
from defiwatch.store import create_engine, upgrade
from defiwatch.store.schema import notification_logs, users

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
VENV_BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "tests"))
from notify.receivers import WebhookSink, refusing_port  # noqa: E402  (tests/ is not a package)

PG_HOST = os.environ.get("DEFIWATCH_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("DEFIWATCH_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("DEFIWATCH_TEST_PG_USER", "postgres")
PG_ADMIN_DB = os.environ.get("DEFIWATCH_TEST_PG_DB", "test")
NOTIFIER_CORE, LOAD_CORE = 0, 1
SCENARIOS = ("healthy", "degraded", "burst")


def log(msg: str) -> None:
    print(f"[notify-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- statistics


# ---------------------------------------------------------------- database


async def _pg_admin(sql: str) -> None:
    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=PG_ADMIN_DB,
                                 timeout=10)
    try:
        await conn.execute(sql, timeout=60)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def fresh_database(tag: str) -> AsyncIterator[str]:
    """A new, migrated PostgreSQL database for one scenario; dropped afterwards."""
    name = f"dwbench_notify_{tag}_{secrets.token_hex(4)}"
    await _pg_admin(f'CREATE DATABASE "{name}"')
    url = f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    try:
        await upgrade(url)
        yield url
    finally:
        try:
            await _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except Exception as exc:  # report and go on
            log(f"could not drop database {name}: {exc!r}")


async def queue(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    """Queue rows as the alert engine does: the store function when it exists, else the same
    insert + NOTIFY in this transaction."""
    try:
        from defiwatch.store.delivery import queue_notifications
    except ImportError:
        await conn.execute(notification_logs.insert(), rows)
        await conn.execute(text("NOTIFY defiwatch_notify"))
        return
    await queue_notifications(conn, rows)


def queue_api() -> str:
    try:
        from defiwatch.store.delivery import queue_notifications  # noqa: F401
    except ImportError:
        return "fallback: notification_logs insert + NOTIFY defiwatch_notify"
    return "defiwatch.store.delivery.queue_notifications"


_SERIAL = iter(range(1, 1 << 62))


def payload(now: float, user_id: int) -> dict[str, Any]:
    """An alert_fired event, shaped as the alert engine writes it."""
    n = next(_SERIAL)
    detail = {"user_id": user_id, "rule_id": n, "rule_name": f"bench rule {n}",
              "alert_id": None, "instance": "tvl|aave|ethereum", "state": "firing",
              "reason": "threshold", "dedup_key": f"{n}:tvl|aave|ethereum:{int(now)}",
              "severity": "warning", "fired_at": now, "resolved_at": None, "suppressed": None}
    source = {"metric": "tvl", "subject": "aave", "chain": "ethereum", "value": 9.1e8,
              "previous": 1.02e9, "change_abs": -1.1e8, "change_pct": -10.8, "ts": int(now)}
    event = build_alert_event(AlertEventType.FIRED, source=source, series="tvl|aave|ethereum",
                              ts=int(now), now=now, detail=detail)
    return event_dict(event)


def row(now: float, user_id: int, target: Target) -> dict[str, Any]:
    return {"alert_id": None, "user_id": user_id, "rule_id": None, "kind": "alert_fired",
            "seq": 0, "channel": "webhook", "target": target.url, "host": target.host,
            "config": {"type": "webhook", "url": target.url}, "payload": payload(now, user_id),
            "status": "pending", "attempt": 0, "next_attempt_at": now, "created_at": now,
            "updated_at": now}


# ---------------------------------------------------------------- receivers and notifiers


@dataclass
class Target:
    name: str
    role: str  # healthy | slow | down
    url: str
    host: str
    sink: WebhookSink | None  # None: down
    queued: int = 0


@contextlib.asynccontextmanager
async def receivers(scenario: str, count: int, slow_s: float, slow_count: int = 1
                    ) -> AsyncIterator[list[Target]]:
    with contextlib.ExitStack() as held:
        sinks: list[WebhookSink] = []
        targets: list[Target] = []
        try:
            for i in range(count):
                path = f"/hook/{i}"
                if scenario == "degraded" and i == 0:
                    port = held.enter_context(refusing_port()).getsockname()[1]
                    host = f"127.0.0.1:{port}"
                    targets.append(Target(f"r{i}", "down", f"http://{host}{path}", host, None))
                    continue
                slow = scenario == "degraded" and 1 <= i <= slow_count
                sink = await WebhookSink(delay_s=slow_s if slow else 0.0).start()
                sinks.append(sink)
                targets.append(Target(f"r{i}", "slow" if slow else "healthy", sink.url(path),
                                      sink.host, sink))
            yield targets
        finally:
            for sink in sinks:
                await sink.close()


def notifier_env(url: str, state: Path, name: str, args: argparse.Namespace) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEFIWATCH_")}
    env.update({
        "DEFIWATCH_DATABASE_URL": url, "DEFIWATCH_NOTIFY_SSRF_ALLOW": "127.0.0.1",
        "DEFIWATCH_REPLAY_ENABLED": "false", "DEFIWATCH_POLLER_ENABLED": "false",
        "DEFIWATCH_DEMO_KEY": "false", "DEFIWATCH_STATE_DIR": str(state),
        "DEFIWATCH_CONFIG": str(state / "absent.toml"), "DEFIWATCH_LOG_LEVEL": "warning",
        "DEFIWATCH_LOG_FORMAT": "json", "DEFIWATCH_NOTIFIER_ID": name,
        "DEFIWATCH_NOTIFY_MAX_PER_MINUTE": "0",
    })
    for item in args.notifier_env:
        key, _, value = item.partition("=")
        env[key] = value
    return env


async def stop_process(proc: asyncio.subprocess.Process) -> int | None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.wait_for(proc.wait(), 10)
    return proc.returncode


@contextlib.asynccontextmanager
async def notifiers(url: str, state: Path, args: argparse.Namespace
                    ) -> AsyncIterator[list[asyncio.subprocess.Process]]:
    procs: list[asyncio.subprocess.Process] = []
    try:
        for i in range(args.notifiers):
            name = f"bench-n{i}"
            logfile = state / f"{name}.log"
            cmd = ["taskset", "-c", str(NOTIFIER_CORE), str(VENV_BIN / "defiwatch"), "run",
                   "notifier"]
            if args.profile is not None:  # cProfile: writes when the notifier stops (SIGTERM)
                args.profile.mkdir(parents=True, exist_ok=True)
                cmd[3:4] = [sys.executable, "-m", "cProfile", "-o",
                            str(args.profile / f"{state.name}-{name}.prof"), "-m", "defiwatch"]
            with logfile.open("wb") as fh:
                procs.append(await asyncio.create_subprocess_exec(
                    *cmd, env=notifier_env(url, state, name, args), cwd=state, stdout=fh,
                    stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL))
        yield procs
    finally:
        for proc in procs:
            await stop_process(proc)


def log_tail(state: Path, lines: int = 15) -> dict[str, list[str]]:
    out = {}
    for f in sorted(state.glob("bench-n*.log")):
        out[f.stem] = f.read_text(errors="replace").splitlines()[-lines:]
    return out


# ---------------------------------------------------------------- one scenario


class Failed(Exception):
    """A scenario could not run (the notifier never delivered the warm-up, ...)."""


async def wait_until(check: Any, timeout: float, procs: list[asyncio.subprocess.Process],
                     what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        for p in procs:
            if p.returncode is not None:
                raise Failed(f"a notifier exited with {p.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise Failed(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


async def create_user(engine: AsyncEngine) -> int:
    async with engine.begin() as conn:
        return int((await conn.execute(users.insert().values(
            name="bench", tier="pro", created_at=time.time()).returning(users.c.id))).scalar_one())


async def pg_sampler(url: str, stop: asyncio.Event, out: dict[str, Any]) -> None:
    """Sample every 0.5 s: the outbox backlog (rows due and not claimed, rows in flight) and
    the cluster: sessions active in other databases (they share the cores) and the age of the
    oldest transaction there."""
    dbname = url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=PG_ADMIN_DB)
    bench = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=dbname)
    samples = busy = 0
    oldest = 0.0
    due_max = sending_max = 0
    try:
        while not stop.is_set():
            b = await bench.fetchrow(
                "SELECT count(*) FILTER (WHERE status = 'pending' AND next_attempt_at <= $1) "
                "AS due, count(*) FILTER (WHERE status = 'sending') AS sending "
                "FROM notification_logs", time.time())
            due_max = max(due_max, int(b["due"]))
            sending_max = max(sending_max, int(b["sending"]))
            r = await conn.fetchrow(
                "SELECT count(*) AS n, coalesce(max(extract(epoch FROM now() - xact_start)), 0) "
                "AS age FROM pg_stat_activity WHERE datname IS DISTINCT FROM $1 "
                "AND datname IS NOT NULL AND state <> 'idle' AND pid <> pg_backend_pid()", dbname)
            samples += 1
            busy += r["n"] > 0
            oldest = max(oldest, float(r["age"]))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
    finally:
        await conn.close()
        await bench.close()
        out.update({"outbox_due_unclaimed_max": due_max, "outbox_sending_max": sending_max,
                    "samples": samples,
                    "samples_with_active_sessions_in_other_dbs_pct":
                        round(100 * busy / max(samples, 1), 1),
                    "oldest_other_transaction_s": round(oldest, 2)})


async def run_scenario(scenario: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    state = tmp / scenario
    state.mkdir()
    res: dict[str, Any] = {"loadavg_before": [round(x, 2) for x in os.getloadavg()]}
    async with fresh_database(scenario) as url, \
            receivers(scenario, args.receivers, args.slow_s, args.slow_receivers) as targets:
        engine = create_engine(url)
        try:
            user_id = await create_user(engine)
            healthy = [t for t in targets if t.role == "healthy"]
            load_targets = healthy if scenario == "burst" else targets
            async with notifiers(url, state, args) as procs:
                meter = CpuMeter("load_and_receivers_process",
                                 {"notifier_processes": [p.pid for p in procs]})
                try:
                    # Warm-up: one notification per healthy receiver must arrive.
                    async with engine.begin() as conn:
                        await queue(conn, [row(time.time(), user_id, t) for t in healthy])
                    await wait_until(lambda: all(t.sink is not None and t.sink.distinct >= 1
                                                 for t in healthy), 60, procs, "the warm-up")
                    async with engine.connect() as conn:
                        warm_ids = {f"ntf_{i}" for i in (await conn.execute(
                            text("SELECT id FROM notification_logs"))).scalars()}
                    pg: dict[str, Any] = {}
                    stop_pg = asyncio.Event()
                    sampler = asyncio.create_task(pg_sampler(url, stop_pg, pg))
                    meter.begin()
                    if scenario == "burst":
                        load = await burst(engine, user_id, load_targets, args.burst)
                    else:
                        load = await steady(engine, user_id, load_targets, args)
                    load_end = time.time()
                    expected = sum(t.queued for t in healthy)

                    def healthy_received() -> int:
                        got = sum(t.sink.distinct for t in healthy if t.sink is not None)
                        return got - len(warm_ids)

                    try:
                        await wait_until(lambda: healthy_received() >= expected,
                                         args.drain_s, procs, "the drain")
                    except Failed as exc:
                        res["drain_error"] = str(exc)
                    drained_s = time.time() - load_end
                    res["cpu_seconds"] = meter.end()
                    stop_pg.set()
                    await sampler
                    res["outbox_due_unclaimed_max"] = pg.pop("outbox_due_unclaimed_max", None)
                    res["outbox_sending_max"] = pg.pop("outbox_sending_max", None)
                    res["other_postgres_activity"] = pg
                finally:
                    res["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
            res["notifier_exit_codes"] = [p.returncode for p in procs]
            res.update(await analyse(engine, targets, warm_ids, load, load_end, drained_s))
            if res["lost_healthy"] or res["duplicated_ids"] or "drain_error" in res or any(
                    c not in (0, -signal.SIGTERM) for c in res["notifier_exit_codes"]):
                res["notifier_log_tail"] = log_tail(state)
        finally:
            await engine.dispose()
    return res


async def steady(engine: AsyncEngine, user_id: int, targets: list[Target],
                 args: argparse.Namespace) -> dict[str, Any]:
    """`args.rate` rows/s for `args.duration` s, one transaction per tick, round-robin."""
    tick = args.tick_ms / 1000
    ticks = max(1, round(args.duration / tick))
    per_tick = args.rate * tick
    owed = 0.0
    rr = 0
    late: list[float] = []
    insert_s: list[float] = []
    start = time.perf_counter()
    wall_start = time.time()
    for k in range(ticks):
        due = start + k * tick
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            late.append(-delay)
        owed += per_tick
        n = int(owed)
        owed -= n
        if not n:
            continue
        now = time.time()
        rows = []
        for _ in range(n):
            t = targets[rr % len(targets)]
            rr += 1
            t.queued += 1
            rows.append(row(now, user_id, t))
        t0 = time.perf_counter()
        async with engine.begin() as conn:
            await queue(conn, rows)
        insert_s.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    return {"queued": rr, "queue_seconds": round(elapsed, 3),
            "queued_per_s": round(rr / elapsed, 1), "ticks": ticks,
            "ticks_late": len(late), "tick_late_max_ms": round(max(late, default=0) * 1000, 2),
            "queue_transaction": dist_ms(insert_s), "wall_start": wall_start}


async def burst(engine: AsyncEngine, user_id: int, targets: list[Target], n: int
                ) -> dict[str, Any]:
    """`n` rows queued at once (transactions of 1,000), round-robin."""
    wall_start = time.time()
    t0 = time.perf_counter()
    for first in range(0, n, 1000):
        now = time.time()
        rows = []
        for i in range(first, min(n, first + 1000)):
            t = targets[i % len(targets)]
            t.queued += 1
            rows.append(row(now, user_id, t))
        async with engine.begin() as conn:
            await queue(conn, rows)
    elapsed = time.perf_counter() - t0
    return {"queued": n, "queue_seconds": round(elapsed, 3), "wall_start": wall_start}


async def analyse(engine: AsyncEngine, targets: list[Target], warm: set[str],
                  load: dict[str, Any], load_end: float, drained_s: float) -> dict[str, Any]:
    async with engine.connect() as conn:
        rows = (await conn.execute(text(
            "SELECT id, target, created_at, status, attempt, sent_at FROM notification_logs"))
        ).all()
        attempts = (await conn.execute(text(
            "SELECT status, count(*) FROM notification_attempts GROUP BY status"))).all()
        multi_delivered = (await conn.execute(text(
            "SELECT count(*) FROM (SELECT notification_id FROM notification_attempts "
            "WHERE status = 'delivered' GROUP BY notification_id HAVING count(*) > 1) d"))
        ).scalar_one()
    by_url = {t.url: t for t in targets}
    first_hit: dict[str, float] = {}
    counts: Counter[str] = Counter()
    hits_all = 0
    for t in targets:
        if t.sink is None:
            continue
        for h in t.sink.hits:
            hits_all += 1
            counts[h.webhook_id] += 1
            if h.webhook_id not in first_hit or h.received_at < first_hit[h.webhook_id]:
                first_hit[h.webhook_id] = h.received_at
    lat: dict[str, list[float]] = {"healthy": [], "slow": []}
    per_receiver: dict[str, list[float]] = {}
    lost: dict[str, int] = Counter()
    lost_status: Counter[str] = Counter()  # of healthy rows never received: their status now
    statuses: dict[str, Counter[str]] = {}
    delivered_not_received = received_not_delivered = 0
    first_created = min((r.created_at for r in rows if f"ntf_{r.id}" not in warm), default=0.0)
    last_received = 0.0
    for r in rows:
        nid = f"ntf_{r.id}"
        if nid in warm:
            continue
        t = by_url[r.target]
        statuses.setdefault(t.role, Counter())[r.status] += 1
        got = first_hit.get(nid)
        if r.status == "delivered" and got is None:
            delivered_not_received += 1
        if got is not None and r.status != "delivered" and t.role == "healthy":
            received_not_delivered += 1
        if got is None:
            lost[t.role] += 1
            if t.role == "healthy":
                lost_status[r.status] += 1
            continue
        latency = got - r.created_at
        if t.role in lat:
            lat[t.role].append(latency)
        per_receiver.setdefault(t.name, []).append(latency)
        if t.role == "healthy":
            last_received = max(last_received, got)
    healthy_n = len(lat["healthy"])
    load_s = load_end - load["wall_start"]
    during = sum(1 for t in targets if t.role == "healthy" and t.sink is not None
                 for h in t.sink.hits
                 if h.webhook_id not in warm and load["wall_start"] <= h.received_at <= load_end)
    span = last_received - first_created
    dups = {k: n for k, n in counts.items() if n > 1}
    return {
        "load": {k: v for k, v in load.items() if k != "wall_start"},
        "receivers": [{"name": t.name, "role": t.role, "queued": t.queued,
                       "received_distinct": (t.sink.distinct - (1 if t.role == "healthy" else 0))
                       if t.sink else 0} for t in targets],
        "healthy_fired_to_received": dist_ms(lat["healthy"]),
        "healthy_per_receiver_p99_ms": {
            name: dist_ms(v)["p99_ms"] for name, v in sorted(per_receiver.items())
            if by_url_role(targets, name) == "healthy"},
        "slow_fired_to_received": dist_ms(lat["slow"]) if lat["slow"] else None,
        # first queued -> last healthy receipt, and receipts while the load ran / its length
        "healthy_received_per_s": round(healthy_n / span, 1) if span > 0 else None,
        "healthy_received_per_s_during_load": round(during / load_s, 1) if load_s > 0 else None,
        "healthy_span_s": round(span, 3),
        "drain_after_load_s": round(drained_s, 3),
        "lost_healthy": lost.get("healthy", 0),
        # pending/sending: still queued when the run ended (late, not dropped); delivered: the
        # notifier recorded a delivery the receiver never saw; dead: given up
        "lost_healthy_by_row_status": dict(lost_status),
        "not_received": dict(lost),
        "duplicated_ids": len(dups),
        "duplicate_receipts": sum(n - 1 for n in dups.values()),
        "requests_received": hits_all,
        "row_status_by_receiver_role": {k: dict(v) for k, v in statuses.items()},
        "attempt_status": {s: n for s, n in attempts},
        "rows_with_two_delivered_attempts": multi_delivered,
        "rows_delivered_but_never_received": delivered_not_received,
        # read after the notifiers stopped (SIGTERM, exit 0): answered sends it did not record
        "healthy_rows_received_but_not_delivered": received_not_delivered,
    }


def by_url_role(targets: list[Target], name: str) -> str:
    return next(t.role for t in targets if t.name == name)


# ---------------------------------------------------------------- the run


async def versions() -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER,
                                     database=PG_ADMIN_DB, timeout=10)
        try:
            out["postgresql"] = await conn.fetchval("SHOW server_version")
            out["postgresql_settings"] = {k: await conn.fetchval(f"SHOW {k}") for k in
                                          ("synchronous_commit", "fsync", "max_connections")}
        finally:
            await conn.close()
    except Exception as exc:
        out["postgresql"] = f"unreachable: {exc!r}"
    return out


def settings_used(args: argparse.Namespace) -> dict[str, Any]:
    from defiwatch.config import Settings

    s = Settings()
    names = ("notifier_concurrency", "notifier_per_host", "notifier_batch", "notifier_lease_s",
             "notifier_poll_s", "notify_webhook_timeout_s", "notify_breaker_failures",
             "notify_retry_base_delay_s")
    out: dict[str, Any] = {n: getattr(s, n, None) for n in names}
    out["overrides"] = {"DEFIWATCH_NOTIFY_MAX_PER_MINUTE": "0",
                        "DEFIWATCH_NOTIFY_SSRF_ALLOW": "127.0.0.1",
                        **dict(i.partition("=")[::2] for i in args.notifier_env)}
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def summarise(results: dict[str, Any], rate: int) -> dict[str, Any]:
    def p(s: str, q: str) -> float | None:
        v = results.get(s, {}).get("healthy_fired_to_received", {})
        return v.get(q) if isinstance(v, dict) else None

    out: dict[str, Any] = {}
    for s in ("healthy", "degraded"):
        if s in results and "error" not in results[s]:
            p99 = p(s, "p99_ms")
            out[f"{s}_p99_fired_to_received_<_1000_ms_at_{rate}_per_s"] = {
                "p99_ms": p99, "met": p99 is not None and p99 < 1000
                and results[s]["lost_healthy"] == 0}
    if all(s in results and "error" not in results[s] for s in ("healthy", "degraded")):
        out["degraded_vs_healthy_healthy_receivers"] = {
            q: {"healthy": p("healthy", q), "degraded": p("degraded", q),
                "ratio": ratio(p("degraded", q), p("healthy", q))}
            for q in ("p50_ms", "p95_ms", "p99_ms", "max_ms")}
    out["notes"] = (
        "degraded: the same --rate is spread over every receiver, so the healthy ones get "
        "(receivers - 1 - slow_receivers) / receivers of it. If the notifier cannot keep up "
        "with --rate (outbox_due_unclaimed_max grows, healthy_received_per_s_during_load < "
        "rate), latencies are queueing delay and compare throughputs, not isolation: compare "
        "at a rate below the burst capacity for that.")
    if "burst" in results and "error" not in results["burst"]:
        out["burst_drain_notifications_per_s"] = results["burst"].get("healthy_received_per_s")
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    started = time.time()
    doc: dict[str, Any] = {
        "benchmark": "notify", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "conditions": {
            "nproc": os.cpu_count(), "python": platform.python_version(),
            "kernel": platform.release(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            **(await versions()),
            "rate_per_s": args.rate, "duration_s": args.duration, "tick_ms": args.tick_ms,
            "receivers": args.receivers, "slow_s": args.slow_s,
            "slow_receivers": args.slow_receivers, "notifiers": args.notifiers,
            "burst": args.burst, "drain_s": args.drain_s, "queue": queue_api(),
            "pinning": f"notifiers taskset -c {NOTIFIER_CORE}; load generator + receivers "
                       f"sched_setaffinity {{{LOAD_CORE}}}; PostgreSQL unpinned",
            "notifier_settings": settings_used(args),
            "host": socket.gethostname(),
        },
        "scenarios": {},
    }
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {LOAD_CORE})
    failed = False
    try:
        with tempfile.TemporaryDirectory(prefix="dw-notify-bench-") as tmp:
            for scenario in args.scenarios:
                log(f"scenario {scenario}")
                try:
                    doc["scenarios"][scenario] = await asyncio.wait_for(
                        run_scenario(scenario, args, Path(tmp)), args.timeout)
                except (Failed, TimeoutError) as exc:
                    failed = True
                    doc["scenarios"][scenario] = {"error": repr(exc),
                                                  "notifier_log_tail": log_tail(Path(tmp) / scenario)}
    finally:
        os.sched_setaffinity(0, cores)
    doc["targets"] = summarise(doc["scenarios"], args.rate)
    doc["wall_s"] = round(time.time() - started, 1)
    doc["failed"] = failed
    return doc


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Scenarios: healthy, degraded (receiver 0 down, receiver 1 slow), burst. "
               "See the module docstring for what is measured.")
    parser.add_argument("--rate", type=int, default=500, help="rows queued per second (500)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load (20)")
    parser.add_argument("--tick-ms", type=float, default=20.0,
                        help="one queueing transaction per tick (20 ms)")
    parser.add_argument("--receivers", type=int, default=8, help="receiving hosts (8; >= 3)")
    parser.add_argument("--slow-s", type=float, default=2.0,
                        help="the slow receiver's answer delay, s (2)")
    parser.add_argument("--slow-receivers", type=int, default=1,
                        help="how many receivers are slow in `degraded` (1: receiver 1)")
    parser.add_argument("--notifiers", type=int, default=1, help="notifier processes (1)")
    parser.add_argument("--burst", type=int, default=5000, help="rows in the burst scenario")
    parser.add_argument("--drain-s", type=float, default=60.0,
                        help="after the load, wait up to this long for the healthy receivers")
    parser.add_argument("--scenarios", type=lambda s: [x for x in s.split(",") if x],
                        default=list(SCENARIOS), help="comma-separated: healthy,degraded,burst")
    parser.add_argument("--notifier-env", action="append", default=[], metavar="K=V",
                        help="extra environment for the notifiers (repeatable), e.g. "
                             "DEFIWATCH_NOTIFIER_BATCH=500")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="run the notifiers under cProfile, profiles into DIR")
    parser.add_argument("--timeout", type=float, default=300.0, help="per scenario, s")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the JSON here (e.g. bench/results/notify-<date>.json)")
    args = parser.parse_args(argv)
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    if args.receivers < args.slow_receivers + 2:
        parser.error("--receivers must leave a down and a healthy one besides the slow ones")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    doc = asyncio.run(main_async(args))
    out = json.dumps(doc, indent=2)
    print(out)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(out + "\n")
    return 1 if doc["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
