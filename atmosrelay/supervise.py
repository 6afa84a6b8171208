"""supervise(): the one place that catches Exception broadly.

A lane that crashes is a bug; the relay should not lose its other lanes over it, nor hide it.
``supervise`` runs a task body, logs a crash with its traceback, and restarts it, at most
``max_restarts`` times within ``window`` seconds (trio's clock); past that the exception
propagates to the parent nursery. ``trio.Cancelled`` and other BaseExceptions are never caught.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Awaitable, Callable
from typing import Final

import trio

log = logging.getLogger("atmosrelay.supervise")

RESTART_DELAY: Final = 1.0


async def supervise(
    name: str,
    body: Callable[[], Awaitable[None]],
    *,
    max_restarts: int = 5,
    window: float = 60.0,
) -> None:
    """Run ``body`` until it returns; restart it after a crash, within the bound."""
    crashes: collections.deque[float] = collections.deque()
    while True:
        try:
            await body()
            return
        except Exception:
            now = trio.current_time()
            crashes.append(now)
            while crashes and crashes[0] < now - window:
                crashes.popleft()
            if len(crashes) > max_restarts:
                log.critical("%s crashed %d times in %gs; giving up", name, len(crashes), window)
                raise
            log.exception("%s crashed; restarting (%d/%d)", name, len(crashes), max_restarts)
            await trio.sleep(RESTART_DELAY)
