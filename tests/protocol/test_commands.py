"""Commands: address and parameter grammar, AUTH, error budget, STARTTLS injection."""

from __future__ import annotations

import re

import pytest

from atmosrelay.smtp import (
    Address,
    AddressError,
    Capabilities,
    ClientConnection,
    Data,
    Hello,
    LocalProtocolError,
    MailFrom,
    RcptTo,
    RemoteProtocolError,
    ServerConnection,
    StartTLS,
    State,
    TLSReady,
)
from atmosrelay.smtp import _extensions as _ext
from atmosrelay.smtp import replies as R
from atmosrelay.smtp._extensions import parse_path
from tests.protocol.helpers import drive_server, talk

EHLO = b"EHLO c\r\n"

VALID_PATHS = {
    "<alice@example.org>": ("alice", "example.org"),
    "<a.b+tag@sub.example.org>": ("a.b+tag", "sub.example.org"),
    '<"john doe"@example.org>': ('"john doe"', "example.org"),
    '<"a\\"b@c"@example.org>': ('"a\\"b@c"', "example.org"),
    "<user@[192.0.2.1]>": ("user", "[192.0.2.1]"),
    "<user@[IPv6:2001:db8::1]>": ("user", "[IPv6:2001:db8::1]"),
    "<@relay.test,@other.test:user@example.org>": ("user", "example.org"),
    "<用户@例子.广告>": ("用户", "例子.广告"),
    "<x@" + "a" * 63 + ".test>": ("x", "a" * 63 + ".test"),
}

INVALID_PATHS = [
    "alice@example.org",  # no brackets
    "<alice>",  # no domain
    "<alice@>",
    "<@example.org>",
    "<alice@@example.org>",
    "<a..b@example.org>",
    "<.a@example.org>",
    "<alice@-bad.example>",
    "<alice@bad-.example>",
    "<alice@exa mple.org>",
    "<alice@[300.1.1.1]>",
    "<alice@[IPv6:zz::1]>",
    '<"unterminated@example.org>',
    "<" + "l" * 65 + "@example.org>",  # local part over 64 octets
    "<x@" + ".".join(["a" * 60] * 5) + ">",  # domain over 255 octets
    "<a@b@c.test>",
]


@pytest.mark.parametrize("path", list(VALID_PATHS))
def test_valid_paths(path: str) -> None:
    addr = parse_path(path, allow_null=False, bad=R.BAD_RECIPIENT_SYNTAX)
    assert (addr.local, addr.domain) == VALID_PATHS[path]


@pytest.mark.parametrize("path", INVALID_PATHS)
def test_invalid_paths(path: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_path(path, allow_null=False, bad=R.BAD_RECIPIENT_SYNTAX)
    assert info.value.reply.code in (501, 553)


def test_null_path_only_where_allowed() -> None:
    assert parse_path("<>", allow_null=True, bad=R.BAD_SENDER_SYNTAX).is_null
    with pytest.raises(AddressError):
        parse_path("<>", allow_null=False, bad=R.BAD_RECIPIENT_SYNTAX)


def _replies(session: bytes, **kw: object) -> list[bytes]:
    _, out = drive_server(ServerConnection(**kw), [session])  # type: ignore[arg-type]
    return out.split(b"\r\n")[:-1]


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"MAIL FROM:<a@example.org> SIZE=12", b"250 2.1.0"),
        (b"MAIL FROM: <a@example.org>", b"250 2.1.0"),  # a space after the colon: tolerated
        (b"mail from:<>", b"250 2.1.0"),
        (b"MAIL FROM:<a@example.org> FOO=bar", b"555 5.5.4"),
        (b"MAIL FROM:<a@example.org> SIZE=x", b"501 5.5.4"),
        (b"MAIL FROM:<a@example.org> SIZE=1 SIZE=2", b"501 5.5.4"),
        (b"MAIL FROM:<a@example.org> BODY=BINARYMIME", b"555 5.5.4"),
        (b"MAIL FROM:<a@example.org> RET=MAYBE", b"501 5.5.4"),
        (b"MAIL FROM:<a@example.org> ENVID=a+2", b"501 5.5.4"),
        (b"MAIL FROM:<\xc3\xa5@example.org>", b"553 5.6.7"),  # UTF-8 without SMTPUTF8
        (b"MAIL FROM:<\xc3\xa5@example.org> SMTPUTF8", b"250 2.1.0"),
        (b"MAIL FROM:<a@example.org>SIZE=1", b"501 5.1.7"),
        (b"MAIL TO:<a@example.org>", b"501 5.1.7"),
        (b"MAIL FROM:<a@exa\x00mple.org>", b"500 5.5.2"),
    ],
)
def test_mail_from_grammar(line: bytes, code: bytes) -> None:
    replies = _replies(EHLO + line + b"\r\n")
    assert replies[-1].startswith(code), replies[-1]


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"RCPT TO:<b@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+2Bx@example.net", b"250"),
        (b"RCPT TO:<b@example.net> NOTIFY=NEVER,SUCCESS", b"501 5.5.4"),
        (b"RCPT TO:<b@example.net> ORCPT=nosemicolon", b"501 5.5.4"),
        (b"RCPT TO:<Postmaster>", b"250"),
        (b"RCPT TO:<>", b"501 5.1.3"),
        (b"RCPT TO:<\xc3\xa5@example.org>", b"553 5.6.7"),
    ],
)
def test_rcpt_to_grammar(line: bytes, code: bytes) -> None:
    replies = _replies(EHLO + b"MAIL FROM:<a@example.org>\r\n" + line + b"\r\n")
    assert replies[-1].startswith(code), replies[-1]


