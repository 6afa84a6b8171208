"""``atmosrelay crashtest``, the operator's crash suite, run as the operator runs it (a few
rounds here; the closing note of the issue that built it has a 200-round table)."""

from __future__ import annotations

import collections
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from atmosrelay.crashtest import tally

KEYS = {"rounds", "acknowledged", "lost", "duplicates", "unacknowledged_delivered", "restart_s"}


def test_the_tally_counts_losses_duplicates_and_lost_replies() -> None:
    delivered = collections.Counter({"a": 1, "b": 3, "x": 1})
    counted = tally({"a", "b", "c", "d"}, delivered)
    assert counted.lost == ["c", "d"]
    assert counted.duplicates == 2
    assert counted.unacknowledged_delivered == 1  # "x": on disk, its 250 lost in the kill


@pytest.mark.slow
def test_five_rounds_of_kill_9_lose_nothing(tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    result = subprocess.run(
        [sys.executable, "-m", "atmosrelay", "crashtest", str(tmp_path / "ct"), "--rounds", "5",
         "--seed", str(seed), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, f"seed {seed}: {result.stdout}{result.stderr[-3000:]}"
    report = json.loads(result.stdout)
    assert report.keys() >= KEYS
    assert report["rounds"] == 5
    assert report["acknowledged"] > 0, f"seed {seed}: nothing was submitted"
    assert report["lost"] == 0, f"seed {seed}: {report['lost_subjects']}"
    assert report["delivered"] >= report["acknowledged"]
    assert set(report["restart_s"]) == {"p50", "p99", "max"}
    assert report["journal_checks"].get("corrupt", 0) == 0
    assert report["seed"] == seed


def test_it_refuses_a_directory_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "something").write_text("x")
    result = subprocess.run(
        [sys.executable, "-m", "atmosrelay", "crashtest", str(tmp_path), "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "is not empty" in result.stderr
