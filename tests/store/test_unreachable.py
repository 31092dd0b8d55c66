"""`database_unreachable`: which errors mean "the database cannot be reached, retry later"
(answered 503) and which are bugs or bad statements (500). Values in, values out."""

from __future__ import annotations

import sqlite3

import asyncpg
import pytest
from sqlalchemy import exc as sa_exc

from defiwatch.store.db import database_unreachable


def wrapped(orig: BaseException, cls: type[sa_exc.DBAPIError] = sa_exc.DBAPIError,
            invalidated: bool = False) -> sa_exc.DBAPIError:
    """What SQLAlchemy raises around a driver error."""
    return cls("SELECT 1", {}, orig, connection_invalidated=invalidated)


def caused(error: BaseException, cause: BaseException) -> BaseException:
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(("error", "unreachable"), [
    (ConnectionRefusedError(111, "Connect call failed"), True),  # nothing listens
    (OSError("Multiple exceptions: [Errno 111] ..., [Errno 99] ..."), True),  # localhost v4+v6
    (TimeoutError(), True),  # connect timeout
    (ConnectionResetError(104, "reset by peer"), True),
    (sa_exc.TimeoutError("QueuePool limit reached"), True),  # pool checkout timed out
    (asyncpg.CannotConnectNowError("the database system is starting up"), True),
    (asyncpg.AdminShutdownError("terminating connection due to administrator command"), True),
    (asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
     True),
    (asyncpg.TooManyConnectionsError("sorry, too many clients already"), True),
    (asyncpg.InterfaceError("connection is closed"), True),
    (wrapped(Exception("server closed the connection"), invalidated=True), True),
    (wrapped(asyncpg.CannotConnectNowError("starting up"), sa_exc.OperationalError), True),
    (caused(sa_exc.InterfaceError("x", {}, Exception("?")),
            ConnectionResetError()), True),
    # Bugs and bad input: a 500 or a 400 elsewhere, never "retry later".
    (wrapped(asyncpg.UniqueViolationError("duplicate key"), sa_exc.IntegrityError), False),
    (wrapped(asyncpg.UndefinedTableError("relation does not exist"), sa_exc.ProgrammingError),
     False),
    (wrapped(sqlite3.OperationalError("no such table: points"), sa_exc.OperationalError), False),
    (asyncpg.InterfaceError("cannot perform operation: another operation is in progress"), False),
    (ValueError("bad"), False),
    (RuntimeError("bug"), False),
])
def test_database_unreachable(error: BaseException, unreachable: bool) -> None:
    assert database_unreachable(error) is unreachable


def test_a_cause_cycle_ends() -> None:
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a
    assert database_unreachable(a) is False
