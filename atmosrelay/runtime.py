"""run_relay(config): startup order, the nursery tree, signals, drain.

    trio.run(run_relay)
    └── journal (recovery and the queue fold finish before anything listens; closes last)
        └── services: the API-key revocation watcher, the policy's writer and counter
            │         flush, the status index's writer, the compactor, the control socket,
            │         the sessions' watch (ends their waits at their deadlines)
            └── delivery: the dispatcher and its lanes (delivery/dispatcher.py, lane.py),
                │   and the delivery processes it carries attempts through (courier_link.py)
                └── sessions (one task per connection; a grace deadline on shutdown)
                    ├── the HTTP API (api/server.py: hypercorn's trio worker, started
                    │   with task_status, stopped with the acceptors, same grace)
                    └── acceptors (one per listener; cancelled first on shutdown)

Before the journal opens: the operator's DKIM key and the TLS certificate are generated if
missing, the account store and the status index are opened, and the delivery processes are
spawned (they get ready while the journal replays; the dispatcher takes them over); the
queue is then read from its checkpoint and the records written since, or folded from the
whole journal (queue/checkpoint.py); after that, the status index catches up with whatever
the journal holds that it lacks. With delivery on, a deep queue is read in two steps: the
dispatcher starts on a part known to be whole (the checkpoint's first part after a clean
stop, the never-tried messages of the journal's newest records after kill -9:
queue/window.py), and the rest is added while it delivers; everything else waits for the
whole queue.

Shutdown (SIGTERM, SIGINT, or ``RelayHandle.stop``): the listeners (SMTP and HTTP) close
first, so nothing new is accepted; sessions waiting for a command get 421 4.3.2, sessions
inside DATA finish their message (250 after fsync, or 421 at the deadline), HTTP requests in
hand finish; then the lanes stop taking work and finish the transactions in hand (until
``delivery.drain_grace``), and the delivery processes QUIT their connections and exit; then
the queue's checkpoint is written (when the state is exactly the journal's fold), and the
journal writes its closing mark and closes. Whatever was accepted is on disk, and the next
start folds it back into the queue and resumes delivering.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import ssl
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING

import attrs
import trio

from atmosrelay import systemd
from atmosrelay._files import lock_data_dir
from atmosrelay.accounts.api_keys import KeyChecker
from atmosrelay.accounts.dkim_keys import ensure_operator_key
from atmosrelay.accounts.store import AsyncStore, Store
from atmosrelay.api.metrics import RelayMetrics
from atmosrelay.collector import keep_collector
from atmosrelay.config import Config
from atmosrelay.control import control_handler, serve_control, socket_path
from atmosrelay.delivery.configured import make_couriers, make_dispatcher
from atmosrelay.delivery.courier_link import CourierLink
from atmosrelay.delivery.dispatcher import Dispatcher
from atmosrelay.delivery.forked import Forked
from atmosrelay.delivery.prepare import Preparer, load_or_create_secret
from atmosrelay.inbound import make_inbound
from atmosrelay.inbound.processor import InboundProcessor
from atmosrelay.policy.engine import Policy
from atmosrelay.queue.checkpoint import CHECKPOINT_NAME
from atmosrelay.queue.checkpoint import save as save_checkpoint
from atmosrelay.queue.state import QueuedMessage
from atmosrelay.queue.status import StatusIndex
from atmosrelay.queue.store import QueueStore
from atmosrelay.reload import Reloader, operator_key
from atmosrelay.replay import describe, progress_bar
from atmosrelay.sections import ListenerMode
from atmosrelay.server.context import Budget, SessionContext
from atmosrelay.server.listeners import ConnectionLimits, serve_listener
from atmosrelay.server.tls import smtp_context
from atmosrelay.server.workers import SessionProcesses
from atmosrelay.signals import Signals, watch_signals
from atmosrelay.smtp import Capabilities
from atmosrelay.submission import Pipeline
from atmosrelay.submission.actions import PolicyActions
from atmosrelay.submission.counting import CounterSync, recount
from atmosrelay.submission.members import MemberDirectory
from atmosrelay.submission.pipeline import Queue
from journal import FS, OsFS, open_journal

if TYPE_CHECKING:
    from atmosrelay.api.common import ApiContext

log = logging.getLogger("atmosrelay")


@attrs.define(eq=False)
class RelayHandle:
    """What a running relay exposes to its starter (tests, an embedding program)."""

    ctx: SessionContext
    addresses: list[tuple[str, int, ListenerMode]]  # (host, port, mode) actually listening
    dispatcher: Dispatcher | None = None  # None when delivery is disabled
    limits: ConnectionLimits | None = None  # the sessions open now, in all and per address
    http: list[tuple[str, int, bool]] = attrs.field(factory=list)  # (host, port, tls) of HTTP
    inbound: InboundProcessor | None = None  # what the inbound listener's mail becomes
    reloader: Reloader | None = None  # what SIGHUP calls (atmosrelay/reload.py)
    _stop: trio.Event = attrs.field(factory=trio.Event)

    def port(self, mode: str) -> int:
        return next(p for _, p, m in self.addresses if m == mode)

    @property
    def http_url(self) -> str:
        host, port, tls = self.http[0]
        return f"{'https' if tls else 'http'}://{host}:{port}"

    def stop(self) -> None:
        self._stop.set()


async def run_relay(
    config: Config,
    *,
    announce: Callable[[str], None] = print,
    fs: FS | None = None,
    handle_signals: bool = True,
    enforce_limits: bool = True,
    forked: Sequence[Forked] = (),
    session_processes: Sequence[Forked] = (),
    task_status: trio.TaskStatus[RelayHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until SIGTERM/SIGINT (or ``RelayHandle.stop()``), then shut down in order.
    ``enforce_limits=False`` is for one bench row only (bench/bench_accept.py); ``forked``:
    delivery processes the serve command forked before the event loop (delivery/forked.py);
    ``session_processes``: its session processes (server/workers.py).

    Raises ``journal.CorruptJournalError`` (before anything listens) when the journal holds
    damaged acknowledged records, and ``journal.JournalFatalError`` when the disk fails.
    """
    with await trio.to_thread.run_sync(lock_data_dir, config.data_dir):
        await _run(
            config,
            announce,
            fs,
            handle_signals,
            enforce_limits,
            (forked, session_processes),
            task_status,
        )


