"""DefiLlama-compatible routes against the real captures in ../shared/defi-data.

The store is filled from the real 2024-03 `/protocols` response (through the poller's own
parser), the bundled demo data (per-chain daily TVL, trimmed `/protocol/{slug}` series, prices)
and then our answers are compared with the captures: keys and JSON types of every object, and
values wherever the same numbers went in.
"""

from __future__ import annotations

import csv
import json
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from conftest import PG_HOST, PG_PORT, _pg_admin, pg_url, require_real_data, require_service
from defiwatch.app import Platform, open_platform
from defiwatch.config import Settings
from defiwatch.domain import normalize_chain, normalize_subject, split_chain_tvl_key
from defiwatch.ingest.defillama import _structured, parse_protocols
from defiwatch.ingest.replay import PointRecord, iter_records
from defiwatch.query.llama_chains import PROTOCOL_CHAIN_NAMES, V2_CHAINS, chain_name

from .conftest import app_for, make_key, make_service

pytestmark = pytest.mark.asyncio(loop_scope="module")

DATA = Path(__file__).resolve().parents[3] / "shared" / "defi-data"
LLAMA = DATA / "defillama"
SNAPSHOT_TS = 1_710_126_000  # the capture's observation time (data/demo/manifest.json)
COINS = {"coingecko:ethereum", "coingecko:bitcoin", "coingecko:aave"}


def need(path: Path) -> Path:
    """A real capture: skipped locally when missing, a failure in CI (conftest.py)."""
    return require_real_data(str(path.relative_to(DATA)))


def day_ts(date: str) -> int:
    return int(datetime.strptime(date, "%Y-%m-%d").replace(tzinfo=UTC).timestamp())


@pytest.fixture(scope="module")
def capture() -> list[dict[str, Any]]:
    return json.loads(need(LLAMA / "protocols_snapshot_2024-03.json").read_text())


async def _load(platform: Platform, capture: list[dict[str, Any]]) -> None:
    metas, raw = parse_protocols(capture, ts=SNAPSHOT_TS)
    await platform.ingest.ingest_protocols(metas, ts=SNAPSHOT_TS, source="capture")
    batch: list[dict[str, Any]] = list(raw)
    for record in iter_records(sources=["defillama_protocols_2024-03_derived",
                                        "defillama_chain_tvl_6chains",
                                        "defillama_protocol_tvl_series", "coingecko",
                                        "coinbase"]):
        if isinstance(record, PointRecord) and (record.metric not in ("price", "mcap")
                                                or record.subject in COINS):
            batch.append(record.as_raw())
    for i in range(0, len(batch), 10_000):
        await platform.ingest.ingest_points(batch[i : i + 10_000], source="capture")


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["sqlite", "postgres"])
async def llama(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                capture: list[dict[str, Any]]) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    tmp = tmp_path_factory.mktemp("llama")
    common: dict[str, Any] = {"state_dir": tmp, "replay_enabled": False, "demo_key": False}
    database = None
    if request.param == "sqlite":
        settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp}/l.db", **common)
    else:
        require_service("PostgreSQL", PG_HOST, PG_PORT)
        database = f"dw_ltest_{uuid.uuid4().hex[:12]}"
        await _pg_admin(f'CREATE DATABASE "{database}"')
        settings = Settings(database_url=pg_url(database), **common)
    try:
        async with open_platform(settings) as platform:
            await _load(platform, capture)
            key = await make_key(platform, "read")
            async with app_for(platform, make_service(platform)) as client:
                client.headers["Authorization"] = f"Bearer {key}"
                yield client, key
    finally:
        if database is not None:
            await _pg_admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def json_type(value: Any) -> str:
    return {bool: "bool", int: "number", float: "number", str: "string", list: "list",
            dict: "dict", type(None): "null"}[type(value)]


