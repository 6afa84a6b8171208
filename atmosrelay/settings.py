"""How a setting is declared: once, with its default, its check, its comment and whether SIGHUP
may change it.

A config section is an attrs class whose fields are made by the helpers below (``integer``,
``number``, ``string``, ``boolean``, ``custom``). From those declarations come:

- the embedded defaults, rendered as commented TOML (``render``, shown by
  ``atmosrelay config defaults``);
- the validation of a config file (``problem``: the first value that fails its check, with
  what was expected);
- the typed object the running relay uses (``build``: one keyword per field, by name, each
  value through the field's converter, so ``[smtp] listeners`` arrives as parsed tuples and
  ``[policy] spray_mode`` as an enum);
- what a reload may apply (``reloadable``).

A field made without these helpers (``attrs.field`` or a plain default) is not a setting: it
is a runtime knob of the object (a test may set it) that no config file can name.
"""

from __future__ import annotations

import ipaddress
import json
import textwrap
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final, TypeVar

import attrs

Check = Callable[[Any], str | None]  # what was expected, or None when the value is fine

T = TypeVar("T")

_KEY: Final = "atmosrelay.setting"
_WIDTH: Final = 92  # of a rendered comment line
_VALUE_COLUMN: Final = 31  # where a trailing comment starts, when the value is short


@attrs.frozen
class Setting:
    """One setting's declaration (kept in the field's metadata)."""

    default: Any  # as written in TOML: what render() prints and a missing key takes
    check: Check
    doc: str = ""  # comment lines above the key ("\n" starts a new line)
    note: str = ""  # a short comment after the value
    reload: bool = False  # SIGHUP applies a change (atmosrelay/reload.py)


def custom(
    default: Any,
    check: Check,
    *,
    doc: str = "",
    note: str = "",
    reload: bool = False,
    convert: Callable[[Any], Any] | None = None,
) -> Any:
    """A setting with its own check, and a converter from the TOML value to the runtime one
    (it must also accept its own output: attrs applies it to every value, defaults too)."""
    meta = {_KEY: Setting(default, check, doc, note, reload)}
    if convert is None:
        return attrs.field(default=default, metadata=meta)
    return attrs.field(default=convert(default), converter=convert, metadata=meta)


def integer(
    default: int,
    minimum: int,
    maximum: int | None = None,
    *,
    doc: str = "",
    note: str = "",
    reload: bool = False,
) -> Any:
    top = f" and <= {maximum}" if maximum is not None else ""

    def check(v: Any) -> str | None:
        ok = isinstance(v, int) and not isinstance(v, bool) and v >= minimum
        ok = ok and (maximum is None or v <= maximum)
        return None if ok else f"an integer >= {minimum}{top}"

    return custom(default, check, doc=doc, note=note, reload=reload)


def number(
    default: float, minimum: float, *, doc: str = "", note: str = "", reload: bool = False
) -> Any:
    """A number (TOML's 5 and 5.0 both), as a float."""

    def check(v: Any) -> str | None:
        ok = isinstance(v, int | float) and not isinstance(v, bool) and v >= minimum
        return None if ok else f"a number >= {minimum:g}"

    return custom(default, check, doc=doc, note=note, reload=reload, convert=float)


def string(
    default: str,
    *,
    empty: bool = False,
    choices: tuple[str, ...] = (),
    doc: str = "",
    note: str = "",
    reload: bool = False,
    convert: Callable[[Any], Any] | None = None,
) -> Any:
    def check(v: Any) -> str | None:
        if not isinstance(v, str) or (not empty and not v):
            return "a string" if empty else "a non-empty string"
        if choices and v not in choices:
            return f"one of {', '.join(choices)}"
        return None

    return custom(default, check, doc=doc, note=note, reload=reload, convert=convert)


def boolean(default: bool, *, doc: str = "", note: str = "", reload: bool = False) -> Any:
    def check(v: Any) -> str | None:
        return None if isinstance(v, bool) else "true or false"

    return custom(default, check, doc=doc, note=note, reload=reload)