class ListenError(Exception):
    """A configured listener could not be opened (the port is taken, the address is not
    this host's, a port under 1024 without the right): the message says which and where."""

    def __init__(self, host: str, port: int, setting: str, error: OSError) -> None:
        reason = error.strerror or str(error)
        super().__init__(
            f"cannot listen on {host}:{port}: {reason}; another program may hold the port, "
            f"or change {setting}"
        )


async def _run(
    config: Config,
    announce: Callable[[str], None],
    fs: FS | None,
    handle_signals: bool,
    enforce_limits: bool,
    processes: tuple[Sequence[Forked], Sequence[Forked]],  # delivery's, the sessions'
    task_status: trio.TaskStatus[RelayHandle],
) -> None:
    forked, session_processes = processes
    directory = str(config.journal_dir)
    operator, created = await trio.to_thread.run_sync(
        ensure_operator_key, config.dkim_dir, config.operator.domain
    )
    if created:
        announce(
            f"generated the operator DKIM key for d={operator.domain}; publish "
            f"{operator.selector}._domainkey.{operator.domain} TXT "
            f'"v=DKIM1; k=rsa; p={operator.key.public_b64}"'
        )
    tls_context, warning = await trio.to_thread.run_sync(smtp_context, config)
    if warning:
        announce(f"warning: {warning}")
    unsubscribe_secret = await trio.to_thread.run_sync(
        load_or_create_secret, config.data_dir / "unsubscribe.key"
    )
    store = await trio.to_thread.run_sync(Store, config.accounts_db)
    status = await trio.to_thread.run_sync(
        partial(
            StatusIndex,
            config.status_db,
            retention=config.http.status_retention,
            idempotency_ttl=config.http.idempotency_ttl,
        )
    )
    couriers = make_couriers(config, fs, forked)
    try:
        if couriers is not None:  # spawned now, they get ready while the journal replays
            await couriers.spawn()
        async with open_journal(
            directory,
            fs=fs,
            segment_size=config.journal.segment_size,
            max_record_size=config.journal.max_record_size,
        ) as journal:
            announce(describe(directory, journal.recovery))
            checkpoint = str(config.data_dir / CHECKPOINT_NAME)
            queue = await QueueStore.recover(
                journal,
                progress_bar(journal.recovery.records),
                (fs or OsFS(), checkpoint),
                staged=config.delivery.enabled,  # delivery starts on the first part
            )
            queue.events.subscribe(status.on_event)
            metrics = RelayMetrics()
            journal.on_batch = metrics.on_batch
            queue.events.subscribe(metrics.on_event)
            dispatcher = None
            if config.delivery.enabled:
                if couriers is not None:
                    couriers.journal = journal
                dispatcher = make_dispatcher(
                    config, store, queue, operator, unsubscribe_secret, couriers
                )
            else:
                announce("delivery is disabled (delivery.enabled = false): mail is only queued")
            await _serve(
                config,
                announce,
                store,
                queue,
                tls_context,
                dispatcher,
                handle_signals,
                enforce_limits,
                task_status,
                _Extras(status, metrics, unsubscribe_secret, session_processes),
            )
            if not journal.poisoned:  # stopped cleanly: nothing appends any more
                announce(
                    await trio.to_thread.run_sync(
                        save_checkpoint, fs or OsFS(), checkpoint, queue.state, journal
                    )
                )
            announce(
                f"journal: {journal.appends} append(s) in {journal.batches} batch(es), "
                f"{journal.syncs} fsync(s) since start"
            )
    finally:
        if couriers is not None:
            await couriers.discard()  # spawned, never run: the start failed before delivery
        store.close()
        status.close()
    announce("journal closed; stopped")


