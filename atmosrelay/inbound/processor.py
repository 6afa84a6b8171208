"""The inbound processor: from a durable INBOUND record to its effects, once.

One task (a child of the services nursery) takes each INBOUND record the listener made
durable, in order, and after a restart every one the journal holds without its DONE:

    1. logged already?  (the inbound log has its id: it was processed before a crash that
                         came before its DONE record) -> only the DONE record
    2. read the bytes back from the journal; parse them (reports.py, in a worker thread)
    3. per recipient kind, attribute and act:
         bounce       the VERP token names the message and the recipient (the queue, or
                      the status index once the journal forgot it); a DSN's failed
                      recipients -> ``Reported`` bounced, delayed -> ``Reported``
                      deferred; an ARF report sent there -> ``Complained``; a bounce
                      that is not a DSN (from <> or MAILER-DAEMON) -> bounced with the
                      status its text gives (5.0.0 when none)
         role         an ARF report -> ``Complained`` (attributed by the reported
                      message's VERP Return-Path, X-Atmos-Member-Did or Feedback-ID);
                      anything else is kept for the operator (and forwarded, if set)
         unsubscribe  the subject's DID, recipient and token verified -> suppressed for
                      that member, exactly as the one-click POST does
         reply        forwarded to the member domain's forward-to address, SRS sender
         srs          a bounce of a forwarded reply -> passed on to the original sender
       The events reach the policy (counts, suppression of hard bounces and complainants,
       the auto-pause), the status index and /metrics.
    4. the status index, the policy's writes (suppressions, pauses) and its counters are
       committed, then the inbound log row, then the INBOUND_DONE record (both records
       are then dead for compaction)

So a ``kill -9`` anywhere loses nothing that got 250: before step 4's row the record is
processed again; the events it repeats are idempotent where they land on disk (the status
index's attempt rows, suppressions) and the forwards have ids derived from the inbound id
(a forward already in the queue is not queued twice). What a repeat can do is count one
bounce or complaint twice in the rate counters, if the crash fell between their commit and
the row's (docs/inbound.md). A message that nothing here understands is logged as
"other" with its bytes kept, and counted; a failure of this code on one message is logged
and that message is marked done as "other", so one bad message never stops the rest.
"""

from __future__ import annotations

import collections
import email.utils
import hashlib
import hmac
import logging
import math
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import Final

import attrs
import trio

from atmosrelay._text import printable
from atmosrelay.accounts.inbound_log import InboundEntry
from atmosrelay.accounts.store import AsyncStore, NotFound
from atmosrelay.inbound.addresses import ReturnPath, Srs, parse_unsubscribe_subject
from atmosrelay.inbound.reports import Report, parse
from atmosrelay.logs import fields
from atmosrelay.message.headers import unsubscribe_token
from atmosrelay.policy.member import SuppressionSource
from atmosrelay.queue.events import Complained, Reported
from atmosrelay.queue.records import Accepted, Inbound, Recipient, RecipientState
from atmosrelay.queue.state import PendingInbound
from atmosrelay.queue.status import MessageStatus, StatusIndex
from atmosrelay.queue.store import QueueStore

log = logging.getLogger("atmosrelay.inbound")

KEEP_BYTES: Final = 256 * 1024  # of a role or unrecognised message, in the inbound log
MAX_HOPS: Final = 25  # Received fields past which a reply is not forwarded (a loop)
KINDS: Final = ("bounce", "delay", "complaint", "unsubscribe", "reply", "role", "other")
FORWARD_OF: Final = "atmos-forward-of"  # metadata of a forward's ACCEPTED record
_CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_DAEMONS: Final = ("mailer-daemon@", "postmaster@")


@attrs.frozen
class _About:
    """The message a report is about, and its member."""

    queue_id: str
    did: str
    sender: str
    recipients: tuple[str, ...]
    states: dict[str, str]

    @classmethod
    def of(cls, found: MessageStatus) -> _About:
        """From the status index's row (which also knows what earlier reports made of it)."""
        recipients = dict(found.recipients)
        return cls(found.id, found.did, found.sender, tuple(recipients), recipients)


@attrs.define
class _Outcome:
    kind: str = "other"
    summary: list[str] = attrs.field(factory=list)
    did: str | None = None
    queue_id: str | None = None
    recipient: str | None = None
    keep: bool = False  # keep the bytes in the log