async def test_protocols_match_the_capture(llama: tuple[httpx.AsyncClient, str],
                                           capture: list[dict[str, Any]]) -> None:
    client, _ = llama
    response = await client.get("/protocols")
    assert response.status_code == 200
    ours = {p["slug"]: p for p in response.json()}
    # Slugs are stored normalised (domain.normalize_subject: `overnight-usd+` -> `overnight-usd-`).
    theirs = {normalize_subject("tvl", p["slug"]): p for p in capture}
    # Every captured protocol, plus the subjects of the trimmed series that carry no metadata.
    assert set(theirs) <= set(ours)
    series = {f.stem.lower() for f in (LLAMA / "protocol_tvl_series").glob("*.json")}
    assert set(ours) - set(theirs) <= series
    types: dict[str, set[str]] = defaultdict(set)
    presence: Counter[str] = Counter()
    for p in capture:
        for k, v in p.items():
            types[k].add(json_type(v))
            presence[k] += 1
    common = {k for k, n in presence.items() if n >= 0.8 * len(capture)}
    chain_keys_equal = 0
    for slug, p in ours.items():
        if slug not in theirs:
            continue
        real = theirs[slug]
        assert common & set(real) <= set(p), common & set(real) - set(p)
        for k, v in p.items():
            assert k in types, k
            assert json_type(v) in types[k], (k, v)
        if isinstance(real["tvl"], int | float) and slug not in series:
            assert p["tvl"] == pytest.approx(real["tvl"], rel=1e-12)
        real_chains = _structured(real["chains"], list) or []
        assert p["chains"] == [chain_name(normalize_chain(c)) for c in real_chains]
        real_tvls = _structured(real["chainTvls"], dict) or {}
        if set(p["chainTvls"]) == set(real_tvls):
            chain_keys_equal += 1
            for k, v in p["chainTvls"].items():
                assert v == pytest.approx(real_tvls[k], rel=1e-12, abs=1e-9)
    # Keys differ only where the capture spells one chain two ways (`op_bnb` and `Op_Bnb`):
    # 98 % must be identical (negative TVL is kept as reported).
    assert chain_keys_equal >= 0.98 * len(theirs)
    # Windowed changes: the derived reference points reproduce DefiLlama's own change_1d/7d.
    checked = 0
    for slug, p in ours.items():
        real = theirs.get(slug, {})
        if (p["change_1d"] is not None and slug in theirs and slug not in series
                and isinstance(real["change_1d"], int | float)):
            assert p["change_1d"] == pytest.approx(real["change_1d"], rel=1e-6, abs=1e-9)
            checked += 1
    assert checked > 300
    assert next(iter(ours)) == "binance-cex"  # largest TVL first, like DefiLlama
    # One observation time per protocol, although the trimmed series add newer totals without
    # chains: tvl = sum of the plain chains, except where the capture itself disagrees.
    def off(listing: dict[str, dict[str, Any]]) -> set[str]:
        return {slug for slug, p in listing.items() if _plain_off(p["tvl"], p["chainTvls"])}

    upstream = off({s: {"tvl": p["tvl"], "chainTvls": _structured(p["chainTvls"], dict) or {}}
                    for s, p in theirs.items() if isinstance(p["tvl"], int | float)})
    assert off(ours) <= upstream  # (`op_bnb` + `Op_Bnb` count twice there, once here)
    assert len(off(ours)) <= 3


def _plain_off(tvl: float | None, chain_tvls: dict[str, float]) -> bool:
    """Whether `tvl` is not the sum of the plain chains (1e-6 relative), given some."""
    plain = [v for k, v in chain_tvls.items()
             if split_chain_tvl_key(k) == ("tvl", normalize_chain(k))]
    return bool(plain) and abs(sum(plain) - (tvl or 0.0)) > 1e-6 * abs(tvl or 0.0)


async def test_chain_names_come_from_the_captures(capture: list[dict[str, Any]]) -> None:
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for p in capture:  # spellings in `chains` and in `chainTvls` keys, as generated
        for c in _structured(p["chains"], list) or []:
            counts[normalize_chain(c)][c] += 1
        for k in _structured(p["chainTvls"], dict) or {}:
            split = split_chain_tvl_key(k)
            if split is not None and split[1] != "-":
                counts[split[1]][k if split[0] == "tvl" else k.rpartition("-")[0]] += 1
    for slug, names in counts.items():
        assert PROTOCOL_CHAIN_NAMES[slug] == names.most_common(1)[0][0]
    chains = json.loads(need(LLAMA / "v2_chains_2026-05-29.json").read_text())
    for c in chains:
        name, gecko, symbol, cmc, chain_id = V2_CHAINS[normalize_chain(c["name"])]
        if name == c["name"]:
            assert (gecko, symbol, cmc, chain_id) == (c["gecko_id"], c["tokenSymbol"],
                                                      c["cmcId"], c["chainId"])


