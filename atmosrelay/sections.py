"""The config sections that have no one runtime object of their own: each setting declared
once (atmosrelay/settings.py). ``[policy]`` is ``policy.settings.PolicySettings`` and
``[auth]`` is ``accounts.api_keys.AuthSettings``; atmosrelay/config.py lists all eleven.

A class's docstring is the comment printed under its header in ``atmosrelay config defaults``.
"""

from __future__ import annotations

import enum
from typing import Any, Final

import attrs

from atmosrelay.settings import (
    Network,
    boolean,
    check_domains,
    check_networks,
    custom,
    each,
    host_port,
    integer,
    lowered,
    number,
    string,
    to_networks,
)

MIB: Final = 1024 * 1024


class ListenerMode(enum.StrEnum):
    """How a listener's sessions start (docs/security.md)."""

    STARTTLS = "starttls"  # plaintext greeting; AUTH only after STARTTLS
    IMPLICIT = "implicit"  # TLS from the first byte
    TRUSTED = "trusted"  # no TLS, no AUTH: clients in trusted_networks submit as trusted_did
    INBOUND = "inbound"  # the relay's MX: no AUTH, STARTTLS offered, local recipients only
    AUTO = "auto"  # implicit TLS if the client starts a handshake at once, else as starttls


Listener = tuple[str, int, ListenerMode]  # host (IPv6 without brackets), port, mode
HttpListener = tuple[str, int, bool]  # host, port, tls


def _split_address(address: str) -> tuple[str, str]:
    host, _, port = address.rpartition(":")
    return host, port


def _check_listeners(v: Any) -> str | None:
    expected = (
        'a list of "host:port mode" strings, mode starttls, implicit, trusted, inbound or auto'
    )
    if not isinstance(v, list):
        return expected
    for x in v:
        if not isinstance(x, str) or len(x.split()) != 2:
            return expected
        address, mode = x.split()
        host, port = _split_address(address)
        if mode not in set(ListenerMode) or not host:
            return f"{expected} (not {x!r})"
        if not (port.isdigit() and 0 <= int(port) < 65536):
            return f"{expected} ({x!r} has a bad port)"
    return None


def _listener(text: str) -> Listener:
    address, mode = text.split()
    host, port = _split_address(address)
    return host.strip("[]"), int(port), ListenerMode(mode)


def _check_http_listeners(v: Any) -> str | None:
    expected = 'a list of "host:port" or "host:port tls" strings'
    if not isinstance(v, list):
        return expected
    for x in v:
        parts = x.split() if isinstance(x, str) else []
        if not 1 <= len(parts) <= 2 or (len(parts) == 2 and parts[1] != "tls"):
            return f"{expected} (not {x!r})"
        host, port = _split_address(parts[0])
        if not host or not (port.isdigit() and 0 <= int(port) < 65536):
            return f"{expected} ({x!r} has a bad port)"
    return None


def _http_listener(text: str) -> HttpListener:
    address, *tls = text.split()
    host, port = _split_address(address)
    return host.strip("[]"), int(port), bool(tls)


def _check_nameservers(v: Any) -> str | None:
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        return 'a list of "host" or "host:port" strings'
    for x in v:
        if host_port(x, 53)[1] is None:
            return f'a list of "host" or "host:port" strings ({x!r} has a bad port)'
    return None


def _nameserver(text: str) -> tuple[str, int]:
    host, port = host_port(text, 53)
    return host, port or 53


def _check_smarthost(v: Any) -> str | None:
    expected = '"" or "host:port"'
    if not isinstance(v, str):
        return expected
    if v and (v.count(":") != 1 or host_port(v, 25)[1] is None or not v.split(":")[0]):
        return f"{expected} (not {v!r})"
    return None


def _smarthost(v: Any) -> tuple[str, int] | None:
    if not isinstance(v, str):
        return v  # type: ignore[no-any-return]  # already converted (or None)
    if not v:
        return None
    host, port = host_port(v, 25)
    return host, port or 25


def _check_local_parts(v: Any) -> str | None:
    if not isinstance(v, list) or not all(
        isinstance(x, str) and x and "@" not in x and x.isascii() and " " not in x for x in v
    ):
        return "a list of local parts such as postmaster"
    return None


