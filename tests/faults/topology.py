"""The production topology as separate processes: a PostgreSQL and a Redis of the suite's own
(free ports, throw-away data directory, so CI's services are untouched) and one
`defiwatch run <role>` child per role. The harness plays the supervisor: it kills, stops and
restarts these processes, and judges readiness through each role's own `/readyz`."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from loopback import free_port

__all__ = ["ROLES", "PostgresServer", "RedisServer", "RoleProcess", "Topology",
           "missing_binaries"]

ROLES = ("api", "processor", "gateway", "alerts", "notifier")

# Shortened so that recovery after a kill is measured in seconds, not in production leases;
# docs/operations.md states these next to the measured numbers.
SHORTENED = {
    "DEFIWATCH_NOTIFIER_LEASE_S": "5",  # a killed notifier's claims are retaken after this
    "DEFIWATCH_ALERTS_CLAIM_IDLE_S": "3",  # a killed alert worker's pending entries, likewise
    "DEFIWATCH_NOTIFY_RETRY_BASE_DELAY_S": "1",  # first retry of a send lost with its worker
    "DEFIWATCH_NOTIFY_WEBHOOK_TIMEOUT_S": "2",  # below the lease (the receiver is local)
}


def _pg_bin() -> Path | None:
    """The newest installed PostgreSQL's binaries (Debian layout: /usr/lib/postgresql/15/bin)."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/postgres")]
    return max(found, key=lambda p: float(p.parent.name), default=None)


def missing_binaries() -> list[str]:
    """Server binaries this suite needs and cannot find."""
    missing = [] if _pg_bin() else ["/usr/lib/postgresql/*/bin/postgres"]
    return missing + ([] if shutil.which("redis-server") else ["redis-server"])


