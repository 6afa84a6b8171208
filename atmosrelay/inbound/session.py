"""The inbound listener's session: the relay's MX, for the addresses it owns and nothing else.

The SMTP driver is submission's (server/session.py: deadlines, the in-flight budget,
pipelining, STARTTLS); what differs is who may send and to whom:

    no AUTH; STARTTLS offered, never required (a remote MX delivering bounces to us)
    MAIL        any sender, the null one included (bounces come from <>); a client address
                over ``inbound.hourly_per_ip`` messages in the hour gets 450 4.7.1
    RCPT        only these, everything else 550 5.1.1 (never an open relay):
                  bounces+TOKEN@<operator>   the VERP return path of delivered mail, its
                                             HMAC verified (kind "bounce")
                  SRS0=...@<operator>        a forwarded reply's return path, hash and
                                             age verified (kind "srs")
                  <role>@<operator>          postmaster, abuse, fbl (kind "role")
                  unsubscribe@<operator>     the List-Unsubscribe mailto (kind "unsubscribe")
                  anything@<member domain>   when the domain is verified and has a
                                             forward-to address (kind "reply"); one member
                                             per message (452 4.5.3 for another's)
    end of DATA the INBOUND record -> journal group commit -> fsync -> only then 250;
                the processor (processor.py) applies it afterwards, and again after a
                restart if it had not finished
"""

from __future__ import annotations

import time
from typing import Final

import attrs
import trio

from atmosrelay._text import printable as _clean
from atmosrelay.accounts.store import AsyncStore, NotFound
from atmosrelay.inbound.addresses import (
    UNSUBSCRIBE_LOCAL,
    ReturnPath,
    Srs,
    is_srs_shaped,
    is_verp_shaped,
)
from atmosrelay.policy.counters import Counters
from atmosrelay.policy.limits import HOUR
from atmosrelay.queue.records import Inbound, InboundRecipient, new_queue_id
from atmosrelay.queue.store import QueueStore
from atmosrelay.sections import ListenerMode
from atmosrelay.server.context import SessionContext
from atmosrelay.server.session import Session, _Transaction
from atmosrelay.smtp import Event, MailFrom, RcptTo, Reply, ServerConnection
from atmosrelay.smtp import replies as R
from atmosrelay.smtp._extensions import AddressError
from journal import JournalError, JournalFullError

KEEP_COUNTS: Final = 2 * HOUR


@attrs.define(eq=False)
class InboundSettings:
    """What inbound sessions share besides the session context."""

    operator_domain: str  # lower case
    return_path: ReturnPath
    srs: Srs
    store: AsyncStore
    role_addresses: frozenset[str] = frozenset({"postmaster", "abuse", "fbl"})
    role_forward: str = ""
    hourly_per_ip: int = 600
    counts: Counters = attrs.field(factory=lambda: Counters(keep=KEEP_COUNTS))
    received: int = 0  # messages made durable (for /metrics)
    refused_rcpt: int = 0  # RCPTs refused as not ours (open-relay probes among them)