def _check_address_or_empty(v: Any) -> str | None:
    expected = '"" or an address such as ops@example.org'
    if not isinstance(v, str):
        return expected
    if v and (v.count("@") != 1 or not all(v.split("@")) or any(c.isspace() for c in v)):
        return f"{expected} (not {v!r})"
    return None


@attrs.frozen
class Relay:
    data_dir: str = string(
        "./var", doc="Where the journal, the account database and generated keys live."
    )
    log_level: str = string(
        "info",
        choices=("debug", "info", "warning", "error"),
        doc="Log verbosity: debug, info, warning, error (SIGHUP applies a change).",
        reload=True,
    )
    log_format: str = string(
        "text",
        choices=("text", "json"),
        doc='"text": one line per event with an ISO-8601 UTC timestamp; "json": one JSON '
        "object per line (ts, level, logger, event, message and the event's fields: "
        "queue_id, did, peer, ...).",
    )


def _group_wait(v: Any) -> str | None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 0.01
    return None if ok else "a number of seconds from 0 to 0.01"


@attrs.frozen
class Journal:
    segment_size: int = integer(
        64 * MIB,
        64 * 1024,
        doc="A segment is sealed and the next one started beyond this size. Compaction works "
        "on sealed segments, so smaller segments return disk sooner; larger ones rotate less.",
        note="64 MiB",
    )
    max_record_size: int = integer(
        64 * MIB,
        1024,
        1024 * MIB,
        doc="The largest single record. A message is one record, so this bounds message size "
        "plus envelope: the submission limit (50 MB, as the reference relay) must stay below "
        "it.",
        note="64 MiB",
    )
    compact_interval: float = number(
        30.0,
        0.1,
        doc="Seconds between checks whether compacting the sealed segments is worth it (at "
        "least half of their records belong to finished or deleted messages).",
    )
    group_wait: float = custom(
        0.002,
        _group_wait,
        doc="Seconds the journal's writer may wait, before it writes a message, for the "
        "messages other sessions are reading at that moment, so that they share one write and "
        "fsync; the wait ends when the last of them has arrived. It adds at most this to a "
        "250, never delays a lone sender's, and saves the event loop CPU when many sessions "
        "send one message each (docs/journal.md). 0 writes every message at once (a "
        "delivery's outcome, which nobody waits for, may still be held up to 5 ms for others).",
        note="2 ms",
        convert=float,
    )


@attrs.frozen
class Operator:
    domain: str = string(
        "atmosrelay.localhost",
        doc="The relay's own domain: every message is also DKIM-signed with d=<domain>. Its "
        "key is generated under <data_dir>/dkim on first start.",
    )
    spf_include: str = string(
        "",
        empty=True,
        doc='The SPF include members\' domains should publish ("" suggests none), e.g. '
        '"_spf.relay.example".',
    )


