"""ACCEPTED records for tests: the fields a test cares about, plain defaults for the rest."""

from __future__ import annotations

from atmosrelay.queue.records import Accepted, Recipient, new_queue_id

ALICE_DID = "did:plc:abcdefghijklmnopqrstuvwx"


def accepted_record(
    *recipients: Recipient | str,
    queue_id: str | None = None,
    accepted_at: float = 1_800_000_000.0,
    sender: str = "alice@example.org",
    category: str = "bulk",
    metadata: dict[str, str] | None = None,
    size: int = 10,
) -> Accepted:
    return Accepted(
        id=queue_id or new_queue_id(accepted_at),
        accepted_at=accepted_at,
        did=ALICE_DID,
        sender=sender,
        recipients=tuple(r if isinstance(r, Recipient) else Recipient(r) for r in recipients),
        ret=None,
        envid=None,
        category=category,
        bulk=category == "bulk",
        tags=(),
        metadata=metadata or {},
        client={},
        size=size,
    )
