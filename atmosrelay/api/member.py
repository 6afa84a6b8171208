"""What a member may read about itself: its messages (``/v1/messages``), its standing
(``/member/status``) and its deliverability (``/member/deliverability``).

A member sees only its own messages: every query is scoped to the authenticated DID, and a
message of another member is answered exactly like one that does not exist (404), so ids
cannot be probed. Lists are newest first with a keyset cursor (``accepted_at`` and id of
the last item, base64url): a page never repeats or skips a message when new mail arrives.

Counts come from the policy's counters (recipients accepted, deliveries sent and bounced
per sending domain): the last 7 days live from memory, days 8-14 from the account store,
where the relay writes them every ``policy.counter_flush`` seconds.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import time
from typing import Annotated, Final

import orjson
from fastapi import Query
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from atmosrelay.accounts.domains import DomainError, forward_address, normalize_domain
from atmosrelay.accounts.store import Domain, Member
from atmosrelay.api.common import (
    ApiContext,
    authenticate,
    context,
    error_response,
    invalid,
    json_response,
    read_body,
)
from atmosrelay.api.models import (
    AttemptOut,
    Deliverability,
    DomainOut,
    ForwardToOut,
    ForwardToRequest,
    MemberStatusOut,
    MessageOut,
    MessagePage,
    RecipientOut,
    RecipientStatus,
    Window,
)
from atmosrelay.policy.counters import STORE_KEEP, Counters
from atmosrelay.policy.limits import DAY, HOUR, limits_for, recipients_key
from atmosrelay.policy.rules import bounced_key, complaint_key, sent_key
from atmosrelay.queue.status import MessageStatus
from atmosrelay.refusals import Code, Refusal, refuse

DAYS: Final = 14
assert DAYS * DAY < STORE_KEEP, "the report reads counter rows the store no longer keeps"


def message_out(m: MessageStatus) -> MessageOut:
    attempts: dict[str, list[AttemptOut]] = {}
    for a in m.attempts:
        attempts.setdefault(a.recipient, []).append(
            AttemptOut(at=a.at, status=a.status, code=a.code, remote=a.mta, reply=a.reply)  # type: ignore[arg-type]
        )
    return MessageOut(
        id=m.id,
        messageId=m.message_id,
        status=m.status,  # type: ignore[arg-type]
        acceptedAt=m.accepted_at,
        finishedAt=m.finished_at,
        deleted=m.deleted,
        sender=m.sender,
        category=m.category,
        tags=list(m.tags),
        metadata=m.metadata,
        size=m.size,
        recipients=[
            RecipientOut(recipient=addr, status=status, attempts=attempts.get(addr, []))  # type: ignore[arg-type]
            for addr, status in m.recipients.items()
        ],
    )


async def get_message(request: Request, queue_id: str) -> Response:
    ctx = context(request)
    caller = await authenticate(request, ctx)
    if isinstance(caller, Refusal):
        return error_response(caller)
    found = await ctx.status.get(queue_id, caller.did)
    if found is None:
        return error_response(refuse(Code.NOT_FOUND, what="message", name=queue_id[:40]))
    return json_response(message_out(found))


def _since(value: str | None) -> float | Refusal | None:
    """Unix seconds, or an ISO 8601 time (UTC when it names no zone)."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError:
        return invalid("since: Unix seconds or an ISO 8601 time such as 2026-11-26T10:00:00Z")
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def _cursor(value: str | None) -> tuple[float, str] | Refusal | None:
    if value is None:
        return None
    try:
        at, queue_id = orjson.loads(base64.urlsafe_b64decode(value.encode() + b"=="))
        return float(at), str(queue_id)
    except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError):
        return invalid("cursor: not a cursor this API gave out")


