"""Operations: logging setup, role health and supervision, the ops listener and the process's
metrics exposition (metrics themselves are defined next to the code they measure)."""

from defiwatch.ops.health import Health, beat
from defiwatch.ops.logging import configure_logging

__all__ = ["Health", "beat", "configure_logging"]