async def test_protocol_history_matches_the_trimmed_captures(
        llama: tuple[httpx.AsyncClient, str]) -> None:
    client, _ = llama
    files = sorted(need(LLAMA / "protocol_tvl_series").glob("*.json"))
    compared = 0
    for f in files:
        real = json.loads(f.read_text())
        response = await client.get(f"/protocol/{f.stem}")
        assert response.status_code == 200, f.stem
        ours = response.json()
        assert set(real) <= set(ours)
        expected = [{"date": int(x["date"]), "totalLiquidityUSD": float(x["totalLiquidityUSD"])}
                    for x in real["tvl"] if x["totalLiquidityUSD"] >= 0]
        # The 2024-03 /protocols capture adds its own point of the day for some of them.
        assert [x for x in ours["tvl"] if x in expected or x["date"] != SNAPSHOT_TS] == expected
        assert all(isinstance(v, float) for v in ours["currentChainTvls"].values())
        compared += 1
    assert compared == len(files)
    aave = (await client.get("/protocol/aave-v3")).json()  # from the /protocols capture
    assert aave["chainTvls"]["Ethereum"]["tvl"][-1]["date"] == SNAPSHOT_TS
    assert set(aave["chainTvls"]["Ethereum"]) == {"tvl", "tokensInUsd", "tokens"}
    assert aave["currentChainTvls"]["Ethereum-borrowed"] > 0
    missing = await client.get("/protocol/no-such-protocol")
    assert missing.status_code == 404 and missing.json()["error"]["field"] == "slug"


async def test_tvl_is_a_bare_number(llama: tuple[httpx.AsyncClient, str],
                                    capture: list[dict[str, Any]]) -> None:
    client, _ = llama
    lido = next(p for p in capture if p["slug"] == "lido")
    response = await client.get("/tvl/lido")
    assert response.json() == pytest.approx(lido["tvl"], rel=1e-12)
    assert (await client.get("/tvl/nope")).status_code == 404


async def test_v2_chains_shape_and_values(llama: tuple[httpx.AsyncClient, str]) -> None:
    client, _ = llama
    real = json.loads(need(LLAMA / "v2_chains_2026-05-29.json").read_text())
    real_types: dict[str, set[str]] = defaultdict(set)
    for c in real:
        for k, v in c.items():
            real_types[k].add(json_type(v))
    ours = (await client.get("/v2/chains")).json()
    assert {c["name"] for c in ours} == {"Arbitrum", "Avalanche", "BSC", "Ethereum",
                                         "Optimism", "Polygon"}
    last: dict[str, float] = {}
    with need(LLAMA / "chain_tvl_6chains_2020-01_2025-08_long.csv").open() as fh:
        for row in csv.DictReader(fh):
            last[normalize_chain(row["chain"])] = float(row["tvl"])
    for c in ours:
        assert list(c) == list(real[0])  # same keys, same order
        for k, v in c.items():
            assert json_type(v) in real_types[k]
        assert c["tvl"] == last[normalize_chain(c["name"])]
    eth = next(c for c in ours if c["name"] == "Ethereum")
    assert (eth["gecko_id"], eth["tokenSymbol"], eth["cmcId"], eth["chainId"]) == (
        "ethereum", "ETH", "1027", 1)


async def test_historical_chain_tvl_is_the_captured_series(
        llama: tuple[httpx.AsyncClient, str]) -> None:
    client, _ = llama
    rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    with need(LLAMA / "chain_tvl_6chains_2020-01_2025-08_long.csv").open() as fh:
        for row in csv.DictReader(fh):
            rows[normalize_chain(row["chain"])].append(
                {"date": day_ts(row["date"]), "tvl": float(row["tvl"])})
    for name, chain in (("Ethereum", "ethereum"), ("Binance", "bsc"), ("arbitrum", "arbitrum")):
        response = await client.get(f"/v2/historicalChainTvl/{name}")
        assert response.json() == sorted(rows[chain], key=lambda r: r["date"])
    assert (await client.get("/v2/historicalChainTvl/atlantis")).status_code == 404
    total = (await client.get("/v2/historicalChainTvl")).json()
    with need(LLAMA / "total_defi_tvl_2018-06_2023-07.csv").open() as fh:
        real = next(csv.DictReader(fh))
    assert set(total[0]) == {k.lower() for k in real}  # {date, tvl}, like the B2 capture
    by_day = {r["date"]: r["tvl"] for r in total}
    day = day_ts("2023-01-01")
    assert by_day[day] == pytest.approx(sum(r["tvl"] for rs in rows.values() for r in rs
                                            if r["date"] == day), rel=1e-12)
    assert [r["date"] for r in total] == sorted(by_day)


