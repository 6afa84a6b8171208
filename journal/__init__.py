"""An append-only, crash-safe journal with group commit for trio.

Knows nothing of mail. The format is drawn in ``journal._format``; recovery's rules in
``journal._segment``; durability rules in ``journal._log``; group commit in
``journal._journal``. Test fakes (a crashable FS, a fault-injecting FS) in ``journal.testing``.
"""

from journal._extent import Extent, ExtentMismatch
from journal._fs import FS, File, OsFS, replace_file
from journal._inspect import CheckReport, check_journal, dump_journal, read_at, read_records
from journal._journal import Journal, open_journal
from journal._log import Compaction, Log, Position, Record, RecoveryReport
from journal._segment import TornTail
from journal.errors import (
    CorruptJournalError,
    JournalClosedError,
    JournalError,
    JournalFatalError,
    JournalFullError,
    JournalReadError,
    RecordTooLargeError,
)

__all__ = [
    "FS",
    "CheckReport",
    "Compaction",
    "CorruptJournalError",
    "Extent",
    "ExtentMismatch",
    "File",
    "Journal",
    "JournalClosedError",
    "JournalError",
    "JournalFatalError",
    "JournalFullError",
    "JournalReadError",
    "Log",
    "OsFS",
    "Position",
    "Record",
    "RecordTooLargeError",
    "RecoveryReport",
    "TornTail",
    "check_journal",
    "dump_journal",
    "open_journal",
    "read_at",
    "read_records",
    "replace_file",
]
