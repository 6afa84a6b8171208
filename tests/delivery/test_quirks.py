"""The hosts the delivery client remembers as not understanding BDAT (delivery/quirks.py):
for FORGET_AFTER seconds, each on its own, at most MAX_HOSTS at once, one warning a host.
Through the transaction itself: test_pipelining.py (the next message goes by DATA)."""

from __future__ import annotations

import logging

import pytest

from atmosrelay.delivery.quirks import (
    FORGET_AFTER,
    MAX_HOSTS,
    bdat_not_understood,
    bdat_works,
)


def test_a_host_gets_data_until_it_is_forgotten() -> None:
    assert bdat_works("mx.example.net", 100.0)
    bdat_not_understood("mx.example.net", 100.0)
    assert not bdat_works("mx.example.net", 100.0 + FORGET_AFTER - 1)
    assert bdat_works("other.example.net", 101.0)  # only that host
    assert bdat_works("mx.example.net", 100.0 + FORGET_AFTER)
    assert bdat_works("mx.example.net", 100.0 + FORGET_AFTER + 1)  # and it stays forgotten


def test_failing_again_starts_the_time_over_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="atmosrelay.delivery"):
        bdat_not_understood("mx.example.net", 0.0)
        bdat_not_understood("mx.example.net", 1000.0)
    assert not bdat_works("mx.example.net", FORGET_AFTER + 500.0)
    assert bdat_works("mx.example.net", FORGET_AFTER + 1000.0)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1
    assert warned[0].startswith("mx.example.net offers CHUNKING but did not understand BDAT")


def test_the_oldest_host_goes_first_when_full() -> None:
    for i in range(MAX_HOSTS):
        bdat_not_understood(f"mx{i}.example.net", float(i))
    bdat_not_understood("mx0.example.net", float(MAX_HOSTS))  # failed again: the newest now
    bdat_not_understood("one.more.example.net", float(MAX_HOSTS + 1))
    assert not bdat_works("mx0.example.net", float(MAX_HOSTS + 2))
    assert bdat_works("mx1.example.net", float(MAX_HOSTS + 2))  # the oldest, forgotten
    assert not bdat_works("mx2.example.net", float(MAX_HOSTS + 2))
    assert not bdat_works("one.more.example.net", float(MAX_HOSTS + 2))