@attrs.frozen
class Smtp:
    listeners: tuple[Listener, ...] = custom(
        ["127.0.0.1:2587 starttls", "127.0.0.1:2465 implicit", "127.0.0.1:2025 inbound"],
        _check_listeners,
        convert=each(_listener),
        doc='Listeners: "host:port mode", mode starttls (AUTH only after STARTTLS), implicit '
        "(TLS from the first byte), trusted (no TLS, no AUTH: clients from trusted_networks "
        "submit as trusted_did; for a co-located app or a load generator) or inbound (the "
        "relay's MX: bounces, feedback reports, replies; no AUTH, STARTTLS offered; "
        "docs/inbound.md) or auto (opt-in: a client whose first bytes within auto_tls_window "
        "are a TLS handshake gets implicit TLS, any other gets the starttls greeting after "
        "the window; for clients that use smtps:// on port 587, as an atproto PDS's URL form "
        "does; docs/security.md). Port 0 picks a free port.\n"
        'Production: ["0.0.0.0:587 starttls", "0.0.0.0:465 implicit", "0.0.0.0:2525 starttls",\n'
        '             "0.0.0.0:2587 starttls", "0.0.0.0:25 inbound"]',
    )
    hostname: str = string("localhost", note="in the greeting and EHLO reply")
    tls_cert: str = string(
        "",
        empty=True,
        note='PEM files; "" generates a self-signed pair in <data_dir>/tls',
        reload=True,  # read again even under the same name: a renewal writes new contents
    )
    tls_key: str = string("", empty=True, reload=True)
    max_message_size: int = integer(
        52_428_800, 1024, note="50 MB, the reference relay's limit (SIZE, RFC 1870)"
    )
    max_recipients: int = integer(
        100, 1, note="RFC 5321 4.5.3.1.8's minimum, and the reference's maximum"
    )
    idle_timeout: float = number(
        60.0,
        0.1,
        doc="Time limits on a session (docs/security.md): a command must arrive whole within "
        "idle_timeout of the wait for it starting, however it is dribbled; a DATA or BDAT "
        "phase must end within data_timeout of its start plus one second per min_data_rate "
        "bytes received (so a large message on a good link is never cut, and a dribbled one "
        "is); a session gets 421 4.4.2 at the first command boundary past max_session_time.",
        note="seconds (RFC 5321 4.5.3.2 suggests 5 min)",
    )
    data_timeout: float = number(600.0, 0.1, note="seconds")
    min_data_rate: int = integer(
        4096, 1, note="bytes per second: a 50 MB message gets at most ~3.6 h"
    )
    max_session_time: float = number(3600.0, 1, note="seconds")
    processes: int = integer(
        2,
        0,
        16,
        doc="Session processes: each serves the submission listeners' SMTP sessions (TLS, "
        "AUTH, the policy) and hands its messages to this process, which journals them and "
        "answers each 250 once its record is fsynced (docs/sessions.md), so acceptance uses more "
        "than one core. 0: every session in this process.",
    )
    max_connections: int = integer(1000, 1)
    max_connections_per_ip: int = integer(50, 1)
    inflight_budget: int = integer(
        256 * MIB, 1024, note="bytes all messages being received may hold (256 MiB)"
    )
    shutdown_grace: float = number(30.0, 0, note="seconds sessions get to finish on SIGTERM")
    auto_tls_window: float = number(
        0.2, 0.01, note="seconds an auto listener waits for a TLS handshake"
    )
    trusted_did: str = string("", empty=True, note="the member trusted listeners submit as")
    trusted_networks: tuple[Network, ...] = custom(
        ["127.0.0.0/8", "::1/128"], check_networks, convert=to_networks
    )


@attrs.frozen
class Inbound:
    verp: bool = boolean(
        True,
        doc="Delivered mail carries MAIL FROM:<bounces+TOKEN@operator.domain> (VERP, an "
        "HMAC'd token naming the message and the recipient), so bounces that come back later "
        "reach the inbound listener and are counted (docs/inbound.md). false: the member's "
        "own address, as given.",
    )
    role_addresses: frozenset[str] = custom(
        ["postmaster", "abuse", "fbl"],
        _check_local_parts,
        convert=lowered,
        doc="Local parts at operator.domain that take mail for the operator (RFC 2142 role "
        "addresses, and where feedback loops send complaints); kept in the inbound log.",
    )
    role_forward: str = custom(
        "",
        _check_address_or_empty,
        doc='Also forward what arrives for them to this address ("" keeps them only).',
    )
    hourly_per_ip: int = integer(
        600,
        1,
        doc="Messages one client address may hand the inbound listener per hour (then 450 4.7.1).",
    )
    retention: float = number(
        2592000.0,
        60,
        doc="Seconds the inbound log keeps what arrived (``atmosrelay inbound list``).",
        note="30 days",
    )


@attrs.frozen
class Accounts:
    database: str = string(
        "", empty=True, doc='The SQLite account store ("" means <data_dir>/accounts.sqlite3).'
    )
    max_domains_per_member: int = integer(
        2, 1, doc="Sending domains per member (the reference relay allows 2 during its alpha)."
    )


@attrs.frozen
class Dns:
    nameservers: tuple[tuple[str, int], ...] = custom(
        [],
        _check_nameservers,
        convert=each(_nameserver),
        doc='Nameservers as "host" or "host:port" ([] means the system\'s resolver).',
    )
    timeout: float = number(5.0, 0.1, note="seconds per lookup")
    handle_cache_ttl: float = number(300.0, 0, note="seconds a resolved handle is trusted")
    https_handle_resolution: bool = boolean(
        False, note="also try https://<handle>/.well-known/atproto-did"
    )