class InboundSession(Session):
    def __init__(
        self,
        stream: trio.abc.Stream,
        peer: str,
        ctx: SessionContext,
        inbound: InboundSettings,
    ) -> None:
        self.inbound = inbound
        self._kinds: list[InboundRecipient] = []
        super().__init__(stream, peer, ListenerMode.INBOUND, ctx)

    def _new_connection(self, *, after_starttls: bool) -> ServerConnection:
        caps = attrs.evolve(self.ctx.capabilities, starttls=not self.tls, auth=())
        return ServerConnection(
            capabilities=caps,
            tls=self.tls,
            after_starttls=after_starttls,
            max_recipients=self.ctx.max_recipients,
            auth_unavailable=R.AUTH_NOT_AVAILABLE,
        )

    async def _answer(self, event: Event) -> Reply | None:
        if isinstance(event, RcptTo):
            return await self._inbound_rcpt(event)
        return await super()._answer(event)

    def _over_rate(self) -> bool:
        key = f"inbound|{self.peer}"
        return self.inbound.counts.total(key, trio.current_time(), HOUR) >= (
            self.inbound.hourly_per_ip
        )

    async def _mail(self, event: MailFrom) -> Reply:
        if self.ctx.journal_failed():
            return R.JOURNAL_FAILED
        if self._over_rate():
            self._log("mail-refused", "inbound rate per client address")
            return R.INBOUND_RATE_LIMITED
        self._end_transaction()
        self._kinds = []
        self.tx = _Transaction(event.sender, event.params)
        return R.SENDER_OK

    async def _inbound_rcpt(self, event: RcptTo) -> Reply:
        tx = self.tx
        assert tx is not None
        address = event.recipient
        try:
            domain = address.domain_ascii
        except AddressError:
            domain = ""
        found = await self._classify(address.local, domain)
        if isinstance(found, Reply):
            self.inbound.refused_rcpt += 1
            self._log("rcpt-refused", _clean(str(address))[:200], str(found.code))
            return found
        if found.kind == "reply" and any(
            k.kind == "reply" and k.did != found.did for k in self._kinds
        ):
            return R.ONE_MEMBER_PER_MESSAGE
        self._kinds.append(found)
        tx.recipients.append((address, event.params))
        return R.RECIPIENT_OK

    async def _classify(self, local: str, domain: str) -> InboundRecipient | Reply:
        settings = self.inbound
        addr = f"{local}@{domain}"
        if domain == settings.operator_domain:
            lowered = local.lower()
            if is_verp_shaped(local):
                verified = settings.return_path.verify(local)
                if verified is None:
                    return R.ADDRESS_NOT_AVAILABLE
                return InboundRecipient(addr, "bounce", f"{verified[0]}-{verified[1]}")
            if is_srs_shaped(local):
                original = settings.srs.reverse(local)
                if original is None:
                    return R.ADDRESS_NOT_AVAILABLE
                return InboundRecipient(addr, "srs", original)
            if lowered in settings.role_addresses:
                return InboundRecipient(addr, "role", settings.role_forward)
            if lowered == UNSUBSCRIBE_LOCAL:
                return InboundRecipient(addr, "unsubscribe")
            return R.ADDRESS_NOT_AVAILABLE
        if not domain:
            return R.ADDRESS_NOT_AVAILABLE
        store = settings.store
        try:
            enrolled = await store.run(store.sync.domain, domain)
        except NotFound:
            return R.ADDRESS_NOT_AVAILABLE
        if enrolled.status != "verified" or not enrolled.forward_to:
            return R.ADDRESS_NOT_AVAILABLE
        return InboundRecipient(addr, "reply", enrolled.forward_to, enrolled.did)

    async def _accept(self) -> Reply:
        tx = self.tx
        assert tx is not None
        if tx.refused is not None:
            self._log("message-refused", str(tx.refused.code), "in-flight budget full")
            return tx.refused
        if self.ctx.journal_failed():
            return R.QUEUE_UNAVAILABLE
        data = bytes(tx.data)
        record = Inbound(
            id=new_queue_id(),
            received_at=time.time(),
            sender=str(tx.sender),
            recipients=tuple(self._kinds),
            client={"ip": self.peer, "tls": self.tls_version, "helo": self.helo},
            size=len(data),
        )
        queue = self.ctx.queue
        assert isinstance(queue, QueueStore)  # inbound runs in the owner: the queue itself
        try:
            await queue.receive(record, data)
        except JournalFullError:
            self._log("inbound-refused", "journal disk full")
            return R.QUEUE_FULL
        except JournalError as exc:  # logged by name: the peer never sees our exception text
            self._log("inbound-refused", f"journal: {type(exc).__name__}")
            self.ctx.journal_failed()
            return R.QUEUE_UNAVAILABLE
        self.inbound.received += 1
        self.inbound.counts.add(f"inbound|{self.peer}", trio.current_time())
        kinds = ",".join(sorted({k.kind for k in self._kinds}))
        self._log("received", record.id, f"from={_clean(record.sender)}", f"kinds={kinds}")
        return R.QUEUED.format(queue_id=record.id)
