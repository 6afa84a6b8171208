"""A child process for the kill -9 test: appends forever with group commit on a real directory
and prints ``ack <id>`` for each append acknowledged, flushing each line. Stops by itself after
``--seconds`` so a test that forgets it cannot leave it running."""

from __future__ import annotations

import argparse
import sys

import trio

from journal import open_journal


async def main(directory: str, base: int, appenders: int, seconds: float) -> None:
    counter = iter(range(base, base + 10_000_000))
    out = sys.stdout
    async with open_journal(directory, segment_size=256 * 1024) as journal:
        print(f"ready {journal.recovery.records}", file=out, flush=True)

        async def appender() -> None:
            for i in counter:
                await journal.append(1, b"id=%d|" % i + b"k" * (i % 700))
                out.write(f"ack {i}\n")
                out.flush()

        with trio.move_on_after(seconds):
            async with trio.open_nursery() as nursery:
                for _ in range(appenders):
                    nursery.start_soon(appender)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("directory")
    p.add_argument("--base", type=int, required=True)
    p.add_argument("--appenders", type=int, default=16)
    p.add_argument("--seconds", type=float, default=20.0)
    a = p.parse_args()
    trio.run(main, a.directory, a.base, a.appenders, a.seconds)
