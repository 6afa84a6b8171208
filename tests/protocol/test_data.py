"""Message content: smuggling, limits, dot-unstuffing and chunking invariance."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atmosrelay.smtp import (
    Capabilities,
    EndOfMessage,
    MailFrom,
    MessageData,
    MessageRejected,
    ServerConnection,
    State,
)
from atmosrelay.smtp import replies as R
from atmosrelay.smtp._dotstuff import _bare_line_ending, _has_long_line
from tests.protocol.helpers import drive_server, splits

HEAD = b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
SMUGGLED = b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nforged\r\n"

# Every end-of-data variant known from the 2023 SMTP smuggling research, and more.
VARIANTS = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r\n\x00.\r\n",
    b"\r\n.\r\r\n",
    b"\r\n.\n",
    b"\n.\r",
    b"\r.\n",
    b"\r.\r",
    b"\n\n.\n\n",
    b"\r\r\n.\r\r\n",
    b"\r\n.\x00\r\n",
    b"\r\n .\r\n",
    b"\r\n..\r\n",
    b"\r\n.\t\r\n",
]


def outcome(events: list[object]) -> list[object]:
    return [e for e in events if isinstance(e, (MailFrom, EndOfMessage, MessageRejected))]


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.hex() for v in VARIANTS])
@pytest.mark.parametrize("how", ["whole", "bytes", "random"])
def test_smuggling_variant_gives_one_message_or_a_rejection(variant: bytes, how: str) -> None:
    session = HEAD + b"Subject: hi\r\n\r\nbody" + variant + SMUGGLED + b"\r\n.\r\nQUIT\r\n"
    events, _ = drive_server(ServerConnection(), splits(session, how, random.Random(7)))
    mails = [e for e in events if isinstance(e, MailFrom)]
    ends = [e for e in events if isinstance(e, (EndOfMessage, MessageRejected))]
    assert len(mails) == 1, f"a second transaction was smuggled: {events}"
    assert len(ends) == 1
    if b"\n" in variant.replace(b"\r\n", b"") or b"\r" in variant.replace(b"\r\n", b""):
        assert ends == [MessageRejected(R.BARE_LINE_ENDING_IN_MESSAGE)]


def test_dot_unstuffing_and_terminator() -> None:
    body = b"..leading dot\r\nmiddle . dot\r\n...\r\n"
    events, out = drive_server(ServerConnection(), [HEAD + body + b".\r\nQUIT\r\n"])
    data = b"".join(e.data for e in events if isinstance(e, MessageData))
    assert data == b".leading dot\r\nmiddle . dot\r\n..\r\n"
    assert out.count(b"250 2.0.0 Ok: queued as Q1") == 1


def test_empty_message() -> None:
    events, _ = drive_server(ServerConnection(), [HEAD + b".\r\nQUIT\r\n"])
    assert not [e for e in events if isinstance(e, MessageData)]
    assert EndOfMessage() in events


def _session_after(body: bytes) -> bytes:
    again = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nok\r\n.\r\n"
    return HEAD + body + b".\r\n" + again + b"QUIT\r\n"


@pytest.mark.parametrize(
    ("body", "reply"),
    [
        (b"x" * 2000 + b"\r\n", R.MESSAGE_TOO_BIG),
        (b"y" * 999 + b"\r\n", R.LINE_TOO_LONG_IN_MESSAGE),
        (b"ok\r\n" + b"z" * 5000 + b"\r\n", R.MESSAGE_TOO_BIG),
        (b"bare\nlf\r\n", R.BARE_LINE_ENDING_IN_MESSAGE),
        (b"bare\rcr\r\n", R.BARE_LINE_ENDING_IN_MESSAGE),
        (b"a" * 1200 + b"\nb\r\n", R.BARE_LINE_ENDING_IN_MESSAGE),
    ],
)
@pytest.mark.parametrize("how", ["whole", "bytes", "random"])
def test_refused_message_is_drained_and_the_connection_stays_usable(
    body: bytes, reply: object, how: str
) -> None:
    conn = ServerConnection(capabilities=Capabilities(size=1500))
    events, out = drive_server(conn, splits(_session_after(body), how, random.Random(3)))
    ends = [e for e in events if isinstance(e, (EndOfMessage, MessageRejected))]
    assert ends == [MessageRejected(reply), EndOfMessage()]  # type: ignore[arg-type]
    assert out.count(b"250 2.0.0 Ok: queued") == 1
    assert conn.state is State.CLOSED  # reached QUIT: the stream was never desynchronised


def test_declared_size_over_the_limit_is_refused_at_mail() -> None:
    conn = ServerConnection(capabilities=Capabilities(size=1000))
    _, out = drive_server(conn, [b"EHLO c\r\nMAIL FROM:<a@example.org> SIZE=1001\r\n"])
    assert b"552 5.3.4" in out


def test_bdat_checks_line_endings_across_chunks() -> None:
    session = (
        b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
        b"BDAT 5\r\nabc\r\r"  # CR, CR: the first is bare
        b"BDAT 3 LAST\r\n\nok"
    )
    events, out = drive_server(ServerConnection(), [session])
    assert MessageRejected(R.BARE_LINE_ENDING_IN_MESSAGE) in events
    assert b"503 5.5.1" in out  # the transaction is over: the LAST chunk is out of sequence
    assert EndOfMessage() not in events


def test_refused_bdat_chunk_is_consumed_not_executed() -> None:
    # BDAT out of sequence: its 30 bytes must be swallowed, not run as a MAIL command.
    payload = b"MAIL FROM:<evil@attacker.tst>\r"
    assert len(payload) == 30
    events, out = drive_server(
        ServerConnection(), [b"EHLO c\r\nBDAT 30\r\n" + payload + b"QUIT\r\n"]
    )
    assert not [e for e in events if isinstance(e, MailFrom)]
    assert b"503 5.5.1" in out
    assert out.endswith(b"221 2.0.0 Bye\r\n")


def _scripts() -> dict[str, bytes]:
    big = os.urandom(3000).replace(b"\r", b"").replace(b"\n", b"")
    lines = b"\r\n".join(big[i : i + 70] for i in range(0, len(big), 70))
    return {
        "pipelined": HEAD + b"Subject: a\r\n\r\n" + lines + b"\r\n.\r\nRSET\r\nNOOP\r\nQUIT\r\n",
        "auth-login": b"EHLO c\r\nAUTH LOGIN\r\ndXNlcg==\r\nc2VjcmV0\r\nQUIT\r\n",
        "auth-plain-cancel": b"EHLO c\r\nAUTH PLAIN\r\n*\r\n"
        + b"AUTH PLAIN AHVzZXIAc2VjcmV0\r\nQUIT\r\n",
        "bdat": b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nBDAT 10\r\n"
        + b"0123456789BDAT 4 LAST\r\nabcdQUIT\r\n",
        "errors": b"EHLO c\r\nFOO\r\nMAIL FROM:bad\r\n"
        + b"A" * 3000
        + b"\r\nRCPT TO:<x@y.z>\r\nQUIT\r\n",
        "dots": HEAD + b".\r\n" + HEAD[8:] + b"..\r\n...\r\n.x\r\n.\r\nQUIT\r\n",
    }


@pytest.mark.parametrize("name", list(_scripts()))
def test_chunking_never_changes_events_or_replies(name: str) -> None:
    session = _scripts()[name]
    caps = Capabilities(auth=("PLAIN", "LOGIN"))
    whole = drive_server(ServerConnection(capabilities=caps, tls=True), [session])
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    for how in ["bytes", *["random"] * 20]:
        got = drive_server(ServerConnection(capabilities=caps, tls=True), splits(session, how, rng))
        assert got == whole, f"{name}: {how} split differs (seed {seed})"


def _long_line_by_splitting(region: bytes, limit: int, held: int) -> bool:
    """The obvious definition: split at CRLF, the first line continuing ``held`` octets."""
    lines = region.split(b"\r\n")
    return held + len(lines[0]) > limit or max(map(len, lines)) > limit


@settings(max_examples=1000)
@given(
    st.lists(st.sampled_from([b"a", b"abc", b"a" * 7, b"\r\n", b"\r", b"\n"]), max_size=40).map(
        b"".join
    ),
    st.integers(min_value=1, max_value=12),
    st.integers(min_value=0, max_value=14),
)
def test_the_line_length_stride_agrees_with_splitting(region: bytes, limit: int, held: int) -> None:
    fast, slow = _has_long_line(region, limit, held), _long_line_by_splitting(region, limit, held)
    if fast:
        assert slow  # never stricter
    has_bare_lf = region.replace(b"\r\n", b"").count(b"\n") > 0
    if not has_bare_lf:
        assert fast == slow  # with a bare LF, the message is refused for that anyway


def _reader_by_lines(data: bytes) -> tuple[bytes, bool] | None:
    """DATA by its definition, line by line: the content ends at the first line that is a
    lone dot; a line's leading dot is stuffing; lines end with CRLF only. (unstuffed content,
    has a bare CR or LF), or None if ``data`` holds no end."""
    wire = b"\r\n" + data  # DATA's reply ends a line: the content starts at a line start
    end = wire.find(b"\r\n.\r\n")
    if end == -1:
        return None
    content = data[:end]  # the content's last line keeps its CRLF
    lines = content.split(b"\r\n")
    unstuffed = b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)
    return unstuffed, any(b"\r" in line or b"\n" in line for line in lines)


@settings(max_examples=300)
@given(
    st.lists(
        st.sampled_from([b"a", b"text", b".", b"..", b"\r\n", b"\r", b"\n", b"\r\n.\r\n"]),
        max_size=30,
    ).map(b"".join),
    st.randoms(use_true_random=False),
)
def test_data_agrees_with_its_line_by_line_definition(data: bytes, rng: random.Random) -> None:
    """However the bytes arrive: the content (dot-unstuffed) and the verdict on bare line
    endings are the definition's, and the end is the first lone-dot line."""
    expected = _reader_by_lines(data + b"\r\n.\r\n")
    assert expected is not None
    unstuffed, bare = expected
    wire = HEAD + data + b"\r\n.\r\n"
    # in two pieces cut at every point of the content (a region of several lines then
    # arrives without its end), and in random pieces
    ways = [[wire[:cut], wire[cut:]] for cut in range(len(HEAD), len(wire))]
    for chunks in [*ways, splits(wire, "random", rng)]:
        events, _ = drive_server(ServerConnection(), chunks)
        ends = [e for e in events if isinstance(e, (EndOfMessage, MessageRejected))]
        if bare:
            assert ends[0] == MessageRejected(R.BARE_LINE_ENDING_IN_MESSAGE)
        else:
            assert ends[0] == EndOfMessage()
            first = events.index(ends[0])
            got = b"".join(e.data for e in events[:first] if isinstance(e, MessageData))
            assert got == unstuffed, chunks


