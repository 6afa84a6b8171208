"""The real process delivering to a real sink (aiosmtpd) while it is killed: kill -9 at
random moments under load, restart, and every queue id answered 250 reaches the sink at
least once; duplicates (delivered, but killed before the outcome was fsynced) are counted.
SIGTERM under load drains: what the journal marks sent is at the sink, the rest is
delivered after the restart."""

from __future__ import annotations

import random
import re
import signal
import time
from pathlib import Path

import pytest

from tests.delivery.test_courier import alive
from tests.processes import delivery_pids, exited
from tests.relay.test_kill import (
    CLIENTS,
    ROUNDS,
    Acks,
    Server,
    load_then_signal,
    queue_states,
    write_config,
)
from tests.sink import Sink, aiosmtpd_sink


def wait_delivered(sink: Sink, wanted: set[str], limit: float) -> set[str]:
    """The wanted subjects not at the sink when ``limit`` seconds have passed."""
    sink.wait(lambda: wanted <= sink.subjects.keys(), limit)
    return wanted - set(sink.subject_counts())


def delivery_settings(sink: Sink, processes: int = 0) -> str:
    return (
        f'smarthost = "127.0.0.1:{sink.port}"\nconcurrency = {CLIENTS}\nidle = 1.0\n'
        f"processes = {processes}\n"
    )


# in this process, and through two delivery processes (delivery/courier.py)
PROCESSES = pytest.mark.parametrize("processes", [0, 2], ids=["one", "couriers"])


@pytest.mark.slow
@PROCESSES
def test_kill_9_while_delivering_loses_no_delivery(tmp_path: Path, processes: int) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    acked = Acks()
    started = time.monotonic()
    with aiosmtpd_sink() as sink:
        config_path, ctx, key = write_config(tmp_path, delivery_settings(sink, processes))
        for round_ in range(ROUNDS):
            assert time.monotonic() - started < 240, "kill loop over its time budget"
            server = Server(tmp_path, config_path, round_)
            couriers = delivery_pids(server.text())
            assert len(couriers) == processes
            first = acked.timed(round_ == 0)  # its clock from the first 250
            load_then_signal(
                server, ctx, key, acked, rng.uniform(0.3, 1.2), f"r{round_}", signal.SIGKILL, first
            )
            # the owner is gone: its delivery processes read end of file and exit
            assert exited(couriers, 15), f"delivery processes outlived the relay: {couriers}"
        delivered_before_last_start = sum(sink.subject_counts().values())
        final = Server(tmp_path, config_path, ROUNDS)  # no load: deliver what is left
        try:
            missing = wait_delivered(sink, set(acked.values()), 60)
        finally:
            final.proc.send_signal(signal.SIGTERM)
            assert final.proc.wait(60) == 0, final.err.read_text()
        counts = sink.subject_counts()
    duplicates = sum(c - 1 for c in counts.values() if c > 1)
    # Fsynced and delivered, but the kill came before the client read its 250: the relay
    # keeps its promise (durable first), the client cannot know (it would send again).
    unseen = set(counts) - set(acked.values())
    report = (
        f"seed {seed}: {len(acked)} answered 250 over {ROUNDS} kills, "
        f"{delivered_before_last_start} delivered before the last start, "
        f"{sum(counts.values())} deliveries in all, {duplicates} duplicate(s), "
        f"{len(unseen)} accepted whose 250 the client never read"
    )
    print(report)
    assert acked, f"the load never got a 250: {report}"  # how many is a speed figure
    assert not missing, f"{report}; never delivered: {sorted(missing)[:5]}"
    assert all(re.fullmatch(r"r\d+-\d+-\d+", s) for s in counts), "mail nobody sent"
    assert len(unseen) <= ROUNDS * CLIENTS, report  # at most one per client per kill
    # A duplicate needs a kill between the remote's 250 and our fsync of the outcome: at
    # most two per connection per kill (the attempt in hand, and the one before it, whose
    # outcome the journal may still hold for others to share its fsync).
    assert duplicates <= ROUNDS * CLIENTS * 2, report
    states = queue_states(config_path)
    assert all(s == "sent" for q in acked for s in states[q]), report


@pytest.mark.slow
@PROCESSES
def test_sigterm_drains_then_the_restart_delivers_the_rest(tmp_path: Path, processes: int) -> None:
    acked = Acks()
    with aiosmtpd_sink() as sink:
        config_path, ctx, key = write_config(tmp_path, delivery_settings(sink, processes))
        server = Server(tmp_path, config_path, 0)
        answered = acked.timed(True)
        status = load_then_signal(server, ctx, key, acked, 1.0, "term", signal.SIGTERM, answered)
        assert status == 0, server.err.read_text()
        text = server.finished()
        assert "deliveries:" in text and "journal closed" in text, text
        couriers = delivery_pids(text)
        assert len(couriers) == processes
        assert not any(alive(p) for p in couriers), "delivery processes outlived the relay"
        states = queue_states(config_path)
        marked_sent = {acked[q] for q in acked if states[q] == ["sent"]}
        at_sink = set(sink.subject_counts())
        assert marked_sent <= at_sink, "the journal says sent, the sink never got it"
        assert acked
        again = Server(tmp_path, config_path, 1)
        try:
            missing = wait_delivered(sink, set(acked.values()), 60)
        finally:
            again.proc.send_signal(signal.SIGTERM)
            assert again.proc.wait(60) == 0
    assert not missing, sorted(missing)[:5]
    print(f"{len(acked)} accepted; {len(marked_sent)} sent before SIGTERM, the rest after")
