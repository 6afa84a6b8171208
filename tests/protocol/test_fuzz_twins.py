"""Hypothesis twins of the protocol fuzz harnesses (fuzz/): the same checks, in the suite.

Random bytes rarely form SMTP, so the strategies mix real protocol fragments with noise."""

from __future__ import annotations

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fuzz.fuzz_client_replies import check_one as check_client
from fuzz.fuzz_server_bytes import check_one as check_server

CLIENT_PIECES = [
    b"EHLO c\r\n",
    b"HELO c\r\n",
    b"MAIL FROM:<a@b.c>\r\n",
    b"MAIL FROM:<>\r\n",
    b"RCPT TO:<d@e.f>\r\n",
    b"DATA\r\n",
    b"BDAT 5\r\n",
    b"BDAT 3 LAST\r\n",
    b"RSET\r\n",
    b"AUTH PLAIN\r\n",
    b"AUTH LOGIN\r\n",
    b"AHVzZXIAc2VjcmV0\r\n",
    b"*\r\n",
    b"STARTTLS\r\n",
    b".\r\n",
    b"..\r\n",
    b"\r\n.\r\n",
    b"\n.\n",
    b"\r",
    b"\n",
    b"\x00",
    b"QUIT\r\n",
    b"x" * 300,
    b"NOOP\r\n",
    b"SIZE=99999 ",
    b"SMTPUTF8",
    b"\xc3\xa5",
]
SERVER_PIECES = [
    b"220 mx\r\n",
    b"250 ok\r\n",
    b"250-mx\r\n",
    b"250-PIPELINING\r\n",
    b"250-STARTTLS\r\n",
    b"250 CHUNKING\r\n",
    b"354 go\r\n",
    b"220 2.0.0 tls\r\n",
    b"421 4.3.2 bye\r\n",
    b"550 5.1.1 no\r\n",
    b"221 bye\r\n",
    b"334 \r\n",
    b"\r\n",
    b"\n",
    b"2",
    b"99 x\r\n",
]


def mixed(pieces: list[bytes]) -> st.SearchStrategy[bytes]:
    piece = st.one_of(st.sampled_from(pieces), st.binary(max_size=8))
    return st.builds(
        lambda first, xs: bytes([first]) + b"".join(xs),
        st.integers(0, 255),
        st.lists(piece, max_size=30),
    )


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mixed(CLIENT_PIECES))
@example(b"\x00EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\nhi\n.\nx\r\n.\r\n")
@example(b"\x05EHLO c\r\nSTARTTLS\r\nMAIL FROM:<a@b.c>\r\n")
def test_server_bytes(data: bytes) -> None:
    check_server(data)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mixed(SERVER_PIECES))
@example(b"\x00220 mx\r\n250-mx\r\n250 STARTTLS\r\n220 go\r\n250 injected\r\n")
@example(b"\x03220 mx\r\n250 mx\r\n250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n")
def test_client_replies(data: bytes) -> None:
    check_client(data)
