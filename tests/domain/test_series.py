import pytest

from defiwatch.domain import NO_CHAIN, normalize_chain, normalize_subject, split_chain_tvl_key


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Ethereum", "ethereum"),
        ("  BSC ", "bsc"),
        ("Binance", "bsc"),
        ("OP Mainnet", "optimism"),
        ("zkSync Era", "zksync-era"),
        ("Polygon zkEVM", "polygon-zkevm"),
        (None, NO_CHAIN),
        ("", NO_CHAIN),
        ("-", NO_CHAIN),
    ],
)
def test_normalize_chain(raw: str | None, expected: str) -> None:
    assert normalize_chain(raw) == expected


@pytest.mark.parametrize(
    ("metric", "raw", "expected"),
    [
        ("price", "ethereum", "coingecko:ethereum"),
        ("price", "coingecko:Ethereum", "coingecko:ethereum"),
        ("mcap", "Bitcoin", "coingecko:bitcoin"),
        ("tvl", "Aave V3", "aave-v3"),
        ("chain_tvl", "Binance", "bsc"),
    ],
)
def test_normalize_subject(metric: str, raw: str, expected: str) -> None:
    assert normalize_subject(metric, raw) == expected


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("Ethereum", ("tvl", "ethereum")),
        ("Ethereum-borrowed", ("tvl_borrowed", "ethereum")),
        ("zkSync Era-staking", ("tvl_staking", "zksync-era")),
        ("Binance-pool2", ("tvl_pool2", "bsc")),
        ("borrowed", ("tvl_borrowed", NO_CHAIN)),
        ("Ethereum-somethingnew", None),
    ],
)
def test_split_chain_tvl_key(key: str, expected: tuple[str, str] | None) -> None:
    assert split_chain_tvl_key(key) == expected
