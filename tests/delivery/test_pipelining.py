"""Delivery pipelines the envelope where the remote offers PIPELINING (RFC 2920): MAIL, every
RCPT and DATA go in one group (after an RSET where the transaction before was left open), the replies are read in turn and each decides its own
recipient's outcome, over real sockets on 127.0.0.1.

The remote here answers nothing until the group's last command (DATA) has arrived, so a
client that waited for each reply would never get one: every test below also proves that the
group went out whole."""

from __future__ import annotations

import contextlib
import functools
import time

import attrs
import pytest
import trio

from atmosrelay.delivery.dispatcher import DeliverySettings, Dispatcher
from atmosrelay.delivery.resolver import Destination
from atmosrelay.queue.records import Outcome, RecordType, decode_delivery
from atmosrelay.queue.store import QueueStore
from journal import open_journal
from journal.testing import CrashableMemFS
from tests.delivery.test_client_session import MESSAGE, tls
from tests.delivery.test_dispatcher import FakeResolver
from tests.queue.factories import accepted_record

Script = dict[str, bytes]  # "MAIL", "RCPT <address>", "DATA", "END" -> the reply


@attrs.define
class GroupingMX:
    """An MX offering PIPELINING that holds its replies until a group ends (DATA, QUIT, or
    with ``chunking`` a BDAT and its chunk), then answers the group's commands in order.
    ``groups`` records each group's verbs, ``chunks`` the octets of each BDAT chunk."""

    script: Script
    chunking: bool = False  # offer CHUNKING (RFC 3030)
    groups: list[list[str]] = attrs.field(factory=list)
    chunks: list[bytes] = attrs.field(factory=list)

    def reply(self, command: str) -> bytes:
        verb = command.split(" ", 1)[0].upper()
        if verb == "RCPT":
            address = command.split("<", 1)[1].split(">", 1)[0]
            return self.script.get(f"RCPT {address}", b"250 2.1.5 ok\r\n")
        defaults = {"MAIL": b"250 2.1.0 ok\r\n", "RSET": b"250 ok\r\n"}
        return self.script.get(verb, defaults.get(verb, b"250 ok\r\n"))

    def replies(self, group: list[str]) -> list[bytes]:
        """Each command's reply; DATA (or BDAT), unless scripted, as a real server answers it:
        354 (250) when a recipient of the group was accepted, 554 when none was."""
        replies = [self.reply(g) for g in group]
        verb = group[-1].split(" ", 1)[0].upper()
        if verb in ("DATA", "BDAT") and verb not in self.script:
            taken = any(
                r.startswith(b"2") for g, r in zip(group, replies, strict=True) if g[:4] == "RCPT"
            )
            go = b"354 go\r\n" if verb == "DATA" else b"250 2.0.0 queued\r\n"
            replies[-1] = go if taken else b"554 5.5.1 no valid recipients\r\n"
        return replies

    async def serve(self, stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async with stream:
                await self._converse(stream)

    async def _converse(self, stream: trio.SocketStream) -> None:
        await stream.send_all(b"220 mx ESMTP\r\n")
        buf, group, in_data = b"", [], False
        while data := await stream.receive_some(65536):
            buf += data
            while b"\r\n" in buf:
                raw, buf = buf.split(b"\r\n", 1)
                line = raw.decode("ascii", "replace")
                if in_data:
                    if line == ".":
                        in_data = False
                        await stream.send_all(self.script.get("END", b"250 2.0.0 queued\r\n"))
                    continue
                verb = line.split(" ", 1)[0].upper()
                if verb == "EHLO":
                    offer = b"250-CHUNKING\r\n" if self.chunking else b""
                    await stream.send_all(
                        b"250-mx\r\n250-PIPELINING\r\n" + offer + b"250 8BITMIME\r\n"
                    )
                    continue
                group.append(line)
                if verb == "BDAT":  # its chunk follows at once, CRLFs and all
                    size = int(line.split(" ")[1])
                    while len(buf) < size:
                        more = await stream.receive_some(65536)
                        if not more:
                            return
                        buf += more
                    self.chunks.append(buf[:size])
                    buf = buf[size:]
                elif verb not in ("DATA", "QUIT"):
                    continue  # held: the group is not over
                self.groups.append([g.split(" ", 1)[0].upper() for g in group])
                replies = self.replies(group)
                group = []
                closing = next((i for i, r in enumerate(replies) if r.startswith(b"421")), None)
                if closing is not None:  # a 421 ends the connection (RFC 5321 3.8)
                    await stream.send_all(replies[closing])
                    return
                await stream.send_all(b"".join(replies))
                if verb == "QUIT":
                    return
                in_data = replies[-1].startswith(b"354")


async def deliver(mx: GroupingMX, *messages: tuple[str, ...]) -> list[tuple[Outcome, ...]]:
    """Queue one message per tuple of recipients, all to ``mx`` over one connection (lane
    concurrency 1), and return each message's first recorded outcomes, in order."""
    async with trio.open_nursery() as nursery:
        serve = functools.partial(trio.serve_tcp, mx.serve, 0, host="127.0.0.1")
        (listener,) = await nursery.start(serve)
        destination = Destination((("127.0.0.1", listener.socket.getsockname()[1]),))
        async with open_journal("/q", fs=CrashableMemFS()) as journal:
            queue = QueueStore(journal)
            dispatcher = Dispatcher(
                queue,
                FakeResolver({"example.net": destination}),
                DeliverySettings(
                    helo="relay.test", tls=tls(), operator_domain="relay.test", concurrency=1
                ),
            )
            ids = []
            for recipients in messages:
                record = accepted_record(
                    *recipients, accepted_at=time.time(), size=len(MESSAGE), category="receipt"
                )
                await queue.accept(record, MESSAGE)
                ids.append(record.id)
            async with trio.open_nursery() as lanes:
                await lanes.start(dispatcher.run)
                with trio.fail_after(20):
                    found = await _outcomes(queue, ids)
                lanes.cancel_scope.cancel()
        nursery.cancel_scope.cancel()
    return found


async def _outcomes(queue: QueueStore, ids: list[str]) -> list[tuple[Outcome, ...]]:
    while True:
        found: dict[str, tuple[Outcome, ...]] = {}
        for r in queue.journal.records():
            if r.type == RecordType.DELIVERY:
                d = decode_delivery(r.payload)
                found.setdefault(d.id, d.outcomes)
        if all(i in found for i in ids):
            return [found[i] for i in ids]
        await trio.sleep(0.02)


def transactions(mx: GroupingMX) -> list[list[str]]:
    """The groups the MX received, but a QUIT (whether the lane closed the connection before
    the test ended is not the test's business)."""
    return [g for g in mx.groups if g != ["QUIT"]]


def summary(outcomes: tuple[Outcome, ...]) -> list[tuple[str, str, str]]:
    return [(o.recipient, o.outcome, o.status) for o in outcomes]


async def test_the_envelope_goes_in_one_group_and_the_next_needs_no_rset() -> None:
    mx = GroupingMX({})
    first, second = await deliver(mx, ("a@example.net", "b@example.net"), ("c@example.net",))
    assert summary(first) == [
        ("a@example.net", "sent", "2.0.0"),
        ("b@example.net", "sent", "2.0.0"),
    ]
    assert summary(second) == [("c@example.net", "sent", "2.0.0")]
    # two transactions on one connection: the first ended with its end of data, so the
    # second begins with MAIL
    assert transactions(mx) == [["MAIL", "RCPT", "RCPT", "DATA"], ["MAIL", "RCPT", "DATA"]]


@pytest.mark.parametrize("end", ["DATA", "BDAT"])
async def test_a_transaction_left_open_is_reset_in_the_next_group(end: str) -> None:
    # every recipient of the first refused: MAIL stays taken and DATA (or the chunk) is
    # refused, so the transaction is still open when the second message uses the connection
    mx = GroupingMX({"RCPT a@example.net": b"550 5.1.1 unknown\r\n"}, chunking=end == "BDAT")
    first, second, third = await deliver(
        mx, ("a@example.net",), ("c@example.net",), ("d@example.net",)
    )
    assert summary(first) == [("a@example.net", "bounced", "5.1.1")]
    assert summary(second) == [("c@example.net", "sent", "2.0.0")]
    assert summary(third) == [("d@example.net", "sent", "2.0.0")]
    assert transactions(mx) == [
        ["MAIL", "RCPT", end],
        ["RSET", "MAIL", "RCPT", end],
        ["MAIL", "RCPT", end],
    ]
    assert "unknown" in (first[0].reply or "")  # the RCPT's words, not the 554 after


async def test_each_recipient_gets_its_own_reply() -> None:
    mx = GroupingMX(
        {
            "RCPT b@example.net": b"550 5.1.1 no such user\r\n",
            "RCPT c@example.net": b"452 4.2.2 mailbox full\r\n",
        }
    )
    (outcomes,) = await deliver(mx, ("a@example.net", "b@example.net", "c@example.net"))
    assert summary(outcomes) == [
        ("a@example.net", "sent", "2.0.0"),
        ("b@example.net", "bounced", "5.1.1"),
        ("c@example.net", "deferred", "4.2.2"),
    ]
    assert "no such user" in (outcomes[1].reply or "")


async def test_a_refused_sender_decides_every_recipient_and_no_content_is_sent() -> None:
    mx = GroupingMX(
        {
            "MAIL": b"550 5.7.1 sender refused\r\n",
            "RCPT a@example.net": b"503 5.5.1 MAIL first\r\n",
            "RCPT b@example.net": b"503 5.5.1 MAIL first\r\n",
            "DATA": b"503 5.5.1 no valid recipients\r\n",
        }
    )
    (outcomes,) = await deliver(mx, ("a@example.net", "b@example.net"))
    assert summary(outcomes) == [
        ("a@example.net", "bounced", "5.7.1"),
        ("b@example.net", "bounced", "5.7.1"),
    ]
    assert all("sender refused" in (o.reply or "") for o in outcomes)


async def test_every_recipient_refused_and_data_refused() -> None:
    mx = GroupingMX(
        {
            "RCPT a@example.net": b"550 5.1.1 unknown\r\n",
            "DATA": b"554 5.5.1 no valid recipients\r\n",
        }
    )
    (outcomes,) = await deliver(mx, ("a@example.net",))
    assert summary(outcomes) == [("a@example.net", "bounced", "5.1.1")]
    assert "unknown" in (outcomes[0].reply or "")


@pytest.mark.parametrize("end", ["DATA", "BDAT"])
async def test_a_421_mid_group_defers_the_rest_with_the_remote_words(end: str) -> None:
    mx = GroupingMX({"RCPT b@example.net": b"421 4.3.2 going down\r\n"}, chunking=end == "BDAT")
    (outcomes,) = await deliver(mx, ("a@example.net", "b@example.net"))
    # a was accepted, but DATA never ran: both wait for the retry, with the 421's text
    assert [(o.recipient, o.outcome) for o in outcomes] == [
        ("a@example.net", "deferred"),
        ("b@example.net", "deferred"),
    ]
    assert all("going down" in (o.reply or "") for o in outcomes)


async def test_with_chunking_envelope_and_content_go_in_one_group() -> None:
    """CHUNKING (RFC 3030) with PIPELINING: MAIL, every RCPT and BDAT LAST with the content
    in one group, which this MX answers only once it has read the whole chunk; the content
    arrives as it is, not dot-stuffed."""
    mx = GroupingMX({}, chunking=True)
    first, second = await deliver(mx, ("a@example.net", "b@example.net"), ("c@example.net",))
    assert summary(first) == [
        ("a@example.net", "sent", "2.0.0"),
        ("b@example.net", "sent", "2.0.0"),
    ]
    assert summary(second) == [("c@example.net", "sent", "2.0.0")]
    assert transactions(mx) == [["MAIL", "RCPT", "RCPT", "BDAT"], ["MAIL", "RCPT", "BDAT"]]
    assert mx.chunks == [MESSAGE, MESSAGE]
    assert b"\r\n.dot first" in MESSAGE  # what DATA would have stuffed


async def test_with_chunking_a_refused_sender_decides_every_recipient() -> None:
    mx = GroupingMX(
        {
            "MAIL": b"550 5.7.1 sender refused\r\n",
            "RCPT a@example.net": b"503 5.5.1 MAIL first\r\n",
            "BDAT": b"503 5.5.1 MAIL first\r\n",
        },
        chunking=True,
    )
    (outcomes,) = await deliver(mx, ("a@example.net",))
    assert summary(outcomes) == [("a@example.net", "bounced", "5.7.1")]
    assert "sender refused" in (outcomes[0].reply or "")


async def test_bdat_refused_as_unknown_defers_and_the_next_message_goes_by_data() -> None:
    """A remote that offers CHUNKING but answers BDAT as an unknown command (500, 502) has
    given no verdict on the message, and may have read its content as commands: accepted
    recipients are deferred (not bounced) with its words, refused ones keep their RCPT
    reply, and the next message goes on a new connection (no RSET: nothing to reset), by
    DATA: the host is remembered as not understanding BDAT (delivery/quirks.py)."""
    mx = GroupingMX(
        {
            "BDAT": b"500 5.5.1 command unrecognized\r\n",
            "RCPT b@example.net": b"550 5.1.1 unknown\r\n",
        },
        chunking=True,
    )
    first, second = await deliver(mx, ("a@example.net", "b@example.net"), ("c@example.net",))
    assert summary(first) == [
        ("a@example.net", "deferred", "4.5.0"),
        ("b@example.net", "bounced", "5.1.1"),
    ]
    assert summary(second) == [("c@example.net", "sent", "2.0.0")]
    assert "CHUNKING was offered: 500 5.5.1 command unrecognized" in (first[0].reply or "")
    assert transactions(mx) == [["MAIL", "RCPT", "RCPT", "BDAT"], ["MAIL", "RCPT", "DATA"]]
