"""Configuration: TOML, with an embedded default for every setting.

A config file only needs the settings it changes. Where it comes from, first match wins:
``--config FILE``, then the ``ATMOSRELAY_CONFIG`` environment variable, then nothing (the
embedded defaults). Relative paths in the file are relative to the working directory.

An invalid config is refused at start with the dotted key and what was expected, e.g.
``config error in relay.toml: journal.segment_size: expected an integer >= 65536, got "big"``.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import attrs

ENV_VAR: Final = "ATMOSRELAY_CONFIG"

MIB: Final = 1024 * 1024

# The embedded defaults, shown by `atmosrelay config defaults` and in the README.
DEFAULTS_TOML: Final = """\
[relay]
# Where the journal and (later) the account store and generated keys live.
data_dir = "./var"
# Log verbosity: debug, info, warning, error.
log_level = "info"

[journal]
# A segment is sealed and the next one started beyond this size. Compaction works on
# sealed segments, so smaller segments return disk sooner; larger ones rotate less.
segment_size = 67108864      # 64 MiB
# The largest single record. A message is one record, so this bounds message size plus
# envelope: the submission limit (50 MB, as the reference relay) must stay below it.
max_record_size = 67108864   # 64 MiB
"""


class ConfigError(Exception):
    """The configuration is invalid; the message names the key and what was expected."""


@attrs.frozen
class RelaySettings:
    data_dir: Path
    log_level: str


@attrs.frozen
class JournalSettings:
    segment_size: int
    max_record_size: int


@attrs.frozen
class Config:
    relay: RelaySettings
    journal: JournalSettings
    source: str  # where it came from, for messages

    @property
    def journal_dir(self) -> Path:
        return self.relay.data_dir / "journal"


_LOG_LEVELS: Final = ("debug", "info", "warning", "error")


def _section(doc: Mapping[str, object], name: str) -> Mapping[str, object]:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: expected a table, got {value!r}")
    return value


def _int(table: Mapping[str, object], section: str, key: str, minimum: int) -> int:
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{section}.{key}: expected an integer >= {minimum}, got {value!r}")
    return value


def _str(table: Mapping[str, object], section: str, key: str) -> str:
    value = table[key]
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{section}.{key}: expected a non-empty string, got {value!r}")
    return value


def _check_keys(doc: Mapping[str, object], known: Mapping[str, Mapping[str, object]]) -> None:
    for section, table in doc.items():
        if section not in known:
            raise ConfigError(f"{section}: unknown section; known: {', '.join(known)}")
        if isinstance(table, dict):
            for key in table:
                if key not in known[section]:
                    raise ConfigError(
                        f"{section}.{key}: unknown setting; known in [{section}]: "
                        f"{', '.join(known[section])}"
                    )


def parse_config(text: str, *, source: str = "<config>") -> Config:
    """Parse a config file's text over the embedded defaults. Raises ConfigError."""
    defaults = tomllib.loads(DEFAULTS_TOML)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config error in {source}: not valid TOML: {exc}") from exc
    try:
        _check_keys(doc, defaults)
        merged = {name: {**defaults[name], **_section(doc, name)} for name in defaults}
        relay, journal = merged["relay"], merged["journal"]
        level = _str(relay, "relay", "log_level")
        if level not in _LOG_LEVELS:
            raise ConfigError(f"relay.log_level: expected one of {_LOG_LEVELS}, got {level!r}")
        segment_size = _int(journal, "journal", "segment_size", 64 * 1024)
        max_record = _int(journal, "journal", "max_record_size", 1024)
        if max_record > 1024 * MIB:
            raise ConfigError(
                f"journal.max_record_size: expected at most {1024 * MIB} (1 GiB), got {max_record}"
            )
        return Config(
            relay=RelaySettings(data_dir=Path(_str(relay, "relay", "data_dir")), log_level=level),
            journal=JournalSettings(segment_size=segment_size, max_record_size=max_record),
            source=source,
        )
    except ConfigError as exc:
        if str(exc).startswith("config error"):
            raise
        raise ConfigError(f"config error in {source}: {exc}") from None


def load_config(path: str | None = None) -> Config:
    """Load the config named by ``path``, else by ATMOSRELAY_CONFIG, else the defaults."""
    chosen = path or os.environ.get(ENV_VAR)
    if not chosen:
        return parse_config("", source="embedded defaults")
    try:
        text = Path(chosen).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config error: cannot read {chosen}: {exc.strerror}") from exc
    return parse_config(text, source=chosen)
