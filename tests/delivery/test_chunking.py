"""Delivery with BDAT (RFC 3030) to a remote that offers CHUNKING, against the fake MX of
test_client_session (our own ServerConnection, which reads BDAT as RFC 3030 says), over trio
memory streams: the bytes arrive as DATA would have delivered them, every outcome is the one
DATA would have given, a transaction left open is reset, and each wait has its limit.

The remote answering a pipelined group only once it has read the whole chunk (so a client
that waited for a reply before sending the content would never get one) is in
test_pipelining.py; a real Postfix as the remote in test_postfix_remote.py."""

from __future__ import annotations

import tracemalloc

import pytest
import trio
import trio.testing

from atmosrelay.delivery.client_session import (
    DATA_BLOCK_TIMEOUT,
    DATA_END_TIMEOUT,
    INLINE_CHUNK,
    Envelope,
    open_remote,
)
from atmosrelay.smtp import Capabilities, LocalProtocolError, Reply
from tests.delivery.test_client_session import ENV, MESSAGE, Host, dest, fake_mx, go, tls

CHUNKING = Capabilities(size=None, chunking=True)
DATA_ONLY = Capabilities(size=None, chunking=False)
MESSAGES = {
    "dot-lines": MESSAGE,
    "dot-first": b".starts with a dot\r\n..two\r\n.\r\nend\r\n",
    "no-final-crlf": b"Subject: x\r\n\r\nno line end at the end",
    "empty": b"",
    "8-bit": "Subject: x\r\n\r\nBödy\r\n".encode(),
    # over INLINE_CHUNK: the envelope's replies first, then the chunk in pieces
    "large": b"Subject: big\r\n\r\n" + b".line of a large message\r\n" * 60_000,
}


def _verbs(spec: Host) -> list[str]:
    return [c for c in spec.commands if c in ("Rset", "MailFrom", "Data", "BdatChunk")]


@pytest.mark.parametrize("name", MESSAGES)
async def test_bdat_delivers_the_bytes_data_would_have(name: str) -> None:
    """The same message through DATA (dot-stuffed) and through BDAT (not stuffed) arrives
    as the same octets, and the BDAT host saw no DATA."""
    message = MESSAGES[name]
    chunked, data = Host(caps=CHUNKING), Host(caps=DATA_ONLY)
    async with fake_mx(chunked=chunked, data=data) as mx:
        for host in ("chunked", "data"):
            _, outcomes = await go(mx, dest(host), message=message)
            assert {o.outcome for o in outcomes.values()} == {"sent"}, host
    assert chunked.received == data.received
    assert len(chunked.received) == 1 and chunked.received[0].startswith(message)
    assert _verbs(chunked) == ["MailFrom", "BdatChunk"]
    assert _verbs(data) == ["MailFrom", "Data"]
    if name == "large":
        assert len(message) > INLINE_CHUNK


REFUSED = Reply(550, "5.1.1", ("No such user",))
BUSY = Reply(450, "4.2.1", ("Mailbox busy",))
CASES = {
    "all-taken": ({}, None),
    "mixed": ({"bob@example.net": REFUSED, "carol@example.net": BUSY}, None),
    "all-refused": (dict.fromkeys(ENV.recipients, REFUSED), None),
    "final-refused": ({"bob@example.net": REFUSED}, Reply(554, "5.7.1", ("Spam",))),
    "final-deferred": ({}, Reply(451, "4.3.0", ("Try later",))),
}


@pytest.mark.parametrize("pipelining", [True, False])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", ["dot-lines", "large"])
async def test_each_recipient_gets_the_outcome_data_would_have_given(
    case: str, pipelining: bool, name: str
) -> None:
    """Refused recipients take their RCPT reply and the accepted ones the reply to the end
    of the content, with BDAT as with DATA; where every recipient was refused, the reply to
    the chunk (which the server reads and refuses) changes nothing."""
    rcpt, final = CASES[case]
    outcomes = {}
    for chunking in (True, False):
        caps = Capabilities(size=None, chunking=chunking, pipelining=pipelining)
        async with fake_mx(mx1=Host(caps=caps, rcpt=dict(rcpt), final=final)) as mx:
            _, got = await go(mx, dest("mx1"), message=MESSAGES[name])
        outcomes[chunking] = got
    assert outcomes[True] == outcomes[False]
    expected = {"all-taken": {"sent"}, "all-refused": {"bounced"}, "final-deferred": {"deferred"}}
    if case in expected:
        assert {o.outcome for o in outcomes[True].values()} == expected[case]


@pytest.mark.parametrize("pipelining", [True, False])
@pytest.mark.parametrize("name", ["dot-lines", "large"])
async def test_rset_only_after_a_transaction_left_open(pipelining: bool, name: str) -> None:
    """After a chunk the server took, the next transaction needs no RSET; after every
    recipient refused, or the chunk refused, it starts with one (where the server's
    transaction may still stand)."""
    refused = Envelope("alice@example.org", ("bob@example.net",))
    taken = Envelope("alice@example.org", ("dave@example.net",))
    spam = Envelope("alice@example.org", ("erin@example.net",))
    spec = Host(
        caps=Capabilities(size=None, chunking=True, pipelining=pipelining),
        rcpt={"bob@example.net": REFUSED},
    )
    async with fake_mx(mx1=spec) as mx:
        with trio.fail_after(10):
            remote = await open_remote(
                dest("mx1"), helo="relay.test", tls=tls(), connect=mx.connect
            )
            results = [await remote.send(e, MESSAGES[name]) for e in (refused, taken, taken)]
            spec.final = Reply(554, "5.7.1", ("Spam",))
            results.append(await remote.send(spam, MESSAGES[name]))
            spec.final = None
            results.append(await remote.send(taken, MESSAGES[name]))
            await remote.aclose()
    assert [[o.outcome for o in r] for r in results] == [
        ["bounced"],
        ["sent"],
        ["sent"],
        ["bounced"],
        ["sent"],
    ]
    # the first chunk: refused unread where it was pipelined (this server then skips its
    # octets, or the next MAIL would not parse), not sent at all otherwise
    assert _verbs(spec) == [
        *("MailFrom",),
        *("Rset", "MailFrom", "BdatChunk"),
        *("MailFrom", "BdatChunk"),
        *("MailFrom", "BdatChunk"),
        *("Rset", "MailFrom", "BdatChunk"),
    ]
    assert len(spec.received) == 4  # every chunk this server read whole (the spam too)


