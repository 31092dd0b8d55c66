"""An opt-in garbage-collector policy for a process that holds many connections (the gateway).

Why. Every open connection is ~100 GC-tracked objects (websockets, asyncio, ours), so 10,000
connections are over a million. While their number grows (a connect storm) CPython runs a full
collection each time the long-lived objects grew by 25 %, and each walks the whole heap: pauses
of 0.3-1.2 s on the benchmark VM, which stalled every connect in flight (bench/ws_fanout.py at
500 connects/s: connect p95 255-690 ms with the default collector, 13 ms with it off).

What. After each full collection the survivors are frozen (`gc.freeze`: moved to a generation
no collection walks), so the next full collection walks only what was allocated since: the same
storm gave connect p95 8.7 ms, longest pause 111 ms. The price: cyclic garbage among frozen
objects is not collected. On CPython 3.11 every closed socket leaves 8 such objects (asyncio's
transport holds a bound method of itself), so every `thaw_every_s` the frozen objects are moved
back (`gc.unfreeze`): the next full collection walks the whole heap once, frees what closed
connections left, and freezes again. Memory held by closed connections is thereby bounded by one
thaw interval's churn, at the cost of one whole-heap pause per interval.

Process-wide (the collector is), so the process's entry point installs it, not the gateway.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

__all__ = ["THAW_EVERY_S", "FreezeAfterFullCollections"]

THAW_EVERY_S = 600.0  # seconds between thaws (one whole-heap collection each)


class FreezeAfterFullCollections:
    """Freeze the survivors of every full collection; thaw every `thaw_every_s` (see above).

    Args:
        thaw_every_s: seconds between thaws; the first thaw comes this long after `install`.
        monotonic: the clock, in seconds.
    """

    def __init__(self, *, thaw_every_s: float = THAW_EVERY_S,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.thaw_every_s = thaw_every_s
        self._monotonic = monotonic
        self._thawed_at = 0.0
        self.freezes = 0
        self.thaws = 0

    def install(self) -> None:
        """Start (idempotent)."""
        if self._on_gc not in gc.callbacks:
            self._thawed_at = self._monotonic()
            gc.callbacks.append(self._on_gc)

    def uninstall(self) -> None:
        """Stop and unfreeze everything (also what others froze: CPython has one permanent
        generation)."""
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        gc.unfreeze()

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        # Runs after the collector has finished ("stop"); freeze/unfreeze only move its lists.
        if phase != "stop" or info.get("generation") != 2:
            return
        now = self._monotonic()
        if now - self._thawed_at >= self.thaw_every_s:
            # Not frozen this time: the next full collection walks everything once.
            self._thawed_at = now
            self.thaws += 1
            gc.unfreeze()
            return
        self.freezes += 1
        gc.freeze()
