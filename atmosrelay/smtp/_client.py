"""ClientConnection: the client side of SMTP, sans-IO, for delivery to remote servers.

    conn = ClientConnection()
    event = conn.next_event()          # NEED_DATA until the greeting is read
    await stream.send_all(conn.send(Hello("relay.example", extended=True)))
    ... ServerReply(Hello, reply, capabilities)
    await stream.send_all(conn.send(MailFrom(sender)) + conn.send(RcptTo(rcpt)) + conn.send(Data()))
    ... ServerReply(MailFrom, 250) ServerReply(RcptTo, 250) ServerReply(Data, 354)
    await stream.send_all(conn.send_data(body) + conn.end_data())
    ... ServerReply(EndOfMessage, 250)

Replies are matched to commands in order (RFC 2920). Commands may be sent before earlier
replies arrive only where RFC 2920 allows it (after MAIL, RCPT, RSET, BDAT) and only if the
server advertised PIPELINING. Reply bytes that arrive when no reply is due are an attack or a
broken server: RemoteProtocolError (the STARTTLS case is the plaintext injection of 2011).

The client's states are the server's (``_states.TABLE``, the one transition table): each
reply moves ``state`` by the table, exactly as the server moves when it sends it, so a
client and a server that agree on the protocol always agree on the state (the pair tests
check it). A command is refused (LocalProtocolError) unless the table allows it in the state
the connection will be in once every command already sent has succeeded, which is what
RFC 2920 lets a pipelining client assume. A positive reply the table has no transition for
(354 to DATA when no recipient was accepted) is the server's breach: RemoteProtocolError.
"""

from __future__ import annotations

import base64
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from atmosrelay.smtp._dotstuff import DotStuffer
from atmosrelay.smtp._errors import LocalProtocolError, RemoteProtocolError
from atmosrelay.smtp._events import (
    NEED_DATA,
    AuthLogin,
    AuthPlain,
    Bdat,
    ConnectionClosed,
    Data,
    EndOfMessage,
    Event,
    Expn,
    Greet,
    Hello,
    Help,
    MailFrom,
    Noop,
    Quit,
    RcptTo,
    Rset,
    ServerReply,
    StartTLS,
    TLSReady,
    Vrfy,
    _Sentinel,
)
from atmosrelay.smtp._extensions import (
    ServerCapabilities,
    format_mail_params,
    format_path,
    format_rcpt_params,
    parse_enhanced,
)
from atmosrelay.smtp._replies import Reply
from atmosrelay.smtp._states import CLOSE_CODE, TABLE, Input, State, next_state

MAX_REPLY_LINE: Final = 2048  # RFC 5321 4.5.3.1.5 says 512; be lenient with real servers
MAX_REPLY_LINES: Final = 200  # an EHLO reply is about 20 lines; bound what we hold
# Inputs after which more may be sent without waiting (RFC 2920 section 3.1, RFC 3030).
_PIPELINABLE: Final = frozenset({Input.MAIL, Input.RCPT, Input.RSET, Input.BDAT, Input.BDAT_LAST})
# Inputs a 3xx answers (354 to DATA, 334 to AUTH LOGIN with its username).
_INTERMEDIATE: Final = frozenset({Input.DATA, Input.AUTH_LOGIN_IR})


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _input(command: Event) -> Input:
    """The table's input for a command the client sends."""
    if isinstance(command, Hello):
        return Input.EHLO if command.extended else Input.HELO
    if isinstance(command, Bdat):
        return Input.BDAT_LAST if command.last else Input.BDAT
    return _INPUTS[type(command)]


