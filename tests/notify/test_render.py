"""What people read: values with units, changes with signs, UTC times, and the templates."""

from __future__ import annotations

import pytest

from defiwatch.notify.message import EmailTarget, Notification, NotificationKind, RuleRef
from defiwatch.notify.render import (
    Templates,
    describe_change,
    format_pct,
    format_utc,
    format_value,
    metric_label,
    summarize,
)
from notify.factories import NOW, notification, tvl_event

TARGET = EmailTarget("ops@example.org")


@pytest.mark.parametrize(
    ("metric", "value", "text"),
    [
        ("tvl", 4_200_000_000.0, "$4.20B"),
        ("tvl", 1.5e12, "$1.50T"),
        ("tvl", 12_345_678.0, "$12.35M"),
        ("tvl", 950_000.0, "$950.00K"),
        ("tvl", 999.5, "$999.50"),
        ("tvl", -2_000_000.0, "-$2.00M"),
        ("mcap", 3.1e11, "$310.00B"),
        ("price", 2345.678, "$2,345.68"),
        ("price", 1.0, "$1.00"),
        ("price", 0.000123456, "$0.0001235"),
        ("price", 0.0, "$0"),
        ("tvl", None, "n/a"),
        ("tvl", float("nan"), "n/a"),
    ],
)
def test_values_have_units(metric: str, value: float | None, text: str) -> None:
    assert format_value(metric, value) == text


@pytest.mark.parametrize(
    ("pct", "text"),
    [(1.5, "+1.50 %"), (-12.3456, "-12.35 %"), (0.0, "+0.00 %"), (None, "n/a"), (float("inf"), "n/a")],
)
def test_percentages(pct: float | None, text: str) -> None:
    assert format_pct(pct) == text


@pytest.mark.parametrize(
    ("metric", "label"),
    [("tvl", "TVL"), ("chain_tvl", "chain TVL"), ("price", "price"), ("mcap", "market cap"),
     ("tvl_borrowed", "borrowed TVL"), ("other", "other")],
)
def test_metric_labels(metric: str, label: str) -> None:
    assert metric_label(metric) == label


@pytest.mark.parametrize(
    ("changes", "text"),
    [
        ({}, "fell 12.38 % from $4.20B to $3.68B"),
        ({"value": 4.41e9, "change_pct": 5.0}, "rose 5.00 % from $4.20B to $4.41B"),
        ({"change_pct": None}, "fell 12.38 % from $4.20B to $3.68B"),  # computed
        ({"previous": None}, "is $3.68B"),
        ({"value": 4.2e9}, "is unchanged at $4.20B"),
    ],
)
def test_changes(changes: dict[str, object], text: str) -> None:
    assert describe_change(tvl_event(**changes)) == text


def test_times_are_utc() -> None:
    assert format_utc(NOW) == "2025-01-02 03:00:00 UTC"


def test_summary_of_a_fired_alert() -> None:
    s = summarize(notification(TARGET))
    assert s.title == "Alert fired: Uniswap TVL drop"
    assert s.text == ('Rule "Uniswap TVL drop" fired: uniswap TVL on ethereum fell 12.38 % from '
                      "$4.20B to $3.68B (2025-01-02 02:59:59 UTC).")
    assert dict(s.facts) == {"Protocol": "uniswap", "Chain": "ethereum", "Metric": "TVL",
                             "Value": "$4.20B → $3.68B", "Change": "-12.38 %",
                             "Rule": "Uniswap TVL drop", "Severity": "critical",
                             "Time": "2025-01-02 02:59:59 UTC"}
    assert s.color == "#cf222e"


@pytest.mark.parametrize(
    ("changes", "facts"),
    [
        ({"metric": "price", "subject": "coingecko:bitcoin", "chain": "-"},
         {"Token": "bitcoin", "Metric": "price"}),
        ({"metric": "chain_tvl", "subject": "arbitrum", "chain": "arbitrum"},
         {"Chain": "arbitrum", "Metric": "chain TVL"}),
        ({"chain": "-"}, {"Protocol": "uniswap", "Metric": "TVL"}),
    ],
)
def test_subjects_are_named_by_kind(changes: dict[str, object], facts: dict[str, str]) -> None:
    s = summarize(notification(TARGET, event=tvl_event(**changes)))
    assert facts.items() <= dict(s.facts).items()


def test_summaries_of_other_kinds() -> None:
    test = summarize(notification(TARGET, kind=NotificationKind.TEST))
    assert test.title == "Test notification: Uniswap TVL drop" and "channel works" in test.text
    disabled = summarize(Notification(
        id="n", kind=NotificationKind.ENDPOINT_DISABLED, target=TARGET, created_at=NOW,
        detail={"channel": "webhook", "target": "https://user:pw@hooks.example/in?t=1",
                "reason": "HTTP 410 for 24 h"}))
    assert disabled.title == "Webhook channel disabled"
    assert "https://***@hooks.example/…" in disabled.text and "pw" not in disabled.text
    digest = summarize(Notification(
        id="n", kind=NotificationKind.DIGEST, target=TARGET, rule=RuleRef(1, "daily"),
        events=(tvl_event(), tvl_event(subject="aave")), created_at=NOW,
        detail={"since": NOW - 86_400, "until": NOW}))
    assert digest.title == "defiwatch digest: 2 changes"
    assert digest.text == ('2 changes between 2025-01-01 03:00:00 UTC and 2025-01-02 03:00:00 UTC '
                           'for rule "daily".')
    assert len(digest.lines) == 2 and digest.lines[1].startswith("aave TVL on ethereum fell")


@pytest.mark.parametrize("kind", list(NotificationKind))
def test_every_kind_has_its_templates(kind: NotificationKind) -> None:
    n = notification(TARGET, kind=kind, rule=RuleRef(1, "<b>bold</b> & co"))
    email = Templates().email(n)
    assert email.subject.startswith("[defiwatch]") and "\n" not in email.subject
    assert email.text.strip() and email.html.lstrip().startswith("<!doctype html>")
    assert "<b>bold</b>" not in email.html


def test_operator_templates_override_bundled_ones(tmp_path: object) -> None:
    from pathlib import Path

    directory = Path(str(tmp_path))
    (directory / "alert_fired.subject.j2").write_text("ALERT {{ rule.name }}")
    email = Templates(directory).email(notification(TARGET))
    assert email.subject == "ALERT Uniswap TVL drop"
    assert "Uniswap TVL drop" in email.text  # the rest still bundled
