"""The status index's tables (queue/status.py) and the values read from them."""

from __future__ import annotations

from typing import Final

import attrs

from atmosrelay.queue.records import Accepted

UNSUBSCRIBED: Final = "Recipient unsubscribed from this sender's bulk mail"

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    did TEXT NOT NULL,
    accepted_at REAL NOT NULL,
    sender TEXT NOT NULL,
    message_id TEXT NOT NULL,
    category TEXT NOT NULL,
    tags TEXT NOT NULL,
    metadata TEXT NOT NULL,
    size INTEGER NOT NULL,
    status TEXT NOT NULL,
    finished_at REAL,
    deleted TEXT,
    version INTEGER NOT NULL DEFAULT 0,
    idem_key TEXT,
    idem_digest TEXT,
    idem_rejected TEXT
);
CREATE INDEX IF NOT EXISTS messages_by_did ON messages (did, accepted_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS messages_by_key ON messages (did, idem_key) WHERE idem_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_finished ON messages (finished_at)
    WHERE finished_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS recipients (
    id TEXT NOT NULL,
    addr TEXT NOT NULL,
    status TEXT NOT NULL,
    pos INTEGER NOT NULL,
    PRIMARY KEY (id, addr)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS attempts (
    id TEXT NOT NULL,
    addr TEXT NOT NULL,
    at REAL NOT NULL,
    status TEXT NOT NULL,
    code TEXT NOT NULL,
    mta TEXT,
    reply TEXT,
    UNIQUE (id, addr, at, status)
);
"""

# A message's own status: the first of these any recipient has (still moving first).
SUMMARY_UPDATE: Final = """
UPDATE messages SET
    status = (SELECT CASE
        WHEN SUM(status = 'deferred') > 0 THEN 'deferred'
        WHEN SUM(status = 'accepted') > 0 THEN 'accepted'
        WHEN SUM(status = 'bounced') > 0 THEN 'bounced'
        WHEN SUM(status = 'sent') > 0 THEN 'sent'
        ELSE 'suppressed' END FROM recipients WHERE recipients.id = messages.id),
    finished_at = CASE
        WHEN deleted IS NOT NULL THEN COALESCE(finished_at, :now)
        WHEN EXISTS (SELECT 1 FROM recipients r WHERE r.id = messages.id
                     AND r.status IN ('accepted', 'deferred')) THEN NULL
        ELSE COALESCE(finished_at, :now) END
WHERE id = :id
"""


@attrs.frozen
class Attempt:
    at: float
    recipient: str
    status: str
    code: str  # the enhanced status code (e.g. 4.4.1)
    mta: str | None
    reply: str | None


@attrs.frozen
class MessageStatus:
    id: str
    did: str
    accepted_at: float
    sender: str
    message_id: str
    category: str
    tags: tuple[str, ...]
    metadata: dict[str, str]
    size: int
    status: str
    finished_at: float | None
    deleted: str | None
    recipients: dict[str, str]  # address -> status
    attempts: tuple[Attempt, ...] = ()


@attrs.frozen
class Remembered:
    """What an Idempotency-Key answered the first time."""

    queue_id: str
    digest: str
    message_id: str
    accepted: tuple[str, ...]
    rejected: tuple[tuple[str, str, str], ...]  # (recipient, code, reason)


def remembered(record: Accepted) -> Remembered | None:
    if record.idem is None:
        return None
    accepted = tuple(r.addr for r in record.recipients if not r.suppressed)
    rejected = tuple(
        (r.addr, "RECIPIENT_SUPPRESSED", UNSUBSCRIBED) for r in record.recipients if r.suppressed
    )
    return Remembered(
        record.id,
        record.idem.digest,
        record.message_id,
        accepted,
        record.idem.rejected + rejected,
    )