class ClientConnection:
    def __init__(self, *, after_starttls: bool = False) -> None:
        """``after_starttls``: continue over TLS on the same connection; no greeting comes,
        and EHLO must be sent again (RFC 3207 section 4.2)."""
        self._buf = bytearray()
        self._eof = False
        # the commands awaiting replies, each with its input to the table
        self._pending: deque[tuple[Event, Input]] = (
            deque() if after_starttls else deque([(Greet(), Input.GREET)])
        )
        self.state = State.CONNECTED if after_starttls else State.GREETING
        self.capabilities: ServerCapabilities | None = None
        self._stuffer: DotStuffer | None = None
        self._login_password: str | None = None
        # Pending commands that end a pipeline group (RFC 2920 3.1); the greeting is one.
        self._barriers = len(self._pending)

    @property
    def closed(self) -> bool:
        return self.state in (State.CLOSED, State.ERROR)

    def _projected(self) -> State:
        """The state once every command sent so far has succeeded."""
        state = self.state
        for _, inp in self._pending:
            transition = TABLE.get((state, inp))
            if transition is None:
                return State.ERROR
            state = transition.accept
        return state

    def can_send(self, command: Event) -> bool:
        """Whether ``send(command)`` is in sequence now (a driver that follows the replies
        asks before it sends; pipelining limits aside)."""
        if self.closed or self.state in (State.TLS, State.DATA) or type(command) not in _FORMAT:
            return False
        return (self._projected(), _input(command)) in TABLE

    # -- commands out -----------------------------------------------------------------
    def send(self, command: Event) -> bytes:
        """The bytes for ``command``. Raises LocalProtocolError if it may not be sent now."""
        line, content = self.send_parts(command)
        return line + content if content else line

    def send_parts(self, command: Event) -> tuple[bytes, bytes]:
        """As ``send``, with a BDAT chunk's content apart from its command line (b"" for any
        other command): the content is the object the command holds, not a copy, so a large
        chunk goes out without first being joined to its line."""
        if self.closed or self.state is State.TLS:
            raise LocalProtocolError("connection is closed or switching to TLS")
        if self.state is State.DATA:
            raise LocalProtocolError("in message content: use send_data() and end_data()")
        if type(command) not in _FORMAT:
            raise LocalProtocolError(f"not a client command: {command!r}")
        inp = _input(command)
        if self._pending and (
            self._barriers or self.capabilities is None or not self.capabilities.has("PIPELINING")
        ):
            raise LocalProtocolError(
                f"must wait for the reply to {type(self._pending[-1]).__name__}"
            )
        projected = self._projected()
        if (projected, inp) not in TABLE:
            raise LocalProtocolError(
                f"{type(command).__name__} is out of sequence in state {projected.value}"
            )
        line = _FORMAT[type(command)](self, command)
        if "\r" in line or "\n" in line or "\0" in line:
            raise LocalProtocolError("CR, LF or NUL in a command")
        self._pending.append((command, inp))
        if inp not in _PIPELINABLE:
            self._barriers += 1
        wire = line.encode("utf-8") + b"\r\n"
        return wire, command.data if isinstance(command, Bdat) else b""

    def _format_mail(self, c: MailFrom) -> str:
        if not c.sender.is_ascii and not c.params.smtputf8:
            raise LocalProtocolError("a non-ASCII address needs MailParams(smtputf8=True)")
        return f"MAIL FROM:{format_path(c.sender)}{format_mail_params(c.params)}"

    def _format_auth_login(self, c: AuthLogin) -> str:
        self._login_password = c.password
        return f"AUTH LOGIN {_b64(c.username.encode())}"

    def continue_auth(self) -> bytes:
        """After a 334 to AUTH LOGIN: the password line."""
        if self._login_password is None or self.state is not State.AUTH_LOGIN_PASSWORD:
            raise LocalProtocolError("no AUTH LOGIN awaits the password")
        password, self._login_password = self._login_password, None
        self._pending.append((AuthLogin("", ""), Input.AUTH_CREDENTIALS))
        self._barriers += 1
        return _b64(password.encode()).encode("ascii") + b"\r\n"

    def send_data(self, data: bytes) -> bytes:
        """Message content after the 354, dot-stuffed. Raises LocalProtocolError on a bare
        CR or LF (refusing to send what another server could split)."""
        if self.state is not State.DATA or self._stuffer is None:
            raise LocalProtocolError("no 354 received: DATA first")
        return self._stuffer.stuff(data)

    def end_data(self) -> bytes:
        if self.state is not State.DATA or self._stuffer is None or self._pending:
            raise LocalProtocolError("no 354 received: DATA first")
        out = self._stuffer.end()
        self._stuffer = None
        self._pending.append((EndOfMessage(), Input.END_OF_DATA))
        self._barriers += 1
        return out

    # -- replies in -------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        if data:
            self._buf += data
        else:
            self._eof = True

    def next_event(self) -> Event | _Sentinel:
        """ServerReply, TLSReady, ConnectionClosed or NEED_DATA. Raises RemoteProtocolError."""
        if self.state is State.TLS:
            if self._buf:  # the server spoke after its 220: the plaintext injection of 2011
                self.state = State.ERROR
                raise RemoteProtocolError("bytes after the STARTTLS 220: injection attempt")
            return TLSReady()
        if self.closed:
            return ConnectionClosed()
        reply = self._parse_reply()
        if reply is None:
            if self._eof:
                self.state = State.CLOSED
                return ConnectionClosed()
            return NEED_DATA
        if not self._pending:
            if reply.code == CLOSE_CODE:
                self.state = State.CLOSED
                return ServerReply(None, reply)
            raise RemoteProtocolError(f"reply {reply.code} when none was due")
        command, inp = self._pending.popleft()
        if inp not in _PIPELINABLE:
            self._barriers -= 1
        known = self._settles(inp, reply)
        self.state = next_state(self.state, inp if known else None, reply.code)
        capabilities = None
        if inp is Input.EHLO and reply.code < 400:
            capabilities = self.capabilities = ServerCapabilities.parse(reply)
        elif self.state is State.DATA:
            if self._pending:
                raise RemoteProtocolError("354 while other replies are still due")
            self._stuffer = DotStuffer()
        return ServerReply(command, reply, capabilities)

    def _settles(self, inp: Input, reply: Reply) -> bool:
        """Whether the table has a transition for this reply to ``inp`` (else the state stays:
        a command sent on the assumption that an earlier one succeeded, rightly refused).
        Raises RemoteProtocolError for a reply no server may give."""
        if reply.code == CLOSE_CODE:
            return True
        positive = reply.code < 400
        if (self.state, inp) not in TABLE:
            if positive:
                self.state = State.ERROR
                raise RemoteProtocolError(
                    f"{reply.code} to {inp.value}, which the server should have refused"
                )
            return False
        if positive and (reply.code >= 300) != (inp in _INTERMEDIATE):
            self.state = State.ERROR
            expected = "an intermediate 3xx" if inp in _INTERMEDIATE else "no 3xx"
            raise RemoteProtocolError(f"{reply.code} to {inp.value}, where {expected} is due")
        return True

    def _parse_reply(self) -> Reply | None:
        buf = self._buf
        # Fast path: a whole single-line reply "ddd text" (most replies after EHLO).
        end = buf.find(b"\r\n", 0, MAX_REPLY_LINE)
        if end >= 4 and buf[3] == 0x20:
            raw = bytes(buf[:end])
            well_formed = raw[:3].isdigit() and 200 <= int(raw[:3]) <= 599
            if well_formed and b"\r" not in raw and b"\n" not in raw:
                del buf[: end + 2]
                enhanced, text = parse_enhanced(raw[4:].decode("utf-8", "replace"))
                return Reply(int(raw[:3]), enhanced, (text,))
        lines: list[str] = []
        pos = 0
        code = None
        while True:
            end = buf.find(b"\r\n", pos, pos + MAX_REPLY_LINE)
            if end == -1:
                if len(buf) - pos >= MAX_REPLY_LINE:
                    raise RemoteProtocolError("reply line too long")
                return None
            raw = bytes(buf[pos:end])
            if b"\r" in raw or b"\n" in raw:
                raise RemoteProtocolError("bare CR or LF in a reply")
            if len(raw) < 3 or not raw[:3].isdigit() or raw[3:4] not in (b"", b" ", b"-"):
                raise RemoteProtocolError(f"malformed reply line {raw[:40]!r}")
            line_code = int(raw[:3])
            if not 200 <= line_code <= 599 or (code is not None and line_code != code):
                raise RemoteProtocolError(f"bad reply code in {raw[:40]!r}")
            code = line_code
            lines.append(raw[4:].decode("utf-8", "replace"))
            pos = end + 2
            if len(lines) > MAX_REPLY_LINES:
                raise RemoteProtocolError("reply has too many lines")
            if raw[3:4] != b"-":
                break
        del buf[:pos]
        enhanced, first = parse_enhanced(lines[0])
        if enhanced is not None:
            rest = [
                parse_enhanced(line)[1] if line.startswith(enhanced) else line for line in lines[1:]
            ]
            lines = [first, *rest]
        return Reply(code, enhanced, tuple(lines))


