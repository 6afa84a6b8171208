"""ServerConnection: the server side of SMTP, sans-IO.

    conn = ServerConnection(capabilities=caps)
    while True:
        event = conn.next_event()
        if event is NEED_DATA:    conn.receive_data(await stream.receive_some())  # b"" = EOF
        elif event is PAUSED:     ... a reply is owed; send it first
        elif has a .reply:        await stream.send_all(conn.send(event.reply))
        else:                     decide, then await stream.send_all(conn.send(REPLY))

Commands are parsed eagerly (PIPELINING, RFC 2920) but replies go out strictly in order:
after a command event, next_event() returns PAUSED until send() has answered it. Message
content streams out as MessageData without waiting. The caller should stop reading from the
peer while PAUSED, which bounds what a pipelining client can make us buffer.

Transitions come only from ``_states.TABLE``; this module parses and keeps books.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Final

import attrs

from atmosrelay.smtp import _replies as R
from atmosrelay.smtp._dotstuff import BdatReader, DataReader, _Limits
from atmosrelay.smtp._errors import LocalProtocolError, RemoteProtocolError
from atmosrelay.smtp._events import (
    NEED_DATA,
    PAUSED,
    AuthChallenge,
    AuthCredentials,
    BdatChunk,
    ChunkEnd,
    CommandError,
    ConnectionClosed,
    Data,
    EndOfMessage,
    Event,
    Expn,
    Greet,
    Hello,
    Help,
    MailFrom,
    MessageData,
    MessageRejected,
    Noop,
    Quit,
    RcptTo,
    Rset,
    StartTLS,
    TLSReady,
    Vrfy,
    _Sentinel,
)
from atmosrelay.smtp._extensions import (
    AddressError,
    Capabilities,
    parse_mail_params,
    parse_path,
    parse_rcpt_params,
)
from atmosrelay.smtp._replies import Reply
from atmosrelay.smtp._states import AUTH_STATES, Input, State, allowed, next_state

# RFC 5321 4.5.3.1.4: a command line is at most 512 octets with its CRLF. Extensions raise
# it: +500 NOTIFY/ORCPT and +100 RET/ENVID (RFC 3461 section 5), +500 AUTH= (RFC 4954
# section 5), +26 SIZE= (RFC 1870), BODY= and SMTPUTF8: 1,650, rounded up.
DEFAULT_MAX_COMMAND_LINE: Final = 2048
# RFC 4954 section 4: AUTH command and response lines up to 12,288 octets.
MAX_AUTH_LINE: Final = 12288
# RFC 5321 4.5.3.1.6: a text line is at most 1000 octets with its CRLF.
DEFAULT_MAX_TEXT_LINE: Final = 1000
# RFC 5321 4.5.3.1.8 requires accepting at least 100 recipients; the reference relay takes 100.
DEFAULT_MAX_RECIPIENTS: Final = 100
# Errors (unknown, malformed or out-of-sequence commands) before 421 and close; Postfix's
# smtpd_hard_error_limit defaults to 20.
DEFAULT_MAX_ERRORS: Final = 20

_NO_ARGS: Final = {"DATA", "RSET", "QUIT", "STARTTLS"}


def _b64(text: str) -> bytes:
    if text == "=":  # RFC 4954: "=" is an empty initial response
        return b""
    return base64.b64decode(text.encode("ascii"), validate=True)


class ServerConnection:
    def __init__(
        self,
        *,
        capabilities: Capabilities | None = None,
        tls: bool = False,
        after_starttls: bool = False,
        max_command_line: int = DEFAULT_MAX_COMMAND_LINE,
        max_text_line: int | None = DEFAULT_MAX_TEXT_LINE,
        max_recipients: int = DEFAULT_MAX_RECIPIENTS,
        max_errors: int = DEFAULT_MAX_ERRORS,
        auth_unavailable: Reply = R.AUTH_NOT_AVAILABLE,
    ) -> None:
        """``tls``: the stream is already encrypted (implicit TLS, or after STARTTLS).
        ``after_starttls``: no greeting is owed; the client starts over with EHLO.
        ``auth_unavailable``: the reply to AUTH when it is not offered (e.g.
        ENCRYPTION_REQUIRED on a STARTTLS port before TLS)."""
        self.tls = tls or after_starttls
        self._caps = capabilities if capabilities is not None else Capabilities()
        self.max_command_line = max_command_line
        self.max_text_line = max_text_line
        self.max_recipients = max_recipients
        self.max_errors = max_errors
        self.auth_unavailable = auth_unavailable
        self.state = State.CONNECTED if after_starttls else State.GREETING
        self.authenticated = False
        self.client_hostname = ""
        self.recipients = 0
        self.errors = 0
        self._smtputf8 = False
        self._buf = bytearray()
        self._eof = False
        self._owed: Input | None = None
        self._owing = False
        self._pending: Event | None = None
        self._data: DataReader | None = None
        self._skipping_line = False  # dropping an overlong command line up to its CRLF
        self._overlong_head = b""
        self._bdat: BdatReader | None = None  # the current message's chunks
        self._chunk: BdatReader | None = None  # the chunk being read (maybe a drain)
        self._bdat_last = False
        self._bdat_size = 0
        self._bdat_error: Reply | None = None  # a refused BDAT whose bytes are drained
        self._bdat_line = b""
        self._login_username = ""

    # -- what we offer -------------------------------------------------------------------
    @property
    def capabilities(self) -> Capabilities:
        """What this connection advertises now: no STARTTLS under TLS, no AUTH once done."""
        return attrs.evolve(
            self._caps,
            starttls=self._caps.starttls and not self.tls,
            auth=() if self.authenticated else self._caps.auth,
        )

    def ehlo_reply(self, hostname: str) -> Reply:
        """The EHLO reply advertising ``capabilities``, greeting the client by the name it
        just gave."""
        pending = self._pending
        client = pending.hostname if isinstance(pending, Hello) else self.client_hostname
        return self.capabilities.ehlo_reply(hostname, client or "client")

    # -- input ----------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; ``b""`` means it closed its side."""
        if data:
            if self._eof:
                raise LocalProtocolError("data after EOF")
            self._buf += data
        else:
            self._eof = True

    def next_event(self) -> Event | _Sentinel:
        """The next event, NEED_DATA, or PAUSED. Raises RemoteProtocolError (send its
        ``reply`` if any, then close)."""
        if self._owing:
            return PAUSED
        state = self.state
        if state is State.GREETING:
            return self._owe(Greet(), Input.GREET)
        if state is State.TLS:
            if self._buf:
                self.state = State.ERROR
                raise RemoteProtocolError("plaintext received after STARTTLS: injection attempt")
            return TLSReady()
        if state in (State.CLOSED, State.ERROR):
            return ConnectionClosed()
        if state is State.DATA:
            return self._next_data()
        if self._chunk is not None:
            return self._next_bdat()
        return self._next_command()

    def _need_data(self) -> Event | _Sentinel:
        if self._eof:
            self.state = State.CLOSED
            return ConnectionClosed()
        return NEED_DATA

    def _owe(self, event: Event, inp: Input | None) -> Event:
        self._owing = True
        self._owed = inp
        self._pending = event
        return event

    def _error(self, reply: Reply, line: bytes | bytearray) -> Event:
        self.errors += 1
        if self.errors > self.max_errors:
            self.state = State.ERROR
            raise RemoteProtocolError("too many errors", R.TOO_MANY_ERRORS)
        inp = Input.AUTH_ABORT if self.state in AUTH_STATES else None
        return self._owe(CommandError(reply, _verb_of(line, self.state in AUTH_STATES)), inp)

    # -- commands -------------------------------------------------------------------------
    def _next_command(self) -> Event | _Sentinel:
        buf = self._buf
        if self._skipping_line:
            end = buf.find(b"\r\n")
            if end == -1:
                del buf[: len(buf) - (1 if buf.endswith(b"\r") else 0)]
                return self._need_data()
            del buf[: end + 2]
            self._skipping_line = False
            return self._error(R.LINE_TOO_LONG, self._overlong_head)
        limit = MAX_AUTH_LINE if self.state in AUTH_STATES else self.max_command_line
        end = buf.find(b"\r\n", 0, limit)
        if end == -1:
            if len(buf) < limit:
                return self._need_data()
            # Overlong: drop it up to its CRLF, then say so once (RFC 5321 4.5.3.1.4).
            self._overlong_head = bytes(buf[: _MAX_VERB + 1])
            self._skipping_line = True
            return self._next_command()
        line = bytes(buf[:end])
        del buf[: end + 2]
        if b"\r" in line or b"\n" in line:
            return self._error(R.BARE_LINE_ENDING, line)
        if b"\0" in line:
            return self._error(R.NUL_NOT_ALLOWED, line)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return self._error(R.SYNTAX_ERROR, line)
        if self.state in AUTH_STATES:
            return self._auth_response(text, line)
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        handler = _COMMANDS.get(verb)
        if handler is None:
            return self._error(R.SYNTAX_ERROR, line)
        return handler(self, verb, arg, line)

    def _sequenced(self, event: Event, inp: Input, line: bytes) -> Event:
        if not allowed(self.state, inp):
            return self._error(R.BAD_SEQUENCE, line)
        return self._owe(event, inp)

    def _cmd_hello(self, verb: str, arg: str, line: bytes) -> Event:
        hostname = arg.strip()
        if not hostname or " " in hostname:
            return self._error(R.PARAMETER_SYNTAX, line)
        extended = verb == "EHLO"
        inp = Input.EHLO if extended else Input.HELO
        return self._sequenced(Hello(hostname, extended), inp, line)

    def _cmd_simple(self, verb: str, arg: str, line: bytes) -> Event:
        if verb in _NO_ARGS and arg.strip():
            return self._error(R.PARAMETER_SYNTAX, line)
        if verb == "STARTTLS":
            if self.tls:
                return self._error(R.TLS_ALREADY_ACTIVE, line)
            if not self._caps.starttls:
                return self._error(R.NOT_IMPLEMENTED, line)
            return self._sequenced(StartTLS(), Input.STARTTLS, line)
        if verb == "DATA":
            return self._sequenced(Data(), Input.DATA, line)
        if verb == "RSET":
            return self._sequenced(Rset(), Input.RSET, line)
        if verb == "QUIT":
            return self._sequenced(Quit(), Input.QUIT, line)
        if verb == "NOOP":
            return self._sequenced(Noop(), Input.NOOP, line)
        if verb == "HELP":
            return self._sequenced(Help(arg.strip()), Input.HELP, line)
        if not arg.strip():
            return self._error(R.PARAMETER_SYNTAX, line)
        if verb == "VRFY":
            return self._sequenced(Vrfy(arg.strip()), Input.VRFY, line)
        return self._sequenced(Expn(arg.strip()), Input.EXPN, line)

    def _path_and_params(self, arg: str, keyword: str) -> tuple[str, str] | None:
        """Split ``FROM:<path> params`` (spaces after the colon are tolerated); None when
        malformed, including parameters not separated from the path by a space."""
        if arg[: len(keyword)].upper() != keyword:
            return None
        rest = arg[len(keyword) :].lstrip(" ")
        if not rest.startswith("<"):
            return None
        close = rest.find(">")
        if rest.startswith('<"'):  # a quoted local part may hold ">"
            i, n = 2, len(rest)
            while i < n and rest[i] != '"':
                i += 2 if rest[i] == "\\" else 1
            close = rest.find(">", i)
        params = rest[close + 1 :]
        if close == -1 or (params and not params.startswith(" ")):
            return None
        return rest[: close + 1], params

    def _cmd_mail(self, verb: str, arg: str, line: bytes) -> Event:
        if not allowed(self.state, Input.MAIL):
            return self._error(R.BAD_SEQUENCE, line)
        parts = self._path_and_params(arg, "FROM:")
        if parts is None:
            return self._error(R.BAD_SENDER_SYNTAX, line)
        try:
            sender = parse_path(parts[0], allow_null=True, bad=R.BAD_SENDER_SYNTAX)
            params = parse_mail_params(parts[1], self._caps)
        except AddressError as exc:
            return self._error(exc.reply, line)
        if not sender.is_ascii and not params.smtputf8:
            return self._error(R.SMTPUTF8_REQUIRED, line)
        return self._owe(MailFrom(sender, params), Input.MAIL)

    def _cmd_rcpt(self, verb: str, arg: str, line: bytes) -> Event:
        if not allowed(self.state, Input.RCPT):
            return self._error(R.BAD_SEQUENCE, line)
        parts = self._path_and_params(arg, "TO:")
        if parts is None:
            return self._error(R.BAD_RECIPIENT_SYNTAX, line)
        try:
            rcpt = parse_path(
                parts[0], allow_null=False, bad=R.BAD_RECIPIENT_SYNTAX, postmaster_ok=True
            )
            params = parse_rcpt_params(parts[1], self._caps)
        except AddressError as exc:
            return self._error(exc.reply, line)
        if not rcpt.is_ascii and not self._smtputf8:
            return self._error(R.SMTPUTF8_REQUIRED, line)
        if self.recipients >= self.max_recipients:
            return self._error(R.TOO_MANY_RECIPIENTS, line)
        return self._owe(RcptTo(rcpt, params), Input.RCPT)

    def _cmd_auth(self, verb: str, arg: str, line: bytes) -> Event:
        if self.authenticated:
            return self._error(R.AUTH_ALREADY, line)
        if not self._caps.auth:
            return self._error(self.auth_unavailable, line)
        mechanism, _, initial = arg.strip().partition(" ")
        mechanism = mechanism.upper()
        if mechanism not in self._caps.auth or mechanism not in ("PLAIN", "LOGIN"):
            return self._error(R.AUTH_MECHANISM_UNSUPPORTED, line)
        if not allowed(self.state, Input.AUTH_PLAIN):
            return self._error(R.BAD_SEQUENCE, line)
        if not initial:
            if mechanism == "PLAIN":
                return self._owe(AuthChallenge(R.AUTH_CHALLENGE_EMPTY), Input.AUTH_PLAIN)
            return self._owe(AuthChallenge(R.AUTH_CHALLENGE_USERNAME), Input.AUTH_LOGIN)
        try:
            decoded = _b64(initial.strip())
        except (binascii.Error, ValueError):
            return self._error(R.AUTH_BAD_BASE64, line)
        if mechanism == "PLAIN":
            return self._plain(decoded, line, Input.AUTH_CREDENTIALS)
        return self._login_user(decoded, line, Input.AUTH_LOGIN_IR)

    def _auth_response(self, text: str, line: bytes) -> Event:
        if text.strip() == "*":  # the client cancels (RFC 4954 section 4)
            return self._error(R.AUTH_CANCELLED, line)
        try:
            decoded = _b64(text.strip())
        except (binascii.Error, ValueError):
            return self._error(R.AUTH_BAD_BASE64, line)
        if self.state is State.AUTH_PLAIN:
            return self._plain(decoded, line, Input.AUTH_CREDENTIALS)
        if self.state is State.AUTH_LOGIN_USER:
            return self._login_user(decoded, line, Input.AUTH_LOGIN_USERNAME)
        try:
            password = decoded.decode("utf-8")
        except UnicodeDecodeError:
            return self._error(R.AUTH_BAD_BASE64, line)
        return self._owe(
            AuthCredentials("LOGIN", "", self._login_username, password), Input.AUTH_CREDENTIALS
        )

    def _plain(self, decoded: bytes, line: bytes, inp: Input) -> Event:
        parts = decoded.split(b"\0")  # authzid NUL authcid NUL passwd (RFC 4616 section 2)
        try:
            authzid, username, password = (p.decode("utf-8") for p in parts)
        except (ValueError, UnicodeDecodeError):
            return self._error(R.AUTH_BAD_BASE64, line)
        if not username or not password:
            return self._error(R.AUTH_BAD_BASE64, line)
        return self._owe(AuthCredentials("PLAIN", authzid, username, password), inp)

    def _login_user(self, decoded: bytes, line: bytes, inp: Input) -> Event:
        try:
            self._login_username = decoded.decode("utf-8")
        except UnicodeDecodeError:
            return self._error(R.AUTH_BAD_BASE64, line)
        return self._owe(AuthChallenge(R.AUTH_CHALLENGE_PASSWORD), inp)

    def _cmd_bdat(self, verb: str, arg: str, line: bytes) -> Event | _Sentinel:
        words = arg.split()
        if (
            not 1 <= len(words) <= 2
            or not words[0].isdigit()
            or len(words[0]) > 20
            or (len(words) == 2 and words[1].upper() != "LAST")
        ):
            return self._error(R.PARAMETER_SYNTAX, line)  # no size we can trust: nothing drained
        size, last = int(words[0]), len(words) == 2
        inp = Input.BDAT_LAST if last else Input.BDAT
        self._bdat_size, self._bdat_last, self._bdat_line = size, last, line
        if not self._caps.chunking:
            self._bdat_error = R.NOT_IMPLEMENTED
        elif not allowed(self.state, inp):
            self._bdat_error = R.BAD_SEQUENCE
        else:
            self._bdat_error = None
        if self._bdat_error is not None:
            # Refused, but its bytes are still read (and dropped), never parsed as commands.
            self._chunk = BdatReader(_Limits(None, None))
        else:
            if self._bdat is None:  # the first chunk of a message
                self._bdat = BdatReader(_Limits(self._caps.size, self.max_text_line))
            self._chunk = self._bdat
        self._chunk.start(size)
        if self._bdat_error is None:
            return BdatChunk(size, last)
        return self._next_bdat()

    def _next_bdat(self) -> Event | _Sentinel:
        chunk = self._chunk
        assert chunk is not None
        while chunk.remaining:
            if not self._buf:
                return self._need_data()
            data, pos = chunk.feed(self._buf, 0)
            del self._buf[:pos]
            if data and self._bdat_error is None:
                return MessageData(data)
        self._chunk = None
        if self._bdat_error is not None:
            error, self._bdat_error = self._bdat_error, None
            return self._error(error, self._bdat_line)
        inp = Input.BDAT_LAST if self._bdat_last else Input.BDAT
        if self._bdat_last:
            chunk.finish_message()
        if chunk.limits.problem is not None:
            return self._owe(MessageRejected(chunk.limits.problem), inp)
        if self._bdat_last:
            return self._owe(EndOfMessage(), inp)
        return self._owe(ChunkEnd(self._bdat_size), inp)

    # -- DATA -----------------------------------------------------------------------------
    def _next_data(self) -> Event | _Sentinel:
        reader = self._data
        assert reader is not None
        if not reader.done:
            data, pos, _ = reader.feed(self._buf, 0)
            del self._buf[:pos]
            if data:
                return MessageData(data)
        if reader.done:
            if reader.limits.problem is not None:
                return self._owe(MessageRejected(reader.limits.problem), Input.END_OF_DATA)
            return self._owe(EndOfMessage(), Input.END_OF_DATA)
        return self._need_data()

    # -- output ---------------------------------------------------------------------------
    def send(self, reply: Reply) -> bytes:
        """Answer the owed command with ``reply``; return the bytes to write.

        A 421 may be sent at any time and closes the connection. Raises LocalProtocolError
        when no reply is owed."""
        if not self._owing and reply.code != 421:
            raise LocalProtocolError(f"no command awaits a reply (state {self.state.value})")
        if self.state in (State.ERROR, State.CLOSED) and reply.code != 421:
            raise LocalProtocolError(f"connection is {self.state.value}")
        inp = self._owed if self._owing else None
        old = self.state
        new = self.state = next_state(old, inp, reply.code)
        if inp is not None and reply.code < 400:
            self._count(inp, self._pending)
        if new is not old:
            self._entered(new)
        self._owing, self._owed, self._pending = False, None, None
        return reply.to_bytes(enhanced=self._caps.enhancedstatuscodes)

    def _count(self, inp: Input, event: Event | None) -> None:
        """What an accepted command changes besides the state."""
        if inp is Input.RCPT:
            self.recipients += 1
        elif inp is Input.MAIL:
            assert isinstance(event, MailFrom)
            self.recipients, self._smtputf8 = 0, event.params.smtputf8
        elif inp is Input.EHLO or inp is Input.HELO:
            assert isinstance(event, Hello)
            self.client_hostname = event.hostname
            self.recipients, self._smtputf8 = 0, False
        elif inp is Input.RSET:
            self.recipients, self._smtputf8 = 0, False
        elif inp is Input.AUTH_CREDENTIALS:
            self.authenticated = True

    def _entered(self, state: State) -> None:
        """Readers live exactly as long as the states that use them."""
        if state is State.DATA:
            self._data = DataReader(self._caps.size, self.max_text_line)
        else:
            self._data = None
            if state is not State.CHUNKING:
                self._bdat = None  # the message's chunks are over

    def send_failed(self) -> None:
        """The caller could not write a reply: the connection is unusable."""
        self.state = State.ERROR


