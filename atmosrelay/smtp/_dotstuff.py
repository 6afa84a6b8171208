"""Message content on the wire: reading DATA and BDAT (server), dot-stuffing (client).

The only end of DATA is CRLF "." CRLF (RFC 5321 section 4.1.1.4). A bare CR or bare LF is
never treated as a line end and never normalised: the message is drained to the real
terminator and refused. That is what defeats SMTP smuggling (2023): a "\\n.\\n" inside a
message cannot end it here, and since such a message is refused, it cannot reach a downstream
server that would end it there either.

Both readers work on whole regions with bytes methods (find, replace, count) rather than
byte by byte, and give the same result however the input is split.
"""

from __future__ import annotations

import re
from typing import Final

from atmosrelay.smtp import _replies as R
from atmosrelay.smtp._errors import LocalProtocolError
from atmosrelay.smtp._replies import Reply

CRLF: Final = b"\r\n"
TERMINATOR: Final = b"\r\n.\r\n"
STUFFED: Final = b"\r\n."  # a line starting with a dot: stuffed, or the terminator
# A line we hold while waiting for its CRLF is bounded even when line length is not checked.
MAX_HELD_LINE: Final = 64 * 1024


# An LF that does not follow a CR. Its literal first character lets the regex engine jump
# from LF to LF at memchr speed and look back only there.
_LF_WITHOUT_CR: Final = re.compile(rb"\n(?<!\r\n)")


def _bare_line_ending(region: bytes | bytearray) -> bool:
    """True if ``region`` holds a CR not followed by LF or an LF not preceded by CR.

    With no bare LF, every LF ends a CRLF pair, so a bare CR exists iff there are more CRs
    than LFs: two single-byte counts and one search for a bare LF, instead of counting CRLF
    pairs, a two-byte search restarting at every line (a 100 KiB message of 78-octet lines:
    ~150 us instead of ~260 on the development VM). Where line ends are dense the search
    would stop too often (a message of empty lines: one stop every two octets), so there
    the pairs are counted after all: never slower than counting them."""
    lf = region.count(b"\n")
    if region.count(b"\r") != lf:
        return True
    if lf * 64 > len(region):
        return region.count(CRLF) != lf
    return _LF_WITHOUT_CR.search(region) is not None


# When a message has several problems, the reply names the worst, whatever order they were
# found in (which depends on how the input was split).
_PRIORITY: Final = {
    R.LINE_TOO_LONG_IN_MESSAGE: 1,
    R.BARE_LINE_ENDING_IN_MESSAGE: 2,
    R.MESSAGE_TOO_BIG: 3,
}


class _Limits:
    """What makes a message refused, shared by DATA and BDAT."""

    def __init__(self, max_size: int | None, max_line: int | None) -> None:
        self.max_size = max_size
        self.max_line = max_line  # octets including CRLF
        self.size = 0
        self.problem: Reply | None = None

    def refuse(self, reply: Reply) -> None:
        if self.problem is None or _PRIORITY[reply] > _PRIORITY[self.problem]:
            self.problem = reply

    def account(self, data: bytes, skipped: int = 0) -> bool:
        """Count ``data`` (and ``skipped`` octets dropped unseen); False once the message is
        refused (stop passing data on)."""
        self.size += len(data) + skipped
        if self.max_size is not None and self.size > self.max_size:
            self.refuse(R.MESSAGE_TOO_BIG)
        return self.problem is None

    def check_lines(self, region: bytes | bytearray, held: int = 0) -> None:
        """``region`` is whole lines; the first continues ``held`` octets already seen."""
        if self.max_line is None or held + len(region) <= self.max_line:
            return
        if _has_long_line(region, self.max_line - 2, held):
            self.refuse(R.LINE_TOO_LONG_IN_MESSAGE)


def _has_long_line(region: bytes | bytearray, limit: int, held: int) -> bool:
    """Whether a line of ``region`` (whole lines, the first continuing ``held`` octets) has
    more than ``limit`` octets before its CRLF.

    Strides a line at a time at C speed: a line starting at ``start`` is short enough iff an
    LF stands within ``limit + 2`` octets of it, and the last LF there starts the next line
    to look at. About ``len(region) / limit`` searches of at most ``limit`` octets, instead
    of splitting the region into every one of its lines (a 100 KiB message: ~5,000 objects,
    15% of the accepting process's time). Lines are cut at LF, not CRLF: a bare LF only makes
    a line shorter here, and is refused on its own as the graver fault (``_PRIORITY``)."""
    start, end = -held, len(region)
    while end - start > limit:  # what is left could hold a long line
        stop = start + limit + 2
        lf = region.rfind(b"\n", max(start, 0), stop) if stop > 0 else -1
        if lf == -1:
            return True
        start = lf + 1
    return False


