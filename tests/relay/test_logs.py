"""The relay's log formats (atmosrelay/logs.py) on a real relay: every line has an ISO-8601
UTC timestamp; the JSON format parses line by line and names the queue id of every accepted
message; no format ever shows a key, even one a client sent as its user name."""

from __future__ import annotations

import io
import json
import logging
import re
import smtplib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from atmosrelay import logs
from tests.relay.harness import ALICE, running_relay

TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@contextmanager
def captured(fmt: str) -> Iterator[tuple[io.StringIO, io.StringIO]]:
    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    before = (root.level, list(root.handlers))
    logs.configure("info", fmt, stdout=out, stderr=err)
    try:
        yield out, err
    finally:
        for logger in (root, logging.getLogger(logs.LIFECYCLE)):
            for handler in [h for h in logger.handlers if h not in before[1]]:
                logger.removeHandler(handler)
        root.setLevel(before[0])


@pytest.mark.parametrize("fmt", logs.FORMATS)
async def test_log_lines_are_timestamped_parse_and_never_show_a_key(
    tmp_path: Path, fmt: str
) -> None:
    with captured(fmt) as (out, err):
        async with running_relay(tmp_path) as relay:

            def send() -> list[str]:
                ids = []
                with smtplib.SMTP_SSL(
                    "127.0.0.1", relay.implicit_port, context=relay.client_context()
                ) as client:
                    # a key pasted where the DID belongs: refused, and never logged
                    with pytest.raises(smtplib.SMTPAuthenticationError):
                        client.login(relay.key, relay.key)
                    client.login(ALICE, relay.key)
                    for n in range(3):
                        client.mail("alice@example.org")
                        client.rcpt("bob@example.net")
                        code, reply = client.data(
                            f"From: alice@example.org\r\nSubject: {n}\r\n\r\nhi\r\n"
                        )
                        found = re.search(rb"queued as (\w+)", reply)
                        assert code == 250 and found, reply
                        ids.append(found.group(1).decode())
                return ids

            queue_ids = await trio.to_thread.run_sync(send)
            logs.announce(f"a lifecycle line with a key {relay.key} in it")
        text, lifecycle = err.getvalue(), out.getvalue()
    secret = relay.key[len("atmos_") + 8 :]
    assert secret not in text and secret not in lifecycle
    lines = text.splitlines()
    assert lines and lifecycle.splitlines()
    if fmt == "text":
        assert all(TS.match(line) for line in lines), lines[:3]
        assert all(TS.match(line) for line in lifecycle.splitlines())
        for queue_id in queue_ids:
            assert any(f"queued {queue_id}" in line for line in lines), queue_id
        return
    objects = [json.loads(line) for line in lines]  # every line is one JSON object
    for obj in objects + [json.loads(line) for line in lifecycle.splitlines()]:
        assert TS.fullmatch(obj["ts"]) and obj["level"] and obj["event"], obj
    queued = [o for o in objects if o["event"] == "queued"]
    assert sorted(o["queue_id"] for o in queued) == sorted(queue_ids)
    assert all(o["did"] == ALICE and o["peer"] == "127.0.0.1" and o["code"] == 250 for o in queued)
    assert any(o["event"] == "auth-failed" for o in objects)
