"""Fixtures of the notify tests: a real HTTP receiver on loopback and the guarded client that
the senders share, with 127.0.0.1 on the SSRF allow-list (nothing else is allowed)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from defiwatch.notify.senders.http import HttpClient, create_http_client
from defiwatch.notify.ssrf import AddressGuard, AllowList
from notify.receiver import Receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as server:
        yield server


@pytest.fixture
def guard() -> AddressGuard:
    return AddressGuard(AllowList.parse(["127.0.0.1"]))


@pytest.fixture
async def client(guard: AddressGuard, timeout_factor: float) -> AsyncIterator[HttpClient]:
    http = create_http_client(guard, timeout_s=5.0 * timeout_factor)
    yield http
    await http.aclose()
