"""Golden transcripts: C: lines go to a real ServerConnection, S: lines must come back.

File format (tests/protocol/transcripts/*.txt):

    # server: {"auth": ["PLAIN"], "tls": true}   optional: Capabilities / ServerConnection options
    # greeting: NO_SERVICE                        optional: the greeting reply's catalogue name
    # free text                                   description
    C: EHLO client.test                           a client line; CRLF is added; \\n etc. escapes
    C! BDAT 3\\r\\nabc                              raw client bytes, escapes, no CRLF added
    S: 250 2.0.0 Ok                               an expected server line (CRLF implied)

Each transcript runs with the client bytes whole and byte by byte; the server output must be
exactly the S: lines. ``ATMOS_REGEN_TRANSCRIPTS=1 pytest tests/protocol/test_transcripts.py``
rewrites the S: lines from the current server (review the diff before committing it).
"""

from __future__ import annotations

import codecs
import json
import os
from pathlib import Path

import attrs
import pytest

from atmosrelay.smtp import Capabilities, Event, Greet, Reply, ServerConnection
from atmosrelay.smtp import replies as R
from tests.protocol.helpers import answer, drive_server, splits

DIR = Path(__file__).with_name("transcripts")
FILES = sorted(DIR.glob("*.txt"))
_CAPS_FIELDS = {a.name for a in attrs.fields(Capabilities)}


def _unescape(text: str) -> bytes:
    return codecs.escape_decode(text.encode("utf-8"))[0]  # type: ignore[no-any-return]


def parse(path: Path) -> tuple[dict[str, object], str | None, bytes, list[str]]:
    options: dict[str, object] = {}
    greeting = None
    client = bytearray()
    expected: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# server: "):
            options = json.loads(line[len("# server: ") :])
        elif line.startswith("# greeting: "):
            greeting = line[len("# greeting: ") :].strip()
        if line.startswith("C: "):
            client += _unescape(line[3:]) + b"\r\n"
        elif line.startswith("C! "):
            client += _unescape(line[3:])
        elif line.startswith("S: "):
            expected.append(line[3:])
    return options, greeting, bytes(client), expected


def make_server(options: dict[str, object]) -> ServerConnection:
    caps = {k: v for k, v in options.items() if k in _CAPS_FIELDS}
    if "auth" in caps:
        caps["auth"] = tuple(caps["auth"])  # type: ignore[arg-type]
    conn_opts = {k: v for k, v in options.items() if k not in _CAPS_FIELDS}
    if "auth_unavailable" in conn_opts:
        conn_opts["auth_unavailable"] = getattr(R, str(conn_opts["auth_unavailable"]))
    return ServerConnection(capabilities=Capabilities(**caps), **conn_opts)  # type: ignore[arg-type]


def run(path: Path, how: str) -> list[str]:
    import random

    options, greeting, client, _ = parse(path)

    def respond(conn: ServerConnection, event: Event) -> Reply | None:
        if isinstance(event, Greet) and greeting:
            return getattr(R, greeting)  # type: ignore[no-any-return]
        return answer(conn, event)

    _, out = drive_server(make_server(options), splits(client, how, random.Random(1)), respond)
    return out.decode("utf-8").split("\r\n")[:-1]


def test_there_are_at_least_twenty_scenarios() -> None:
    assert len(FILES) >= 20


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_transcript(path: Path) -> None:
    got = run(path, "whole")
    if os.environ.get("ATMOS_REGEN_TRANSCRIPTS"):
        lines = [
            x for x in path.read_text(encoding="utf-8").splitlines() if not x.startswith("S: ")
        ]
        path.write_text("\n".join([*lines, *("S: " + g for g in got)]) + "\n", encoding="utf-8")
        return
    _, _, _, expected = parse(path)
    assert got == expected
    assert run(path, "bytes") == expected
