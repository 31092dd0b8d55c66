"""Loopback helpers shared by tests that start servers or child processes."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import httpx


def free_port() -> int:
    """A port nothing listens on now (the OS picks it; a race with other binders is unlikely)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def readiness_until(url: str, wanted: Callable[[int, Any], bool]) -> dict[str, Any]:
    """Poll a readiness URL until `wanted(status, body)` holds, and return that body; the
    caller bounds the wait. Polling: a port being bound raises no event to await."""
    async with httpx.AsyncClient(timeout=2) as client:
        while True:
            try:
                response = await client.get(url)
            except httpx.TransportError:
                response = None  # not listening yet
            if response is not None and wanted(response.status_code, response.json()):
                return dict(response.json())
            await asyncio.sleep(0.05)


async def wait_until_ready(url: str) -> None:
    await readiness_until(url, lambda status, _: status == 200)