class _Server:
    """A server child process whose output goes to a log file (appended across restarts)."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, args: Sequence[str], *, cwd: Path | None = None,
               env: dict[str, str] | None = None, user: str | None = None) -> None:
        with self.log.open("ab") as sink:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, cwd=cwd,
                                         env=env, user=user, group=user,
                                         extra_groups=[] if user else None)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float = 30.0) -> int:
        """Reap the process (in a thread: the event loop keeps serving the workload)."""
        assert self.proc is not None
        return await asyncio.to_thread(self.proc.wait, timeout)

    def terminate(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class PostgresServer(_Server):
    """PostgreSQL in a temporary cluster, trust auth, fsync off. PostgreSQL refuses to run as
    root, so under root the cluster belongs to (and runs as) the `postgres` user."""

    def __init__(self, root: Path) -> None:
        super().__init__(root / "postgres.log")
        bin_dir = _pg_bin()
        assert bin_dir is not None
        self.bin = bin_dir
        self.root = root
        self.data = root / "pgdata"
        self.port = free_port()
        self._user = "postgres" if os.geteuid() == 0 else None
        if self._user:
            shutil.chown(root, self._user, self._user)

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def init(self) -> None:
        subprocess.run([str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U",
                        "postgres", "-E", "UTF8", "--no-sync"], check=True, capture_output=True,
                       user=self._user, group=self._user, extra_groups=[] if self._user else None)

    def start(self) -> None:
        self._spawn([str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
                     "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.root}",
                     "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                     "-c", "max_connections=300"], user=self._user)

    async def stop_fast(self) -> None:
        """`pg_ctl stop -m fast`: SIGINT aborts open transactions and disconnects clients."""
        self.signal(signal.SIGINT)
        await self.wait_exit()

    async def wait_accepting(self, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while True:
                done = await asyncio.create_subprocess_exec(
                    str(self.bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port))
                if await done.wait() == 0:
                    return
                await asyncio.sleep(0.1)  # polling a starting server


class RedisServer(_Server):
    """Redis without persistence: a restart after kill -9 comes back empty, as data loss does."""

    def __init__(self, root: Path) -> None:
        super().__init__(root / "redis.log")
        self.root = root
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self._spawn(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                     "--save", "", "--appendonly", "no", "--dir", str(self.root)])

    async def wait_accepting(self, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while True:
                with contextlib.suppress(OSError):
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                    writer.write(b"PING\r\n")
                    answer = await reader.readline()
                    writer.close()
                    await writer.wait_closed()
                    if answer.startswith(b"+PONG"):
                        return
                await asyncio.sleep(0.05)  # polling a starting server


class RoleProcess(_Server):
    """One `defiwatch run <role>` child."""

    def __init__(self, role: str, root: Path, env: dict[str, str]) -> None:
        super().__init__(root / f"{role}.log")
        self.role = role
        self.root = root
        self.env = env
        self.ops_port = int(env["DEFIWATCH_OPS_PORT"]) if "DEFIWATCH_OPS_PORT" in env else None

    def start(self) -> None:
        self._spawn([sys.executable, "-m", "defiwatch", "run", self.role], cwd=self.root,
                    env=self.env)

    async def kill(self) -> None:
        self.signal(signal.SIGKILL)
        await self.wait_exit()

    def problems(self, limit: int = 6) -> list[str]:
        """The last warning/error log events of this role: the evidence when it does not
        recover."""
        found: list[str] = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                if "Traceback" in line or "Error" in line:
                    found.append(line.strip()[:300])
                continue
            if isinstance(entry, dict) and entry.get("level") in ("warning", "error", "critical"):
                found.append(" ".join(f"{k}={v}" for k, v in entry.items()
                                      if k not in ("timestamp", "level"))[:300])
        return found[-limit:]


class Topology:
    """PostgreSQL, Redis and one process per role, wired through `DEFIWATCH_*` variables."""

    def __init__(self, root: Path) -> None:
        self.root = root
        pg_root = root / "pg"
        pg_root.mkdir()
        self.postgres = PostgresServer(pg_root)
        self.redis = RedisServer(root)
        self.api_port = free_port()
        self.gateway_port = free_port()
        base = {k: v for k, v in os.environ.items() if not k.startswith("DEFIWATCH_")}
        base.update({
            "DEFIWATCH_DATABASE_URL": self.postgres.url,
            "DEFIWATCH_REDIS_URL": self.redis.url,
            "DEFIWATCH_API_PORT": str(self.api_port),
            "DEFIWATCH_GATEWAY_PORT": str(self.gateway_port),
            "DEFIWATCH_SOCKETIO_PORT": str(free_port()),
            "DEFIWATCH_REPLAY_ENABLED": "false",
            "DEFIWATCH_DEMO_KEY": "false",
            "DEFIWATCH_STATE_DIR": str(root / "var"),
            "DEFIWATCH_LOG_FORMAT": "json",
            "DEFIWATCH_LOG_LEVEL": "info",
            "DEFIWATCH_NOTIFY_SSRF_ALLOW": "127.0.0.1",  # the webhook receiver is local
            "DEFIWATCH_NOTIFY_MAX_PER_MINUTE": "0",  # every transition notified, none digested
            **SHORTENED,
        })
        self.env = base
        self.roles = {role: RoleProcess(role, root, self._role_env(role)) for role in ROLES}

    def _role_env(self, role: str) -> dict[str, str]:
        env = dict(self.env)
        if role != "api":  # the API serves /readyz itself; the others on an ops listener
            env["DEFIWATCH_OPS_PORT"] = str(free_port())
        return env

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.gateway_port}/v1/realtime"

    async def start(self) -> str:
        """Start everything; return an API key (enterprise tier, read/ingest/alerts)."""
        self.postgres.init()
        self.postgres.start()
        self.redis.start()
        await asyncio.gather(self.postgres.wait_accepting(), self.redis.wait_accepting())
        created = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "defiwatch", "keys", "create", "--user", "faults", "--tier",
            "enterprise", "--scopes", "read,ingest,alerts", cwd=self.root, env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await created.communicate()
        assert created.returncode == 0, err.decode()
        for process in self.roles.values():
            process.start()
        return out.decode().strip()

    def exited(self) -> dict[str, int]:
        """Roles whose process has ended (by itself: the harness restarts what it kills)."""
        return {role: p.proc.returncode for role, p in self.roles.items()
                if p.proc is not None and p.proc.poll() is not None}

    async def readiness(self, http: httpx.AsyncClient, role: str, timeout: float = 1.0) -> str:
        """The role's own /readyz status code, or why there is none (`down`: no process,
        `timeout`, `unreachable`)."""
        process = self.roles[role]
        if not process.alive:
            return "down"
        port = self.api_port if role == "api" else process.ops_port
        try:
            answer = await http.get(f"http://127.0.0.1:{port}/readyz", timeout=timeout)
        except httpx.TimeoutException:
            return "timeout"
        except httpx.HTTPError:
            return "unreachable"
        return str(answer.status_code)

    async def all_ready(self, http: httpx.AsyncClient) -> bool:
        states = await asyncio.gather(*(self.readiness(http, role) for role in self.roles))
        return all(state == "200" for state in states)

    async def probe(self, http: httpx.AsyncClient) -> dict[str, str]:
        """Every role's readiness with the seconds it took to answer, e.g. `503 in 0.01 s`."""

        async def timed(role: str) -> str:
            start = time.monotonic()
            state = await self.readiness(http, role, timeout=3.0)
            return f"{state} in {time.monotonic() - start:.2f} s"

        states = await asyncio.gather(*(timed(role) for role in self.roles))
        return dict(zip(self.roles, states, strict=True))

    def evidence(self) -> dict[str, list[str]]:
        found = {role: p.problems() for role, p in self.roles.items()}
        return {role: lines for role, lines in found.items() if lines}

    def stop(self) -> None:
        for process in self.roles.values():
            process.terminate()
        self.redis.terminate()
        self.postgres.terminate()
