"""Values the notify tests share: an alert event and notifications built around it."""

from __future__ import annotations

from defiwatch.domain.events import Event
from defiwatch.notify.message import Notification, NotificationKind, RuleRef, Target

NOW = 1_735_786_800.0  # 2025-01-02 03:00:00 UTC


def tvl_event(**changes: object) -> Event:
    """An alert_fired event on uniswap TVL (ethereum): $4.2B -> $3.68B."""
    fields: dict[str, object] = dict(
        type="alert_fired", metric="tvl", subject="uniswap", chain="ethereum",
        value=3_680_000_000.0, previous=4_200_000_000.0, change_abs=-520_000_000.0,
        change_pct=-12.380952, change_1h=None, change_24h=-12.4, change_7d=None,
        ts=1_735_786_799, emitted_at=NOW, source="alerts",
        detail={"rule_id": 7, "rule_name": "Uniswap TVL drop", "severity": "critical",
                "alert_id": 11, "user_id": 3},
    )
    fields.update(changes)
    return Event(**fields)  # type: ignore[arg-type]


def notification(target: Target, *, kind: NotificationKind = NotificationKind.ALERT_FIRED,
                 rule: RuleRef | None = None, event: Event | None = None,
                 id: str = "ntf_42", attempt: int = 1) -> Notification:
    return Notification(
        id=id, kind=kind, target=target,
        rule=rule or RuleRef(7, "Uniswap TVL drop", "critical"),
        events=(event or tvl_event(),), created_at=NOW, attempt=attempt,
    )
