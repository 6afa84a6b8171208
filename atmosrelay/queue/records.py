"""Journal records of the mail queue, and their codec.

FROZEN FORMAT (version 1). A record's payload in the journal (journal frame type = RecordType):

    ACCEPTED (type 1):  u32 length of the JSON head | JSON head (UTF-8) | message bytes

The JSON head holds the envelope and what the relay decided at acceptance:

    {"v": 1, "id": queue id, "t": accepted at (unix seconds), "did": member DID,
     "from": envelope sender, "rcpt": [{"addr": ..., "notify": [...] | null,
     "orcpt": [type, addr] | null, "supp": true (only when set)}, ...],
     "ret": "FULL" | "HDRS" | null, "envid": ... | null,
     "category": ..., "bulk": true | false, "tags": [...], "metadata": {...},
     "client": {"ip": ..., "tls": "TLSv1.3 ..." | null, "helo": ...}, "size": octets}

    DELIVERY (type 2):  JSON {"v": 1, "id": queue id, "t": time, "mta": remote host | null,
                        "outcomes": [{"rcpt": address, "outcome": "sent" | "deferred" |
                        "bounced" | "suppressed", "status": "2.0.0", "reply": remote reply
                        verbatim | null, "attempt": n, "next": next attempt time | null}]}
    DELETED (type 3):   JSON {"v": 1, "id": queue id, "t": time, "reason": text,
                         "report": {"atmos-dsn-for": ..., ...} (only for a DSN: what it
                         reported, which stays reported)}
    INBOUND (type 4):   u32 length of the JSON head | JSON head | the message as received
                        {"v": 1, "id": inbound id, "t": received at, "from": envelope sender,
                         "rcpt": [{"addr": ..., "kind": "bounce" | "srs" | "role" |
                         "unsubscribe" | "reply", "target": ..., "did": ...}, ...],
                         "client": {...}, "size": octets}
    INBOUND_DONE (type 5): JSON {"v": 1, "id": inbound id, "t": time, "kind": what it was}

An INBOUND record is what the inbound listener (atmosrelay/inbound/) made durable before
its 250; INBOUND_DONE says its effects (events, suppressions, forwards, the inbound log)
are applied, so both may be compacted away. A record without its DONE is processed again
after a restart.

``supp`` marks a recipient of bulk mail who unsubscribed from this member: it is kept in the
record (the message's status reports it) and never delivered; its state starts as
``suppressed``. Records without it are read as before, so the format version stays 1.

The message bytes are the processed message (relay headers added, X-Atmos-* removed). They are
not held in memory by the queue: the state keeps the record's journal position and reads the
body back when a delivery lane needs it. Later record types (delivery outcomes) come with the
delivery issue; unknown types are kept by the fold as opaque so an older build never drops them.
"""

from __future__ import annotations

import enum
import json
import struct
import sys
import time
from typing import Any, Final

import attrs
import msgspec
import orjson

from atmosrelay._random import RANDOM

FORMAT_VERSION: Final = 1
_LEN: Final = struct.Struct("<I")
_CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS: Final = tuple(a + b for a in _CROCKFORD for b in _CROCKFORD)  # 10 bits each


class RecordType(enum.IntEnum):
    ACCEPTED = 1
    DELIVERY = 2  # outcomes of one delivery attempt (JSON)
    DELETED = 3  # the operator removed a message (JSON)
    INBOUND = 4  # a message the inbound listener accepted (JSON head + bytes)
    INBOUND_DONE = 5  # ... and processed (JSON)


def new_queue_id(now: float | None = None) -> str:
    """26 characters, Crockford base32 of 48 bits of milliseconds and 80 random bits (the
    ULID layout): sortable by acceptance time, unguessable, safe in a reply line."""
    ms = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    return ulid(ms, int.from_bytes(RANDOM.take(10), "big"))


