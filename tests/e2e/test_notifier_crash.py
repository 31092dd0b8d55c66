"""At-least-once delivery with an idempotency key: SIGKILL a notifier while its webhooks are in
flight; a replacement and the surviving notifier deliver everything, and the only duplicates
are the killed notifier's unanswered sends, under the same webhook-id.

Timeline (two real `defiwatch run notifier` processes against PostgreSQL, one webhook receiver
on loopback that records every webhook-id before answering):

    t0  notifiers A and B are up (16 sends each at most, 2 s lease); 300 notifications are
        queued to 3 receiving hosts; the receiver holds its answers (a gate)
    t1  both notifiers have sends in flight and every one of them reached the receiver:
        some notifications received, none answered, most not even claimed
    t2  kill -9 A; open the gate; start C
    t3  every row `delivered` (A's claims were retaken after their lease)

The second test stops a notifier gracefully (SIGTERM) the same way: every send the receiver
answered must be recorded `delivered` before the process exits.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from defiwatch.alerts.events import AlertEventType, build_alert_event, event_dict
from defiwatch.store import create_engine, upgrade
from defiwatch.store.delivery import queue_notifications
from defiwatch.store.schema import users
from notify.receivers import WebhookSink

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(180)]

TOTAL = 300
CONCURRENCY = 16  # per notifier: the gate holds this many sends of each, the rest waits queued


def notifier_env(postgres_url: str, tmp_path: Path, name: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEFIWATCH_")}
    env.update({
        "DEFIWATCH_DATABASE_URL": postgres_url,
        "DEFIWATCH_NOTIFY_SSRF_ALLOW": "127.0.0.1",
        "DEFIWATCH_NOTIFIER_ID": name,
        "DEFIWATCH_NOTIFIER_LEASE_S": "2",  # the killed notifier's claims come back quickly
        "DEFIWATCH_NOTIFIER_POLL_S": "0.2",
        "DEFIWATCH_NOTIFIER_CONCURRENCY": str(CONCURRENCY),
        "DEFIWATCH_NOTIFIER_BATCH": str(CONCURRENCY),
        "DEFIWATCH_NOTIFY_MAX_PER_MINUTE": "0",  # one user queues 300 at once: no throttling
        "DEFIWATCH_REPLAY_ENABLED": "false",
        "DEFIWATCH_POLLER_ENABLED": "false",
        "DEFIWATCH_DEMO_KEY": "false",
        "DEFIWATCH_STATE_DIR": str(tmp_path),
        "DEFIWATCH_CONFIG": str(tmp_path / "absent.toml"),
        "DEFIWATCH_LOG_LEVEL": "warning",
    })
    return env


def start_notifier(postgres_url: str, tmp_path: Path, name: str) -> subprocess.Popen[bytes]:
    with (tmp_path / f"{name}.log").open("ab") as sink:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "defiwatch", "run", "notifier"],
                                env=notifier_env(postgres_url, tmp_path, name), cwd=tmp_path,
                                stdout=sink, stderr=subprocess.STDOUT)


def started(tmp_path: Path, name: str) -> Any:
    """A condition for `poll`: the notifier printed its banner (it is past its start-up, its
    SIGTERM handler is installed, its claim loop about to run)."""
    async def check() -> bool:
        return "roles: notifier" in (tmp_path / f"{name}.log").read_text(errors="replace")

    return check


def logs(tmp_path: Path) -> str:
    return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}"
                     for f in sorted(tmp_path.glob("*.log")))


def alert_payload(n: int, now: float) -> dict[str, Any]:
    detail = {"user_id": 1, "rule_id": n, "rule_name": f"rule {n}", "alert_id": None,
              "instance": "tvl|aave|ethereum", "state": "firing", "reason": "threshold",
              "dedup_key": f"{n}:tvl|aave|ethereum:{int(now)}", "severity": "warning",
              "fired_at": now, "resolved_at": None, "suppressed": None}
    source = {"metric": "tvl", "subject": "aave", "chain": "ethereum", "value": 9e8,
              "previous": 1e9, "change_abs": -1e8, "change_pct": -10.0, "ts": int(now)}
    return event_dict(build_alert_event(AlertEventType.FIRED, source=source,
                                        series="tvl|aave|ethereum", ts=int(now), now=now,
                                        detail=detail))


async def queue_burst(engine: AsyncEngine, sinks: list[WebhookSink]) -> list[int]:
    now = time.time()
    async with engine.begin() as conn:
        user_id = (await conn.execute(users.insert().values(
            name="crash", tier="free", created_at=now).returning(users.c.id))).scalar_one()
        rows = []
        for n in range(TOTAL):
            sink = sinks[n % len(sinks)]
            url = sink.url(f"/hook/{n % len(sinks)}")
            rows.append({
                "alert_id": None, "user_id": user_id, "rule_id": None, "kind": "alert_fired",
                "seq": 0, "channel": "webhook", "target": url, "host": sink.host,
                "config": {"type": "webhook", "url": url}, "payload": alert_payload(n, now),
                "status": "pending", "attempt": 0, "next_attempt_at": now, "created_at": now,
                "updated_at": now})
        await queue_notifications(conn, rows)
        ids = (await conn.execute(text("SELECT id FROM notification_logs ORDER BY id"))).scalars()
        return [int(i) for i in ids]


async def sending_by_worker(engine: AsyncEngine) -> Counter[str]:
    async with engine.connect() as conn:
        rows = await conn.execute(text(
            "SELECT worker, count(*) FROM notification_attempts WHERE status = 'sending' "
            "GROUP BY worker"))
        return Counter({str(w): int(n) for w, n in rows})


async def delivered_count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text(
            "SELECT count(*) FROM notification_logs WHERE status = 'delivered'"))).scalar_one())


async def poll(condition: Any, procs: list[subprocess.Popen[bytes]], tmp_path: Path) -> None:
    """Until `await condition()` is true; every notifier must stay alive meanwhile."""
    while not await condition():
        for proc in procs:
            assert proc.poll() is None, f"a notifier exited ({proc.returncode})\n{logs(tmp_path)}"
        await asyncio.sleep(0.05)


async def test_kill_9_mid_send_loses_nothing_and_duplicates_only_lost_sends(
    postgres_url: str, tmp_path: Path, timeout_factor: float,
) -> None:
    await upgrade(postgres_url)
    engine = create_engine(postgres_url)
    gate = asyncio.Event()
    sinks = [await WebhookSink(gate=gate).start() for _ in range(3)]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        a = start_notifier(postgres_url, tmp_path, "A")
        b = start_notifier(postgres_url, tmp_path, "B")
        procs += [a, b]
        async with asyncio.timeout(60 * timeout_factor):
            await poll(started(tmp_path, "A"), procs, tmp_path)
            await poll(started(tmp_path, "B"), procs, tmp_path)
        # t0: both are up, so both claim at once (within a poll interval) and no claim waits
        # at the gate for longer than the lease.
        ids = await queue_burst(engine, sinks)
        assert len(ids) == TOTAL

        def received() -> int:
            return sum(s.distinct for s in sinks)

        # t1: both have sends in flight, and every send in flight has reached the receiver.
        in_flight: Counter[str] = Counter()

        async def both_sending_and_received() -> bool:
            nonlocal in_flight
            in_flight = await sending_by_worker(engine)
            return in_flight["A"] > 0 and in_flight["B"] > 0 and received() >= in_flight.total()

        async with asyncio.timeout(60 * timeout_factor):
            await poll(both_sending_and_received, procs, tmp_path)
        assert 0 < received() < TOTAL, "the kill must land mid-way"
        assert all(n == 1 for s in sinks for n in s.counts.values())

        # t2: kill A while its sends are unanswered; the receiver answers from now on.
        a.send_signal(signal.SIGKILL)
        assert a.wait(timeout=30) == -signal.SIGKILL
        async with engine.connect() as conn:  # A's sends stay `sending`: nobody answered yet
            killed_sends = {int(i) for i in (await conn.execute(text(
                "SELECT notification_id FROM notification_attempts "
                "WHERE worker = 'A' AND status = 'sending'"))).scalars()}
        assert killed_sends
        gate.set()
        c = start_notifier(postgres_url, tmp_path, "C")
        procs = [b, c]

        # t3: everything delivered.
        async def all_delivered() -> bool:
            return await delivered_count(engine) == TOTAL

        async with asyncio.timeout(120 * timeout_factor):
            await poll(all_delivered, procs, tmp_path)
            await poll(started(tmp_path, "C"), procs, tmp_path)  # SIGTERM now means "stop"
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            assert await asyncio.to_thread(proc.wait, 60 * timeout_factor) == 0, logs(tmp_path)

        async with engine.connect() as conn:
            rows = {int(r.id): r for r in await conn.execute(text(
                "SELECT id, status, attempt, sent_at, claimed_by, lease_until, response_code "
                "FROM notification_logs"))}
            attempts: dict[int, list[Any]] = defaultdict(list)
            for r in await conn.execute(text(
                    "SELECT notification_id, attempt, status, worker, error, response_code, "
                    "started_at, finished_at FROM notification_attempts "
                    "ORDER BY notification_id, attempt")):
                attempts[int(r.notification_id)].append(r)

        # The receiver got every queued notification, and nothing else.
        counts: Counter[str] = Counter()
        last_receipt: dict[str, float] = {}
        for sink in sinks:
            counts.update(sink.counts)
            for hit in sink.hits:
                last_receipt[hit.webhook_id] = max(last_receipt.get(hit.webhook_id, 0.0),
                                                   hit.received_at)
                assert hit.signed, "every webhook carries a Standard Webhooks signature"
        queued = {f"ntf_{i}" for i in ids}
        assert set(counts) == queued, (
            f"missing: {sorted(queued - set(counts))[:10]}, "
            f"unknown: {sorted(set(counts) - queued)[:10]}")
        assert len(counts) == TOTAL  # distinct webhook-ids: what an idempotent receiver keeps

        lost_rows: set[int] = set()
        for i in ids:
            row, tries = rows[i], attempts[i]
            # The row is final and consistent with its attempts.
            assert row.status == "delivered" and row.sent_at is not None, row
            assert row.claimed_by is None and row.lease_until is None, row
            assert row.response_code == 200, row
            assert [t.attempt for t in tries] == list(range(1, row.attempt + 1)), (row, tries)
            assert [t.status for t in tries] == ["failed"] * (len(tries) - 1) + ["delivered"], tries
            assert all(t.finished_at is not None for t in tries), tries
            for t in tries[:-1]:
                # The only failures here are sends of the killed notifier, closed at retake.
                assert t.worker == "A" and "worker lost" in (t.error or ""), t
                lost_rows.add(i)
            assert tries[-1].worker in ("B", "C"), tries  # A never got an answer
            assert tries[-1].started_at >= max(t.started_at for t in tries), tries
            # Nothing was sent after the row was settled delivered.
            assert last_receipt[f"ntf_{i}"] <= row.sent_at, (row, last_receipt[f"ntf_{i}"])
            # Each receipt was an attempt: no send without an attempt row.
            assert counts[f"ntf_{i}"] <= len(tries), (counts[f"ntf_{i}"], tries)

        # Exactly A's unanswered sends were retaken and sent again: those, and only those, were
        # received twice (same webhook-id); everything else arrived exactly once.
        assert lost_rows == killed_sends, (sorted(lost_rows ^ killed_sends)[:10])
        duplicated = {k for k, n in counts.items() if n > 1}
        assert duplicated == {f"ntf_{i}" for i in lost_rows}
        assert max(counts.values()) == 2
    finally:
        gate.set()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        for sink in sinks:
            await sink.close()
        await engine.dispose()


async def test_sigterm_mid_send_settles_every_answered_send(
    postgres_url: str, tmp_path: Path, timeout_factor: float,
) -> None:
    """A graceful stop (SIGTERM, a deploy) waits for the sends in flight and records them: no
    row the receiver answered 200 is left `sending`, to be sent again after its lease."""
    await upgrade(postgres_url)
    engine = create_engine(postgres_url)
    gate = asyncio.Event()
    sinks = [await WebhookSink(gate=gate).start() for _ in range(3)]
    proc: subprocess.Popen[bytes] | None = None
    try:
        proc = start_notifier(postgres_url, tmp_path, "A")
        async with asyncio.timeout(60 * timeout_factor):
            await poll(started(tmp_path, "A"), [proc], tmp_path)
        await queue_burst(engine, sinks)

        async def all_in_flight_received() -> bool:
            sending = (await sending_by_worker(engine))["A"]
            return sending > 0 and sum(s.distinct for s in sinks) >= sending

        async with asyncio.timeout(60 * timeout_factor):
            await poll(all_in_flight_received, [proc], tmp_path)
        proc.send_signal(signal.SIGTERM)  # t1: stop while every send waits for its answer
        gate.set()  # t2: the receiver answers them all (200), while the notifier stops
        assert await asyncio.to_thread(proc.wait, 60 * timeout_factor) == 0, logs(tmp_path)

        answered = {h.webhook_id for s in sinks for h in s.hits}
        async with engine.connect() as conn:
            status = {f"ntf_{r.id}": str(r.status) for r in await conn.execute(text(
                "SELECT id, status FROM notification_logs"))}
            attempts = {f"ntf_{r.notification_id}": (r.status, r.error) for r in await conn.execute(
                text("SELECT notification_id, status, error FROM notification_attempts"))}
        left = sorted(k for k in answered if status[k] != "delivered")
        assert not left, (f"{len(left)} of {len(answered)} answered sends not settled: "
                          f"{[(k, status[k], attempts.get(k)) for k in left[:3]]}")
    finally:
        gate.set()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for sink in sinks:
            await sink.close()
        await engine.dispose()
