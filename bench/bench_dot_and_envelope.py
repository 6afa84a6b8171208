"""What the next message's envelope sent with this one's final dot would save: one write a
message on a kept delivery connection instead of two.

    python bench/bench_dot_and_envelope.py [--connections C] [--messages N] [--rounds R]
                                           [--sizes 1024,102400] [--json]

RFC 2920 lets a client put the next transaction's MAIL, RCPT and DATA in the same write as
this one's content and final dot (its second example does). The relay's delivery client
writes them apart: the envelope (MAIL, RCPT, DATA pipelined), then the content and the dot,
each followed by a read of the replies. To send them together it would need the next
message in hand before this one's outcome is on disk, and to hold the next one's content
until it is (at most one message a connection delivered and unrecorded); before building
that, this measures what it could save at most.

C connections to ``smtp-sink`` (the sink of ``bench_peers.py``'s end-to-end rows), each
sending N/C messages of a fixed transaction as raw bytes through the relay's ``StreamIO``
(the delivery client's reads and writes), rounds alternating which way goes first:

    two writes   write(MAIL RCPT DATA), read 3 replies; write(content "."), read 1 reply
    one write    write(content "." MAIL RCPT DATA of the next), read 4 replies

Printed per size and way: messages a second, this process's CPU a message (user + system),
the sink's CPU a message (``/proc``), and their sum: what the machine would save a message
is the difference of the sums. Medians of the rounds. Needs Postfix's ``smtp-sink``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atmosrelay.stream_io import StreamIO
from bench.bench_peers import KIB, Sink, cpu_ticks

ENVELOPE = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
HEAD = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: bench\r\n\r\n"


def content(size: int) -> bytes:
    """A message of about ``size`` octets in 78-octet lines, and its final dot."""
    return HEAD + (b"y" * 76 + b"\r\n") * ((size - len(HEAD)) // 78) + b".\r\n"


class Replies:
    """Whole reply lines off one connection (the sink answers each command in one line)."""

    def __init__(self, io: StreamIO) -> None:
        self.io = io
        self.buf = b""

    async def take(self, n: int) -> None:
        while self.buf.count(b"\r\n") < n:
            data = await self.io.read(65536)
            if not data:
                raise RuntimeError("the sink closed the connection")
            self.buf += data
        lines = self.buf.split(b"\r\n")
        for line in lines[:n]:
            if line[:1] not in (b"2", b"3"):
                raise RuntimeError(f"the sink refused: {line!r}")
        self.buf = b"\r\n".join(lines[n:])


async def connection(port: int, messages: int, body: bytes, together: bool) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    io = StreamIO(stream)
    replies = Replies(io)
    await replies.take(1)  # the greeting
    await io.write(b"EHLO bench.example\r\n")
    while b"250 " not in replies.buf:  # the last line of EHLO's reply
        replies.buf += await io.read(65536)
    replies.buf = b""
    if together:
        await io.write(ENVELOPE)
        await replies.take(3)
        for _ in range(messages - 1):
            await io.write(body + ENVELOPE)
            await replies.take(4)
        await io.write(body)
        await replies.take(1)
    else:
        for _ in range(messages):
            await io.write(ENVELOPE)
            await replies.take(3)
            await io.write(body)
            await replies.take(1)
    await io.write(b"QUIT\r\n")
    await io.aclose()


async def send(port: int, connections: int, messages: int, body: bytes, together: bool) -> None:
    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(connection, port, messages // connections, body, together)


def one_round(
    sink: Sink, connections: int, messages: int, size: int, together: bool
) -> dict[str, float]:
    body = content(size)
    tick = os.sysconf("SC_CLK_TCK")
    sink_before = sum(cpu_ticks(sink.proc.pid))
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    trio.run(send, sink.port, connections, messages, body, together)
    took = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    sink_after = sum(cpu_ticks(sink.proc.pid))
    sent = messages // connections * connections
    client = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) / sent
    sink_cpu = (sink_after - sink_before) / tick / sent
    return {
        "per_s": sent / took,
        "client_us": client * 1e6,
        "sink_us": sink_cpu * 1e6,
        "total_us": (client + sink_cpu) * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--sizes", default=f"{KIB},{100 * KIB}")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if shutil.which("smtp-sink") is None:
        sys.exit("smtp-sink not found: install Postfix's tools (bench/README.md)")
    rows: list[dict[str, Any]] = []
    sink = Sink()
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            messages = args.messages if size <= KIB else max(args.messages // 20, 1)
            runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
            for r in range(args.rounds):
                for together in (r % 2 == 0, r % 2 != 0):  # ABBA: who goes first alternates
                    runs[together].append(
                        one_round(sink, args.connections, messages, size, together)
                    )
            for together, results in runs.items():
                row: dict[str, Any] = {"size": size, "way": "one" if together else "two"}
                for key in results[0]:
                    row[key] = statistics.median(r[key] for r in results)
                rows.append(row)
    finally:
        sink.stop()
    if args.json:
        print(json.dumps({"rows": rows}))
        return
    print(f"{'size':>7} {'writes':>6} {'msgs/s':>8} {'client us':>10} {'sink us':>8} {'sum us':>7}")
    for row in rows:
        print(
            f"{row['size']:>7} {row['way']:>6} {row['per_s']:>8.0f} {row['client_us']:>10.1f}"
            f" {row['sink_us']:>8.1f} {row['total_us']:>7.1f}"
        )
    print("client: this process's CPU a message; sink: smtp-sink's; sum: the two (medians)")


if __name__ == "__main__":
    main()
