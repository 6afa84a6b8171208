"""Every input a fuzz harness ever failed on (fuzz/regressions/<harness>/<name>) is run
through that harness's check on every test run, so a fixed finding stays fixed."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

REGRESSIONS = Path(__file__).resolve().parents[1] / "fuzz" / "regressions"
SEEDS = sorted(p for p in REGRESSIONS.glob("*/*") if p.is_file())


def test_there_are_seeds() -> None:
    assert {p.parent.name for p in SEEDS} >= {"fuzz_client_replies", "fuzz_dsn"}


@pytest.mark.parametrize("seed", SEEDS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_past_finding_stays_fixed(seed: Path) -> None:
    harness = importlib.import_module(f"fuzz.{seed.parent.name}")
    harness.check_one(seed.read_bytes())
