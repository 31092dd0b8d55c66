"""The shared HTTP side: every httpx exception is mapped, and real answers from a server on
loopback come out as the classification table says."""

from __future__ import annotations

import asyncio
import inspect
import socket
import threading

import httpx
import pytest

from defiwatch.notify.senders.base import Outcome, Reason
from defiwatch.notify.senders.http import (
    MAX_ANSWER_BYTES,
    TRANSPORT_ERRORS,
    classify_transport_error,
    create_http_client,
    post,
)
from defiwatch.notify.ssrf import AddressGuard, BlockedDestination, Verdict
from notify.receiver import HANG, Receiver, Reply, Seen

HTTPX_ERRORS = sorted(
    (obj for _, obj in inspect.getmembers(httpx, inspect.isclass)
     if issubclass(obj, Exception) and obj.__module__.startswith("httpx")),
    key=lambda cls: cls.__name__,
)


def test_httpx_exposes_the_exceptions_we_expect() -> None:
    assert {"ConnectTimeout", "RemoteProtocolError", "InvalidURL", "StreamError"} <= {
        cls.__name__ for cls in HTTPX_ERRORS}


@pytest.mark.parametrize("cls", HTTPX_ERRORS, ids=lambda cls: cls.__name__)
def test_every_httpx_exception_is_mapped(cls: type[Exception]) -> None:
    assert cls in TRANSPORT_ERRORS, f"map httpx.{cls.__name__} in senders/http.py"


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (httpx.ConnectTimeout("t"), (Outcome.RETRY, Reason.TIMEOUT)),
        (httpx.ReadTimeout("t"), (Outcome.RETRY, Reason.TIMEOUT)),
        (httpx.ConnectError("refused"), (Outcome.RETRY, Reason.NETWORK)),
        (httpx.RemoteProtocolError("closed"), (Outcome.RETRY, Reason.PROTOCOL)),
        (httpx.LocalProtocolError("bad header"), (Outcome.FAILED_FINAL, Reason.INVALID_TARGET)),
        (httpx.UnsupportedProtocol("ftp"), (Outcome.FAILED_FINAL, Reason.INVALID_TARGET)),
        (httpx.InvalidURL("bad"), (Outcome.FAILED_FINAL, Reason.INVALID_TARGET)),
        (BlockedDestination("h", "127.0.0.1", Verdict.LOOPBACK), (Outcome.FAILED_FINAL, Reason.BLOCKED)),
        (TimeoutError(), (Outcome.RETRY, Reason.TIMEOUT)),
        (ConnectionResetError(), (Outcome.RETRY, Reason.NETWORK)),
        (socket.gaierror(), (Outcome.RETRY, Reason.NETWORK)),
        (KeyError("bug"), (Outcome.FAILED_FINAL, Reason.INTERNAL)),
    ],
)
def test_transport_error_classification(exc: BaseException, expected: tuple[Outcome, Reason]) -> None:
    assert classify_transport_error(exc) == expected


