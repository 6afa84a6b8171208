"""Configuration: TOML, with an embedded default for every setting.

A config file only needs the settings it changes. Where it comes from, first match wins:
``--config FILE``, then the ``ATMOSRELAY_CONFIG`` environment variable, then nothing (the
embedded defaults). Relative paths in the file are relative to the working directory.

Every setting is declared once in ``SCHEMA`` (type and check); an invalid config is refused at
start with the dotted key and what was expected, e.g.
``config error in relay.toml: journal.segment_size: expected an integer >= 65536, got 'big'``.
"""

from __future__ import annotations

import enum
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import attrs

ENV_VAR: Final = "ATMOSRELAY_CONFIG"

MIB: Final = 1024 * 1024

# The embedded defaults, shown by `atmosrelay config defaults` and in the README.
DEFAULTS_TOML: Final = """\
[relay]
# Where the journal, the account database and generated keys live.
data_dir = "./var"
# Log verbosity: debug, info, warning, error (SIGHUP applies a change).
log_level = "info"
# "text": one line per event with an ISO-8601 UTC timestamp; "json": one JSON object per
# line (ts, level, logger, event, message and the event's fields: queue_id, did, peer, ...).
log_format = "text"

[journal]
# A segment is sealed and the next one started beyond this size. Compaction works on
# sealed segments, so smaller segments return disk sooner; larger ones rotate less.
segment_size = 67108864      # 64 MiB
# The largest single record. A message is one record, so this bounds message size plus
# envelope: the submission limit (50 MB, as the reference relay) must stay below it.
max_record_size = 67108864   # 64 MiB
# Seconds between checks whether compacting the sealed segments is worth it (at least half
# of their records belong to finished or deleted messages).
compact_interval = 30.0

[operator]
# The relay's own domain: every message is also DKIM-signed with d=<domain>. Its key is
# generated under <data_dir>/dkim on first start.
domain = "atmosrelay.localhost"
# The SPF include members' domains should publish ("" suggests none), e.g. "_spf.relay.example".
spf_include = ""

[smtp]
# Listeners: "host:port mode", mode starttls (AUTH only after STARTTLS), implicit (TLS from
# the first byte), trusted (no TLS, no AUTH: clients from trusted_networks submit as
# trusted_did; for a co-located app or a load generator) or inbound (the relay's MX:
# bounces, feedback reports, replies; no AUTH, STARTTLS offered; docs/inbound.md) or auto
# (opt-in: a client whose first bytes within auto_tls_window are a TLS handshake gets
# implicit TLS, any other gets the starttls greeting after the window; for clients that
# use smtps:// on port 587, as an atproto PDS's URL form does; docs/security.md).
# Port 0 picks a free port.
# Production: ["0.0.0.0:587 starttls", "0.0.0.0:465 implicit", "0.0.0.0:2525 starttls",
#              "0.0.0.0:2587 starttls", "0.0.0.0:25 inbound"]
listeners = ["127.0.0.1:2587 starttls", "127.0.0.1:2465 implicit", "127.0.0.1:2025 inbound"]
hostname = "localhost"          # in the greeting and EHLO reply
tls_cert = ""                   # PEM files; "" generates a self-signed pair in <data_dir>/tls
tls_key = ""
max_message_size = 52428800     # 50 MB, the reference relay's limit (SIZE, RFC 1870)
max_recipients = 100            # RFC 5321 4.5.3.1.8's minimum, and the reference's maximum
# Time limits on a session (docs/security.md): a command must arrive whole within
# idle_timeout of the wait for it starting, however it is dribbled; a DATA or BDAT phase
# must end within data_timeout of its start plus one second per min_data_rate bytes received
# (so a large message on a good link is never cut, and a dribbled one is); a session gets
# 421 4.4.2 at the first command boundary past max_session_time.
idle_timeout = 60.0             # seconds (RFC 5321 4.5.3.2 suggests 5 min)
data_timeout = 600.0            # seconds
min_data_rate = 4096            # bytes per second: a 50 MB message gets at most ~3.6 h
max_session_time = 3600.0       # seconds
max_connections = 1000
max_connections_per_ip = 50
inflight_budget = 268435456     # bytes all messages being received may hold (256 MiB)
shutdown_grace = 30.0           # seconds sessions get to finish on SIGTERM
auto_tls_window = 0.2           # seconds an auto listener waits for a TLS handshake
trusted_did = ""                # the member trusted listeners submit as
trusted_networks = ["127.0.0.0/8", "::1/128"]

[inbound]
# Delivered mail carries MAIL FROM:<bounces+TOKEN@operator.domain> (VERP, an HMAC'd token
# naming the message and the recipient), so bounces that come back later reach the inbound
# listener and are counted (docs/inbound.md). false: the member's own address, as given.
verp = true
# Local parts at operator.domain that take mail for the operator (RFC 2142 role addresses,
# and where feedback loops send complaints); kept in the inbound log.
role_addresses = ["postmaster", "abuse", "fbl"]
# Also forward what arrives for them to this address ("" keeps them only).
role_forward = ""
# Messages one client address may hand the inbound listener per hour (then 450 4.7.1).
hourly_per_ip = 600
# Seconds the inbound log keeps what arrived (``atmosrelay inbound list``).
retention = 2592000.0          # 30 days

[accounts]
# The SQLite account store ("" means <data_dir>/accounts.sqlite3).
database = ""
# Sending domains per member (the reference relay allows 2 during its alpha).
max_domains_per_member = 2

[dns]
# Nameservers as "host" or "host:port" ([] means the system's resolver).
nameservers = []
timeout = 5.0                  # seconds per lookup
handle_cache_ttl = 300.0       # seconds a resolved handle is trusted
https_handle_resolution = false  # also try https://<handle>/.well-known/atproto-did

[delivery]
# Deliver what is queued. false: accept and queue only (nothing leaves the relay).
enabled = true
# Send everything to one "host:port" instead of each domain's MX hosts (like Postfix's
# relayhost); "" looks up MX records through [dns].
smarthost = ""
port = 25                      # the port of MX hosts
helo = ""                      # the name in our EHLO ("" means smtp.hostname)
concurrency = 4                # connections per destination (MX host set)
idle = 5.0                     # seconds a connection is kept open for more work
require_tls = []               # recipient domains that must get STARTTLS, else defer
# Opportunistic STARTTLS does not verify the remote's certificate (RFC 7435); set true to
# verify against the system's CAs (and ca_file, if given).
tls_verify = false
ca_file = ""
retry_initial = 60.0           # seconds to the first retry, doubling each time ...
retry_cap = 3600.0             # ... up to this
max_age = 432000.0             # a recipient still deferred after 5 days bounces
# A recipient still deferred this long after acceptance gets one "delayed" DSN (RFC 3464),
# when its sender asked with NOTIFY=DELAY or gave no NOTIFY (as Postfix's delay_warning_time);
# NOTIFY=NEVER or NOTIFY=FAILURE alone never get one. 0 sends none.
delay_warning = 14400.0        # 4 hours
drain_grace = 30.0             # seconds deliveries in hand get to finish on SIGTERM
restart_spread = 60.0          # retries overdue at start are spread over this many seconds
# Where List-Unsubscribe points ("" means https://<operator.domain>); the token in it is an
# HMAC with a key generated in <data_dir>/unsubscribe.key.
unsubscribe_url = ""

[policy]
# Warming tiers (docs/policy.md): [until day, hourly, daily] for a member younger than that
# many days; the limits count recipients (each is one delivery). Then the steady state.
# An operator sets one member's own numbers with 'atmosrelay member limits'.
tiers = [[7, 5, 50], [14, 20, 200]]
hourly = 50
daily = 500
# A sending domain is paused when, over the rolling 24 h and with at least
# rate_min_messages finished deliveries, bounces or complaints reach these shares.
bounce_pause_rate = 0.05
complaint_pause_rate = 0.0008
rate_min_messages = 10
# Rules that add the label "throttled" ("enforce") or only record "shadow:throttled"
# ("shadow"): spray = more than spray_domains distinct recipient domains in an hour while
# warming; velocity = the last hour over velocity_factor x the 7-day hourly mean and over
# velocity_min recipients.
spray_domains = 50
spray_mode = "enforce"
velocity_factor = 4.0
velocity_min = 100
velocity_mode = "enforce"
# Seconds between writes of the counters to the account store (a kill -9 forgets at most
# this much, and only of messages already delivered and compacted; docs/policy.md).
counter_flush = 1.0

[http]
# The HTTP API (docs/api.md): "host:port" (plain HTTP, as behind a reverse proxy) or
# "host:port tls" (the [smtp] certificate). [] turns the API off. Port 0 picks a free port.
listeners = ["127.0.0.1:8080"]
# Networks whose X-Forwarded-For is believed (the client address for limits and logs);
# [] believes no one: the peer address is the client.
trusted_proxies = []
max_body = 1048576             # bytes of JSON a send may carry (1 MiB, as the reference)
request_timeout = 30.0         # seconds a request may take once its body is read
# Seconds the status index keeps finished messages (GET /v1/messages), and an
# Idempotency-Key is remembered.
status_retention = 2592000.0   # 30 days
idempotency_ttl = 86400.0      # 24 hours
# Where the status index lives ("" means <data_dir>/status.sqlite3).
status_database = ""

[auth]
bcrypt_cost = 12               # work factor of API key hashes (2^12 rounds, ~0.25 s here)
cache_ttl = 300.0              # seconds a verified key is remembered
cache_size = 10000
free_failures = 3.0            # failures per address or account before answers are delayed
base_delay = 0.5               # first delay, doubling per further failure ...
max_delay = 8.0                # ... up to this
lockout_score = 10.0           # failures (decayed) that lock a client address (IPv6: its /64) out
lockout_seconds = 900.0
half_life = 600.0              # failures are forgotten by half every this many seconds
"""