async def list_messages(
    request: Request,
    status: Annotated[
        RecipientStatus | None, Query(description="a recipient has this status")
    ] = None,
    since: Annotated[str | None, Query(description="Unix seconds or ISO 8601")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    ctx = context(request)
    caller = await authenticate(request, ctx)
    if isinstance(caller, Refusal):
        return error_response(caller)
    start, before = _since(since), _cursor(cursor)
    if isinstance(start, Refusal):
        return error_response(start)
    if isinstance(before, Refusal):
        return error_response(before)
    found = await ctx.status.page(
        caller.did, status=status, since=start, limit=limit + 1, before=before
    )
    more = len(found) > limit
    page = found[:limit]
    next_cursor = None
    if more:
        last = page[-1]
        next_cursor = base64.urlsafe_b64encode(orjson.dumps([last.accepted_at, last.id]))
    return json_response(
        MessagePage(
            messages=[message_out(m) for m in page],
            cursor=next_cursor.decode().rstrip("=") if next_cursor else None,
        )
    )


async def _account(ctx: ApiContext, did: str) -> tuple[Member, list[Domain]]:
    store = ctx.relay.store
    return await store.run(store.sync.member, did), await store.run(store.sync.domains, did)


async def member_status(request: Request) -> Response:
    ctx = context(request)
    caller = await authenticate(request, ctx)
    if isinstance(caller, Refusal):
        return error_response(caller)
    member, domains = await _account(ctx, caller.did)
    now = time.time()
    snapshot = caller.member
    limits = limits_for(snapshot, now, ctx.relay.pipeline.policy.settings)
    counters = ctx.relay.pipeline.policy.counters
    key = recipients_key(caller.did)
    return json_response(
        MemberStatusOut(
            did=caller.did,
            handle=member.handles[0] if member.handles else None,
            status=member.status.value,
            reason=member.status_reason,
            labels=sorted(member.labels),
            tier=limits.tier,
            domains=[
                DomainOut(
                    domain=d.name,
                    state="paused"
                    if d.paused_reason is not None
                    else ("verified" if d.status == "verified" else "pending"),
                    pausedReason=d.paused_reason,
                )
                for d in domains
            ],
            hourly=Window(limit=limits.hourly, used=counters.total(key, now, HOUR)),
            daily=Window(limit=limits.daily, used=counters.total(key, now, DAY)),
        )
    )


async def deliverability(request: Request) -> Response:
    ctx = context(request)
    caller = await authenticate(request, ctx)
    if isinstance(caller, Refusal):
        return error_response(caller)
    member, enrolled = await _account(ctx, caller.did)
    domains = [d.name for d in enrolled]
    store = ctx.relay.store
    now = time.time()
    live = ctx.relay.pipeline.policy.counters
    # Days 8-14 from the store (memory keeps 8 days); the rest from memory, which is live.
    split = now - 7 * DAY
    split -= split % live.bucket
    start = now - DAYS * DAY
    older = Counters(keep=(DAYS + 1) * DAY)
    for subject in (caller.did, *domains):
        rows = await store.run(store.sync.counts_since, start - live.bucket, subject)
        for key, bucket, n in rows:
            if bucket < split:
                older.load(key, bucket, n)

    def between(key: str, a: float, b: float) -> int:
        n = 0
        if a < split:
            n += older.between(key, a, min(b, split))
        if b > split:
            n += live.between(key, max(a, split), b)
        return n

    end = now + live.bucket
    sent = sum(between(sent_key(d), start, end) for d in domains)
    bounced = sum(between(bounced_key(d), start, end) for d in domains)
    complaints = sum(between(complaint_key(d), start, end) for d in domains)
    today = now - now % DAY  # UTC midnight
    daily = [
        between(recipients_key(caller.did), today - i * DAY, today - (i - 1) * DAY)
        for i in range(DAYS - 1, -1, -1)
    ]
    limits = limits_for(caller.member, now, ctx.relay.pipeline.policy.settings)
    finished = sent + bounced
    return json_response(
        Deliverability(
            did=caller.did,
            status=member.status.value,
            sent_14d=sent,
            bounced_14d=bounced,
            complaints_14d=complaints,
            bounce_rate=round(bounced / finished, 4) if finished else 0.0,
            daily_sends=daily,
            hourly_limit=limits.hourly,
            daily_limit=limits.daily,
            labels=sorted(member.labels),
        )
    )


async def put_forward_to(request: Request) -> Response:
    """Where replies to one of the member's domains are forwarded (docs/inbound.md)."""
    ctx = context(request)
    caller = await authenticate(request, ctx)
    if isinstance(caller, Refusal):
        return error_response(caller)
    body = await read_body(request, 4096)
    if isinstance(body, Refusal):
        return error_response(body)
    try:
        req = ForwardToRequest.model_validate(orjson.loads(body))
    except orjson.JSONDecodeError:
        return error_response(invalid("the body is not JSON"))
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "body"
        return error_response(invalid(f"{where}: {error['msg']}"))
    try:
        name = normalize_domain(req.domain)
        address = None if req.forward_to is None else forward_address(req.forward_to, name)
    except DomainError as exc:
        return error_response(invalid(str(exc)))
    store = ctx.relay.store
    if name not in {d.name for d in await store.run(store.sync.domains, caller.did)}:
        return error_response(refuse(Code.DOMAIN_MISMATCH, log="forward-to", domain=name))
    domain = await store.run(store.sync.set_forward_to, name, address)
    return json_response(ForwardToOut(domain=domain.name, forward_to=domain.forward_to))
