"""Fixtures of the gateway tests (helpers live in rig.py)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from defiwatch.config import Settings
from gateway.rig import Rig, embedded_settings, open_rig


@pytest.fixture
def both(settings: Settings) -> Settings:
    """The `settings` fixture (embedded and production) with the gateway on an ephemeral port."""
    return settings.model_copy(update={"gateway_host": "127.0.0.1", "gateway_port": 0})


@pytest.fixture
async def rig(tmp_path: os.PathLike[str]) -> AsyncIterator[Rig]:
    """An embedded rig with default settings and one gateway."""
    async with open_rig(embedded_settings(tmp_path)) as r:
        yield r
