"""What acceptance on both cores could give at most: K independent relays against one, and
against Postfix, in one interleaved run.

    python bench/bench_shards.py [--shards K] [--rounds N] [--messages N] [--json]

The relay accepts in one process. The design that would spread acceptance over the cores is
shards: K accepting processes on the same listeners (``SO_REUSEPORT``), each with its own
journal. Before building it, this measures its ceiling: K relays that share nothing (their
own data directories, ports and journals), each sent 1/K of the sessions and of the mail by
its own ``smtp-source``, their rates summed. A real sharded relay would add coordination
(a member's hourly cap across shards, one control socket, ``queue`` commands reading every
journal), so it could only do worse; K relays this way are **not** a supported setup.

Rows: 1 KiB, one message per connection (smtp-source's default) and sessions kept open, at
10 and 50 sessions in all; the relay with delivery off, Postfix holding what it accepts (as
``bench_peers.py``'s accept rows). Each row runs ``--rounds`` times (default 3) in rotating
order; the table gives medians and each side's ratio to Postfix.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_accept import Server
from bench.bench_peers import (
    KIB,
    postfix_missing,
    relay,
    run_accept,
    smtp_source_command,
)


def relays(k: int, n: int, sessions: int, keep: bool) -> float:
    """msgs/s of ``k`` independent relays, each sent n/k messages over sessions/k sessions
    by its own smtp-source, all at once; from the first start to the last finish."""
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as d:
        servers: list[Server] = []
        try:
            for i in range(k):
                (Path(d) / str(i)).mkdir()
                servers.append(relay(Path(d) / str(i), "enabled = false\n"))
            start = time.perf_counter()
            clients = [
                subprocess.Popen(
                    smtp_source_command(s.port, n // k, sessions // k, KIB, keep),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                for s in servers
            ]
            for client in clients:
                out, _ = client.communicate(timeout=600)
                if client.returncode != 0 or out.strip():
                    raise RuntimeError(f"smtp-source: {client.returncode} {out.strip()[:500]}")
            took = time.perf_counter() - start
        finally:
            for s in servers:
                s.stop()
    return (n // k) * k / took


def postfix(n: int, sessions: int, keep: bool) -> float:
    """bench_peers.py's accept row, Postfix's side: holding what it accepts."""
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as d:
        rate, _, _ = run_accept("peer", Path(d), n, sessions, KIB, keep)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=2, help="independent relays (K)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=5000, help="messages a row")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.shards < 2:
        parser.error("--shards: at least 2")
    missing = postfix_missing()
    if missing:
        print(f"bench_shards: no Postfix rows: {missing} (see bench_peers.py)")
        return
    k = args.shards
    sides = {
        "relay": lambda n, s, keep: relays(1, n, s, keep),
        f"{k} relays": lambda n, s, keep: relays(k, n, s, keep),
        "Postfix": postfix,
    }
    rows = [(keep, sessions) for keep in (False, True) for sessions in (10, 50)]
    results: dict[tuple[bool, int], dict[str, list[float]]] = {
        row: {side: [] for side in sides} for row in rows
    }
    names = list(sides)
    for r in range(args.rounds):
        for keep, sessions in rows:
            order = names[r % len(names) :] + names[: r % len(names)]
            for side in order:
                rate = sides[side](args.messages, sessions, keep)
                results[(keep, sessions)][side].append(rate)
                print(
                    f"  round {r + 1}: {'kept' if keep else 'perconn':<7} {sessions:>3} "
                    f"sessions: {side:<9} {rate:8.0f} msgs/s",
                    file=sys.stderr,
                    flush=True,
                )
    table = []
    for keep, sessions in rows:
        median = {side: statistics.median(v) for side, v in results[(keep, sessions)].items()}
        table.append(
            {
                "work": "accept" if keep else "perconn",
                "sessions": sessions,
                "shards": k,
                **{side: round(v, 1) for side, v in median.items()},
                "ratio_one": round(median["relay"] / median["Postfix"], 2),
                "ratio_shards": round(median[f"{k} relays"] / median["Postfix"], 2),
            }
        )
    if args.json:
        print(json.dumps({"rows": table}))
        return
    print(
        f"{'work':<8} {'sessions':>8} {'relay':>8} {f'{k} relays':>9} {'Postfix':>8} "
        f"{'ratio':>6} {f'{k} ratio':>8}"
    )
    for t in table:
        print(
            f"{t['work']:<8} {t['sessions']:>8} {t['relay']:>8.0f} {t[f'{k} relays']:>9.0f} "
            f"{t['Postfix']:>8.0f} {t['ratio_one']:>5.2f}x {t['ratio_shards']:>7.2f}x"
        )


if __name__ == "__main__":
    main()
