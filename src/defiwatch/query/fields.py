"""The datasets a query can read and their whitelisted fields (names, types, allowed use).

A field name in a query is only ever a key into these tables; compile.py maps each to a
SQLAlchemy column expression. Nothing a client sends becomes SQL text.

| dataset     | rows                                                        | history |
|-------------|-------------------------------------------------------------|---------|
| `protocols` | one per protocol: metadata and its newest total TVL, the    | no      |
|             | 1h/24h/7d changes of that TVL and its token's market cap;    |         |
|             | aggregated queries that use `chain` see one row per protocol |         |
|             | and chain instead, `tvl` being that chain's TVL              |         |
| `tvl`       | stored points of the TVL metrics (`tvl`, `tvl_borrowed`, ... | yes     |
|             | and `chain_tvl`), optionally with the protocol's category    |         |
| `prices`    | stored points of `price` and `mcap` (subject `coingecko:id`)| yes     |
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from defiwatch.domain.series import PRICE_METRICS, TVL_SUBKEYS, normalize_chain, normalize_subject

__all__ = [
    "DATASETS",
    "PRICE_DATASET_METRICS",
    "TVL_DATASET_METRICS",
    "Dataset",
    "FieldSpec",
    "FieldType",
]

TVL_DATASET_METRICS = frozenset({"tvl", "chain_tvl", *(f"tvl_{k}" for k in TVL_SUBKEYS)})
PRICE_DATASET_METRICS = frozenset(PRICE_METRICS)


class FieldType(enum.StrEnum):
    NUMBER = "number"  # float; sum/avg/min/max/percentile apply
    INTEGER = "integer"  # epoch seconds and other whole numbers
    STRING = "string"
    LIST = "list"  # a list of chain slugs: filter with contains/in/nin only


def _slug(value: str) -> str:
    return normalize_subject("tvl", value) or value


def _coin(value: str) -> str:
    return normalize_subject("price", value) or value


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One whitelisted field.

    `normalize` canonicalises compared string values the way ingest stored them (`Ethereum` and
    `ethereum` are one chain); `contains` is never normalised. `join` names an optional join the
    field needs (compile.py adds it only when a query uses such a field).
    """

    name: str
    type: FieldType
    description: str
    normalize: Callable[[str], str] | None = None
    default: bool = True  # part of the projection when the query names none
    join: str | None = None
    nullable: bool = True  # False: never NULL (keyset pagination needs to know)
    splits: bool = False  # using it splits each row (aggregated queries only)


@dataclass(frozen=True, slots=True)
class Dataset:
    name: str
    description: str
    fields: Mapping[str, FieldSpec]
    history: bool  # points with `ts`: time ranges and time buckets apply
    metrics: frozenset[str]  # the point metrics it reads (also what invalidates its answers)
    protocol_metadata: bool  # reads `protocols` rows (so protocol changes invalidate it)

    def field(self, name: str) -> FieldSpec | None:
        return self.fields.get(name)


def _fields(*specs: FieldSpec) -> Mapping[str, FieldSpec]:
    return {s.name: s for s in specs}


_N, _I, _S, _L = FieldType.NUMBER, FieldType.INTEGER, FieldType.STRING, FieldType.LIST

PROTOCOLS = Dataset(
    name="protocols",
    description="The newest snapshot: one row per protocol with metadata, total TVL (USD), "
    "its 1h/24h/7d change (%) and the market cap of its token.",
    fields=_fields(
        FieldSpec("slug", _S, "protocol slug (unique)", _slug, nullable=False),
        FieldSpec("name", _S, "display name", nullable=False),
        FieldSpec("category", _S, "DefiLlama category, e.g. Dexes, Lending"),
        FieldSpec("chains", _L, "chain slugs the protocol is deployed on", normalize_chain),
        FieldSpec("gecko_id", _S, "CoinGecko id of the protocol's token"),
        FieldSpec("symbol", _S, "token symbol"),
        FieldSpec("url", _S, "website", default=False),
        FieldSpec("listed_at", _I, "when DefiLlama listed it (epoch s)", default=False),
        FieldSpec("chain", _S, "a chain the protocol's TVL is split over (aggregated queries "
                  "only): with it, each protocol counts once per chain observed with its newest "
                  "per-chain TVL, `tvl` and `ts` being that chain's; a protocol never observed "
                  "per chain has chain null and its total", normalize_chain, default=False,
                  splits=True),
        FieldSpec("tvl", _N, "newest total TVL over all chains (USD)"),
        FieldSpec("ts", _I, "observation time of that TVL (epoch s)"),
        FieldSpec("change_1h", _N, "TVL change over 1 hour (%)"),
        FieldSpec("change_24h", _N, "TVL change over 24 hours (%)"),
        FieldSpec("change_7d", _N, "TVL change over 7 days (%)"),
        FieldSpec("mcap", _N, "newest market cap of gecko_id's token (USD)"),
    ),
    history=False,
    metrics=frozenset({"tvl", "mcap"}),
    protocol_metadata=True,
)

TVL = Dataset(
    name="tvl",
    description="TVL history: every stored point of tvl, tvl_borrowed, tvl_staking, ... "
    "(subject = protocol slug, chain '-' = all chains) and chain_tvl (subject = chain).",
    fields=_fields(
        FieldSpec("metric", _S, "tvl, chain_tvl, tvl_borrowed, tvl_staking, ...", nullable=False),
        FieldSpec("subject", _S, "protocol slug, or the chain for chain_tvl", _slug,
                  nullable=False),
        FieldSpec("chain", _S, "chain slug; '-' = the protocol's total", normalize_chain,
                  nullable=False),
        FieldSpec("ts", _I, "observation time (epoch s)", nullable=False),
        FieldSpec("value", _N, "USD", nullable=False),
        FieldSpec("category", _S, "the protocol's category (joined; null for chains)",
                  default=False, join="protocols"),
        FieldSpec("name", _S, "the protocol's name (joined)", default=False, join="protocols"),
    ),
    history=True,
    metrics=TVL_DATASET_METRICS,
    protocol_metadata=False,  # only when category/name are used: see Query.uses_join
)

PRICES = Dataset(
    name="prices",
    description="Price and market-cap history of coins (subject coingecko:{id}); every row "
    "says its metric, and aggregates of value need one metric (filter or group_by metric).",
    fields=_fields(
        FieldSpec("metric", _S, "price or mcap", nullable=False),
        FieldSpec("coin", _S, "coingecko:{id}; a bare id is prefixed", _coin, nullable=False),
        FieldSpec("ts", _I, "observation time (epoch s)", nullable=False),
        FieldSpec("value", _N, "USD", nullable=False),
    ),
    history=True,
    metrics=PRICE_DATASET_METRICS,
    protocol_metadata=False,
)

DATASETS: Mapping[str, Dataset] = {d.name: d for d in (PROTOCOLS, TVL, PRICES)}
