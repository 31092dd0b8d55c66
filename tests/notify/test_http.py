"""The shared HTTP side: every aiohttp exception is mapped, and real answers from a server on
loopback come out as the classification table says."""

from __future__ import annotations

import asyncio
import socket
import threading

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey

from defiwatch.notify.senders.base import Outcome, Reason
from defiwatch.notify.senders.http import (
    MAX_ANSWER_BYTES,
    TRANSPORT_ERRORS,
    HttpClient,
    classify_transport_error,
    create_http_client,
    post,
)
from defiwatch.notify.ssrf import AddressGuard, BlockedDestination, Verdict
from notify.receiver import HANG, Receiver, Reply, Seen


def _subclasses(cls: type[Exception]) -> set[type[Exception]]:
    found = {cls}
    for sub in cls.__subclasses__():
        found |= _subclasses(sub)
    return found


AIOHTTP_ERRORS = sorted((cls for cls in _subclasses(aiohttp.ClientError)
                         if cls.__module__.startswith("aiohttp")),
                        key=lambda cls: cls.__name__)
KEY = ConnectionKey("hooks.example", 443, True, True, None, None, None)


def test_aiohttp_exposes_the_exceptions_we_expect() -> None:
    assert {"ClientConnectorError", "ServerDisconnectedError", "InvalidURL",
            "ClientPayloadError", "ConnectionTimeoutError"} <= {
        cls.__name__ for cls in AIOHTTP_ERRORS}


@pytest.mark.parametrize("cls", AIOHTTP_ERRORS, ids=lambda cls: cls.__name__)
def test_every_aiohttp_exception_is_mapped(cls: type[Exception]) -> None:
    assert cls in TRANSPORT_ERRORS, f"map aiohttp.{cls.__name__} in senders/http.py"


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (aiohttp.ConnectionTimeoutError("t"), (Outcome.RETRY, Reason.TIMEOUT)),
        (aiohttp.SocketTimeoutError("t"), (Outcome.RETRY, Reason.TIMEOUT)),
        (aiohttp.ClientConnectorError(KEY, ConnectionRefusedError(111, "refused")),
         (Outcome.RETRY, Reason.NETWORK)),
        (aiohttp.ClientConnectorDNSError(KEY, socket.gaierror(-2, "unknown")),
         (Outcome.RETRY, Reason.NETWORK)),
        (aiohttp.ServerDisconnectedError(), (Outcome.RETRY, Reason.PROTOCOL)),
        (aiohttp.ClientPayloadError("truncated"), (Outcome.RETRY, Reason.PROTOCOL)),
        (aiohttp.NonHttpUrlClientError("ftp://x"), (Outcome.FAILED_FINAL, Reason.INVALID_TARGET)),
        (aiohttp.InvalidUrlClientError("http://"), (Outcome.FAILED_FINAL, Reason.INVALID_TARGET)),
        (aiohttp.ContentTypeError(None, ()), (Outcome.FAILED_FINAL, Reason.INTERNAL)),  # type: ignore[arg-type]
        (BlockedDestination("h", "127.0.0.1", Verdict.LOOPBACK), (Outcome.FAILED_FINAL, Reason.BLOCKED)),
        (TimeoutError(), (Outcome.RETRY, Reason.TIMEOUT)),
        (ConnectionResetError(), (Outcome.RETRY, Reason.NETWORK)),
        (socket.gaierror(), (Outcome.RETRY, Reason.NETWORK)),
        (KeyError("bug"), (Outcome.FAILED_FINAL, Reason.INTERNAL)),
    ],
)
def test_transport_error_classification(exc: BaseException, expected: tuple[Outcome, Reason]) -> None:
    assert classify_transport_error(exc) == expected


def test_a_refusal_wrapped_by_aiohttp_is_still_a_refusal() -> None:
    try:
        try:
            raise BlockedDestination("h", "10.0.0.1", Verdict.PRIVATE)
        except BlockedDestination as inner:
            raise aiohttp.ClientConnectorError(KEY, OSError("wrapped")) from inner
    except aiohttp.ClientConnectorError as exc:
        assert classify_transport_error(exc) == (Outcome.FAILED_FINAL, Reason.BLOCKED)


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
async def test_answers_are_classified(receiver: Receiver, client: HttpClient, reply: Reply,
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


async def test_a_silent_receiver_times_out(receiver: Receiver, client: HttpClient,
                                           timeout_factor: float) -> None:
    receiver.script(HANG)
    result = await post(client, receiver.url(), content=b"{}", headers={},
                        timeout_s=0.2 * timeout_factor)
    assert (result.outcome, result.reason) == (Outcome.RETRY, Reason.TIMEOUT)


async def test_a_closed_port_is_a_network_error(client: HttpClient) -> None:
    with socket.socket() as sock:  # bind, never listen: connections are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        result = await post(client, f"http://127.0.0.1:{port}/", content=b"{}", headers={},
                            timeout_s=5.0)
    assert (result.outcome, result.reason) == (Outcome.RETRY, Reason.NETWORK)


async def test_errors_do_not_carry_the_url_secrets(client: HttpClient) -> None:
    result = await post(client, "gopher://user:hunter2@127.0.0.1/x?token=abc", content=b"{}",
                        headers={}, timeout_s=5.0)
    assert (result.outcome, result.reason) == (Outcome.FAILED_FINAL, Reason.INVALID_TARGET)
    assert result.error is not None
    assert "hunter2" not in result.error and "token=abc" not in result.error


async def test_long_answers_are_cut(receiver: Receiver, client: HttpClient) -> None:
    receiver.script(Reply(500, b"x" * (MAX_ANSWER_BYTES * 4)))
    result = await post(client, receiver.url(), content=b"{}", headers={}, timeout_s=5.0)
    assert result.outcome is Outcome.RETRY
    assert result.error is not None and len(result.error) < 300


async def test_connections_are_kept_alive(receiver: Receiver, client: HttpClient) -> None:
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
