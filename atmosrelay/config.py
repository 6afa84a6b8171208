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

# The embedded defaults (atmosrelay/defaults.toml, every setting commented), shown by
# `atmosrelay config defaults`.
DEFAULTS_TOML: Final = (Path(__file__).parent / "defaults.toml").read_text(encoding="utf-8")

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
