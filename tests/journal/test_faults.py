"""Fail every FS operation of a workload in turn: the journal answers with its own errors,
poisons on a failed write or fsync, and never loses an acknowledged append."""

from __future__ import annotations

import errno
import posixpath
from collections.abc import Iterator

import pytest
import trio

from journal import (
    Journal,
    JournalError,
    JournalFatalError,
    JournalFullError,
    Log,
    Position,
    open_journal,
)
from journal._index import INDEX_NAME
from journal.testing import CrashableMemFS, FaultFS
from tests.journal.helpers import DIR, ident, payload, recover


async def _workload(
    fs: FaultFS, acked: dict[int, int], failures: dict[int, type], *, appenders: int = 1
) -> None:
    """Open, append 60 records from ``appenders`` tasks (rotating), closing and reopening
    halfway so recovery runs under faults too, compact once, close. Every error must be a
    JournalError; acknowledged ids go to ``acked``.

    With one appender each append is its own batch, so the sequence of FS operations is the
    same on every run (``test_the_single_appender_workload_is_deterministic``) and every
    operation can be failed in turn. With several, how appends share batches depends on
    how the writer thread and the tasks interleave, so the count of operations does too."""
    positions: dict[int, Position] = {}
    for first, last in ((0, 30), (30, 60)):
        try:
            async with open_journal(DIR, fs=fs, segment_size=3000) as journal:
                ids = iter(range(first, last))

                async def appender(journal: Journal = journal, ids: Iterator[int] = ids) -> None:
                    for i in ids:
                        try:
                            positions[i] = await journal.append(1, payload(i))
                        except JournalError as exc:
                            failures[i] = type(exc)
                            continue
                        acked[i] = i
                        if i == 40:
                            dead = {p for k, p in positions.items() if k % 2 and k <= 30}
                            try:
                                await journal.compact(dead)
                            except JournalError as exc:
                                failures[-1] = type(exc)

                async with trio.open_nursery() as nursery:
                    for _ in range(appenders):
                        nursery.start_soon(appender)
        except JournalError as exc:
            failures[-2 - first] = type(exc)


# Operations whose failure leaves the disk in an unknown state: the journal must poison.
POISONING = {"append", "sync", "sync_dir", "create", "truncate", "remove"}


def _op_log() -> list[tuple[str, str]]:
    fs = FaultFS(CrashableMemFS())
    trio.run(_workload, fs, {}, {})
    return [(r.op, r.path) for r in fs.log]


TOTAL_OPS = len(_op_log())


def test_the_single_appender_workload_is_deterministic() -> None:
    """What makes enumerating its operations sound: the same operations, in the same
    order, on the same files, every time."""
    first = _op_log()
    for _ in range(5):
        assert _op_log() == first


def _check_after(base: CrashableMemFS, acked: dict[int, int], context: str) -> None:
    for fs in (base, base.crash_clone(), base.crash_clone(keep_unsynced=1.0)):
        got = [ident(r.payload) for r in recover(fs)]
        assert len(got) == len(set(got)), f"{context}: duplicate"
        missing = {i for i in acked if i % 2 == 0 or i > 30} - set(got)  # odd <= 30 compacted
        assert not missing, f"{context}: acknowledged appends lost: {sorted(missing)}"


async def _fail_and_check(fs: FaultFS, base: CrashableMemFS, appenders: int) -> None:
    acked: dict[int, int] = {}
    failures: dict[int, type] = {}
    with trio.fail_after(20):
        # raises if anything but a JournalError escapes
        await _workload(fs, acked, failures, appenders=appenders)
    failed_op = next((r for r in fs.log if r.failed), None)
    assert failed_op is not None, "the fault never fired"
    if posixpath.basename(failed_op.path).startswith(INDEX_NAME):
        # The frame index is a cache (journal/_index.py): failing to read or write it costs
        # the next open time, never a record, and never poisons.
        assert JournalFatalError not in failures.values(), failures
    elif failed_op.op in POISONING:
        # A failed write, fsync or directory change poisons: nothing is written or fsynced
        # again (a retried fsync could falsely succeed), and somebody was told.
        # ...until the workload reopens the journal (a restart re-reads the disk): each open
        # begins by listing the directory.
        after = fs.log[failed_op.index + 1 :]
        reopen = next((k for k, r in enumerate(after) if r.op == "listdir"), len(after))
        later = [r.op for r in after[:reopen] if r.op in ("append", "sync")]
        assert not later, f"wrote after a failed {failed_op.op}: {later}"
        assert JournalFatalError in failures.values()
    _check_after(base, acked, f"fault at op {failed_op.index} ({failed_op.op} {failed_op.path})")


