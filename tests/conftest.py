from __future__ import annotations

import pytest
import trio.testing

from atmosrelay.delivery import quirks


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    """Virtual time that jumps only after 0.05 s of real idleness. Many tests also wait on real
    threads (the journal's writer, a DNS server, bcrypt): their answers must win over the
    jump, or virtual time races ahead while a thread works."""
    return trio.testing.MockClock(autojump_threshold=0.05)


@pytest.fixture(autouse=True)
def _no_remote_quirks() -> None:
    """No remote host remembered as not understanding BDAT: the delivery client keeps that
    per process (delivery/quirks.py), and a test's MX must not decide another's."""
    quirks.forget_all()
