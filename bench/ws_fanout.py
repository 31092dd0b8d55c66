#!/usr/bin/env python
"""WebSocket fan-out benchmark (issue 3): our Gateway vs a plain python-socketio server vs a Node
socket.io server, side by side in one run, same events, same subscription mix, same load generator.

Input: the bundled real replay (`iter_records`): consecutive points of a series become
tvl_change / price_change events (value, previous, change_pct), routed to channels with the
gateway's own `route()`. Every server gets the same events from a JSONL file and publishes them
itself, at a rate set by this orchestrator, stamping `emitted_at = time.time()` just before
publishing (ts bumped per pass so the stream's per-series dedup lets repeats through).

Servers (each a separate process pinned with `taskset -c 0`):
  ours   `Gateway` over an in-process `MemoryEventStream` (the embedded deployment), API key in a
         temp SQLite database (tier enterprise, ws_connections raised), publisher task in-process.
  sio    plain python-socketio `AsyncServer` (ASGI, uvicorn), `emit("event", ..., room=channel)`.
         No auth.
  node   Node socket.io (bench/peers/node/server.js), `io.to(channel).emit("event", ...)`. No auth.

Load generator: ONE process pinned with `taskset -c 1` for every server: asyncio + the `websockets`
sans-I/O ClientProtocol driven by a bare asyncio.Protocol per connection (no task, no queue, no
JSON decode of event frames: the frame count and `emitted_at` are read from the bytes). For the
socket.io servers it speaks Engine.IO v4 / Socket.IO v5 over the websocket transport directly
(`/socket.io/?EIO=4&transport=websocket`: open `0{..}`, `40`, `420["subscribe",[..]]` -> `430`,
ping `2` -> `3`, events `42["event",{..}]`), so all three are measured with the same client.

Per server: connect storm of N clients at --connect-rate (open loop: each connect starts on
schedule; latency = TCP connect to welcome / socket.io namespace ack), then each subscribes to its
channels; server RSS before/after (per connection = delta / connected); then phases at offered
deliveries/s (--phases), each --duration s after --warmup s: deliveries/s received, event-to-client
latency p50/p95/p99 (time.time() at receipt - emitted_at), CPU% of server and load process.

Diagnostics: --keys N (distinct API keys, round-robin: 1 = the gateway's key cache serves every
connect but the first; N = --clients = every connect is a database lookup), --profile PREFIX
(cProfile of our server during the storm and the phases), GC pauses of both processes in every
answer (`server_gc`, `load_gc`), --server-gc off|freeze (how much of the tail is the collector's),
--load-gc (the load generator's collector; off by default so its pauses are not counted as server
latency).

Prints one JSON document and writes bench/results/ws_fanout-<date>.json (or --out). Loopback only;
stops by itself; kills its child processes on failure.

    .venv/bin/python bench/ws_fanout.py                      # all three, N=10000, ~6-8 min
    .venv/bin/python bench/ws_fanout.py --servers ours --clients 2000 --duration 10
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import datetime as dt
import gc
import json
import os
import platform
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
NODE_DIR = ROOT / "bench" / "peers" / "node"
SIO_SERVER = ROOT / "bench" / "peers" / "sio_server.py"
SERVER_CORE, LOAD_CORE = 0, 1
HOST = "127.0.0.1"
SELF = str(Path(__file__).resolve())


def log(msg: str) -> None:
    print(f"[ws_fanout {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class GcPauses:
    """Garbage-collector pauses of this process (gc.callbacks), to tell a stalled event loop
    from a busy one: a full (generation 2) collection walks every live object, and 10,000
    connections are a few million of them."""

    def __init__(self) -> None:
        self.collections = 0
        self.total_s = 0.0
        self.max_s = 0.0
        self._start = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        pause = time.perf_counter() - self._start
        self.collections += 1
        self.total_s += pause
        self.max_s = max(self.max_s, pause)

    def take(self) -> dict[str, Any]:
        """Since the last take: collections, total and longest pause (ms); then reset."""
        out = {"collections": self.collections, "total_ms": round(self.total_s * 1000, 1),
               "max_ms": round(self.max_s * 1000, 1)}
        self.collections, self.total_s, self.max_s = 0, 0.0, 0.0
        return out


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def dist_ms(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    s = sorted(values)

    def at(q: float) -> float:
        return round(s[min(len(s) - 1, int(q * len(s)))] * 1000, 2)

    return {"n": len(s), "p50_ms": at(0.50), "p95_ms": at(0.95), "p99_ms": at(0.99),
            "max_ms": round(s[-1] * 1000, 2), "mean_ms": round(sum(s) / len(s) * 1000, 2)}


# ------------------------------------------------------------------------------- workload


def build_events(max_events: int) -> list[dict[str, Any]]:
    """Real replay points -> change events (dicts in the Event shape) with their channels."""
    import msgspec

    from defiwatch.domain import Event
    from defiwatch.domain.events import event_type_for
    from defiwatch.gateway.protocol import route
    from defiwatch.ingest.replay import PointRecord, iter_records

    last: dict[tuple[str, str, str], float] = {}
    out: list[dict[str, Any]] = []
    records = iter_records()
    try:
        for rec in records:
            if not isinstance(rec, PointRecord):
                continue
            key = (rec.metric, rec.subject, rec.chain)
            prev = last.get(key)
            last[key] = rec.value
            if prev is None or prev == rec.value:
                continue
            ev = Event(type=str(event_type_for(rec.metric)), metric=rec.metric,
                       subject=rec.subject, chain=rec.chain, value=rec.value, previous=prev,
                       change_abs=rec.value - prev,
                       change_pct=(rec.value - prev) / prev * 100 if prev else None,
                       change_1h=None, change_24h=None, change_7d=None, ts=rec.ts,
                       emitted_at=0.0, source=rec.source or "defillama")
            channels = route(ev)
            if not channels:
                continue
            out.append({"event": msgspec.to_builtins(ev), "channels": channels})
    finally:
        records.close()
    # The whole replay, thinned evenly to `max_events` (keeps its mix of types), then shuffled so
    # that any window of a few seconds has about the pool's mean fan-out (the offered rate holds).
    stride = max(1, len(out) // max_events)
    pool = out[::stride][:max_events]
    random.Random(7).shuffle(pool)
    return pool


def build_plan(events: list[dict[str, Any]], n: int, per_client: int, firehose_share: float,
               seed: int) -> tuple[list[list[str]], dict[str, Any]]:
    """Each client: `per_client` protocol/token/chain channels, popularity-weighted (by how many
    events the channel gets, Zipf-like by rank); `firehose_share` of clients also `tvl_changes`."""
    rng = random.Random(seed)
    freq: Counter[str] = Counter()
    for e in events:
        for ch in e["channels"]:
            if (ch.startswith(("protocol:", "token:", "chain:")) and ch.count(":") == 1) or \
                    ch.startswith("token:"):
                freq[ch] += 1
    ranked = [ch for ch, _ in freq.most_common(2000)]
    weights = [1.0 / (i + 1) for i in range(len(ranked))]
    plan: list[list[str]] = []
    for _ in range(n):
        chosen: list[str] = []
        while len(chosen) < per_client:
            ch = rng.choices(ranked, weights)[0]
            if ch not in chosen:
                chosen.append(ch)
        if rng.random() < firehose_share:
            chosen.append("tvl_changes")
        plan.append(chosen)
    subs: Counter[str] = Counter(ch for chans in plan for ch in chans)
    fanout = [sum(subs.get(ch, 0) for ch in e["channels"]) for e in events]
    mean_fanout = sum(fanout) / len(fanout)
    info = {"clients": n, "channels_per_client": per_client,
            "tvl_changes_share": firehose_share, "distinct_channels_subscribed": len(subs),
            "subscriptions": sum(subs.values()),
            "expected_deliveries_per_event_mean": round(mean_fanout, 2),
            "top_channels": subs.most_common(5)}
    return plan, info


# ------------------------------------------------------------------------------- our server


async def serve_ours(args: argparse.Namespace) -> None:
    import msgspec

    from defiwatch.app import open_platform
    from defiwatch.config import Settings
    from defiwatch.domain import Event
    from defiwatch.gateway import Gateway
    from defiwatch.gateway import metrics as gm
    from defiwatch.ops import configure_logging
    from defiwatch.store.keys import create_key

    configure_logging("console", "error")
    raise_nofile()
    if args.server_gc == "off":
        gc.disable()  # diagnostic only: how much of the tail is the collector's
    elif args.server_gc == "freeze":
        # The gateway's opt-in policy (gateway/gcpolicy.py; app.py does not install it yet):
        # survivors of each full collection are frozen, thawed every 10 minutes.
        from defiwatch.gateway.gcpolicy import FreezeAfterFullCollections
        FreezeAfterFullCollections().install()
    if args.backlog:
        # Diagnostic variant (`ours-backlog`): websockets' serve() leaves asyncio's default
        # listen backlog (100); a full accept queue drops SYNs, which clients retry after 1 s.
        import functools
        base = asyncio.base_events.BaseEventLoop
        base.create_server = functools.partialmethod(  # type: ignore[method-assign]
            base.create_server, backlog=args.backlog)
    tmp = Path(args.tmp)
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{tmp / 'ws.db'}", state_dir=tmp, demo_key=False,
        gateway_port=0, gateway_host=HOST, gateway_connect_rate=100_000.0,
        gateway_max_connections=args.clients + 1_000, stream_retention=100_000,
        tiers={"enterprise": {"ws_connections": args.clients + 1_000}})
    events = [(msgspec.convert(e["event"], Event), e["channels"]) for e in args.pool]
    async with open_platform(settings) as p:
        keys: list[str] = []
        async with p.engine.begin() as conn:
            # --keys N: N users with one key each, used round-robin by the clients. One key for
            # all (the default) makes every connect but the first a cache hit in the gateway's
            # key cache; N = --clients makes every connect a database lookup.
            for i in range(max(1, args.keys)):
                key, _ = await create_key(conn, user=f"bench-{i}", tier="enterprise",
                                          scopes=["read"], tiers=list(settings.tiers))
                keys.append(key)
        keys_file = tmp / "keys.json"
        keys_file.write_text(json.dumps(keys))
        gw = Gateway(settings=settings, engine=p.engine, stream=p.stream, cache=p.cache,
                     alerts=p.alerts)
        await gw.start()
        state = {"rate": 0.0, "published": 0}

        async def publisher() -> None:
            # ts rewritten to a strictly increasing sequence: the pool is shuffled and repeats,
            # and the stream drops an event whose ts does not increase for its series.
            i, seq, tick = 0, 1_700_000_000, 0.01
            t0, sent = time.monotonic(), 0.0
            while True:
                await asyncio.sleep(tick)
                rate = state["rate"]
                now = time.monotonic()
                if rate <= 0:
                    t0, sent = now, 0.0
                    continue
                due = int(rate * (now - t0) - sent)
                if due <= 0:
                    continue
                batch = []
                stamp = time.time()
                for _ in range(due):
                    ev, _ch = events[i]
                    seq += 1
                    batch.append(msgspec.structs.replace(ev, ts=seq, emitted_at=stamp, offset=0))
                    i = (i + 1) % len(events)
                await p.stream.publish(batch)
                sent += due
                state["published"] += due

        if args.server_gc == "startup":
            # Diagnostic: everything allocated so far (imports, platform, event pool) lives for
            # the whole process; frozen, no later full collection walks it again.
            gc.collect()
            gc.freeze()
        pub = asyncio.create_task(publisher())
        print(json.dumps({"ready": True, "port": gw.port, "url": gw.url,
                          "keys_file": str(keys_file)}), flush=True)
        try:
            gc_pauses = GcPauses()
            await control_loop(state, lambda: {
                "connections": gw.connection_count, "gc": gc_pauses.take(),
                "frames_sent": sum(s.value for m in gm.FRAMES_SENT.collect()
                                   for s in m.samples if s.name.endswith("_total"))})
        finally:
            pub.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pub
            await gw.stop()


async def control_loop(state: dict[str, Any], stats: Any) -> None:
    """stdin commands: `rate R` (events/s), `stats`, `profile-start`, `profile-dump PATH`,
    `stop`; one JSON line answers each."""
    import cProfile

    profiler = cProfile.Profile()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = (await reader.readline()).decode().strip()
        if not line or line == "stop":
            return
        cmd, *rest = line.split()
        if cmd == "rate":
            state["rate"] = float(rest[0])
        elif cmd == "profile-start":
            profiler.enable()
        elif cmd == "profile-dump":
            # cProfile of the server's process (all its threads' Python code run on this one:
            # cProfile follows the calling thread only, so aiosqlite's worker threads are not
            # in it). Dumped and reset, so each dump covers the span since `profile-start`.
            profiler.disable()
            profiler.dump_stats(rest[0])
            profiler.clear()
        print(json.dumps({"ok": cmd, "published": state["published"], **stats()}), flush=True)


# ------------------------------------------------------------------------------- load generator


class LoadGen:
    def __init__(self, args: argparse.Namespace) -> None:
        self.kind = args.kind
        self.url = args.url
        self.keys: list[str] = json.loads(Path(args.keys_file).read_text()) if args.keys_file \
            else [""]
        self.plan: list[list[str]] = json.loads(Path(args.plan).read_text())
        self.count = 0
        self.lat = array.array("d")
        self.sample_every = max(1, args.sample_every)
        self.clients: list[Client] = []
        self.connect_lat: list[float] = []
        self.failures: Counter[str] = Counter()
        self.subscribed = 0
        self.closed = 0


class Client(asyncio.Protocol):
    __slots__ = ("acks", "buf", "channels", "done", "key", "lg", "proto", "raw",
                 "subscribed_fut", "transport")

    def __init__(self, lg: LoadGen, channels: list[str], done: asyncio.Future[float],
                 subscribed: asyncio.Future[None], key: str) -> None:
        from websockets.client import ClientProtocol
        from websockets.uri import parse_uri

        self.lg = lg
        self.key = key
        self.channels = channels
        self.done = done
        self.subscribed_fut = subscribed
        self.proto = ClientProtocol(parse_uri(lg.url), max_size=None)
        self.transport: asyncio.Transport | None = None
        self.acks = 0
        # After the first text frame the bytes are parsed here, not by `proto` (3-4x cheaper per
        # frame: server frames are unmasked and unfragmented); `proto` still builds what we send.
        self.raw = False
        self.buf = b""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        req = self.proto.connect()
        if self.lg.kind == "ours":
            req.headers["Authorization"] = f"Bearer {self.key}"
        self.proto.send_request(req)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lg.closed += 1
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"closed before welcome: {exc!r}"))

    def flush(self) -> None:
        t = self.transport
        for data in self.proto.data_to_send():
            if data:
                t.write(data)  # type: ignore[union-attr]
            else:
                t.close()  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        if self.raw:
            return self.raw_received(data)
        from websockets.frames import Frame, Opcode
        from websockets.http11 import Response

        self.proto.receive_data(data)
        for ev in self.proto.events_received():
            if type(ev) is Frame:
                if ev.opcode is Opcode.TEXT:
                    self.on_text(ev.data)
                    # Switch only when `proto` holds no partial frame (it nearly never does here).
                    self.raw = not self.proto.reader.buffer
            elif isinstance(ev, Response) and ev.status_code != 101 and not self.done.done():
                self.done.set_exception(ConnectionError(f"http {ev.status_code}"))
        self.flush()

    def raw_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b1 = buf[pos + 1] & 0x7F
            if b1 < 126:
                h, ln = 2, b1
            elif b1 == 126:
                if n - pos < 4:
                    break
                h, ln = 4, int.from_bytes(buf[pos + 2:pos + 4])
            else:
                if n - pos < 10:
                    break
                h, ln = 10, int.from_bytes(buf[pos + 2:pos + 10])
            end = pos + h + ln
            if end > n:
                break
            op = buf[pos] & 0x0F
            if op == 1:
                self.on_text(buf[pos + h:end])
            elif op == 9:  # ping
                self.proto.send_pong(buf[pos + h:end])
                self.flush()
            elif op == 8:  # close
                if self.transport is not None:
                    self.transport.close()
                return
            pos = end
        self.buf = buf[pos:]

    def send(self, text: bytes) -> None:
        self.proto.send_text(text)
        if self.raw:
            self.flush()

    def on_text(self, data: bytes) -> None:
        lg = self.lg
        if lg.kind == "ours":
            if data.startswith(b'{"type":"event"'):
                return self.on_event(data)
            msg = json.loads(data)
            t = msg.get("type")
            if t == "welcome":
                self.done.set_result(time.monotonic())
                for i, ch in enumerate(self.channels):
                    self.send(json.dumps({"type": "subscribe", "id": i, "channel": ch}).encode())
            elif t == "ack":
                self.acks += 1
                if self.acks == len(self.channels) and not self.subscribed_fut.done():
                    self.subscribed_fut.set_result(None)
            elif t == "error":
                lg.failures[f"error:{msg['error']['code']}"] += 1
        else:  # Engine.IO v4 / Socket.IO v5 over the websocket transport
            if data.startswith(b'42["event"'):
                return self.on_event(data)
            if data == b"2":
                self.send(b"3")
            elif data.startswith(b"0{"):
                self.send(b"40")
            elif data.startswith(b"40"):
                self.done.set_result(time.monotonic())
                self.send(b'420["subscribe",' + json.dumps(self.channels).encode() + b"]")
            elif data.startswith(b"430"):
                if not self.subscribed_fut.done():
                    self.subscribed_fut.set_result(None)
            elif data.startswith(b"44"):
                lg.failures["connect_error"] += 1

    def on_event(self, data: bytes) -> None:
        lg = self.lg
        lg.count += 1
        if lg.count % lg.sample_every == 0:
            i = data.find(b'"emitted_at":')
            if i >= 0:
                j = i + 13
                k = data.find(b",", j)
                lg.lat.append(time.time() - float(data[j:k]))


async def run_load(args: argparse.Namespace) -> None:
    raise_nofile()
    gc_pauses = GcPauses()
    if args.load_gc == "off":
        # The load generator's own full collections (10,000 client connections: 100-170 ms
        # each) stall its loop and would be counted as server latency. It runs for minutes
        # and keeps every client to the end, so not collecting cycles costs little memory.
        gc.disable()
    lg = LoadGen(args)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    host, port = HOST, int(args.url.split(":")[2].split("/")[0])

    async def connect_one(channels: list[str], key: str) -> None:
        done: asyncio.Future[float] = loop.create_future()
        subscribed: asyncio.Future[None] = loop.create_future()
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(args.connect_timeout):
                _transport, client = await loop.create_connection(
                    lambda: Client(lg, channels, done, subscribed, key), host, port)
                lg.clients.append(client)
                t1 = await done
                lg.connect_lat.append(t1 - t0)
                await subscribed
                lg.subscribed += 1
        except TimeoutError:
            lg.failures["timeout"] += 1
        except Exception as exc:
            lg.failures[str(exc)[:60]] += 1

    while True:
        line = (await reader.readline()).decode().strip()
        if not line or line == "quit":
            break
        cmd, *rest = line.split()
        if cmd == "connect":
            rate = float(rest[0])
            t0 = time.monotonic()
            tasks = []
            for i, chans in enumerate(lg.plan):
                delay = t0 + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(loop.create_task(connect_one(chans, lg.keys[i % len(lg.keys)])))
            issued = time.monotonic() - t0
            await asyncio.gather(*tasks)
            print(json.dumps({
                "attempted": len(lg.plan), "connected": len(lg.connect_lat),
                "subscribed": lg.subscribed, "failures": dict(lg.failures.most_common(5)),
                "offered_connects_per_s": rate,
                "achieved_connect_issue_rate_per_s": round(len(lg.plan) / issued, 1),
                "storm_duration_s": round(time.monotonic() - t0, 2),
                "connect_latency": dist_ms(lg.connect_lat),
                "load_gc": gc_pauses.take()}), flush=True)
        elif cmd == "measure":
            seconds = float(rest[0])
            lg.count, lg.lat = 0, array.array("d")
            c0, t0 = lg.closed, time.monotonic()
            await asyncio.sleep(seconds)
            n, lat, el = lg.count, lg.lat, time.monotonic() - t0
            print(json.dumps({"deliveries": n, "deliveries_per_s": round(n / el, 1),
                              "seconds": round(el, 2), "closed_during": lg.closed - c0,
                              "latency": dist_ms(lat), "latency_sampled_every": lg.sample_every,
                              "open": len(lg.clients) - lg.closed}), flush=True)
    for c in lg.clients:
        if c.transport is not None:
            c.transport.abort()


# ------------------------------------------------------------------------------- orchestrator


def listen_overflows() -> int:
    """TcpExt ListenOverflows: SYNs dropped because an accept queue was full (host-wide)."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split(), values.split(), strict=False))["ListenOverflows"])
    return -1