_LOG_LEVELS: Final = ("debug", "info", "warning", "error")


class ListenerMode(enum.StrEnum):
    """How a listener's sessions start (docs/security.md)."""

    STARTTLS = "starttls"  # plaintext greeting; AUTH only after STARTTLS
    IMPLICIT = "implicit"  # TLS from the first byte
    TRUSTED = "trusted"  # no TLS, no AUTH: clients in trusted_networks submit as trusted_did
    INBOUND = "inbound"  # the relay's MX: no AUTH, STARTTLS offered, local recipients only
    AUTO = "auto"  # implicit TLS if the client starts a handshake at once, else as starttls


class ConfigError(Exception):
    """The configuration is invalid; the message names the key and what was expected."""


Check = Callable[[Any], str | None]  # returns what was expected, or None when fine


def _int(minimum: int, maximum: int | None = None) -> Check:
    def check(v: Any) -> str | None:
        ok = isinstance(v, int) and not isinstance(v, bool) and v >= minimum
        ok = ok and (maximum is None or v <= maximum)
        top = f" and <= {maximum}" if maximum is not None else ""
        return None if ok else f"an integer >= {minimum}{top}"

    return check


def _number(minimum: float) -> Check:
    def check(v: Any) -> str | None:
        ok = isinstance(v, int | float) and not isinstance(v, bool) and v >= minimum
        return None if ok else f"a number >= {minimum:g}"

    return check


