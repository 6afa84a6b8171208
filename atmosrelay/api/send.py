"""``POST /v1/send``: a JSON message through the same acceptance pipeline as SMTP.

    authenticate (Bearer key + X-Atmos-DID)      401 / 400 / 403
    read the body, at most http.max_body         413
    validate (SendRequest), write the MIME       400 INVALID_REQUEST, naming the field
    Idempotency-Key seen in the last 24 h?       the first answer again / 422 on another body
    pipeline.submit -> fsynced ACCEPTED record   200 {"id", "messageId", "accepted", "rejected"}
                    or a Refusal                 its status, code and retryable (+Retry-After)

**200 means durable**: the answer is written only after the journal's fsync covered the
record, and from the moment the pipeline is called the request is shielded from the
server's shutdown, so an accepted send is never left without its answer.

**Idempotency.** The key (1-255 printable ASCII characters, scoped to the member) and a
digest of the request (the JSON, keys sorted, so spacing and key order do not matter) go
into the ACCEPTED record itself: the fsync that makes the message durable makes the key
durable, and a retry after a ``kill -9`` finds it (the status index is rebuilt from the
journal). Only a send that was queued is remembered: a refused one may be retried as new.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

import attrs
import orjson
import trio
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from atmosrelay.api.common import (
    ApiContext,
    authenticate,
    context,
    error_response,
    invalid,
    json_response,
    read_body,
    shield_from_here,
)
from atmosrelay.api.compose import ComposeError, compose
from atmosrelay.api.models import (
    MAX_TO,
    AcceptedRecipient,
    Rejected,
    SendRequest,
    SendResponse,
)
from atmosrelay.queue.status import UNSUBSCRIBED, Remembered
from atmosrelay.refusals import TABLE, Code, Refusal, refuse
from atmosrelay.submission.pipeline import Queued, Submission

_KEY: Final = re.compile(r"[\x21-\x7e]{1,255}")
SHUTTING_DOWN: Final = attrs.evolve(
    TABLE[Code.TEMPORARILY_UNAVAILABLE].reply, lines=("Shutting down; retry shortly",)
)


def _errors(exc: ValidationError) -> list[dict[str, object]]:
    """Pydantic's errors, most telling first: for a field that takes a string or a list,
    the branch the input did not even have the type of says nothing."""
    errors = [dict(e) for e in exc.errors()]
    telling = [e for e in errors if e["type"] not in ("string_type", "list_type")]
    return telling or errors


def _field_error(error: dict[str, object]) -> str:
    loc = error["loc"]
    assert isinstance(loc, tuple)
    # loc parts such as "constrained-str" name the union branch, not a place in the body
    where = ".".join(str(p) for p in loc if not (isinstance(p, str) and "-" in p)) or "body"
    return f"{where}: {error['msg']}"


async def send(request: Request) -> Response:
    ctx = context(request)
    caller = await authenticate(request, ctx)
    if isinstance(caller, Refusal):
        return error_response(caller)
    body = await read_body(request, ctx.max_body)
    if isinstance(body, Refusal):
        return error_response(body)
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return error_response(invalid("the body is not JSON"))
    try:
        req = SendRequest.model_validate(parsed)
    except ValidationError as exc:
        first = _errors(exc)[0]
        if first["type"] == "too_long" and first["loc"][:1] == ("to",):  # type: ignore[index]
            return error_response(
                refuse(Code.TOO_MANY_RECIPIENTS, log=f"over {MAX_TO} recipients in 'to'")
            )
        return error_response(invalid(_field_error(first)))
    key = request.headers.get("idempotency-key")
    if key is not None and not _KEY.fullmatch(key):
        return error_response(invalid("Idempotency-Key: 1 to 255 printable ASCII characters"))
    if key is None:
        return await _send(request, ctx, caller.did, caller.ip, req, None)
    digest = hashlib.sha256(orjson.dumps(parsed, option=orjson.OPT_SORT_KEYS)).hexdigest()
    lock = ctx.key_locks.setdefault((caller.did, key), trio.Lock())
    try:
        async with lock:
            found = await ctx.status.idempotent(caller.did, key)
            if found is not None:
                if found.digest != digest:
                    hours = ctx.idempotency_ttl / 3600
                    return error_response(
                        refuse(
                            Code.IDEMPOTENCY_CONFLICT,
                            log=f"key reused for another body (first: {found.queue_id})",
                            key=key[:64],
                            ttl=f"{hours:g} hours",
                        )
                    )
                return json_response(_replayed(found), headers={"Idempotent-Replayed": "true"})
            return await _send(request, ctx, caller.did, caller.ip, req, (key, digest))
    finally:
        if not lock.statistics().tasks_waiting and not lock.locked():
            ctx.key_locks.pop((caller.did, key), None)


async def _send(
    request: Request,
    ctx: ApiContext,
    did: str,
    ip: str,
    req: SendRequest,
    idem: tuple[str, str] | None,
) -> Response:
    try:
        composed = compose(req, hostname=ctx.relay.hostname)
    except ComposeError as exc:
        return error_response(invalid(str(exc)))
    if ctx.stopping():
        # The server may close this connection any moment now, whatever the request is
        # doing: queue nothing whose 200 could be lost. (Checked after the stop has begun
        # means refused; before means the server had not started closing: it finishes.)
        return error_response(refuse(Code.TEMPORARILY_UNAVAILABLE, reply=SHUTTING_DOWN))
    shield_from_here(request, ctx.request_timeout)
    result = await ctx.relay.pipeline.submit(
        Submission(did, composed.envelope, composed.message, {"ip": ip, "via": "http"}, idem)
    )
    if isinstance(result, Refusal):
        if result.code is Code.ALL_SUPPRESSED:
            rejected = [
                Rejected(recipient=r.addr, code=Code.RECIPIENT_SUPPRESSED.value, reason=result.text)
                for r in composed.envelope.recipients
            ]
            return json_response(
                SendResponse(id=None, messageId=None, accepted=[], rejected=rejected)
            )
        if result.code is Code.TEMPORARILY_UNAVAILABLE:
            ctx.relay.journal_failed()  # logs it once, as SMTP does
        return error_response(result)
    return json_response(_answer(result))


def _answer(queued: Queued) -> SendResponse:
    record = queued.record
    mid = record.message_id
    rejected = [
        Rejected(recipient=addr, code=r.code.value, reason=r.text) for addr, r in queued.rejected
    ]
    rejected += [
        Rejected(recipient=addr, code=Code.RECIPIENT_SUPPRESSED.value, reason=UNSUBSCRIBED)
        for addr in queued.suppressed
    ]
    accepted = [
        AcceptedRecipient(recipient=r.addr, messageId=mid)
        for r in record.recipients
        if not r.suppressed
    ]
    return SendResponse(id=record.id, messageId=mid, accepted=accepted, rejected=rejected)


def _replayed(found: Remembered) -> SendResponse:
    mid = found.message_id
    return SendResponse(
        id=found.queue_id,
        messageId=mid,
        accepted=[AcceptedRecipient(recipient=a, messageId=mid) for a in found.accepted],
        rejected=[Rejected(recipient=a, code=c, reason=r) for a, c, r in found.rejected],
    )
