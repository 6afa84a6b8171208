"""Configuration: TOML, with an embedded default for every setting.

A config file only needs the settings it changes. Where it comes from, first match wins:
``--config FILE``, then the ``ATMOSRELAY_CONFIG`` environment variable, then nothing (the
embedded defaults). Relative paths in the file are relative to the working directory.

Every setting is declared once, in its section's class (``SECTIONS``; atmosrelay/settings.py
says how): its default, its check, its comment and whether SIGHUP may change it. The
embedded defaults (``atmosrelay config defaults``), the validation, the typed values the
relay runs on (``config.smtp.idle_timeout``, ``config.policy``) and the reload's list
(``RELOADABLE``) all come from there. An invalid config is refused at start with the dotted
key and what was expected, e.g.
``config error in relay.toml: journal.segment_size: expected an integer >= 65536, got 'big'``.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import attrs

from atmosrelay import settings
from atmosrelay.accounts.api_keys import AuthSettings
from atmosrelay.policy.settings import PolicySettings
from atmosrelay.sections import (
    Accounts,
    Delivery,
    Dns,
    Http,
    Inbound,
    Journal,
    ListenerMode,
    Operator,
    Relay,
    Smtp,
)

__all__ = ["Config", "ConfigError", "ListenerMode", "load_config", "parse_config"]

ENV_VAR: Final = "ATMOSRELAY_CONFIG"

# Each section's name and the class that declares its settings, in the order they are shown.
SECTIONS: Final[Mapping[str, type]] = {
    "relay": Relay,
    "journal": Journal,
    "operator": Operator,
    "smtp": Smtp,
    "inbound": Inbound,
    "accounts": Accounts,
    "dns": Dns,
    "delivery": Delivery,
    "policy": PolicySettings,
    "http": Http,
    "auth": AuthSettings,
}

# The embedded defaults, every setting commented (`atmosrelay config defaults`).
DEFAULTS_TOML: Final = settings.render(SECTIONS)

# What SIGHUP applies to a running relay (atmosrelay/reload.py); a change to any other
# setting is reported as needing a restart.
RELOADABLE: Final = settings.reloadable(SECTIONS)


class ConfigError(Exception):
    """The configuration is invalid; the message names the key and what was expected."""


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
    """The checked settings: typed, one object per section (``config.smtp.hostname``), and
    as the TOML values they came from (``values``, what a reload compares)."""

    values: Mapping[str, Mapping[str, Any]]
    source: str  # where it came from, for messages
    path: str | None = None  # the file it was read from (SIGHUP reads it again)
    relay: Relay = attrs.field(init=False)
    journal: Journal = attrs.field(init=False)
    operator: Operator = attrs.field(init=False)
    smtp: Smtp = attrs.field(init=False)
    inbound: Inbound = attrs.field(init=False)
    accounts: Accounts = attrs.field(init=False)
    dns: Dns = attrs.field(init=False)
    delivery: Delivery = attrs.field(init=False)
    policy: PolicySettings = attrs.field(init=False)
    http: Http = attrs.field(init=False)
    auth: AuthSettings = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        for name, cls in SECTIONS.items():  # the values were checked by parse_config
            object.__setattr__(self, name, settings.build(cls, self.values[name]))

    def value(self, dotted: str) -> Any:
        """A setting's TOML value by its dotted name ("smtp.hostname")."""
        section, key = dotted.split(".")
        return self.values[section][key]

    def evolve(self, **changes: Any) -> Config:
        """This config with some settings changed, by dotted name (for tests and reload);
        the new values are checked as a config file's would be."""
        values = {section: dict(table) for section, table in self.values.items()}
        for dotted, value in changes.items():
            section, key = dotted.split(".")
            values[section][key] = value
        _check(values, self.source)
        return Config(values=values, source=self.source, path=self.path)

    @property
    def data_dir(self) -> Path:
        return Path(self.relay.data_dir)

    @property
    def journal_dir(self) -> Path:
        return self.data_dir / "journal"

    @property
    def accounts_db(self) -> Path:
        named = self.accounts.database
        return Path(named) if named else self.data_dir / "accounts.sqlite3"

    @property
    def status_db(self) -> Path:
        named = self.http.status_database
        return Path(named) if named else self.data_dir / "status.sqlite3"

    @property
    def dkim_dir(self) -> Path:
        return self.data_dir / "dkim"


def _check(values: Mapping[str, Mapping[str, Any]], source: str) -> None:
    for section, cls in SECTIONS.items():
        found = settings.problem(cls, values[section])
        if found is not None:
            key, expected = found
            raise ConfigError(
                f"config error in {source}: {section}.{key}: expected {expected}, "
                f"got {values[section][key]!r}"
            )


def parse_config(text: str, *, source: str = "<config>") -> Config:
    """Parse a config file's text over the embedded defaults. Raises ConfigError."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config error in {source}: not valid TOML: {exc}") from exc
    for section, table in doc.items():
        if section not in SECTIONS:
            raise ConfigError(
                f"config error in {source}: {section}: unknown section; "
                f"known: {', '.join(SECTIONS)}"
            )
        if not isinstance(table, dict):
            raise ConfigError(
                f"config error in {source}: {section}: expected a table, got {table!r}"
            )
        known = settings.defaults(SECTIONS[section])
        for key in table:
            if key not in known:
                raise ConfigError(
                    f"config error in {source}: {section}.{key}: unknown setting; known in "
                    f"[{section}]: {', '.join(known)}"
                )
    merged = {
        section: {**settings.defaults(cls), **doc.get(section, {})}
        for section, cls in SECTIONS.items()
    }
    _check(merged, source)
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
