"""The relay's signals: SIGTERM/SIGINT start the graceful drain (a second one ends it at
once), SIGHUP reloads (atmosrelay/reload.py). The watcher is installed before the relay says
"ready", so no signal slips past it, and lives until the relay has stopped."""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from typing import Final

import attrs
import trio

SHUTDOWN_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)


@attrs.define(eq=False)
class Signals:
    """What the signal watcher acts on; filled in as the relay comes up and goes down."""

    stop: trio.Event = attrs.field(factory=trio.Event)  # the RelayHandle's stop
    reload: Callable[[], Awaitable[bool]] | None = None  # set once the listeners exist
    hurry: list[Callable[[], None]] = attrs.field(factory=list)  # cut each drain short


async def watch_signals(
    signals: Signals,
    announce: Callable[[str], None],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """SIGHUP reloads (atmosrelay/reload.py); the first SIGTERM/SIGINT starts the graceful
    drain, a second one cuts what is left of it short (what is unfinished stays queued)."""
    with trio.open_signal_receiver(*SHUTDOWN_SIGNALS, signal.SIGHUP) as received:
        task_status.started()
        async for signum in received:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                if signals.stop.is_set() or signals.reload is None:
                    announce("SIGHUP ignored: the relay is starting or stopping")
                else:
                    await signals.reload()
            elif not signals.stop.is_set():
                announce(f"{name} received; shutting down (again to stop without waiting)")
                signals.stop.set()
            else:
                announce(f"{name} received again; ending the drain now, the rest stays queued")
                for hurry in signals.hurry:
                    hurry()
