"""The ACCEPTED head's (and the DELIVERY record's) two decoders agree: msgspec's fast one, for heads as this build writes
them, and the long way, for anything else. Whatever the fast one returns, the long way
returns too; whatever it cannot read, the long way reads (or refuses) as it always has."""

from __future__ import annotations

import sys
from typing import Any

import msgspec
import orjson
from hypothesis import event, given, settings
from hypothesis import strategies as st

from atmosrelay.queue.records import (
    _DELIVERY,
    _HEAD,
    _LEN,
    Delivery,
    Idempotency,
    Outcome,
    Recipient,
    RecipientState,
    _decode_delivery,
    _decode_head,
    decode_accepted,
    decode_delivery,
    encode_accepted,
    encode_delivery,
    new_queue_id,
    shared,
    ulid,
)
from tests.queue.factories import accepted_record

# Any JSON value, small: what a damaged or foreign head may hold where a field should be.
_ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(-2, 2) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=6,
)


_ADDR = st.sampled_from(["bob@example.net", "carol@example.org", "d@e.f"])
_RCPT = st.fixed_dictionaries(
    {"addr": _ADDR},
    optional={
        "notify": st.none() | st.lists(st.sampled_from(["SUCCESS", "DELAY"]), max_size=2),
        "orcpt": st.none() | st.tuples(st.just("rfc822"), _ADDR).map(list),
        "supp": st.booleans(),
    },
)
# A head of the right shape; the test then damages at most a few of its fields.
_GOOD_HEAD = st.fixed_dictionaries(
    {
        "v": st.just(1),
        "id": st.just("01M8F03XACGQS64EH9EC0A33KR"),
        "t": st.floats(1e9, 2e9) | st.integers(1_000_000_000, 2_000_000_000),
        "did": st.just("did:plc:abcdefghijklmnopqrstuvwx"),
        "from": _ADDR | st.just(""),
        "rcpt": st.lists(_RCPT, max_size=3),
        "ret": st.sampled_from([None, "FULL", "HDRS"]),
        "envid": st.none() | st.text(max_size=5),
        "category": st.sampled_from(["receipt", "newsletter"]),
        "bulk": st.booleans(),
        "tags": st.lists(st.text(max_size=3), max_size=2),
        "metadata": st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
        "client": st.dictionaries(st.sampled_from(["ip", "helo", "tls"]), st.none()),
        "size": st.integers(0, 10**6),
    },
    optional={
        "mid": st.text(max_size=5),
        "idem": st.none()
        | st.tuples(
            st.text(max_size=3),
            st.text(max_size=3),
            st.lists(st.lists(st.text(max_size=2), min_size=3, max_size=3), max_size=2),
        ).map(list),
    },
)


def _damage(data: st.DataObject, value: Any) -> Any:
    """``value`` with one part of it replaced by any JSON value, or removed (dicts), or as
    it is; recursing into dicts and lists, so a recipient's field is damaged too."""
    choice = data.draw(st.sampled_from(["keep", "replace", "inside"]))
    if choice == "replace":
        return data.draw(_ANY_JSON)
    if choice == "inside" and isinstance(value, dict) and value:
        key = data.draw(st.sampled_from(sorted(value)))
        if data.draw(st.booleans()):
            return {k: v for k, v in value.items() if k != key}
        return {**value, key: _damage(data, value[key])}
    if choice == "inside" and isinstance(value, list) and value:
        i = data.draw(st.integers(0, len(value) - 1))
        return [*value[:i], _damage(data, value[i]), *value[i + 1 :]]
    return value


def _payload(head: dict[str, Any]) -> bytes:
    raw = orjson.dumps(head)
    return _LEN.pack(len(raw)) + raw + b"Subject: x\r\n\r\nbody\r\n"


def _outcome(decode: Any, arg: bytes) -> tuple[str, Any]:
    try:
        return "ok", decode(arg)
    except Exception as exc:  # what is compared is which error, if any
        return "error", type(exc)


def _damaged(data: st.DataObject, value: dict[str, Any], keys_reversed: bool) -> Any:
    value = _damage(data, value)
    if keys_reversed and isinstance(value, dict):  # another writer's key order: the long way
        value = dict(reversed(list(value.items())))
    return value


def _read_alike(fast: Any, fast_arg: bytes, slow: Any, slow_arg: bytes) -> Any:
    """Both decoders refuse with the same error, or both read: then the fast one's result
    (checked against the long way's by the caller); None when both refused."""
    fast_outcome, slow_outcome = _outcome(fast, fast_arg), _outcome(slow, slow_arg)
    event("read" if fast_outcome[0] == "ok" else "refused")
    assert fast_outcome[0] == slow_outcome[0]
    if fast_outcome[0] == "error":
        assert fast_outcome[1] is slow_outcome[1]
        return None
    return fast_outcome[1], slow_outcome[1]


@settings(max_examples=2000, deadline=None)
@given(_GOOD_HEAD, st.data(), st.booleans())
def test_the_fast_decoder_reads_a_head_as_the_long_way_does(
    head: dict[str, Any], data: st.DataObject, keys_reversed: bool
) -> None:
    payload = _payload(_damaged(data, head, keys_reversed))
    raw = payload[_LEN.size : _LEN.size + _LEN.unpack_from(payload)[0]]
    both = _read_alike(decode_accepted, payload, _decode_head, raw)
    if both is not None:
        (record, offset), slow = both
        assert record == slow
        assert payload[offset:] == b"Subject: x\r\n\r\nbody\r\n"