def ulid(ms: int, r: int) -> str:
    """The 26 characters of 48 bits of ``ms`` then 80 bits of ``r``, most significant first."""
    p = _PAIRS  # two characters a lookup: one for every message accepted, so 13, not 26
    return (
        p[ms >> 40] + p[(ms >> 30) & 1023] + p[(ms >> 20) & 1023] + p[(ms >> 10) & 1023]
        + p[ms & 1023] + p[r >> 70] + p[(r >> 60) & 1023] + p[(r >> 50) & 1023]
        + p[(r >> 40) & 1023] + p[(r >> 30) & 1023] + p[(r >> 20) & 1023]
        + p[(r >> 10) & 1023] + p[r & 1023]
    )  # fmt: skip


# The three classes of an ACCEPTED head are msgspec structs, not attrs classes: a restart
# decodes one head a queued message straight into them (msgspec.json, in C: ~2 us a head
# where orjson's dict and an attrs constructor took ~10), and a queued message's record
# is then three objects the cyclic collector never tracks (``gc=False``: they hold only
# strings, numbers, tuples and the two small dicts, so no cycle can run through them).
# Frozen, as before: equal records compare equal, and nothing changes one in place. The
# field names are the JSON head's where they differ from the attribute's (``name=``).
class Recipient(msgspec.Struct, frozen=True, gc=False):
    addr: str
    notify: tuple[str, ...] | None = None
    orcpt: tuple[str, str] | None = None
    suppressed: bool = msgspec.field(default=False, name="supp")  # unsubscribed: never sent


