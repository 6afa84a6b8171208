"""Fuzz header processing at acceptance: arbitrary message bytes into ``check_octets`` and
``process`` (atmosrelay/message/headers.py), as the end of DATA does.

Invariant (fuzz/README.md): only ``MessageError`` is raised; on success the body bytes come
out exactly as they went in, the relay's own stamps appear once each, the X-Atmos-* headers
the relay reads (and their X-Postscale-* aliases) are gone, and what was accepted holds no
NUL; the From value parses without an exception, and where the policy's shortcut for plain
From values applies it finds what the standard library's parser finds. The first input
byte chooses the SMTPUTF8 and BODY=8BITMIME flags.
"""

from __future__ import annotations

import email.utils

from atmosrelay.message.headers import (
    OWN_HEADERS,
    MessageError,
    check_octets,
    process,
    split_header,
)
from atmosrelay.policy.sender import _SIMPLE, addresses
from fuzz._harness import atheris_main

DID = "did:plc:abcdefghijklmnopqrstuvwx"


def check_one(data: bytes) -> None:
    if not data:
        return
    flags, message = data[0], data[1:]
    try:
        check_octets(message, smtputf8=bool(flags & 1), eight_bit_mime=bool(flags & 2))
        out = process(message, did=DID, operator_domain="relay.test", hostname="mx.test", now=0)
    except MessageError as exc:
        refused: MessageError | None = exc
    else:
        refused = None
    if refused is not None:
        assert refused.status in ("5.6.0", "5.6.7")
        return
    _, body = split_header(message)
    fields, out_body = split_header(out.message)
    assert out_body == body, "the body changed"
    assert b"\0" not in out.message
    names = [f.key for f in fields]
    assert names.count("x-atmos-member-did") == 1
    assert names.count("feedback-id") == 1
    assert not OWN_HEADERS & set(names)
    found = addresses(out.from_value)
    if _SIMPLE.fullmatch(out.from_value):
        assert found == [a for _, a in email.utils.getaddresses([out.from_value]) if a]


if __name__ == "__main__":  # pragma: no cover
    atheris_main(check_one)
