"""Build the bundled demo data (src/defiwatch/data/demo) from the real captures in shared/defi-data.

Usage: python scripts/build_demo_data.py [DEFI_DATA_DIR] [--out DIR]

Every value is copied from a real capture; the only arithmetic is time-zone normalisation and the
clearly labelled `defillama-snapshot-derived` file (reference points computed from the
snapshot's own change_1d/change_7d). Output is deterministic: lines sorted by (ts, line), gzip
with mtime 0 and no file name, so a re-run yields identical bytes (given the same zlib).

Line formats (one JSON array per line, one source per file):
  ["p", metric, subject, chain, ts, value]            a point, already normalised
  ["m", ts, slug, name, category, [chains], gecko_id, symbol, url, listed_at]   protocol metadata
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gzip
import hashlib
import json
import sys
from collections import Counter
from collections.abc import Iterable, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from defiwatch.domain import (  # noqa: E402  (needs the sys.path line above)
    NO_CHAIN,
    PointRejection,
    ProtocolMeta,
    normalize_chain,
    normalize_subject,
    validate_point,
)
from defiwatch.ingest.defillama import parse_protocols  # noqa: E402

DEFAULT_SRC = REPO.parent / "shared" / "defi-data"
DEFAULT_OUT = REPO / "src" / "defiwatch" / "data" / "demo"
DAY = 86_400
# "now" for validate_point: fixed (2100-01-01) so the build does not depend on the clock.
_VALIDATION_NOW = 4_102_444_800.0

# --- selection sizes (written into the manifest) -------------------------------------------
TOP_PROTOCOLS = 500
B1_CHAINS = 25
B5_PROTOCOLS = 40
COINGECKO_IDS = (
    # majors and stablecoins
    "bitcoin", "ethereum", "tether", "usd-coin", "dai", "wrapped-bitcoin", "staked-ether",
    "binancecoin", "solana", "avalanche-2", "matic-network", "fantom", "terra-luna",
    # DeFi governance tokens of large protocols in the 2024-03 snapshot
    "aave", "uniswap", "maker", "lido-dao", "curve-dao-token", "convex-finance", "pendle",
    "just", "instadapp", "rocket-pool", "liquity", "sushi", "yearn-finance",
    "pancakeswap-token", "raydium", "orca", "benqi", "compound-governance-token", "chainlink",
)

# --- timestamps chosen from the data (see notes in the manifest) ------------------------------
# /protocols capture: the newest listedAt is 2024-03-11 02:49:32 UTC, so the response was taken
# after it; 2024-03-11 00:00 would place a listing after the observation. First full hour after.
SNAPSHOT_TS = int(dt.datetime(2024, 3, 11, 3, tzinfo=dt.UTC).timestamp())
# lite/protocols2 commits. 12-17: its tvl values equal the B7 daily points stamped 12-17 00:00
# (Hedge, Neptune, Weiss, Renec), so 00:00 fits. 12-19: its tvl values equal the B7 intraday
# "now" points fetched 18:20-20:06:35 UTC that day (same commit), so it was taken at or after
# 20:06:35 UTC. 12-08: no evidence beyond the commit date.
LITE_SNAPSHOTS = (
    ("2025-12-08", int(dt.datetime(2025, 12, 8, tzinfo=dt.UTC).timestamp())),
    ("2025-12-17", int(dt.datetime(2025, 12, 17, tzinfo=dt.UTC).timestamp())),
    ("2025-12-19", int(dt.datetime(2025, 12, 19, 20, 6, 35, tzinfo=dt.UTC).timestamp())),
)
CHECK_SKED = "check-sked/crypto_data_resources@895e4847b2aef00e7d8cd75f5578c43605c4f2d6"
PAIRIE = (
    "pairie-koh/Wrapped-Stablecoins-and-DeFi-Risk-Dataset@77c0b51bebf56a7892ca1ecf76e43bf982249651"
)
BMAD = "bma-d/defillama-extract"
LLAMA_ATTR = "Data: DefiLlama (defillama.com)"


@dataclass
class Output:
    """One demo file: its lines and its manifest entry."""

    file: str
    source: str
    description: str
    origin: str
    attribution: str
    notes: list[str] = field(default_factory=list)
    lines: list[tuple[int, bytes]] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)

    def point(self, metric: str, subject: str, chain: str, ts: int, value: float) -> None:
        """Add a point after the gate every source goes through (`validate_point`).

        Points it would reject (non-finite or absurdly large values) are counted and left out;
        negative values pass, as DefiLlama reports some;
        a point it would *change* means the builder forgot to normalise, which is a bug.
        """
        raw = {"metric": metric, "subject": subject, "chain": chain, "ts": ts, "value": value}
        checked = validate_point(raw, index=0, now=_VALIDATION_NOW, source=self.source)
        if isinstance(checked, PointRejection):
            self.rejected[f"{checked.field}: {checked.reason}"] += 1
            return
        if (checked.metric, checked.subject, checked.chain, checked.ts, checked.value) != (
            metric, subject, chain, ts, value
        ):
            raise ValueError(f"{self.file}: point not normalised: {raw} -> {checked}")
        line = msgspec.json.encode(["p", metric, subject, chain, int(ts), float(value)])
        self.lines.append((int(ts), line))

    def meta(self, ts: int, m: ProtocolMeta) -> None:
        line = msgspec.json.encode(
            ["m", int(ts), m.slug, m.name, m.category, list(m.chains), m.gecko_id, m.symbol,
             m.url, m.listed_at]
        )
        self.lines.append((int(ts), line))


@dataclass(frozen=True)
class Snapshot:
    """A protocol of the 2024-03 snapshot, for the lite snapshots' join on name."""

    meta: ProtocolMeta