async def _compactor(queue: QueueStore, status: StatusIndex, interval: float) -> None:
    """Keep disk use following the live queue: compact when enough of the sealed segments
    is dead. Each compaction is shielded: it is a sequence of journal steps best finished.
    The status index commits first: what compaction drops must already be in it."""
    while True:
        await trio.sleep(interval)
        if queue.compaction_due():
            try:
                await status.flush()
            except (sqlite3.Error, OSError) as exc:  # compact later, never lose history
                log.error("status index: commit failed (%s); compaction postponed", exc)
                continue
            with trio.CancelScope(shield=True):
                result = await queue.compact()
            log.info(
                "compacted: %d segment(s) removed, %d live record(s) copied forward",
                len(result.removed_segments),
                result.copied,
            )


def make_context(
    config: Config,
    store: Store,
    queue: Queue,
    tls_context: ssl.SSLContext,
    *,
    enforce_limits: bool = True,
) -> SessionContext:
    """Everything sessions share, from the config (also used by tests that drive sessions
    over memory streams). ``enforce_limits=False`` only for the bench row that measures
    what the limits cost; there is no config switch for it."""
    async_store = AsyncStore(store)
    keys = KeyChecker(async_store, config.auth)
    policy = Policy(config.policy)
    members = MemberDirectory(async_store, lambda: keys.generation)
    actions = PolicyActions(async_store, policy, members, keys.changed)
    actions.own_domain = config.operator.domain.lower()
    queue.events.subscribe(actions.on_event)
    pipeline = Pipeline(
        queue,
        members,
        policy,
        actions,
        operator_domain=config.operator.domain,
        hostname=config.smtp.hostname,
        max_recipients=config.smtp.max_recipients,
        max_message_size=config.smtp.max_message_size,
        enforce_limits=enforce_limits,
    )
    ctx = SessionContext(
        hostname=config.smtp.hostname,
        operator_domain=config.operator.domain,
        capabilities=Capabilities(size=config.smtp.max_message_size),
        tls_context=tls_context,
        keys=keys,
        store=async_store,
        queue=queue,
        pipeline=pipeline,
        budget=Budget(config.smtp.inflight_budget),
        idle_timeout=config.smtp.idle_timeout,
        data_timeout=config.smtp.data_timeout,
        min_data_rate=config.smtp.min_data_rate,
        max_session_time=config.smtp.max_session_time,
        auto_tls_window=config.smtp.auto_tls_window,
        max_recipients=config.smtp.max_recipients,
        trusted_did=config.smtp.trusted_did,
        group_wait=config.journal.group_wait,
    )
    queue.journal.gather = ctx.gather  # messages being read share a batch (server/context.py)
    return ctx


