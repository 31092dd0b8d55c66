"""The opt-in GC policy: survivors of full collections are frozen; a thaw lets frozen cyclic
garbage go. Runs the real collector (process-wide state, restored after each test)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from defiwatch.gateway.gcpolicy import FreezeAfterFullCollections


class Node:
    """A reference cycle: freed only by the cyclic collector."""

    def __init__(self) -> None:
        self.me = self


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Iterator[Clock]:
    yield Clock()
    gc.unfreeze()  # whatever a failed test left frozen


def test_frozen_cyclic_garbage_survives_until_a_thaw(clock: Clock) -> None:
    policy = FreezeAfterFullCollections(thaw_every_s=100, monotonic=clock)
    policy.install()
    try:
        node = Node()
        alive = weakref.ref(node)
        gc.collect()  # a full collection: `node` survives it and is frozen
        assert gc.get_freeze_count() > 0 and policy.freezes == 1
        del node
        gc.collect()
        assert alive() is not None  # frozen garbage is not collected...

        clock.now = 100.0
        gc.collect()  # ...until the thaw after this collection
        assert policy.thaws == 1 and gc.get_freeze_count() == 0
        gc.collect()
        assert alive() is None
        assert gc.get_freeze_count() > 0  # frozen again after the whole-heap collection
    finally:
        policy.uninstall()
    assert gc.get_freeze_count() == 0


def test_young_collections_freeze_nothing(clock: Clock) -> None:
    policy = FreezeAfterFullCollections(thaw_every_s=100, monotonic=clock)
    policy.install()
    policy.install()  # idempotent
    try:
        gc.collect(0)
        gc.collect(1)
        assert policy.freezes == 0 and gc.get_freeze_count() == 0
    finally:
        policy.uninstall()
    assert policy._on_gc not in gc.callbacks