# --- helpers -------------------------------------------------------------------------------

def utc_day(date: str, *, plus_days: int = 0) -> int:
    """Epoch seconds of `date` (YYYY-MM-DD) at 00:00 UTC, shifted by `plus_days`."""
    day = dt.date.fromisoformat(date[:10]) + dt.timedelta(days=plus_days)
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp())


def text(value: Any) -> str | None:
    """Same rule as the live poller: strip; empty and DefiLlama's "-" mean absent."""
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value if value and value != "-" else None


def chain_list(raw: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for name in raw:
        chain = normalize_chain(name)
        if chain != NO_CHAIN:
            seen.setdefault(chain, None)
    return list(seen)


def read_wide_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def column_counts(header: list[str], rows: list[list[str]]) -> dict[str, int]:
    counts = dict.fromkeys(header[1:], 0)
    for row in rows:
        for name, cell in zip(header[1:], row[1:], strict=True):
            if cell != "":
                counts[name] += 1
    return counts


def top_columns(counts: dict[str, int], n: int, exclude: Set[str] = frozenset()) -> list[str]:
    ranked = sorted((c for c in counts if c not in exclude), key=lambda c: (-counts[c], c))
    return ranked[:n]


def ny_stamp_to_utc(stamp: str) -> int:
    """B1 stamps are 00:00 UTC written in New York time (19:00 EST / 20:00 EDT the day before)."""
    clock = stamp[11:]
    if clock not in ("19:00:00", "20:00:00"):
        raise ValueError(f"unexpected New York stamp {stamp!r}; the +1 day rule would not hold")
    return utc_day(stamp, plus_days=1)


# --- sources -------------------------------------------------------------------------------

def build_snapshot(src: Path) -> tuple[Output, Output, dict[str, Snapshot]]:
    """A: top protocols of the 2024-03 /protocols capture (+ derived 1d/7d reference points).

    Parsed by the live poller's `parse_protocols`, so the demo holds exactly the series and
    metadata the poller would have stored from this response.
    """
    raw = json.loads((src / "defillama/protocols_snapshot_2024-03.json").read_text())
    protos = [p for p in raw if isinstance(p.get("tvl"), int | float)]
    protos.sort(key=lambda p: (-p["tvl"], p["slug"]))
    top = protos[:TOP_PROTOCOLS]
    skipped: Counter[str] = Counter()
    metas, points = parse_protocols(top, ts=SNAPSHOT_TS, skipped=skipped)
    if len(metas) != len(top):
        raise ValueError(f"parse_protocols kept {len(metas)} of {len(top)} protocols: {skipped}")
    out = Output(
        file="defillama_protocols_2024-03.jsonl.gz",
        source="defillama",
        description=(
            f"Top {TOP_PROTOCOLS} protocols by tvl from one GET api.llama.fi/protocols capture, "
            "parsed by defiwatch.ingest.defillama.parse_protocols: metadata, total tvl "
            "(chain '-'), per-chain tvl and chainTvls sub-keys as their own metrics "
            "(tvl_borrowed, tvl_staking, ...)."
        ),
        origin="Jolina1205/defi@f3b504208a094d2df5dce13bc64690e1caddd75b:data/protocols.json",
        attribution=LLAMA_ATTR,
        notes=[
            f"ts = {SNAPSHOT_TS} (2024-03-11 03:00 UTC): the newest listedAt in the capture is "
            "2024-03-11 02:49:32 UTC, so the response was taken after it; the commit date is "
            "2024-03-11.",
            f"Values left out by the parser: {dict(sorted(skipped.items()))}.",
        ],
    )
    derived = Output(
        file="defillama_protocols_2024-03_derived.jsonl.gz",
        source="defillama-snapshot-derived",
        description=(
            "DERIVED, not observed: protocol total tvl at snapshot ts - 1 day and - 7 days, "
            "computed as tvl / (1 + change_1d/100) and tvl / (1 + change_7d/100) from the same "
            "capture, so the snapshot yields real-sized tvl_change events."
        ),
        origin=out.origin,
        attribution=LLAMA_ATTR + " (values derived by scripts/build_demo_data.py)",
        notes=["Only protocol totals (chain '-'); protocols with null change values are skipped."],
    )
    for meta in metas:
        out.meta(SNAPSHOT_TS, meta)
    totals: dict[str, float] = {}
    plain: dict[str, float] = {}
    for pt in points:
        out.point(pt["metric"], pt["subject"], pt["chain"], pt["ts"], pt["value"])
        if pt["metric"] == "tvl" and pt["chain"] == NO_CHAIN:
            totals[pt["subject"]] = pt["value"]
        elif pt["metric"] == "tvl":
            plain[pt["subject"]] = plain.get(pt["subject"], 0.0) + pt["value"]
    snapshots: dict[str, Snapshot] = {}
    for p, meta in zip(top, metas, strict=True):
        snapshots[p["name"]] = Snapshot(meta=meta)
        for name, days in (("change_1d", 1), ("change_7d", 7)):
            pct = p.get(name)
            if isinstance(pct, int | float) and pct > -100:
                derived.point("tvl", meta.slug, NO_CHAIN, SNAPSHOT_TS - days * DAY,
                              p["tvl"] / (1 + pct / 100))
    mismatched = sum(
        1 for slug, t in totals.items() if abs(plain.get(slug, 0.0) - t) > max(1.0, 1e-6 * abs(t))
    )
    out.notes.append(
        f"{mismatched} of {len(totals)} protocols have plain-chain tvl not summing to the total "
        "(upstream inconsistencies, kept as captured)."
    )
    return out, derived, snapshots


def build_b3(src: Path) -> tuple[Output, set[str]]:
    out = Output(
        file="defillama_chain_tvl_6chains.jsonl.gz",
        source="defillama",
        description="Daily chain_tvl (/v2/historicalChainTvl/{chain}) for ethereum, polygon, "
                    "bsc, avalanche, optimism, arbitrum.",
        origin=f"{PAIRIE}:TVL_Data/TVL_Daily/chain_tvl_historical_long.csv",
        attribution=LLAMA_ATTR,
        notes=["Dates are already UTC dates; each is stamped 00:00 UTC."],
    )
    chains: set[str] = set()
    with (src / "defillama/chain_tvl_6chains_2020-01_2025-08_long.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            chain = normalize_chain(row["chain"])
            chains.add(chain)
            out.point("chain_tvl", normalize_subject("chain_tvl", chain), chain,
                      utc_day(row["date"]), float(row["tvl"]))
    return out, chains


def build_b1(src: Path, exclude: set[str]) -> Output:
    header, rows = read_wide_csv(src / "defillama/chain_tvl_history_all_chains_2018-06_2023-07.csv")
    counts = column_counts(header, rows)
    excluded_cols = {c for c in header[1:] if normalize_chain(c) in exclude}
    cols = top_columns(counts, B1_CHAINS, excluded_cols)
    out = Output(
        file="defillama_chain_tvl_history.jsonl.gz",
        source="defillama",
        description=f"Daily chain_tvl (legacy /charts/{{chain}}) for the {B1_CHAINS} chains with "
                    "the most data, excluding the 6 chains of the B3 file.",
        origin=f"{CHECK_SKED}:csv_examples/defi_tvl/tvl_all_chains.csv",
        attribution=LLAMA_ATTR + "; collected by check-sked/crypto_data_resources (ISC)",
        notes=[
            "Stamps are New York local time (19:00/20:00) of a 00:00 UTC point: "
            "ts = listed date + 1 day at 00:00 UTC.",
            "Legacy endpoint values include double-counted TVL; compare relative changes only.",
            f"Excluded (covered by B3): {sorted(excluded_cols)}.",
            f"Chains: {cols}.",
        ],
    )
    index = {c: header.index(c) for c in cols}
    for row in rows:
        ts = ny_stamp_to_utc(row[0])
        for col, i in index.items():
            if row[i] != "":
                chain = normalize_chain(col)
                out.point("chain_tvl", normalize_subject("chain_tvl", chain), chain, ts,
                          float(row[i]))
    return out


def build_b4(src: Path) -> Output:
    path = src / "defillama/protocol_uniswap_tvl_by_chain_2018-11_2023-07.csv"
    header, rows = read_wide_csv(path)
    out = Output(
        file="defillama_uniswap_by_chain.jsonl.gz",
        source="defillama",
        description="Daily tvl of uniswap per chain (/protocol/uniswap chainTvls.*.tvl).",
        origin=f"{CHECK_SKED}:csv_examples/defi_tvl/Uniswap_tvl_data.csv",
        attribution=LLAMA_ATTR + "; collected by check-sked/crypto_data_resources (ISC)",
        notes=["Dates are New York local dates: ts = listed date + 1 day at 00:00 UTC."],
    )
    for row in rows:
        ts = utc_day(row[0], plus_days=1)
        for col, cell in zip(header[1:], row[1:], strict=True):
            if cell != "":
                out.point("tvl", "uniswap", normalize_chain(col), ts, float(cell))
    return out


def build_b7(src: Path) -> tuple[Output, set[str]]:
    out = Output(
        file="defillama_protocol_tvl_series.jsonl.gz",
        source="defillama",
        description="Daily total tvl of 38 Solana/Aptos/Sui/... protocols (trimmed "
                    "/protocol/{slug}), subject = file stem.",
        origin=f"{BMAD}@e89c2a51dacf1e18a5339c8a5bfe6381058f61a8:api-cache/protocols/*.json",
        attribution=LLAMA_ATTR,
        notes=[
            "Epoch dates kept as is, including each series' final intraday 'now' point.",
            "Some files are older copies of a renamed protocol (drift vs drift-trade, thala vs "
            "thala-cdp, ...); each is its own subject as in the source.",
        ],
    )
    slugs: set[str] = set()
    for path in sorted((src / "defillama/protocol_tvl_series").glob("*.json")):
        slug = normalize_subject("tvl", path.stem)
        slugs.add(slug)
        data = json.loads(path.read_text())
        seen: set[int] = set()
        for item in data["tvl"]:
            ts = int(item["date"])
            if ts in seen:
                raise ValueError(f"{path.name}: duplicate date {ts}")
            seen.add(ts)
            out.point("tvl", slug, NO_CHAIN, ts, float(item["totalLiquidityUSD"]))
    return out, slugs


def build_b5(src: Path) -> Output:
    path = src / "defillama/lending_protocols_borrowed_daily_2020-05_2023-07.csv"
    header, rows = read_wide_csv(path)
    cols = top_columns(column_counts(header, rows), B5_PROTOCOLS)
    out = Output(
        file="defillama_lending_borrowed.jsonl.gz",
        source="defillama",
        description=f"Daily tvl_borrowed of the {B5_PROTOCOLS} lending protocols with the most "
                    "data (/protocol/{slug} chainTvls.borrowed.tvl).",
        origin=f"{CHECK_SKED}:csv_examples/lending_borrowing/cumulative_DeFi_assets_borrowed.csv",
        attribution=LLAMA_ATTR + "; collected by check-sked/crypto_data_resources (ISC)",
        notes=["Dates are UTC dates (time.gmtime): 00:00 UTC.", f"Protocols: {cols}."],
    )
    index = {c: header.index(c) for c in cols}
    for row in rows:
        ts = utc_day(row[0])
        for col, i in index.items():
            if row[i] != "":
                out.point("tvl_borrowed", normalize_subject("tvl_borrowed", col), NO_CHAIN, ts,
                          float(row[i]))
    return out


def read_cmc(src: Path, coin: str) -> list[tuple[int, float]]:
    path = src / f"prices/cmc_5min/{coin}_usd_5min_2016-12_2017-12.json"
    return [(int(ms) // 1000, float(v)) for ms, v in json.loads(path.read_text())]


def build_cmc(src: Path) -> tuple[Output, dict[str, tuple[int, int]]]:
    out = Output(
        file="coinmarketcap_5min_eth_btc.jsonl.gz",
        source="coinmarketcap",
        description="5-minute price of ETH and BTC in USD, the whole captured year "
                    "(CoinMarketCap graphs API price_usd).",
        origin="michwill/portfolio-optimizer@f35579f7fcf65ec1e7abb4671110880cb0c83c0f:"
               "data/ethereum.json, data/bitcoin.json",
        attribution="Data: CoinMarketCap (coinmarketcap.com)",
        notes=["Millisecond timestamps floored to seconds; all points kept (no cut).",
               "While this file covers a coin, the CoinGecko daily price of that coin is "
               "left out, so one series has one source at a time."],
    )
    ranges: dict[str, tuple[int, int]] = {}
    for coin in ("ethereum", "bitcoin"):
        subject = normalize_subject("price", coin)
        points = read_cmc(src, coin)
        seen: set[int] = set()
        for ts, value in points:
            if ts in seen:
                continue  # two ticks in the same second: keep the first
            seen.add(ts)
            out.point("price", subject, NO_CHAIN, ts, value)
        ranges[subject] = (min(seen), max(seen))
    return out, ranges


def build_coingecko(
    src: Path, skip_price: dict[str, tuple[int, int]]
) -> tuple[Output, dict[str, int]]:
    out = Output(
        file="coingecko_daily.jsonl.gz",
        source="coingecko",
        description=f"Daily price and mcap (USD) of {len(COINGECKO_IDS)} coins: majors, "
                    "stablecoins and DeFi governance tokens; subject coingecko:{id}.",
        origin="paymog/coin-analysis@d6e31a10830ba47976ac7ee33d48c1abc211d415:data/{id}.json",
        attribution="Data: CoinGecko (coingecko.com)",
        notes=[
            "Date keys are the author's local dates (time zone unknown); stamped 00:00 UTC, so "
            "a point may be off by up to a day.",
            "Zero market caps (early days) skipped.",
            "price of coingecko:ethereum/bitcoin left out while the CoinMarketCap 5-minute "
            "file covers them (2016-12-09..2017-12-09).",
            f"Coins: {list(COINGECKO_IDS)}.",
        ],
    )
    last: dict[str, int] = {}
    for coin in COINGECKO_IDS:
        subject = normalize_subject("price", coin)
        data = json.loads((src / f"prices/coingecko_daily/{coin}.json").read_text())
        for date, row in data.items():
            ts = utc_day(date)
            price, mcap = row.get("price"), row.get("market_cap")
            window = skip_price.get(subject)
            if isinstance(price, int | float) and price > 0 and not (
                window and window[0] <= ts <= window[1]
            ):
                out.point("price", subject, NO_CHAIN, ts, price)
                last[subject] = max(last.get(subject, 0), ts)
            if isinstance(mcap, int | float) and mcap > 0:
                out.point("mcap", subject, NO_CHAIN, ts, mcap)
    return out, last


def build_coinbase(src: Path, coingecko_last: dict[str, int]) -> Output:
    out = Output(
        file="coinbase_daily_eth_btc.jsonl.gz",
        source="coinbase",
        description="Daily close of ETH-USD and BTC-USD (Coinbase Advanced Trade candles), "
                    "continuing the CoinGecko price series after it ends.",
        origin=f"{PAIRIE}:Crypto_Price_Data/ETH_USD_Price_Daily/"
               "eth_usd_daily_complete_20191101_20250802.csv, Crypto_Price_Data/"
               "BTC_USD_Price_Daily/btc_usd_daily_raw_20191101_20250802.csv",
        attribution="Data: Coinbase (coinbase.com)",
        notes=[
            "The close of a UTC daily candle is stamped at the candle's end: date + 1 day "
            "00:00 UTC.",
            "Only candles after the last CoinGecko point of the coin (2021-11-12), so one "
            "series has one source at a time.",
        ],
    )
    for ticker, coin in (("eth", "ethereum"), ("btc", "bitcoin")):
        subject = normalize_subject("price", coin)
        path = src / f"prices/coinbase_daily/{ticker}_usd_daily_ohlcv_2019-11_2025-08.csv"
        with path.open(newline="") as fh:
            for row in csv.DictReader(fh):
                ts = utc_day(row["date"], plus_days=1)
                if ts > coingecko_last[subject]:
                    out.point("price", subject, NO_CHAIN, ts, float(row["close"]))
    return out


def build_lite(src: Path, snapshots: dict[str, Snapshot], b7_slugs: set[str]) -> Output:
    covered = sorted(b7_slugs & {snap.meta.slug for snap in snapshots.values()})
    out = Output(
        file="defillama_lite_protocols_2025-12.jsonl.gz",
        source="defillama",
        description="Three /lite/protocols2 snapshots (2025-12-08, -17, -19) of the protocols "
                    f"of the 2024-03 top {TOP_PROTOCOLS}, joined on name: metadata and total tvl.",
        origin=f"{BMAD}:api-cache/lite-protocols2.json at "
               "137e0f1b4349210a35bdd07b6f22735907a24626, "
               "54bd8aa3ad526501e68c65259b8274927741ecd6, "
               "e89c2a51dacf1e18a5339c8a5bfe6381058f61a8",
        attribution=LLAMA_ATTR,
        notes=[
            f"ts: {[t for _, t in LITE_SNAPSHOTS]}. 2025-12-17 00:00: its tvl values equal the "
            "protocol-series daily points of 12-17 00:00. 2025-12-19 20:06:35: its values equal "
            "the protocol-series intraday points fetched up to 20:06:35 that day. 2025-12-08: "
            "commit date, 00:00.",
            "name, category, chains, url from the lite snapshot; gecko_id, symbol and listed_at "
            "(absent from lite) carried from the 2024-03 snapshot so they are not reported as "
            "removed.",
            "Names that occur twice in a snapshot are skipped; entries without `chains` give no "
            "metadata line (absent, not empty).",
            f"No tvl points for slugs covered by the protocol series file ({covered}), to keep "
            "one source per series.",
        ],
    )
    for label, ts in LITE_SNAPSHOTS:
        path = src / f"defillama/lite_protocols_snapshots/lite_protocols2_commit_{label}.json"
        entries = json.loads(path.read_text())
        names = Counter(e["name"] for e in entries)
        for e in entries:
            snap = snapshots.get(e["name"])
            if snap is None or names[e["name"]] > 1:
                continue
            base = snap.meta
            if isinstance(e.get("chains"), list):
                out.meta(ts, msgspec.structs.replace(
                    base,
                    name=text(e.get("name")) or base.name,
                    category=text(e.get("category")),
                    chains=tuple(chain_list(e["chains"])),
                    url=text(e.get("url")),
                ))
            tvl = e.get("tvl")
            if isinstance(tvl, int | float) and base.slug not in b7_slugs:
                out.point("tvl", base.slug, NO_CHAIN, ts, tvl)
    return out


# --- writing -------------------------------------------------------------------------------

def drop_covered(out: Output, slugs: set[str]) -> None:
    """Remove total-tvl points of slugs that another file already gives a daily series for."""
    keep = []
    for ts, line in out.lines:
        row = msgspec.json.decode(line)
        if row[0] == "p" and row[1] == "tvl" and row[3] == NO_CHAIN and row[2] in slugs:
            continue
        keep.append((ts, line))
    out.lines = keep


def write(out: Output, dest: Path) -> dict[str, Any]:
    lines = sorted(set(out.lines))
    if len(lines) != len(out.lines):
        raise ValueError(f"{out.file}: {len(out.lines) - len(lines)} duplicate lines")
    if out.rejected:
        out.notes.append(
            f"Left out, as validate_point would reject them: {dict(sorted(out.rejected.items()))}."
        )
    body = b"".join(line + b"\n" for _, line in lines)
    # mtime=0 and no file name in the header: byte-identical output on every run.
    blob = gzip.compress(body, compresslevel=9, mtime=0)
    (dest / out.file).write_bytes(blob)
    return {
        "file": out.file,
        "source": out.source,
        "description": out.description,
        "origin": out.origin,
        "attribution": out.attribution,
        "rows": len(lines),
        "first_ts": lines[0][0] if lines else None,
        "last_ts": lines[-1][0] if lines else None,
        "bytes": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
        "notes": out.notes,
    }


def build(src: Path, dest: Path) -> dict[str, Any]:
    snapshot, derived, snapshots = build_snapshot(src)
    b3, b3_chains = build_b3(src)
    b7, b7_slugs = build_b7(src)
    covered = b7_slugs & {snap.meta.slug for snap in snapshots.values()}
    # B7 gives these protocols a daily total series across 2024-03 and 2025-12: the snapshot's
    # total (and the derived references) would be a second, conflicting source for it.
    drop_covered(snapshot, covered)
    drop_covered(derived, covered)
    snapshot.notes.append(f"No total tvl for {sorted(covered)}: the protocol series file has it.")
    derived.notes.append(f"Not for {sorted(covered)} (see the protocol series file).")
    cmc, cmc_ranges = build_cmc(src)
    coingecko, cg_last = build_coingecko(src, cmc_ranges)
    outputs = [
        snapshot, derived, b3, build_b1(src, b3_chains), build_b4(src), b7, build_b5(src),
        coingecko, build_coinbase(src, cg_last), cmc, build_lite(src, snapshots, b7_slugs),
    ]
    dest.mkdir(parents=True, exist_ok=True)
    for stale in dest.glob("*.jsonl.gz"):
        stale.unlink()
    entries = [write(out, dest) for out in outputs]
    manifest = {
        "generated_by": "scripts/build_demo_data.py",
        "format": {
            "p": ["p", "metric", "subject", "chain", "ts", "value"],
            "m": ["m", "ts", "slug", "name", "category", "chains", "gecko_id", "symbol", "url",
                  "listed_at"],
            "order": "each file sorted by ts, then by line bytes; ts in epoch seconds UTC",
        },
        "licence": "Third-party data used as test fixtures; only check-sked/"
                   "crypto_data_resources states a licence (ISC). Attribute DefiLlama, "
                   "CoinGecko, Coinbase and CoinMarketCap.",
        "sources": entries,
    }
    text = json.dumps(manifest, indent=2, sort_keys=False, ensure_ascii=False) + "\n"
    (dest / "manifest.json").write_text(text)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", nargs="?", type=Path, default=DEFAULT_SRC,
                        help="shared/defi-data folder (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="default: %(default)s")
    args = parser.parse_args(argv)
    manifest = build(args.src, args.out)
    total = 0
    for entry in manifest["sources"]:
        total += entry["bytes"]
        print(f"{entry['file']:48} {entry['rows']:>8} rows {entry['bytes'] / 1e6:6.2f} MB")
    print(f"{'total':48} {sum(e['rows'] for e in manifest['sources']):>8} rows "
          f"{total / 1e6:6.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
