"""The reply catalogue: every reply the relay sends, as a named constant.

Handlers never write reply strings inline; they pick one of these (some take a value, e.g.
``QUEUED.format(queue_id=...)``). Codes follow RFC 5321 section 4.2; enhanced status codes
RFC 3463 and the IANA registry; the choices for policy replies follow ARCHITECTURE.md section 7.
Reply text never carries exception text or unsanitised peer input.
"""

from __future__ import annotations

import functools

import attrs


@attrs.frozen(cache_hash=True)
class Reply:
    code: int
    enhanced: str | None  # "2.0.0"; None for replies that never carry one (220/221 lines)
    lines: tuple[str, ...]
    # Catalogue replies are encoded once and cached; ones filled with per-message values
    # (queue ids) would only churn the cache.
    cacheable: bool = attrs.field(default=True, eq=False, repr=False)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def is_positive(self) -> bool:
        """2xx or 3xx: the command was accepted (RFC 5321 section 4.2.1)."""
        return self.code < 400

    def format(self, **values: object) -> Reply:
        """Fill ``{name}`` placeholders. Values must not contain CR or LF."""
        filled = tuple(line.format(**values) for line in self.lines)
        for line in filled:
            if "\r" in line or "\n" in line:
                raise ValueError("reply text must not contain CR or LF")
        return Reply(self.code, self.enhanced, filled, cacheable=False)

    def to_bytes(self, *, enhanced: bool = True) -> bytes:
        """The reply on the wire; ``enhanced=False`` drops enhanced codes (RFC 2034 says a
        server uses them only when it advertises ENHANCEDSTATUSCODES). Cached: catalogue
        replies are encoded once."""
        if not self.cacheable:
            return self._encode(enhanced)
        key = (self, enhanced)
        wire = _WIRE.get(key)
        if wire is None:
            wire = self._encode(enhanced)
            if len(_WIRE) < _WIRE_CACHE_SIZE:
                _WIRE[key] = wire
        return wire

    def _encode(self, enhanced: bool) -> bytes:
        prefix = f"{self.enhanced} " if enhanced and self.enhanced else ""
        if len(self.lines) == 1:
            return f"{self.code} {prefix}{self.lines[0]}\r\n".encode()
        last = len(self.lines) - 1
        out = []
        for i, line in enumerate(self.lines):
            sep = " " if i == last else "-"
            out.append(f"{self.code}{sep}{prefix}{line}\r\n")
        return "".join(out).encode("utf-8")


@functools.lru_cache(maxsize=64)
def for_host(reply: Reply, hostname: str) -> Reply:
    """``reply`` naming the relay's own host (the greeting, HELO's reply): the same on every
    connection, so filled, and its bytes encoded, once rather than once a connection."""
    return attrs.evolve(reply.format(hostname=hostname), cacheable=True)


# Bounded all the same: a caller may build replies by hand.
_WIRE_CACHE_SIZE = 4096
_WIRE: dict[tuple[Reply, bool], bytes] = {}


def _r(code: int, enhanced: str | None, *lines: str) -> Reply:
    return Reply(code, enhanced, tuple(lines))


