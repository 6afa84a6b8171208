"""A real ClientConnection talking to a real ServerConnection in memory: whole transactions."""

from __future__ import annotations

import pytest

from atmosrelay.smtp import (
    Address,
    AuthLogin,
    AuthPlain,
    Bdat,
    Capabilities,
    ClientConnection,
    Data,
    Hello,
    LocalProtocolError,
    MailFrom,
    MailParams,
    Noop,
    Quit,
    RcptParams,
    RcptTo,
    Rset,
    ServerConnection,
    State,
)
from tests.protocol.helpers import talk

A = Address("alice", "example.org")
B = Address("bob", "example.net")


def pair(caps: Capabilities | None = None) -> tuple[ClientConnection, ServerConnection]:
    client = ClientConnection()
    server = ServerConnection(capabilities=caps or Capabilities(auth=("PLAIN", "LOGIN")), tls=True)
    (greeting,) = talk(client, server, b"")
    assert greeting.reply.code == 220
    (ehlo,) = talk(client, server, client.send(Hello("client.test", True)))
    assert ehlo.capabilities is not None
    assert ehlo.capabilities.has("PIPELINING") is server.capabilities.pipelining
    return client, server


def codes(replies: list) -> list[int]:  # type: ignore[type-arg]
    return [r.reply.code for r in replies]


def test_pipelined_transaction_and_queue_id() -> None:
    client, server = pair()
    group = (
        client.send(MailFrom(A))
        + client.send(RcptTo(B))
        + client.send(RcptTo(A))
        + client.send(Data())
    )
    assert codes(talk(client, server, group)) == [250, 250, 250, 354]
    (done,) = talk(
        client, server, client.send_data(b"Subject: x\r\n\r\nbody\r\n") + client.end_data()
    )
    assert done.reply.code == 250
    assert done.reply.lines == ("Ok: queued as Q1",)
    assert server.state is State.READY


def test_data_must_wait_for_its_354() -> None:
    client, _server = pair()
    client.send(MailFrom(A))
    client.send(RcptTo(B))
    client.send(Data())
    with pytest.raises(LocalProtocolError):
        client.send(Noop())  # DATA ends a pipeline group (RFC 2920 3.1)
    with pytest.raises(LocalProtocolError):
        client.send_data(b"too early\r\n")


def test_no_pipelining_without_the_extension() -> None:
    client, _server = pair(Capabilities(pipelining=False))
    client.send(MailFrom(A))
    with pytest.raises(LocalProtocolError, match="must wait"):
        client.send(RcptTo(B))


@pytest.mark.parametrize("mechanism", ["plain", "login"])
@pytest.mark.parametrize(("password", "code"), [("secret", 235), ("wrong", 535)])
def test_auth_mechanisms(mechanism: str, password: str, code: int) -> None:
    client, server = pair()
    if mechanism == "plain":
        replies = talk(client, server, client.send(AuthPlain("alice", password)))
    else:
        (challenge,) = talk(client, server, client.send(AuthLogin("alice", password)))
        assert challenge.reply.code == 334
        assert challenge.reply.lines == ("UGFzc3dvcmQ6",)
        replies = talk(client, server, client.continue_auth())
    assert codes(replies) == [code]
    assert server.authenticated is (code == 235)
    assert server.state is State.READY
    if code == 235:  # AUTH is no longer offered, and a second AUTH is refused
        (again,) = talk(client, server, client.send(AuthPlain("alice", password)))
        assert (again.reply.code, again.reply.enhanced) == (503, "5.5.1")


def test_bdat_chunks_then_a_data_transaction_on_the_same_connection() -> None:
    client, server = pair()
    group = (
        client.send(MailFrom(A))
        + client.send(RcptTo(B))
        + client.send(Bdat(b"Subject: chunked\r\n"))
        + client.send(Bdat(b"\r\nline with . and \r\n.leading dot\r\n", last=True))
    )
    replies = talk(client, server, group)
    assert codes(replies) == [250, 250, 250, 250]
    assert replies[2].reply.lines == ("18 octets received",)
    assert replies[3].reply.lines == ("Ok: queued as Q1",)
    assert codes(
        talk(
            client, server, client.send(MailFrom(B)) + client.send(RcptTo(A)) + client.send(Data())
        )
    ) == [250, 250, 354]
    assert codes(talk(client, server, client.send_data(b"second\r\n") + client.end_data())) == [250]