def _bare_by_definition(region: bytes) -> bool:
    """Some CR not followed by LF, or some LF not preceded by CR: octet by octet."""
    return any(
        (c == 13 and region[i + 1 : i + 2] != b"\n") or (c == 10 and region[i - 1 : i] != b"\r")
        for i, c in enumerate(region)
    )


@settings(max_examples=2000)
@given(
    st.lists(
        st.sampled_from([b"a", b"x" * 70, b"x" * 300, b"\r\n", b"\r", b"\n", b"\n\r"]),
        max_size=40,
    ).map(b"".join)
)
def test_the_bare_line_ending_check_agrees_with_its_definition(region: bytes) -> None:
    """Long lines (the search for an LF without its CR) and dense line ends (the pairs
    counted) alike."""
    assert _bare_line_ending(region) == _bare_by_definition(region)


@pytest.mark.parametrize(
    ("region", "bare"),
    [
        (b"x" * 200 + b"\r\n" + b"y" * 200 + b"\n", True),  # sparse: a bare LF at the end
        (b"\n" + b"x" * 200 + b"\r\n", True),  # sparse: a bare LF at the start
        (b"x" * 200 + b"\n\r" + b"y" * 200, True),  # sparse: LF and CR, each bare, counts equal
        (b"x" * 200 + b"\r\n" + b"y" * 200 + b"\r\n", False),
        (b"\r\n" * 100 + b"\n\r" + b"\r\n" * 100, True),  # dense, counts equal
        (b"\r\n" * 100, False),
    ],
)
def test_the_bare_line_ending_check_either_way(region: bytes, bare: bool) -> None:
    assert _bare_line_ending(region) is bare
