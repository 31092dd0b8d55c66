"""Series identity and the normalisation every source goes through.

A series is `(metric, subject, chain)`:
- `tvl` / `tvl_borrowed` / `tvl_staking` / ... : subject is a protocol slug, chain a chain slug or
  `NO_CHAIN` for the protocol's total over all chains. DefiLlama's `Chain-borrowed`-style sub-keys
  become their own metric, never part of `tvl` (DefiLlama's default TVL excludes them too).
- `chain_tvl`: subject and chain are both the chain slug (the chain's total TVL).
- `price` / `mcap`: subject is a coin id in DefiLlama's `coingecko:{id}` form, chain `NO_CHAIN`.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from defiwatch.domain.text import text_problem

__all__ = [
    "MAX_NAME_CHARS",
    "METRICS",
    "NO_CHAIN",
    "PRICE_METRICS",
    "TVL_SUBKEYS",
    "SeriesKey",
    "name_problem",
    "normalize_chain",
    "normalize_subject",
    "split_chain_tvl_key",
]

NO_CHAIN = "-"

# DefiLlama `chainTvls` sub-keys that are reported apart from TVL (seen in the 2024-03 capture).
TVL_SUBKEYS = frozenset(
    {"borrowed", "staking", "pool2", "vesting", "treasury", "offers", "doublecounted",
     "liquidstaking", "dcandlsoverlap"}
)
PRICE_METRICS = frozenset({"price", "mcap"})
METRICS = frozenset({"tvl", "chain_tvl", *PRICE_METRICS, *(f"tvl_{k}" for k in TVL_SUBKEYS)})

# DefiLlama spells some chains two ways (chainTvls keys vs /v2/chains names vs CSV columns).
_CHAIN_ALIASES = {
    "binance": "bsc",
    "binance-smart-chain": "bsc",
    "bnb": "bsc",
    "op-mainnet": "optimism",
    "avax": "avalanche",
    "matic": "polygon",
    "xdai": "gnosis",
}
_SLUG_RE = re.compile(r"[^a-z0-9.:_-]+")
# Longest subject or chain a client may send (characters, before normalising), set by the
# narrowest columns (protocols.slug and chain: 120; points.subject: 160, room for the
# `coingecko:` prefix). Longer names are refused (`name_problem`), never silently cut.
MAX_NAME_CHARS = 120


class SeriesKey(NamedTuple):
    metric: str
    subject: str
    chain: str

    def __str__(self) -> str:
        return f"{self.metric}|{self.subject}|{self.chain}"


def _slug(text: str) -> str:
    return _SLUG_RE.sub("-", text.strip().lower()).strip("-")[:MAX_NAME_CHARS]


def name_problem(raw: str) -> str | None:
    """Why a client's subject or chain cannot name one (too long, NUL, ...); None when it can."""
    if len(raw) > MAX_NAME_CHARS:
        return f"is longer than {MAX_NAME_CHARS} characters"
    return text_problem(raw)


def normalize_chain(name: str | None) -> str:
    """Canonical chain slug: lower case, spaces to dashes, known aliases folded (`BSC`, `Binance`)."""
    if name is None or not name.strip() or name.strip() == NO_CHAIN:
        return NO_CHAIN
    slug = _slug(name)
    return _CHAIN_ALIASES.get(slug, slug) or NO_CHAIN


def normalize_subject(metric: str, subject: str) -> str:
    """Canonical subject: protocol slugs lower case; coins as `coingecko:{id}` unless prefixed."""
    slug = _slug(subject)
    if metric in PRICE_METRICS and ":" not in slug:
        return f"coingecko:{slug}"
    if metric == "chain_tvl":
        return normalize_chain(subject)
    return slug


def split_chain_tvl_key(key: str) -> tuple[str, str] | None:
    """Map a DefiLlama `chainTvls` key to `(metric, chain)`.

    `Ethereum` -> (`tvl`, `ethereum`); `Ethereum-borrowed` -> (`tvl_borrowed`, `ethereum`);
    a bare `borrowed` -> (`tvl_borrowed`, NO_CHAIN). Unknown sub-keys give None (skipped, not
    guessed into TVL).
    """
    lowered = key.strip().lower()
    if lowered in TVL_SUBKEYS:
        return f"tvl_{lowered}", NO_CHAIN
    chain, sep, sub = key.rpartition("-")
    if sep and sub.lower() in TVL_SUBKEYS:
        return f"tvl_{sub.lower()}", normalize_chain(chain)
    if sep and sub.islower():
        return None  # an unknown lower-case suffix such as `Chain-foo`: not plain TVL
    return "tvl", normalize_chain(key)
