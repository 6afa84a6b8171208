"""The journal's writer waits for the records of sessions in their data phase, and for no
one else (server/context.py ``gather``; journal/_journal.py): a lone sender's record goes
at once; a record that comes while another session is reading its message is held until
that one's end of data is read (or it ends otherwise), and both share one fsync. Real
loopback sockets; the wait's bound is set far beyond the test, so that only the other
session can end it: nothing here depends on timing."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import trio

import journal._journal as journal_module
from atmosrelay.server.context import SessionContext
from tests.relay.test_reply_at_fsync import MESSAGE, memory, plain, session
from tests.relay.test_session_deadlines import Peer, context


async def _envelope(peer: Peer) -> None:
    assert (await peer.cmd(b"EHLO c")).startswith(b"250")
    assert (await peer.cmd(b"MAIL FROM:<alice@example.org>")).startswith(b"250")
    assert (await peer.cmd(b"RCPT TO:<bob@example.net>")).startswith(b"250")


class Recorded:
    """The context's ``gather``, with what it told the writer each time it woke for records
    (``asked`` is set after the first: the writer then holds its batch until its wait
    ends, as tests/journal/test_gather.py says)."""

    def __init__(self, ctx: SessionContext) -> None:
        self.gather = ctx.gather
        self.answers: list[float] = []
        self.asked = threading.Event()
        ctx.queue.journal.gather = self

    def __call__(self) -> float:
        self.answers.append(self.gather())
        self.asked.set()
        return self.answers[-1]


async def test_a_lone_senders_records_are_never_held(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with context(tmp_path, group_wait=0.01) as ctx, session(ctx, plain) as peer:
            recorded = Recorded(ctx)
            await _envelope(peer)
            for _ in range(3):
                assert (await peer.cmd(b"DATA")).startswith(b"354")
                assert ctx.in_data == 1
                assert (await peer.cmd(MESSAGE[:-2])).startswith(b"250 2.0.0 Ok: queued")
                assert (await peer.cmd(b"MAIL FROM:<alice@example.org>")).startswith(b"250")
                assert (await peer.cmd(b"RCPT TO:<bob@example.net>")).startswith(b"250")
            assert ctx.in_data == 0  # counted out with its end of data, before the append
    assert recorded.answers == [0.0, 0.0, 0.0]  # one wake a record, none told to wait


@pytest.mark.parametrize("other_ends", ["its message", "by closing"])
async def test_a_record_waits_for_the_message_another_session_is_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, other_ends: str
) -> None:
    monkeypatch.setattr(journal_module, "MAX_GATHER", 3600.0)
    with trio.fail_after(30):
        async with context(tmp_path, group_wait=3600.0) as ctx:
            journal = ctx.queue.journal
            recorded = Recorded(ctx)
            async with session(ctx, plain) as first, session(ctx, plain) as other:
                await _envelope(first)
                await _envelope(other)
                assert (await other.cmd(b"DATA")).startswith(b"354")  # reading its message
                assert (await first.cmd(b"DATA")).startswith(b"354")
                batches = journal.batches
                await first.stream.send_all(MESSAGE)  # the whole message and its end
                # the writer woke for it and holds it
                assert await trio.to_thread.run_sync(recorded.asked.wait, 30)
                assert recorded.answers == [3600.0]
                assert ctx.in_data == 1 and not ctx.queue.state.messages
                if other_ends == "its message":
                    await other.stream.send_all(MESSAGE)
                    assert (await other.reply()).startswith(b"250 2.0.0 Ok: queued")
                else:
                    await other.stream.aclose()
                assert (await first.reply()).startswith(b"250 2.0.0 Ok: queued")
                assert journal.batches == batches + 1  # one write and fsync for what came
                assert ctx.in_data == 0
            assert len(ctx.queue.state.messages) == (2 if other_ends == "its message" else 1)


BODY = MESSAGE[: -len(b".\r\n")]  # the message without DATA's end

# How a data phase can end: what the client sends, the reply it gets (None: it closes its
# side, and the session its own), and how many data phases are counted after it.
Step = tuple[bytes, bytes | None, int]
ENDINGS: dict[str, list[Step]] = {
    "a message": [(b"DATA", b"354", 1), (MESSAGE[:-2], b"250", 0)],
    "a refused message (bare LF)": [
        (b"DATA", b"354", 1),
        (b"From: a@example.org\r\n\r\nbare\nLF\r\n.", b"5", 0),
    ],
    "closed inside DATA": [
        (b"DATA", b"354", 1),
        (b"From: a@example.org\r\n\r\npart", None, 0),
    ],
    # (``cmd`` ends each with CRLF: a chunk's size counts it)
    "closed between BDAT chunks": [(b"BDAT 6\r\nFrom", b"250", 1), (b"", None, 0)],
    "BDAT LAST": [(b"BDAT %d LAST\r\n" % len(BODY) + BODY[:-2], b"250 2.0.0 Ok: queued", 0)],
}


@pytest.mark.parametrize("ending", list(ENDINGS))
async def test_every_data_phase_is_counted_out(tmp_path: Path, ending: str) -> None:
    with trio.fail_after(30):
        async with context(tmp_path) as ctx, session(ctx, memory) as peer:
            await _envelope(peer)
            assert ctx.in_data == 0  # MAIL and RCPT are not a data phase
            stream = peer.stream
            assert isinstance(stream, trio.StapledStream)
            for data, reply, counted in ENDINGS[ending]:
                if reply is not None:
                    assert (await peer.cmd(data)).startswith(reply)
                else:
                    await stream.send_all(data)
                    await stream.send_stream.aclose()
                    assert await peer.reply() == b""  # the session has ended
                assert ctx.in_data == counted
            assert ctx.gather() == 0.0
