"""The addresses the inbound listener answers for, and the tokens that make them safe.

**VERP return path.** A delivered message's envelope sender is
``bounces+QID-N-MAC@<operator domain>``: QID the queue id (26 Crockford base32
characters), N the recipient's place in the message (1-based; 0 when the transaction
carried several recipients: the report's own Final-Recipient then names which), MAC the
first 10 bytes of HMAC-SHA256(key, "QID-N") in base32 (16 characters). 8 + 26 + 1 + 3 +
1 + 16 = 55 octets at most, under RFC 5321's 64 for a local part. Base32 is read
case-insensitively, since some MTAs fold the case of a local part they hand back.

**SRS for forwarded replies.** A reply forwarded to a member's inbox keeps the original
sender recoverable and the forward SPF-clean for the operator domain, by the SRS0 form of
the Sender Rewriting Scheme (Shevek, "Sender Rewriting Scheme", 2004; as libsrs2 and
Postfix's postsrsd write it):

    SRS0=HHHH=TT=orig-domain=orig-local@<operator domain>

TT is the day (days since the epoch mod 1024, two base32 characters), HHHH the first four
base64 characters of HMAC-SHA1(key, TT + orig-domain + orig-local) over the lower-cased
text (compared case-insensitively, as libsrs2 does, since some MTAs fold the case of a
local part). A bounce of the forward comes back to that address; it is accepted only while the
hash verifies and the day is at most ``SRS_MAX_AGE`` old, and is passed on to the original
sender. (No SRS1: the relay never forwards an already rewritten address a second hop.)
pysrs, the one SRS library for Python, has not had a release since 2018, so this is the
spec's twenty lines rather than a dependency.

**The unsubscribe mailto** of List-Unsubscribe (``mailto:unsubscribe@<operator domain>
?subject=unsubscribe DID RECIPIENT TOKEN``) carries the member and the recipient beside the
one-click URL's token, so a reply to it proves itself exactly as the POST does.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from typing import Final

import attrs

VERP_LOCAL: Final = "bounces"
UNSUBSCRIBE_LOCAL: Final = "unsubscribe"
SRS_MAX_AGE: Final = 21  # days a forwarded reply's bounce address stays valid
_B32: Final = "abcdefghijklmnopqrstuvwxyz234567"
_VERP: Final = re.compile(r"bounces\+([0-9a-z]{26})-(\d{1,3})-([a-z2-7]{16})", re.IGNORECASE)
_SRS0: Final = re.compile(r"srs0=([^=]{4})=([a-z2-7]{2})=([^=]+)=(.+)", re.IGNORECASE | re.DOTALL)


def derive_key(secret: bytes, purpose: str) -> bytes:
    """One key per purpose from the relay's secret (the unsubscribe tokens, VERP, SRS)."""
    return hmac.new(secret, b"atmosrelay " + purpose.encode(), hashlib.sha256).digest()


# Every pair of base32 digits, for ten bits at a time.
_B32_PAIRS: Final = tuple(a + b for a in _B32 for b in _B32)


def _b32(data: bytes) -> str:
    """Lower-case base32 (RFC 4648) without padding. Ten octets, a VERP address's MAC and
    one a delivered message, are eight table lookups: ``base64.b32encode`` is Python
    looping over five-octet groups, about half of what making the address cost."""
    if len(data) != 10:
        return base64.b32encode(data).decode("ascii").lower().rstrip("=")
    n = int.from_bytes(data, "big")
    p = _B32_PAIRS
    return (
        p[n >> 70]
        + p[(n >> 60) & 1023]
        + p[(n >> 50) & 1023]
        + p[(n >> 40) & 1023]
        + p[(n >> 30) & 1023]
        + p[(n >> 20) & 1023]
        + p[(n >> 10) & 1023]
        + p[n & 1023]
    )


# -- VERP -----------------------------------------------------------------------------------
@attrs.frozen
class ReturnPath:
    """Makes and reads the VERP envelope senders of delivered mail."""

    key: bytes
    domain: str

    def _mac(self, queue_id: str, index: int) -> str:
        text = f"{queue_id.upper()}-{index}".encode()
        return _b32(hmac.new(self.key, text, hashlib.sha256).digest()[:10])

    def address(self, queue_id: str, index: int) -> str:
        return f"{VERP_LOCAL}+{queue_id}-{index}-{self._mac(queue_id, index)}@{self.domain}"

    def verify(self, local: str) -> tuple[str, int] | None:
        """(queue id, recipient index) when ``local`` is a VERP local part whose MAC holds."""
        m = _VERP.fullmatch(local)
        if m is None:
            return None
        queue_id, index, mac = m.group(1).upper(), int(m.group(2)), m.group(3).lower()
        if not hmac.compare_digest(self._mac(queue_id, index), mac):
            return None
        return queue_id, index


def is_verp_shaped(local: str) -> bool:
    return local.lower().startswith(VERP_LOCAL + "+")


# -- SRS ------------------------------------------------------------------------------------
def _day(now: float) -> str:
    day = int(now // 86400) % 1024
    return _B32[day >> 5] + _B32[day & 31]


def _age(stamp: str, now: float) -> int:
    value = (_B32.index(stamp[0].lower()) << 5) | _B32.index(stamp[1].lower())
    return (int(now // 86400) - value) % 1024


@attrs.frozen
class Srs:
    key: bytes
    domain: str

    def _hash(self, stamp: str, domain: str, local: str) -> str:
        text = f"{stamp}{domain}{local}".lower().encode()
        digest = hmac.new(self.key, text, hashlib.sha1).digest()
        return base64.b64encode(digest).decode("ascii")[:4]

    def forward(self, sender: str, now: float | None = None) -> str:
        """The envelope sender of a forwarded message whose own sender was ``sender``."""
        local, _, domain = sender.rpartition("@")
        stamp = _day(time.time() if now is None else now)
        return f"SRS0={self._hash(stamp, domain, local)}={stamp}={domain}={local}@{self.domain}"

    def reverse(self, local: str, now: float | None = None) -> str | None:
        """The original sender an SRS0 local part names, if its hash holds and it is fresh."""
        m = _SRS0.fullmatch(local)
        if m is None:
            return None
        given, stamp, domain, orig_local = m.groups()
        expected = self._hash(stamp, domain, orig_local)
        # case-insensitively, as libsrs2 does: some MTAs fold the local part's case
        if not hmac.compare_digest(given.lower().encode(), expected.lower().encode()):
            return None
        if _age(stamp, time.time() if now is None else now) > SRS_MAX_AGE:
            return None
        return f"{orig_local}@{domain}"


def is_srs_shaped(local: str) -> bool:
    return local.lower().startswith("srs0=")


# -- the unsubscribe mailto -------------------------------------------------------------------
def unsubscribe_subject(did: str, recipient: str, token: str) -> str:
    return f"unsubscribe {did} {recipient} {token}"


def parse_unsubscribe_subject(subject: str) -> tuple[str, str, str] | None:
    """(did, recipient, token) from a reply to the mailto, or None."""
    words = subject.split()
    while words and words[0].lower() in ("re:", "fwd:", "fw:"):
        words = words[1:]
    if len(words) != 4 or words[0].lower() != "unsubscribe":
        return None
    return words[1], words[2], words[3]
