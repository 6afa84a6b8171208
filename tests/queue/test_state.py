"""The queue state fold: acceptance, delivery outcomes, deletion; replay is idempotent."""

from __future__ import annotations

from atmosrelay.queue.records import (
    Accepted,
    Delivery,
    Idempotency,
    Outcome,
    Recipient,
    RecordType,
    decode_accepted,
    decode_delivery,
    encode_accepted,
    encode_deleted,
    encode_delivery,
    new_queue_id,
    shared,
)
from atmosrelay.queue.state import DSN_FOR, DSN_RECIPIENTS, fold
from journal import Log, Position, Record
from journal.testing import CrashableMemFS
from tests.queue.factories import accepted_record

QID = new_queue_id(1_800_000_000.0)


def accepted(qid: str = QID) -> Record:
    record = accepted_record(
        "bob@example.net", Recipient("carol@example.org", ("FAILURE",)), queue_id=qid
    )
    return Record(
        1,
        RecordType.ACCEPTED,
        encode_accepted(record, b"Subject: x\r\n\r\nhi\r\n"),
        Position(1, 32),
    )


def delivery(seq: int, *outcomes: Outcome, qid: str = QID) -> Record:
    d = Delivery(qid, 1_800_000_100.0 + seq, "mx.example.net", outcomes)
    return Record(seq, RecordType.DELIVERY, encode_delivery(d), Position(1, 100 + seq))


DEFER = Outcome("bob@example.net", "deferred", "4.2.0", "450 4.2.0 try later", 1, 1_800_000_220.0)
SENT_BOB = Outcome("bob@example.net", "sent", "2.0.0", "250 2.0.0 ok", 2)
BOUNCE_CAROL = Outcome("carol@example.org", "bounced", "5.1.1", "550 5.1.1 no such user", 1)


def test_lifecycle_to_terminal() -> None:
    state = fold([accepted(), delivery(2, DEFER)])
    msg = state.messages[QID]
    assert msg.recipient_states == {"bob@example.net": "deferred", "carol@example.org": "accepted"}
    assert msg.next_at == {"bob@example.net": 1_800_000_220.0}
    state.apply(delivery(3, SENT_BOB, BOUNCE_CAROL))
    assert msg.recipient_states == {"bob@example.net": "sent", "carol@example.org": "bounced"}
    assert msg.terminal
    assert msg.attempts == {"bob@example.net": 2, "carol@example.org": 1}
    assert msg.next_at == {}
    assert [d.outcomes[0].reply for d in msg.history] == ["450 4.2.0 try later", "250 2.0.0 ok"]
    # carol asked for FAILURE notices: a DSN is owed until a DSN record covers her
    assert msg.dsn_owed() == ["carol@example.org"] and not msg.dead
    assert state.dead_positions() == set()


def test_a_dsn_record_covers_the_bounce_and_the_message_becomes_dead() -> None:
    state = fold([accepted(), delivery(2, SENT_BOB, BOUNCE_CAROL)])
    assert state.messages[QID].dsn_owed() == ["carol@example.org"]
    dsn = accepted_record(
        "alice@example.org",
        accepted_at=1_800_000_300.0,
        sender="",
        category="transactional",
        metadata={DSN_FOR: QID, DSN_RECIPIENTS: "carol@example.org"},
    )
    state.apply(Record(4, RecordType.ACCEPTED, encode_accepted(dsn, b"x"), Position(2, 32)))
    assert state.messages[QID].dead
    assert state.dead_positions() == {Position(1, 32), Position(1, 102)}
    state.compacted({1, 2}, {Position(2, 32): Position(3, 32)})
    assert QID not in state.messages
    assert state.messages[dsn.id].position == Position(3, 32)


def test_replay_is_idempotent_and_terminal_states_stay() -> None:
    records = [accepted(), delivery(2, DEFER), delivery(3, SENT_BOB)]
    once = fold(records)
    twice = fold([*records, *records])  # a crash during compaction leaves duplicates
    assert once.messages[QID].recipient_states == twice.messages[QID].recipient_states
    assert len(twice.messages[QID].history) == 2
    late = fold([*records, delivery(9, DEFER)])  # an outcome after "sent" cannot undo it
    assert late.messages[QID].recipient_states["bob@example.net"] == "sent"


def test_orphans_and_deletion() -> None:
    state = fold([delivery(2, DEFER)])
    assert state.orphan_outcomes == 1
    assert not state.messages
    state = fold(
        [
            accepted(),
            Record(5, RecordType.DELETED, encode_deleted(QID, 1.0, "operator"), Position(1, 500)),
        ]
    )
    assert QID not in state.messages
    assert state.dead_positions() == {Position(1, 32), Position(1, 500)}  # both compactable


