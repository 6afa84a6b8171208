"""What the accepting process would spend a message if the SMTP sessions ran in other
processes and handed each message to it to journal: the ceiling of that design.

    python bench/bench_handoff.py [--messages N] [--senders K] [--window W] [--rounds R] [--json]

The accepting rows of ``bench_peers.py`` are bound by one interpreter: the relay's event
loop runs every session (its system calls, the SMTP parser, the policy) and the journal's
appends. Two ways to use the second core for acceptance keep the durability contract:
shards (``bench_shards.py``: K relays with a journal each, their ceiling measured there),
and sessions in K processes that hand each message, once its data is in and the policy has
passed it, to the one process that owns the journal, and answer 250 when it says the
record is durable. That is Postfix's own split (``smtpd`` processes, one queue manager);
it keeps one journal, one ``queue``, one ``crashtest`` and the delivery processes as they
are. Before building it, this measured what it would leave the owner to do; it is built
since (``smtp.processes``, server/handoff.py, docs/sessions.md).

**The owner** is this process: the relay's own ``QueueStore`` on a real journal (group
commit, fsync before each acknowledgement), reading frames from K socketpairs. A frame is
one message's ACCEPTED payload as a session would encode it (``encode_accepted``); for
each the owner decodes the head (``decode_accepted``: the record the queue state holds),
appends it with ``QueueStore.accept`` in a task of its own (as a session's task appends
today) and, the moment it is durable, queues the frame's number back to its sender; one
write a loop turn carries every number queued. Queue events have no subscribers here: in
the relay the status index and the metrics follow each message (about 35 us and 10 us of
CPU a message, measured in the fifteenth run of bench_peers).

**The senders** are K forked processes that only write frames built beforehand, at most W
unacknowledged each (W sessions waiting for their 250), and read the acknowledgements: the
sessions' own cost is not here. It is what ``bench_peers.py`` measures as the relay's CPU a
message accepting, less the owner's part.

Printed per size: messages a second, and the owner's CPU a message (user + system, this
process with its journal thread, from ``getrusage``), medians of the rounds; and from that
the owner's ceiling, one core doing only this: 1 / CPU a message.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atmosrelay.queue.records import decode_accepted, encode_accepted
from atmosrelay.queue.store import QueueStore
from bench.bench_delivery import bench_record
from journal import open_journal

FRAME: Final = struct.Struct("<II")  # bytes after the length field, the frame's number
ACK: Final = struct.Struct("<I")
SIZES: Final = {"1 KiB": 1024, "100 KiB": 100 * 1024}


def frames(n: int, size: int, first: int) -> list[bytes]:
    """``n`` frames numbered from ``first``, each an ACCEPTED payload of ``size`` bytes of
    message, one recipient, as a member's session would make it."""
    head = b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: bench\r\n\r\n"
    body = head + (b"y" * 76 + b"\r\n") * max(0, (size - len(head)) // 78)
    out = []
    for i in range(n):
        record = bench_record(i, body, time.time())
        payload = encode_accepted(record, body)
        out.append(FRAME.pack(len(payload) + 4, first + i) + payload)
    return out


def send(sock: socket.socket, mine: list[bytes], window: int) -> None:
    """A sender: at most ``window`` frames unacknowledged, until every one is."""
    sent = acked = 0
    pending = b""
    while acked < len(mine):
        room = min(window - (sent - acked), len(mine) - sent)
        if room > 0:
            sock.sendall(b"".join(mine[sent : sent + room]))
            sent += room
        data = sock.recv(65536)
        if not data:
            raise SystemExit("the owner went away")
        pending += data
        whole = len(pending) // ACK.size
        acked += whole
        pending = pending[whole * ACK.size :]


async def own(socks: list[socket.socket], directory: Path, total: int) -> tuple[float, float]:
    """Serve the senders until each has every acknowledgement and hangs up; return (seconds
    from the first frame to the last message made durable, the owner's CPU seconds)."""
    times: list[float] = []
    cpu: list[float] = []
    count = 0

    def usage() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    async with open_journal(str(directory)) as journal, trio.open_nursery() as nursery:
        queue = QueueStore(journal)

        async def serve(sock: socket.socket) -> None:
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
            acks = bytearray()
            wake = trio.Event()

            def acknowledge(number: int) -> None:
                nonlocal count
                acks.extend(ACK.pack(number))
                wake.set()
                count += 1
                if count == total:
                    times.append(time.perf_counter())
                    cpu.append(usage())

            async def writer() -> None:
                nonlocal wake
                while True:
                    await wake.wait()
                    wake = trio.Event()
                    out = bytes(acks)
                    del acks[:]
                    await stream.send_all(out)

            async with trio.open_nursery() as talking:
                talking.start_soon(writer)
                buf = bytearray()
                while data := await stream.receive_some(262144):
                    if not times:
                        times.append(time.perf_counter())
                        cpu.append(usage())
                    buf += data
                    at = 0
                    while len(buf) - at >= FRAME.size:
                        length, number = FRAME.unpack_from(buf, at)
                        if len(buf) - at - 4 < length:
                            break
                        payload = bytes(buf[at + FRAME.size : at + 4 + length])  # its one copy
                        at += 4 + length
                        record, offset = decode_accepted(payload)
                        then = (lambda n: lambda: acknowledge(n))(number)
                        nursery.start_soon(queue.accept, record, payload[offset:], then)
                    del buf[:at]
                talking.cancel_scope.cancel()  # the sender had every number and hung up

        for sock in socks:
            nursery.start_soon(serve, sock)
    assert count == total, f"{count} of {total} acknowledged"
    return times[-1] - times[0], cpu[-1] - cpu[0]


def one_round(n: int, size: int, senders: int, window: int) -> tuple[float, float]:
    """(messages a second, owner CPU ms a message) of one run."""
    each = n // senders
    pids, socks = [], []
    for k in range(senders):
        mine = frames(each, size, k * each)
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the sender: blocking, no event loop
            ours.close()
            code = 0
            try:
                send(theirs, mine, window)
                theirs.close()  # every number is back: the owner's reader ends
            except BaseException:
                code = 1
            os._exit(code)
        theirs.close()
        pids.append(pid)
        socks.append(ours)
    with tempfile.TemporaryDirectory(prefix="bench-handoff-") as d:
        seconds, cpu = trio.run(own, socks, Path(d) / "journal", each * senders)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "a sender failed"
    return each * senders / seconds, 1000 * cpu / (each * senders)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=20_000, help="a round, 1 KiB")
    p.add_argument("--senders", type=int, default=2, help="session processes")
    p.add_argument("--window", type=int, default=25, help="sessions a sender stands for")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.add_argument("--only", choices=list(SIZES), help="one size")
    args = p.parse_args()
    rows = []
    for label, size in SIZES.items():
        if args.only and label != args.only:
            continue
        n = args.messages if size <= 1024 else max(args.senders, args.messages // 4)
        results = [one_round(n, size, args.senders, args.window) for _ in range(args.rounds)]
        rate = statistics.median(r for r, _ in results)
        cpu = statistics.median(c for _, c in results)
        rows.append(
            {
                "size": size,
                "senders": args.senders,
                "sessions": args.senders * args.window,
                "msgs_per_s": round(rate),
                "owner_cpu_ms": round(cpu, 3),
                "owner_ceiling": round(1000 / cpu),
                "load": round(os.getloadavg()[0], 2),
            }
        )
        if not args.json:
            print(
                f"{label:>8}  {args.senders} senders x {args.window} in flight: "
                f"{rate:7.0f} msgs/s; owner {cpu:.3f} ms of CPU a message, "
                f"so at most {1000 / cpu:,.0f} msgs/s with a core of its own "
                f"(load {os.getloadavg()[0]:.2f})",
                flush=True,
            )
    if args.json:
        print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
