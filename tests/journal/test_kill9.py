"""kill -9 a real process that appends with group commit on a real directory, at random
moments, many times over; every append it acknowledged must be there after reopening."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from journal import Log, OsFS

ROUNDS = 20
ROUND_BASE = 1_000_000
CHILD = Path(__file__).with_name("appender_process.py")
ROOT = Path(__file__).resolve().parents[2]


def _run_round(directory: Path, base: int, kill_after: float) -> set[int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, str(CHILD), str(directory), "--base", str(base), "--seconds", "20"],
        stdout=subprocess.PIPE,
        env=env,
    )
    assert child.stdout is not None
    try:
        ready = child.stdout.readline()
        assert ready.startswith(b"ready"), ready
        # Let it reach full speed, then kill it wherever it happens to be.
        deadline = time.monotonic() + kill_after
        acked: set[int] = set()
        while time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            acked.add(int(line.split()[1]))
        child.send_signal(signal.SIGKILL)
        # Acknowledgements already written to the pipe were printed after their fsync too.
        for line in child.stdout:
            if line.startswith(b"ack "):
                acked.add(int(line.split()[1]))
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=10)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    return acked


@pytest.mark.slow
def test_kill_9_under_load_never_loses_an_acknowledged_append(tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    directory = tmp_path / "journal"
    all_acked: dict[int, set[int]] = {}
    started = time.monotonic()
    for round_ in range(ROUNDS):
        assert time.monotonic() - started < 240, "kill loop is over its time budget"
        base = round_ * ROUND_BASE
        all_acked[round_] = _run_round(directory, base, rng.uniform(0.02, 0.6))
        log, report = Log.open(OsFS(), str(directory), segment_size=256 * 1024)
        try:
            ids = [int(r.payload.split(b"|")[0][3:]) for r in log.records()]
        finally:
            log.close()
        assert len(ids) == len(set(ids)), f"seed {seed}: duplicate after round {round_}"
        for r, acked in all_acked.items():
            mine = [i for i in ids if r * ROUND_BASE <= i < (r + 1) * ROUND_BASE]
            # A prefix of that round's appends (ids were taken in append order)...
            assert mine == list(range(r * ROUND_BASE, r * ROUND_BASE + len(mine))), (
                f"seed {seed}: round {r} recovered with a hole or out of order"
            )
            # ...holding every acknowledged one.
            lost = acked - set(mine)
            assert not lost, f"seed {seed}: round {r} lost acknowledged appends {sorted(lost)[:5]}"
        assert report.segments >= 1
    assert sum(len(a) for a in all_acked.values()) > ROUNDS * 10, "the child barely appended"