async def _serve(
    config: Config,
    announce: Callable[[str], None],
    store: Store,
    queue: QueueStore,
    tls_context: ssl.SSLContext,
    dispatcher: Dispatcher | None,
    handle_signals: bool,
    enforce_limits: bool,
    task_status: trio.TaskStatus[RelayHandle],
    extras: _Extras,
) -> None:
    ctx = make_context(config, store, queue, tls_context, enforce_limits=enforce_limits)
    ctx.on_data_reply = extras.metrics.data_reply_seconds.observe
    keys = ctx.keys
    workers = extras.workers = SessionProcesses(extras.session_processes, queue, ctx)
    counting = CounterSync(
        ctx.store,
        ctx.pipeline.policy,
        str(config.journal_dir.resolve()),
        on_shared=lambda: announce(
            "policy: another relay process adds to the account store's counters; its sends "
            "count against the limits here too"
        ),
    )
    if workers.forked:
        counting.counted_until = workers.handoff.counted_until
    ctx.inbound, extras.inbound = make_inbound(
        config,
        ctx,
        extras.status,
        extras.unsubscribe_secret,
        partial(_commit_policy, ctx, counting),
    )
    for host, port, mode in config.smtp.listeners:
        if mode is ListenerMode.TRUSTED and not ctx.trusted_did:
            raise ValueError(f"listener {host}:{port} is trusted but smtp.trusted_did is not set")
    pipeline = ctx.pipeline
    own_domain = config.operator.domain.lower()
    # counted before any message is tried; the start's later messages as they are added
    rows, replayed, mark = await trio.to_thread.run_sync(
        counting.load, queue.state, time.time(), own_domain
    )

    async def loaded(messages: list[QueuedMessage]) -> None:
        nonlocal replayed
        replayed += recount(pipeline.policy, messages, mark, own_domain)
        if dispatcher is not None:
            await dispatcher.loaded(messages)

    signals = Signals()
    async with trio.open_nursery() as services:
        if handle_signals:  # installed before "ready", so no signal can slip past it
            await services.start(watch_signals, signals, announce)
        async with trio.open_nursery() as delivery:
            # Delivery starts first: after a clean stop, on the queue checkpoint's first part,
            # while the rest is decoded (queue/checkpoint.py); after kill -9, on the newest
            # records' never-tried messages, while the rest is folded (queue/window.py).
            # The services and listeners below wait for the whole queue, as they always did.
            if dispatcher is not None:
                prepare = dispatcher.prepare
                if isinstance(prepare, Preparer):
                    prepare.generation = lambda: keys.generation
                    dispatcher.keys = lambda: (keys.generation, prepare.operator.selector)
                await delivery.start(dispatcher.run)
                if isinstance(dispatcher.carrier, CourierLink):  # started: all ready
                    pids = ", ".join(map(str, dispatcher.carrier.pids))
                    announce(f"delivery processes started (pid {pids})")
                queue.on_accept = dispatcher.notify
            if await queue.load_rest(loaded) and dispatcher is not None:
                dispatcher.all_loaded()
            announce(f"queue: {queue.restored} message(s) recovered{queue.recovered}")
            announce(
                f"policy: {rows} counter row(s) loaded, {replayed} message(s) recounted from "
                "the journal"
            )
            await services.start(keep_collector)  # no full collection stalls the sessions
            await services.start(keys.watch_revocations)
            await services.start(pipeline.actions.run)
            await services.start(counting.run, time.time)
            # its rebuild from the journal runs on while the relay starts (queue/status.py)
            await services.start(partial(extras.status.run, rebuild=queue.state, announce=announce))
            await services.start(extras.inbound.run)  # before the listeners: replays first
            services.start_soon(_compactor, queue, extras.status, config.journal.compact_interval)
            await services.start(
                serve_control, socket_path(config.data_dir), control_handler(queue, dispatcher)
            )
            await services.start(ctx.watch)  # ends the sessions' waits at their deadlines
            await _sessions(config, announce, ctx, signals, task_status, dispatcher, extras)
            if dispatcher is not None:
                grace = config.delivery.drain_grace
                announce(
                    f"deliveries: {len(dispatcher.in_flight)} recipient(s) in hand get "
                    f"{grace:g} s to finish; the rest stays queued"
                )
                dispatcher.drain(grace)
                signals.hurry.append(partial(dispatcher.drain, 0))
        services.cancel_scope.cancel()


