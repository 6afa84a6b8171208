"""Fuzz journal recovery: arbitrary segment bytes in, a valid prefix or CorruptJournalError out.

Invariant (fuzz/README.md): for any bytes placed in the newest segment behind a known-good
journal, ``Log.open`` either raises ``CorruptJournalError`` or recovers exactly a prefix of the
good records (nothing invented, nothing reordered); recovering again gives the same records;
anything else (another exception, a hang) is a bug.

Run it under atheris (coverage-guided) with ``python fuzz/fuzz_journal_recover.py``; the test
suite runs a Hypothesis twin of the same ``check_one``.
"""

from __future__ import annotations

from fuzz._harness import atheris_main
from journal import CorruptJournalError, Log
from journal._format import segment_name
from journal.testing import CrashableMemFS

DIR = "/fz"


def _good_journal() -> tuple[CrashableMemFS, list[bytes]]:
    fs = CrashableMemFS()
    log, _ = Log.open(fs, DIR, segment_size=600)
    payloads = [b"good-%03d|" % i + b"g" * (i * 7 % 90) for i in range(24)]
    for i in range(0, len(payloads), 3):
        log.write_batch([(1, p) for p in payloads[i : i + 3]])
    return fs.crash_clone(), payloads


GOOD_FS, GOOD = _good_journal()
NEWEST = max(int(n.split(".")[0]) for n in GOOD_FS.listdir(DIR) if n.endswith(".seg"))


def check_one(data: bytes) -> None:
    """Replace the newest segment's bytes from a fuzzer-chosen offset on, then recover."""
    fs = GOOD_FS.crash_clone()
    path = f"{DIR}/{segment_name(NEWEST)}"
    original = fs.read_file(path)
    cut = data[0] * 4 if data else 0
    mutated = original[: min(cut, len(original))] + data[1:]
    fs.remove(path)
    f = fs.create(path)
    f.append(mutated)
    f.sync()
    fs.sync_dir(DIR)
    try:
        log, _ = Log.open(fs, DIR, segment_size=600)
    except CorruptJournalError:
        return
    got = [r.payload for r in log.records()]
    assert got == GOOD[: len(got)], "recovery invented or reordered a record"
    log.close()
    again, _ = Log.open(fs, DIR, segment_size=600)
    assert [r.payload for r in again.records()] == got, "a second recovery disagreed"


if __name__ == "__main__":  # pragma: no cover
    atheris_main(check_one)
