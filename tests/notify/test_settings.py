"""notify_* settings: defaults, parsing, validation naming the variable, and what
build_senders makes of them."""

from __future__ import annotations

from pathlib import Path

import pytest

from defiwatch.config import load_settings
from defiwatch.errors import ConfigError
from defiwatch.notify.factory import UnconfiguredSender, breaker, build_senders, retry_policy
from defiwatch.notify.message import ChannelKind, PushTarget
from defiwatch.notify.senders.base import Outcome, Reason
from defiwatch.notify.senders.webpush import VapidKey, WebPushSender
from notify.factories import notification


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings()
    assert s.notify_webhook_timeout_s == 10.0
    assert s.notify_ssrf_allow == []
    assert s.notify_smtp_mode == "starttls" and s.notify_smtp_port is None
    assert s.notify_retry_max_attempts == 8
    assert retry_policy(s).ceilings()[-1] == s.notify_retry_max_delay_s
    assert breaker(s).policy.failure_threshold == 5


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [("127.0.0.1", ["127.0.0.1"]), ("10.0.0.0/8, hooks.internal", ["10.0.0.0/8", "hooks.internal"]),
     ('["::1", "*.corp.example"]', ["::1", "*.corp.example"]), ("", [])],
)
def test_allow_list_from_the_environment(monkeypatch: pytest.MonkeyPatch, raw: str,
                                         parsed: list[str]) -> None:
    monkeypatch.setenv("DEFIWATCH_NOTIFY_SSRF_ALLOW", raw)
    assert load_settings().notify_ssrf_allow == parsed


def test_password_is_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEFIWATCH_NOTIFY_SMTP_PASSWORD", "hunter2")
    monkeypatch.setenv("DEFIWATCH_NOTIFY_VAPID_PRIVATE_KEY", "not-shown")
    s = load_settings()
    assert "hunter2" not in repr(s) and "not-shown" not in repr(s)
    assert s.notify_smtp_password is not None and s.notify_smtp_password.get_secret_value() == "hunter2"


@pytest.mark.parametrize(
    ("env", "value", "variable"),
    [
        ("NOTIFY_SSRF_ALLOW", "http://bad", "DEFIWATCH_NOTIFY_SSRF_ALLOW"),
        ("NOTIFY_SMTP_MODE", "ssl", "DEFIWATCH_NOTIFY_SMTP_MODE"),
        ("NOTIFY_SMTP_FROM", "defiwatch", "DEFIWATCH_NOTIFY_SMTP_FROM"),
        ("NOTIFY_VAPID_SUBJECT", "admin@example.com", "DEFIWATCH_NOTIFY_VAPID_SUBJECT"),
        ("NOTIFY_RETRY_MAX_DELAY_S", "5", "DEFIWATCH_NOTIFY_RETRY_MAX_DELAY_S"),
        ("NOTIFY_BREAKER_MAX_OPEN_S", "1", "DEFIWATCH_NOTIFY_BREAKER_MAX_OPEN_S"),
        ("NOTIFY_WEBHOOK_TIMEOUT_S", "0", "DEFIWATCH_NOTIFY_WEBHOOK_TIMEOUT_S"),
    ],
)
def test_invalid_values_name_the_variable(monkeypatch: pytest.MonkeyPatch, env: str, value: str,
                                          variable: str) -> None:
    monkeypatch.setenv(f"DEFIWATCH_{env}", value)
    with pytest.raises(ConfigError, match=variable):
        load_settings()


async def test_without_a_vapid_key_push_is_not_configured(tmp_path: Path) -> None:
    senders = build_senders(load_settings(state_dir=tmp_path))
    try:
        assert set(senders.by_channel) == set(ChannelKind)
        assert isinstance(senders.by_channel[ChannelKind.PUSH].inner, UnconfiguredSender)
        result = await senders.send(notification(PushTarget("https://push.example/x", "k", "a")))
        assert (result.outcome, result.reason) == (Outcome.FAILED_FINAL, Reason.NOT_CONFIGURED)
        assert result.error is not None and "DEFIWATCH_NOTIFY_VAPID_PRIVATE_KEY" in result.error
    finally:
        await senders.aclose()


async def test_a_vapid_key_file_configures_push(tmp_path: Path) -> None:
    key = VapidKey.generate()
    (tmp_path / "vapid.pem").write_bytes(key.private_pem())
    senders = build_senders(load_settings(notify_vapid_private_key_file=tmp_path / "vapid.pem"))
    try:
        push = senders.by_channel[ChannelKind.PUSH].inner
        assert isinstance(push, WebPushSender)
        assert push.vapid.application_server_key == key.application_server_key
    finally:
        await senders.aclose()


def test_a_broken_vapid_key_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="VAPID"):
        build_senders(load_settings(notify_vapid_private_key="garbage"))
