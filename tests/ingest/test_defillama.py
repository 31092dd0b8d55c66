"""DefiLlama poller: pure parsing of the real 2024-03 `/protocols` capture, and the I/O shell
against a real local HTTP server (tests/ingest/llama_server.py) playing DefiLlama.

No sleeps and no clocks: the poller gets an injected `sleep` that records the delays it asked
for, a fixed `clock`, and a jitter source that always picks the upper bound.
"""

from __future__ import annotations

import asyncio
import copy
import email.utils
import json
import math
import random
import socket
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest
from llama_server import LlamaServer, Reply
from prometheus_client import REGISTRY

from conftest import require_real_data
from defiwatch.domain import METRICS, NO_CHAIN, ProtocolMeta
from defiwatch.ingest.base import IngestResult
from defiwatch.ingest.defillama import (
    USER_AGENT,
    DefiLlamaPoller,
    RawPoint,
    backoff_delay,
    parse_prices,
    parse_protocols,
    parse_retry_after,
)

CAPTURE = "defillama/protocols_snapshot_2024-03.json"  # under ../shared/defi-data
NOW = 1_710_158_400  # 2024-03-11 12:00 UTC, the day of the capture

# No `/prices/current` capture exists (SOURCES.md, "Not found"): the shape follows DefiLlama's
# docs; the values are the Coinbase daily closes of 2024-03-11 (prices/coinbase_daily).
PRICES = {
    "coins": {
        "coingecko:ethereum": {"price": 4066.21, "symbol": "ETH", "timestamp": NOW - 40,
                               "confidence": 0.99},
        "coingecko:bitcoin": {"price": 72110.98, "symbol": "BTC", "timestamp": NOW - 25,
                              "confidence": 0.99},
    }
}
COINS = ["coingecko:ethereum", "coingecko:bitcoin"]
Parsed = tuple[list[ProtocolMeta], list[RawPoint], Counter[str]]


@pytest.fixture(scope="module")
def capture_bytes() -> bytes:
    return require_real_data(CAPTURE).read_bytes()


@pytest.fixture(scope="module")
def capture(capture_bytes: bytes) -> list[dict[str, Any]]:
    payload: list[dict[str, Any]] = json.loads(capture_bytes)
    return payload


@pytest.fixture(scope="module")
def parsed(capture: list[dict[str, Any]]) -> Parsed:
    skipped: Counter[str] = Counter()
    metas, points = parse_protocols(capture, ts=NOW, skipped=skipped)
    return metas, points, skipped


def by_series(points: Sequence[RawPoint]) -> dict[tuple[str, str, str], float]:
    return {(p["metric"], p["subject"], p["chain"]): p["value"] for p in points}


# --------------------------------------------------------------------------------------------
# parse_protocols on the real capture
# --------------------------------------------------------------------------------------------


def test_capture_parses_every_protocol(
    parsed: Parsed,
) -> None:
    metas, points, skipped = parsed
    assert len(metas) == 4047
    assert len({m.slug for m in metas}) == 4047
    series = by_series(points)
    assert len(series) == len(points), "one point per series"
    assert series[("tvl", "lido", NO_CHAIN)] == pytest.approx(39.99e9, rel=1e-3)
    assert series[("tvl", "binance-cex", NO_CHAIN)] == pytest.approx(118.23e9, rel=1e-3)
    assert {p["metric"] for p in points} <= METRICS
    assert {p["ts"] for p in points} == {NOW}
    # 36 protocols have a null tvl upstream: skipped and counted, not fatal.
    assert skipped["tvl_not_numeric"] == 36


def test_chain_names_are_normalised(
    parsed: Parsed,
) -> None:
    metas, points, _ = parsed
    chains = {p["chain"] for p in points}
    assert "bsc" in chains and "binance" not in chains
    assert "zksync-era" in chains
    assert all(c == c.lower() and " " not in c for c in chains)
    binance = next(m for m in metas if m.slug == "binance-cex")
    assert "bsc" in binance.chains and "ethereum" in binance.chains
    assert binance.symbol is None  # DefiLlama writes "-" for no symbol