_MAX_VERB: Final = 10  # longer than any command verb we know


def _verb_of(line: bytes | bytearray, sasl_response: bool) -> str:
    """The verb of a refused line, for logs: a command we know, else "" (see CommandError)."""
    if sasl_response:
        return ""
    verb = bytes(line[: _MAX_VERB + 1]).split(b" ", 1)[0].upper().decode("ascii", "replace")
    return verb if verb in _COMMANDS else ""


_Handler = Callable[[ServerConnection, str, str, bytes], "Event | _Sentinel"]
_COMMANDS: Final[dict[str, _Handler]] = {
    "EHLO": ServerConnection._cmd_hello,
    "HELO": ServerConnection._cmd_hello,
    "MAIL": ServerConnection._cmd_mail,
    "RCPT": ServerConnection._cmd_rcpt,
    "DATA": ServerConnection._cmd_simple,
    "BDAT": ServerConnection._cmd_bdat,
    "RSET": ServerConnection._cmd_simple,
    "NOOP": ServerConnection._cmd_simple,
    "QUIT": ServerConnection._cmd_simple,
    "VRFY": ServerConnection._cmd_simple,
    "EXPN": ServerConnection._cmd_simple,
    "HELP": ServerConnection._cmd_simple,
    "STARTTLS": ServerConnection._cmd_simple,
    "AUTH": ServerConnection._cmd_auth,
}