class DataReader:
    """Reads DATA content: dot-unstuffs, finds the terminator, enforces the limits."""

    def __init__(self, max_size: int | None, max_line: int | None) -> None:
        self.limits = _Limits(max_size, max_line)
        self._skipping = False  # inside an overlong line, waiting for its CRLF
        self.done = False  # the terminator has been consumed

    def feed(self, buf: bytearray, pos: int) -> tuple[bytes, int, bool]:
        """Consume from ``buf[pos:]``: returns (unstuffed data, new position, done).

        ``pos`` is always at the start of a line, except while skipping an overlong one.
        On ``done`` the terminator is consumed; bytes after it belong to the next command.
        """
        if self._skipping:
            end = buf.find(CRLF, pos)
            stop = end if end != -1 else (len(buf) - 1 if buf.endswith(b"\r") else len(buf))
            self._skip(buf, pos, stop)
            if end == -1:
                return b"", stop, False
            pos = end + 2
            self._skipping = False
        if buf.startswith(b".\r\n", pos):
            self.done = True
            return b"", pos + 3, True
        # The terminator and every stuffed dot after the first line begin with CRLF ".": one
        # search finds the first of them, and most messages have none at all, which spares
        # the search for the terminator and the unstuffing pass (each a scan of the region).
        dot = buf.find(STUFFED, pos)
        if dot != -1:
            term = buf.find(TERMINATOR, dot)  # no terminator can start before ``dot``
            if term != -1:
                self.done = True
                region = bytes(buf[pos : term + 2])
                return self._emit(region, True), term + 5, True
        last = buf.rfind(CRLF, pos)
        out = b""
        if last != -1:
            region = bytes(buf[pos : last + 2])
            out = self._emit(region, -1 < dot < last)
            pos = last + 2
        held = len(buf) - pos
        cap = self.limits.max_line if self.limits.max_line is not None else MAX_HELD_LINE
        if held > cap:  # an overlong line still without its CRLF: stop holding it
            self.limits.refuse(R.LINE_TOO_LONG_IN_MESSAGE)
            stop = len(buf) - 1 if buf.endswith(b"\r") else len(buf)
            # The line starts here, so a leading dot is stuffing, not content.
            self._skip(buf, pos + (1 if buf.startswith(b".", pos) else 0), stop)
            self._skipping = True
            pos = stop
        return out, pos, False

    def _skip(self, buf: bytearray, start: int, stop: int) -> None:
        """Drop part of an overlong line, still checking and counting it, so the verdict
        does not depend on where the input was split."""
        part = buf[start:stop]
        if b"\n" in part or b"\r" in part:
            self.limits.refuse(R.BARE_LINE_ENDING_IN_MESSAGE)
        self.limits.account(b"", skipped=len(part))

    def _emit(self, region: bytes, stuffed: bool) -> bytes:
        """``region``: whole lines from a line start; ``stuffed``: CRLF "." occurs in it."""
        limits = self.limits
        if _bare_line_ending(region):
            limits.refuse(R.BARE_LINE_ENDING_IN_MESSAGE)
        limits.check_lines(region)
        if region.startswith(b"."):
            region = region[1:]
        data = region.replace(STUFFED, CRLF) if stuffed else region
        return data if limits.account(data) else b""


class BdatReader:
    """Reads one BDAT chunk of exactly ``size`` octets (no dot-stuffing, RFC 3030), checking
    line endings and lengths across chunks of the same message."""

    def __init__(self, limits: _Limits) -> None:
        self.limits = limits
        self.remaining = 0
        self._carry = b""  # a CR at the end of the previous piece, waiting for its LF
        self._line = 0  # octets of the current, unfinished line

    def start(self, size: int) -> None:
        self.remaining = size

    def feed(self, buf: bytearray, pos: int) -> tuple[bytes, int]:
        take = min(self.remaining, len(buf) - pos)
        data = bytes(buf[pos : pos + take])
        self.remaining -= take
        self._check(data)
        return (data if self.limits.account(data) else b""), pos + take

    def _check(self, data: bytes) -> None:
        s = self._carry + data
        self._carry = b"\r" if s.endswith(b"\r") else b""
        if self._carry:
            s = s[:-1]
        if _bare_line_ending(s):
            self.limits.refuse(R.BARE_LINE_ENDING_IN_MESSAGE)
        last = s.rfind(CRLF)
        if last == -1:
            self._line += len(s)
        else:
            self.limits.check_lines(s[: last + 2], held=self._line)
            self._line = len(s) - last - 2
        if self.limits.max_line is not None and self._line > self.limits.max_line - 2:
            self.limits.refuse(R.LINE_TOO_LONG_IN_MESSAGE)

    def finish_message(self) -> None:
        """At the end of the LAST chunk: a dangling CR is a bare CR."""
        if self._carry:
            self.limits.refuse(R.BARE_LINE_ENDING_IN_MESSAGE)


def whole_content(message: bytes) -> bytes:
    """A whole message as one BDAT LAST chunk carries it (RFC 3030): the same octets the
    receiver keeps of it sent through ``DotStuffer`` (a CRLF added when the message does not
    end with one), refused (LocalProtocolError) on a bare CR or LF as ``DotStuffer`` refuses
    it: length-delimited content cannot be split here, but the server may pass it on with
    DATA to one that would split it."""
    if _bare_line_ending(message):
        raise LocalProtocolError("message data has a bare CR or LF")
    return message if not message or message.endswith(CRLF) else message + CRLF


class DotStuffer:
    """Client side: dot-stuffs outgoing DATA content incrementally (RFC 5321 4.5.2) and
    refuses bare CR or LF rather than send a message another server could split."""

    def __init__(self) -> None:
        self._tail = CRLF  # what the content ended with so far; the start is a line start

    def stuff(self, data: bytes) -> bytes:
        if not data:
            return b""
        s = (b"\r" if self._tail.endswith(b"\r") else b"") + data
        check = s[:-1] if s.endswith(b"\r") else s
        if _bare_line_ending(check):
            raise LocalProtocolError("message data has a bare CR or LF")
        out = data.replace(b"\r\n.", b"\r\n..")
        if self._tail == CRLF and out.startswith(b"."):
            out = b"." + out
        elif self._tail.endswith(b"\r") and data.startswith(b"\n."):
            out = b"\n." + out[1:]
        self._tail = (self._tail + data)[-2:]
        return out

    def end(self) -> bytes:
        """The bytes that end the content: CRLF if it did not end with one, then ".CRLF"."""
        if self._tail.endswith(b"\r"):
            raise LocalProtocolError("message data ends with a bare CR")
        return (b"" if self._tail == CRLF else CRLF) + b".\r\n"