def test_plain_chains_sum_to_the_total(
    parsed: Parsed,
) -> None:
    _, points, _ = parsed
    totals: dict[str, float] = {}
    sums: defaultdict[str, float] = defaultdict(float)
    for p in points:
        if p["metric"] != "tvl":
            continue
        if p["chain"] == NO_CHAIN:
            totals[p["subject"]] = p["value"]
        else:
            sums[p["subject"]] += p["value"]
    matching = [s for s, t in totals.items() if abs(sums[s] - t) <= max(1.0, 1e-6 * abs(t))]
    assert len(matching) >= 4000, f"only {len(matching)} protocols add up"


def test_sub_keys_become_their_own_metrics(
    capture: list[dict[str, Any]],
    parsed: Parsed,
) -> None:
    _, points, _ = parsed
    series = by_series(points)
    raw = {p["slug"]: p["chainTvls"] for p in capture}
    borrowed = next(s for s, c in raw.items() if c.get("Ethereum-borrowed", 0) > 1e6)
    assert series[("tvl_borrowed", borrowed, "ethereum")] == raw[borrowed]["Ethereum-borrowed"]
    assert series[("tvl_borrowed", borrowed, NO_CHAIN)] == raw[borrowed]["borrowed"]
    staking = next(s for s, c in raw.items() if c.get("staking", 0) > 1e6)
    assert series[("tvl_staking", staking, NO_CHAIN)] == raw[staking]["staking"]
    metrics = Counter(p["metric"] for p in points)
    for metric in ("tvl_borrowed", "tvl_staking", "tvl_pool2", "tvl_vesting"):
        assert metrics[metric] > 0, metric


def _as_repr_dump(entry: dict[str, Any]) -> dict[str, Any]:
    """The entry as a pandas round trip leaves it: containers as Python-repr strings."""
    out = copy.deepcopy(entry)
    for key in ("chains", "chainTvls", "forkedFrom", "oracles", "audit_links", "hallmarks"):
        if key in out:
            out[key] = repr(out[key])
    return out


def test_repr_string_dump_parses_like_the_api_shape(capture: list[dict[str, Any]]) -> None:
    # The capture is the API's own shape (lists and dicts); some dumps of the endpoint hold the
    # containers as repr strings. Both must give the same result.
    wanted = {"lido", "binance-cex", "aave-v3", "pancakeswap-amm", "white-protocol"}
    sample = [p for p in capture if p["slug"] in wanted]
    assert len(sample) == len(wanted)
    api = parse_protocols(sample, ts=NOW)
    dumped = parse_protocols([_as_repr_dump(p) for p in sample], ts=NOW)
    assert dumped == api
    assert len(api[1]) > 2 * len(sample)