_Formatter = Callable[[ClientConnection, Any], str]
_FORMAT: Final[dict[type, _Formatter]] = {
    Hello: lambda _, c: f"{'EHLO' if c.extended else 'HELO'} {c.hostname}",
    MailFrom: ClientConnection._format_mail,
    RcptTo: lambda _, c: f"RCPT TO:{format_path(c.recipient)}{format_rcpt_params(c.params)}",
    Bdat: lambda _, c: f"BDAT {len(c.data)}{' LAST' if c.last else ''}",
    AuthPlain: lambda _, c: (
        "AUTH PLAIN " + _b64(f"{c.authzid}\0{c.username}\0{c.password}".encode())
    ),
    AuthLogin: ClientConnection._format_auth_login,
    Vrfy: lambda _, c: f"VRFY {c.argument}".rstrip(),
    Expn: lambda _, c: f"EXPN {c.argument}".rstrip(),
    Help: lambda _, c: f"HELP {c.argument}".rstrip(),
    Data: lambda _, c: "DATA",
    Rset: lambda _, c: "RSET",
    Noop: lambda _, c: "NOOP",
    Quit: lambda _, c: "QUIT",
    StartTLS: lambda _, c: "STARTTLS",
}
_INPUTS: Final[dict[type, Input]] = {
    StartTLS: Input.STARTTLS,
    AuthPlain: Input.AUTH_CREDENTIALS,  # with its initial response
    AuthLogin: Input.AUTH_LOGIN_IR,  # with the username; 334, then the password
    MailFrom: Input.MAIL,
    RcptTo: Input.RCPT,
    Data: Input.DATA,
    Rset: Input.RSET,
    Noop: Input.NOOP,
    Help: Input.HELP,
    Vrfy: Input.VRFY,
    Expn: Input.EXPN,
    Quit: Input.QUIT,
}
