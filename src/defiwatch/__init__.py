"""defiwatch: real-time DeFi analytics (TVL and prices in, change events out)."""

__version__ = "0.1.0"
__all__ = ["__version__"]
