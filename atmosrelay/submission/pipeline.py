"""The acceptance pipeline: one set of rules for every way in.

    check_mail(member, sender domain)     at MAIL: member suspended? domain verified, not
                                          paused? room for one more recipient?
    check_rcpt(member, address, count)    at RCPT: suppressed whatever the category? room
                                          for this recipient besides those before it?
    submit(submission)                    the whole acceptance, in this order:
        member and sender again (the account may have changed since MAIL), recipients
        (count, suppression), the bytes (NUL, 8-bit), header processing, header From and
        Sender against the member's domains, unsubscribed recipients of bulk mail
        (recorded as suppressed, never delivered; all of them: ALL_SUPPRESSED), the limits
        (checked and counted at once), the ACCEPTED record through the journal's group
        commit -> ``Queued`` once it is durable, or a ``Refusal``.

SMTP runs the first two early so a client learns at once; ``submit`` repeats them because
HTTP has no MAIL or RCPT, and because nothing between MAIL and the end of DATA may slip a
message past a change. Every outcome is a value: a refusal carries its code, its SMTP reply,
its HTTP status, whether to retry and when (atmosrelay/refusals.py).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Protocol

import attrs
from msgspec.structs import replace

from atmosrelay.message.headers import MessageError, check_octets, process
from atmosrelay.policy.engine import Policy
from atmosrelay.policy.member import MemberSnapshot
from atmosrelay.policy.sender import (
    check_header_addresses,
    check_member,
    check_recipient,
    check_sender_domain,
    unsubscribed,
)
from atmosrelay.queue.events import EventFeed
from atmosrelay.queue.records import Accepted, Idempotency, Recipient, new_queue_id
from atmosrelay.refusals import Code, Refusal, refuse
from atmosrelay.submission.actions import PolicyActions
from atmosrelay.submission.members import MemberDirectory
from journal import JournalError, JournalFullError


class Journaling(Protocol):
    """What sessions ask of the journal behind ``Queue``: its writer's ``gather`` (set by
    the relay), ``gathered`` and whether it is poisoned."""

    gather: Callable[[], float] | None

    @property
    def poisoned(self) -> bool: ...

    def gathered(self) -> None: ...


class Queue(Protocol):
    """Where accepted messages go: the queue itself (``QueueStore``), or in a session
    process, the hand-off to the process that owns it (server/handoff.py)."""

    @property
    def journal(self) -> Journaling: ...

    @property
    def events(self) -> EventFeed: ...

    async def accept(
        self, record: Accepted, message: bytes, then: Callable[[], None] | None = None
    ) -> object: ...


@attrs.frozen
class Envelope:
    sender: str  # the reverse-path as given (never null for a submission)
    sender_domain: str  # its domain, ASCII (IDNA) and lower case
    recipients: tuple[Recipient, ...]
    ret: str | None = None
    envid: str | None = None
    smtputf8: bool = False
    eight_bit: bool = False


@attrs.frozen
class Submission:
    did: str
    envelope: Envelope
    data: bytes
    client: dict[str, str | None] = attrs.field(factory=dict)
    idempotency: tuple[str, str] | None = None  # HTTP: (Idempotency-Key, request digest)
    # Called with the queue id on the event loop the moment the message is durable and
    # queued, before the submitting task resumes (queue/store.py, ``accept``): SMTP's 250
    durable: Callable[[str], None] | None = None


@attrs.frozen
class Queued:
    record: Accepted  # durable: the journal's fsync covered it
    rejected: tuple[tuple[str, Refusal], ...] = ()  # recipients refused (HTTP reports them)

    @property
    def suppressed(self) -> tuple[str, ...]:
        """Recipients kept in the record but never delivered (unsubscribed from bulk)."""
        return tuple(r.addr for r in self.record.recipients if r.suppressed)


@attrs.define(eq=False)
class Pipeline:
    queue: Queue
    members: MemberDirectory
    policy: Policy
    actions: PolicyActions
    operator_domain: str
    hostname: str
    max_recipients: int = 100
    max_message_size: int = 52428800
    enforce_limits: bool = True  # False only in the bench row measuring the policy's cost
    clock: Callable[[], float] = time.time  # wall clock: it goes into records and headers
    # What /metrics reports: messages accepted by way in, refusals by (code, way in).
    accepted: collections.Counter[str] = attrs.field(factory=collections.Counter)
    refused: collections.Counter[tuple[str, str]] = attrs.field(factory=collections.Counter)
    disk_full: bool = False  # the last append found the journal's disk full (/readyz)

    async def member(self, did: str) -> MemberSnapshot | None:
        return await self.members.get(did)

    def check_mail(self, member: MemberSnapshot, sender_domain: str) -> Refusal | None:
        refusal = check_member(member) or self._check_domain(member, sender_domain)
        if refusal is None and self.enforce_limits:
            refusal = self.policy.check_rate(member, self.clock(), 1)
        if refusal is not None:
            self.refused[refusal.code.value, "smtp"] += 1
        return refusal

    def check_rcpt(self, member: MemberSnapshot, address: str, before: int) -> Refusal | None:
        """``before``: recipients this transaction already has."""
        refusal = check_recipient(member, address)
        if refusal is None and self.enforce_limits:
            refusal = self.policy.check_rate(member, self.clock(), 1, pending=before)
        if refusal is not None:
            self.refused[refusal.code.value, "smtp"] += 1
        return refusal

    def _check_domain(self, member: MemberSnapshot, domain: str) -> Refusal | None:
        reason = self.actions.paused_now.get(domain.lower())
        if reason is not None and domain.lower() in member.verified:
            return refuse(
                Code.DOMAIN_PAUSED,
                log=f"domain {domain} paused: {reason}",
                domain=domain,
                reason=reason,
            )
        return check_sender_domain(member, domain)

    async def submit(self, sub: Submission) -> Queued | Refusal:
        result = await self._submit(sub)
        via = sub.client.get("via") or "smtp"
        if isinstance(result, Refusal):
            self.refused[result.code.value, via] += 1
        else:
            self.accepted[via] += 1
        return result

    async def _submit(self, sub: Submission) -> Queued | Refusal:
        member = await self.members.get(sub.did)
        if member is None:
            return refuse(Code.AUTH_FAILED, log="member removed")
        env = sub.envelope
        refusal = check_member(member) or self._check_domain(member, env.sender_domain)
        if refusal is not None:
            return refusal
        if not env.recipients:
            return refuse(Code.INVALID_REQUEST, log="no recipients", detail="no recipients")
        if len(env.recipients) > self.max_recipients:
            return refuse(Code.TOO_MANY_RECIPIENTS, log=f"{len(env.recipients)} recipients")
        if len(sub.data) > self.max_message_size:
            return refuse(Code.MESSAGE_TOO_LARGE, log=f"{len(sub.data)} bytes")
        rejected: list[tuple[str, Refusal]] = []
        kept: list[Recipient] = []
        for r in env.recipients:
            refused = check_recipient(member, r.addr)
            if refused is None:
                kept.append(r)
            else:
                rejected.append((r.addr, refused))
        if not kept:
            return refuse(Code.ALL_SUPPRESSED, log="every recipient is suppressed")
        now = self.clock()
        try:
            check_octets(sub.data, smtputf8=env.smtputf8, eight_bit_mime=env.eight_bit)
            processed = process(
                sub.data,
                did=sub.did,
                operator_domain=self.operator_domain,
                hostname=self.hostname,
                now=now,
            )
        except MessageError as exc:
            detail = exc.detail.replace("\r", " ").replace("\n", " ")
            return refuse(Code.INVALID_REQUEST, log=detail, enhanced=exc.status, detail=detail)
        senders = [processed.sender_value] if processed.sender_value is not None else []
        refusal = check_header_addresses(member, [processed.from_value], senders)
        if refusal is not None:
            return refusal
        if processed.bulk and member.suppressed:  # most members have no one to skip
            kept = [replace(r, suppressed=unsubscribed(member, r.addr)) for r in kept]
        deliver = [r.addr for r in kept if not r.suppressed]
        if not deliver:
            return refuse(Code.ALL_SUPPRESSED, log="every recipient unsubscribed (bulk mail)")
        if self.enforce_limits:
            admitted = self.policy.admit(member, now, deliver)
            if isinstance(admitted, Refusal):
                return admitted
            self.actions.rule_hits(member.did, admitted)
        record = Accepted(
            id=new_queue_id(now),
            accepted_at=now,
            did=sub.did,
            sender=env.sender,
            recipients=tuple(kept),
            ret=env.ret,
            envid=env.envid,
            category=processed.category,
            bulk=processed.bulk,
            tags=processed.tags,
            metadata=processed.metadata,
            client=sub.client,
            size=len(processed.message),
            message_id=processed.message_id,
            idem=None
            if sub.idempotency is None
            else Idempotency(
                *sub.idempotency, tuple((a, r.code.value, r.text) for a, r in rejected)
            ),
        )
        try:
            durable = sub.durable
            then = None if durable is None else lambda: durable(record.id)
            await self.queue.accept(record, processed.message, then)
        except JournalFullError:
            self.disk_full = True
            self._refund(member, now, len(deliver))
            return refuse(Code.QUEUE_FULL, log="journal disk full")
        except JournalError as exc:
            self._refund(member, now, len(deliver))
            return refuse(Code.TEMPORARILY_UNAVAILABLE, log=f"journal: {type(exc).__name__}")
        self.disk_full = False
        return Queued(record, tuple(rejected))

    def _refund(self, member: MemberSnapshot, now: float, n: int) -> None:
        if self.enforce_limits:
            self.policy.refund(member.did, now, n)
