"""Refusals: why the relay will not take a submission, as values, one table for SMTP and HTTP.

Every way in (the SMTP session, the HTTP API) gets a ``Refusal`` from the acceptance
pipeline (``atmosrelay.submission``) and the policy (``atmosrelay.policy``) and renders it:
SMTP sends ``refusal.reply``, HTTP answers ``refusal.http_status`` with
``{"error": refusal.text, "code": refusal.code, "retryable": ...}`` and, for a rate limit,
``Retry-After: refusal.retry_after``. The table is the one place a code gets its reply; it is
documented in docs/policy.md (a test keeps the two equal).

A refusal's text is written for the person who must act on it (which limit, until when,
which command verifies a domain). It never carries exception text, a key, or peer input
that was not cleaned first.
"""

from __future__ import annotations

import enum
import math
from typing import Final

import attrs

from atmosrelay.smtp import Reply
from atmosrelay.smtp import replies as R


class Code(enum.StrEnum):
    AUTH_REQUIRED = "AUTH_REQUIRED"
    AUTH_FAILED = "AUTH_FAILED"
    INVALID_DID = "INVALID_DID"
    MEMBER_SUSPENDED = "MEMBER_SUSPENDED"
    DOMAIN_MISMATCH = "DOMAIN_MISMATCH"
    DOMAIN_PAUSED = "DOMAIN_PAUSED"
    FROM_NOT_ALLOWED = "FROM_NOT_ALLOWED"
    RATE_LIMITED = "RATE_LIMITED"
    RECIPIENT_SUPPRESSED = "RECIPIENT_SUPPRESSED"
    ALL_SUPPRESSED = "ALL_SUPPRESSED"
    INVALID_REQUEST = "INVALID_REQUEST"
    MESSAGE_TOO_LARGE = "MESSAGE_TOO_LARGE"
    TOO_MANY_RECIPIENTS = "TOO_MANY_RECIPIENTS"
    QUEUE_FULL = "QUEUE_FULL"
    TEMPORARILY_UNAVAILABLE = "TEMPORARILY_UNAVAILABLE"
    # HTTP only (no SMTP command asks these questions):
    IDEMPOTENCY_CONFLICT = "IDEMPOTENCY_CONFLICT"
    NOT_FOUND = "NOT_FOUND"
    INVALID_TOKEN = "INVALID_TOKEN"
    INTERNAL_ERROR = "INTERNAL_ERROR"


@attrs.frozen
class Entry:
    reply: Reply  # may hold {placeholders}, filled by ``refuse``
    http_status: int
    retryable: bool  # will the same request succeed later without anyone changing anything?
    smtp: bool = True  # False: HTTP only (the reply is then only the HTTP error's text)


def _http_only(text: str) -> Reply:
    return Reply(554, "5.0.0", (text,))


# The one table. SMTP codes follow the reference relay where it names one (docs/policy.md).
TABLE: Final[dict[Code, Entry]] = {
    Code.AUTH_REQUIRED: Entry(R.AUTH_REQUIRED, 400, False),
    Code.AUTH_FAILED: Entry(R.AUTH_FAILED, 401, False),
    Code.INVALID_DID: Entry(R.AUTH_FAILED, 400, False),
    Code.MEMBER_SUSPENDED: Entry(R.MEMBER_SUSPENDED, 403, False),
    Code.DOMAIN_MISMATCH: Entry(R.DOMAIN_MISMATCH, 403, False),
    Code.DOMAIN_PAUSED: Entry(R.DOMAIN_PAUSED, 403, False),
    Code.FROM_NOT_ALLOWED: Entry(R.FROM_NOT_ALLOWED, 403, False),
    Code.RATE_LIMITED: Entry(R.RATE_LIMITED, 429, True),
    Code.RECIPIENT_SUPPRESSED: Entry(R.RECIPIENT_SUPPRESSED, 422, False),
    Code.ALL_SUPPRESSED: Entry(R.ALL_SUPPRESSED, 200, False),
    Code.INVALID_REQUEST: Entry(R.UNPARSEABLE_MESSAGE, 400, False),
    Code.MESSAGE_TOO_LARGE: Entry(R.MESSAGE_TOO_BIG, 413, False),
    Code.TOO_MANY_RECIPIENTS: Entry(R.TOO_MANY_RECIPIENTS, 400, False),
    Code.QUEUE_FULL: Entry(R.QUEUE_FULL, 503, True),
    Code.TEMPORARILY_UNAVAILABLE: Entry(R.QUEUE_UNAVAILABLE, 503, True),
    Code.IDEMPOTENCY_CONFLICT: Entry(
        _http_only("Idempotency-Key {key} was used for a different request in the last {ttl}"),
        422,
        False,
        smtp=False,
    ),
    Code.NOT_FOUND: Entry(_http_only("No {what} {name}"), 404, False, smtp=False),
    Code.INVALID_TOKEN: Entry(
        _http_only("This unsubscribe link is not valid (it was altered or cut short)"),
        400,
        False,
        smtp=False,
    ),
    Code.INTERNAL_ERROR: Entry(
        _http_only("Internal error; nothing was queued, retry later"), 500, True, smtp=False
    ),
}


@attrs.frozen
class Refusal:
    code: Code
    reply: Reply  # the SMTP reply, filled in
    retry_after: float | None = None  # seconds until a retry can succeed (rate limits)
    log: str = ""  # more for the operator's log than the peer is told (never a secret)

    @property
    def http_status(self) -> int:
        return TABLE[self.code].http_status

    @property
    def retryable(self) -> bool:
        """A rate limit with no time it frees (one message over the whole limit) is not."""
        if self.code is Code.RATE_LIMITED and self.retry_after is None:
            return False
        return TABLE[self.code].retryable

    @property
    def text(self) -> str:
        """What the client is told, without the SMTP codes (the HTTP ``error``)."""
        return " ".join(self.reply.lines)

    @property
    def retry_after_header(self) -> str | None:
        """``Retry-After`` in whole seconds, rounded up (RFC 9110 10.2.3)."""
        if self.retry_after is None:
            return None
        return str(max(1, math.ceil(self.retry_after)))


def _safe(value: object) -> str:
    """A value fit for a reply line: no CR/LF, no braces (they would be read as a template),
    printable ASCII, bounded."""
    text = str(value)
    text = text.replace("{", "(").replace("}", ")")
    cleaned = "".join(c if " " <= c <= "~" else "?" for c in text)
    return cleaned[:200]


def refuse(
    code: Code,
    *,
    retry_after: float | None = None,
    log: str = "",
    enhanced: str | None = None,
    reply: Reply | None = None,
    **values: object,
) -> Refusal:
    """The refusal for ``code``, its reply (the table's, or a variant ``reply`` of the same
    code) filled with ``values`` (cleaned)."""
    reply = reply or TABLE[code].reply
    if values:
        reply = reply.format(**{k: _safe(v) for k, v in values.items()})
    if enhanced is not None:
        reply = attrs.evolve(reply, enhanced=enhanced)
    return Refusal(code, reply, retry_after, log)