def _string(*, empty: bool = False, choices: tuple[str, ...] = ()) -> Check:
    def check(v: Any) -> str | None:
        if not isinstance(v, str) or (not empty and not v):
            return "a string" if empty else "a non-empty string"
        if choices and v not in choices:
            return f"one of {', '.join(choices)}"
        return None

    return check


def _boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def _host_port(text: str, default: int) -> tuple[str, int | None]:
    """ "host" or "host:port" (an IPv6 address, with several colons, has no port here); the
    port is None when it is not a number in range."""
    if text.count(":") != 1:
        return text, default
    host, _, port = text.rpartition(":")
    return host, int(port) if port.isdigit() and 0 < int(port) < 65536 else None


def _nameservers(v: Any) -> str | None:
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        return 'a list of "host" or "host:port" strings'
    for x in v:
        if _host_port(x, 53)[1] is None:
            return f'a list of "host" or "host:port" strings ({x!r} has a bad port)'
    return None


def _smarthost(v: Any) -> str | None:
    expected = '"" or "host:port"'
    if not isinstance(v, str):
        return expected
    if v and (v.count(":") != 1 or _host_port(v, 25)[1] is None or not v.split(":")[0]):
        return f"{expected} (not {v!r})"
    return None


def _domains(v: Any) -> str | None:
    if not isinstance(v, list) or not all(isinstance(x, str) and "." in x for x in v):
        return "a list of domain names"
    return None