@pytest.mark.parametrize(
    ("reply", "outcome", "reason", "retry_after"),
    [
        (Reply(200), Outcome.DELIVERED, Reason.ACCEPTED, None),
        (Reply(204, b""), Outcome.DELIVERED, Reason.ACCEPTED, None),
        (Reply(400, b"bad payload"), Outcome.FAILED_FINAL, Reason.HTTP_STATUS, None),
        (Reply(404), Outcome.FAILED_FINAL, Reason.HTTP_STATUS, None),
        (Reply(408), Outcome.RETRY, Reason.HTTP_STATUS, None),
        (Reply(429, headers={"Retry-After": "17"}), Outcome.RETRY, Reason.HTTP_STATUS, 17.0),
        (Reply(503, headers={"Retry-After": "Thu, 02 Jan 2025 03:01:00 GMT"}), Outcome.RETRY,
         Reason.HTTP_STATUS, 60.0),
        (Reply(500), Outcome.RETRY, Reason.HTTP_STATUS, None),
        (Reply(302, headers={"Location": "http://127.0.0.1:1/elsewhere"}), Outcome.FAILED_FINAL,
         Reason.REDIRECT, None),
    ],
)
async def test_answers_are_classified(receiver: Receiver, client: httpx.AsyncClient, reply: Reply,
                                      outcome: Outcome, reason: Reason,
                                      retry_after: float | None) -> None:
    receiver.script(reply)
    result = await post(client, receiver.url(), content=b"{}", headers={}, timeout_s=5.0,
                        clock=lambda: 1_735_786_800.0)
    assert (result.outcome, result.reason, result.retry_after_s) == (outcome, reason, retry_after)
    assert result.status_code == reply.status
    assert len(receiver.requests) == 1  # no redirect followed, no retry inside
    if outcome is Outcome.DELIVERED:
        assert result.error is None
    else:
        assert result.error is not None and result.error.startswith(f"HTTP {reply.status}")


async def test_a_silent_receiver_times_out(receiver: Receiver, client: httpx.AsyncClient,
                                           timeout_factor: float) -> None:
    receiver.script(HANG)
    result = await post(client, receiver.url(), content=b"{}", headers={},
                        timeout_s=0.2 * timeout_factor)
    assert (result.outcome, result.reason) == (Outcome.RETRY, Reason.TIMEOUT)


async def test_a_closed_port_is_a_network_error(client: httpx.AsyncClient) -> None:
    with socket.socket() as sock:  # bind, never listen: connections are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        result = await post(client, f"http://127.0.0.1:{port}/", content=b"{}", headers={},
                            timeout_s=5.0)
    assert (result.outcome, result.reason) == (Outcome.RETRY, Reason.NETWORK)


async def test_errors_do_not_carry_the_url_secrets(client: httpx.AsyncClient) -> None:
    result = await post(client, "gopher://user:hunter2@127.0.0.1/x?token=abc", content=b"{}",
                        headers={}, timeout_s=5.0)
    assert (result.outcome, result.reason) == (Outcome.FAILED_FINAL, Reason.INVALID_TARGET)
    assert result.error is not None
    assert "hunter2" not in result.error and "token=abc" not in result.error


async def test_long_answers_are_cut(receiver: Receiver, client: httpx.AsyncClient) -> None:
    receiver.script(Reply(500, b"x" * (MAX_ANSWER_BYTES * 4)))
    result = await post(client, receiver.url(), content=b"{}", headers={}, timeout_s=5.0)
    assert result.outcome is Outcome.RETRY
    assert result.error is not None and len(result.error) < 300


async def test_connections_are_kept_alive(receiver: Receiver, client: httpx.AsyncClient) -> None:
    for _ in range(3):
        result = await post(client, receiver.url(), content=b"{}", headers={}, timeout_s=5.0)
        assert result.delivered
    assert len({r.client_port for r in receiver.requests}) == 1


async def test_a_hanging_host_does_not_hold_the_connections_of_another(
        guard: AddressGuard) -> None:
    client = create_http_client(guard, timeout_s=5.0, per_host=1)
    arrived = threading.Event()

    def hang(_seen: Seen) -> Reply:
        arrived.set()
        return HANG

    with Receiver(hang) as stuck, Receiver() as healthy:
        try:
            hanging = asyncio.create_task(post(client, stuck.url(), content=b"{}", headers={},
                                               timeout_s=5.0))
            # The stuck host holds its only connection from now on.
            assert await asyncio.to_thread(arrived.wait, 5.0)
            result = await post(client, healthy.url(), content=b"{}", headers={}, timeout_s=5.0)
            # One pool for both would make this wait for the stuck request's connection, and
            # time out: its own pool answers at once.
            assert result.outcome is Outcome.DELIVERED
            hanging.cancel()
        finally:
            await client.aclose()
