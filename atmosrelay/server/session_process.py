"""A session process: the SMTP sessions of the submission listeners, beside the owner.

Forked by the serve command before its event loop starts (server/workers.py), it waits for
the owner's hello: the listening sockets (passed as descriptors) once the owner has replayed
the journal and bound them. Then it serves them as the owner would (server/listeners.py,
server/session.py), with a context of its own (runtime.py, ``make_context``) whose queue is
the hand-off to the owner (server/handoff.py). What it keeps of its own:

* **The account store and the policy.** It opens the account store itself (SQLite, safe
  across processes) and keeps the policy's counters as any relay process does: add-only rows
  flushed every ``policy.counter_flush`` seconds and read back from the other processes
  (submission/counting.py), so a member's limits hold across the processes within what the
  others accepted since their last flush (docs/policy.md). It replays nothing: the owner
  recounts the journal at its start and flushes it.
* **Its share of the connection limits and of the in-flight budget.** ``max_connections``,
  ``max_connections_per_ip`` and ``inflight_budget`` are split between the processes (each
  takes its ceiling share), so together they hold to within one a process of the setting.
* **TLS and AUTH.** The certificate and key are read from disk, as the owner reads them
  (nothing secret crosses the socketpair); a reload (SIGHUP to the owner) is passed on.

Its metrics (refusals by code, TLS failures, the end-of-data-to-250 times, its sessions)
go to the owner once a second, and its log lines to the same standard error. It ignores
SIGINT and SIGTERM (a signal to the process group reaches the owner, which drains it) and
exits when the owner says DRAIN and its sessions are done, or at once when the owner is
gone.
"""

from __future__ import annotations

import collections
import logging
import math
import socket
import time
from collections.abc import Sequence
from functools import partial
from typing import Any, Final

import trio

from atmosrelay.accounts.store import Store
from atmosrelay.collector import keep_collector
from atmosrelay.config import Config
from atmosrelay.queue.state import QueueState
from atmosrelay.reload import Reloader
from atmosrelay.sections import ListenerMode
from atmosrelay.server.context import Budget, SessionContext
from atmosrelay.server.handoff import RemoteQueue
from atmosrelay.server.listeners import ConnectionLimits, serve_listener
from atmosrelay.server.tls import smtp_context
from atmosrelay.stream_io import StreamIO
from atmosrelay.submission.counting import CounterSync

log = logging.getLogger("atmosrelay.smtp")

STATS_EVERY: Final = 1.0  # seconds between the statistics sent to the owner


def share(limit: int, processes: int) -> int:
    """One process's share of ``limit``: the ceiling, so no share is 0."""
    return max(1, -(-limit // processes))


class Stats:
    """What /metrics says of this process's sessions, as deltas for the owner."""

    def __init__(
        self, ctx: SessionContext, limits: ConnectionLimits, counting: CounterSync
    ) -> None:
        self.ctx = ctx
        self.limits = limits
        self.counting = counting
        self.seconds: list[float] = []
        self._refused: collections.Counter[tuple[str, str]] = collections.Counter()
        self._tls = 0
        ctx.on_data_reply = self.seconds.append

    def take(self) -> dict[str, Any]:
        refused = self.ctx.pipeline.refused
        delta = refused - self._refused
        self._refused = collections.Counter(refused)
        tls, self._tls = self.ctx.tls_failures - self._tls, self.ctx.tls_failures
        seconds = self.seconds[:]
        self.seconds.clear()
        return {
            "refused": dict(delta),
            "tls_failures": tls,
            "data_reply": seconds,
            "sessions": self.limits.active,
            "counted": self.counting.flushed,  # its policy counts are in the store up to here
        }


async def serve(
    config: Config,
    link: socket.socket,
    listeners: Sequence[tuple[socket.socket, ListenerMode]],
    processes: int,
) -> None:
    """Serve ``listeners`` until the owner says DRAIN (or goes away)."""
    from atmosrelay.runtime import make_context  # the owner's module: after the fork

    tls_context, _ = await trio.to_thread.run_sync(smtp_context, config)
    store = await trio.to_thread.run_sync(Store, config.accounts_db)
    io = StreamIO(trio.SocketStream(trio.socket.from_stdlib_socket(link)))
    remote = RemoteQueue(io)
    try:
        ctx = make_context(config, store, remote, tls_context)
        remote.in_data = lambda: ctx.in_data
        ctx.on_first_data = remote.send_count  # the owner's journal waits for it too
        ctx.budget = Budget(share(config.smtp.inflight_budget, processes))
        limits = ConnectionLimits(
            share(config.smtp.max_connections, processes),
            share(config.smtp.max_connections_per_ip, processes),
        )
        # its counts go to the store, and the owner marks the journal (counting.py)
        relay = str(config.journal_dir.resolve())  # its owner's name in the store
        counting = CounterSync(ctx.store, ctx.pipeline.policy, "", on_shared=None, relay=relay)
        await trio.to_thread.run_sync(
            counting.load, QueueState(), time.time(), config.operator.domain.lower()
        )
        await _run(config, remote, ctx, limits, counting, listeners)
    finally:
        store.close()


async def _run(
    config: Config,
    remote: RemoteQueue,
    ctx: SessionContext,
    limits: ConnectionLimits,
    counting: CounterSync,
    listeners: Sequence[tuple[socket.socket, ListenerMode]],
) -> None:
    stats = Stats(ctx, limits, counting)
    drain = trio.Event()
    hurry = trio.Event()
    reloader = Reloader(config, ctx, lambda line: log.debug("session process: %s", line))

    async with trio.open_nursery() as services:

        def drained(now: bool) -> None:
            drain.set()
            if now:
                hurry.set()

        remote.on_drain = drained
        remote.on_reload = partial(services.start_soon, reloader.reload)

        async def link() -> None:
            await remote.run()
            if not drain.is_set():
                log.error("the relay's owner process is gone: this session process ends")
            services.cancel_scope.cancel()  # nothing can be accepted without the journal

        services.start_soon(remote.out.run)
        services.start_soon(link)
        await services.start(keep_collector)
        await services.start(ctx.keys.watch_revocations)
        await services.start(ctx.pipeline.actions.run)
        await services.start(counting.run, time.time)
        await services.start(ctx.watch)
        services.start_soon(_report, remote, stats)
        networks = config.smtp.trusted_networks
        trio_listeners = [
            (trio.SocketListener(trio.socket.from_stdlib_socket(s)), mode) for s, mode in listeners
        ]
        async with trio.open_nursery() as sessions:
            async with trio.open_nursery() as acceptors:
                for listener, mode in trio_listeners:
                    acceptors.start_soon(
                        serve_listener, listener, mode, ctx, sessions, limits, networks
                    )
                await drain.wait()
                acceptors.cancel_scope.cancel()
            for listener, _ in trio_listeners:
                await listener.aclose()
            ctx.request_shutdown()
            sessions.cancel_scope.deadline = trio.current_time() + config.smtp.shutdown_grace
            services.start_soon(_hurry, hurry, sessions.cancel_scope)
        # its counts in the store before its link closes (the owner's mark may pass them
        # then), and its last statistics written
        await counting.flush(time.time())
        remote.send_stats({**stats.take(), "final": True})
        await remote.out.finish()
        services.cancel_scope.cancel()


async def _hurry(hurry: trio.Event, scope: trio.CancelScope) -> None:
    await hurry.wait()
    scope.deadline = -math.inf


async def _report(remote: RemoteQueue, stats: Stats) -> None:
    while True:
        await trio.sleep(STATS_EVERY)
        remote.send_stats(stats.take())
