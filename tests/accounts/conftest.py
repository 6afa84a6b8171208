from __future__ import annotations

import pytest
import trio.testing


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    """Virtual time that jumps only after 0.2 s of real idleness: these tests also talk to a
    real DNS server in a thread, whose answers must win over the jump."""
    return trio.testing.MockClock(autojump_threshold=0.2)