# -- what a section's declarations give ------------------------------------------------------


def declared(cls: type) -> Iterator[tuple[str, Setting]]:
    """The settings of a section class, in declaration order."""
    for field in attrs.fields(cls):
        setting = field.metadata.get(_KEY)
        if setting is not None:
            yield field.name, setting


def defaults(cls: type) -> dict[str, Any]:
    """The section's TOML values when a config file names none of them."""
    return {name: s.default for name, s in declared(cls)}


def problem(cls: type, table: Mapping[str, Any]) -> tuple[str, str] | None:
    """The first (key, what was expected) whose value in ``table`` fails its check."""
    for name, setting in declared(cls):
        expected = setting.check(table[name])
        if expected is not None:
            return name, expected
    return None


def build(cls: type[T], table: Mapping[str, Any]) -> T:
    """The runtime object: each declared setting by name from checked TOML values."""
    return cls(**{name: table[name] for name, _ in declared(cls)})


def reloadable(sections: Mapping[str, type]) -> frozenset[str]:
    """The dotted names of the settings SIGHUP may change."""
    return frozenset(
        f"{section}.{name}"
        for section, cls in sections.items()
        for name, setting in declared(cls)
        if setting.reload
    )


def render(sections: Mapping[str, type]) -> str:
    """Every section and setting as commented TOML (the embedded defaults)."""
    out: list[str] = []
    for section, cls in sections.items():
        out.append(f"[{section}]")
        out += _comment(_doc_of(cls))
        for name, setting in declared(cls):
            out += _comment(setting.doc)
            line = f"{name} = {toml_value(setting.default)}"
            if setting.note:
                line = f"{line.ljust(_VALUE_COLUMN - 2)}  # {setting.note}"
            out.append(line)
        out.append("")
    return "\n".join(out[:-1]) + "\n"


def _doc_of(cls: type) -> str:
    """A section class's docstring, which is the comment under its header."""
    return textwrap.dedent(cls.__doc__ or "").strip()


def _comment(doc: str) -> list[str]:
    lines: list[str] = []
    for paragraph in doc.split("\n") if doc else ():
        keep = paragraph.startswith(" ")  # an indented line (an example) is printed as is
        lines += (
            [f"# {paragraph}"]
            if keep
            else textwrap.wrap(
                paragraph,
                _WIDTH,
                initial_indent="# ",
                subsequent_indent="# ",
                break_on_hyphens=False,
            )
        )
    return lines


def toml_value(value: Any) -> str:
    """A default as TOML writes it (strings, numbers, booleans and lists of those)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for every default we declare
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


# -- checks and converters used by more than one section --------------------------------------


def host_port(text: str, default: int) -> tuple[str, int | None]:
    """ "host" or "host:port" (an IPv6 address, with several colons, has no port here); the
    port is None when it is not a number in range."""
    if text.count(":") != 1:
        return text, default
    host, _, port = text.rpartition(":")
    return host, int(port) if port.isdigit() and 0 < int(port) < 65536 else None


def each(parse: Callable[[str], tuple[Any, ...]]) -> Callable[[Any], tuple[Any, ...]]:
    """A converter for a list of strings that each parse to a tuple (kept when already one)."""

    def convert(v: Any) -> tuple[Any, ...]:
        return tuple(x if isinstance(x, tuple) else parse(x) for x in v)

    return convert


def check_networks(v: Any) -> str | None:
    if not isinstance(v, list):
        return "a list of networks such as 127.0.0.0/8"
    for x in v:
        try:
            ipaddress.ip_network(x)
        except (TypeError, ValueError):
            return f"a list of networks such as 127.0.0.0/8 ({x!r} is not one)"
    return None


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def to_networks(v: Any) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(x) for x in v)


def check_domains(v: Any) -> str | None:
    if not isinstance(v, list) or not all(isinstance(x, str) and "." in x for x in v):
        return "a list of domain names"
    return None


def lowered(v: Any) -> frozenset[str]:
    return frozenset(x.lower() for x in v)