def _listeners(v: Any) -> str | None:
    expected = (
        'a list of "host:port mode" strings, mode starttls, implicit, trusted, inbound or auto'
    )
    if not isinstance(v, list):
        return expected
    for x in v:
        if not isinstance(x, str) or len(x.split()) != 2:
            return expected
        address, mode = x.split()
        host, _, port = address.rpartition(":")
        if mode not in set(ListenerMode) or not host:
            return f"{expected} (not {x!r})"
        if not (port.isdigit() and 0 <= int(port) < 65536):
            return f"{expected} ({x!r} has a bad port)"
    return None


def _http_listeners(v: Any) -> str | None:
    expected = 'a list of "host:port" or "host:port tls" strings'
    if not isinstance(v, list):
        return expected
    for x in v:
        parts = x.split() if isinstance(x, str) else []
        if not 1 <= len(parts) <= 2 or (len(parts) == 2 and parts[1] != "tls"):
            return f"{expected} (not {x!r})"
        host, _, port = parts[0].rpartition(":")
        if not host or not (port.isdigit() and 0 <= int(port) < 65536):
            return f"{expected} ({x!r} has a bad port)"
    return None


def _local_parts(v: Any) -> str | None:
    expected = "a list of local parts such as postmaster"
    if not isinstance(v, list) or not all(
        isinstance(x, str) and x and "@" not in x and x.isascii() and " " not in x for x in v
    ):
        return expected
    return None


def _address_or_empty(v: Any) -> str | None:
    expected = '"" or an address such as ops@example.org'
    if not isinstance(v, str):
        return expected
    if v and (v.count("@") != 1 or not all(v.split("@")) or any(c.isspace() for c in v)):
        return f"{expected} (not {v!r})"
    return None


def _tiers(v: Any) -> str | None:
    expected = "a list of [until day, hourly, daily] (numbers > 0, days increasing)"
    if not isinstance(v, list):
        return expected
    last = 0.0
    for t in v:
        if not (
            isinstance(t, list)
            and len(t) == 3
            and all(isinstance(x, int | float) and not isinstance(x, bool) for x in t)
            and isinstance(t[1], int)
            and isinstance(t[2], int)
            and t[0] > last
            and t[1] >= 1
            and t[2] >= 1
        ):
            return f"{expected} (not {t!r})"
        last = float(t[0])
    return None


def _share(v: Any) -> str | None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= 1
    return None if ok else "a share > 0 and <= 1 (0.05 is 5%)"


def _networks(v: Any) -> str | None:
    import ipaddress

    if not isinstance(v, list):
        return "a list of networks such as 127.0.0.0/8"
    for x in v:
        try:
            ipaddress.ip_network(x)
        except (TypeError, ValueError):
            return f"a list of networks such as 127.0.0.0/8 ({x!r} is not one)"
    return None


