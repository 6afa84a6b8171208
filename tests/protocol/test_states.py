"""The transition table, closed: every state x every command input, driven through a real
ServerConnection. Allowed moves follow the table; everything else is 503 5.5.1 and leaves the
state as it was. A Hypothesis random walk then checks the state against a model computed
only from the table."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atmosrelay.smtp import (
    NEED_DATA,
    BdatChunk,
    Capabilities,
    CommandError,
    MessageData,
    ServerConnection,
    State,
)
from atmosrelay.smtp import replies as R
from atmosrelay.smtp._states import TABLE, Input, allowed
from tests.protocol.helpers import answer

CAPS = Capabilities(starttls=True, auth=("PLAIN", "LOGIN"))
PLAIN_IR = base64.b64encode(b"\0user\0secret").decode()

# The bytes that produce each command input (AUTH continuation inputs are not commands).
COMMAND_INPUTS: dict[Input, bytes] = {
    Input.EHLO: b"EHLO client.test\r\n",
    Input.HELO: b"HELO client.test\r\n",
    Input.STARTTLS: b"STARTTLS\r\n",
    Input.AUTH_PLAIN: b"AUTH PLAIN\r\n",
    Input.AUTH_LOGIN: b"AUTH LOGIN\r\n",
    Input.AUTH_LOGIN_IR: b"AUTH LOGIN dXNlcg==\r\n",
    Input.AUTH_CREDENTIALS: f"AUTH PLAIN {PLAIN_IR}\r\n".encode(),
    Input.MAIL: b"MAIL FROM:<a@example.org>\r\n",
    Input.RCPT: b"RCPT TO:<b@example.net>\r\n",
    Input.DATA: b"DATA\r\n",
    Input.BDAT: b"BDAT 3\r\nabc",
    Input.BDAT_LAST: b"BDAT 3 LAST\r\nabc",
    Input.RSET: b"RSET\r\n",
    Input.NOOP: b"NOOP\r\n",
    Input.HELP: b"HELP\r\n",
    Input.VRFY: b"VRFY someone\r\n",
    Input.EXPN: b"EXPN list\r\n",
    Input.QUIT: b"QUIT\r\n",
}

# How to reach each state that takes commands, from a fresh connection.
SETUP: dict[State, list[bytes]] = {
    State.CONNECTED: [],
    State.READY: [b"EHLO c\r\n"],
    State.MAIL: [b"EHLO c\r\n", b"MAIL FROM:<a@example.org>\r\n"],
    State.RCPT: [b"EHLO c\r\n", b"MAIL FROM:<a@example.org>\r\n", b"RCPT TO:<b@example.net>\r\n"],
    State.CHUNKING: [
        b"EHLO c\r\n",
        b"MAIL FROM:<a@example.org>\r\n",
        b"RCPT TO:<b@example.net>\r\n",
        b"BDAT 2\r\nhi",
    ],
}


def reach(state: State, max_errors: int = 20) -> ServerConnection:
    conn = ServerConnection(capabilities=CAPS, max_errors=max_errors)
    conn.next_event()  # Greet
    if state is State.REJECTED:
        conn.send(R.NO_SERVICE)
        return conn
    conn.send(R.GREETING.format(hostname="mx"))
    for line in SETUP[state]:
        conn.receive_data(line)
        event = conn.next_event()
        while isinstance(event, (BdatChunk, MessageData)):
            event = conn.next_event()
        reply = answer(conn, event)
        assert reply is not None
        assert reply.is_positive, (state, event)
        conn.send(reply)
    assert conn.state is state
    return conn


def command_event(conn: ServerConnection, data: bytes) -> object:
    conn.receive_data(data)
    event = conn.next_event()
    while isinstance(event, (BdatChunk, MessageData)):
        event = conn.next_event()
    assert event is not NEED_DATA
    return event


STATES = [*SETUP, State.REJECTED]
PAIRS = [(s, i) for s in STATES for i in COMMAND_INPUTS]


@pytest.mark.parametrize("positive", [True, False])
@pytest.mark.parametrize(("state", "inp"), PAIRS, ids=[f"{s.value}-{i.value}" for s, i in PAIRS])
def test_every_state_and_input(state: State, inp: Input, positive: bool) -> None:
    conn = reach(state)
    event = command_event(conn, COMMAND_INPUTS[inp])
    if allowed(state, inp):
        assert not isinstance(event, CommandError), event
        reply = answer(conn, event)
        assert reply is not None
        if not positive:
            reply = R.RATE_LIMITED  # any 4xx refusal
        conn.send(reply)
        transition = TABLE[(state, inp)]
        expected = transition.accept if reply.is_positive else transition.refuse
        assert conn.state is expected
    else:
        assert isinstance(event, CommandError), event
        assert event.reply == R.BAD_SEQUENCE
        conn.send(event.reply)
        assert conn.state is state


def test_table_has_no_transition_out_of_terminal_states() -> None:
    for (state, _), transition in TABLE.items():
        assert state not in (State.CLOSED, State.ERROR, State.TLS)
        assert transition.refuse is not State.CLOSED


def test_421_closes_from_any_state() -> None:
    for state in STATES:
        conn = reach(state)
        conn.send(R.SHUTTING_DOWN)  # unsolicited: allowed at any time
        assert conn.state is State.CLOSED


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(list(COMMAND_INPUTS)), st.booleans()), min_size=1, max_size=25
    )
)
def test_random_walk_follows_the_table(steps: list[tuple[Input, bool]]) -> None:
    # The walk checks the table, not the error budget (tested on its own): 25 refused commands
    # in a row would otherwise, rightly, end the connection with 421.
    conn = reach(State.CONNECTED, max_errors=1000)
    model = State.CONNECTED
    for inp, positive in steps:
        if model in (State.CLOSED, State.TLS, State.DATA) or model.value.startswith("auth"):
            break
        event = command_event(conn, COMMAND_INPUTS[inp])
        if not allowed(model, inp):
            assert isinstance(event, CommandError)
            # 503 5.5.1; the text may be more specific ("Already authenticated").
            assert (event.reply.code, event.reply.enhanced) == (503, "5.5.1")
            conn.send(event.reply)
            assert conn.state is model
            continue
        reply = answer(conn, event)
        assert reply is not None
        reply = reply if positive else R.QUEUE_UNAVAILABLE
        conn.send(reply)
        t = TABLE[(model, inp)]
        model = t.accept if reply.is_positive else t.refuse
        assert conn.state is model, (inp, positive)
