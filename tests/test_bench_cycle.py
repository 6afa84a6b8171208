"""The cycle bench: its client against the real relay, and the figures it prints."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import bench_cycle, bench_peers
from bench.bench_accept import Server


def test_the_figures_are_each_steps_mean_and_p99_and_the_cycle_is_littles_law() -> None:
    ms = 1e-3
    run = {
        "rate": 2000.0,
        "sessions": 4,
        "taken": [
            [0.2 * ms] * 99 + [1.2 * ms],  # MAIL: one slow reply among a hundred
            [0.3 * ms] * 100,
            [0.1 * ms] * 100,
            [1.0 * ms] * 50 + [1.4 * ms] * 50,
        ],
    }
    row = bench_cycle.summary("relay", run)
    assert row["rate"] == 2000
    assert row["mail_ms"] == 0.21 and row["mail_p99_ms"] == 1.2
    assert row["rcpt_ms"] == 0.3 and row["data_ms"] == 0.1
    assert row["end_ms"] == 1.2 and row["end_p99_ms"] == 1.4
    assert row["cycle_ms"] == 2.0  # 4 sessions / 2,000 messages a second
    both = bench_cycle.medians([row, {**row, "rate": 3000, "end_ms": 0.8}, row])
    assert both["side"] == "relay" and both["rounds"] == 3
    assert both["rate"] == 2000 and both["end_ms"] == 1.2


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Server]:
    server = bench_peers.relay(tmp_path, "enabled = false\n")
    yield server
    server.stop()


def test_every_step_of_every_message_is_timed(relay: Server) -> None:
    run = bench_cycle.cycle(relay.port, 30, 4, 2048)
    assert run["sessions"] == 4
    assert [len(t) for t in run["taken"]] == [30, 30, 30, 30]
    assert all(0 < s < 30 for t in run["taken"] for s in t)
    assert run["rate"] > 0


def test_the_relays_row_has_its_own_clock_within_what_the_client_saw(tmp_path: Path) -> None:
    row = bench_cycle.run_side("relay", 40, 4, 2048, tmp_path)
    assert row["side"] == "relay" and row["rate"] > 0
    # end of data read to 250 written, inside the client's last octet written to 250 read
    assert 0 < row["relay_end_ms"] <= row["end_ms"]


def test_a_refusal_ends_the_run_rather_than_being_timed(relay: Server) -> None:
    with pytest.raises(RuntimeError, match=r"^MAIL refused: b'5"):
        bench_cycle.cycle(relay.port, 5, 2, 1024, sender="someone@not-enrolled.test")
