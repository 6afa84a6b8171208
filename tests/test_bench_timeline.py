"""The timeline bench's summary: what it prints for each phase is what its samples say."""

from __future__ import annotations

from bench.bench_timeline import phases


def row(span: float, delivered: int, busy: float, cpu: list[float], sending: bool) -> dict:
    return {
        "span": span,
        "delivered_per_s": delivered,
        "busy": busy,
        "cpu": cpu,
        "sending": sending,
    }


def test_each_phase_is_its_own_samples_weighed_by_their_span() -> None:
    run = {
        "rows": [
            row(1.0, 400, 0.8, [0.9, 0.3], True),
            row(1.0, 600, 0.9, [0.9, 0.5], True),
            row(1.0, 1200, 0.9, [0.3, 0.7], False),
            row(0.5, 600, 0.6, [0.6, 0.4], False),  # the last, cut short by the end
        ]
    }
    sending, after = phases(run)
    assert sending == {
        "phase": "sending",
        "seconds": 2.0,
        "delivered_per_s": 500,
        "busy": 0.85,
        "cpu": [0.9, 0.4],
    }
    assert after["phase"] == "after" and after["seconds"] == 1.5
    assert after["delivered_per_s"] == 1000  # (1200 * 1 + 600 * 0.5) / 1.5
    assert after["busy"] == 0.8
    assert after["cpu"] == [0.4, 0.6]


def test_a_row_the_client_never_stopped_has_no_after_phase() -> None:
    assert [p["phase"] for p in phases({"rows": [row(1.0, 10, 0.5, [0.5], True)]})] == ["sending"]