def test_a_chunk_is_handed_over_apart_from_its_line_without_a_copy() -> None:
    """``send_parts`` gives a BDAT chunk's line and its content apart, the content being the
    very object the command holds (a chunk of many megabytes is not copied to be joined to
    its line); the server reads the two written one after the other as ``send``'s bytes."""
    client, server = pair()
    content = b"Subject: parts\r\n\r\n" + b"a line of the chunk\r\n" * 1000
    head = client.send(MailFrom(A)) + client.send(RcptTo(B))
    line, data = client.send_parts(Bdat(content, last=True))
    assert data is content
    assert line == f"BDAT {len(content)} LAST\r\n".encode()
    replies = talk(client, server, head + line + data)
    assert codes(replies) == [250, 250, 250]
    assert replies[2].reply.lines == ("Ok: queued as Q1",)
    assert client.send_parts(Rset()) == (b"RSET\r\n", b"")  # any other command: no content


def test_dsn_and_smtputf8_parameters_reach_the_server() -> None:
    client = ClientConnection()
    server = ServerConnection()
    talk(client, server, b"")
    talk(client, server, client.send(Hello("c", True)))
    seen: list[object] = []
    server_next = server.next_event

    def spy() -> object:
        event = server_next()
        seen.append(event)
        return event

    server.next_event = spy  # type: ignore[method-assign]
    mail = MailFrom(
        Address("ålice", "exämple.org"),
        MailParams(size=1234, body="8BITMIME", smtputf8=True, ret="HDRS", envid="id+1=x"),
    )
    rcpt = RcptTo(
        B, RcptParams(notify=("SUCCESS", "FAILURE"), orcpt=("rfc822", "bob+x@example.net"))
    )
    assert codes(talk(client, server, client.send(mail) + client.send(rcpt))) == [250, 250]
    got_mail, got_rcpt = (e for e in seen if type(e).__name__ in ("MailFrom", "RcptTo"))
    assert got_mail == mail
    assert got_rcpt == rcpt
    assert got_mail.sender.domain_ascii == "xn--exmple-cua.org"  # type: ignore[attr-defined]


@pytest.mark.parametrize("where", ["ready", "mail", "rcpt", "chunking"])
def test_rset_in_each_state_starts_over(where: str) -> None:
    client, server = pair()
    if where in ("mail", "rcpt", "chunking"):
        talk(client, server, client.send(MailFrom(A)))
    if where in ("rcpt", "chunking"):
        talk(client, server, client.send(RcptTo(B)))
    if where == "chunking":
        talk(client, server, client.send(Bdat(b"part\r\n")))
        assert server.state is State.CHUNKING
    assert codes(talk(client, server, client.send(Rset()))) == [250]
    assert server.state is State.READY
    assert server.recipients == 0
    assert codes(talk(client, server, client.send(MailFrom(A)))) == [250]


def test_too_many_recipients_is_452_and_the_rest_go_later() -> None:
    client = ClientConnection()
    server = ServerConnection(max_recipients=3)
    talk(client, server, b"")
    talk(client, server, client.send(Hello("c", True)))
    group = client.send(MailFrom(A)) + b"".join(
        client.send(RcptTo(Address(f"r{i}", "x.test"))) for i in range(5)
    )
    replies = talk(client, server, group)
    assert codes(replies) == [250, 250, 250, 250, 452, 452]
    assert replies[-1].reply.enhanced == "4.5.3"


def test_quit_closes_both_sides() -> None:
    client, server = pair()
    assert codes(talk(client, server, client.send(Quit()))) == [221]
    assert server.state is State.CLOSED
    assert client.closed