@pytest.mark.parametrize("pipelining", [True, False])
async def test_a_large_message_waits_for_its_envelope_replies(pipelining: bool) -> None:
    """A message over INLINE_CHUNK is not sent to a remote that refused every recipient;
    one up to it goes with its envelope where the remote pipelines (and is read, refused)."""
    refused = Host(
        caps=Capabilities(size=None, chunking=True, pipelining=pipelining),
        rcpt=dict.fromkeys(ENV.recipients, REFUSED),
    )
    small = MESSAGES["large"][: INLINE_CHUNK - 1024]
    for message in (MESSAGES["large"], small):
        refused.octets = 0
        async with fake_mx(mx1=refused) as mx:
            _, outcomes = await go(mx, dest("mx1"), message=message)
        assert {o.outcome for o in outcomes.values()} == {"bounced"}
        sent_with_envelope = pipelining and message is small
        assert (refused.octets > len(message)) == sent_with_envelope
        assert refused.octets < 10_000 or sent_with_envelope


async def test_a_large_chunk_is_not_copied_whole_on_its_way_out() -> None:
    """A message of many megabytes goes out as its chunk's line, then the message in pieces:
    never joined to its line first, which would hold a second whole copy a connection (50 MB
    at the default size limit). Measured as the peak of what Python allocated during the
    transaction: the fake MX in this process takes about twice the message to receive it,
    and a whole copy on the way out would bring the peak over three times (it did)."""
    line = b"a line of a large message, seventy octets or so in all, as mail is\r\n"
    message = b"Subject: big\r\n\r\n" + line * 150_000  # 10 MB
    host = Host(caps=CHUNKING)
    async with fake_mx(chunked=host) as mx:
        tracemalloc.start()
        try:
            _, outcomes = await go(mx, dest("chunked"), message=message)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert {o.outcome for o in outcomes.values()} == {"sent"}
    assert host.received == [message]
    assert peak < 2.5 * len(message), f"peak {peak} for a message of {len(message)}"


async def test_bdat_over_starttls() -> None:
    spec = Host(caps=Capabilities(size=None, chunking=True, starttls=True))
    async with fake_mx(mx1=spec) as mx:
        for name in ("dot-lines", "large"):
            _, outcomes = await go(mx, dest("mx1"), message=MESSAGES[name], require_tls=True)
            assert {o.outcome for o in outcomes.values()} == {"sent"}
    assert spec.received == [MESSAGES["dot-lines"], MESSAGES["large"]]
    assert _verbs(spec) == ["MailFrom", "BdatChunk"] * 2


async def test_chunking_off_sends_data_where_chunking_is_offered() -> None:
    spec = Host(caps=CHUNKING)
    async with fake_mx(mx1=spec) as mx:
        _, outcomes = await go(mx, dest("mx1"), chunking=False)
    assert {o.outcome for o in outcomes.values()} == {"sent"}
    assert _verbs(spec) == ["MailFrom", "Data"]
    assert spec.received == [MESSAGE]


async def test_a_bare_line_ending_raises_with_bdat_as_with_data() -> None:
    """The content goes undotted, yet a bare LF is still refused on this side: the remote
    may pass the message on with DATA to a server that would split it there."""
    async with fake_mx(mx1=Host(caps=CHUNKING)) as mx:
        with pytest.raises(LocalProtocolError, match="bare CR or LF"):
            await go(mx, dest("mx1"), message=b"Subject: x\r\n\r\na bare\nline feed\r\n")
    assert mx.hosts["mx1"].received == []


@pytest.mark.parametrize(
    ("spec", "limit"),
    [
        (Host(caps=CHUNKING, delay=DATA_END_TIMEOUT + 60), DATA_END_TIMEOUT),
        (Host(caps=CHUNKING, lockstep=True, stall_at_bdat=True), DATA_BLOCK_TIMEOUT),
    ],
    ids=["final-reply", "chunk-unread"],
)
async def test_a_remote_that_stops_during_a_chunk_defers_once_its_limit_passes(
    spec: Host, limit: float, autojump_clock: trio.testing.MockClock
) -> None:
    """A remote that never answers the chunk defers every recipient after DATA's end
    limit; one that stops reading it, after the limit of a block of content."""
    message = MESSAGES["large"][: 200 * 1024]  # more than the stream takes unread
    async with fake_mx(mx1=spec) as mx:
        remote = await open_remote(dest("mx1"), helo="relay.test", tls=tls(), connect=mx.connect)
        start = trio.current_time()
        with trio.fail_after(2 * DATA_END_TIMEOUT):
            outcomes = await remote.send(ENV, message + b"\r\n")
        waited = trio.current_time() - start
        assert not remote.usable
        await remote.aclose()
    assert limit <= waited < limit + 1
    assert {(o.outcome, o.status) for o in outcomes} == {("deferred", "4.4.2")}
