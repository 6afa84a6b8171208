"""Fuzz the TOML config loader (atmosrelay/config.py): arbitrary text into ``parse_config``.

Invariant (fuzz/README.md): either a ``Config`` or a ``ConfigError`` whose message names
the problem; never another exception (a KeyError or TypeError here would be a traceback an
operator sees instead of 'config error in FILE: ...').
"""

from __future__ import annotations

from atmosrelay.config import ConfigError, parse_config
from fuzz._harness import atheris_main


def check_one(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    try:
        config = parse_config(text, source="fuzz.toml")
    except ConfigError as exc:
        message = str(exc)
    else:
        assert config.smtp.listeners  # a parsed config is complete: defaults fill what is absent
        return
    assert message.startswith("config error in fuzz.toml"), message


if __name__ == "__main__":  # pragma: no cover
    atheris_main(check_one)