def permissive_reply(
    conn: ServerConnection, event: Event, hostname: str, queue_id: str = "Q1"
) -> Reply | None:
    """What a server that takes everything answers to ``event``, or None when no reply is
    owed (message content). For sinks and test servers; AUTH is the caller's to answer,
    as only it knows the password (None here)."""
    if isinstance(event, (CommandError, AuthChallenge, MessageRejected)):
        return event.reply
    if isinstance(event, Greet):
        return R.GREETING.format(hostname=hostname)
    if isinstance(event, Hello):
        return conn.ehlo_reply(hostname) if event.extended else R.HELO_OK.format(hostname=hostname)
    if isinstance(event, ChunkEnd):
        return R.CHUNK_OK.format(size=event.size)
    if isinstance(event, EndOfMessage):
        return R.QUEUED.format(queue_id=queue_id)
    return _PERMISSIVE.get(type(event))


_PERMISSIVE: Final[dict[type, Reply]] = {
    StartTLS: R.READY_TO_START_TLS,
    MailFrom: R.SENDER_OK,
    RcptTo: R.RECIPIENT_OK,
    Data: R.START_DATA,
    Rset: R.OK,
    Noop: R.OK,
    Quit: R.CLOSING,
    Vrfy: R.VRFY_CANNOT,
    Expn: R.EXPN_DISABLED,
    Help: R.HELP,
}
