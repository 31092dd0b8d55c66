"""The API under faults (issue 10, points 4-6): a hung Redis, a database outage, and hostile
bodies. Redis is a private `redis-server` this module starts and SIGSTOPs; the database outage
is a PostgreSQL URL whose port nobody listens on."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import redis
from fastapi import FastAPI
from prometheus_client import REGISTRY
from redis.backoff import NoBackoff
from redis.retry import Retry

from conftest import pg_url, require_service
from defiwatch.api import ApiContext, create_app
from defiwatch.api.ratelimit import (
    FAIL_OPEN_COOLDOWN_S,
    Decision,
    RateLimiter,
    RateLimitMiddleware,
)
from defiwatch.app import Platform, api_server, open_platform
from defiwatch.config import Settings
from defiwatch.errors import BackendUnavailable
from defiwatch.store.db import create_engine
from defiwatch.store.keys import create_key
from loopback import free_port

GUARD_S = 10.0  # a bound on waits that hung for 35 s before the fix; not a timing assertion




@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of our own, so SIGSTOP does not hang anyone else's tests."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0))
    try:
        for _ in range(int(GUARD_S / 0.05)):  # poll a starting server until it answers
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        yield url, proc
    finally:
        client.close()
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        proc.wait()


async def make_key(platform: Platform, *scopes: str) -> dict[str, str]:
    async with platform.engine.begin() as conn:
        key, _ = await create_key(conn, user="alice", tier="pro",
                                  scopes=list(scopes or ("read", "alerts", "ingest")),
                                  tiers=list(platform.settings.tiers))
    return {"Authorization": f"Bearer {key}"}


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                             base_url="http://defiwatch.test")


def fail_open_count() -> float:
    return REGISTRY.get_sample_value("defiwatch_ratelimit_fail_open_total") or 0.0


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == "backend_unavailable" and error["temporary"] is True
    assert int(response.headers["retry-after"]) >= 1


# --- 1. A hung Redis ------------------------------------------------------------------------


async def test_a_hung_redis_does_not_stall_the_api(
        private_redis: tuple[str, subprocess.Popen[bytes]], postgres_url: str,
        tmp_path: Path, timeout_factor: float) -> None:
    url, proc = private_redis
    settings = Settings(database_url=postgres_url, redis_url=url, state_dir=tmp_path,
                        replay_enabled=False, demo_key=False)
    async with open_platform(settings) as platform:
        auth = await make_key(platform)
        async with client_for(api_server(platform).config.app) as client:
            assert (await client.get("/readyz")).status_code == 200
            before = fail_open_count()
            proc.send_signal(signal.SIGSTOP)
            try:
                async with asyncio.timeout(GUARD_S * timeout_factor):
                    assert (await client.get("/healthz")).status_code == 200
                    ready = await client.get("/readyz")
                    # A route that needs only PostgreSQL: the rate limiter lets it through.
                    rules = await client.get("/v1/alerts/rules", headers=auth)
                    # The result cache counts as a miss: the query is answered from the database.
                    query = await client.post("/v1/query/advanced", headers=auth,
                                              json={"dataset": "protocols", "limit": 1})
                    # Latest values live only in Redis: a prompt 503, not a hang.
                    latest = await client.get("/v1/latest", headers=auth)
            finally:
                proc.send_signal(signal.SIGCONT)
            assert ready.status_code == 503
            checks = ready.json()["checks"]
            assert checks["database"] == "ok"
            assert checks["stream"].startswith("error") and checks["cache"].startswith("error")
            assert rules.status_code == 200, rules.text
            assert "x-ratelimit-limit" not in rules.headers
            assert fail_open_count() >= before + 2
            assert query.status_code == 200, query.text
            assert_unavailable(latest)
            # Redis back: the same clients recover without a restart.
            assert (await client.get("/readyz")).status_code == 200
            assert (await client.get("/v1/latest", headers=auth)).status_code == 200


class UnreachableStore:
    """A rate store whose backend is down (a one-line fake: the unit is the middleware)."""

    def __init__(self) -> None:
        self.asked = 0

    async def hit(self, who: str, limit: int) -> Decision:
        self.asked += 1
        raise BackendUnavailable("rate limiter unreachable: TimeoutError")


async def test_the_limiter_fails_open_then_skips_redis_for_a_while(tmp_path: Path) -> None:
    store, now = UnreachableStore(), [100.0]
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path}/unused.db")  # keyless: no lookups
    answered: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        answered.append(1)

    async def nothing(*_: Any) -> Any:
        return None

    middleware = RateLimitMiddleware(app, RateLimiter(engine, store, {"free": 60}),
                                     clock=lambda: now[0])
    before = fail_open_count()
    for at in (100.0, 100.0 + FAIL_OPEN_COOLDOWN_S / 2, 100.0 + FAIL_OPEN_COOLDOWN_S * 1.5):
        now[0] = at
        await middleware({"type": "http", "path": "/v1/events", "headers": []}, nothing, nothing)
    assert len(answered) == 3  # every request passed
    assert store.asked == 2  # the second came within the cooldown: Redis was not asked
    assert fail_open_count() == before + 3
    await engine.dispose()


# --- 2. A database outage -------------------------------------------------------------------


async def test_a_database_outage_answers_503_temporary(tmp_path: Path) -> None:
    require_service("PostgreSQL", "127.0.0.1", 5432)  # only for the driver; nothing connects
    dead = pg_url("nobody").replace(":5432/", f":{free_port()}/")
    settings = Settings(database_url=dead, state_dir=tmp_path, replay_enabled=False,
                        demo_key=False)
    async with open_platform(settings, migrate=False) as platform, \
            client_for(api_server(platform).config.app) as client:
        auth = {"Authorization": "Bearer dw_abc_def"}
        assert_unavailable(await client.get("/v1/alerts/rules", headers=auth))  # route auth
        assert_unavailable(await client.post("/v1/ingest", headers=auth,  # the body gate
                                             json={"points": []}))
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["database"].startswith("error")


# --- 3. Authenticate before reading the body; cap bodies ------------------------------------

CAP = 4_096
INGEST_CAP = 65_536
CHUNK = 1_024


@pytest.fixture
async def gated(settings: Settings) -> AsyncIterator[tuple[FastAPI, dict[str, str]]]:
    """The API with small caps (so the tests move little data) and a valid key."""
    capped = settings.model_copy(update={"api_max_body_bytes": CAP,
                                         "api_max_ingest_body_bytes": INGEST_CAP})
    async with open_platform(capped) as p:
        app = create_app(ApiContext(p.engine, p.stream, p.cache, p.ingest, settings=capped,
                                    reads=p.reads))
        yield app, await make_key(p)


class Sent:
    """What a raw ASGI call answered, and how many body bytes the app pulled."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.body = b""
        self.read = 0

    @property
    def closes(self) -> bool:
        """The server is told to close rather than drain the unread body (uvicorn reads a
        kept-alive request's whole body to reach the next one)."""
        return self.headers.get(b"connection") == b"close"

    @property
    def error(self) -> dict[str, Any]:
        error: dict[str, Any] = msgspec.json.decode(self.body)["error"]
        return error


