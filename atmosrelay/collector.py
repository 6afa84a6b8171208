"""The cyclic garbage collector, kept from stalling the event loop.

CPython collects reference cycles in three generations. A full (oldest-generation)
collection walks every tracked object the process holds, on the thread that triggered it:
the event loop. The relay holds every queued message in memory (queue/state.py), so that
walk grows with the queue. Measured on the 2-core development VM, 50 sessions submitting
1 KiB messages with delivery off: three full collections in five seconds, 7, 15 and 21 ms
each, every one finding **nothing** to free, and each one a stall of every session at once,
which is what the end-of-data-to-250 p99 was made of. With 100,000 messages queued a full
collection takes well over 100 ms.

What the relay holds for long (the queue, the caches, the modules) is not garbage, and
what it makes and drops (sessions, attempts, exceptions and their tracebacks) is young. So:

* every FREEZE_EVERY seconds, the young generations are collected (cheap: only what was made
  since the last pass) and everything that survives is *frozen* (``gc.freeze()``): moved to
  the permanent generation, which collections do not walk. Frozen objects are still freed
  the moment their reference count drops (nearly everything, a delivered message included);
  only a frozen object that later becomes part of an unreachable *cycle* waits;
* every SWEEP_EVERY seconds, everything is unfrozen and one full collection runs: what such
  cycles held is freed then, so the cost of freezing is bounded to one interval's cycles.
  That one pause is the same full collection CPython would otherwise have run every few
  seconds under load.

The start's replay freezes what it folded already (queue/store.py).

**Freed memory goes back.** The replay and a compaction make and drop tens of megabytes of
record bytes (larger than CPython's small-object allocator takes, so C ``malloc``'s), and
glibc keeps what is freed in its heaps, the worker threads' heaps included, for the next
``malloc``. ``give_back()`` (glibc's ``malloc_trim``) returns those free pages to the
system after each: measured with 100,000 queued, 20-25 MB less resident after a compaction.
Elsewhere (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import sys
import time
from collections.abc import Callable
from typing import Final

import trio

log = logging.getLogger("atmosrelay.collector")

FREEZE_EVERY: Final = 0.5
SWEEP_EVERY: Final = 3600.0


def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc
        return None
    return trim


_TRIM: Final = _malloc_trim()


def give_back() -> bool:
    """Return the C heap's free pages to the system; whether this platform can."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True


def freeze_survivors() -> None:
    """Collect the young generations, then take what survived out of later collections."""
    gc.collect(1)
    gc.freeze()


def sweep() -> int:
    """Unfreeze everything and run one full collection; returns what it found unreachable."""
    gc.unfreeze()
    return gc.collect()


async def keep_collector(
    *,
    freeze_every: float = FREEZE_EVERY,
    sweep_every: float = SWEEP_EVERY,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Freeze survivors every ``freeze_every`` seconds and sweep every ``sweep_every``,
    until cancelled (trio's clock)."""
    task_status.started()
    swept = trio.current_time()
    try:
        while True:
            await trio.sleep(freeze_every)
            if trio.current_time() - swept >= sweep_every:
                began = time.perf_counter()
                found = sweep()
                swept = trio.current_time()
                log.debug(
                    "full collection: %d unreachable object(s) in %.1f ms",
                    found,
                    (time.perf_counter() - began) * 1000,
                )
            freeze_survivors()
    finally:
        gc.unfreeze()  # a relay run inside another program leaves its collector as it was
