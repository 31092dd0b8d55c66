"""Parameter types shared by every route: ids, offsets, times and text a database can hold.

Each is an `Annotated` type that pydantic checks before a route runs, so hostile values (an id
beyond 64 bits, `since=1e20`, `nan`, NUL in text) answer a 400 naming the parameter instead of
failing in the driver: SQLite and PostgreSQL both refuse integers beyond signed 64 bits, and
PostgreSQL refuses NUL in text. Use them with `Path(...)`/`Query(...)` for descriptions:
`rule_id: Annotated[RowId, Path(description="the rule's id")]`.
"""

from __future__ import annotations

from typing import Annotated

from annotated_types import Ge, Le
from pydantic import AfterValidator, AllowInfNan
from pydantic_core import PydanticCustomError

from defiwatch.domain.series import name_problem
from defiwatch.domain.text import text_problem

__all__ = ["INT64_MAX", "MAX_EPOCH_S", "EpochFloat", "EpochSeconds", "Name", "Offset", "RowId",
           "Text"]

INT64_MAX = 2**63 - 1  # the largest integer SQLite and PostgreSQL (bigint) store
MAX_EPOCH_S = 253_402_300_799  # 9999-12-31T23:59:59Z: later epoch seconds are a unit mistake


def _storable(value: str) -> str:
    if problem := text_problem(value):
        raise PydanticCustomError("invalid_text", problem)
    return value


def _name(value: str) -> str:
    if problem := name_problem(value):
        raise PydanticCustomError("invalid_name", problem)
    return value


RowId = Annotated[int, Ge(1), Le(INT64_MAX)]
"""A database row id (rules, alerts, endpoints, notifications)."""

Offset = Annotated[int, Ge(0), Le(INT64_MAX)]
"""A stream offset or an id already seen (`after`); 0 = from the start."""

EpochSeconds = Annotated[int, Ge(0), Le(MAX_EPOCH_S)]
"""A timestamp in whole epoch seconds."""

EpochFloat = Annotated[float, AllowInfNan(False), Ge(0), Le(MAX_EPOCH_S)]
"""A timestamp in epoch seconds, fractions allowed; never nan or infinite."""

Text = Annotated[str, AfterValidator(_storable)]
"""Free text we store or compare in SQL: no NUL, valid Unicode."""

Name = Annotated[str, AfterValidator(_name)]
"""A subject (protocol slug, coin id) or chain as a client writes it, before normalising."""