# -- session ------------------------------------------------------------------------------
GREETING = _r(220, None, "{hostname} ESMTP atmosrelay")
NO_SERVICE = _r(554, "5.3.2", "No SMTP service here")  # a refusing greeting (RFC 5321 3.1)
CLOSING = _r(221, "2.0.0", "Bye")
OK = _r(250, "2.0.0", "Ok")
HELO_OK = _r(250, None, "{hostname}")
HELP = _r(214, "2.0.0", "See RFC 5321 and https://www.rfc-editor.org/rfc/rfc6409")
VRFY_CANNOT = _r(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
EXPN_DISABLED = _r(502, "5.5.1", "EXPN not available")
READY_TO_START_TLS = _r(220, "2.0.0", "Ready to start TLS")
TLS_ALREADY_ACTIVE = _r(503, "5.5.1", "TLS already active")
TLS_NOT_AVAILABLE = _r(454, "4.7.0", "TLS not available due to temporary reason")

# -- transaction ----------------------------------------------------------------------------
SENDER_OK = _r(250, "2.1.0", "Sender ok")
RECIPIENT_OK = _r(250, "2.1.5", "Recipient ok")
START_DATA = _r(354, None, "End data with <CR><LF>.<CR><LF>")
QUEUED = _r(250, "2.0.0", "Ok: queued as {queue_id}")
CHUNK_OK = _r(250, "2.0.0", "{size} octets received")

# -- authentication (RFC 4954) --------------------------------------------------------------
AUTH_SUCCESS = _r(235, "2.7.0", "Authentication successful")
AUTH_FAILED = _r(535, "5.7.8", "Authentication failed")
AUTH_REQUIRED = _r(530, "5.7.0", "Authentication required")
ENCRYPTION_REQUIRED = _r(
    538, "5.7.11", "Encryption required for requested authentication mechanism"
)
AUTH_NOT_AVAILABLE = _r(503, "5.5.1", "AUTH not available")
AUTH_ALREADY = _r(503, "5.5.1", "Already authenticated")
AUTH_MECHANISM_UNSUPPORTED = _r(504, "5.5.4", "Unrecognized authentication type")
AUTH_CANCELLED = _r(501, "5.7.0", "Authentication cancelled")
AUTH_BAD_BASE64 = _r(501, "5.5.2", "Cannot decode response")
AUTH_CHALLENGE_EMPTY = _r(334, None, "")
AUTH_CHALLENGE_USERNAME = _r(334, None, "VXNlcm5hbWU6")  # base64("Username:")
AUTH_CHALLENGE_PASSWORD = _r(334, None, "UGFzc3dvcmQ6")  # base64("Password:")
AUTH_TEMP_FAILURE = _r(454, "4.7.0", "Temporary authentication failure")

# -- protocol errors the connection itself reports ------------------------------------------
SYNTAX_ERROR = _r(500, "5.5.2", "Syntax error, command unrecognized")
LINE_TOO_LONG = _r(500, "5.5.6", "Line too long")
BARE_LINE_ENDING = _r(500, "5.5.2", "Bare CR or LF not allowed; lines end with CRLF")
NUL_NOT_ALLOWED = _r(500, "5.5.2", "NUL not allowed in commands")
PARAMETER_SYNTAX = _r(501, "5.5.4", "Syntax error in parameters or arguments")
BAD_SENDER_SYNTAX = _r(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT_SYNTAX = _r(501, "5.1.3", "Bad recipient address syntax")
NOT_IMPLEMENTED = _r(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = _r(503, "5.5.1", "Bad sequence of commands")
PARAMETER_NOT_IMPLEMENTED = _r(555, "5.5.4", "Unsupported parameter")
SMTPUTF8_REQUIRED = _r(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
TOO_MANY_RECIPIENTS = _r(452, "4.5.3", "Too many recipients")
MESSAGE_TOO_BIG = _r(552, "5.3.4", "Message size exceeds fixed maximum message size")
LINE_TOO_LONG_IN_MESSAGE = _r(554, "5.6.0", "Message has a line longer than 998 characters")
BARE_LINE_ENDING_IN_MESSAGE = _r(554, "5.6.0", "Message has bare CR or LF; lines end with CRLF")
TOO_MANY_ERRORS = _r(421, "4.7.0", "Too many errors, closing connection")

# -- relay policy (ARCHITECTURE.md section 7; the codes in atmosrelay/refusals.py) ----------
DOMAIN_MISMATCH = _r(550, "5.1.0", "Sender domain {domain} is not enrolled for this account")
DOMAIN_NOT_VERIFIED = _r(
    550,
    "5.1.0",
    "Sender domain {domain} is enrolled but not verified yet; publish its TXT record, then "
    "run 'atmosrelay domain verify {domain}'",
)
DOMAIN_PAUSED = _r(
    550, "5.7.1", "Sending domain {domain} is paused: {reason}; contact the operator"
)
FROM_NOT_ALLOWED = _r(550, "5.7.1", "{detail}")
MEMBER_SUSPENDED = _r(550, "5.7.1", "Account suspended; contact the operator")
SUSPENDED_AT_CONNECT = _r(521, "5.7.1", "Account suspended; no mail accepted")
NULL_SENDER_REFUSED = _r(550, "5.7.1", "Null reverse-path not accepted for submission")
RATE_LIMITED = _r(451, "4.7.1", "{limit} reached; retry in {wait} s")
RATE_LIMITED_SPLIT = _r(451, "4.7.1", "{n} recipients are over the {limit}; send fewer at once")
RECIPIENT_SUPPRESSED = _r(550, "5.7.1", "Recipient suppressed ({reason}) for this sender")
QUEUE_UNAVAILABLE = _r(451, "4.3.0", "Temporary failure storing message; retry later")
QUEUE_FULL = _r(451, "4.4.2", "Queue full or busy; retry later")
# Messages being received at once hold more than smtp.inflight_budget (RFC 5321's 452).
INFLIGHT_FULL = _r(452, "4.3.1", "Insufficient system storage; retry later")
ALL_SUPPRESSED = _r(550, "5.7.1", "All recipients suppressed")
UNPARSEABLE_MESSAGE = _r(554, "5.6.0", "Failed to parse message: {detail}")

# -- closing the connection (any time, RFC 5321 section 3.8) --------------------------------
SHUTTING_DOWN = _r(421, "4.3.2", "Service shutting down, closing connection")
IDLE_TIMEOUT = _r(421, "4.4.2", "Idle timeout, closing connection")
DATA_TIMEOUT = _r(421, "4.4.2", "Message data too slow, closing connection")
SESSION_TIME_LIMIT = _r(421, "4.4.2", "Session time limit reached, reconnect to continue")
TOO_MANY_CONNECTIONS = _r(421, "4.7.0", "Too many connections, try again later")
# The journal failed (fsync or write): nothing can be made durable until a restart.
JOURNAL_FAILED = _r(421, "4.3.0", "Mail system failure, not accepting mail; try again later")
# The key this session authenticated with was revoked, or its member removed, since AUTH.
# The inbound listener (atmosrelay/inbound/): the relay's MX, never an open relay.
ADDRESS_NOT_AVAILABLE = _r(550, "5.1.1", "Address not available")
INBOUND_RATE_LIMITED = _r(450, "4.7.1", "Too much mail from your address; retry later")
ONE_MEMBER_PER_MESSAGE = _r(452, "4.5.3", "Too many recipients; send the rest in another message")
CREDENTIALS_REVOKED = _r(421, "4.7.8", "Credentials no longer valid, closing connection")
