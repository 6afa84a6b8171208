"""Whole SMTP transactions per second through a ClientConnection/ServerConnection pair, no I/O.

    python bench/bench_protocol.py [--json] [--seconds S]

One connection (greeting and EHLO once), then MAIL, RCPT and DATA pipelined, the content,
and the end-of-data reply, over and over: every byte parsed by both sides, every reply
formatted and parsed. 1 KiB and 100 KiB messages of 78-character lines. Single-threaded: the
figure is what one core spends on the protocol, so it is never what limits the relay.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atmosrelay.smtp import (
    NEED_DATA,
    Address,
    ClientConnection,
    Data,
    EndOfMessage,
    Hello,
    MailFrom,
    MessageData,
    RcptTo,
    ServerConnection,
)
from atmosrelay.smtp import replies as R

SIZES = {"1KiB": 1024, "100KiB": 100 * 1024}
REPLIES = {MailFrom: R.SENDER_OK, RcptTo: R.RECIPIENT_OK, Data: R.START_DATA}


def _message(size: int) -> bytes:
    line = b"x" * 76 + b"\r\n"
    body = b"Subject: bench\r\n\r\n" + line * (size // len(line))
    return body[: size - 2] + b"\r\n" if len(body) >= size else body


def _serve(server: ServerConnection, data: bytes, queue_id: str = "") -> tuple[bytes, int]:
    """Feed ``data``; answer each command (the end of data with a fresh queue id, as the
    relay does, so no reply cache flatters the figure)."""
    server.receive_data(data)
    out = bytearray()
    received = 0
    while True:
        event = server.next_event()
        if event is NEED_DATA:
            return bytes(out), received
        if isinstance(event, MessageData):
            received += len(event.data)
            continue
        if isinstance(event, EndOfMessage):
            out += server.send(R.QUEUED.format(queue_id=queue_id))
        else:
            out += server.send(REPLIES[type(event)])


def _replies(client: ClientConnection, data: bytes, n: int) -> None:
    client.receive_data(data)
    for _ in range(n):
        event = client.next_event()
        assert event is not NEED_DATA
        assert event.reply.is_positive, event  # type: ignore[union-attr]


def run(size: int, seconds: float) -> dict[str, float]:
    client, server = ClientConnection(), ServerConnection()
    server.next_event()
    client.receive_data(server.send(R.GREETING.format(hostname="mx.bench")))
    client.next_event()
    server.receive_data(client.send(Hello("client.bench", True)))
    server.next_event()
    client.receive_data(server.send(server.ehlo_reply("mx.bench")))
    client.next_event()
    body = _message(size)
    sender, rcpt = Address("alice", "example.org"), Address("bob", "example.net")
    n = 0
    start = time.perf_counter()
    cpu0 = time.process_time()
    while True:
        group = client.send(MailFrom(sender)) + client.send(RcptTo(rcpt)) + client.send(Data())
        out, _ = _serve(server, group)
        _replies(client, out, 3)
        content = client.send_data(body) + client.end_data()
        out, received = _serve(server, content, f"01J{n:023d}")
        assert received == len(body)
        _replies(client, out, 1)
        n += 1
        if n % 64 == 0 and time.perf_counter() - start > seconds:
            break
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    return {
        "transactions": n,
        "per_s": n / elapsed,
        "cpu_us_per_tx": cpu / n * 1e6,
        "mb_per_s": n * len(body) / elapsed / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    results = {label: run(size, args.seconds) for label, size in SIZES.items()}
    machine = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }
    if args.json:
        print(json.dumps({"machine": machine, "results": results}, indent=2))
        return
    print(
        f"protocol bench (client+server objects, no I/O, one core): {machine['platform']}, "
        f"Python {machine['python']}"
    )
    print(f"{'message':>8}{'tx/s':>10}{'CPU us/tx':>11}{'MB/s':>8}")
    for label, r in results.items():
        print(f"{label:>8}{r['per_s']:>10.0f}{r['cpu_us_per_tx']:>11.1f}{r['mb_per_s']:>8.1f}")


if __name__ == "__main__":
    main()
