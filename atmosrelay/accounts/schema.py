"""The account store's schema: numbered migrations, ``MIGRATIONS[n]`` takes version n to
n+1 (``PRAGMA user_version``). Never edit a shipped migration: add the next one."""

from __future__ import annotations

from typing import Final

MIGRATIONS: Final[tuple[str, ...]] = (
    # 0 -> 1: members, their handles, domains, API keys.
    """
    CREATE TABLE members (
        did TEXT PRIMARY KEY,
        status TEXT NOT NULL DEFAULT 'active'
            CHECK (status IN ('active', 'paused', 'suspended', 'removed')),
        status_reason TEXT,
        status_changed_at REAL,
        labels TEXT NOT NULL DEFAULT '[]',
        created_at REAL NOT NULL
    );
    CREATE TABLE handles (
        handle TEXT PRIMARY KEY,
        did TEXT NOT NULL REFERENCES members (did) ON DELETE CASCADE,
        added_at REAL NOT NULL
    );
    CREATE INDEX handles_did ON handles (did);
    CREATE TABLE domains (
        name TEXT PRIMARY KEY,
        did TEXT NOT NULL REFERENCES members (did) ON DELETE CASCADE,
        status TEXT NOT NULL CHECK (status IN ('pending', 'verified')),
        challenge_token TEXT NOT NULL,
        verified_at REAL,
        verified_without_dns INTEGER NOT NULL DEFAULT 0,
        dkim_selector_stem TEXT NOT NULL,
        dkim_rsa_private TEXT NOT NULL,
        dkim_ed25519_private TEXT NOT NULL,
        forward_to TEXT,
        created_at REAL NOT NULL
    );
    CREATE INDEX domains_did ON domains (did);
    CREATE TABLE api_keys (
        key_id TEXT PRIMARY KEY,
        did TEXT NOT NULL REFERENCES members (did) ON DELETE CASCADE,
        bcrypt_hash BLOB NOT NULL,
        created_at REAL NOT NULL,
        last_used_at REAL,
        revoked_at REAL
    );
    CREATE INDEX api_keys_did ON api_keys (did);
    """,
    # 1 -> 2: the suppression list (RFC 8058 unsubscribes) and room for rate counters.
    """
    CREATE TABLE suppressions (
        did TEXT NOT NULL REFERENCES members (did) ON DELETE CASCADE,
        address TEXT NOT NULL,
        source TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (did, address)
    );
    CREATE TABLE counters (
        did TEXT NOT NULL,
        name TEXT NOT NULL,
        window_start REAL NOT NULL,
        value INTEGER NOT NULL,
        PRIMARY KEY (did, name, window_start)
    );
    """,
    # 2 -> 3: the policy layer: per-member limits, paused domains, why an address is
    # suppressed. Counters are keyed (did = the subject: a DID or a domain, name = the kind,
    # window_start = the bucket) and added to by every relay process sharing this file.
    """
    ALTER TABLE members ADD COLUMN hourly_limit INTEGER;
    ALTER TABLE members ADD COLUMN daily_limit INTEGER;
    ALTER TABLE domains ADD COLUMN paused_at REAL;
    ALTER TABLE domains ADD COLUMN paused_reason TEXT;
    ALTER TABLE suppressions ADD COLUMN detail TEXT;
    CREATE INDEX counters_window ON counters (window_start);
    CREATE TABLE counter_marks (
        journal TEXT PRIMARY KEY,
        flushed_until REAL NOT NULL
    );
    """,
    # 3 -> 4: the inbound log: what the inbound listener received and what it made of it
    # (atmosrelay/inbound/), one row per message, kept ``inbound.retention`` seconds.
    """
    CREATE TABLE inbound (
        id TEXT PRIMARY KEY,
        received_at REAL NOT NULL,
        kind TEXT NOT NULL,
        did TEXT,
        queue_id TEXT,
        recipient TEXT,
        sender TEXT NOT NULL,
        rcpt TEXT NOT NULL,
        client_ip TEXT,
        summary TEXT NOT NULL,
        size INTEGER NOT NULL,
        message BLOB
    );
    CREATE INDEX inbound_received ON inbound (received_at);
    CREATE INDEX inbound_kind ON inbound (kind, received_at);
    CREATE INDEX inbound_did ON inbound (did, kind, received_at);
    """,
    # 4 -> 5: a DKIM rotation in progress (atmosrelay/accounts/domains.py): the next key
    # pair, generated and printed for publishing, signing nothing until it is activated.
    """
    ALTER TABLE domains ADD COLUMN dkim_next_stem TEXT;
    ALTER TABLE domains ADD COLUMN dkim_next_rsa_private TEXT;
    ALTER TABLE domains ADD COLUMN dkim_next_ed25519_private TEXT;
    """,
    # 5 -> 6: each counter row carries the sequence number of the last transaction that
    # added to it, so every relay process sharing this file reads back what the others
    # added since it last looked (submission/counting.py).
    """
    ALTER TABLE counters ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX counters_seq ON counters (seq);
    CREATE TABLE counter_seq (
        one INTEGER PRIMARY KEY CHECK (one = 1),
        seq INTEGER NOT NULL
    );
    INSERT INTO counter_seq (one, seq) VALUES (1, 0);
    """,
    # 6 -> 7: which relay last added to the counters, and at which sequence number: a relay
    # and its own session processes (docs/sessions.md) share a name, so a relay says
    # another shares the file only when a process of another relay adds to it.
    """
    CREATE TABLE counter_writers (
        relay TEXT PRIMARY KEY,
        seq INTEGER NOT NULL
    );
    """,
)