def test_bad_entries_are_skipped_and_counted() -> None:
    good = {"slug": "good", "name": "Good", "tvl": 30.0, "chains": ["Ethereum", "Binance"],
            "chainTvls": {"Ethereum": 10.0, "Binance": 20.0, "Ethereum-foo": 5.0}}
    payload: list[Any] = [
        good,
        {"slug": "null-tvl", "tvl": None, "chainTvls": {"Ethereum": 1.0}},
        {"slug": "nan-tvl", "tvl": math.nan, "chainTvls": {"Ethereum": math.nan}},
        {"slug": "text-tvl", "tvl": "lots", "chainTvls": {"Ethereum": True}},
        {"name": "No Slug", "tvl": 5.0},
        {"slug": "  ", "tvl": 5.0},
        {"slug": "garbage", "tvl": 7.0, "chainTvls": "{'Ethereum': 1.0, ", "chains": "[oops"},
        {"slug": "repr-nan", "tvl": 5.0, "chainTvls": "{'Ethereum': nan, 'Solana': 5.0}"},
        {"slug": "good", "tvl": 99.0},
        "not an object",
        None,
    ]
    skipped: Counter[str] = Counter()
    metas, points = parse_protocols(payload, ts=NOW, skipped=skipped)
    assert [m.slug for m in metas] == ["good", "null-tvl", "nan-tvl", "text-tvl", "garbage",
                                       "repr-nan"]
    assert skipped == Counter({
        "tvl_not_numeric": 3,
        "chain_value_not_numeric": 3,  # nan, True, repr nan
        "protocol_without_slug": 2,
        "protocol_not_an_object": 2,
        "protocol_duplicate_slug": 1,
        "chain_tvls_unknown_key": 1,  # Ethereum-foo: not guessed into TVL
        "chain_tvls_unreadable": 1,
        "chains_unreadable": 1,
    })
    assert by_series(points) == {
        ("tvl", "good", NO_CHAIN): 30.0,
        ("tvl", "good", "ethereum"): 10.0,
        ("tvl", "good", "bsc"): 20.0,
        ("tvl", "null-tvl", "ethereum"): 1.0,
        ("tvl", "garbage", NO_CHAIN): 7.0,
        ("tvl", "repr-nan", NO_CHAIN): 5.0,
        ("tvl", "repr-nan", "solana"): 5.0,
    }
    assert metas[0].chains == ("ethereum", "bsc")


def test_a_non_list_payload_is_an_error_not_an_empty_poll() -> None:
    with pytest.raises(ValueError, match="expected a list"):
        parse_protocols({"message": "rate limited"}, ts=NOW)


# --------------------------------------------------------------------------------------------
# parse_prices, Retry-After and backoff (pure)
# --------------------------------------------------------------------------------------------


def test_parse_prices() -> None:
    payload = copy.deepcopy(PRICES)
    payload["coins"]["coingecko:dead"] = {"price": None, "timestamp": NOW}
    payload["coins"]["ethereum:0xabc"] = {"price": 1.0}
    skipped: Counter[str] = Counter()
    points = parse_prices(payload, skipped=skipped)
    assert points == [
        {"metric": "price", "subject": "coingecko:ethereum", "chain": NO_CHAIN,
         "ts": NOW - 40, "value": 4066.21},
        {"metric": "price", "subject": "coingecko:bitcoin", "chain": NO_CHAIN,
         "ts": NOW - 25, "value": 72110.98},
    ]
    assert skipped == Counter({"price_not_numeric": 1, "price_without_timestamp": 1})
    with pytest.raises(ValueError):
        parse_prices({"message": "bad coins"})


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("7", 7.0),
        (" 120 ", 120.0),
        (email.utils.formatdate(NOW + 30, usegmt=True), 30.0),
        (email.utils.formatdate(NOW - 30, usegmt=True), 0.0),
        ("soon", None),
        ("-5", None),
        (None, None),
    ],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header, now=NOW) == expected


class MaxJitter(random.Random):
    """Full jitter that always draws the upper bound, so delays are predictable."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_backoff_grows_and_is_capped() -> None:
    delays = [backoff_delay(i, base_s=2.0, cap_s=600.0, rng=MaxJitter()) for i in range(10)]
    assert delays == [2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 600.0]
    rng = random.Random(1)
    assert all(0.0 <= backoff_delay(i, base_s=2.0, cap_s=600.0, rng=rng) <= 600.0
               for i in range(50))


# --------------------------------------------------------------------------------------------
# The poller against a real local HTTP server
# --------------------------------------------------------------------------------------------


class RecordingSink:
    """A `PointSink` that records every call in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    async def ingest_protocols(
        self, metas: Sequence[ProtocolMeta], *, ts: int, source: str
    ) -> int:
        self.calls.append(("protocols", (list(metas), ts, source)))
        return len(metas)

    async def ingest_points(
        self, raw: Sequence[Mapping[str, Any]], *, source: str
    ) -> IngestResult:
        self.calls.append(("points", (list(raw), source)))
        return IngestResult(accepted=len(raw))

    def points(self) -> list[Mapping[str, Any]]:
        return [p for kind, args in self.calls if kind == "points" for p in args[0]]


