"""The delivery transaction with BDAT against the same with DATA, to a real Postfix.

    python bench/bench_chunking.py [--messages N] [--rounds N] [--sizes 1024,102400] [--json]

The relay's SMTP client (``Remote.send``, one connection, one recipient a message) sends N
messages to a throwaway Postfix (bench/postfix.py) that offers PIPELINING and CHUNKING and
discards what it accepts, once with ``chunking`` on (MAIL, RCPT and BDAT LAST with the content
in one write) and once off (MAIL, RCPT and DATA in one write, then the content), rounds
alternating which goes first (ABBA). Per size it prints the client's CPU a transaction (this
process's user and system time) and the wall time a transaction, medians of the rounds. The
wall time includes Postfix's own work (its fsync a message), which is the same for both.

``bench_peers.py`` cannot show this: its sink, Postfix's ``smtp-sink``, does not offer
CHUNKING. Needs Postfix installed and root (Postfix's master).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atmosrelay.delivery.client_session import Envelope, open_remote
from atmosrelay.delivery.courier import client_context
from atmosrelay.delivery.destination import Destination
from bench.bench_peers import postfix_missing
from bench.postfix import Postfix, free_port

WARMUP = 100


def message(size: int) -> bytes:
    head = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: x\r\n\r\n"
    return head + (b"y" * 76 + b"\r\n") * max(1, (size - len(head)) // 78)


async def transactions(port: int, chunking: bool, n: int, size: int) -> tuple[float, float]:
    """(CPU us, wall us) a transaction over ``n`` messages on one connection."""
    remote = await open_remote(
        Destination((("127.0.0.1", port),)),
        helo="bench.test",
        tls=client_context(False, ""),
        chunking=chunking,
    )
    if remote.chunking != chunking:
        raise RuntimeError("Postfix did not offer CHUNKING")
    envelope, body = Envelope("a@example.org", ("b@example.net",)), message(size)
    try:
        for _ in range(WARMUP):
            await remote.send(envelope, body)
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(n):
            (outcome,) = await remote.send(envelope, body)
            if outcome.outcome != "sent":
                raise RuntimeError(f"not sent: {outcome}")
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    finally:
        await remote.aclose()
    cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
    return 1e6 * cpu / n, 1e6 * (t1 - t0) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--sizes", default="1024,102400")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    missing = postfix_missing()
    if missing:
        print(f"bench_chunking: not run: {missing}")
        return
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-chunking-") as d:
        discard = {"default_transport": "discard", "relay_transport": "discard"}
        peer = Postfix(Path(d), free_port(), hold=False, extra=discard)
        try:
            for size in (int(s) for s in args.sizes.split(",")):
                runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
                for r in range(args.rounds):
                    for chunking in (True, False) if r % 2 == 0 else (False, True):
                        runs[chunking].append(
                            trio.run(transactions, peer.port, chunking, args.messages, size)
                        )
                med = {
                    c: (statistics.median(x for x, _ in v), statistics.median(y for _, y in v))
                    for c, v in runs.items()
                }
                rows.append(
                    {
                        "size": size,
                        "bdat_cpu_us": round(med[True][0], 1),
                        "data_cpu_us": round(med[False][0], 1),
                        "bdat_wall_us": round(med[True][1], 1),
                        "data_wall_us": round(med[False][1], 1),
                    }
                )
        finally:
            peer.stop()
    if args.json:
        print(json.dumps({"rows": rows}))
        return
    print(f"{args.messages} messages a round, {args.rounds} rounds each way, medians")
    print(
        f"{'size':>8} {'CPU us BDAT':>12} {'DATA':>8} {'ratio':>6} {'wall us BDAT':>13} {'DATA':>8}"
    )
    for row in rows:
        ratio = row["bdat_cpu_us"] / row["data_cpu_us"]
        print(
            f"{row['size']:>8} {row['bdat_cpu_us']:>12.1f} {row['data_cpu_us']:>8.1f} "
            f"{ratio:>5.2f}x {row['bdat_wall_us']:>13.1f} {row['data_wall_us']:>8.1f}"
        )


if __name__ == "__main__":
    main()