@attrs.frozen
class Delivery:
    enabled: bool = boolean(
        True,
        doc="Deliver what is queued. false: accept and queue only (nothing leaves the relay).",
    )
    smarthost: tuple[str, int] | None = custom(
        "",
        _check_smarthost,
        convert=_smarthost,
        doc='Send everything to one "host:port" instead of each domain\'s MX hosts (like '
        'Postfix\'s relayhost); "" looks up MX records through [dns].',
    )
    port: int = integer(25, 1, 65535, note="the port of MX hosts")
    helo: str = string("", empty=True, note='the name in our EHLO ("" means smtp.hostname)')
    processes: int = integer(
        2,
        0,
        16,
        doc="Delivery processes: each reads, signs and sends beside this process, which keeps "
        "the journal, the queue and every outcome (docs/delivery.md), so acceptance and "
        "delivery use more than one core. 0: all in this process (the better choice on a "
        "machine with one core).",
    )
    concurrency: int = integer(4, 1, note="connections per destination (MX host set)")
    idle: float = number(5.0, 0, note="seconds a connection is kept open for more work")
    require_tls: frozenset[str] = custom(
        [],
        check_domains,
        convert=lowered,
        note="recipient domains that must get STARTTLS, else defer",
    )
    tls_verify: bool = boolean(
        False,
        doc="Opportunistic STARTTLS does not verify the remote's certificate (RFC 7435); set "
        "true to verify against the system's CAs (and ca_file, if given).",
    )
    ca_file: str = string("", empty=True)
    chunking: bool = boolean(
        True,
        doc="Send a message's content with BDAT (RFC 3030) to servers that offer CHUNKING: not "
        "dot-stuffed, and in the same write as its envelope where the server also offers "
        "PIPELINING (one round trip a message instead of two). false: always DATA.",
    )
    retry_initial: float = number(
        60.0, 1, note="seconds to the first retry, doubling each time ..."
    )
    retry_cap: float = number(3600.0, 1, note="... up to this")
    max_age: float = number(432000.0, 0, note="a recipient still deferred after 5 days bounces")
    delay_warning: float = number(
        14400.0,
        0,
        doc='A recipient still deferred this long after acceptance gets one "delayed" DSN '
        "(RFC 3464), when its sender asked with NOTIFY=DELAY or gave no NOTIFY (as Postfix's "
        "delay_warning_time); NOTIFY=NEVER or NOTIFY=FAILURE alone never get one. 0 sends "
        "none.",
        note="4 hours",
    )
    drain_grace: float = number(30.0, 0, note="seconds deliveries in hand get to finish on SIGTERM")
    restart_spread: float = number(
        60.0, 0, note="retries overdue at start are spread over this many seconds"
    )
    unsubscribe_url: str = string(
        "",
        empty=True,
        doc='Where List-Unsubscribe points ("" means https://<operator.domain>); the token in '
        "it is an HMAC with a key generated in <data_dir>/unsubscribe.key.",
    )


@attrs.frozen
class Http:
    listeners: tuple[HttpListener, ...] = custom(
        ["127.0.0.1:8080"],
        _check_http_listeners,
        convert=each(_http_listener),
        doc='The HTTP API (docs/api.md): "host:port" (plain HTTP, as behind a reverse proxy) '
        'or "host:port tls" (the [smtp] certificate). [] turns the API off. Port 0 picks a '
        "free port.",
    )
    trusted_proxies: tuple[Network, ...] = custom(
        [],
        check_networks,
        convert=to_networks,
        doc="Networks whose X-Forwarded-For is believed (the client address for limits and "
        "logs); [] believes no one: the peer address is the client.",
    )
    max_body: int = integer(
        1024 * 1024, 1024, note="bytes of JSON a send may carry (1 MiB, as the reference)"
    )
    request_timeout: float = number(
        30.0, 0.1, note="seconds a request may take once its body is read"
    )
    status_retention: float = number(
        2592000.0,
        60,
        doc="Seconds the status index keeps finished messages (GET /v1/messages), and an "
        "Idempotency-Key is remembered.",
        note="30 days",
    )
    idempotency_ttl: float = number(86400.0, 60, note="24 hours")
    status_database: str = string(
        "",
        empty=True,
        doc='Where the status index lives ("" means <data_dir>/status.sqlite3).',
    )