async def test_prices_current_historical_and_chart(llama: tuple[httpx.AsyncClient, str]) -> None:
    client, _ = llama
    closes: dict[str, float] = {}
    for coin in ("eth", "btc"):
        path = need(DATA / "prices" / "coinbase_daily" / f"{coin}_usd_daily_ohlcv_2019-11_2025-08.csv")
        with path.open() as fh:
            closes[coin] = float(list(csv.DictReader(fh))[-1]["close"])
    current = (await client.get(
        "/prices/current/coingecko:ethereum,coingecko:bitcoin,ethereum:0xdeadbeef")).json()
    assert set(current["coins"]) == {"coingecko:ethereum", "coingecko:bitcoin"}
    eth = current["coins"]["coingecko:ethereum"]
    assert set(eth) == {"price", "symbol", "timestamp", "confidence"}
    assert (eth["price"], eth["symbol"], eth["confidence"]) == (closes["eth"], "ETH", 0.99)
    assert current["coins"]["coingecko:bitcoin"]["price"] == closes["btc"]

    daily = json.loads(need(DATA / "prices" / "coingecko_daily" / "ethereum.json").read_text())
    noon = day_ts("2021-01-01") + 12 * 3600 - 60  # nearer to that day's 00:00 than the next
    hist = (await client.get(f"/prices/historical/{noon}/coingecko:ethereum",
                             params={"searchWidth": "12h"})).json()
    assert hist["coins"]["coingecko:ethereum"]["price"] == daily["2021-01-01"]["price"]
    assert hist["coins"]["coingecko:ethereum"]["timestamp"] == day_ts("2021-01-01")
    narrow = (await client.get(f"/prices/historical/{noon}/coingecko:ethereum",
                               params={"searchWidth": "1h"})).json()
    assert narrow == {"coins": {}}

    chart = (await client.get("/chart/coingecko:ethereum", params={
        "start": day_ts("2021-01-01"), "span": 5, "period": "1d"})).json()
    prices = chart["coins"]["coingecko:ethereum"]
    assert prices["symbol"] == "ETH" and prices["confidence"] == 0.99
    assert [p["price"] for p in prices["prices"]] == [
        daily[d]["price"] for d in ("2021-01-01", "2021-01-02", "2021-01-03", "2021-01-04",
                                    "2021-01-05")]
    bad = await client.get("/chart/coingecko:ethereum", params={"period": "soon"})
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "period"


async def test_keys_are_read_from_path_query_and_headers(
        llama: tuple[httpx.AsyncClient, str]) -> None:
    client, key = llama
    bare = httpx.AsyncClient(transport=client._transport, base_url=str(client.base_url))
    async with bare:
        assert (await bare.get("/v2/chains")).status_code == 401
        assert (await bare.get(f"/{key}/v2/chains")).status_code == 200  # DefiLlama Pro style
        assert (await bare.get(f"/{key}/tvl/lido")).status_code == 200
        assert (await bare.get("/v2/chains", params={"apiKey": key})).status_code == 200
        assert (await bare.get("/v2/chains", headers={"X-API-Key": key})).status_code == 200
        assert (await bare.get("/dw_nope_nope/v2/chains")).status_code == 401
        assert (await bare.get("/v9/v2/chains")).status_code == 404


async def test_public_compat_mode(tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/p.db", replay_enabled=False,
                        demo_key=False)
    async with open_platform(settings) as p, app_for(p, make_service(p),
                                                     compat_public=True) as client:
        assert (await client.get("/v2/chains")).json() == []
        assert (await client.post("/v1/query/advanced", json={})).status_code == 401