_GOOD_DELIVERY = st.fixed_dictionaries(
    {
        "v": st.just(1),
        "id": st.just("01M8F03XACGQS64EH9EC0A33KR"),
        "t": st.floats(1e9, 2e9) | st.integers(1_000_000_000, 2_000_000_000),
        "mta": st.none() | st.just("mx.example.net"),
        "outcomes": st.lists(
            st.fixed_dictionaries(
                {
                    "rcpt": _ADDR,
                    "outcome": st.sampled_from(
                        ["sent", "deferred", "bounced", "suppressed", "accepted"]
                    ),
                    "status": st.sampled_from(["2.0.0", "4.2.1", "5.1.1"]),
                },
                optional={
                    "reply": st.none() | st.text(max_size=5),
                    "attempt": st.integers(1, 9),
                    "next": st.none() | st.floats(1e9, 2e9),
                },
            ),
            max_size=3,
        ),
    }
)


@settings(max_examples=2000, deadline=None)
@given(_GOOD_DELIVERY, st.data(), st.booleans())
def test_the_fast_decoder_reads_a_delivery_record_as_the_long_way_does(
    record: dict[str, Any], data: st.DataObject, keys_reversed: bool
) -> None:
    payload = orjson.dumps(_damaged(data, record, keys_reversed))
    both = _read_alike(decode_delivery, payload, _decode_delivery, payload)
    if both is not None:
        delivery, slow = both
        assert delivery == slow
        assert all(type(o.outcome) is RecipientState for o in delivery.outcomes)


def test_a_delivery_record_this_build_writes_is_read_by_the_fast_decoder() -> None:
    delivery = Delivery(
        "01M8F03XACGQS64EH9EC0A33KR",
        1_800_000_000.0,
        "mx.example.net",
        (
            Outcome("bob@example.net", "deferred", "4.2.1", "451 busy", 2, 1_800_000_600.0),
            Outcome("carol@example.org", "sent", "2.0.0"),
        ),
    )
    payload = encode_delivery(delivery)
    assert _DELIVERY.decode(payload) == delivery
    decoded = decode_delivery(payload)
    assert decoded == delivery
    assert decoded.outcomes[0].outcome is RecipientState.DEFERRED
    assert decoded.outcomes[1].status is sys.intern("2.0.0")
    assert decoded.mta is sys.intern("mx.example.net")


def test_a_head_this_build_writes_comes_back_interned_and_shared() -> None:
    """The fast decoder keeps what a deep queue's memory relies on: one string for equal
    members, senders and categories, one dict for equal client and metadata dicts."""
    record = accepted_record("bob@example.net", Recipient("carol@example.org", ("FAILURE",)))
    payload = encode_accepted(record, b"Subject: x\r\n\r\nhi\r\n")
    raw = payload[_LEN.size : _LEN.size + _LEN.unpack_from(payload)[0]]
    assert _HEAD.decode(raw) == record  # what this build writes, the fast decoder reads
    first, _ = decode_accepted(payload)
    second, _ = decode_accepted(bytes(payload))  # a copy: nothing shared by the input
    assert first == second == record
    assert first.did is second.did is sys.intern(record.did)
    assert first.sender is second.sender
    assert first.category is second.category
    assert first.client is second.client is shared(dict(record.client))
    assert first.metadata is second.metadata


def test_an_empty_notify_or_orcpt_list_reads_as_none_either_way() -> None:
    """The long way's rule (an empty list is "not given"), which the fast decoder would
    read as an empty tuple: such heads go the long way."""
    base = orjson.loads(encode_accepted(accepted_record("bob@example.net"), b"")[_LEN.size :])
    for key in ("notify", "orcpt"):
        head = {**base, "rcpt": [{"addr": "bob@example.net", key: []}]}
        record, _ = decode_accepted(_payload(head))
        assert record.recipients == (Recipient("bob@example.net"),)


def test_an_idempotency_key_is_an_array_in_the_head() -> None:
    record = msgspec.structs.replace(
        accepted_record("bob@example.net"),
        idem=Idempotency("k", "d", (("x@example.net", "RECIPIENT_SUPPRESSED", "why"),)),
    )
    payload = encode_accepted(record, b"")
    head = orjson.loads(payload[_LEN.size :])
    assert head["idem"] == ["k", "d", [["x@example.net", "RECIPIENT_SUPPRESSED", "why"]]]
    assert decode_accepted(payload)[0].idem == record.idem
    assert _HEAD.decode(payload[_LEN.size :]).idem == record.idem  # without the long way


CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


@given(st.integers(0, 2**48 - 1), st.integers(0, 2**80 - 1))
def test_a_queue_id_is_the_ulid_of_its_time_and_random_bits(ms: int, r: int) -> None:
    """Five bits a character, the most significant first (read here one at a time, as the
    ULID layout defines it), whatever the encoder does to be quick."""
    value = (ms << 80) | r
    assert ulid(ms, r) == "".join(CROCKFORD[(value >> (5 * i)) & 31] for i in range(25, -1, -1))


def test_queue_ids_carry_their_millisecond_and_sort_by_it() -> None:
    ids = [new_queue_id(1_800_000_000.0 + k / 1000) for k in range(0, 3000, 7)]
    for k, qid in zip(range(0, 3000, 7), ids, strict=True):
        assert len(qid) == 26 and set(qid) <= set(CROCKFORD)
        decoded = 0
        for c in qid:
            decoded = decoded * 32 + CROCKFORD.index(c)
        assert decoded >> 80 == int((1_800_000_000.0 + k / 1000) * 1000)
    assert ids == sorted(ids)
    assert len({new_queue_id(1_800_000_000.0) for _ in range(100)}) == 100  # random bits differ
