"""Delivery against remotes that misbehave, over real sockets on 127.0.0.1: a scripted
hostile MX, and Postfix's smtp-sink (its EHLO reply ends with an empty "250 " line, which
used to crash the lane). Whatever a remote sends becomes an outcome with its reply
recorded, escaped and bounded; the lane never crashes (no "crashed" log line)."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from atmosrelay.delivery.client_session import MAX_RECORDED_REPLY
from atmosrelay.delivery.dispatcher import DeliverySettings, Dispatcher
from atmosrelay.delivery.resolver import Destination
from atmosrelay.queue.records import RecordType, decode_delivery
from atmosrelay.queue.store import QueueStore
from journal import open_journal
from journal.testing import CrashableMemFS
from tests.delivery.test_client_session import MESSAGE, tls
from tests.delivery.test_dispatcher import FakeResolver
from tests.queue.factories import accepted_record

Replies = dict[str, bytes]  # command verb (or "GREETING", "END") -> the bytes to answer with
DEFAULT: Replies = {
    "GREETING": b"220 mx ESMTP\r\n",
    "EHLO": b"250-mx\r\n250 8BITMIME\r\n",
    "HELO": b"250 mx\r\n",
    "MAIL": b"250 2.1.0 ok\r\n",
    "RCPT": b"250 2.1.5 ok\r\n",
    "DATA": b"354 go\r\n",
    "END": b"250 2.0.0 queued\r\n",
    "RSET": b"250 ok\r\n",
    "QUIT": b"221 bye\r\n",
}


async def hostile_mx(replies: Replies, stream: trio.SocketStream) -> None:
    """Answer each command line with the scripted bytes; hang up after sending any reply
    that is not CRLF-terminated (nothing more could follow it) or on QUIT. The client may
    hang up first, in the middle of a reply it will not read."""
    with contextlib.suppress(trio.BrokenResourceError):
        await _converse(replies, stream)


async def _converse(replies: Replies, stream: trio.SocketStream) -> None:
    async with stream:
        buf, in_data = b"", False

        async def say(key: str) -> bool:
            data = replies.get(key, DEFAULT.get(key, b"250 ok\r\n"))
            await stream.send_all(data)
            return key != "QUIT" and data.endswith(b"\r\n")

        if not await say("GREETING"):
            return
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            buf += data
            while b"\r\n" in buf:
                line, buf = buf.split(b"\r\n", 1)
                if in_data:
                    if line == b".":
                        in_data = False
                        if not await say("END"):
                            return
                    continue
                verb = line.split(b" ", 1)[0].upper().decode("ascii", "replace")
                if not await say(verb):
                    return
                in_data = verb == "DATA" and replies.get("DATA", DEFAULT["DATA"]).startswith(b"354")


@asynccontextmanager
async def delivering(port: int) -> AsyncIterator[tuple[QueueStore, Dispatcher]]:
    destination = Destination((("127.0.0.1", port),))
    async with open_journal("/q", fs=CrashableMemFS()) as journal:
        queue = QueueStore(journal)
        dispatcher = Dispatcher(
            queue,
            FakeResolver({"example.net": destination}),
            DeliverySettings(helo="relay.test", tls=tls(), operator_domain="relay.test"),
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(dispatcher.run)
            yield queue, dispatcher
            nursery.cancel_scope.cancel()


async def first_outcome(queue: QueueStore, dispatcher: Dispatcher) -> tuple[str, str, str]:
    """Submit one message and wait for its first recorded attempt: (outcome, status, reply)."""
    record = accepted_record("bob@example.net", accepted_at=time.time(), size=len(MESSAGE))
    await queue.accept(record, MESSAGE)
    dispatcher.notify()
    with trio.fail_after(30):
        while True:
            for r in queue.journal.records():
                if r.type == RecordType.DELIVERY:
                    (o,) = decode_delivery(r.payload).outcomes
                    return o.outcome, o.status, o.reply or ""
            await trio.sleep(0.02)


LONG = b"x" * (1024 * 1024)
SCENARIOS: list[tuple[str, Replies, str, Callable[[str], bool]]] = [
    # (what, replies, expected outcome, a check of the recorded reply)
    ("empty EHLO line", {"EHLO": b"250-mx\r\n250-PIPELINING\r\n250 \r\n"}, "sent", lambda r: True),
    (
        "no reply text",
        {k: b"250\r\n" for k in ("EHLO", "MAIL", "RCPT", "END")},
        "sent",
        lambda r: r.strip() == "250",
    ),
    (
        "odd case keywords",
        {"EHLO": b"250-mx\r\n250-pipelining\r\n250 8bitmime\r\n"},
        "sent",
        lambda r: True,
    ),
    ("non-digit SIZE", {"EHLO": b"250-mx\r\n250 SIZE \xc2\xb2\r\n"}, "sent", lambda r: True),
    (
        "non-ASCII reply",
        {"END": b"250 2.0.0 \xff\xfe queued \xc3\xa9 \x1b[31m\r\n"},
        "sent",
        lambda r: "\\x1b[31m" in r and "\x1b" not in r,
    ),
    (
        "continuation without end",
        {"EHLO": b"250-mx\r\n" * 300},
        "deferred",
        lambda r: "too many lines" in r,
    ),
    (
        "a 1 MB reply line",
        {"GREETING": b"220 " + LONG},
        "deferred",
        lambda r: "too long" in r and len(r) < 3 * MAX_RECORDED_REPLY,
    ),
    (
        "a reply before the command",
        {"GREETING": b"220 mx\r\n250 unasked\r\n"},
        "deferred",
        lambda r: True,
    ),
    (
        "binary greeting",
        {"GREETING": b"\x00\x01\x02 hello\r\n"},
        "deferred",
        lambda r: "\\x00\\x01\\x02" in r,
    ),
    ("bare LF replies", {"GREETING": b"220 mx\n250 ok\n"}, "deferred", lambda r: True),
    ("code out of range", {"MAIL": b"999 what\r\n"}, "deferred", lambda r: "999" in r),
    (
        "mixed codes in one reply",
        {"EHLO": b"250-mx\r\n251 other\r\n"},
        "deferred",
        lambda r: "bad reply code" in r,
    ),
    (
        "a permanent refusal with a long text",
        {"RCPT": b"550 5.1.1 " + b"n" * 1500 + b"\r\n"},
        "bounced",
        lambda r: r.startswith("550 5.1.1 nnn") and len(r) < 2 * MAX_RECORDED_REPLY,
    ),
]


@pytest.mark.parametrize(
    ("replies", "expected", "check"),
    [pytest.param(r, e, c, id=what) for what, r, e, c in SCENARIOS],
)
async def test_a_hostile_mx_gets_an_outcome_never_a_crash(
    replies: Replies, expected: str, check: Callable[[str], bool], caplog: pytest.LogCaptureFixture
) -> None:
    async with trio.open_nursery() as nursery:
        serve = functools.partial(trio.serve_tcp, functools.partial(hostile_mx, replies), 0)
        (listener,) = await nursery.start(functools.partial(serve, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        async with delivering(port) as (queue, dispatcher):
            outcome, _status, reply = await first_outcome(queue, dispatcher)
        nursery.cancel_scope.cancel()
    assert outcome == expected, reply
    assert check(reply), reply
    assert not [r for r in caplog.records if "crashed" in r.getMessage()]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(
    shutil.which("smtp-sink") is None, reason="Postfix's smtp-sink is not installed"
)
async def test_delivery_to_postfix_smtp_sink(caplog: pytest.LogCaptureFixture) -> None:
    # smtp-sink drops to 'nobody' before it writes its dump: not under pytest's tmp_path,
    # whose parents are 0700, but a directory of its own that 'nobody' may write.
    with tempfile.TemporaryDirectory(prefix="atmosrelay-smtp-sink-") as name:
        dump = Path(name)
        os.chmod(dump, 0o777)
        await _deliver_to_smtp_sink(dump, caplog)


async def _deliver_to_smtp_sink(dump: Path, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    sink = await trio.lowlevel.open_process(
        ["smtp-sink", "-u", "nobody", "-d", f"{dump}/%M.", f"127.0.0.1:{port}", "10"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with trio.fail_after(10):
            while True:  # smtp-sink has no readiness signal: wait until it greets
                try:
                    async with await trio.open_tcp_stream("127.0.0.1", port) as probe:
                        assert (await probe.receive_some()).startswith(b"220 ")
                        await probe.send_all(b"QUIT\r\n")
                        await probe.receive_some()
                    break
                except OSError:
                    await trio.sleep(0.05)
        async with delivering(port) as (queue, dispatcher):
            outcome, status, reply = await first_outcome(queue, dispatcher)
    finally:
        sink.terminate()
        with trio.fail_after(10):
            await sink.wait()
    assert (outcome, status) == ("sent", "2.0.0"), reply
    (received,) = await trio.Path(dump).iterdir()
    assert b"Subject: hi" in await received.read_bytes()
    assert not [r for r in caplog.records if "crashed" in r.getMessage()]