def test_an_accepted_record_decodes_to_itself_field_by_field() -> None:
    """Every field holds a value of its own (none left at its default), so a field the codec
    drops, defaults or mixes up with another fails here."""
    record = Accepted(
        id=QID,
        accepted_at=1_800_000_123.5,
        did="did:plc:zyxwvutsrqponmlkjihgfedc",
        sender="sender@example.org",
        recipients=(
            Recipient("plain@example.net"),
            Recipient("dsn@example.net", ("SUCCESS", "DELAY"), ("rfc822", "orig@example.net")),
            Recipient("gone@example.net", suppressed=True),
        ),
        ret="HDRS",
        envid="envelope-7",
        category="newsletter",
        bulk=True,
        tags=("tag-a", "tag-b"),
        metadata={"campaign": "spring"},
        client={"ip": "192.0.2.7", "helo": "client.example"},
        size=4242,
        message_id="<m-1@example.org>",
        idem=Idempotency("idem-key", "digest-9", (("x@example.net", "5.7.1", "suppressed"),)),
    )
    message = b"Subject: all fields\r\n\r\nbody\r\n"
    payload = encode_accepted(record, message)
    decoded, offset = decode_accepted(payload)
    assert decoded == record
    assert payload[offset:] == message


def test_codec_round_trip_through_the_journal() -> None:
    fs = CrashableMemFS()
    log, _ = Log.open(fs, "/q")
    log.write_batch(
        [
            (RecordType.ACCEPTED, accepted().payload),
            (RecordType.DELIVERY, delivery(2, DEFER).payload),
        ]
    )
    log.close()
    log, _ = Log.open(fs.crash_clone(), "/q")
    records = list(log.records())
    assert decode_delivery(records[1].payload).outcomes == (DEFER,)
    state = fold(records)
    assert state.messages[QID].recipient_states["bob@example.net"] == "deferred"


def test_messages_share_empty_and_equal_parts_and_never_each_others_writes() -> None:
    """A deep queue after a restart holds every message: equal ``client`` dicts and empty
    ``metadata`` are one dict each, and a message's first deferral gives it a retry map of
    its own (the shared empty one is read-only, and stays empty); attempts come from the
    history."""
    other = new_queue_id(1_800_000_001.0)
    state = fold(
        [
            accepted(),
            Record(
                2,
                RecordType.ACCEPTED,
                encode_accepted(
                    accepted_record("dave@example.net", queue_id=other), b"Subject: y\r\n\r\n"
                ),
                Position(1, 64),
            ),
            delivery(3, Outcome("bob@example.net", "deferred", "4.2.1", "451", 1, 1.9e9)),
        ]
    )
    first, second = state.messages[QID], state.messages[other]
    assert first.record.client is second.record.client
    assert first.record.metadata is second.record.metadata == {}
    assert dict(first.attempts) == {"bob@example.net": 1}
    assert dict(first.next_at) == {"bob@example.net": 1.9e9}
    assert (second.attempts, dict(second.next_at), second.history) == ({}, {}, ())
    assert type(second.next_at) is not dict  # the shared read-only empty map, untouched
    state.apply(delivery(4, Outcome("dave@example.net", "sent", "2.0.0", "250"), qid=other))
    assert dict(second.attempts) == {"dave@example.net": 1}
    assert dict(first.attempts) == {"bob@example.net": 1}
    assert (dict(second.next_at), len(second.history)) == ({}, 1)


def test_an_unshareable_dict_is_decoded_as_its_own() -> None:
    value = {"tags": ["a", "b"]}  # a list: not hashable, so not shared
    copy = shared(value)
    assert copy == value and copy is not value and shared(value) is not copy
    small = shared({"ip": "192.0.2.1", "tls": None})
    assert shared({"ip": "192.0.2.1", "tls": None}) is small


def test_a_message_deleted_while_a_compaction_runs_is_dead_where_its_copy_stands() -> None:
    """The compaction was told what was dead before the delete, so it copied the message's
    record forward; the graveyard follows the copy, so the next compaction drops it."""
    state = fold([accepted()])
    assert state.dead_positions() == set()  # what the compaction is given
    state.add_deleted(QID, Position(2, 500))  # the operator deletes it meanwhile
    state.compacted({1}, {Position(1, 32): Position(3, 32)})  # segment 1 copied, removed
    assert QID not in state.messages
    assert state.dead_positions() == {Position(3, 32), Position(2, 500)}
