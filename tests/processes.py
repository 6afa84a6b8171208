"""The relay's delivery processes, seen from a test: which they are, and when they end."""

from __future__ import annotations

import os
import re
import select
import time


def delivery_pids(text: str) -> list[int]:
    """The delivery processes a relay said it started (none when it delivers itself)."""
    found = re.search(r"delivery processes started \(pid ([\d, ]+)\)", text)
    return [int(p) for p in found.group(1).split(", ")] if found else []


def exited(pids: list[int], timeout: float) -> bool:
    """Whether every one of ``pids`` (not our children) has exited within ``timeout``
    seconds: a pidfd becomes readable when its process ends."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue  # gone and reaped already
        try:
            if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                return False
        finally:
            os.close(fd)
    return True