def derived_id(inbound_id: str, purpose: str) -> str:
    """A queue id for something the processing of ``inbound_id`` queues: the same on every
    run (so a repeat after a crash finds it queued), sortable with the inbound id."""
    digest = int.from_bytes(hashlib.sha256(f"{inbound_id}/{purpose}".encode()).digest()[:10])
    return inbound_id[:10] + "".join(_CROCKFORD[(digest >> (5 * i)) & 31] for i in range(16))


class InboundProcessor:
    def __init__(
        self,
        queue: QueueStore,
        store: AsyncStore,
        status: StatusIndex,
        *,
        return_path: ReturnPath,
        srs: Srs,
        unsubscribe_secret: bytes,
        hostname: str,
        commit_policy: Callable[[], Awaitable[None]],
        members_changed: Callable[[], None],
        retention: float = 30 * 86400.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.queue = queue
        self.store = store
        self.status = status
        self.return_path = return_path
        self.srs = srs
        self.unsubscribe_secret = unsubscribe_secret
        self.hostname = hostname
        self.commit_policy = commit_policy
        self.members_changed = members_changed
        self.retention = retention
        self.clock = clock
        self.processed: collections.Counter[str] = collections.Counter()  # kind -> n
        self.unparseable = 0
        self.failed = 0
        self._send, self._receive = trio.open_memory_channel[str](math.inf)
        queue.on_inbound = self.notify

    def notify(self, inbound_id: str) -> None:
        self._send.send_nowait(inbound_id)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Process what a restart left unprocessed first, then say started (so the relay
        is "ready" only once every inbound message it ever answered 250 is applied), then
        each new one as the listener makes it durable."""
        for inbound_id in self.queue.pending_inbound():
            pending = self.queue.inbound_pending(inbound_id)
            if pending is not None:
                await self._process_safely(pending)
        task_status.started()
        next_prune = trio.current_time()
        async for inbound_id in self._receive:
            pending = self.queue.inbound_pending(inbound_id)
            if pending is None:
                continue
            await self._process_safely(pending)
            if trio.current_time() >= next_prune:
                next_prune = trio.current_time() + 3600
                try:
                    await self.store.run(
                        self.store.sync.prune_inbound, self.clock() - self.retention
                    )
                except (OSError, sqlite3.Error) as exc:  # the log grows an hour longer
                    log.error("inbound log: pruning failed (%s); will retry", exc)

    async def _process_safely(self, pending: PendingInbound) -> None:
        record = pending.record
        try:
            kind = await self.process(pending)
        except (trio.Cancelled, KeyboardInterrupt):
            raise
        except Exception:
            # a failure of this code (or of the disk) on one message: log it, keep it as
            # "other" and go on; the journal record stays if even that fails
            self.failed += 1
            log.exception("inbound %s: processing failed; logged as other", record.id)
            entry = self._entry(record, _Outcome(summary=["processing failed; see the log"]))
            try:
                await self.store.run(self.store.sync.add_inbound, entry)
                await self.queue.inbound_done(record.id, "other", self.clock())
            except Exception:
                log.exception("inbound %s: could not log it; it stays queued", record.id)
            return
        log.info(
            "inbound %s: %s",
            record.id,
            kind,
            extra=fields("inbound", queue_id=record.id, kind=kind),
        )

    async def process(self, pending: PendingInbound) -> str:
        record = pending.record
        if await self.store.run(self.store.sync.inbound_logged, record.id):
            await self.queue.inbound_done(record.id, "logged", self.clock())
            return "already logged"
        stored = await self.queue.journal.read(pending.position)
        raw = bytes(stored.payload[pending.body_offset :])
        report = await trio.to_thread.run_sync(parse, raw)
        if report.shape == "unparseable":
            self.unparseable += 1
        outcome = _Outcome()
        kinds = {r.kind for r in record.recipients}
        if "bounce" in kinds:
            await self._bounce(record, report, outcome)
        if "role" in kinds and outcome.kind == "other":
            await self._role(record, report, outcome)
        if "unsubscribe" in kinds and outcome.kind == "other":
            await self._unsubscribe(record, report, outcome)
        if "srs" in kinds:
            await self._srs(record, raw, outcome)
        if "reply" in kinds:
            await self._reply(record, raw, outcome)
        role_forward = {r.target for r in record.recipients if r.kind == "role" and r.target}
        if role_forward and outcome.kind in ("role", "other"):
            await self._forward(record, raw, "role", tuple(sorted(role_forward)), "")
            outcome.summary.append(f"forwarded to {', '.join(sorted(role_forward))}")
        if outcome.kind in ("role", "other"):
            outcome.keep = True
        # what the events changed is on disk before the row that says it is done
        await self.status.flush()
        await self.commit_policy()  # suppressions, pauses, and the counters
        await self.store.run(self.store.sync.add_inbound, self._entry(record, outcome, raw))
        await self.queue.inbound_done(record.id, outcome.kind, self.clock())
        self.processed[outcome.kind] += 1
        return f"{outcome.kind}: {'; '.join(outcome.summary)}"[:500]

    def _entry(self, record: Inbound, outcome: _Outcome, raw: bytes = b"") -> InboundEntry:
        return InboundEntry(
            id=record.id,
            received_at=record.received_at,
            kind=outcome.kind,
            did=outcome.did,
            queue_id=outcome.queue_id,
            recipient=outcome.recipient,
            sender=record.sender,
            rcpt=", ".join(r.addr for r in record.recipients),
            client_ip=record.client.get("ip"),
            summary=printable("; ".join(outcome.summary) or "-")[:1000],
            size=record.size,
            message=raw[:KEEP_BYTES] if outcome.keep and raw else None,
        )

    # -- attribution ---------------------------------------------------------------------------
    async def _about(self, queue_id: str) -> _About | None:
        """The message from the status index (which also knows what earlier reports made
        of it), else from the queue (an index that lost its file and was rebuilt)."""
        found = await self.status.get(queue_id)
        if found is not None and found.sender:
            return _About.of(found)
        msg = self.queue.state.messages.get(queue_id)
        if msg is None or not msg.record.sender:
            return None
        return _About(
            queue_id,
            msg.record.did,
            msg.record.sender,
            tuple(r.addr for r in msg.record.recipients),
            {k: str(v) for k, v in msg.recipient_states.items()},
        )

    async def _verp_about(self, target: str) -> tuple[_About | None, int]:
        queue_id, _, index = target.partition("-")
        return await self._about(queue_id), int(index or 0)

    async def _about_reported(self, report: Report) -> tuple[_About | None, int]:
        """The message an ARF report sent to a role address is about: the reported
        message's own VERP Return-Path first, then its X-Atmos-Member-Did / Feedback-ID
        (the member, and the sending domain from its From)."""
        for candidate in (report.about.get("return-path", ""), report.original_mail_from):
            _, addr = email.utils.parseaddr(candidate)
            local = addr.rpartition("@")[0]
            verified = self.return_path.verify(local) if local else None
            if verified is not None:
                return await self._about(verified[0]), verified[1]
        did = report.about.get("x-atmos-member-did", "").strip()
        if not did:
            did = await self._did_of_feedback_id(report.about.get("feedback-id", ""))
        if not did:
            return None, 0
        message_id = report.about.get("message-id", "").strip()
        found = await self.status.by_message_id(did, message_id) if message_id else None
        if found is not None and found.sender:  # the member's own message: its recipients
            return _About.of(found), 0
        sender = email.utils.parseaddr(report.about.get("from", ""))[1].lower()
        domain = sender.rpartition("@")[2]
        try:
            enrolled = await self.store.run(self.store.sync.domain, domain)
        except NotFound:
            return None, 0
        if enrolled.did != did:
            return None, 0  # a header that names a member for a domain not theirs
        # attributed by headers alone: counted, but with no message to check a complainant
        # against, nobody is suppressed on its word (docs/inbound.md)
        return _About("", did, sender, (), {}), 0

    async def _did_of_feedback_id(self, feedback_id: str) -> str:
        parts = feedback_id.strip().split(":")
        if len(parts) != 4 or not parts[1]:
            return ""
        for method in ("plc", "web"):
            did = f"did:{method}:{parts[1]}"
            try:
                await self.store.run(self.store.sync.member, did)
            except NotFound:
                continue
            return did
        return ""

    # -- kinds ------------------------------------------------------------------------------
    async def _bounce(self, record: Inbound, report: Report, outcome: _Outcome) -> None:
        for target in sorted({r.target for r in record.recipients if r.kind == "bounce"}):
            about, index = await self._verp_about(target)
            if about is None:
                outcome.summary.append(f"a report on {target.partition('-')[0]}, unknown here")
                continue
            outcome.did, outcome.queue_id = about.did, about.queue_id
            named = about.recipients[index - 1] if 0 < index <= len(about.recipients) else ""
            if report.shape == "arf":
                complainant = named or _complainant(report, about.recipients)
                self._complained(record, about, complainant, outcome)
            elif report.shape == "dsn":
                self._dsn(record, report, about, named, outcome)
            elif _from_daemon(record, report):
                if not named and len(about.recipients) == 1:
                    named = about.recipients[0]
                if not named:
                    outcome.summary.append("a bounce that names no recipient")
                    continue
                # an old MTA's text: delayed only if its status says so, else failed
                action = "delayed" if report.text_status.startswith("4") else "failed"
                state, status = _outcome_of(action, report.text_status)
                self._report(record, about, named, state, status, report.subject, None, outcome)
            else:
                outcome.summary.append(f"a reply to the return path of {about.queue_id}")

    def _dsn(
        self, record: Inbound, report: Report, about: _About, named: str, outcome: _Outcome
    ) -> None:
        ours = {r.lower(): r for r in about.recipients}
        for rr in report.recipients:
            recipient = ours.get(rr.recipient) or ours.get(rr.original) or named
            if not recipient and len(about.recipients) == 1:
                recipient = about.recipients[0]
            if not recipient:
                outcome.summary.append(f"a DSN for {rr.recipient}, not a recipient of ours")
                continue
            if rr.action not in _ACTIONS:
                outcome.summary.append(f"{rr.action or 'an unknown action'} for {recipient}")
                continue
            state, status = _outcome_of(rr.action, rr.status)
            self._report(
                record, about, recipient, state, status, rr.diagnostic, rr.remote_mta, outcome
            )

    def _report(
        self,
        record: Inbound,
        about: _About,
        recipient: str,
        state: str,
        status: str,
        reply: str | None,
        mta: str | None,
        outcome: _Outcome,
    ) -> None:
        outcome.recipient = recipient
        if state == "bounced":
            outcome.kind = "bounce"
        elif outcome.kind != "bounce":
            outcome.kind = "delay"
        if state == "bounced" and about.states.get(recipient) in (
            RecipientState.BOUNCED,
            RecipientState.SUPPRESSED,
        ):
            outcome.summary.append(f"{recipient} {status}, bounced here already")
            return
        outcome.summary.append(f"{recipient} {state} {status}")
        self.queue.events.publish(
            Reported(
                about.queue_id,
                about.did,
                about.sender,
                recipient,
                state,
                status,
                printable(reply or "")[:500] or None,
                mta or None,
                record.received_at,
            )
        )

    def _complained(
        self, record: Inbound, about: _About, complainant: str, outcome: _Outcome
    ) -> None:
        outcome.kind, outcome.did = "complaint", about.did
        outcome.queue_id = about.queue_id or None
        what = about.queue_id or "a message"
        if complainant:
            outcome.recipient = complainant
            outcome.summary.append(f"{complainant} reported {what} as spam")
        else:  # providers often redact the complainant: the rate still counts it
            outcome.summary.append(f"{what} reported as spam (complainant redacted)")
        self.queue.events.publish(
            Complained(
                about.did, about.sender, complainant, record.received_at, about.queue_id or None
            )
        )

    async def _role(self, record: Inbound, report: Report, outcome: _Outcome) -> None:
        if report.shape == "arf":
            about, index = await self._about_reported(report)
            if about is None:
                outcome.kind = "complaint"
                outcome.summary.append("a complaint about a message not attributable here")
                return
            named = about.recipients[index - 1] if 0 < index <= len(about.recipients) else ""
            self._complained(
                record, about, named or _complainant(report, about.recipients), outcome
            )
            return
        if report.shape == "unparseable":  # a report it means to be, and cannot be read
            outcome.summary.append(f"unparseable: {report.problem}")
            return
        outcome.kind = "role"
        outcome.summary.append(
            f"to {', '.join(r.addr for r in record.recipients if r.kind == 'role')}"
        )
        if report.subject:
            outcome.summary.append(f"subject {report.subject[:120]!r}")

    async def _unsubscribe(self, record: Inbound, report: Report, outcome: _Outcome) -> None:
        found = parse_unsubscribe_subject(report.subject)
        if found is None:
            outcome.summary.append("an unsubscribe request without a token")
            return
        did, recipient, token = found
        expected = unsubscribe_token(self.unsubscribe_secret, did, recipient)
        if not hmac.compare_digest(expected, token):
            outcome.summary.append("an unsubscribe request whose token does not verify")
            return
        outcome.kind, outcome.did, outcome.recipient = "unsubscribe", did, recipient
        try:
            await self.store.run(
                self.store.sync.suppress,
                did,
                recipient,
                SuppressionSource.UNSUBSCRIBE.value,
                "mailto unsubscribe",
            )
        except NotFound:
            outcome.summary.append(f"unsubscribe from {did}, a member no longer here")
            return
        self.members_changed()  # members are reloaded: bulk mail to them stops now
        outcome.summary.append(f"{recipient} unsubscribed from {did} (mailto)")

    async def _reply(self, record: Inbound, raw: bytes, outcome: _Outcome) -> None:
        replies = [r for r in record.recipients if r.kind == "reply"]
        did = replies[0].did
        targets = tuple(sorted({r.target for r in replies}))
        if outcome.kind == "other":
            outcome.kind, outcome.did = "reply", did
        if _hops(raw) > MAX_HOPS:
            outcome.kind = "other"
            outcome.summary.append(f"not forwarded: over {MAX_HOPS} Received fields (a loop?)")
            return
        await self._forward(record, raw, "reply", targets, did)
        outcome.summary.append(f"forwarded to {', '.join(targets)}")

    async def _srs(self, record: Inbound, raw: bytes, outcome: _Outcome) -> None:
        targets = tuple(sorted({r.target for r in record.recipients if r.kind == "srs"}))
        if record.sender:
            outcome.summary.append("mail to a forward's return path not from <>: dropped")
            return
        await self._forward(record, raw, "srs", targets, "")
        if outcome.kind == "other":
            outcome.kind = "bounce"
        outcome.summary.append(f"a forward's bounce passed on to {', '.join(targets)}")

    async def _forward(
        self, record: Inbound, raw: bytes, purpose: str, targets: tuple[str, ...], did: str
    ) -> None:
        """Queue ``raw`` to ``targets`` (once, whatever the repeats): an SRS sender for a
        reply or a role message, the null sender for a bounce passed on."""
        queue_id = derived_id(record.id, purpose)
        if queue_id in self.queue.state.messages:
            return
        sender = self.srs.forward(record.sender) if record.sender else ""
        stamp = (
            f"Received: from {printable(str(record.client.get('helo') or 'unknown'))[:100]} "
            f"([{record.client.get('ip') or 'unknown'}]) by {self.hostname} with ESMTP id "
            f"{record.id}; {email.utils.formatdate(record.received_at, usegmt=True)}\r\n"
        ).encode()
        message = stamp + raw
        accepted = Accepted(
            id=queue_id,
            accepted_at=self.clock(),
            did=did,
            sender=sender,
            recipients=tuple(Recipient(t) for t in targets),
            ret=None,
            envid=None,
            category="transactional",
            bulk=False,
            tags=(),
            metadata={FORWARD_OF: record.id},
            client=dict(record.client),
            size=len(message),
        )
        await self.queue.accept(accepted, message)


# a DSN action -> (the outcome it reports, the status class it must carry, the status when
# it carries none of that class)
_ACTIONS: Final = {"failed": ("bounced", "5", "5.0.0"), "delayed": ("deferred", "4", "4.0.0")}


def _outcome_of(action: str, status: str) -> tuple[str, str]:
    state, klass, default = _ACTIONS[action]
    return state, status if status.startswith(klass) else default


def _complainant(report: Report, recipients: tuple[str, ...]) -> str:
    """Who complained, and only ever one of the reported message's own recipients: the
    report's Original-Rcpt-To, else its To (providers redact both with placeholders, which
    must not be suppressed), else the message's only recipient. "" when none holds: a
    report cannot make the relay suppress an address the member never sent to."""
    ours = {r.lower(): r for r in recipients}
    for named in report.original_rcpt_to:
        if named in ours:
            return ours[named]
    to = email.utils.getaddresses([report.about.get("to", "")])
    if len(to) == 1 and to[0][1].lower() in ours:
        return ours[to[0][1].lower()]
    return recipients[0] if len(recipients) == 1 else ""


def _from_daemon(record: Inbound, report: Report) -> bool:
    """A bounce that is not a DSN: from the null sender, or from a mailer daemon."""
    return not record.sender or report.from_address.startswith(_DAEMONS)


def _hops(raw: bytes) -> int:
    head = raw.split(b"\r\n\r\n", 1)[0]
    return head.lower().count(b"\nreceived:") + head[:9].lower().startswith(b"received:")
