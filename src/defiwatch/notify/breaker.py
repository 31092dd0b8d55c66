"""Circuit breaker per receiving host: stop hammering a receiver that is down. Pure: no I/O, no
clock (`now` is an argument, epoch seconds); the delivery worker consults it before each send
and reports each result.

    CLOSED ──(failure_threshold consecutive failures)──> OPEN
    OPEN ──(open interval elapsed; the next admit is a probe)──> HALF_OPEN
    HALF_OPEN ──(probe succeeds)──> CLOSED
    HALF_OPEN ──(probe fails)──> OPEN, interval doubled up to max_open_s
    HALF_OPEN ──(probe lease expires unreported)──> a new probe is admitted

A *failure* is a retryable transport or server failure (timeout, network, 5xx, 408): the
receiver is down or broken. Any answer the receiver chose to give (2xx, a final 4xx, push
404/410) is a *success* for the breaker: it is alive. A 429 is neutral: it limits one endpoint
(Slack and Discord rate-limit per webhook), while the breaker would pause the whole host, and
the notification's own retry already honours its Retry-After. Failures decided on our side
(SSRF refusal, invalid target, missing settings) are neutral too.

A rejected notification is not an attempt: the worker postpones it to `retry_at(key)` without
counting it against the retry policy.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from defiwatch.domain.channels import url_host
from defiwatch.notify.message import EmailTarget, PushTarget, Target
from defiwatch.notify.senders.base import Outcome, Reason, SendResult

__all__ = [
    "Admission",
    "BreakerPolicy",
    "Circuit",
    "CircuitBreaker",
    "CircuitState",
    "Signal",
    "admit",
    "breaker_key",
    "record",
    "signal_for",
]


class CircuitState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Admission(enum.StrEnum):
    ALLOW = "allow"  # closed: send
    PROBE = "probe"  # half-open: send this one, hold the others until it reports
    REJECT = "reject"  # open (or a probe in flight): postpone without sending


class Signal(enum.StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"
    NEUTRAL = "neutral"


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """Attributes:
    failure_threshold: consecutive failures that open a closed circuit.
    open_s: first open interval, seconds.
    max_open_s: cap of the open interval as failed probes double it, seconds.
    probe_timeout_s: a probe not reported within this is presumed lost, seconds.
    """

    failure_threshold: int = 5
    open_s: float = 60.0
    max_open_s: float = 1_800.0
    probe_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if not 0 < self.open_s <= self.max_open_s:
            raise ValueError("need 0 < open_s <= max_open_s")
        if self.probe_timeout_s <= 0:
            raise ValueError("probe_timeout_s must be positive")


@dataclass(frozen=True, slots=True)
class Circuit:
    """The breaker state of one key. `open_until` and `probe_until` are epoch seconds."""

    state: CircuitState = CircuitState.CLOSED
    failures: int = 0  # consecutive failures
    open_s: float = 0.0  # the current (last) open interval
    open_until: float = 0.0
    probe_until: float | None = None  # a probe is in flight until then


CLOSED = Circuit()


def admit(circuit: Circuit, policy: BreakerPolicy, now: float) -> tuple[Admission, Circuit]:
    """May a send go out now? Returns the admission and the circuit after it."""
    if circuit.state is CircuitState.CLOSED:
        return Admission.ALLOW, circuit
    if circuit.state is CircuitState.OPEN and now < circuit.open_until:
        return Admission.REJECT, circuit
    if (circuit.state is CircuitState.HALF_OPEN and circuit.probe_until is not None
            and now < circuit.probe_until):
        return Admission.REJECT, circuit
    return Admission.PROBE, replace(circuit, state=CircuitState.HALF_OPEN,
                                    probe_until=now + policy.probe_timeout_s)


def record(circuit: Circuit, policy: BreakerPolicy, signal: Signal, now: float) -> Circuit:
    """The circuit after a send reported `signal`."""
    if signal is Signal.SUCCESS:
        return CLOSED
    if signal is Signal.NEUTRAL:
        # A half-open probe that got a neutral answer frees the slot for another probe.
        if circuit.state is CircuitState.HALF_OPEN:
            return replace(circuit, probe_until=None)
        return circuit
    failures = circuit.failures + 1
    if circuit.state is CircuitState.HALF_OPEN:
        interval = min(policy.max_open_s, max(policy.open_s, circuit.open_s * 2))
        return Circuit(CircuitState.OPEN, failures, interval, now + interval)
    if circuit.state is CircuitState.OPEN:
        return replace(circuit, failures=failures)  # a straggler sent before the circuit opened
    if failures >= policy.failure_threshold:
        return Circuit(CircuitState.OPEN, failures, policy.open_s, now + policy.open_s)
    return replace(circuit, failures=failures)


_OUR_SIDE = frozenset({Reason.BLOCKED, Reason.INVALID_TARGET, Reason.NOT_CONFIGURED, Reason.INTERNAL})


def signal_for(result: SendResult) -> Signal:
    """What a send result tells the breaker about the receiver (see the module docstring)."""
    if result.reason in _OUR_SIDE:
        return Signal.NEUTRAL
    if result.outcome is Outcome.RETRY:
        return Signal.NEUTRAL if result.status_code == 429 else Signal.FAILURE
    return Signal.SUCCESS


def breaker_key(target: Target) -> str:
    """The breaker key of a target: the receiving host (and port) of HTTP targets; one key for
    email, which all goes through the configured SMTP relay."""
    if isinstance(target, EmailTarget):
        return "smtp"
    return url_host(target.endpoint if isinstance(target, PushTarget) else target.url)


class CircuitBreaker:
    """The circuits of every key, in memory (one per worker process: each worker learns on its
    own that a host is down, within `failure_threshold` sends). Closed circuits without
    failures are not stored, so memory follows the number of failing hosts."""

    def __init__(self, policy: BreakerPolicy | None = None) -> None:
        self.policy = policy or BreakerPolicy()
        self._circuits: dict[str, Circuit] = {}

    def admit(self, key: str, now: float) -> Admission:
        circuit = self._circuits.get(key, CLOSED)
        admission, after = admit(circuit, self.policy, now)
        self._store(key, after)
        return admission

    def record(self, key: str, result: SendResult | Signal, now: float) -> CircuitState:
        signal = result if isinstance(result, Signal) else signal_for(result)
        after = record(self._circuits.get(key, CLOSED), self.policy, signal, now)
        self._store(key, after)
        return after.state

    def state(self, key: str) -> CircuitState:
        return self._circuits.get(key, CLOSED).state

    def retry_at(self, key: str) -> float | None:
        """When a rejected send of `key` may be tried again (epoch s); None if not rejecting."""
        circuit = self._circuits.get(key, CLOSED)
        if circuit.state is CircuitState.OPEN:
            return circuit.open_until
        if circuit.state is CircuitState.HALF_OPEN and circuit.probe_until is not None:
            return circuit.probe_until
        return None

    def __len__(self) -> int:
        return len(self._circuits)

    def _store(self, key: str, circuit: Circuit) -> None:
        if circuit == CLOSED:
            self._circuits.pop(key, None)
        else:
            self._circuits[key] = circuit
