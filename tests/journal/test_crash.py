"""Crash the journal at every point of a workload and check what recovery returns."""

from __future__ import annotations

import pytest
import trio

from journal import CorruptJournalError, Log, check_journal
from journal._format import FRAME_HEADER_SIZE, HEADER_SIZE, segment_name
from journal.testing import CrashableMemFS
from tests.journal.helpers import (
    DIR,
    SnapshotFS,
    assert_prefix,
    concurrent_workload,
    ident,
    recover,
)

CRASH_MODES = {
    "synced-only": {},
    "unsynced-kept": {"keep_unsynced": 0.5},
    "garbage": {"keep_unsynced": 0.3, "garbage": True},
    "garbage-only": {"garbage": True},
}


@pytest.mark.parametrize("mode", list(CRASH_MODES))
async def test_crash_at_every_point_recovers_a_prefix_with_every_ack(mode: str) -> None:
    base = CrashableMemFS()
    acked: set[int] = set()
    fs = SnapshotFS(base, acked, **CRASH_MODES[mode])
    with trio.fail_after(60):
        await concurrent_workload(fs, acked, count=150, appenders=6, segment_size=8 * 1024)
    written = recover(base)
    assert len(written) == 150
    assert len(fs.snapshots) > 60  # many crash points, several rotations among them
    torn_seen = 0
    for snap in fs.snapshots:
        try:
            recovered = recover(snap.fs)
        except CorruptJournalError as exc:  # pragma: no cover - the failure we hunt
            pytest.fail(f"snapshot {snap.index} after {snap.after} ({mode}): {exc}")
        assert_prefix(recovered, written, snap.acked, context=f"{mode} snap {snap.index}")
        torn_seen += any(".broken" in n for n in snap.fs.listdir(DIR))
        # Appending after recovery works and survives another crash.
        log, _ = Log.open(snap.fs, DIR)
        log.write_batch([(7, b"after-recovery")])
        again = recover(snap.fs.crash_clone())
        assert again[-1].payload == b"after-recovery"
        assert_prefix(again[:-1], written, snap.acked, context=f"{mode} reopen {snap.index}")
    if mode != "synced-only":
        assert torn_seen > 0  # the adversarial modes really produced torn tails


async def test_crash_during_compaction_loses_nothing_live() -> None:
    base = CrashableMemFS()
    acked: set[int] = set()
    fs = SnapshotFS(base, acked, keep_unsynced=0.5)
    with trio.fail_after(60):
        await concurrent_workload(
            fs, acked, count=120, appenders=4, segment_size=4 * 1024, compact_every=30
        )
    # Every compaction removes all sealed segments, and with ~1 KB records and 4 KiB
    # segments there are sealed segments at each one after the first: a removal happens in
    # every interleaving. How many dead records each compaction drops depends on which
    # positions its task had heard of by then, so that is checked below, deterministically.
    removals = [s for s in fs.snapshots if s.after == "remove"]
    assert removals, "the workload never removed a compacted segment"
    for snap in fs.snapshots:
        recovered = recover(snap.fs)
        ids = [ident(r.payload) for r in recovered]
        assert ids == sorted(ids), f"snapshot {snap.index}: out of order"
        assert len(ids) == len(set(ids)), f"snapshot {snap.index}: a duplicate survived replay"
        lost = {i for i in snap.acked if i % 3 == 0} - set(ids)
        assert not lost, f"snapshot {snap.index} after {snap.after}: live records lost {lost}"
    # Then, sequentially: seal everything, name every dead record, compact. Exactly the
    # live records remain: compaction drops what is dead and keeps what is not.
    log, _ = Log.open(base, DIR)
    log.rotate()
    log.compact({r.position for r in log.records() if ident(r.payload) % 3 != 0})
    remaining = sorted(ident(r.payload) for r in log.records())
    log.close()
    assert remaining == sorted(i for i in acked if i % 3 == 0)
    assert len(acked) == 120


