"""API key verification: cold (bcrypt) and warm (cache) rates, and event-loop stalls.

    python bench/bench_auth.py [--json] [--cost N] [--warm-seconds S]

Cold: 50 verifications of distinct keys at once, each a bcrypt in a worker thread (cost 12
by default, as the relay). Warm: the same key over and over, answered from the cache. While the
cold run goes, a ticker task sleeps 1 ms at a time and records how late it wakes: the largest
lateness is the worst event-loop stall a connection would have seen.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atmosrelay.accounts import api_keys
from atmosrelay.accounts.api_keys import AuthSettings, KeyChecker, Verified
from atmosrelay.accounts.store import AsyncStore, Store

DID = "did:plc:abcdefghijklmnopqrstuvwx"
COLD = 50


async def run(cost: int, warm_seconds: float, directory: str) -> dict[str, float]:
    store = Store(Path(directory) / "bench.sqlite3")
    store.add_member(DID, "bench.test")
    keys = [api_keys.issue(store, DID, cost=cost) for _ in range(COLD)]
    checker = KeyChecker(AsyncStore(store), AuthSettings(bcrypt_cost=cost))
    stalls: list[float] = []
    done = trio.Event()

    async def ticker() -> None:
        while not done.is_set():
            t = time.perf_counter()
            await trio.sleep(0.001)
            stalls.append(time.perf_counter() - t - 0.001)

    async def one(secret: str, ip: str) -> None:
        assert isinstance(await checker.verify(DID, secret, ip), Verified)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.sleep(0.05)
        start = time.perf_counter()
        async with trio.open_nursery() as cold:
            for i, key in enumerate(keys):
                cold.start_soon(one, key.secret, f"192.0.2.{i}")
        cold_elapsed = time.perf_counter() - start
        done.set()

    warm = 0
    start = time.perf_counter()
    secret = keys[0].secret
    while time.perf_counter() - start < warm_seconds:
        for _ in range(1000):
            result = await checker.verify(DID, secret, "192.0.2.1")
        assert isinstance(result, Verified)
        assert result.cached
        warm += 1000
    warm_elapsed = time.perf_counter() - start
    store.close()
    return {
        "bcrypt_cost": cost,
        "cold_per_s": COLD / cold_elapsed,
        "cold_seconds_for_50": cold_elapsed,
        "warm_per_s": warm / warm_elapsed,
        "max_stall_ms": max(stalls) * 1000,
        "p99_stall_ms": sorted(stalls)[int(0.99 * len(stalls))] * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--cost", type=int, default=12)
    parser.add_argument("--warm-seconds", type=float, default=2.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        r = trio.run(run, args.cost, args.warm_seconds, directory)
    machine = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }
    if args.json:
        print(json.dumps({"machine": machine, **r}, indent=2))
        return
    print(f"auth bench: {machine['platform']}, {machine['cpus']} CPUs, Python {machine['python']}")
    print(
        f"cold (bcrypt cost {args.cost}), 50 at once: {r['cold_per_s']:.1f} verifications/s "
        f"({r['cold_seconds_for_50']:.2f} s for 50)"
    )
    print(f"warm (cache): {r['warm_per_s']:.0f} verifications/s")
    print(
        f"event-loop stall during the cold run: max {r['max_stall_ms']:.2f} ms, "
        f"p99 {r['p99_stall_ms']:.2f} ms"
    )


if __name__ == "__main__":
    main()