SCHEMA: Final[dict[str, dict[str, Check]]] = {
    "relay": {
        "data_dir": _string(),
        "log_level": _string(choices=_LOG_LEVELS),
        "log_format": _string(choices=("text", "json")),
    },
    "journal": {
        "segment_size": _int(64 * 1024),
        "max_record_size": _int(1024, 1024 * MIB),
        "compact_interval": _number(0.1),
    },
    "operator": {"domain": _string(), "spf_include": _string(empty=True)},
    "smtp": {
        "listeners": _listeners,
        "hostname": _string(),
        "tls_cert": _string(empty=True),
        "tls_key": _string(empty=True),
        "max_message_size": _int(1024),
        "max_recipients": _int(1),
        "idle_timeout": _number(0.1),
        "data_timeout": _number(0.1),
        "min_data_rate": _int(1),
        "max_session_time": _number(1),
        "max_connections": _int(1),
        "max_connections_per_ip": _int(1),
        "inflight_budget": _int(1024),
        "shutdown_grace": _number(0),
        "auto_tls_window": _number(0.01),
        "trusted_did": _string(empty=True),
        "trusted_networks": _networks,
    },
    "inbound": {
        "verp": _boolean,
        "role_addresses": _local_parts,
        "role_forward": _address_or_empty,
        "hourly_per_ip": _int(1),
        "retention": _number(60),
    },
    "accounts": {"database": _string(empty=True), "max_domains_per_member": _int(1)},
    "dns": {
        "nameservers": _nameservers,
        "timeout": _number(0.1),
        "handle_cache_ttl": _number(0),
        "https_handle_resolution": _boolean,
    },
    "delivery": {
        "enabled": _boolean,
        "smarthost": _smarthost,
        "port": _int(1, 65535),
        "helo": _string(empty=True),
        "concurrency": _int(1),
        "idle": _number(0),
        "require_tls": _domains,
        "tls_verify": _boolean,
        "ca_file": _string(empty=True),
        "retry_initial": _number(1),
        "retry_cap": _number(1),
        "max_age": _number(0),
        "delay_warning": _number(0),
        "drain_grace": _number(0),
        "restart_spread": _number(0),
        "unsubscribe_url": _string(empty=True),
    },
    "policy": {
        "tiers": _tiers,
        "hourly": _int(1),
        "daily": _int(1),
        "bounce_pause_rate": _share,
        "complaint_pause_rate": _share,
        "rate_min_messages": _int(1),
        "spray_domains": _int(1),
        "spray_mode": _string(choices=("enforce", "shadow")),
        "velocity_factor": _number(1),
        "velocity_min": _int(1),
        "velocity_mode": _string(choices=("enforce", "shadow")),
        "counter_flush": _number(0.05),
    },
    "http": {
        "listeners": _http_listeners,
        "trusted_proxies": _networks,
        "max_body": _int(1024),
        "request_timeout": _number(0.1),
        "status_retention": _number(60),
        "idempotency_ttl": _number(60),
        "status_database": _string(empty=True),
    },
    "auth": {
        "bcrypt_cost": _int(4, 31),
        "cache_ttl": _number(0),
        "cache_size": _int(1),
        "free_failures": _number(0),
        "base_delay": _number(0),
        "max_delay": _number(0),
        "lockout_score": _number(1),
        "lockout_seconds": _number(0),
        "half_life": _number(1),
    },
}


# What SIGHUP applies to a running relay (atmosrelay/reload.py); a change to any other
# setting is reported as needing a restart. The TLS files are read again even when their
# names did not change (a renewal writes new contents under the same names).
RELOADABLE: Final = frozenset(
    {"relay.log_level", "smtp.tls_cert", "smtp.tls_key"}
    | {f"policy.{key}" for key in SCHEMA["policy"] if key != "counter_flush"}
)


def changed_settings(old: Config, new: Config) -> list[str]:
    """The dotted names of the settings whose values differ."""
    return [
        f"{section}.{key}"
        for section, table in new.values.items()
        for key, value in table.items()
        if old.values[section][key] != value
    ]


