"""A kept-open session's cycle, command by command: where a session's time goes.

    python bench/bench_cycle.py [--messages N] [--sessions S] [--size OCTETS] [--rounds R]
                                [--json]

``bench_peers.py``'s accept rows give a rate, which ``smtp-source`` reports alone. With the
sessions kept open and no pipelining (as ``smtp-source`` sends), each session goes round
MAIL, RCPT, DATA and the content one command at a time, so by Little's law a session's cycle
is S / rate, and the rate is whatever makes that cycle long. This client does what
``smtp-source -d`` does (EHLO once, then the four steps for every message, S sessions on one
thread) and times each step from its write to its reply: MAIL, RCPT, DATA (to the 354) and
the content (to the 250: the end of data, which waits for the journal's fsync on the relay
and for the queue file's on Postfix). The four means add up to the cycle (the client's own
turn is inside them: one thread reads every session's replies). For the relay the end of
data is also read on its own clock (end of data read to 250 written, from ``/metrics``).
Against the relay on a trusted listener with delivery off (the accept row's setup) and the
throwaway Postfix when it is installed (``bench/postfix.py``), interleaved, ``--rounds``
rounds of each; the table gives the medians.

Measures latency, so it is only fair side by side: the client is Python, slower than
``smtp-source``, and both servers share the machine with it.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import bench_peers as peers
from bench.bench_accept import _message, _pct, read_relay_clock
from bench.postfix import Postfix

STEPS: Final = ("mail", "rcpt", "data", "end")
EXPECTED: Final = (b"2", b"2", b"3", b"2")  # each step's reply: 250, 250, 354, 250
REPLY_WAIT: Final = 60.0


class _Session:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.step = 0
        self.sent_at = 0


def _greeted(port: int) -> socket.socket:
    """A connection past the greeting and EHLO, then non-blocking."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        with sock.makefile("rb") as reader:
            _expect(reader.readline(), "the greeting")
            sock.sendall(b"EHLO cycle.test\r\n")
            while (line := reader.readline())[3:4] == b"-":
                pass
            _expect(line, "EHLO")
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _expect(line: bytes, what: str, first: bytes = b"2") -> None:
    if line[:1] != first:
        raise RuntimeError(f"{what} refused: {line[:200]!r}")


def cycle(
    port: int, messages: int, sessions: int, size: int, sender: str = peers.SENDER
) -> dict[str, Any]:
    """Send ``messages`` over ``sessions`` kept-open sessions; the rate and, for each step,
    the seconds from each write to its reply. A refusal ends the run (RuntimeError): a
    refused message would be measured as a fast one."""
    commands = [
        f"MAIL FROM:<{sender}>\r\n".encode(),
        f"RCPT TO:<{peers.RCPT}>\r\n".encode(),
        b"DATA\r\n",
        _message(size) + b".\r\n",  # the bench's member's message, then the end
    ]
    live: list[_Session] = []
    try:
        for _ in range(min(sessions, messages)):
            live.append(_Session(_greeted(port)))
        return _run(live, commands, messages)
    finally:
        for s in live:
            s.sock.close()


def _run(live: list[_Session], commands: list[bytes], messages: int) -> dict[str, Any]:
    taken: list[list[float]] = [[] for _ in STEPS]
    started = 0

    def send(s: _Session) -> None:
        s.sent_at = time.perf_counter_ns()
        s.sock.sendall(commands[s.step])  # a few KiB at most: the kernel takes it at once

    with selectors.DefaultSelector() as selector:
        t0 = time.perf_counter()
        for s in live:
            selector.register(s.sock, selectors.EVENT_READ, s)
            started += 1
            send(s)
        open_ = len(live)
        while open_:
            ready = selector.select(timeout=REPLY_WAIT)
            if not ready:
                raise RuntimeError(f"no reply in {REPLY_WAIT:.0f} s")
            for key, _ in ready:
                s = key.data
                data = s.sock.recv(65536)
                if not data:
                    raise RuntimeError("the server closed a session")
                s.buffer += data
                while b"\r\n" in s.buffer:
                    line, _, s.buffer = s.buffer.partition(b"\r\n")
                    taken[s.step].append((time.perf_counter_ns() - s.sent_at) / 1e9)
                    _expect(line, STEPS[s.step].upper(), EXPECTED[s.step])
                    s.step = (s.step + 1) % len(STEPS)
                    if s.step == 0 and started == messages:
                        selector.unregister(s.sock)
                        s.sock.sendall(b"QUIT\r\n")
                        open_ -= 1
                        break
                    if s.step == 0:
                        started += 1
                    send(s)
        took = time.perf_counter() - t0
    return {"rate": messages / took, "sessions": len(live), "taken": taken}