class Sleeps(list[float]):
    """Injected `sleep`: records the requested delay and returns at once."""

    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def server(capture_bytes: bytes) -> Iterator[LlamaServer]:
    with LlamaServer(protocols=capture_bytes, prices=json.dumps(PRICES).encode()) as srv:
        yield srv


def make_poller(
    sink: RecordingSink, sleeps: Sleeps, *, api_url: str, coins_url: str,
    clock: Callable[[], float] = lambda: float(NOW), **kwargs: Any,
) -> DefiLlamaPoller:
    return DefiLlamaPoller(
        sink, api_url=api_url, coins_url=coins_url, interval_s=300.0, coins=COINS,
        clock=clock, sleep=sleeps, rng=MaxJitter(), backoff_base_s=2.0, **kwargs,
    )


def requests_total(endpoint: str, status: str) -> float:
    value = REGISTRY.get_sample_value(
        "defiwatch_poller_requests_total", {"endpoint": endpoint, "status": status}
    )
    return value or 0.0


async def test_poll_once_pushes_protocols_then_points(
    server: LlamaServer, parsed: Parsed,
) -> None:
    sink, sleeps = RecordingSink(), Sleeps()
    before = requests_total("protocols", "200")
    async with make_poller(sink, sleeps, api_url=server.base_url,
                           coins_url=server.base_url, batch_size=4000) as poller:
        report = await poller.poll_once()

    metas, points, _ = parsed
    kinds = [kind for kind, _ in sink.calls]
    assert kinds[0] == "protocols" and set(kinds[1:]) == {"points"}
    pushed_metas, ts, source = sink.calls[0][1]
    assert (len(pushed_metas), ts, source) == (4047, NOW, "defillama")
    assert pushed_metas == metas
    assert all(len(args[0]) <= 4000 and args[1] == "defillama" for _, args in sink.calls[1:])
    pushed = sink.points()
    assert pushed[: len(points)] == points  # the protocols' points, then the prices
    assert [(p["subject"], p["value"]) for p in pushed[len(points):]] == [
        ("coingecko:ethereum", 4066.21), ("coingecko:bitcoin", 72110.98)]
    assert report.failed == [] and report.points == len(points) + 2
    assert report.protocols == 4047 and report.skipped["tvl_not_numeric"] == 36
    assert sleeps == []
    assert server.paths("/prices/") == ["/prices/current/coingecko:ethereum,coingecko:bitcoin"]
    assert {r.headers.get("User-Agent") for r in server.requests} == {USER_AGENT}
    assert USER_AGENT.startswith("defiwatch/")
    assert requests_total("protocols", "200") == before + 1


async def test_429_with_retry_after_waits_that_long(server: LlamaServer) -> None:
    server.script("/protocols", Reply(429, b"slow down", {"Retry-After": "7"}))
    sink, sleeps = RecordingSink(), Sleeps()
    before = requests_total("protocols", "429")
    async with make_poller(sink, sleeps, api_url=server.base_url,
                           coins_url=server.base_url) as poller:
        report = await poller.poll_once()
    assert sleeps == [7.0]
    assert server.paths("/protocols") == ["/protocols", "/protocols"]
    assert report.failed == [] and report.protocols == 4047
    assert requests_total("protocols", "429") == before + 1


async def test_503_twice_then_200_backs_off_growing(server: LlamaServer) -> None:
    server.script("/protocols", Reply(503), Reply(503))
    sink, sleeps = RecordingSink(), Sleeps()
    async with make_poller(sink, sleeps, api_url=server.base_url,
                           coins_url=server.base_url) as poller:
        report = await poller.poll_once()
    assert sleeps == [2.0, 4.0]  # base 2 s, doubling; jitter pinned to its upper bound
    assert len(server.paths("/protocols")) == 3
    assert report.failed == [] and report.protocols == 4047


