"""Errors the journal raises, each saying whose fault it is and what to do next."""

from __future__ import annotations


class JournalError(Exception):
    """Base class of every error the journal raises on purpose."""


class CorruptJournalError(JournalError):
    """Bytes that had been acknowledged as durable are damaged. Nothing was modified.

    Raised at open (and by ``check``) when an invalid frame is followed by proof that it had
    been fsynced: any valid frame in an older segment, or a sync mark in the newest one. The
    journal refuses to start rather than drop acknowledged records; an operator must look at
    ``segment`` at ``offset`` (``atmosrelay journal check DIR`` prints the same).
    """

    def __init__(self, segment: int, offset: int, reason: str) -> None:
        self.segment = segment
        self.offset = offset
        self.reason = reason
        super().__init__(f"journal corrupt in segment {segment} at offset {offset}: {reason}")


class JournalFatalError(JournalError):
    """The journal is poisoned: a write or an fsync failed and durability is unknown.

    After a failed fsync the kernel may have dropped the dirty pages and cleared the error, so
    retrying the fsync could falsely succeed (the PostgreSQL "fsyncgate" of 2018). Every call
    after the failure raises this; the process must reopen the journal, which re-reads the disk.
    """


class JournalFullError(JournalError):
    """The disk is full (ENOSPC). The append failed cleanly and may be retried later.

    Whatever part of the batch reached the file was truncated away and the truncation fsynced,
    so recovery can never resurrect a record whose append raised this.
    """


class JournalReadError(JournalError):
    """Reading a record failed with an I/O error. Writes are not affected; the read may be
    retried, and a persistent failure wants the disk looked at."""


class JournalClosedError(JournalError):
    """The journal was closed; no more appends are taken."""


class RecordTooLargeError(JournalError, ValueError):
    """The payload is larger than the journal's ``max_record_size``: the caller's mistake."""
