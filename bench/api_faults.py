#!/usr/bin/env python
"""The API under faults (issue 10): hostile request bodies and a hung Redis, measured on a real
`defiwatch run api` process.

Setup, all created here and removed afterwards: a fresh PostgreSQL database `dwbench_faults_*`
(migrated by `defiwatch keys create`, which also makes the key: user `bench`, tier enterprise,
scopes read, ingest, alerts), a private `redis-server` on a free loopback port (no persistence;
ours alone, so SIGSTOP hangs nobody else), and `taskset -c 0 defiwatch run api` (one uvicorn
process, product wiring, default limits). This load process pins itself to core 1; PostgreSQL
and Redis are not pinned. Loopback only.

Measured, `--reps` times each:

bodies
    a `--body-mb` (300) MB body POSTed to `/v1/ingest` on a raw socket, as fast as the kernel
    takes it: (a) with `Content-Length` and no key (expect 401 before the body is read),
    (b) chunked with a valid key (expect 413 once the ingest cap has arrived), (c) with
    `Content-Length` and a valid key (expect 413 at once). After the answer the client goes on
    sending until the server closes, stops reading for `--stall-s`, or the body is all sent
    ("as much as the server reads"). Per request: status, time to the first answer byte, body
    bytes the client had handed to the kernel when the answer came (they include the socket
    buffers, see `tcp_rmem`/`tcp_wmem` in the conditions: an upper bound of what the server
    could have read before answering) and in total, body bytes the API process had taken out
    of its socket at the end (TCP_INFO `bytes_received` minus Recv-Q of the server's end, via
    `ss`; None once the server closed it; a chunked body's counts include its framing, 8 bytes
    per 64 KiB chunk), the API's CPU seconds over the whole exchange,
    and the API's RSS before, after, and peak (VmHWM, reset before each request through
    /proc/<pid>/clear_refs).
redis_hung / redis_healthy
    Redis SIGSTOPped, then each route in turn, twice: `first` after the rate limiter's
    fail-open cooldown has passed (so it pays the limiter's Redis timeout: the worst case) and
    `again` right after (within the cooldown). Routes: /healthz, /readyz, /v1/alerts/rules
    (PostgreSQL only), a query (POST /v1/query/advanced; its result cache is in Redis),
    /v1/latest and /v1/events (Redis only). Then SIGCONT, wait for /readyz 200, and the same
    again as the baseline. Status and latency per request; fail-open counter and log lines.

Prints one JSON document and writes bench/results/api_faults-<date>.json (or `--out`).

    .venv/bin/python bench/api_faults.py                   # ~2 minutes
    .venv/bin/python bench/api_faults.py --reps 3 --body-mb 100
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import platform
import re
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import redis
from measure import dist_ms, free_port, proc_cpu, write_result

from defiwatch.api.ratelimit import FAIL_OPEN_COOLDOWN_S
from defiwatch.config import Settings

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
API_CORE, LOAD_CORE = 0, 1
MIB = 1_048_576
BLOCK = 64 * 1024  # bytes per send() and per chunk of a chunked body

ROUTES: dict[str, tuple[str, str, dict[str, Any] | None]] = {
    "healthz": ("GET", "/healthz", None),
    "readyz": ("GET", "/readyz", None),
    "alerts_rules": ("GET", "/v1/alerts/rules", None),
    "query": ("POST", "/v1/query/advanced", {"dataset": "protocols", "limit": 1}),
    "latest": ("GET", "/v1/latest", None),
    "events": ("GET", "/v1/events", None),
}


def log(msg: str) -> None:
    print(f"[api-faults {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the API process, from /proc


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS since the last reset) of a process, in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = round(int(value.split()[0]) / 1024, 1)
    return out


def reset_peak(pid: int) -> None:
    """Make VmHWM start again from the current RSS (proc(5), clear_refs value 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def server_read(port: int, client_port: int) -> int | None:
    """Bytes the server process has taken out of its end of one loopback connection: what its
    kernel received (`bytes_received` of TCP_INFO, via ss) minus what still waits unread
    (Recv-Q). /proc/<pid>/io cannot tell: its rchar does not count recv() calls."""
    out = subprocess.run(["ss", "-tniH", "state", "established", "src", f"127.0.0.1:{port}",
                          "dst", f"127.0.0.1:{client_port}"], capture_output=True, text=True,
                         check=True).stdout
    received = re.search(r"bytes_received:(\d+)", out)
    return int(received.group(1)) - int(out.split()[0]) if received else None


# ---------------------------------------------------------------- hostile bodies (raw socket)


def body_blocks(total: int, *, chunked: bool) -> Iterator[bytes]:
    """A `total`-byte JSON-looking ingest body, framed as chunks when `chunked`."""
    head = b'{"points":['
    pad = b" " * BLOCK
    sent = 0
    while sent < total:
        piece = (head + pad)[:min(BLOCK, total - sent)] if sent == 0 else pad[:total - sent]
        sent += len(piece)
        yield b"%x\r\n%b\r\n" % (len(piece), piece) if chunked else piece
    if chunked:
        yield b"0\r\n\r\n"


def request_head(port: int, key: str | None, total: int, *, chunked: bool) -> bytes:
    lines = ["POST /v1/ingest HTTP/1.1", f"Host: 127.0.0.1:{port}",
             "Content-Type: application/json",
             "Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}"]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass
class Exchange:
    """What one hostile request saw, client side."""

    answer_s: float | None = None
    sent_at_answer: int | None = None
    sent: int = 0
    read: int | None = None
    done_s: float = 0.0
    response: bytes = b""
    end: str = "all sent"


def push_body(sock: socket.socket, blocks: Iterator[bytes], timeout_s: float,
              stall_s: float) -> Exchange:
    """Send `blocks` while reading the answer; see the module docstring for when it stops."""
    ex = Exchange()
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    pending = memoryview(next(blocks, b""))
    t0 = last_progress = time.perf_counter()
    while True:
        now = time.perf_counter()
        if ex.answer_s is None and now - t0 > timeout_s:
            ex.end = f"no answer within {timeout_s} s"
            break
        if ex.answer_s is not None and now - last_progress > stall_s:
            ex.end = f"server stopped reading for {stall_s} s"
            break
        for _, mask in sel.select(timeout=0.1):
            if mask & selectors.EVENT_READ:
                try:
                    data = sock.recv(65_536)
                except ConnectionResetError:
                    data = b""
                if not data:
                    ex.end = "server closed"
                    return ex
                if ex.answer_s is None:
                    ex.answer_s = time.perf_counter() - t0
                    ex.sent_at_answer = ex.sent
                ex.response += data
            if mask & selectors.EVENT_WRITE and pending:
                try:
                    n = sock.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    ex.end = "server closed"
                    return ex
                ex.sent += n
                last_progress = time.perf_counter()
                pending = pending[n:] or memoryview(next(blocks, b""))
        if not pending and ex.answer_s is not None:
            return ex
        if not pending:
            sel.modify(sock, selectors.EVENT_READ)
    return ex


def hostile_body(port: int, pid: int, key: str | None, total: int, *, chunked: bool,
                 timeout_s: float, stall_s: float) -> dict[str, Any]:
    """One hostile POST to /v1/ingest and what the API did with it."""
    head = request_head(port, key, total, chunked=chunked)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head)
        sock.setblocking(False)
        before = memory_mib(pid)
        reset_peak(pid)
        t0 = time.perf_counter()
        cpu0 = proc_cpu(pid)
        ex = push_body(sock, body_blocks(total, chunked=chunked), timeout_s, stall_s)
        ex.done_s = time.perf_counter() - t0
        if ex.end != "server closed":
            ex.read = server_read(port, sock.getsockname()[1])
        cpu = proc_cpu(pid) - cpu0
    after = memory_mib(pid)

    def body_part(read: int | None) -> int | None:
        return None if read is None else max(0, read - len(head))

    status_line, _, rest = ex.response.partition(b"\r\n")
    code = re.search(rb'"code"\s*:\s*"([a-z_]+)"', rest)
    return {
        "status": int(status_line.split()[1]) if status_line else None,
        "error_code": code.group(1).decode() if code else None,
        "answer_ms": None if ex.answer_s is None else round(ex.answer_s * 1000, 2),
        "body_bytes_sent_at_answer": ex.sent_at_answer,
        "body_bytes_sent_total": ex.sent,
        "api_body_bytes_read_at_end": body_part(ex.read),
        "api_cpu_s": round(cpu, 3),
        "end": ex.end, "end_ms": round(ex.done_s * 1000, 1),
        "rss_before_mib": before["VmRSS"], "rss_after_mib": after["VmRSS"],
        "rss_peak_mib": after["VmHWM"],
    }