def test_new_segment_without_directory_sync_disappears() -> None:
    fs = CrashableMemFS()
    log, _ = Log.open(fs, DIR, segment_size=1024)
    log.write_batch([(1, b"a" * 100)])
    # Create the next segment the way rotation does, but crash before the directory sync.
    f = fs.create(f"{DIR}/{segment_name(2)}")
    f.append(b"\0" * HEADER_SIZE)
    f.sync()
    crashed = fs.crash_clone()
    assert segment_name(2) not in crashed.listdir(DIR)
    assert [r.payload for r in recover(crashed)] == [b"a" * 100]


def _single_batches(n: int, last: bytes) -> tuple[CrashableMemFS, int]:
    """A journal of n one-record batches (the last one ``last``), crashed before close.
    Returns the FS and the offset of the last frame."""
    fs = CrashableMemFS()
    log, _ = Log.open(fs, DIR)
    for i in range(n - 1):
        log.write_batch([(1, b"rec-%08d|" % i)])
    (pos,) = log.write_batch([(2, last)])
    return fs.crash_clone(), pos.offset


def _rewrite(fs: CrashableMemFS, name: str, data: bytes) -> None:
    fs.remove(f"{DIR}/{name}")
    f = fs.create(f"{DIR}/{name}")
    f.append(data)
    f.sync()
    fs.sync_dir(DIR)


@pytest.mark.parametrize("fill", ["truncated", "zero-filled"])
def test_last_record_torn_at_every_byte_offset(fill: str) -> None:
    last = b"LAST|" + bytes(range(256))[:150]
    template, start = _single_batches(5, last)
    seg = segment_name(1)
    data = template.read_file(f"{DIR}/{seg}")
    end = start + FRAME_HEADER_SIZE + len(last)
    assert end == len(data)
    first_cut = start + 1 if fill == "truncated" else start
    for cut in range(first_cut, end):
        fs = template.crash_clone()
        torn = data[:cut] if fill == "truncated" else data[:cut] + bytes(end - cut)
        _rewrite(fs, seg, torn)
        log, report = Log.open(fs, DIR)
        got = [r.payload for r in log.records()]
        assert got == [b"rec-%08d|" % i for i in range(4)], f"cut {cut}"
        assert report.torn is not None
        assert report.torn.offset == start, f"cut {cut}"
        assert report.broken_path is not None
        assert fs.read_file(report.broken_path) == torn[start:]
        log.write_batch([(3, b"after")])
        again = [r.payload for r in recover(fs.crash_clone())]
        assert again == [*got, b"after"], f"cut {cut}"


def _flip(fs: CrashableMemFS, seg: str, offset: int) -> bytes:
    data = bytearray(fs.read_file(f"{DIR}/{seg}"))
    data[offset] ^= 0x40
    _rewrite(fs, seg, bytes(data))
    return bytes(data)


@pytest.mark.parametrize("where", ["sealed-segment", "newest-segment"])
def test_flipped_byte_mid_log_is_loud_and_nothing_is_modified(where: str) -> None:
    fs = CrashableMemFS()
    log, _ = Log.open(fs, DIR, segment_size=4096 if where == "sealed-segment" else 1 << 20)
    positions = [log.write_batch([(1, b"rec-%08d|" % i + b"x" * 200)])[0] for i in range(40)]
    crashed = fs.crash_clone()
    target = positions[3] if where == "sealed-segment" else positions[-10]
    seg = segment_name(target.segment)
    flipped = _flip(crashed, seg, target.offset + FRAME_HEADER_SIZE + 5)
    before = {n: crashed.read_file(f"{DIR}/{n}") for n in crashed.listdir(DIR)}
    with pytest.raises(CorruptJournalError) as info:
        Log.open(crashed, DIR)
    assert (info.value.segment, info.value.offset) == (target.segment, target.offset)
    after = {n: crashed.read_file(f"{DIR}/{n}") for n in crashed.listdir(DIR)}
    assert after == before
    assert after[seg] == flipped
    report = check_journal(DIR, fs=crashed)
    assert report.exit_code == 2
    assert report.corruption is not None
    assert report.corruption.offset == target.offset
