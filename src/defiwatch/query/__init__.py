"""Analytic queries: a JSON query language compiled to SQL, answered fresh and cached.

Flow: dsl.py (JSON -> validated `Query`) -> compile.py (`Query` -> SQLAlchemy Core SELECT)
-> service.py (run under limits; cache.py keeps answers, freshness.py proves them current);
index.py maintains the protocol snapshot the `protocols` dataset reads.
"""

from defiwatch.query.cache import (
    CoolingResultCache,
    MemoryResultCache,
    RedisResultCache,
    ResultCache,
)
from defiwatch.query.dsl import Limits, Query, parse_query
from defiwatch.query.freshness import Deps
from defiwatch.query.index import ReadModel
from defiwatch.query.service import Answer, CursorExpiredError, QueryService, QueryTimeoutError

__all__ = [
    "Answer",
    "CoolingResultCache",
    "CursorExpiredError",
    "Deps",
    "Limits",
    "MemoryResultCache",
    "Query",
    "QueryService",
    "QueryTimeoutError",
    "ReadModel",
    "RedisResultCache",
    "ResultCache",
    "parse_query",
]
