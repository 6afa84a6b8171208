"""The local sink for bench_delivery: aiosmtpd (plain SMTP, PIPELINING) that accepts
everything, notes when each message arrived by its Subject, and on SIGTERM writes those
times as JSON.

    python bench/sink.py OUT_JSON      prints "listening on PORT", then "first TIME" once,
                                       then "count N" every 0.25 s while N changes
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time

from aiosmtpd.smtp import SMTP


class Recorder:
    def __init__(self) -> None:
        self.arrivals: dict[str, list[float]] = {}

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        now = time.time()
        data: bytes = envelope.original_content  # type: ignore[attr-defined]
        head = data.split(b"\r\n\r\n", 1)[0]
        subject = next(
            (line[9:].decode() for line in head.split(b"\r\n") if line.startswith(b"Subject: ")),
            "",
        )
        if not self.arrivals:
            print(f"first {now:.6f}", flush=True)
        self.arrivals.setdefault(subject, []).append(now)
        return "250 2.0.0 sunk"


async def main(out: str) -> None:
    recorder = Recorder()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(recorder, hostname="sink.bench", decode_data=False), "127.0.0.1", 0
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print(f"listening on {server.sockets[0].getsockname()[1]}", flush=True)
    reported = 0
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), 0.25)
        except TimeoutError:
            count = sum(len(v) for v in recorder.arrivals.values())
            if count != reported:
                print(f"count {count}", flush=True)
                reported = count
    server.close()
    await loop.run_in_executor(None, _write, out, recorder.arrivals)


def _write(out: str, arrivals: dict[str, list[float]]) -> None:
    with open(out, "w") as f:
        json.dump(arrivals, f)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