def summary(side: str, run: dict[str, Any]) -> dict[str, Any]:
    """One row: the rate, each step's mean and p99 in milliseconds, and the cycle (sessions
    / rate; the four means add up to it, the client's own turn being within them)."""
    row: dict[str, Any] = {"side": side, "rate": round(run["rate"])}
    for step, seconds in zip(STEPS, run["taken"], strict=True):
        row[f"{step}_ms"] = round(1000 * statistics.fmean(seconds), 3)
        row[f"{step}_p99_ms"] = round(_pct(seconds, 0.99), 3)
    row["cycle_ms"] = round(1000 * run["sessions"] / run["rate"], 3)
    return row


def medians(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"side": rows[0]["side"], "rounds": len(rows)}
    for key in rows[0]:
        if key != "side":
            out[key] = round(statistics.median(r[key] for r in rows), 3)
    return out


def run_side(
    side: str, messages: int, sessions: int, size: int, tmp: Path | None = None
) -> dict[str, Any]:
    """One round against one server, in ``tmp`` (a new temporary directory by default)."""
    tmp = tmp or Path(tempfile.mkdtemp(prefix=f"cycle-{side}-"))
    if side == "relay":
        server: Any = peers.relay(tmp, "enabled = false\n", http=True)
        try:
            row = summary(side, cycle(server.port, messages, sessions, size))
            clock = read_relay_clock((tmp / "relay.out").read_text(), messages)
        finally:
            server.stop()
        if clock is None:
            raise RuntimeError("the relay served no end-of-data figures on /metrics")
        row["relay_end_ms"] = round(clock[1], 3)
        return row
    sink = peers.Sink()
    try:
        peer = Postfix(tmp, sink.port, hold=True, concurrency=peers.CONCURRENCY)
        try:
            return summary(side, cycle(peer.port, messages, sessions, size))
        finally:
            peer.stop()
    finally:
        sink.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--size", type=int, default=peers.KIB)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    missing = peers.postfix_missing()
    sides = ["relay"] + ([] if missing else ["postfix"])
    if missing:
        print(f"Postfix rows skipped: {missing}", file=sys.stderr)
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    for _ in range(args.rounds):
        for side in sides:
            runs[side].append(run_side(side, args.messages, args.sessions, args.size))
    table = [medians(rows) for rows in runs.values()]
    if args.json:
        print(json.dumps({"rows": table, "load": peers._load()}, indent=2))
        return
    print(
        f"{args.sessions} sessions kept open, {args.size} octets, {args.messages} messages, "
        f"medians of {args.rounds} (ms from each write to its reply; load {peers._load():.1f})"
    )
    print(
        f"{'server':8} {'msgs/s':>7} {'MAIL':>6} {'RCPT':>6} {'DATA':>6} {'end':>6}"
        f" {'end p99':>8} {'cycle':>6}  end on the relay's clock"
    )
    for r in table:
        own = f"{r['relay_end_ms']:.3f}" if "relay_end_ms" in r else "-"
        print(
            f"{r['side']:8} {r['rate']:>7.0f} {r['mail_ms']:>6.3f} {r['rcpt_ms']:>6.3f}"
            f" {r['data_ms']:>6.3f} {r['end_ms']:>6.3f} {r['end_p99_ms']:>8.3f}"
            f" {r['cycle_ms']:>6.3f}  {own}"
        )


if __name__ == "__main__":
    main()
