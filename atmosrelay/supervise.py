"""supervise(): the one place that catches Exception broadly.

A lane that crashes is a bug; the relay should not lose its other lanes over it, nor hide it.
``supervise`` runs a task body, logs a crash with its traceback, and restarts it, at most
``max_restarts`` times within ``window`` seconds (trio's clock); past that it raises
``GaveUp`` (the last crash as its ``__cause__``), a specific exception the caller decides
about: the dispatcher parks that destination (delivery/lane.py); a caller that cannot
go on without the task lets it propagate. ``trio.Cancelled`` and other BaseExceptions are
never caught.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Awaitable, Callable
from typing import Final

import trio

log = logging.getLogger("atmosrelay.supervise")

RESTART_DELAY: Final = 1.0


class GaveUp(Exception):
    """``supervise`` stopped restarting a task that kept crashing."""

    def __init__(self, name: str, crashes: int, window: float) -> None:
        super().__init__(f"{name} crashed {crashes} times in {window:g}s")
        self.name = name
        self.crashes = crashes
        self.window = window


async def supervise(
    name: str,
    body: Callable[[], Awaitable[None]],
    *,
    max_restarts: int = 5,
    window: float = 60.0,
    crashes: collections.deque[float] | None = None,
) -> None:
    """Run ``body`` until it returns; restart it after a crash, within the bound. Raises
    GaveUp past the bound.

    ``crashes``: the times of crashes counted against the bound. Pass one deque to several
    tasks that share a fate (the workers of one lane come and go with the work, so each
    alone would rarely see a second crash) and their crashes count together."""
    if crashes is None:
        crashes = collections.deque()
    while True:
        try:
            await body()
            return
        except Exception as crash:
            now = trio.current_time()
            crashes.append(now)
            while crashes and crashes[0] < now - window:
                crashes.popleft()
            if len(crashes) > max_restarts:
                log.critical("%s crashed %d times in %gs; giving up", name, len(crashes), window)
                raise GaveUp(name, len(crashes), window) from crash
            log.exception("%s crashed; restarting (%d/%d)", name, len(crashes), max_restarts)
            await trio.sleep(RESTART_DELAY)