@pytest.mark.parametrize("fail_at", range(TOTAL_OPS))
async def test_fault_at_every_operation(fail_at: int) -> None:
    base = CrashableMemFS()
    await _fail_and_check(FaultFS(base, fail_at=fail_at), base, appenders=1)


# With four appenders, 60 appends make at least 15 batches (a batch holds at most one
# append per waiting task), each a write and an fsync, and both opens list and fsync the
# directory: these occurrences exist in every interleaving.
@pytest.mark.parametrize(
    ("op", "nth"),
    [(op, n) for op in ("append", "sync") for n in (0, 1, 2, 7, 14)]
    + [(op, n) for op in ("sync_dir", "listdir") for n in (0, 1)],
)
async def test_fault_with_concurrent_appenders(op: str, nth: int) -> None:
    base = CrashableMemFS()
    await _fail_and_check(FaultFS(base, only=op, fail_at=nth), base, appenders=4)


def test_every_operation_kind_is_exercised() -> None:
    fs = FaultFS(CrashableMemFS())
    trio.run(_workload, fs, {}, {})
    kinds = {r.op for r in fs.log}
    assert {"create", "append", "sync", "sync_dir", "remove", "pread", "read_file"} <= kinds


async def test_failed_fsync_poisons_and_is_never_retried() -> None:
    base = CrashableMemFS()
    fs = FaultFS(base, only="sync", fail_at=3)
    async with open_journal(DIR, fs=fs) as journal:
        await journal.append(1, b"first")
        syncs_before = sum(1 for r in fs.log if r.op == "sync")
        errors = []
        for i in range(10):
            try:
                await journal.append(1, b"x%d" % i)
            except JournalFatalError as exc:
                errors.append(exc)
                break
        assert errors, "the failed fsync was not reported"
        syncs_at_fault = sum(1 for r in fs.log if r.op == "sync")
        for _ in range(3):
            with pytest.raises(JournalFatalError):
                await journal.append(1, b"later")
        with pytest.raises(JournalFatalError):
            await journal.read(Position(1, 32))
        # Nothing touched the disk again after the failed fsync.
        assert sum(1 for r in fs.log if r.op == "sync") == syncs_at_fault > syncs_before
    assert b"first" in [r.payload for r in recover(base)]


@pytest.mark.parametrize("nth_write", range(8))
async def test_enospc_fails_the_append_cleanly(nth_write: int) -> None:
    base = CrashableMemFS()
    fs = FaultFS(base, only="append", fail_at=nth_write + 1, error=errno.ENOSPC)
    refused: list[bytes] = []
    acked: list[bytes] = []
    async with open_journal(DIR, fs=fs, segment_size=2048) as journal:
        for i in range(12):
            data = b"rec-%08d|" % i + b"z" * 300
            try:
                await journal.append(1, data)
            except JournalFullError:
                refused.append(data)
            else:
                acked.append(data)
    assert len(refused) == 1
    assert len(acked) == 11
    for crashed in (base, base.crash_clone(keep_unsynced=1.0), base.crash_clone(garbage=True)):
        got = [r.payload for r in recover(crashed)]
        assert got == acked  # the half-written batch was cut away durably


async def test_persistent_disk_failure_poisons_and_reopen_keeps_acks() -> None:
    base = CrashableMemFS()
    fs = FaultFS(base, only="sync", fail_at=6, sticky=True)
    acked: list[bytes] = []
    async with open_journal(DIR, fs=fs) as journal:
        for i in range(20):
            try:
                await journal.append(2, b"rec-%08d|" % i)
            except JournalFatalError:
                break
            acked.append(b"rec-%08d|" % i)
    assert 0 < len(acked) < 20
    log, _ = Log.open(base.crash_clone(), DIR)
    assert [r.payload for r in log.records()][: len(acked)] == acked