class Idempotency(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """An HTTP send's ``Idempotency-Key``, kept in the ACCEPTED record itself so a retry
    after a crash finds it (the same fsync made both durable): the key, a digest of the
    request, and the recipients refused at acceptance (the answer lists them again).
    In the head it is an array: ``[key, digest, [[recipient, code, reason], ...]]``."""

    key: str
    digest: str
    rejected: tuple[tuple[str, str, str], ...] = ()  # (recipient, refusal code, reason)


class Accepted(msgspec.Struct, frozen=True, gc=False):
    id: str
    accepted_at: float = msgspec.field(name="t")
    did: str
    sender: str = msgspec.field(name="from")
    recipients: tuple[Recipient, ...] = msgspec.field(name="rcpt")
    ret: str | None
    envid: str | None
    category: str
    bulk: bool
    tags: tuple[str, ...]
    metadata: dict[str, str]
    client: dict[str, str | None]
    size: int
    # the Message-ID header's value, as the message carries it
    message_id: str = msgspec.field(default="", name="mid")
    idem: Idempotency | None = None


def as_dict(value: Any) -> Any:
    """A record (or anything holding records) as plain dicts, lists and values, with the
    attribute names as keys (``queue show --json``), not the head's short names."""
    if isinstance(value, msgspec.Struct):
        return {f: as_dict(getattr(value, f)) for f in value.__struct_fields__}
    if isinstance(value, tuple | list):
        return [as_dict(v) for v in value]
    if isinstance(value, dict):
        return {k: as_dict(v) for k, v in value.items()}
    return value


def encode_accepted(record: Accepted, message: bytes) -> bytes:
    """The record's payload. The heads of the records written for every message (ACCEPTED,
    DELIVERY, INBOUND) are made by orjson: 1 us where ``json.dumps`` took 5-8 (the same
    JSON, read by the same decoder; a string that is not valid Unicode is refused by both)."""
    head = {
        "v": FORMAT_VERSION,
        "id": record.id,
        "t": record.accepted_at,
        "did": record.did,
        "from": record.sender,
        "rcpt": [_recipient(r) for r in record.recipients],
        "ret": record.ret,
        "envid": record.envid,
        "category": record.category,
        "bulk": record.bulk,
        "tags": list(record.tags),
        "metadata": record.metadata,
        "client": record.client,
        "size": record.size,
    }
    if record.message_id:
        head["mid"] = record.message_id
    if record.idem is not None:
        head["idem"] = [
            record.idem.key,
            record.idem.digest,
            [list(r) for r in record.idem.rejected],
        ]
    raw = orjson.dumps(head)
    return _LEN.pack(len(raw)) + raw + message


def _recipient(r: Recipient) -> dict[str, Any]:
    out: dict[str, Any] = {
        "addr": r.addr,
        "notify": list(r.notify) if r.notify else None,
        "orcpt": list(r.orcpt) if r.orcpt else None,
    }
    if r.suppressed:
        out["supp"] = True
    return out


class RecordError(ValueError):
    pass


_SHARED: dict[tuple[tuple[str, Any], ...], dict[str, Any]] = {}
SHARED_MAX: Final = 10_000


def shared(value: dict[str, Any]) -> dict[str, Any]:
    """One dict for every equal small dict a replay decodes. A queued message's ``client``
    (the same few addresses and HELO names) and ``metadata`` (nearly always empty) were
    two dicts of their own, ~350 of the ~1,300 bytes a queued message held after a
    restart. A record's dicts are never modified (``Accepted`` is frozen, and no code
    writes to them), which is what makes sharing them sound. Bounded: past SHARED_MAX
    distinct dicts, a new one is kept as it is."""
    try:
        key = tuple(value.items())
        found = _SHARED.get(key)
    except TypeError:  # an unhashable value (a list in metadata): its own copy
        return dict(value)
    if found is not None:
        return found
    if len(_SHARED) < SHARED_MAX:
        _SHARED[key] = value = {k: sys.intern(v) if isinstance(v, str) else v for k, v in key}
        return value
    return dict(value)


_HEAD: Final = msgspec.json.Decoder(Accepted)
_V1: Final = b'{"v":1,'  # how every head this build writes begins (orjson keeps key order)
# Fields the fast decoder would read differently from the rules below: an empty list is
# "none" for these two (``tuple(x) if x else None``), an empty tuple to the decoder.
_EMPTY_NOTIFY: Final = b'"notify":[]'
_EMPTY_ORCPT: Final = b'"orcpt":[]'
_set: Final = msgspec.structs.force_setattr


def decode_accepted(payload: bytes) -> tuple[Accepted, int]:
    """The record and the offset of the message bytes in the payload.

    A head as this build writes it is decoded by msgspec straight into the record; anything
    else (another key order, a value of an unexpected type, a field missing) goes the long
    way below, which accepts and refuses exactly what it always has."""
    if len(payload) < _LEN.size:
        raise RecordError("accepted record too short")
    (n,) = _LEN.unpack_from(payload)
    raw = payload[_LEN.size : _LEN.size + n]
    if raw.startswith(_V1) and _EMPTY_NOTIFY not in raw and _EMPTY_ORCPT not in raw:
        try:
            record = _HEAD.decode(raw)
        except msgspec.DecodeError:
            pass  # the long way says what is wrong with it
        else:
            return settle_accepted(record), _LEN.size + n
    return _decode_head(raw), _LEN.size + n


def settle_accepted(record: Accepted) -> Accepted:
    """A record fresh from msgspec, made to share what it can: the same few members,
    senders and categories recur in every record (one string each), and one dict for equal
    metadata and client dicts (a restart holds every queued message's record)."""
    _set(record, "did", sys.intern(record.did))
    _set(record, "sender", sys.intern(record.sender))
    _set(record, "category", sys.intern(record.category))
    _set(record, "metadata", shared(record.metadata))
    _set(record, "client", shared(record.client))
    return record


def _decode_head(raw: bytes) -> Accepted:
    try:
        head: dict[str, Any] = orjson.loads(raw)
    except ValueError as exc:  # orjson.JSONDecodeError is a ValueError
        raise RecordError(f"accepted record head is not JSON: {exc}") from None
    if head.get("v") != FORMAT_VERSION:
        raise RecordError(f"accepted record version {head.get('v')!r} unknown to this build")
    return Accepted(
        id=head["id"],
        accepted_at=head["t"],
        did=sys.intern(head["did"]),
        sender=sys.intern(head["from"]),
        recipients=tuple(
            Recipient(
                r["addr"],
                tuple(r["notify"]) if r.get("notify") else None,
                tuple(r["orcpt"]) if r.get("orcpt") else None,
                bool(r.get("supp", False)),
            )
            for r in head["rcpt"]
        ),
        ret=head.get("ret"),
        envid=head.get("envid"),
        category=sys.intern(head["category"]),
        bulk=head["bulk"],
        tags=tuple(head.get("tags", ())),
        metadata=shared(head.get("metadata", {})),
        client=shared(head.get("client", {})),
        size=head["size"],
        message_id=head.get("mid", ""),
        idem=_idem(head.get("idem")),
    )


def _idem(value: Any) -> Idempotency | None:
    if value is None:
        return None
    key, digest, rejected = value
    return Idempotency(key, digest, tuple((str(a), str(c), str(r)) for a, c, r in rejected))


class RecipientState(enum.StrEnum):
    """Where a recipient of a queued message stands (the reference's vocabulary). A
    DELIVERY record's outcome is one of these but ``accepted``."""

    ACCEPTED = "accepted"  # queued, never tried
    DEFERRED = "deferred"  # a 4xx or a connection failure: tried again later
    SENT = "sent"  # the recipient's MX took it
    BOUNCED = "bounced"  # a 5xx, a permanent DNS failure, or too old
    SUPPRESSED = "suppressed"  # unsubscribed from this member's bulk mail: never sent


OUTCOMES = frozenset(RecipientState) - {RecipientState.ACCEPTED}
TERMINAL = frozenset({RecipientState.SENT, RecipientState.BOUNCED, RecipientState.SUPPRESSED})
PENDING = frozenset({RecipientState.ACCEPTED, RecipientState.DEFERRED})


# msgspec structs, as the ACCEPTED head's classes and for the same reasons: a restart
# decodes every DELIVERY record (one an attempt) straight into them.
class Outcome(msgspec.Struct, frozen=True, gc=False):
    recipient: str = msgspec.field(name="rcpt")
    outcome: RecipientState
    status: str
    reply: str | None = None
    attempt: int = 1
    next_at: float | None = msgspec.field(default=None, name="next")

    def __post_init__(self) -> None:
        # the outcome given as its text ("deferred") becomes the state itself, as decoding
        # does; an unknown text is a ValueError
        if type(self.outcome) is not RecipientState:
            _set(self, "outcome", RecipientState(self.outcome))


class Delivery(msgspec.Struct, frozen=True, gc=False):
    id: str
    at: float = msgspec.field(name="t")
    mta: str | None
    outcomes: tuple[Outcome, ...]


def encode_delivery(d: Delivery) -> bytes:
    return orjson.dumps(
        {
            "v": FORMAT_VERSION,
            "id": d.id,
            "t": d.at,
            "mta": d.mta,
            "outcomes": [
                {
                    "rcpt": o.recipient,
                    "outcome": o.outcome,
                    "status": o.status,
                    "reply": o.reply,
                    "attempt": o.attempt,
                    "next": o.next_at,
                }
                for o in d.outcomes
            ],
        }
    )


_DELIVERY: Final = msgspec.json.Decoder(Delivery)


def decode_delivery(payload: bytes) -> Delivery:
    """A DELIVERY record: msgspec's decoder for a record as this build writes it, the long
    way below for anything else (which refuses what it always refused)."""
    if payload.startswith(_V1):
        try:
            delivery = _DELIVERY.decode(payload)
        except msgspec.DecodeError:
            pass
        else:
            if all(o.outcome in OUTCOMES for o in delivery.outcomes):
                return settle_delivery(delivery)
    return _decode_delivery(payload)


def settle_delivery(delivery: Delivery) -> Delivery:
    """A record fresh from msgspec, its recurring strings shared (a few statuses and remote
    hosts recur in every record)."""
    for o in delivery.outcomes:
        _set(o, "status", sys.intern(o.status))
    if delivery.mta is not None:
        _set(delivery, "mta", sys.intern(delivery.mta))
    return delivery


def _decode_delivery(payload: bytes) -> Delivery:
    try:
        head = orjson.loads(payload)
        outcomes = tuple(
            Outcome(
                o["rcpt"],
                o["outcome"],
                sys.intern(o["status"]),
                o.get("reply"),
                o.get("attempt", 1),
                o.get("next"),
            )
            for o in head["outcomes"]
        )
    except (ValueError, KeyError, TypeError) as exc:  # an unknown outcome is a ValueError
        raise RecordError(f"delivery record is not valid: {exc}") from None
    if any(o.outcome not in OUTCOMES for o in outcomes):
        raise RecordError("delivery record has an unknown outcome")
    mta = head.get("mta")
    return Delivery(head["id"], head["t"], None if mta is None else sys.intern(mta), outcomes)


def encode_deleted(
    queue_id: str, at: float, reason: str, report: dict[str, str] | None = None
) -> bytes:
    """``report``: a deleted DSN's metadata naming what it reported (``atmos-dsn-*``)."""
    head: dict[str, Any] = {"v": FORMAT_VERSION, "id": queue_id, "t": at, "reason": reason}
    if report:
        head["report"] = report
    return json.dumps(head).encode()


def decode_deleted(payload: bytes) -> tuple[str, float, str, dict[str, str] | None]:
    try:
        head = json.loads(payload)
        report = head.get("report")
        if report is not None and not all(
            isinstance(k, str) and isinstance(v, str) for k, v in report.items()
        ):
            raise TypeError("report is not a map of strings")
        return head["id"], head["t"], head["reason"], report
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RecordError(f"deleted record is not valid: {exc}") from None


# -- inbound ----------------------------------------------------------------------------------
@attrs.frozen
class InboundRecipient:
    """One recipient of a message to the inbound listener, as RCPT classified it.

    kind      target                                  did
    bounce    "QUEUEID-N" (the VERP token's message)  ""
    srs       the original sender to pass a bounce to  ""
    role      the operator's forward address or ""     ""
    unsubscribe  ""                                   ""
    reply     the member domain's forward-to address   the member's DID
    """

    addr: str
    kind: str
    target: str = ""
    did: str = ""


@attrs.frozen
class Inbound:
    id: str
    received_at: float
    sender: str
    recipients: tuple[InboundRecipient, ...]
    client: dict[str, str | None]
    size: int


def encode_inbound(record: Inbound, message: bytes) -> bytes:
    head = {
        "v": FORMAT_VERSION,
        "id": record.id,
        "t": record.received_at,
        "from": record.sender,
        "rcpt": [
            {"addr": r.addr, "kind": r.kind, "target": r.target, "did": r.did}
            for r in record.recipients
        ],
        "client": record.client,
        "size": record.size,
    }
    raw = orjson.dumps(head)
    return _LEN.pack(len(raw)) + raw + message


def decode_inbound(payload: bytes) -> tuple[Inbound, int]:
    if len(payload) < _LEN.size:
        raise RecordError("inbound record too short")
    (n,) = _LEN.unpack_from(payload)
    try:
        head: dict[str, Any] = orjson.loads(payload[_LEN.size : _LEN.size + n])
        if head.get("v") != FORMAT_VERSION:
            raise RecordError(f"inbound record version {head.get('v')!r} unknown to this build")
        record = Inbound(
            id=head["id"],
            received_at=head["t"],
            sender=head["from"],
            recipients=tuple(
                InboundRecipient(r["addr"], r["kind"], r.get("target", ""), r.get("did", ""))
                for r in head["rcpt"]
            ),
            client=dict(head.get("client", {})),
            size=head["size"],
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise RecordError(f"inbound record is not valid: {exc}") from None
    return record, _LEN.size + n


def encode_inbound_done(inbound_id: str, at: float, kind: str) -> bytes:
    return json.dumps({"v": FORMAT_VERSION, "id": inbound_id, "t": at, "kind": kind}).encode()


def decode_inbound_done(payload: bytes) -> str:
    try:
        return str(json.loads(payload)["id"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RecordError(f"inbound-done record is not valid: {exc}") from None