def test_dsn_parameters_refused_when_dsn_not_offered() -> None:
    replies = _replies(
        EHLO + b"MAIL FROM:<a@example.org> RET=FULL\r\n", capabilities=Capabilities(dsn=False)
    )
    assert replies[-1].startswith(b"555 5.5.4")


def test_unknown_and_malformed_commands() -> None:
    replies = _replies(EHLO + b"FOO bar\r\nDATA now\r\nVRFY\r\nEHLO\r\nNOOP\r\n")
    assert [r[:9] for r in replies[-5:]] == [
        b"500 5.5.2",
        b"501 5.5.4",
        b"501 5.5.4",
        b"501 5.5.4",
        b"250 2.0.0",
    ]


def test_bare_lf_in_a_command_is_refused_not_normalised() -> None:
    replies = _replies(EHLO + b"NOOP\nMAIL FROM:<a@example.org>\r\nNOOP\r\n")
    assert replies[-2].startswith(b"500 5.5.2")  # the whole "line" up to CRLF is refused
    assert replies[-1].startswith(b"250 2.0.0")


def test_overlong_command_line_is_drained_and_refused() -> None:
    replies = _replies(EHLO + b"NOOP " + b"x" * 5000 + b"\r\nNOOP\r\n")
    assert replies[-2].startswith(b"500 5.5.6")
    assert replies[-1].startswith(b"250 2.0.0")


def test_error_budget_ends_in_421() -> None:
    conn = ServerConnection(max_errors=3)
    events, out = drive_server(conn, [EHLO + b"BAD\r\n" * 10])
    assert out.count(b"500 5.5.2") == 3
    assert out.endswith(b"421 4.7.0 Too many errors, closing connection\r\n")
    assert events[-1][0] == "error"  # type: ignore[index]
    assert conn.state is State.CLOSED


@pytest.mark.parametrize(
    ("session", "code"),
    [
        (b"AUTH PLAIN !!!notbase64\r\n", b"501 5.5.2"),
        (b"AUTH PLAIN\r\n*\r\n", b"501 5.7.0"),
        (b"AUTH LOGIN\r\n*\r\n", b"501 5.7.0"),
        (b"AUTH LOGIN\r\ndXNlcg==\r\n%%%\r\n", b"501 5.5.2"),
        (b"AUTH CRAM-MD5\r\n", b"504 5.5.4"),
        (b"AUTH PLAIN dXNlcg==\r\n", b"501 5.5.2"),  # not authzid NUL user NUL pass
        (b"AUTH PLAIN AHVzZXIAc2VjcmV0\r\n", b"235 2.7.0"),
        (b"AUTH PLAIN\r\nAHVzZXIAc2VjcmV0\r\n", b"235 2.7.0"),
        (b"AUTH PLAIN AHVzZXIAd3Jvbmc=\r\n", b"535 5.7.8"),
    ],
)
def test_auth_exchanges(session: bytes, code: bytes) -> None:
    replies = _replies(EHLO + session, capabilities=Capabilities(auth=("PLAIN", "LOGIN")), tls=True)
    assert replies[-1].startswith(code), replies


def test_auth_not_offered_gets_the_configured_reply() -> None:
    replies = _replies(
        EHLO + b"AUTH PLAIN AHVzZXIAc2VjcmV0\r\n", auth_unavailable=R.ENCRYPTION_REQUIRED
    )
    assert replies[-1] == b"538 5.7.11 Encryption required for requested authentication mechanism"


def test_auth_inside_a_transaction_is_out_of_sequence() -> None:
    replies = _replies(
        EHLO + b"MAIL FROM:<a@example.org>\r\nAUTH PLAIN AHVzZXIAc2VjcmV0\r\n",
        capabilities=Capabilities(auth=("PLAIN",)),
    )
    assert replies[-1].startswith(b"503 5.5.1")


def test_vrfy_expn_help_are_events_for_the_caller() -> None:
    replies = _replies(EHLO + b"VRFY bob\r\nEXPN staff\r\nHELP\r\n")
    assert [r[:3] for r in replies[-3:]] == [b"252", b"502", b"214"]


# -- STARTTLS --------------------------------------------------------------------------------
CAPS_TLS = Capabilities(starttls=True)