BODY_CASES: dict[str, tuple[bool, bool]] = {  # name: (with a valid key, chunked)
    "no_key_content_length": (False, False),
    "valid_key_chunked": (True, True),
    "valid_key_content_length": (True, False),
}


def summarize_bodies(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    def span(field: str) -> list[Any]:
        values = [r[field] for r in runs if r[field] is not None]
        return [min(values), max(values)] if values else []

    return {"status": dict(Counter(str(r["status"]) for r in runs)),
            "answer": dist_ms([r["answer_ms"] / 1000 for r in runs if r["answer_ms"] is not None]),
            **{f"{f}_min_max": span(f) for f in (
                "body_bytes_sent_at_answer", "api_body_bytes_read_at_end",
                "end_ms", "api_cpu_s",
                "body_bytes_sent_total", "rss_before_mib", "rss_peak_mib", "rss_after_mib")},
            "ends": dict(Counter(r["end"] for r in runs))}


def measure_bodies(args: argparse.Namespace, api: Api) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (keyed, chunked) in BODY_CASES.items():
        runs = []
        for _ in range(args.reps):
            runs.append(hostile_body(api.port, api.pid, api.key if keyed else None,
                                     args.body_mb * 1_000_000, chunked=chunked,
                                     timeout_s=args.timeout_s, stall_s=args.stall_s))
            log(f"{name}: {runs[-1]['status']} in {runs[-1]['answer_ms']} ms, "
                f"peak RSS {runs[-1]['rss_peak_mib']} MiB, {runs[-1]['end']}")
        out[name] = {"summary": summarize_bodies(runs), "runs": runs}
    return out


# ---------------------------------------------------------------- a hung Redis


def timed(client: httpx.Client, route: str) -> dict[str, Any]:
    method, path, body = ROUTES[route]
    t0 = time.perf_counter()
    try:
        response = client.request(method, path, json=body)
    except httpx.HTTPError as exc:
        return {"status": None, "ms": round((time.perf_counter() - t0) * 1000, 2),
                "error": f"{type(exc).__name__}: {exc}"}
    ms = round((time.perf_counter() - t0) * 1000, 2)
    error = response.json().get("error") if response.status_code >= 400 else None
    return {"status": response.status_code, "ms": ms,
            "error": error.get("code") if isinstance(error, dict) else None}


def one_round(client: httpx.Client) -> dict[str, dict[str, Any]]:
    """Each route twice: after the limiter's fail-open cooldown has passed, then at once."""
    out = {}
    for route in ROUTES:
        time.sleep(FAIL_OPEN_COOLDOWN_S + 0.2)  # a bench pacing, not a synchronisation
        out[route] = {"first": timed(client, route), "again": timed(client, route)}
    return out


def summarize_rounds(rounds: Sequence[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for route in ROUTES:
        for variant in ("first", "again"):
            samples = [r[route][variant] for r in rounds]
            out[f"{route}.{variant}"] = {
                "status": dict(Counter(str(s["status"]) for s in samples)),
                "errors": dict(Counter(str(s["error"]) for s in samples if s["error"])),
                "latency": dist_ms([s["ms"] / 1000 for s in samples])}
    return out


def fail_open_total(client: httpx.Client) -> float:
    text = client.get("/metrics").text
    found = re.search(r"^defiwatch_ratelimit_fail_open_total (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def wait_until(check: Callable[[], object], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, redis.RedisError):
            if check():
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not happen within {timeout_s} s")


def measure_redis(args: argparse.Namespace, api: Api, redis_proc: subprocess.Popen[bytes]
                  ) -> dict[str, Any]:
    hung: list[dict[str, dict[str, Any]]] = []
    healthy: list[dict[str, dict[str, Any]]] = []
    with httpx.Client(base_url=f"http://127.0.0.1:{api.port}", timeout=args.timeout_s,
                      headers={"Authorization": f"Bearer {api.key}"}) as client:
        fail_open_before = fail_open_total(client)
        for rep in range(args.reps):
            redis_proc.send_signal(signal.SIGSTOP)
            try:
                hung.append(one_round(client))
            finally:
                redis_proc.send_signal(signal.SIGCONT)
            t0 = time.perf_counter()
            wait_until(lambda: client.get("/readyz").status_code == 200, "/readyz 200")
            ready_again_ms = round((time.perf_counter() - t0) * 1000, 1)
            healthy.append(one_round(client))
            log(f"redis rep {rep + 1}: ready again {ready_again_ms} ms after SIGCONT")
        fail_open_after = fail_open_total(client)
    log_text = api.log_path.read_text(errors="replace")
    return {"redis_hung": summarize_rounds(hung), "redis_healthy": summarize_rounds(healthy),
            "fail_open_counter_increase": fail_open_after - fail_open_before,
            "fail_open_log_lines": log_text.count("ratelimit.fail_open"),
            "rounds": {"hung": hung, "healthy": healthy}}


# ---------------------------------------------------------------- setup and teardown


@dataclass
class Api:
    pid: int
    port: int
    key: str
    log_path: Path


async def _pg_admin(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(sql, timeout=60)
    finally:
        await conn.close()


@contextlib.contextmanager
def fresh_database(args: argparse.Namespace) -> Iterator[str]:
    name = f"dwbench_faults_{secrets.token_hex(4)}"
    asyncio.run(_pg_admin(args.admin_dsn, f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+asyncpg://{args.pg_user}@{args.pg_host}:{args.pg_port}/{name}"
    finally:
        asyncio.run(_pg_admin(args.admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextlib.contextmanager
def private_redis(workdir: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        wait_until(client.ping, "redis-server answering PING")
        client.close()
        yield url, proc
    finally:
        proc.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        proc.terminate()
        proc.wait()


def create_key(env: dict[str, str]) -> str:
    done = subprocess.run([str(VENV_BIN / "defiwatch"), "keys", "create", "--user", "bench",
                           "--tier", "enterprise", "--scopes", "read,ingest,alerts"],
                          env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return next(line.strip() for line in done.stdout.splitlines()
                if line.strip().startswith("dw_"))


@contextlib.contextmanager
def api_process(env: dict[str, str], port: int, key: str, workdir: Path) -> Iterator[Api]:
    log_path = workdir / "api.log"
    with log_path.open("wb") as sink:
        proc = subprocess.Popen(["taskset", "-c", str(API_CORE), str(VENV_BIN / "defiwatch"),
                                 "run", "api"], env=env, cwd=workdir, stdout=sink,
                                stderr=subprocess.STDOUT)
    try:
        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"the API exited: {log_path.read_text()[-2000:]}")
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200

        wait_until(up, "the API answering /healthz")
        yield Api(proc.pid, port, key, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def conditions(args: argparse.Namespace) -> dict[str, Any]:
    defaults = Settings(replay_enabled=False, demo_key=False)
    net = Path("/proc/sys/net/ipv4")
    return {
        "api": f"`defiwatch run api` (1 uvicorn process), taskset -c {API_CORE}",
        "load": f"this process, core {LOAD_CORE}; raw socket for bodies, httpx for routes",
        "database": "PostgreSQL 127.0.0.1:5432, fresh database, not pinned",
        "redis": "private redis-server, no persistence, not pinned; SIGSTOP/SIGCONT",
        "body_bytes": args.body_mb * 1_000_000, "reps": args.reps,
        "api_max_ingest_body_bytes": defaults.api_max_ingest_body_bytes,
        "api_max_body_bytes": defaults.api_max_body_bytes,
        "redis_request_timeout_s": defaults.redis_request_timeout_s,
        "fail_open_cooldown_s": FAIL_OPEN_COOLDOWN_S,
        "tcp_rmem": (net / "tcp_rmem").read_text().split(),
        "tcp_wmem": (net / "tcp_wmem").read_text().split(),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setaffinity(0, {LOAD_CORE})
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dwbench-faults-") as tmp, \
            fresh_database(args) as url, private_redis(Path(tmp)) as (redis_url, redis_proc):
        port = free_port()
        env = {**os.environ, "DEFIWATCH_DATABASE_URL": url, "DEFIWATCH_REDIS_URL": redis_url,
               "DEFIWATCH_REDIS_PREFIX": f"dwbench:{secrets.token_hex(4)}:",
               "DEFIWATCH_API_PORT": str(port), "DEFIWATCH_REPLAY_ENABLED": "false",
               "DEFIWATCH_DEMO_KEY": "false", "DEFIWATCH_STATE_DIR": tmp}
        key = create_key(env)
        with api_process(env, port, key, Path(tmp)) as api:
            log(f"API pid {api.pid} on port {port}, Redis {redis_url}")
            bodies = measure_bodies(args, api)
            faults = measure_redis(args, api, redis_proc)
    return {"benchmark": "api_faults",
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
            "conditions": conditions(args), "bodies": bodies, **faults}


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="repetitions of each measurement")
    ap.add_argument("--body-mb", type=int, default=300, help="hostile body size, MB (10^6 B)")
    ap.add_argument("--timeout-s", type=float, default=60.0,
                    help="give up on an answer after this long (recorded, not raised)")
    ap.add_argument("--stall-s", type=float, default=2.0,
                    help="after the answer, stop sending once the server has read nothing "
                    "for this long")
    ap.add_argument("--pg-host", default="127.0.0.1")
    ap.add_argument("--pg-port", type=int, default=5432)
    ap.add_argument("--pg-user", default="postgres")
    ap.add_argument("--admin-dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--out", type=Path, default=None)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    write_result("api_faults", run(args), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
