"""``GET /metrics``: Prometheus text, through ``prometheus-client``.

One registry per relay (never the library's global one: a test process runs many relays).
Most figures are read at scrape time from counters the relay keeps anyway (the pipeline's
accepted and refused, the journal's appends, batches and fsyncs, the queue's state, the
lanes, the sessions), so the hot paths pay nothing for them. Two are observed as they
happen: the journal's batch latency (write + fsync, a histogram fed from the writer
thread) and delivery outcomes (from the queue's events).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator

import attrs
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from atmosrelay.delivery.dispatcher import Dispatcher
from atmosrelay.inbound.processor import KINDS, InboundProcessor
from atmosrelay.queue.events import AttemptOutcome, QueueEvent
from atmosrelay.queue.store import QueueStore
from atmosrelay.server.context import SessionContext
from atmosrelay.server.listeners import ConnectionLimits
from atmosrelay.submission.actions import PolicyActions

BATCH_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# fine around the 20 ms a p99 should stay under (bench/bench_accept.py reads these)
DATA_REPLY_BUCKETS = (
    0.001,
    0.002,
    0.005,
    0.0075,
    0.01,
    0.0125,
    0.015,
    0.0175,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)


class RelayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.batch_seconds = Histogram(
            "atmosrelay_journal_batch_seconds",
            "Seconds a journal batch took to write and fsync",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "atmosrelay_journal_batch_records",
            "Records per journal batch (one fsync each)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.data_reply_seconds = Histogram(
            "atmosrelay_smtp_data_reply_seconds",
            "Seconds from a message's end of data to its reply written (250 or refusal)",
            buckets=DATA_REPLY_BUCKETS,
            registry=self.registry,
        )
        self.deliveries = Counter(
            "atmosrelay_delivery_outcomes",
            "Delivery outcomes per recipient and attempt",
            ["outcome"],
            registry=self.registry,
        )
        self.http_requests = Counter(
            "atmosrelay_http_requests",
            "HTTP requests answered, by route and status",
            ["route", "status"],
            registry=self.registry,
        )

    def on_batch(self, records: int, seconds: float) -> None:
        """The journal's hook (writer thread): prometheus-client's metrics are thread-safe."""
        self.batch_seconds.observe(seconds)
        self.batch_size.observe(records)

    def on_event(self, event: QueueEvent) -> None:
        if isinstance(event, AttemptOutcome):
            self.deliveries.labels(event.outcome.outcome.value).inc()

    def watch(
        self,
        ctx: SessionContext,
        actions: PolicyActions,
        limits: Callable[[], ConnectionLimits | None],
        dispatcher: Dispatcher | None,
        inbound: InboundProcessor | None = None,
    ) -> None:
        self.registry.register(_Relay(ctx, actions, limits, dispatcher, inbound))


@attrs.frozen
class _Relay(Collector):
    """The figures read at scrape time."""

    ctx: SessionContext
    actions: PolicyActions
    limits: Callable[[], ConnectionLimits | None]
    dispatcher: Dispatcher | None
    inbound: InboundProcessor | None = None

    def describe(self) -> list[Metric]:
        return []  # collected on each scrape only

    def collect(self) -> Iterator[Metric]:
        pipeline, queue = self.ctx.pipeline, self.ctx.queue
        assert isinstance(queue, QueueStore)  # the owner's context: the queue itself
        accepted = CounterMetricFamily(
            "atmosrelay_messages_accepted", "Messages accepted (fsynced)", labels=["via"]
        )
        for via in ("smtp", "http"):
            accepted.add_metric([via], pipeline.accepted[via])
        yield accepted
        refused = CounterMetricFamily(
            "atmosrelay_messages_refused",
            "Refusals by code (docs/policy.md) and way in",
            labels=["code", "via"],
        )
        for (code, via), n in sorted(pipeline.refused.items()):
            refused.add_metric([code, via], n)
        yield refused
        rules = CounterMetricFamily(
            "atmosrelay_policy_rule_hits", "Policy rules that fired", labels=["rule"]
        )
        for rule, n in sorted(self.actions.hits.items()):
            rules.add_metric([rule], n)
        yield rules
        yield from _journal(queue)
        yield _depth(queue)
        limits = self.limits()
        here = limits.active if limits else 0
        yield GaugeMetricFamily(
            "atmosrelay_smtp_sessions",
            "SMTP sessions open",
            value=here + self.ctx.sessions_elsewhere,  # the session processes' too
        )
        yield CounterMetricFamily(
            "atmosrelay_tls_handshakes_failed",
            "TLS handshakes that failed or timed out",
            value=self.ctx.tls_failures,
        )
        if self.inbound is not None:
            yield from _inbound(self.ctx, self.inbound)
        if self.dispatcher is not None:
            dispatcher = self.dispatcher
            yield GaugeMetricFamily(
                "atmosrelay_delivery_lanes",
                "Delivery lanes (destinations)",
                value=len(dispatcher.lanes),
            )
            yield GaugeMetricFamily(
                "atmosrelay_delivery_lanes_parked",
                "Lanes parked after a destination failed",
                value=len(dispatcher.parked()),
            )
            yield GaugeMetricFamily(
                "atmosrelay_deliveries_in_flight",
                "Recipients being delivered now",
                value=len(self.dispatcher.in_flight),
            )


def _inbound(ctx: SessionContext, processor: InboundProcessor) -> Iterator[Metric]:
    settings = ctx.inbound
    yield CounterMetricFamily(
        "atmosrelay_inbound_received",
        "Messages the inbound listener accepted (fsynced)",
        value=settings.received if settings is not None else 0,
    )
    yield CounterMetricFamily(
        "atmosrelay_inbound_recipients_refused",
        "RCPTs the inbound listener refused as not its own (550 5.1.1)",
        value=settings.refused_rcpt if settings is not None else 0,
    )
    processed = CounterMetricFamily(
        "atmosrelay_inbound_processed",
        "Inbound messages processed, by what they were (docs/inbound.md)",
        labels=["kind"],
    )
    for kind in KINDS:
        processed.add_metric([kind], processor.processed[kind])
    yield processed
    yield CounterMetricFamily(
        "atmosrelay_inbound_unparseable",
        "Inbound messages the parser could not read (kept in the inbound log)",
        value=processor.unparseable,
    )


def _journal(queue: QueueStore) -> Iterator[Metric]:
    journal = queue.journal
    yield CounterMetricFamily(
        "atmosrelay_journal_appends", "Records appended to the journal", value=journal.appends
    )
    yield CounterMetricFamily(
        "atmosrelay_journal_batches", "Journal batches written", value=journal.batches
    )
    yield CounterMetricFamily(
        "atmosrelay_journal_fsyncs", "File fsyncs of the journal", value=journal.syncs
    )
    yield GaugeMetricFamily(
        "atmosrelay_journal_poisoned",
        "1 once a write or fsync failed (restart the relay)",
        value=int(journal.poisoned),
    )


def _depth(queue: QueueStore) -> Metric:
    states: collections.Counter[str] = collections.Counter()
    for msg in queue.state.messages.values():
        states.update(s.value for s in msg.recipient_states.values())
    depth = GaugeMetricFamily(
        "atmosrelay_queue_recipients",
        "Recipients of the messages the journal holds, by state",
        labels=["state"],
    )
    for state in ("accepted", "deferred", "sent", "bounced", "suppressed"):
        depth.add_metric([state], states[state])
    return depth