@attrs.frozen
class Config:
    """The validated settings, as ``config.section["key"]``, plus derived paths."""

    values: Mapping[str, Mapping[str, Any]]
    source: str  # where it came from, for messages
    path: str | None = None  # the file it was read from (SIGHUP reads it again)

    def __getitem__(self, dotted: str) -> Any:
        section, key = dotted.split(".")
        return self.values[section][key]

    @property
    def data_dir(self) -> Path:
        return Path(self["relay.data_dir"])

    @property
    def journal_dir(self) -> Path:
        return self.data_dir / "journal"

    @property
    def accounts_db(self) -> Path:
        return (
            Path(self["accounts.database"])
            if self["accounts.database"]
            else (self.data_dir / "accounts.sqlite3")
        )

    @property
    def status_db(self) -> Path:
        value = self["http.status_database"]
        return Path(value) if value else self.data_dir / "status.sqlite3"

    @property
    def http_listeners(self) -> tuple[tuple[str, int, bool], ...]:
        """(host, port, tls) for each HTTP listener."""
        out = []
        for x in self["http.listeners"]:
            address, *tls = x.split()
            host, _, port = address.rpartition(":")
            out.append((host.strip("[]"), int(port), bool(tls)))
        return tuple(out)

    @property
    def dkim_dir(self) -> Path:
        return self.data_dir / "dkim"

    @property
    def listeners(self) -> tuple[tuple[str, int, ListenerMode], ...]:
        """(host, port, mode) for each configured listener."""
        out = []
        for x in self["smtp.listeners"]:
            address, mode = x.split()
            host, _, port = address.rpartition(":")
            out.append((host.strip("[]"), int(port), ListenerMode(mode)))
        return tuple(out)

    @property
    def smarthost(self) -> tuple[str, int] | None:
        value = self["delivery.smarthost"]
        if not value:
            return None
        host, port = _host_port(value, 25)
        assert port is not None  # checked by the schema
        return host, port

    @property
    def nameservers(self) -> tuple[tuple[str, int], ...]:
        return tuple(
            (host, port or 53)
            for host, port in (_host_port(x, 53) for x in self["dns.nameservers"])
        )


def parse_config(text: str, *, source: str = "<config>") -> Config:
    """Parse a config file's text over the embedded defaults. Raises ConfigError."""
    defaults = tomllib.loads(DEFAULTS_TOML)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config error in {source}: not valid TOML: {exc}") from exc
    merged: dict[str, dict[str, Any]] = {}
    for section, table in doc.items():
        if section not in SCHEMA:
            raise ConfigError(
                f"config error in {source}: {section}: unknown section; known: {', '.join(SCHEMA)}"
            )
        if not isinstance(table, dict):
            raise ConfigError(
                f"config error in {source}: {section}: expected a table, got {table!r}"
            )
        for key in table:
            if key not in SCHEMA[section]:
                raise ConfigError(
                    f"config error in {source}: {section}.{key}: unknown setting; known in "
                    f"[{section}]: {', '.join(SCHEMA[section])}"
                )
    for section, checks in SCHEMA.items():
        merged[section] = {**defaults[section], **doc.get(section, {})}
        for key, check in checks.items():
            expected = check(merged[section][key])
            if expected is not None:
                raise ConfigError(
                    f"config error in {source}: {section}.{key}: expected {expected}, "
                    f"got {merged[section][key]!r}"
                )
    return Config(values=merged, source=source)


def load_config(path: str | None = None) -> Config:
    """Load the config named by ``path``, else by ATMOSRELAY_CONFIG, else the defaults."""
    chosen = path or os.environ.get(ENV_VAR)
    if not chosen:
        return parse_config("", source="embedded defaults")
    try:
        text = Path(chosen).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config error: cannot read {chosen}: {exc.strerror}") from exc
    return attrs.evolve(parse_config(text, source=chosen), path=chosen)