def core_ticks() -> dict[str, list[int]]:
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *vals = line.split()
        if name.startswith("cpu") and name != "cpu":
            out[name] = [int(v) for v in vals[:8]]
    return out


def core_usage(before: dict[str, list[int]], after: dict[str, list[int]]) -> dict[str, Any]:
    """Per core, % of the interval: user, system, softirq, steal, idle (host-wide, every process:
    shows when a pinned process is short of CPU because something else ran on its core)."""
    out = {}
    for cpu, b in before.items():
        d = [x - y for x, y in zip(after[cpu], b, strict=False)]
        total = sum(d) or 1
        out[cpu] = {k: round(d[i] / total * 100, 1) for k, i in
                    (("user", 0), ("system", 2), ("idle", 3), ("softirq", 6), ("steal", 7))}
    return out


def proc_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Child:
    """A child process speaking one JSON line per command on stdin/stdout."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name, self.proc = name, proc

    @classmethod
    async def start(cls, name: str, cmd: list[str], cwd: Path | None = None,
                    stderr_path: Path | None = None) -> Child:
        with contextlib.ExitStack() as stack:
            err: Any = (stack.enter_context(stderr_path.open("wb")) if stderr_path
                        else subprocess.DEVNULL)
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err,
                cwd=cwd, start_new_session=True, limit=1 << 20)
        return cls(name, proc)

    async def read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
            if not line:
                raise RuntimeError(f"{self.name} exited (rc={self.proc.returncode})")
            with contextlib.suppress(json.JSONDecodeError):
                return json.loads(line)  # type: ignore[no-any-return]

    async def ask(self, cmd: str, timeout: float = 30) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((cmd + "\n").encode())
        await self.proc.stdin.drain()
        return await self.read(timeout)

    async def stop(self, cmd: str = "stop") -> None:
        if self.proc.returncode is not None:
            return
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            self.proc.stdin.write((cmd + "\n").encode())
            await self.proc.stdin.drain()
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 15)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()


def server_cmd(name: str, args: argparse.Namespace, events: Path, tmp: Path) -> tuple[list[str], Path | None]:
    pin = ["taskset", "-c", str(SERVER_CORE)]
    if name in ("ours", "ours-backlog"):
        return [*pin, sys.executable, SELF, "_serve-ours", "--events", str(events),
                "--tmp", str(tmp), "--clients", str(args.clients),
                "--backlog", str(args.backlog if name == "ours-backlog" else 0),
                "--keys", str(args.keys), "--server-gc", args.server_gc], None
    if name == "sio":
        return [*pin, sys.executable, str(SIO_SERVER), "--events", str(events)], None
    if name == "node":
        return [*pin, args.node, "server.js", str(events)], NODE_DIR
    raise ValueError(name)


async def bench_server(name: str, args: argparse.Namespace, events: Path, plan_path: Path,
                       info: dict[str, Any], tmp: Path) -> dict[str, Any]:
    res: dict[str, Any] = {"loadavg_before": os.getloadavg()}
    cmd, cwd = server_cmd(name, args, events, tmp)
    server = await Child.start(name, cmd, cwd, tmp / f"{name}.stderr")
    load: Child | None = None
    try:
        ready = await server.read(120)
        url = ready["url"]
        res["url"] = url
        pid = server.proc.pid
        await asyncio.sleep(2)
        rss0 = proc_rss_kib(pid)
        load = await Child.start("load", [
            "taskset", "-c", str(LOAD_CORE), sys.executable, SELF,
            "_load", "--kind", "ours" if name.startswith("ours") else "sio", "--url", url,
            "--keys-file", ready.get("keys_file", ""), "--plan", str(plan_path),
            "--connect-timeout", str(args.connect_timeout),
            "--sample-every", str(args.sample_every), "--load-gc", args.load_gc], None,
            tmp / f"load-{name}.stderr")
        profile = args.profile if name.startswith("ours") else None
        if profile:
            await server.ask("profile-start")
        log(f"{name}: connect storm of {args.clients} at {args.connect_rate}/s")
        s_cpu, l_cpu, t = proc_cpu_s(pid), proc_cpu_s(load.proc.pid), time.monotonic()
        overflows = listen_overflows()
        await server.ask("stats")  # resets the server's GC pause tally
        storm = await load.ask(f"connect {args.connect_rate}",
                               timeout=args.clients / args.connect_rate + args.connect_timeout + 60)
        el = time.monotonic() - t
        storm["server_gc"] = (await server.ask("stats")).get("gc")
        storm["server_cpu_pct"] = round((proc_cpu_s(pid) - s_cpu) / el * 100, 1)
        storm["load_cpu_pct"] = round((proc_cpu_s(load.proc.pid) - l_cpu) / el * 100, 1)
        storm["listen_overflows_host"] = listen_overflows() - overflows
        res["connect_storm"] = storm
        if profile:
            await server.ask(f"profile-dump {profile}-{name}-storm.prof")
            await server.ask("profile-start")
        log(f"{name}: {storm['connected']} connected, {storm['subscribed']} subscribed, "
            f"connect p95 {storm['connect_latency'].get('p95_ms')} ms, failures {storm['failures']}, "
            f"gc server {storm['server_gc']} load {storm.get('load_gc')}")
        await asyncio.sleep(3)
        rss1 = proc_rss_kib(pid)
        held = max(1, storm["subscribed"])
        res["memory"] = {"rss_before_kib": rss0, "rss_after_kib": rss1,
                         "connections_held": storm["subscribed"],
                         "per_connection_kib": round((rss1 - rss0) / held, 2)}
        res["phases"] = []
        fan = info["expected_deliveries_per_event_mean"] * storm["subscribed"] / info["clients"]
        for offered in args.phases:
            rate = offered / max(fan, 1e-9)
            await server.ask(f"rate {rate}")
            await asyncio.sleep(args.warmup)
            s_cpu, l_cpu, t = proc_cpu_s(pid), proc_cpu_s(load.proc.pid), time.monotonic()
            cores0 = core_ticks()
            st0 = await server.ask("stats")
            m = await load.ask(f"measure {args.duration}", timeout=args.duration + 60)
            st1 = await server.ask("stats")
            el = time.monotonic() - t
            phase = {"offered_deliveries_per_s": offered, "event_rate_per_s": round(rate, 1),
                     **m,
                     "server_cpu_pct": round((proc_cpu_s(pid) - s_cpu) / el * 100, 1),
                     "load_cpu_pct": round((proc_cpu_s(load.proc.pid) - l_cpu) / el * 100, 1),
                     "events_published": st1["published"] - st0["published"],
                     "server_rss_kib": proc_rss_kib(pid), "loadavg": os.getloadavg(),
                     "cores": core_usage(cores0, core_ticks())}
            phase["server_gc"] = st1.get("gc")
            if "frames_sent" in st1:
                phase["server_frames_sent_per_s"] = round(
                    (st1["frames_sent"] - st0["frames_sent"]) / el, 1)
            res["phases"].append(phase)
            log(f"{name}: offered {offered}/s -> {m['deliveries_per_s']}/s, latency "
                f"p50/p99 {m['latency'].get('p50_ms')}/{m['latency'].get('p99_ms')} ms, "
                f"cpu server {phase['server_cpu_pct']}% load {phase['load_cpu_pct']}%")
            await server.ask("rate 0")
            # Let the backlog drain so the next phase starts clean (a saturated server can hold
            # seconds of frames); then stop stepping up once the server cannot keep up.
            drain_t = time.monotonic()
            while time.monotonic() - drain_t < args.drain_timeout:
                if (await load.ask("measure 1", timeout=60))["deliveries"] == 0:
                    break
            phase["drain_s"] = round(time.monotonic() - drain_t, 1)
            if m["deliveries_per_s"] < 0.8 * offered:
                res["stopped_stepping_up"] = (
                    f"received {m['deliveries_per_s']}/s < 80 % of offered {offered}/s")
                break
        if profile:
            await server.ask(f"profile-dump {profile}-{name}-phases.prof")
    except Exception as exc:
        res["error"] = repr(exc)
        log(f"{name}: FAILED {exc!r}")
    finally:
        if load is not None:
            await load.stop("quit")
        await server.stop()
    return res


def versions(args: argparse.Namespace) -> dict[str, Any]:
    import engineio
    import msgspec
    import socketio
    import uvicorn
    import websockets

    from defiwatch import __version__

    def ver(mod: Any, dist: str) -> str:
        from importlib.metadata import version
        return getattr(mod, "__version__", None) or version(dist)

    node = subprocess.run([args.node, "--version"], capture_output=True, text=True).stdout.strip()
    sio_js = json.loads((NODE_DIR / "node_modules" / "socket.io" / "package.json").read_text()
                        )["version"] if (NODE_DIR / "node_modules").exists() else None
    return {"defiwatch": __version__, "python": platform.python_version(),
            "websockets": ver(websockets, "websockets"), "msgspec": msgspec.__version__,
            "python-socketio": ver(socketio, "python-socketio"),
            "python-engineio": ver(engineio, "python-engineio"),
            "uvicorn": ver(uvicorn, "uvicorn"), "node": node, "socket.io (npm)": sio_js}


def targets(results: dict[str, Any], n: int) -> dict[str, Any]:
    ours = results.get("ours", {})
    if "memory" not in ours:
        return {"evaluated": False}
    phases = ours.get("phases", [])
    at50 = next((p for p in phases if p["offered_deliveries_per_s"] == 50_000), None)
    best = max((p["deliveries_per_s"] for p in phases), default=None)
    held = ours["memory"]["connections_held"]
    return {
        "connections_10000_held": {"value": held, "met": held >= 10_000},
        "memory_per_connection_<_30_kib": {"value": ours["memory"]["per_connection_kib"],
                                           "met": ours["memory"]["per_connection_kib"] < 30},
        "deliveries_>=_100000_per_s": {"value": best, "met": bool(best and best >= 100_000)},
        "p99_<_100_ms_at_10000_conns_50000_per_s": {
            "value": at50 and at50["latency"].get("p99_ms"),
            "met": bool(at50 and held >= 10_000 and at50["latency"].get("p99_ms") is not None
                        and at50["latency"]["p99_ms"] < 100
                        and at50["deliveries_per_s"] >= 0.95 * 50_000)},
        "connect_p95_<_50_ms_at_500_per_s": {
            "value": ours["connect_storm"]["connect_latency"].get("p95_ms"),
            "met": (ours["connect_storm"]["connect_latency"].get("p95_ms") or 1e9) < 50},
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    raise_nofile()
    tmp = Path(tempfile.mkdtemp(prefix="ws_fanout-"))
    try:
        log("building events from the bundled replay")
        events = build_events(args.events)
        ev_path = tmp / "events.jsonl"
        ev_path.write_text("".join(json.dumps(e, separators=(",", ":")) + "\n" for e in events))
        plan, info = build_plan(events, args.clients, args.channels_per_client,
                                args.tvl_changes_share, args.seed)
        plan_path = tmp / "plan.json"
        plan_path.write_text(json.dumps(plan))
        doc: dict[str, Any] = {
            "bench": "ws_fanout", "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "conditions": {
                "nproc": os.cpu_count(), "loadavg_at_start": os.getloadavg(),
                "kernel": platform.release(), "versions": versions(args),
                "pinning": f"each server taskset -c {SERVER_CORE}; load generator (one process) "
                           f"taskset -c {LOAD_CORE}; servers run one after another",
                "load_generator": "one python process: asyncio.Protocol per connection, "
                                  "websockets sans-I/O ClientProtocol for the handshake and all "
                                  "client frames, server frames parsed inline after the first "
                                  "(no per-message task/queue/JSON); raw Engine.IO v4 websocket "
                                  "transport for the socket.io servers",
                "clients": args.clients, "connect_rate_per_s": args.connect_rate,
                "phases_offered_deliveries_per_s": args.phases, "warmup_s": args.warmup,
                "duration_s": args.duration, "events_in_pool": len(events),
                "event_types": dict(Counter(e["event"]["type"] for e in events)),
                "subscription_mix": info,
                "peers_auth": "ours: API key per connection (SQLite lookup, cached by the "
                              "gateway for 60 s), --keys distinct keys round-robin; peers: none",
                "api_keys": args.keys,
            },
            "results": {},
        }
        for name in args.servers:
            log(f"== {name} (load average {os.getloadavg()})")
            doc["results"][name] = await bench_server(name, args, ev_path, plan_path, info, tmp)
        doc["conditions"]["loadavg_at_end"] = os.getloadavg()
        doc["targets_ours"] = targets(doc["results"], args.clients)
        return doc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode")
    so = sub.add_parser("_serve-ours")
    so.add_argument("--events", required=True)
    so.add_argument("--tmp", required=True)
    so.add_argument("--clients", type=int, default=10_000)
    so.add_argument("--backlog", type=int, default=0)
    so.add_argument("--keys", type=int, default=1)
    so.add_argument("--server-gc", choices=["on", "off", "freeze", "startup"], default="freeze")
    ld = sub.add_parser("_load")
    ld.add_argument("--kind", choices=["ours", "sio"], required=True)
    ld.add_argument("--url", required=True)
    ld.add_argument("--keys-file", default="")
    ld.add_argument("--load-gc", choices=["on", "off"], default="off")
    ld.add_argument("--plan", required=True)
    ld.add_argument("--connect-timeout", type=float, default=30)
    ld.add_argument("--sample-every", type=int, default=1)
    p.add_argument("--servers", nargs="+", default=["ours", "ours-backlog", "sio", "node"],
                   choices=["ours", "ours-backlog", "sio", "node"],
                   help="ours-backlog: our gateway with the listen backlog raised to --backlog "
                        "(a diagnostic variant, patched in the bench process, not in src/)")
    p.add_argument("--backlog", type=int, default=4096)
    p.add_argument("--clients", type=int, default=10_000)
    p.add_argument("--connect-rate", type=float, default=500)
    p.add_argument("--connect-timeout", type=float, default=30)
    p.add_argument("--phases", type=int, nargs="+", default=[10_000, 50_000, 100_000, 150_000],
                   help="offered deliveries/s per measured phase (stops stepping up once a server "
                        "delivers < 80 %% of the offer)")
    p.add_argument("--duration", type=float, default=10)
    p.add_argument("--drain-timeout", type=float, default=30)
    p.add_argument("--warmup", type=float, default=3)
    p.add_argument("--events", type=int, default=20_000, help="events in the replayed pool")
    p.add_argument("--channels-per-client", type=int, default=3)
    p.add_argument("--tvl-changes-share", type=float, default=0.05)
    p.add_argument("--sample-every", type=int, default=1)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--node", default=shutil.which("node") or "node")
    p.add_argument("--out", type=Path)
    p.add_argument("--load-gc", choices=["on", "off"], default="off",
                   help="the load generator's garbage collector (off: its pauses are not "
                        "counted as server latency)")
    p.add_argument("--server-gc", choices=["on", "off", "freeze", "startup"], default="freeze",
                   help="our server's garbage collector: freeze (default: gateway.gcpolicy, as "
                        "`defiwatch run` installs it with the gateway role), on (CPython's "
                        "default), startup (gc.freeze() once before the storm), off "
                        "(diagnostic: how much of the tail is collector pauses)")
    p.add_argument("--keys", type=int, default=1,
                   help="distinct API keys (one user each) the clients use round-robin (ours); "
                        "1 = every connect after the first hits the gateway's key cache")
    p.add_argument("--profile", help="cProfile our server: writes PROFILE-<server>-storm.prof "
                                     "(connect storm) and PROFILE-<server>-phases.prof (load "
                                     "phases); slows the server, so not for reported numbers")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.mode == "_serve-ours":
        args.pool = [json.loads(line) for line in Path(args.events).read_text().splitlines()]
        asyncio.run(serve_ours(args))
        return 0
    if args.mode == "_load":
        asyncio.run(run_load(args))
        return 0
    if "node" in args.servers and not (NODE_DIR / "node_modules").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True)

    async def guarded() -> dict[str, Any]:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        return await main_async(args)

    doc = asyncio.run(guarded())
    text_out = json.dumps(doc, indent=2, default=str)
    out = args.out or RESULTS / f"ws_fanout-{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text_out + "\n")
    print(text_out)
    log(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
