"""Notifications for people: numbers with units, changes with signs, times in UTC, and the
Jinja2 templates of email.

Every channel starts from one `Summary` (title, a link-free sentence, labelled facts), so a
webhook's `message`, an email, a push notification and a chat message say the same thing. The
text is plain: each channel escapes it for its own markup (HTML autoescape, Slack mrkdwn,
Discord markdown). Messages carry no links: a notification is not a place to click through.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2

from defiwatch.domain.events import Event
from defiwatch.domain.series import NO_CHAIN, PRICE_METRICS
from defiwatch.notify.message import Notification, NotificationKind
from defiwatch.notify.redact import redact_url

__all__ = [
    "RenderedEmail",
    "Summary",
    "Templates",
    "describe_change",
    "event_line",
    "format_pct",
    "format_utc",
    "format_value",
    "iso_utc",
    "metric_label",
    "summarize",
]

_METRIC_LABELS = {"tvl": "TVL", "chain_tvl": "chain TVL", "price": "price", "mcap": "market cap"}
SEVERITY_COLORS = {"info": "#0969da", "warning": "#bf8700", "critical": "#cf222e"}
RESOLVED_COLOR = "#1a7f37"


def metric_label(metric: str) -> str:
    """`tvl` -> `TVL`, `tvl_borrowed` -> `borrowed TVL`, `mcap` -> `market cap`."""
    if metric in _METRIC_LABELS:
        return _METRIC_LABELS[metric]
    if metric.startswith("tvl_"):
        return f"{metric.removeprefix('tvl_')} TVL"
    return metric


def _subject(event: Event) -> tuple[str, str]:
    """(label, name) of what an event is about."""
    if event.metric in PRICE_METRICS:
        return "Token", event.subject.split(":", 1)[-1]
    if event.metric == "chain_tvl":
        return "Chain", event.subject
    return "Protocol", event.subject


def format_value(metric: str, value: float | None) -> str:
    """A value with its unit (US dollars for every metric we track): prices in full
    (`$2,345.67`, `$0.0001234`), totals compact (`$4.20B`)."""
    if value is None or not math.isfinite(value):
        return "n/a"
    sign = "-" if value < 0 else ""
    v = abs(value)
    if metric == "price":
        if v >= 1:
            return f"{sign}${v:,.2f}"
        return f"{sign}${v:.4g}" if v else "$0"
    for limit, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if v >= limit:
            return f"{sign}${v / limit:.2f}{suffix}"
    return f"{sign}${v:,.2f}"


def format_pct(pct: float | None) -> str:
    """`+1.50 %`, `-12.30 %`, `n/a`."""
    if pct is None or not math.isfinite(pct):
        return "n/a"
    return f"{pct:+.2f} %"


def format_utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def iso_utc(ts: float) -> str:
    """RFC 3339 in UTC with a `Z`, to the second."""
    return datetime.fromtimestamp(int(ts), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def describe_change(event: Event) -> str:
    """`fell 12.30 % from $4.20B to $3.68B`, `rose ...`, or `is $3.68B` without a reference."""
    value = format_value(event.metric, event.value)
    if event.previous is None or event.value is None:
        return f"is {value}"
    old = format_value(event.metric, event.previous)
    pct = event.change_pct
    if pct is None and event.previous:
        pct = (event.value - event.previous) / abs(event.previous) * 100
    if event.value == event.previous:
        return f"is unchanged at {value}"
    verb = "rose" if event.value > event.previous else "fell"
    amount = f" {abs(pct):.2f} %" if pct is not None and math.isfinite(pct) else ""
    return f"{verb}{amount} from {old} to {value}"


def _what(event: Event) -> str:
    _, name = _subject(event)
    where = f" on {event.chain}" if event.chain not in (NO_CHAIN, "", event.subject) else ""
    return f"{name} {metric_label(event.metric)}{where}"


def event_line(event: Event) -> str:
    """One event in one line: `uniswap TVL on ethereum fell 12.30 % from $4.20B to $3.68B
    (2025-01-02 03:04:05 UTC)`."""
    return f"{_what(event)} {describe_change(event)} ({format_utc(event.ts)})"


@dataclass(frozen=True, slots=True)
class Summary:
    """What every channel says about a notification.

    Attributes:
        title: short headline (`Alert fired: Uniswap drop`).
        text: one or two plain sentences, no links.
        facts: labelled values (`Protocol`, `Chain`, `Value`, `Change`, `Rule`, `Time`).
        severity: info, warning or critical.
        color: a colour for the severity (resolved: green), `#rrggbb`.
        when: the time it is about, UTC text; `timestamp` the same in epoch seconds.
        lines: digest items, one line per event.
    """

    kind: NotificationKind
    title: str
    text: str
    facts: tuple[tuple[str, str], ...]
    severity: str
    color: str
    when: str
    timestamp: float
    lines: tuple[str, ...] = ()


def _event_facts(event: Event) -> list[tuple[str, str]]:
    label, name = _subject(event)
    facts = [(label, name)]
    if event.chain not in (NO_CHAIN, "", event.subject):
        facts.append(("Chain", event.chain))
    facts.append(("Metric", metric_label(event.metric)))
    if event.previous is not None:
        facts.append(("Value", f"{format_value(event.metric, event.previous)} → "
                               f"{format_value(event.metric, event.value)}"))
    else:
        facts.append(("Value", format_value(event.metric, event.value)))
    if event.change_pct is not None:
        facts.append(("Change", format_pct(event.change_pct)))
    return facts


def summarize(notification: Notification) -> Summary:
    """The Summary of a notification (pure)."""
    n = notification
    rule = n.rule
    severity = rule.severity if rule else "info"
    color = SEVERITY_COLORS.get(severity, SEVERITY_COLORS["warning"])
    event = n.event
    when_ts = float(event.ts) if event is not None else n.created_at
    facts: list[tuple[str, str]] = []
    lines: tuple[str, ...] = ()
    rule_name = rule.name if rule else ""

    if n.kind in (NotificationKind.ALERT_FIRED, NotificationKind.ALERT_RESOLVED):
        fired = n.kind is NotificationKind.ALERT_FIRED
        title = f"Alert {'fired' if fired else 'resolved'}: {rule_name}"
        if event is not None:
            text = f'Rule "{rule_name}" {"fired" if fired else "resolved"}: {event_line(event)}.'
            facts = _event_facts(event)
        else:
            text = f'Rule "{rule_name}" {"fired" if fired else "resolved"}.'
        if not fired:
            color = RESOLVED_COLOR
    elif n.kind is NotificationKind.TEST:
        title = f"Test notification: {rule_name}" if rule else "Test notification"
        text = "This is a test notification from defiwatch: this channel works."
        if event is not None:
            text += f" Example: {event_line(event)}."
            facts = _event_facts(event)
    elif n.kind is NotificationKind.ENDPOINT_DISABLED:
        channel = str(n.detail.get("channel", "notification"))
        target = _shown_target(n.detail.get("target"))
        reason = str(n.detail.get("reason") or "repeated delivery failures")
        title = f"{channel.capitalize()} channel disabled"
        text = (f"defiwatch stopped delivering to your {channel} channel {target}: {reason}. "
                "Fix the receiver, then enable the channel again.")
        facts = [("Channel", channel), ("Target", target), ("Reason", reason)]
        color = SEVERITY_COLORS["warning"]
    else:  # digest
        count = len(n.events)
        lines = tuple(event_line(e) for e in n.events)
        title = f"defiwatch digest: {count} change{'s' if count != 1 else ''}"
        since, until = n.detail.get("since"), n.detail.get("until")
        span = (f" between {format_utc(float(since))} and {format_utc(float(until))}"
                if isinstance(since, int | float) and isinstance(until, int | float) else "")
        text = f"{count} change{'s' if count != 1 else ''}{span}"
        text += f' for rule "{rule_name}".' if rule else "."
        when_ts = float(until) if isinstance(until, int | float) else n.created_at

    if rule is not None and n.kind is not NotificationKind.ENDPOINT_DISABLED:
        facts.append(("Rule", rule_name))
        facts.append(("Severity", severity))
    facts.append(("Time", format_utc(when_ts)))
    return Summary(kind=n.kind, title=title, text=text, facts=tuple(facts), severity=severity,
                   color=color, when=format_utc(when_ts), timestamp=when_ts, lines=lines)


def _shown_target(target: Any) -> str:
    text = str(target or "")
    return redact_url(text, keep_path=False) if "://" in text else text


@dataclass(frozen=True, slots=True)
class RenderedEmail:
    subject: str
    text: str
    html: str


class Templates:
    """The email templates: `{kind}.subject.j2`, `{kind}.txt.j2` and `{kind}.html.j2` per
    notification kind. HTML templates are autoescaped (a rule named `<script>` is shown, not
    run); text and subject are not (they are not markup).

    Args:
        directory: an operator's directory whose templates replace the bundled ones of the
            same name (the rest still come from the package).
    """

    def __init__(self, directory: Path | None = None) -> None:
        loaders: list[jinja2.BaseLoader] = []
        if directory is not None:
            loaders.append(jinja2.FileSystemLoader(directory))
        loaders.append(jinja2.PackageLoader("defiwatch.notify", "templates"))
        self.env = jinja2.Environment(
            loader=jinja2.ChoiceLoader(loaders),
            autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",),
                                                default_for_string=False, default=False),
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
        )
        self.env.filters["value"] = lambda value, metric: format_value(metric, value)
        self.env.filters["pct"] = format_pct
        self.env.filters["utc"] = format_utc

    def render(self, name: str, context: Mapping[str, Any]) -> str:
        return self.env.get_template(name).render(context)

    def email(self, notification: Notification, summary: Summary | None = None) -> RenderedEmail:
        """Subject, text and HTML bodies of `notification`."""
        summary = summary or summarize(notification)
        event = notification.event
        context = {"notification": notification, "summary": summary, "rule": notification.rule,
                   "events": notification.events, "event": event,
                   "what": _what(event) if event is not None else ""}
        kind = notification.kind.value
        subject = " ".join(self.render(f"{kind}.subject.j2", context).split())
        return RenderedEmail(subject=subject[:250], text=self.render(f"{kind}.txt.j2", context),
                             html=self.render(f"{kind}.html.j2", context))