@pytest.mark.parametrize("together", [True, False])
def test_plaintext_after_starttls_is_an_injection(together: bool) -> None:
    conn = ServerConnection(capabilities=CAPS_TLS)
    conn.next_event()
    conn.send(R.GREETING.format(hostname="mx"))
    injected = b"MAIL FROM:<evil@attacker.test>\r\n"
    conn.receive_data(EHLO + b"STARTTLS\r\n" + (injected if together else b""))
    assert isinstance(conn.next_event(), Hello)
    conn.send(conn.ehlo_reply("mx"))
    assert isinstance(conn.next_event(), StartTLS)
    if not together:
        conn.receive_data(injected)  # arrived before the caller switched
    conn.send(R.READY_TO_START_TLS)
    with pytest.raises(RemoteProtocolError, match="injection"):
        conn.next_event()
    assert conn.state is State.ERROR


def test_clean_starttls_switch_then_ehlo_again() -> None:
    conn = ServerConnection(capabilities=CAPS_TLS)
    events, out = drive_server(conn, [EHLO + b"STARTTLS\r\n"])
    assert isinstance(events[-1], TLSReady)
    assert out.endswith(b"220 2.0.0 Ready to start TLS\r\n")
    assert b"STARTTLS" in out  # offered before TLS
    after = ServerConnection(capabilities=CAPS_TLS, after_starttls=True)
    events, out = drive_server(after, [b"MAIL FROM:<a@example.org>\r\nEHLO c\r\nSTARTTLS\r\n"])
    assert out.startswith(b"503 5.5.1")  # EHLO required again (RFC 3207 4.2)
    assert b"250-PIPELINING" in out  # the EHLO reply came...
    assert b"-STARTTLS\r\n" not in out
    assert b" STARTTLS\r\n" not in out
    assert out.endswith(b"503 5.5.1 TLS already active\r\n")


def test_client_refuses_bytes_after_the_starttls_220() -> None:
    client = ClientConnection()
    client.receive_data(b"220 mx ESMTP\r\n")
    client.next_event()
    client.send(Hello("c", True))
    client.receive_data(b"250-mx\r\n250 STARTTLS\r\n")
    client.next_event()
    client.send(StartTLS())
    client.receive_data(b"220 2.0.0 go ahead\r\n250 2.0.0 injected\r\n")
    assert client.next_event().reply.code == 220  # type: ignore[union-attr]
    with pytest.raises(RemoteProtocolError, match="injection"):
        client.next_event()  # instead of TLSReady


def test_client_refuses_unsolicited_replies_but_reports_421() -> None:
    client = ClientConnection()
    client.receive_data(b"220 mx\r\n250 2.0.0 early\r\n")
    client.next_event()
    with pytest.raises(RemoteProtocolError, match="none was due"):
        client.next_event()
    other = ClientConnection()
    other.receive_data(b"220 mx\r\n421 4.3.2 going away\r\n")
    other.next_event()
    event = other.next_event()
    assert event.command is None
    assert event.reply.code == 421


@pytest.mark.parametrize(
    "bad",
    [b"2500 x\r\n", b"25 x\r\n", b"250-a\r\n251 b\r\n", b"abc\r\n", b"250 a\nb\r\n", b"199 x\r\n"],
)
def test_client_rejects_malformed_replies(bad: bytes) -> None:
    client = ClientConnection()
    client.receive_data(bad)
    with pytest.raises(RemoteProtocolError):
        client.next_event()


def test_client_refuses_bare_line_endings_in_outgoing_data() -> None:
    client = ClientConnection()
    server = ServerConnection()
    talk(client, server, b"")
    talk(client, server, client.send(Hello("c", True)))
    group = client.send(MailFrom(Address("a", "x.test"))) + client.send(
        RcptTo(Address("b", "y.test"))
    )
    talk(client, server, group)
    talk(client, server, client.send(Data()))
    with pytest.raises(LocalProtocolError, match="bare"):
        client.send_data(b"a\nb\r\n")
    client.send_data(b"ends with CR\r")  # an LF may still follow: not an error yet
    with pytest.raises(LocalProtocolError, match="ends with a bare CR"):
        client.end_data()


@pytest.mark.parametrize(
    ("written", "defined"),
    [
        (_ext._ATEXT, r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\u0080-\U0010ffff]"),
        (_ext._QTEXT, r"[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]"),
        (_ext._LET_DIG, r"[A-Za-z0-9\u0080-\U0010ffff]"),
        (_ext._LDH, r"[A-Za-z0-9\-\u0080-\U0010ffff]"),
    ],
)
def test_each_address_character_class_is_its_definition(written: str, defined: str) -> None:
    """The grammar's classes are written as what they exclude (quick to compile); over every
    code point each matches exactly what its definition in the RFCs' terms matches."""
    every = "".join(map(chr, range(0x110000)))
    assert [m.start() for m in re.finditer(written, every)] == [
        m.start() for m in re.finditer(defined, every)
    ]
