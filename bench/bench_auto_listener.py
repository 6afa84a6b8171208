"""What the ``auto`` listener costs: time from connect to the greeting (a plain client) and
to a finished TLS handshake (an implicit-TLS client), on an ``auto`` port beside a
``starttls`` and an ``implicit`` one of the same relay.

    python bench/bench_auto_listener.py [--rounds N] [--window SECONDS] [--json]

Prints one row per (listener, client) with the median and p95 in milliseconds. A plain
client on an ``auto`` port waits the whole window for its greeting (the relay cannot tell a
client that will start TLS from one that waits for the greeting before it has waited); a
TLS client pays only the peek.
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio
import trustme

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.relay.harness import running_relay  # the tests' real relay


def greeting_ms(port: int) -> float:
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        assert sock.recv(512).startswith(b"220")
    return (time.perf_counter() - started) * 1000


def handshake_ms(port: int, ctx: ssl.SSLContext) -> float:
    started = time.perf_counter()
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.recv(512).startswith(b"220")
    return (time.perf_counter() - started) * 1000


async def measure(rounds: int, window: float) -> list[dict[str, object]]:
    listeners = '["127.0.0.1:0 auto", "127.0.0.1:0 starttls", "127.0.0.1:0 implicit"]'
    extra = f"[smtp]\nlisteners = {listeners}\nauto_tls_window = {window}\n"
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        ca = trustme.CA()
        async with running_relay(Path(tmp), extra=extra, ca=ca) as relay:
            ctx = ssl.create_default_context()
            ca.configure_trust(ctx)
            rows = []
            for listener, client, fn in (
                ("starttls", "plain", lambda p: greeting_ms(p)),
                ("auto", "plain", lambda p: greeting_ms(p)),
                ("implicit", "tls", lambda p: handshake_ms(p, ctx)),
                ("auto", "tls", lambda p: handshake_ms(p, ctx)),
            ):
                port = relay.handle.port(listener)
                samples = [await trio.to_thread.run_sync(fn, port) for _ in range(rounds)]
                samples.sort()
                rows.append(
                    {
                        "listener": listener,
                        "client": client,
                        "median_ms": round(statistics.median(samples), 2),
                        "p95_ms": round(samples[int(0.95 * (len(samples) - 1))], 2),
                    }
                )
            return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--window", type=float, default=0.2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = trio.run(measure, args.rounds, args.window)
    if args.json:
        print(json.dumps({"window_s": args.window, "rows": rows}))
        return
    print(f"auto_tls_window = {args.window:g} s, {args.rounds} connections each")
    print(f"{'listener':10} {'client':6} {'median ms':>10} {'p95 ms':>8}")
    for r in rows:
        print(f"{r['listener']:10} {r['client']:6} {r['median_ms']:>10} {r['p95_ms']:>8}")


if __name__ == "__main__":
    main()
