"""collector.py: survivors are frozen out of collections, and the sweep (hourly in the
relay, every 10 s here) frees the cycles that froze. On trio's virtual clock: the intervals
are exact, nothing sleeps. And ``give_back`` returns freed C-heap pages to the system."""

from __future__ import annotations

import gc
import os
import sys
import weakref
from collections.abc import Iterator
from functools import partial

import pytest
import trio
import trio.testing

from atmosrelay.collector import give_back, keep_collector


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> Node:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return a


@pytest.fixture(autouse=True)
def restore_collector() -> Iterator[None]:
    yield
    gc.unfreeze()  # the test process's objects go back where they were
    gc.collect()


async def test_survivors_freeze_and_the_sweep_frees_frozen_cycles(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gc.unfreeze()
    gc.collect()
    assert gc.get_freeze_count() == 0
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(keep_collector, sweep_every=10.0))  # freeze every 0.5 s
        await trio.sleep(0.6)  # one pass: everything alive is frozen, nothing scanned
        frozen = gc.get_freeze_count()
        assert frozen > 0
        node = cycle()  # made after the pass, alive across the next one: frozen with it
        held = weakref.ref(node)
        await trio.sleep(0.5)
        assert gc.get_freeze_count() > frozen
        del node  # now an unreachable cycle, but a frozen one
        gc.collect()  # even a full collection leaves a frozen cycle alone
        assert held() is not None
        await trio.sleep(10.0)  # the sweep: everything unfrozen, one full collection
        assert held() is None
        assert gc.get_freeze_count() > 0  # and what lives is frozen again afterwards
        nursery.cancel_scope.cancel()


async def test_young_cycles_die_before_they_can_freeze_and_a_stop_unfreezes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(keep_collector)
        gone = weakref.ref(cycle())  # unreachable at once: the pass's young collection frees it
        await trio.sleep(0.6)
        assert gone() is None
        assert gc.get_freeze_count() > 0
        nursery.cancel_scope.cancel()
    assert gc.get_freeze_count() == 0  # stopped: the collector is left as it was found


def resident() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_heap_pages_go_back_to_the_system() -> None:
    give_back()  # what earlier tests freed is not resident to be reused
    before = resident()
    records = [bytes(2048) for _ in range(40_000)]  # 80 MB of C-heap blocks, as a replay reads
    pinned = bytes(2048)  # above them: the heap's top cannot shrink by itself
    held = resident()
    del records
    freed = resident()
    assert give_back() is True
    after = resident()
    assert held - before > 75_000_000
    assert freed - before > 75_000_000  # free, but still resident: what the relay saw
    assert after - before < 20_000_000, (before, held, freed, after)
    del pinned
