"""One end-to-end row, second by second: where an end-to-end rate is lost.

    python bench/bench_timeline.py [--messages N] [--sessions S] [--size OCTETS]
                                   [--concurrency C] [--processes P] [--postfix] [--json]

``bench_peers.py``'s e2e row gives one number: the messages over the time from the first
connection to the sink's last count. This runs the same row (``smtp-source`` with sessions
kept open, ``smtp-sink`` as the destination, the relay on a trusted listener) and samples
every second: the messages the sink counted, how busy the machine's cores were, and for the
relay each of its processes' CPU (the accepting one, then each delivery process). The summary
splits the row where the client finished sending: while it sends, the relay accepts and
delivers at once; after, it only delivers what queued meanwhile. A phase with the cores well
under 100% busy waits on something other than CPU: round trips, fsyncs, the event loop's
turns (bench/README.md, the nineteenth run). ``--postfix`` runs the same for the throwaway
Postfix (machine only: its processes come and go). ``--concurrency`` is the connections per
destination, for both (20 by default, as in ``bench_peers.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import bench_peers as peers
from bench.bench_accept import children
from bench.postfix import Postfix


def _ticks(pid: int) -> int:
    """CPU ticks (user and system) ``pid`` has used; 0 once it is gone."""
    try:
        return sum(peers.cpu_ticks(pid))
    except OSError:
        return 0


def sample(
    side: str, tmp: Path, n: int, sessions: int, size: int, processes: int | None
) -> dict[str, Any]:
    """Run the row; one sample a second until the sink has ``n`` (or 300 s pass)."""
    sink = peers.Sink()
    try:
        if side == "relay":
            peers.DELIVERY_PROCESSES[0] = processes
            server: Any = peers.relay(tmp, peers._delivering(sink))
            pids = [server.proc.pid, *sorted(children(server.proc.pid))]
        else:
            server = Postfix(tmp, sink.port, hold=False, concurrency=peers.CONCURRENCY)
            pids = []
        try:
            tick = os.sysconf("SC_CLK_TCK")
            cmd = peers.smtp_source_command(server.port, n, sessions, size, keep_open=True)
            t0 = time.monotonic()
            source = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            rows, sent_at = [], None
            before, machine, counted, at = [_ticks(p) for p in pids], peers.Machine._read(), 0, t0
            while sink.count < n and time.monotonic() - t0 < 300:
                while time.monotonic() - at < 1.0 and sink.count < n:  # a second, or the end
                    time.sleep(0.02)
                    if sent_at is None and source.poll() is not None:
                        sent_at = time.monotonic() - t0
                sending = sent_at is None  # the client sent throughout this sample
                now, m, count = time.monotonic(), peers.Machine._read(), sink.count
                ticks = [_ticks(p) for p in pids]
                span = now - at
                rows.append(
                    {
                        "t": round(now - t0, 2),
                        "span": round(span, 3),
                        "delivered_per_s": round((count - counted) / span),
                        "busy": round((m[0] - machine[0]) / max(1, m[1] - machine[1]), 3),
                        "cpu": [
                            round((b - a) / tick / span, 3)
                            for a, b in zip(before, ticks, strict=True)
                        ],
                        "sending": sending,
                    }
                )
                before, machine, counted, at = ticks, m, count, now
            if source.wait(60) != 0:
                assert source.stderr is not None
                raise RuntimeError(f"smtp-source: {source.stderr.read()[:300]!r}")
        finally:
            server.stop()
    finally:
        sink.stop()
    if sink.count < n:
        raise RuntimeError(f"{side}: only {sink.count} of {n} arrived at the sink")
    total = rows[-1]["t"]
    sent = round(sent_at, 2) if sent_at is not None else total
    return {"side": side, "rows": rows, "sent_s": sent, "total_s": total, "n": n}


def _weighed(values: list[float], spans: list[float]) -> float:
    return round(sum(v * w for v, w in zip(values, spans, strict=True)) / sum(spans), 3)


def phases(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Means over the time the client sent, and after (each sample weighed by its span)."""
    out = []
    for name, sending in (("sending", True), ("after", False)):
        part = [r for r in run["rows"] if r["sending"] is sending]
        if not part:
            continue
        spans = [r["span"] for r in part]
        cpus = zip(*(r["cpu"] for r in part), strict=True)
        out.append(
            {
                "phase": name,
                "seconds": round(sum(spans), 1),
                "delivered_per_s": round(_weighed([r["delivered_per_s"] for r in part], spans)),
                "busy": _weighed([r["busy"] for r in part], spans),
                "cpu": [_weighed(list(c), spans) for c in cpus],
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--size", type=int, default=peers.KIB)
    parser.add_argument("--concurrency", type=int, default=peers.CONCURRENCY)
    parser.add_argument("--processes", type=int, help="the relay's delivery.processes")
    parser.add_argument("--postfix", action="store_true", help="the throwaway Postfix too")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if missing := peers.postfix_missing():
        sys.exit(f"bench_timeline: {missing}")  # smtp-source and smtp-sink are Postfix's
    peers.CONCURRENCY = args.concurrency
    runs = []
    for side in ("relay", "postfix") if args.postfix else ("relay",):
        with tempfile.TemporaryDirectory(prefix="bench-timeline-") as d:
            runs.append(
                sample(side, Path(d), args.messages, args.sessions, args.size, args.processes)
            )
    if args.json:
        print(json.dumps({"runs": [{**r, "phases": phases(r)} for r in runs]}))
        return
    for run in runs:
        print(
            f"{run['side']}: {run['n']} messages of {args.size} octets, {args.sessions} "
            f"sessions, {args.concurrency} connections to the sink; the client sent for "
            f"{run['sent_s']:.1f} s, the sink had all after {run['total_s']:.1f} s "
            f"({run['n'] / run['total_s']:.0f} msgs/s)"
        )
        names = ["accepting", *(f"delivery {i + 1}" for i in range(len(run["rows"][0]["cpu"]) - 1))]
        who = "".join(f" {name:>10}" for name in names) if run["side"] == "relay" else ""
        print(f"{'s':>5} {'sending':>7} {'delivered/s':>11} {'busy':>5}{who}")
        for r in run["rows"]:
            cpu = "".join(f" {100 * c:>9.0f}%" for c in r["cpu"])
            print(
                f"{r['t']:>5.1f} {'yes' if r['sending'] else '':>7} {r['delivered_per_s']:>11} "
                f"{100 * r['busy']:>4.0f}%{cpu}"
            )
        for p in phases(run):
            cpu = "".join(f" {100 * c:>9.0f}%" for c in p["cpu"])
            print(
                f"{p['phase']:>9} ({p['seconds']:>4} s): {p['delivered_per_s']:>5} delivered/s, "
                f"cores {100 * p['busy']:.0f}% busy{cpu}"
            )
        print()


if __name__ == "__main__":
    main()
