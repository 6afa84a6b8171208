"""The server's state machine: the ONLY place that knows transitions.

A command puts the connection in debt of one reply. The reply settles it: a positive reply
(2xx/3xx) takes the table's ``accept`` state, a negative one (4xx/5xx) its ``refuse`` state,
which for most commands is the state it was in (RFC 5321 section 4.1.4: a rejected command
changes nothing). A 421 reply, to anything or to nothing, closes (section 3.8). A command
whose (state, input) pair is not in the table is out of sequence: 503 5.5.1, state unchanged.

    GREETING --greet 2xx--> CONNECTED --EHLO/HELO--> READY --MAIL--> MAIL --RCPT--> RCPT
       |  greet 4xx/5xx                                 ^  \\                        |  \\
       v                                                |   STARTTLS 220 -> TLS       |   BDAT
    REJECTED (QUIT only)      end of data (any reply) --+-- DATA <--354-- DATA cmd ---+   v
                                                        +------- BDAT LAST ------- CHUNKING
    READY --AUTH--> AUTH_PLAIN | AUTH_LOGIN_USER -> AUTH_LOGIN_PASSWORD --credentials--> READY
"""

from __future__ import annotations

import enum
from typing import Final

import attrs


class State(enum.Enum):
    # Members are singletons: hash by identity (in C) rather than enum's Python-level hash,
    # since every command looks the table up by (state, input).
    __hash__ = object.__hash__

    GREETING = "greeting"  # connected; the greeting is owed
    REJECTED = "rejected"  # greeted with 4xx/5xx: only QUIT (RFC 5321 3.1)
    CONNECTED = "connected"  # greeted; EHLO/HELO needed
    READY = "ready"  # hello done, no transaction
    MAIL = "mail"  # reverse-path accepted
    RCPT = "rcpt"  # at least one recipient accepted
    DATA = "data"  # reading message content after 354
    CHUNKING = "chunking"  # BDAT chunk(s) accepted, more to come (RFC 3030)
    AUTH_PLAIN = "auth-plain"  # 334 sent, awaiting the PLAIN response (RFC 4616)
    AUTH_LOGIN_USER = "auth-login-user"  # awaiting the LOGIN username
    AUTH_LOGIN_PASSWORD = "auth-login-password"  # awaiting the LOGIN password
    TLS = "tls"  # 220 to STARTTLS sent: plaintext is over for this connection object
    CLOSED = "closed"
    ERROR = "error"  # the peer broke the protocol beyond repair, or sending failed


class Input(enum.Enum):
    __hash__ = object.__hash__

    GREET = "greet"
    EHLO = "ehlo"
    HELO = "helo"
    STARTTLS = "starttls"
    AUTH_PLAIN = "auth-plain"  # AUTH PLAIN without an initial response: 334 follows
    AUTH_LOGIN = "auth-login"  # AUTH LOGIN without an initial response: 334 Username
    AUTH_LOGIN_IR = "auth-login-ir"  # AUTH LOGIN <username>: 334 Password
    AUTH_LOGIN_USERNAME = "auth-login-username"  # the username line
    AUTH_CREDENTIALS = "auth-credentials"  # complete credentials: 235 or 535
    AUTH_ABORT = "auth-abort"  # "*" or an undecodable response in an AUTH exchange
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    END_OF_DATA = "end-of-data"
    BDAT = "bdat"
    BDAT_LAST = "bdat-last"
    RSET = "rset"
    NOOP = "noop"
    HELP = "help"
    VRFY = "vrfy"
    EXPN = "expn"
    QUIT = "quit"


@attrs.frozen
class Transition:
    accept: State
    refuse: State


S, In = State, Input

# States that take ordinary commands.
COMMAND_STATES: Final = (S.CONNECTED, S.READY, S.MAIL, S.RCPT, S.CHUNKING)
AUTH_STATES: Final = (S.AUTH_PLAIN, S.AUTH_LOGIN_USER, S.AUTH_LOGIN_PASSWORD)


def _build() -> dict[tuple[State, Input], Transition]:
    t: dict[tuple[State, Input], Transition] = {
        (S.GREETING, In.GREET): Transition(S.CONNECTED, S.REJECTED),
        (S.REJECTED, In.QUIT): Transition(S.CLOSED, S.REJECTED),
        (S.READY, In.STARTTLS): Transition(S.TLS, S.READY),
        (S.READY, In.MAIL): Transition(S.MAIL, S.READY),
        (S.MAIL, In.RCPT): Transition(S.RCPT, S.MAIL),
        (S.RCPT, In.RCPT): Transition(S.RCPT, S.RCPT),
        (S.RCPT, In.DATA): Transition(S.DATA, S.RCPT),
        # The transaction ends with the reply to its data, whatever the reply says.
        (S.DATA, In.END_OF_DATA): Transition(S.READY, S.READY),
        # A refused chunk aborts the transaction (RFC 3030 section 2: the client RSETs).
        (S.RCPT, In.BDAT): Transition(S.CHUNKING, S.READY),
        (S.CHUNKING, In.BDAT): Transition(S.CHUNKING, S.READY),
        (S.RCPT, In.BDAT_LAST): Transition(S.READY, S.READY),
        (S.CHUNKING, In.BDAT_LAST): Transition(S.READY, S.READY),
        # AUTH only outside a transaction (RFC 4954 section 4).
        (S.READY, In.AUTH_PLAIN): Transition(S.AUTH_PLAIN, S.READY),
        (S.READY, In.AUTH_LOGIN): Transition(S.AUTH_LOGIN_USER, S.READY),
        (S.READY, In.AUTH_LOGIN_IR): Transition(S.AUTH_LOGIN_PASSWORD, S.READY),
        (S.READY, In.AUTH_CREDENTIALS): Transition(S.READY, S.READY),
        (S.AUTH_PLAIN, In.AUTH_CREDENTIALS): Transition(S.READY, S.READY),
        (S.AUTH_LOGIN_USER, In.AUTH_LOGIN_USERNAME): Transition(S.AUTH_LOGIN_PASSWORD, S.READY),
        (S.AUTH_LOGIN_PASSWORD, In.AUTH_CREDENTIALS): Transition(S.READY, S.READY),
    }
    for state in AUTH_STATES:
        t[(state, In.AUTH_ABORT)] = Transition(S.READY, S.READY)
    for state in COMMAND_STATES:
        greeted = S.CONNECTED if state is S.CONNECTED else S.READY
        # EHLO/HELO again resets any transaction (RFC 5321 4.1.4).
        t[(state, In.EHLO)] = Transition(S.READY, state)
        t[(state, In.HELO)] = Transition(S.READY, state)
        t[(state, In.RSET)] = Transition(greeted, state)
        t[(state, In.QUIT)] = Transition(S.CLOSED, state)
        for passive in (In.NOOP, In.HELP, In.VRFY, In.EXPN):
            t[(state, passive)] = Transition(state, state)
    return t


TABLE: Final = _build()

CLOSE_CODE: Final = 421


def allowed(state: State, inp: Input) -> bool:
    return (state, inp) in TABLE


def next_state(state: State, inp: Input | None, code: int) -> State:
    """The state after a reply with ``code`` to ``inp`` (None: a reply the connection chose
    for input it refused itself, which leaves the state as it was)."""
    if code == CLOSE_CODE:
        return S.CLOSED
    if inp is None:
        return state
    transition = TABLE[(state, inp)]
    return transition.accept if code < 400 else transition.refuse
