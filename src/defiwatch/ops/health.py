"""Role health: each role's loop beats, readiness says which roles stopped making progress.

A loop calls `beat("processor")` once per iteration or idle poll; a store of `time.monotonic()`,
cheap enough for a per-batch call. The registry is found through a context variable that
`run_roles` sets in each role's task (tasks a role spawns inherit it), not through a global:
a loop run outside `run_roles` (a test, `defiwatch replay`) beats nowhere, and two platforms in
one process (tests) keep separate registries.
"""

from __future__ import annotations

import contextlib
import enum
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

__all__ = ["Health", "Readiness", "RoleState", "RoleStatus", "beat"]


class RoleState(enum.Enum):
    """Why a role counts as ready or not."""

    OK = "ok"  # beat within the allowance, without error
    DEGRADED = "degraded"  # beats, but its last iteration failed (it is retrying)
    STALE = "stale"  # no beat within the allowance: stuck, or its loop is gone
    FAILED = "failed"  # its task raised; the supervisor restarts it
    FINISHED = "finished"  # a finite role (replay) ended normally; not required any more

    @property
    def ready(self) -> bool:
        return self in (RoleState.OK, RoleState.FINISHED)


@dataclass(frozen=True)
class RoleStatus:
    role: str
    state: RoleState
    age_s: float  # seconds since the last beat (or since the role was registered)
    error: str | None = None


@dataclass(frozen=True)
class Readiness:
    roles: tuple[RoleStatus, ...]

    @property
    def ready(self) -> bool:
        return all(r.state.ready for r in self.roles)

    @property
    def failing(self) -> list[str]:
        """The names of the roles that make the process not ready."""
        return [r.role for r in self.roles if not r.state.ready]

    def as_dict(self) -> dict[str, object]:
        return {
            "status": "ready" if self.ready else "not_ready",
            "failing": self.failing,
            "roles": {r.role: {"state": r.state.value, "age_s": round(r.age_s, 3),
                               "error": r.error} for r in self.roles},
        }


class _Entry:
    __slots__ = ("deadline", "error", "failed", "finished", "last")

    def __init__(self, now: float) -> None:
        self.last = now
        self.deadline = now  # the beat is due by deadline + stale_s
        self.error: str | None = None
        self.failed = False
        self.finished = False


class Health:
    """The roles of one process and when each last made progress.

    Args:
        stale_s: a role not heard of for this long (beyond an announced idle wait) is stale.
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(self, stale_s: float = 30.0, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if stale_s <= 0:
            raise ValueError("stale_s must be > 0")
        self.stale_s = stale_s
        self._clock = clock
        self._roles: dict[str, _Entry] = {}

    def expect(self, role: str) -> None:
        """Require `role` for readiness; it has `stale_s` from now for its first beat."""
        self._roles.setdefault(role, _Entry(self._clock()))

    def beat(self, role: str, *, error: str | None = None, idle_s: float = 0.0) -> None:
        """Record progress of `role` (a role never expected is ignored).

        Args:
            error: the text of the failure the loop is retrying after; None = the iteration
                went well (clears an earlier error).
            idle_s: the loop is about to wait this long (a poll interval, a backoff): the next
                beat is due `idle_s + stale_s` from now.
        """
        entry = self._roles.get(role)
        if entry is None:
            return
        entry.last = self._clock()
        entry.deadline = entry.last + idle_s
        entry.error = error
        entry.failed = False

    def failed(self, role: str, error: str) -> None:
        """The role's task raised (the supervisor restarts it): not ready until it beats."""
        entry = self._roles.get(role)
        if entry is not None:
            entry.failed = True
            entry.error = error

    def finished(self, role: str) -> None:
        """A finite role ended normally: it no longer counts against readiness."""
        entry = self._roles.get(role)
        if entry is not None:
            entry.finished = True

    def readiness(self, now: float | None = None) -> Readiness:
        now = self._clock() if now is None else now
        return Readiness(tuple(self._status(role, entry, now)
                               for role, entry in sorted(self._roles.items())))

    def _status(self, role: str, entry: _Entry, now: float) -> RoleStatus:
        age = max(0.0, now - entry.last)
        if entry.finished:
            state = RoleState.FINISHED
        elif entry.failed:
            state = RoleState.FAILED
        elif now > entry.deadline + self.stale_s:
            state = RoleState.STALE
        elif entry.error is not None:
            state = RoleState.DEGRADED
        else:
            state = RoleState.OK
        return RoleStatus(role, state, age, entry.error)

    @contextlib.contextmanager
    def bound(self) -> Iterator[None]:
        """Make this registry the one `beat()` reports to, in the current context (and in
        every task created from it)."""
        token = _current.set(self)
        try:
            yield
        finally:
            _current.reset(token)


_current: ContextVar[Health | None] = ContextVar("defiwatch_health", default=None)


def beat(role: str, *, error: str | None = None, idle_s: float = 0.0) -> None:
    """Record progress of `role` in the registry of the running role (see `Health.beat`);
    nothing when the loop runs outside `run_roles`."""
    health = _current.get()
    if health is not None:
        health.beat(role, error=error, idle_s=idle_s)
