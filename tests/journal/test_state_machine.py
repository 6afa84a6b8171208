"""A Hypothesis state machine drives the journal core against a model.

The model is the exact list of records replay must return: every acknowledged append (they
are fsynced before write_batch returns), minus those a compaction dropped because the test
named them dead. Crashes (with unsynced sectors kept or garbage) must not change it.

The frame index (journal/_index.py) is checked on the way: at every reopen, the open that
may use it must find exactly what an open of the same files without it finds, field by
field; after a clean close it must be used for every segment; and at every step, the
journal's own index of its segments (from which the frame index is written) must be what
a scan of the files finds.
"""

from __future__ import annotations

import attrs
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from journal import Log, Position, RecoveryReport
from journal._index import INDEX_NAME
from journal._segment import SegmentScan, scan_segment
from journal.testing import CrashableMemFS

DIR = "/j"


def _frames(s: SegmentScan) -> tuple[object, ...]:
    """What a segment's scan says of its frames (not how the file ends beyond them)."""
    return (s.number, s.header, s.valid_end, s.seqs, s.offsets, s.lengths, s.types, s.marks)


def _whole(s: SegmentScan) -> tuple[object, ...]:
    """Every field of a scan but whether the frame index vouched for it."""
    return attrs.astuple(attrs.evolve(s, indexed=False), recurse=False)


def _without_index(fs: CrashableMemFS) -> CrashableMemFS:
    """A copy of the journal's files as they are now, without the frame index."""
    twin = CrashableMemFS()
    twin.mkdir(DIR)
    for name in fs.listdir(DIR):
        if not name.startswith(INDEX_NAME):
            f = twin.create(f"{DIR}/{name}")
            f.append(fs.read_file(f"{DIR}/{name}"))
            f.sync()
            f.close()
    twin.sync_dir(DIR)
    return twin


class JournalMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.fs = CrashableMemFS()
        self.log: Log
        self.model: dict[int, tuple[int, bytes, Position]] = {}  # seq -> type, payload, pos

    @initialize(segment_size=st.sampled_from([256, 1024, 1 << 20]))
    def open(self, segment_size: int) -> None:
        self.segment_size = segment_size
        self.log, report = Log.open(self.fs, DIR, segment_size=segment_size)
        assert report.records == 0

    def _reopen(self, fs: CrashableMemFS) -> RecoveryReport:
        twin = _without_index(fs)
        self.fs = fs
        self.log, report = Log.open(fs, DIR, segment_size=self.segment_size)
        scanned, twin_report = Log.open(twin, DIR, segment_size=self.segment_size)
        assert attrs.evolve(report, indexed=0) == twin_report
        assert {n: _whole(s) for n, s in self.log._index.items()} == {
            n: _whole(s) for n, s in scanned._index.items()
        }
        scanned.close()
        # Recovery's positions are where the records really stand now.
        by_seq = {r.seq: r.position for r in self.log.records()}
        self.model = {seq: (t, p, by_seq.get(seq, pos)) for seq, (t, p, pos) in self.model.items()}
        return report

    @rule(
        items=st.lists(
            st.tuples(st.integers(1, 255), st.binary(max_size=300)), min_size=1, max_size=6
        )
    )
    def append(self, items: list[tuple[int, bytes]]) -> None:
        seq = self.log.next_seq
        positions = self.log.write_batch(items)
        assert len(positions) == len(items)
        for i, ((rtype, payload), pos) in enumerate(zip(items, positions, strict=True)):
            self.model[seq + i] = (rtype, payload, pos)

    @rule()
    def rotate(self) -> None:
        before = self.log.active_segment
        assert self.log.rotate() == before + 1

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def compact(self, data: st.DataObject) -> None:
        seqs = sorted(self.model)
        dead_seqs = set(data.draw(st.lists(st.sampled_from(seqs), unique=True)))
        dead = {self.model[s][2] for s in dead_seqs}
        active = self.log.active_segment
        result = self.log.compact(dead)
        assert active not in result.removed_segments
        for seq in list(self.model):
            rtype, payload, pos = self.model[seq]
            if pos.segment in result.removed_segments:
                if seq in dead_seqs:
                    del self.model[seq]
                else:
                    new = result.relocated[pos]
                    assert self.log.read(pos).payload == payload  # old position still reads
                    self.model[seq] = (rtype, payload, new)

    @rule(
        keep=st.sampled_from([0.0, 0.5, 1.0]),
        garbage=st.booleans(),
        seed=st.integers(0, 2**16),
    )
    def crash_and_reopen(self, keep: float, garbage: bool, seed: int) -> None:
        crashed = self.fs.crash_clone(keep_unsynced=keep, garbage=garbage, seed=seed)
        self._reopen(crashed)

    @rule()
    def close_and_reopen(self) -> None:
        self.log.close()
        report = self._reopen(self.fs)
        assert report.indexed == report.segments > 0

    @invariant()
    def replay_matches_model(self) -> None:
        if not hasattr(self, "log"):
            return
        got = [(r.seq, r.type, r.payload) for r in self.log.records()]
        want = [(seq, t, p) for seq, (t, p, _) in sorted(self.model.items())]
        assert got == want

    @invariant()
    def its_index_is_what_a_scan_of_the_files_finds(self) -> None:
        if not hasattr(self, "log"):
            return
        for n, s in self.log._index.items():
            data = self.fs.read_file(self.log._path(n))
            found = scan_segment(data, n, newest=True, max_record_size=self.log.max_record_size)
            assert _frames(s) == _frames(found)
            assert (s.newest_seq, s.crc) == (found.newest_seq, found.crc)

    @invariant()
    def reads_by_position_match(self) -> None:
        if not hasattr(self, "log"):
            return
        for seq, (_, payload, pos) in list(self.model.items())[-5:]:
            record = self.log.read(pos)
            assert (record.seq, record.payload) == (seq, payload)


JournalMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None, derandomize=False
)
TestJournalMachine = JournalMachine.TestCase
