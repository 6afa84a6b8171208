"""Journal append throughput and latency on a real directory.

    python bench/bench_journal.py [--quick] [--json] [--dir DIR] [--seconds S]

For 1, 10 and 100 concurrent trio appenders and 1 KiB and 100 KiB records, it measures:

* ``group``: the journal as the relay uses it (group commit through the owner thread);
* ``per-append``: the same journal core, but every append written and fsynced on its own
  (a trio lock around ``to_thread``), the naive way;

and two baselines: ``plain loop``, a Python ``os.write`` + ``fdatasync`` loop with no event
loop at all (the ceiling for one appender), and the raw trio <-> thread wake-up round trip
that any fsync kept off the event loop pays once per batch.

Columns: durable appends/s, fsyncs per append, p50 and p99 append latency (ms). ``--json``
prints the same as one JSON object. Runs are bounded by --seconds each (default 3, --quick 1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from journal import Log, OsFS, open_journal

SIZES = {"1KiB": 1024, "100KiB": 100 * 1024}
CONCURRENCY = (1, 10, 100)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _drive(
    appenders: int, seconds: float, append: Callable[[], Awaitable[object]]
) -> tuple[list[float], float]:
    """Run ``appenders`` tasks calling ``append`` until ``seconds`` pass; return each call's
    latency and the elapsed time."""
    latencies: list[float] = []
    start = time.perf_counter()
    deadline = start + seconds

    async def appender() -> None:
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            await append()
            latencies.append(time.perf_counter() - t)

    async with trio.open_nursery() as nursery:
        for _ in range(appenders):
            nursery.start_soon(appender)
    return latencies, time.perf_counter() - start


async def _group(directory: str, appenders: int, size: int, seconds: float) -> dict[str, float]:
    payload = os.urandom(size)
    async with open_journal(directory) as journal:
        syncs0 = journal.syncs
        latencies, elapsed = await _drive(appenders, seconds, lambda: journal.append(1, payload))
        syncs = journal.syncs - syncs0
    return _row(latencies, syncs, elapsed)


async def _per_append(
    directory: str, appenders: int, size: int, seconds: float
) -> dict[str, float]:
    payload = os.urandom(size)
    log, _ = await trio.to_thread.run_sync(lambda: Log.open(OsFS(), directory))
    lock = trio.Lock()

    async def append_alone() -> None:
        async with lock:
            await trio.to_thread.run_sync(log.write_batch, [(1, payload)])

    syncs0 = log.syncs
    latencies, elapsed = await _drive(appenders, seconds, append_alone)
    syncs = log.syncs - syncs0
    log.close()
    return _row(latencies, syncs, elapsed)


def _row(latencies: list[float], syncs: int, elapsed: float) -> dict[str, float]:
    n = len(latencies)
    return {
        "appends": n,
        "appends_per_s": n / elapsed,
        "fsyncs_per_append": syncs / n if n else float("nan"),
        "p50_ms": _pct(latencies, 0.50) * 1000,
        "p99_ms": _pct(latencies, 0.99) * 1000,
    }


def _plain_loop(directory: str, size: int, seconds: float) -> dict[str, float]:
    payload = os.urandom(size)
    fd = os.open(os.path.join(directory, "plain"), os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
    latencies = []
    start = time.perf_counter()
    try:
        while time.perf_counter() - start < seconds:
            t = time.perf_counter()
            os.write(fd, payload)
            os.fdatasync(fd)
            latencies.append(time.perf_counter() - t)
    finally:
        os.close(fd)
    return _row(latencies, len(latencies), time.perf_counter() - start)


async def _handoff_rtt(rounds: int = 3000) -> float:
    """Median trio -> thread -> trio wake-up round trip, in microseconds."""
    token = trio.lowlevel.current_trio_token()
    go = threading.Semaphore(0)
    box: list[trio.Event] = []

    def worker() -> None:
        while True:
            go.acquire()
            if not box:
                return
            token.run_sync_soon(box.pop().set)

    th = threading.Thread(target=worker, daemon=True)
    th.start()
    samples = []
    for _ in range(rounds):
        ev = trio.Event()
        box.append(ev)
        t = time.perf_counter()
        go.release()
        await ev.wait()
        samples.append(time.perf_counter() - t)
    go.release()
    th.join()
    return statistics.median(samples) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 s per run instead of 3")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--dir", help="directory on the disk to measure (default: a temp dir here)")
    args = parser.parse_args()
    seconds = args.seconds or (1.0 if args.quick else 3.0)
    base = Path(args.dir or tempfile.mkdtemp(prefix="bench-journal-", dir="."))
    base.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, object]] = []
    try:
        for label, size in SIZES.items():
            d = tempfile.mkdtemp(dir=base)
            results.append(
                {
                    "mode": "plain loop",
                    "appenders": 1,
                    "size": label,
                    **_plain_loop(d, size, seconds),
                }
            )
            for appenders in CONCURRENCY:
                for mode, fn in (("group", _group), ("per-append", _per_append)):
                    d = tempfile.mkdtemp(dir=base)
                    row = trio.run(fn, d, appenders, size, seconds)
                    results.append({"mode": mode, "appenders": appenders, "size": label, **row})
        rtt = trio.run(_handoff_rtt)
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    machine = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "seconds_per_run": seconds,
    }
    if args.json:
        print(json.dumps({"machine": machine, "handoff_rtt_us": rtt, "results": results}, indent=2))
        return
    print(
        f"journal append bench: {machine['platform']}, {machine['cpus']} CPUs, "
        f"Python {machine['python']}, {seconds:g} s per run"
    )
    print(
        f"{'mode':<11}{'size':>7}{'tasks':>6}{'appends/s':>11}{'fsync/app':>10}"
        f"{'p50 ms':>9}{'p99 ms':>9}"
    )
    for r in results:
        print(
            f"{r['mode']:<11}{r['size']:>7}{r['appenders']:>6}{r['appends_per_s']:>11.0f}"
            f"{r['fsyncs_per_append']:>10.3f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
        )
    print(f"trio<->thread wake-up round trip (median): {rtt:.0f} us")
    for label in SIZES:
        plain = next(r for r in results if r["mode"] == "plain loop" and r["size"] == label)
        one = next(
            r
            for r in results
            if r["mode"] == "group" and r["size"] == label and r["appenders"] == 1
        )
        ratio = float(one["appends_per_s"]) / float(plain["appends_per_s"])  # type: ignore[arg-type]
        print(f"one appender, {label}: {ratio:.0%} of the plain write+fdatasync loop")


if __name__ == "__main__":
    main()