async def _reload(reloader: Reloader, workers: SessionProcesses) -> bool:
    workers.reload()  # each session process reloads as this one does
    return await reloader.reload()


async def _commit_policy(ctx: SessionContext, counting: CounterSync) -> None:
    """The policy's writes queued so far, then its counters, on disk."""
    await ctx.pipeline.actions.settled()
    await counting.flush(time.time())


@attrs.define(eq=False)
class _Extras:
    """What the HTTP API needs beyond the sessions' context."""

    status: StatusIndex
    metrics: RelayMetrics
    unsubscribe_secret: bytes
    session_processes: Sequence[Forked] = ()  # forked, not yet handed the listeners
    workers: SessionProcesses | None = None  # the owner's side of them (server/workers.py)
    inbound: InboundProcessor | None = None  # set once the sessions' context exists
    listening: bool = False  # the SMTP listeners are up and not closing (/readyz)


def _problems(ctx: SessionContext, extras: _Extras) -> Callable[[], list[str]]:
    def problems() -> list[str]:
        found = []
        if ctx.queue.journal.poisoned:
            found.append("journal: a write or fsync failed; restart the relay")
        if ctx.pipeline.disk_full:
            found.append("journal: the disk is full")
        if not extras.listening:
            found.append("SMTP listeners are not up (starting or shutting down)")
        return found

    return problems


def api_context(
    config: Config, ctx: SessionContext, extras: _Extras, problems: Callable[[], list[str]]
) -> ApiContext:
    from atmosrelay.api.common import ApiContext  # (see _sessions)

    return ApiContext(
        relay=ctx,
        status=extras.status,
        metrics=extras.metrics,
        unsubscribe_secret=extras.unsubscribe_secret,
        problems=problems,
        max_body=config.http.max_body,
        request_timeout=config.http.request_timeout,
        idempotency_ttl=config.http.idempotency_ttl,
        trusted_proxies=config.http.trusted_proxies,
    )


def _http_tls(config: Config) -> ssl.SSLContext | None:
    if not any(tls for _, _, tls in config.http.listeners):
        return None
    context, _ = smtp_context(config)  # the same certificate as the SMTP listeners
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