async def call(app: FastAPI, path: str, headers: dict[str, str], chunks: Iterable[bytes],
               content_length: int | None = None) -> Sent:
    """POST `chunks` as a streamed body, counting the bytes the app actually receives
    (an httpx client would buffer: this is what a server hands the app)."""
    sent = Sent()
    pending: Iterator[bytes] = iter(chunks)
    finished = False

    async def receive() -> dict[str, Any]:
        nonlocal finished
        if finished:
            await asyncio.Event().wait()  # the client stays connected; never returns
        chunk = next(pending, None)
        if chunk is None:
            finished = True
            return {"type": "http.request", "body": b"", "more_body": False}
        sent.read += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            sent.status = message["status"]
            sent.headers = dict(message.get("headers", []))
        else:
            sent.body += message.get("body", b"")

    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    raw.append((b"content-type", b"application/json"))
    if content_length is not None:
        raw.append((b"content-length", str(content_length).encode()))
    else:
        raw.append((b"transfer-encoding", b"chunked"))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "headers": raw,
             "client": ("127.0.0.1", 5000), "server": ("defiwatch.test", 80)}
    await app(scope, receive, send)
    return sent


def junk(total: int) -> list[bytes]:
    return [b"x" * CHUNK] * (total // CHUNK)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer dw_nobody_nothing"}],
                         ids=["no-key", "unknown-key"])
async def test_no_body_byte_is_read_before_the_key_is_checked(
        gated: tuple[FastAPI, dict[str, str]], headers: dict[str, str]) -> None:
    app, _ = gated
    size = 4 * INGEST_CAP
    sent = await call(app, "/v1/ingest", headers, junk(size), content_length=size)
    assert sent.status == 401
    assert sent.error["code"] == "unauthorized" and sent.error["temporary"] is False
    assert sent.read == 0 and sent.closes


async def test_a_declared_length_above_the_cap_is_refused_at_once(
        gated: tuple[FastAPI, dict[str, str]]) -> None:
    app, auth = gated
    sent = await call(app, "/v1/alerts/rules", auth, junk(2 * CAP), content_length=2 * CAP)
    assert (sent.status, sent.error["code"], sent.read, sent.closes) == (413, "too_large", 0, True)
    # The ingest route has its own, larger cap: the same body is read (and is not JSON).
    sent = await call(app, "/v1/ingest", auth, junk(2 * CAP), content_length=2 * CAP)
    assert sent.status == 400 and sent.read == 2 * CAP


@pytest.mark.parametrize(("path", "cap"), [("/v1/alerts/rules", CAP), ("/v1/ingest", INGEST_CAP)])
async def test_a_streamed_body_is_cut_off_at_the_cap(
        gated: tuple[FastAPI, dict[str, str]], path: str, cap: int) -> None:
    app, auth = gated
    sent = await call(app, path, auth, junk(4 * cap))
    assert (sent.status, sent.error["code"], sent.closes) == (413, "too_large", True)
    assert cap < sent.read <= cap + CHUNK  # reading stopped at the first chunk past the cap


async def test_a_body_within_the_cap_reaches_the_route(
        gated: tuple[FastAPI, dict[str, str]]) -> None:
    app, auth = gated
    point = {"metric": "tvl", "subject": "aave", "chain": "ethereum", "ts": 1710115200,
             "value": 1.2e10}
    body = msgspec.json.encode({"points": [point]})
    sent = await call(app, "/v1/ingest", auth, [body])
    assert sent.status == 200, sent.body
    assert msgspec.json.decode(sent.body)["accepted"] == 1
    async with client_for(app) as client:  # and through a client, with its Content-Length
        again = await client.post("/v1/ingest", headers=auth, json={"points": [point]})
    assert again.status_code == 200 and again.json()["duplicates"] == [0]


async def test_the_gate_finds_the_key_where_the_routes_do(
        gated: tuple[FastAPI, dict[str, str]]) -> None:
    """An empty X-API-Key falls through to ?apiKey= for the gate as for the routes: the gate
    must not refuse (401) a request the route would accept."""
    app, auth = gated
    key = auth["Authorization"].removeprefix("Bearer ")
    async with client_for(app) as client:
        answer = await client.post("/v1/ingest", params={"apiKey": key},
                                   headers={"X-API-Key": ""}, json={"points": []})
    assert answer.status_code == 200, answer.text

