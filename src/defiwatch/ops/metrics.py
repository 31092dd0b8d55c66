"""The process's Prometheus exposition, shared by the API's `/metrics` and the ops listener.

Metrics themselves are defined next to the code they measure, on prometheus-client's default
registry; this module adds `defiwatch_build_info` and the role restart counter, and turns off
the `_created` series.
"""

from __future__ import annotations

import platform

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)

from defiwatch import __version__

__all__ = ["BUILD_INFO", "CONTENT_TYPE", "ROLE_RESTARTS", "exposition"]

# Process-wide, checked at each scrape: a `_created` sample per counter and histogram child
# doubles the series count for a value no dashboard of ours reads (issue 10 point 8).
disable_created_metrics()  # type: ignore[no-untyped-call]

CONTENT_TYPE = CONTENT_TYPE_LATEST

BUILD_INFO = Gauge("defiwatch_build_info", "Always 1; the labels say what runs.",
                   ["version", "python"])
BUILD_INFO.labels(__version__, platform.python_version()).set(1)

ROLE_RESTARTS = Counter("defiwatch_role_restarts_total",
                        "Role tasks restarted by the supervisor after they raised.", ["role"])


def exposition() -> bytes:
    """Every metric of this process in the Prometheus text format."""
    return generate_latest()
