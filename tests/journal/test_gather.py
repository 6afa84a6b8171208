"""The writer's waits: for records on their way (``Journal.gather`` and ``gathered``), a batch
it woke for is held while ``gather`` says others are coming, until ``gathered`` is called,
the time is up, or the journal closes; records appended meanwhile share its write and fsync.
A batch of patient records only (``append(..., patient=True)``) is held for ``patience``, or
until a record comes that is not patient, whose batch they then join.
Nothing here depends on timing: where the wait could end by its time, the bound is set far
beyond the test, so only ``gathered`` or the close can end it."""

from __future__ import annotations

import logging
import threading

import pytest
import trio
import trio.testing

import journal._journal as journal_module
from journal import open_journal
from journal.testing import CrashableMemFS

DIR = "/gather"


class Asked:
    """A ``gather`` that answers ``seconds`` and lets the test wait until it was asked: then
    the writer holds the open batch (it asks with the batch's lock held, and keeps it until
    its wait begins, so an append or ``gathered`` made after this finds it waiting)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.event = threading.Event()

    def __call__(self) -> float:
        self.event.set()
        return self.seconds

    async def wait(self) -> None:
        assert await trio.to_thread.run_sync(self.event.wait, 30)


@pytest.fixture
def long_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_module, "MAX_GATHER", 3600.0)


@pytest.mark.usefixtures("long_waits")
async def test_records_appended_while_the_writer_waits_share_its_batch() -> None:
    done: list[str] = []
    with trio.fail_after(30):
        async with open_journal(DIR, fs=CrashableMemFS()) as journal:
            asked = journal.gather = Asked(3600.0)
            batches = journal.batches

            async def append(name: str) -> None:
                await journal.append(1, name.encode())
                done.append(name)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(append, "first")
                await asked.wait()
                nursery.start_soon(append, "second")
                nursery.start_soon(append, "third")
                # both have joined the open batch (each task is blocked in its append), and
                # the writer holds it: nothing is durable
                await trio.testing.wait_all_tasks_blocked()
                assert done == []
                assert journal.batches == batches
                journal.gathered()
            assert sorted(done) == ["first", "second", "third"]
            assert journal.batches == batches + 1  # one write and one fsync for the three


async def test_a_zero_answer_writes_at_once_and_gathered_without_a_wait_does_nothing() -> None:
    asked: list[float] = []

    def gather() -> float:
        asked.append(0.0)
        return 0.0

    with trio.fail_after(30):
        async with open_journal(DIR, fs=CrashableMemFS()) as journal:
            journal.gathered()  # nobody waits: a no-op
            journal.gather = gather
            for i in range(3):
                await journal.append(1, b"%d" % i)  # would hang if the writer waited
            assert asked == [0.0, 0.0, 0.0]  # asked once a wake, and each record woke it


@pytest.mark.usefixtures("long_waits")
async def test_closing_ends_the_wait_and_writes_what_was_held() -> None:
    position = None
    with trio.fail_after(30):
        async with open_journal(DIR, fs=CrashableMemFS()) as journal:
            asked = journal.gather = Asked(3600.0)

            async def append() -> None:
                nonlocal position
                position = await journal.append(1, b"held")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(append)
                await asked.wait()
                await journal.aclose()
    assert position is not None


async def test_a_wait_is_never_longer_than_its_bound() -> None:
    """``gather`` answering an hour still has the record written (MAX_GATHER, 10 ms)."""
    with trio.fail_after(30):
        async with open_journal(DIR, fs=CrashableMemFS()) as journal:
            journal.gather = lambda: 3600.0
            await journal.append(1, b"bounded")
            assert journal.batches >= 1


async def test_a_gather_that_raises_is_logged_and_the_record_written(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken() -> float:
        raise RuntimeError("policy bug")

    with trio.fail_after(30), caplog.at_level(logging.ERROR, logger="journal"):
        async with open_journal(DIR, fs=CrashableMemFS()) as journal:
            journal.gather = broken
            await journal.append(1, b"still written")
    assert "gather raised" in caplog.text


@pytest.mark.usefixtures("long_waits")
async def test_patient_records_wait_for_the_next_impatient_one_and_share_its_batch() -> None:
    """Records nobody waits on (``patient``) are held while the batch holds nothing else;
    the first record appended without it is written at once, with them, in one batch. With
    the patience far beyond the test, only that append (or the close) can end the wait."""
    done: list[str] = []
    with trio.fail_after(30):
        async with open_journal(DIR, fs=CrashableMemFS()) as journal:
            journal.patience = 3600.0
            batches = journal.batches

            async def append(name: str, patient: bool) -> None:
                await journal.append(1, name.encode(), patient=patient)
                done.append(name)

            async with trio.open_nursery() as nursery:
                for name in ("outcome 1", "outcome 2", "outcome 3"):
                    nursery.start_soon(append, name, True)
                await trio.testing.wait_all_tasks_blocked()
                assert done == []  # held: nothing impatient has come
                assert journal.batches == batches
                nursery.start_soon(append, "message", False)
            assert sorted(done) == ["message", "outcome 1", "outcome 2", "outcome 3"]
            assert journal.batches == batches + 1  # one write and one fsync for the four


async def test_patient_records_alone_are_written_within_the_patience() -> None:
    """Nothing impatient comes: the patient batch is written when its patience (5 ms here,
    bounded by MAX_GATHER whatever it is set to) is up; 0 writes at once."""
    with trio.fail_after(30):
        async with open_journal(DIR, fs=CrashableMemFS()) as journal:
            assert journal.patience == journal_module.PATIENCE
            await journal.append(1, b"alone", patient=True)
            journal.patience = 3600.0  # bounded by MAX_GATHER (10 ms)
            await journal.append(1, b"bounded", patient=True)
            journal.patience = 0
            await journal.append(1, b"at once", patient=True)
            assert journal.batches == 3


@pytest.mark.usefixtures("long_waits")
async def test_closing_ends_a_patient_wait_and_writes_what_was_held() -> None:
    position = None
    with trio.fail_after(30):
        async with open_journal(DIR, fs=CrashableMemFS()) as journal:
            journal.patience = 3600.0

            async def append() -> None:
                nonlocal position
                position = await journal.append(1, b"held", patient=True)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(append)
                await trio.testing.wait_all_tasks_blocked()
                assert position is None
                await journal.aclose()
    assert position is not None


@pytest.mark.usefixtures("long_waits")
async def test_after_a_patient_wait_the_batch_waits_as_gather_says() -> None:
    """An impatient record ends the patient wait; the batch, now holding one, is held as
    ``gather`` says, and ``gathered`` writes it."""
    done: list[str] = []
    with trio.fail_after(30):
        async with open_journal(DIR, fs=CrashableMemFS()) as journal:
            journal.patience = 3600.0
            asked = journal.gather = Asked(3600.0)

            async def append(name: str, patient: bool) -> None:
                await journal.append(1, name.encode(), patient=patient)
                done.append(name)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(append, "outcome", True)
                await trio.testing.wait_all_tasks_blocked()
                assert not asked.event.is_set()  # patient records alone: gather not asked
                nursery.start_soon(append, "message", False)
                await asked.wait()
                await trio.testing.wait_all_tasks_blocked()
                assert done == []
                journal.gathered()
            assert sorted(done) == ["message", "outcome"]