async def _sessions(
    config: Config,
    announce: Callable[[str], None],
    ctx: SessionContext,
    signals: Signals,
    task_status: trio.TaskStatus[RelayHandle],
    dispatcher: Dispatcher | None,
    extras: _Extras,
) -> None:
    """Listen and serve sessions (and HTTP) until stopped; returns when they are done."""
    limits = ConnectionLimits(config.smtp.max_connections, config.smtp.max_connections_per_ip)
    extras.metrics.watch(ctx, ctx.pipeline.actions, lambda: limits, dispatcher, extras.inbound)
    networks = config.smtp.trusted_networks
    async with trio.open_nursery() as sessions:
        listeners: list[tuple[trio.SocketListener, ListenerMode]] = []
        for host, port, mode in config.smtp.listeners:
            try:
                opened = await trio.open_tcp_listeners(port, host=host)
            except OSError as exc:
                raise ListenError(host, port, "smtp.listeners", exc) from None
            listeners.extend((listener, mode) for listener in opened)
        addresses = []
        for listener, mode in listeners:
            host, port = listener.socket.getsockname()[:2]
            addresses.append((host, port, mode))
            announce(f"listening on {host}:{port} ({mode})")
        handle = RelayHandle(
            ctx, addresses, dispatcher, limits, inbound=extras.inbound, stop=signals.stop
        )
        reloader = handle.reloader = Reloader(config, ctx, announce)
        if dispatcher is not None and isinstance(dispatcher.prepare, Preparer):
            reloader.also.append(partial(operator_key, config, dispatcher.prepare))
        if config.http.listeners:
            # imported here: the HTTP stack (FastAPI) is a third of the relay's import time,
            # and a relay without HTTP listeners (or one restarting with a deep queue) need
            # not wait for it
            from atmosrelay.api.app import make_app
            from atmosrelay.api.server import BindError, serve_http

            api = api_context(config, ctx, extras, _problems(ctx, extras))
            api.stopping = handle._stop.is_set
            app = make_app(api)
            tls = await trio.to_thread.run_sync(_http_tls, config)
            reloader.http_tls = tls
            try:
                bound = await sessions.start(
                    partial(
                        serve_http,
                        app,
                        config.http.listeners,
                        tls,
                        grace=config.smtp.shutdown_grace,
                        read_timeout=config.http.request_timeout,
                        shutdown=handle._stop.wait,
                    )
                )
            except BindError as exc:
                raise ListenError(exc.host, exc.port, "http.listeners", exc.error) from None
            for host, port, use_tls in bound:
                handle.http.append((host, port, use_tls))
                announce(f"listening on {host}:{port} (http{'s' if use_tls else ''})")
        workers = extras.workers
        assert workers is not None  # made with the context (_serve)
        serve = partial(serve_listener, ctx=ctx, sessions=sessions, limits=limits)
        async with trio.open_nursery() as acceptors:
            await workers.start(
                listeners, partial(serve, trusted_networks=networks), acceptors, sessions
            )
            if workers.pids:
                announce(f"session processes started (pid {', '.join(map(str, workers.pids))})")
            signals.reload = partial(_reload, reloader, workers)
            extras.listening = True
            announce("ready; SIGTERM or Ctrl-C stops, SIGHUP reloads")
            systemd.notify("READY=1", f"STATUS=accepting mail on {len(addresses)} listener(s)")
            task_status.started(handle)
            await handle._stop.wait()
            systemd.notify("STOPPING=1", "STATUS=draining")
            extras.listening = False
            workers.drain()  # theirs close and their sessions finish, as ours below
            acceptors.cancel_scope.cancel()
        for listener, _ in listeners:
            await listener.aclose()
        grace, active = config.smtp.shutdown_grace, limits.active + ctx.sessions_elsewhere
        announce(f"listeners closed; {active} session(s) get {grace:g} s to finish")
        ctx.request_shutdown()
        sessions.cancel_scope.deadline = trio.current_time() + grace
        signals.hurry.append(partial(setattr, sessions.cancel_scope, "deadline", -math.inf))
        signals.hurry.append(partial(workers.drain, True))
