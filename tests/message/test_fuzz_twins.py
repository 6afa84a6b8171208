"""Hypothesis twins of the message and config fuzz harnesses (fuzz/): the same checks, in
the suite. The strategies mix real message and TOML fragments with noise."""

from __future__ import annotations

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fuzz.fuzz_config import check_one as check_config
from fuzz.fuzz_dsn import check_one as check_dsn
from fuzz.fuzz_headers import check_one as check_headers
from tests.protocol.test_fuzz_twins import mixed

MESSAGE_PIECES = [
    b"From: alice@example.org\r\n",
    b"Subject: hi\r\n",
    b"X-Atmos-Category: password-reset\r\n",
    b"X-Atmos-Tags: a,b\r\n",
    b'X-Atmos-Metadata: {"k": "v"}\r\n',
    b"X-Atmos-Member-Did: forged\r\n",
    b"Feedback-ID: forged\r\n",
    b" folded\r\n",
    b"\r\n",
    b"body line\r\n",
    b"\x00",
    b"\xc3\xa9",
    b"\r",
    b"\n",
    b":",
]
TOML_PIECES = [
    "[smtp]\n",
    "[relay]\n",
    "[auth]\n",
    "[delivery]\n",
    "[nope]\n",
    'listeners = ["127.0.0.1:0 starttls"]\n',
    'listeners = ["x"]\n',
    "idle_timeout = 1.5\n",
    "idle_timeout = -1\n",
    'idle_timeout = "soon"\n',
    "max_recipients = 0\n",
    "bcrypt_cost = 99\n",
    'smarthost = "127.0.0.1:99999"\n',
    "trusted_networks = [1]\n",
    "x = [\n",
    "=",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mixed(MESSAGE_PIECES))
@example(b"\x00From: a@b.c\r\nSubject: caf\xc3\xa9\r\n\r\nbody\r\n")
def test_headers(data: bytes) -> None:
    check_headers(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mixed(MESSAGE_PIECES))
def test_dsn(data: bytes) -> None:
    check_dsn(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.sampled_from(TOML_PIECES), st.text(max_size=6)), max_size=12))
def test_config(pieces: list[str]) -> None:
    check_config("".join(pieces).encode())
