"""Settings: defaults are the embedded deployment; overrides are validated and named."""

from __future__ import annotations

import pytest

from defiwatch.config import DEFAULT_TIERS, load_settings
from defiwatch.errors import ConfigError


def test_defaults_are_embedded(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.chdir(tmp_path)  # no defiwatch.toml here
    settings = load_settings()
    assert settings.database_url.startswith("sqlite+aiosqlite:///")
    assert settings.redis_dsn is None and not settings.is_postgres
    assert settings.tiers == DEFAULT_TIERS


def test_partial_tier_override_keeps_the_other_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEFIWATCH_TIERS__PRO__API_REQUESTS_PER_MINUTE", "5")
    tiers = load_settings().tiers
    assert tiers["pro"].api_requests_per_minute == 5
    assert tiers["pro"].alert_rules == DEFAULT_TIERS["pro"].alert_rules
    assert tiers["free"] == DEFAULT_TIERS["free"]


def test_short_urls_are_completed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEFIWATCH_DATABASE_URL", "postgresql://u@h/db")
    assert load_settings().database_url == "postgresql+asyncpg://u@h/db"


def test_secrets_are_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEFIWATCH_REDIS_URL", "redis://:hunter2@127.0.0.1:6379/0")
    settings = load_settings()
    assert "hunter2" not in repr(settings)
    assert settings.redis_dsn == "redis://:hunter2@127.0.0.1:6379/0"


@pytest.mark.parametrize(
    ("env", "value", "field"),
    [
        ("DEFIWATCH_TIERS__GOLD__ALERT_RULES", "3", "tiers.gold"),
        ("DEFIWATCH_TIERS__PRO__ALERT_RULES", "-1", "tiers.pro.alert_rules"),
        ("DEFIWATCH_REPLAY_FROM", "yesterday", "replay_from"),
        ("DEFIWATCH_NOT_A_SETTING", "1", None),
    ],
)
def test_bad_values_name_the_setting(monkeypatch: pytest.MonkeyPatch, env: str, value: str,
                                     field: str | None) -> None:
    monkeypatch.setenv(env, value)
    if field is None:  # unknown variables are ignored: other programs share the environment
        load_settings()
        return
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert info.value.field is not None and info.value.field.startswith(field)
    assert info.value.message.startswith(f"invalid setting DEFIWATCH_{field.split('.')[0].upper()}")
