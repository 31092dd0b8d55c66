"""Operations: logging setup (metrics are defined next to the code they measure)."""

from defiwatch.ops.logging import configure_logging

__all__ = ["configure_logging"]