async def test_retry_after_date_on_503_is_honoured(server: LlamaServer) -> None:
    when = email.utils.formatdate(NOW + 30, usegmt=True)
    server.script("/prices/", Reply(503, headers={"Retry-After": when}))
    sink, sleeps = RecordingSink(), Sleeps()
    async with make_poller(sink, sleeps, api_url=server.base_url,
                           coins_url=server.base_url) as poller:
        report = await poller.poll_once()
    assert sleeps == [30.0]
    assert report.failed == [] and report.points > 4047


async def test_404_is_not_retried_and_does_not_stop_the_other_endpoint(
    server: LlamaServer,
) -> None:
    sink, sleeps = RecordingSink(), Sleeps()
    async with make_poller(sink, sleeps, api_url=server.base_url + "/nope",
                           coins_url=server.base_url) as poller:
        report = await poller.poll_once()
    assert sleeps == []
    assert server.paths("/nope") == ["/nope/protocols"]
    assert report.failed == ["protocols"]
    assert [kind for kind, _ in sink.calls] == ["points"]  # the prices still went in
    assert len(sink.points()) == 2


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_network_errors_retry_then_give_up_until_next_poll(server: LlamaServer) -> None:
    sink, sleeps = RecordingSink(), Sleeps()
    async with make_poller(sink, sleeps, api_url=f"http://127.0.0.1:{_closed_port()}",
                           coins_url=server.base_url, max_attempts=3) as poller:
        report = await poller.poll_once()
    assert sleeps == [2.0, 4.0]
    assert report.failed == ["protocols"]
    assert len(sink.points()) == 2


async def test_retry_after_beyond_the_cap_defers_the_endpoint(server: LlamaServer) -> None:
    now = [float(NOW)]
    server.script("/protocols", Reply(429, headers={"Retry-After": "3600"}))
    sink, sleeps = RecordingSink(), Sleeps()
    async with make_poller(sink, sleeps, api_url=server.base_url, coins_url=server.base_url,
                           clock=lambda: now[0], max_backoff_s=600.0) as poller:
        first = await poller.poll_once()
        now[0] += 1800
        second = await poller.poll_once()
        now[0] += 1801
        third = await poller.poll_once()
    assert sleeps == []
    assert (first.failed, second.failed, third.failed) == (["protocols"], ["protocols"], [])
    assert len(server.paths("/protocols")) == 2  # none while deferred
    assert third.protocols == 4047 and third.ts == NOW + 3601


async def test_run_polls_every_interval_until_stopped(server: LlamaServer) -> None:
    stop = asyncio.Event()
    sink, sleeps = RecordingSink(), Sleeps()

    async def sleep(seconds: float) -> None:
        await sleeps(seconds)
        if len(sleeps) == 2:
            stop.set()

    async with DefiLlamaPoller(
        sink, api_url=server.base_url, coins_url=server.base_url, interval_s=300.0,
        coins=COINS, clock=lambda: float(NOW), sleep=sleep,
    ) as poller:
        await poller.run(stop)
    assert sleeps == [300.0, 300.0]
    assert [kind for kind, _ in sink.calls].count("protocols") == 2


async def test_stop_cuts_the_interval_wait_short(server: LlamaServer) -> None:
    stop, waiting = asyncio.Event(), asyncio.Event()

    async def sleep_forever(seconds: float) -> None:
        waiting.set()
        await asyncio.Event().wait()

    sink = RecordingSink()
    async with DefiLlamaPoller(
        sink, api_url=server.base_url, coins_url=server.base_url, interval_s=300.0,
        coins=COINS, clock=lambda: float(NOW), sleep=sleep_forever,
    ) as poller:
        task = asyncio.create_task(poller.run(stop))
        await waiting.wait()
        stop.set()
        await asyncio.wait_for(task, timeout=10)
    assert [kind for kind, _ in sink.calls].count("protocols") == 1
