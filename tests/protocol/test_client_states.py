"""The client's states are the one transition table's: driven against a real server object
in memory, after every reply the client is in the state the server is in, and a command the
table does not allow in the client's state is refused before it reaches the wire."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atmosrelay.smtp import (
    AuthLogin,
    AuthPlain,
    Bdat,
    Capabilities,
    ClientConnection,
    Data,
    Event,
    Hello,
    LocalProtocolError,
    MailFrom,
    Noop,
    Quit,
    RcptTo,
    Rset,
    ServerConnection,
    State,
)
from tests.protocol.helpers import PASSWORD, talk
from tests.protocol.test_pair import A, B

COMMANDS: list[Event] = [
    Hello("client.test", True),
    Hello("client.test", False),
    AuthPlain("", "alice", PASSWORD),
    AuthPlain("", "alice", "wrong"),
    AuthLogin("alice", PASSWORD),
    AuthLogin("alice", "wrong"),
    MailFrom(A),
    RcptTo(B),
    Data(),
    Bdat(b"chunk\r\n", last=False),
    Bdat(b"last\r\n", last=True),
    Rset(),
    Noop(),
    Quit(),
]


def _exchange(client: ClientConnection, server: ServerConnection, command: Event) -> None:
    """One command and its replies (the AUTH LOGIN password, DATA's content included);
    the two sides' states are compared after each reply."""
    replies = talk(client, server, client.send(command))
    assert client.state is server.state, (command, client.state, server.state)
    if isinstance(command, AuthLogin) and replies and replies[-1].reply.code == 334:
        talk(client, server, client.continue_auth())
        assert client.state is server.state
    if isinstance(command, Data) and replies and replies[-1].reply.code == 354:
        talk(client, server, client.send_data(b"Subject: x\r\n\r\nbody\r\n") + client.end_data())
        assert client.state is server.state is State.READY


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(range(len(COMMANDS))), max_size=30))
def test_client_and_server_agree_on_the_state_after_every_reply(picks: list[int]) -> None:
    client = ClientConnection()
    server = ServerConnection(capabilities=Capabilities(auth=("PLAIN", "LOGIN")), tls=True)
    talk(client, server, b"")
    assert client.state is server.state is State.CONNECTED
    for pick in picks:
        command = COMMANDS[pick]
        if not client.can_send(command):
            with pytest.raises(LocalProtocolError, match=r"out of sequence|closed"):
                client.send(command)
            continue
        _exchange(client, server, command)
        if client.closed:
            break


@pytest.mark.parametrize(
    ("script", "refused"),
    [
        ([], RcptTo(B)),  # no MAIL yet
        ([], Data()),
        ([MailFrom(A)], Data()),  # no recipient
        ([MailFrom(A)], MailFrom(A)),  # a transaction is open
        ([MailFrom(A), RcptTo(B)], AuthPlain("", "alice", PASSWORD)),  # AUTH inside one
    ],
)
def test_commands_out_of_sequence_never_reach_the_wire(script: list[Event], refused: Event) -> None:
    client = ClientConnection()
    server = ServerConnection(capabilities=Capabilities(auth=("PLAIN", "LOGIN")), tls=True)
    talk(client, server, b"")
    talk(client, server, client.send(Hello("client.test", True)))
    for command in script:
        talk(client, server, client.send(command))
    assert not client.can_send(refused)
    with pytest.raises(LocalProtocolError, match="out of sequence"):
        client.send(refused)
