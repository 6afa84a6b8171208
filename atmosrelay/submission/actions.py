"""What the policy decides to write to the account store, and the queue events that feed it.

    a rule fired (spray, velocity)      -> the member gets the rule's label, logged with figures
    a hard bounce (5.1.1, 5.1.2, ...)   -> the recipient is suppressed for the member (a
                                           remote's later DSN, ``Reported``, counts alike)
    a complaint                         -> likewise, with the source "complaint"
    a domain over its bounce or
    complaint threshold                 -> the domain is paused (DOMAIN_PAUSED), logged

Writes go through one task (``run``) in the store's worker thread, in order; each one then
moves the account store's generation on, so sessions and the member directory see it at
their next MAIL. Until the write lands, the in-memory view already refuses: a paused domain
is held in ``paused_now`` and checked by the pipeline, so a burst of mail does not slip in
behind the bounce that tripped the threshold.
"""

from __future__ import annotations

import collections
import logging
import math
import sqlite3
from collections.abc import Callable
from functools import partial
from typing import Final

import attrs
import trio

from atmosrelay._text import printable
from atmosrelay.accounts.store import AsyncStore, NotFound, Store
from atmosrelay.logs import fields
from atmosrelay.policy.engine import Policy
from atmosrelay.policy.member import SuppressionSource
from atmosrelay.policy.rules import RuleHit
from atmosrelay.queue.events import Bounced, Complained, Delivered, QueueEvent, Reported
from atmosrelay.queue.state import domain_of
from atmosrelay.submission.members import MemberDirectory

log = logging.getLogger("atmosrelay.policy")

# Permanent failures that say the address itself is bad (RFC 3463): bad mailbox (5.1.1),
# bad system (5.1.2), bad syntax (5.1.3), moved (5.1.6), null MX (5.1.10).
HARD_BOUNCES: Final = frozenset({"5.1.1", "5.1.2", "5.1.3", "5.1.6", "5.1.10"})


class PolicyActions:
    def __init__(
        self,
        store: AsyncStore,
        policy: Policy,
        members: MemberDirectory,
        bump_generation: Callable[[], None],
    ) -> None:
        self.store = store
        self.policy = policy
        self.members = members
        self.bump_generation = bump_generation
        self.paused_now: dict[str, str] = {}  # domain -> reason, before the store has it
        self._labelled: set[tuple[str, str]] = set()  # (did, label) written or on the way
        self._send, self._receive = trio.open_memory_channel[_Write](math.inf)
        self.queued = 0  # writes asked for
        self.written = 0  # writes landed (tests wait on it)
        self._progress = trio.Event()  # set (and replaced) as each write lands
        self.hits: collections.Counter[str] = collections.Counter()  # rule -> times (/metrics)
        # the operator's domain: mail from it (a forwarded reply's SRS sender) is the
        # relay's own, counted against no member
        self.own_domain = ""

    # -- decisions, called synchronously --------------------------------------------------
    def rule_hits(self, did: str, hits: list[RuleHit]) -> None:
        for hit in hits:
            self.hits[hit.rule] += 1
            if not hit.label:  # a shadow label's "would have": logged, never enforced
                log.info("%s for %s: %s", hit.rule, did, hit.detail)
                continue
            if (did, hit.label) in self._labelled:
                continue  # on its way to the store: sessions have not reloaded the member yet
            self._labelled.add((did, hit.label))
            log.warning(
                "rule %s fired for %s: %s; label %s added",
                hit.rule,
                did,
                hit.detail,
                hit.label,
                extra=fields("label", did=did, rule=hit.rule, label=hit.label),
            )
            self._write(
                f"label {hit.label} for {did}",
                partial(_add_label, self.store.sync, did, hit.label),
                # landed: the member's snapshot carries it now (an operator may remove it, and
                # the rule may then fire again)
                partial(self._labelled.discard, (did, hit.label)),
            )

    def on_event(self, event: QueueEvent) -> None:
        """The queue-event subscriber (queue/events.py). A DSN's own outcomes (null
        sender) count against nobody, nor does the relay's own mail (forwards)."""
        sender = getattr(event, "sender", "")
        if sender and domain_of(sender) == self.own_domain:
            return
        if isinstance(event, Delivered) and event.sender:
            self._maybe_pause(
                event.did, event.sender, self.policy.delivered(event.sender, event.at), event.at
            )
        elif isinstance(event, Bounced | Reported) and event.sender:
            if isinstance(event, Reported) and event.outcome != "bounced":
                return  # a remote's delay report: nothing to count
            reason = self.policy.bounced(event.sender, event.at)
            if event.status in HARD_BOUNCES:
                detail = f"{event.status} {printable(event.reply or '')}"[:300]
                self._suppress(event.did, event.recipient, SuppressionSource.HARD_BOUNCE, detail)
            self._maybe_pause(event.did, event.sender, reason, event.at)
        elif isinstance(event, Complained) and event.sender:
            reason = self.policy.complained(event.sender, event.at)
            if event.recipient:  # a report that redacted the complainant still counts
                self._suppress(
                    event.did, event.recipient, SuppressionSource.COMPLAINT, "reported as spam"
                )
            self._maybe_pause(event.did, event.sender, reason, event.at)

    def _suppress(self, did: str, address: str, source: SuppressionSource, detail: str) -> None:
        self._write(
            f"suppress a recipient for {did} ({source.value})",
            partial(self.store.sync.suppress, did, address, source.value, detail),
        )

    def _maybe_pause(self, did: str, sender: str, reason: str | None, at: float) -> None:
        domain = domain_of(sender)
        if reason is None or domain in self.paused_now:
            return
        self.paused_now[domain] = reason
        self.hits["domain_pause"] += 1
        self.policy.fresh_since[domain] = at  # an unpause starts afresh
        log.warning(
            "domain %s of %s paused: %s",
            domain,
            did,
            reason,
            extra=fields("domain-paused", did=did, domain=domain),
        )
        self._write(
            f"pause {domain}",
            partial(_pause, self.store.sync, domain, reason),
            partial(self.paused_now.pop, domain, None),  # the store has it now
        )

    def _write(
        self, what: str, fn: Callable[[], object], after: Callable[[], object] | None = None
    ) -> None:
        self.queued += 1
        self._send.send_nowait(_Write(what, fn, after))

    async def settled(self) -> None:
        """Return once every write queued before the call has landed (or failed, logged):
        the inbound processor marks a report done only after what it caused is on disk."""
        target = self.queued
        while self.written < target:
            await self._progress.wait()

    # -- the writer task ------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for write in self._receive:
            try:
                await self.store.run(write.fn)
            except NotFound:
                log.info("policy write skipped (%s): the member or domain is gone", write.what)
            except (OSError, sqlite3.Error):
                # the disk failed: the relay goes on without this write (a pause it was for
                # stays in force in memory, since ``after`` does not run)
                log.exception("policy write failed (%s); it is lost", write.what)
                self._landed()
                continue
            self.members.invalidate()
            self.bump_generation()
            if write.after is not None:
                write.after()
            self._landed()

    def _landed(self) -> None:
        self.written += 1
        self._progress.set()
        self._progress = trio.Event()


@attrs.frozen
class _Write:
    what: str
    fn: Callable[[], object]
    after: Callable[[], object] | None = None


def _add_label(store: Store, did: str, label: str) -> None:
    store.set_label(did, label, True)


def _pause(store: Store, domain: str, reason: str) -> None:
    """Pause, unless it is already (deliveries still in flight when the pause came keep
    reporting): the first pause's time and reason stay."""
    if store.domain(domain).paused_reason is None:
        store.set_paused(domain, reason)
