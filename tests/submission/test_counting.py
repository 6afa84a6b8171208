"""The policy's counters (submission/counting.py): at a start, what the store holds plus
what the journal holds past the last flush (recipients accepted, sends and bounces); while
running, what the other relay processes sharing the store added, read back at each flush,
and nothing counted twice."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import trio
import trio.testing
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule
from msgspec.structs import replace

from atmosrelay.accounts.store import AsyncStore, Store
from atmosrelay.policy.counters import STORE_KEEP
from atmosrelay.policy.engine import Policy
from atmosrelay.policy.limits import recipients_key
from atmosrelay.policy.rules import bounced_key, sent_key
from atmosrelay.queue.records import Delivery, Outcome, Recipient
from atmosrelay.queue.state import QueueState
from atmosrelay.submission.counting import PRUNE_EVERY, CounterSync
from journal import Position
from tests.queue.factories import ALICE_DID, accepted_record

NOW = 1_800_003_600.0
MARK = 1_800_000_000.0  # the last flush: what is older is in the store already
OTHER = "did:plc:zyxwvutsrqponmlkjihgfedc"
HOUR = 3600.0


def _state() -> QueueState:
    state = QueueState()
    records = [
        # past the mark: counted, one recipient each
        accepted_record("a@example.net", accepted_at=MARK + 10),
        accepted_record("b@example.net", accepted_at=MARK + 20),
        # three recipients, one unsubscribed from this bulk mail: two count
        accepted_record(
            "c@example.net",
            Recipient("gone@example.net", suppressed=True),
            "d@example.net",
            accepted_at=MARK + 30,
        ),
        # a lone unsubscribed recipient: the message counts nothing
        accepted_record(Recipient("gone@example.net", suppressed=True), accepted_at=MARK + 40),
        # before the mark: the store has it
        accepted_record("old@example.net", accepted_at=MARK - 10),
        # a DSN (empty sender) and a forward from the operator's domain: nobody's
        replace(accepted_record("x@example.net", sender="", accepted_at=MARK + 50), did=OTHER),
        replace(
            accepted_record("y@example.net", sender="fwd@Operator.example", accepted_at=MARK + 60),
            did=OTHER,
        ),
    ]
    for i, record in enumerate(records):
        state.add_accepted(record, Position(1, 100 * (i + 1)), 10)
    # the old message was sent before the mark and bounced after it; the first one sent after
    old, first = records[4], records[0]
    state.add_delivery(
        Delivery(old.id, MARK - 5, None, (Outcome("old@example.net", "deferred", "4.0.0"),))
    )
    state.add_delivery(
        Delivery(old.id, MARK + 100, None, (Outcome("old@example.net", "bounced", "5.1.1"),))
    )
    state.add_delivery(
        Delivery(first.id, MARK + 110, None, (Outcome("a@example.net", "sent", "2.0.0"),))
    )
    return state


def test_a_start_counts_the_journal_past_the_last_flush_and_nothing_twice(
    tmp_path: Path,
) -> None:
    store = Store(str(tmp_path / "accounts.db"))
    store.exchange_counts({(recipients_key(ALICE_DID), MARK - 60): 7}, 0, journal="j", until=MARK)
    policy = Policy()
    sync = CounterSync(AsyncStore(store), policy, "j")
    rows, replayed, _ = sync.load(_state(), NOW, "operator.example")
    counters = policy.counters
    # 7 from the store, and 1 + 1 + 2 + 0 recipients accepted past the mark
    assert counters.total(recipients_key(ALICE_DID), NOW, 2 * HOUR) == 7 + 4
    assert (rows, replayed) == (1, 4)
    assert counters.total(sent_key("example.org"), NOW, 2 * HOUR) == 1
    assert counters.total(bounced_key("example.org"), NOW, 2 * HOUR) == 1
    assert counters.total(recipients_key(OTHER), NOW, 2 * HOUR) == 0
    assert counters.total(sent_key("operator.example"), NOW, 2 * HOUR) == 0
    # what the journal added is flushed again; what the store gave is not
    assert sum(counters.take_unflushed().values()) == 4 + 1 + 1
    store.close()


# -- several processes sharing one store ------------------------------------------------------
# Each "process" below is a Policy with its own connection to the one database file, as
# separate relay processes have: nothing in memory is shared.

KEY = recipients_key(ALICE_DID)


def _process(path: Path, journal: str) -> CounterSync:
    return CounterSync(AsyncStore(Store(path)), Policy(), journal)


def _total(sync: CounterSync, key: str = KEY) -> int:
    return sync.policy.counters.total(key, NOW, 2 * HOUR)


async def test_each_process_sees_what_the_others_added_and_its_own_once(tmp_path: Path) -> None:
    a, b = (_process(tmp_path / "accounts.db", j) for j in ("ja", "jb"))
    told: list[str] = []
    a.on_shared, b.on_shared = (lambda: told.append("a")), (lambda: told.append("b"))
    a.policy.counters.add(KEY, NOW - 30, 3)
    await a.flush(NOW)
    assert (_total(a), _total(b)) == (3, 0)  # b has not looked yet
    assert told == []  # a's own rows are not another's
    b.policy.counters.add(KEY, NOW - 30, 2)  # the same bucket
    b.policy.counters.add(KEY, NOW - 90, 1)  # and an older one
    await b.flush(NOW)
    assert (_total(a), _total(b)) == (3, 6)
    await a.flush(NOW)  # nothing of its own to write: it reads
    assert (_total(a), _total(b)) == (6, 6)
    await a.flush(NOW)
    await b.flush(NOW)  # nothing new anywhere: nothing changes, nothing is counted again
    assert (_total(a), _total(b)) == (6, 6)
    assert told == ["b", "a"]  # each said so once, the first time it counted the other
    # what was read back is never written back: the store holds each send once
    assert sum(n for k, _, n in a.store.sync.counts_since(0) if k == KEY) == 6


async def test_with_session_processes_the_mark_waits_for_the_slowest_of_them(
    tmp_path: Path,
) -> None:
    """Session processes (server/workers.py) count what they accept and mark nothing; the
    owner marks its journal counted only up to where every one of them has flushed, even
    with nothing of its own to add, so a restart recounts what they may not have written,
    and nothing they had not."""
    owner = _process(tmp_path / "accounts.db", "j")
    one, two = (_process(tmp_path / "accounts.db", "") for _ in range(2))
    one.relay = two.relay = "j"  # its own: not another relay sharing the store
    told: list[str] = []
    owner.on_shared = lambda: told.append("owner")
    flushed = {"one": NOW - 50.0, "two": NOW - 50.0}
    owner.counted_until = lambda: min(flushed.values())
    one.policy.counters.add(KEY, NOW - 40, 2)  # accepted after the owner's last mark
    await one.flush(NOW - 20)
    flushed["one"] = one.flushed
    assert one.flushed == NOW - 20
    assert owner.store.sync.flushed_until("j") == 0.0  # a session process marks nothing
    await owner.flush(NOW)  # nothing of its own: the mark moves to the slowest one's flush
    assert owner.store.sync.flushed_until("j") == NOW - 50
    await two.flush(NOW - 10)
    flushed["two"] = two.flushed
    await owner.flush(NOW)
    assert owner.store.sync.flushed_until("j") == NOW - 20
    flushed["one"] = flushed["two"] = NOW + 5
    await owner.flush(NOW)  # never past the owner's own flush
    assert owner.store.sync.flushed_until("j") == NOW
    assert _total(owner) == 2  # and the counts came back to it as another's ...
    assert told == []  # ... but not another relay's
    for sync in (owner, one, two):
        sync.store.sync.close()


async def test_a_process_started_later_loads_the_totals_and_then_only_what_is_new(
    tmp_path: Path,
) -> None:
    a = _process(tmp_path / "accounts.db", "ja")
    a.policy.counters.add(KEY, NOW - 30, 4)
    await a.flush(NOW)
    b = _process(tmp_path / "accounts.db", "jb")
    assert b.load(QueueState(), NOW)[0] == 1
    assert _total(b) == 4
    await b.flush(NOW)  # the row it loaded is not news
    assert _total(b) == 4
    a.policy.counters.add(KEY, NOW - 30, 1)
    await a.flush(NOW)
    await b.flush(NOW)
    assert _total(b) == 5


async def test_a_failed_write_reads_nothing_and_keeps_its_deltas(tmp_path: Path) -> None:
    a, b = (_process(tmp_path / "accounts.db", j) for j in ("ja", "jb"))
    b.policy.counters.add(KEY, NOW - 30, 2)
    await b.flush(NOW)
    a.policy.counters.add(KEY, NOW - 30, 1)
    a.store.sync.close()  # every statement now fails, as a vanished disk would make it
    await a.flush(NOW)
    assert _total(a) == 1  # its own count stands; b's was not read
    assert a.policy.counters.take_unflushed() == {(KEY, NOW - 30 - (NOW - 30) % 60): 1}


async def test_a_flush_cancelled_while_waiting_for_the_store_keeps_its_deltas(
    tmp_path: Path,
) -> None:
    a = _process(tmp_path / "accounts.db", "ja")
    a.policy.counters.add(KEY, NOW - 30, 2)
    busy = threading.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.store.run, busy.wait)  # the store's one thread, taken
        await trio.testing.wait_all_tasks_blocked()
        scope = trio.CancelScope()
        try:
            nursery.start_soon(_flush_in, scope, a)
            await trio.testing.wait_all_tasks_blocked()  # it took the deltas, and waits
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
        finally:
            busy.set()  # whatever happened, the store's thread ends
    assert a.store.sync.counts_since(0) == []
    assert a.policy.counters.take_unflushed() == {(KEY, NOW - 60): 2}


async def _flush_in(scope: trio.CancelScope, sync: CounterSync) -> None:
    with scope:
        await sync.flush(NOW)


class Ops(RuleBasedStateMachine):
    """Three processes count into shared buckets and flush in any order; whenever every
    process has flushed twice since the last count anywhere, each one's totals are the sum
    of every process's counts, and the store holds each count once."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        path = Path(self.tmp.name) / "accounts.db"
        self.procs = [_process(path, f"j{i}") for i in range(3)]
        self.added: dict[str, int] = {}

    @rule(
        proc=st.integers(0, 2),
        key=st.sampled_from([KEY, sent_key("example.org")]),
        ago=st.sampled_from([10.0, 70.0, 3000.0]),
        n=st.integers(-2, 5),
    )
    def count(self, proc: int, key: str, ago: float, n: int) -> None:
        self.procs[proc].policy.counters.add(key, NOW - ago, n)
        self.added[key] = self.added.get(key, 0) + n

    @rule(proc=st.integers(0, 2))
    def flush(self, proc: int) -> None:
        trio.run(self.procs[proc].flush, NOW)

    @rule()
    def everyone_flushes_twice(self) -> None:
        for _ in range(2):
            for p in self.procs:
                trio.run(p.flush, NOW)
        for key, n in self.added.items():
            assert [_total(p, key) for p in self.procs] == [n] * 3
            stored = self.procs[0].store.sync.counts_since(0)
            assert sum(m for k, _, m in stored if k == key) == n

    def teardown(self) -> None:
        for p in self.procs:
            p.store.sync.close()
        self.tmp.cleanup()


TestOps = Ops.TestCase
TestOps.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)


async def test_an_hour_on_the_store_drops_the_rows_no_reader_reads(tmp_path: Path) -> None:
    a = _process(tmp_path / "accounts.db", "ja")
    old, recent = NOW - STORE_KEEP - 120, NOW - 600
    a.store.sync.exchange_counts({(KEY, old): 2, (KEY, recent): 3}, 0, journal="", until=0.0)
    a.load(QueueState(), NOW)
    await a.flush(NOW)  # within the hour of the start: nothing pruned
    assert len(a.store.sync.counts_since(0)) == 2
    await a.flush(NOW + PRUNE_EVERY + 1)
    assert a.store.sync.counts_since(0) == [(KEY, recent, 3)]
