"""Delivery throughput: accept -> sign (three DKIM signatures) -> deliver to a local sink.

    python bench/bench_delivery.py [--quick] [--json] [--sessions 1,10,50] [--seconds S]
                                   [--restart N]

The relay runs as its own process with implicit TLS and AUTH on its listener and
``delivery.smarthost`` pointing at the sink (bench/sink.py: aiosmtpd in another process).
The load generator (this process) opens N submission sessions and sends messages back to
back, each with its own Subject; it notes when each got its 250. The sink notes when each
arrived. Per run it prints:

* delivered msgs/s: messages answered 250 during the load, over the time from the start to
  the last of them arriving at the sink;
* time from our 250 to the sink's arrival, p50/p99 (both clocks are this host's);
* CPU per message of the relay process (from /proc), split as: accept (a run of the same
  load with delivery off), sign (three signatures, timed here on the same message), deliver
  (the rest);
* restart: N messages queued in the journal (written directly), then the relay started:
  seconds until the first arrives at the sink, and the relay's resident memory then.

Postfix, where installed, is compared by hand (bench/README.md); it is not installed here.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
import trustme

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atmosrelay.accounts import dkim_keys
from atmosrelay.message.dkim import Signer, SigningKey
from atmosrelay.queue.records import Accepted, Recipient, RecordType, encode_accepted, new_queue_id
from bench.bench_accept import (
    DID,
    SIZES,
    Server,
    _ours,
    _pct,
    _session,
    children,
    tree_cpu_seconds,
)
from journal import Log, OsFS

ROOT = Path(__file__).resolve().parents[1]


def _body(size: int, subject: str) -> bytes:
    head = (
        f"From: bench@example.org\r\nTo: sink@example.net\r\nSubject: {subject}\r\n"
        "X-Atmos-Category: receipt\r\n\r\n"
    ).encode()
    line = b"y" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


class Sink:
    def __init__(self, tmp: Path) -> None:
        self.out = tmp / "arrivals.json"
        self.server = Server(
            [sys.executable, str(ROOT / "bench" / "sink.py"), str(self.out)],
            tmp / "sink.out",
            "listening on",
            r"listening on (\d+)",
        )
        self.port = self.server.port

    def first(self) -> float | None:
        m = re.search(r"first (\d+\.\d+)", self.server.out.read_text())
        return float(m.group(1)) if m else None

    def count(self) -> int:
        counts = re.findall(r"count (\d+)", self.server.out.read_text())
        return int(counts[-1]) if counts else 0

    def stop(self) -> dict[str, list[float]]:
        self.server.stop()
        return dict(json.loads(self.out.read_text()))


async def _drive(
    port: int, ctx: ssl.SSLContext, password: str, sessions: int, size: int, seconds: float
) -> dict[str, float]:
    acked: dict[str, float] = {}
    deadline = trio.current_time() + seconds
    async with trio.open_nursery() as nursery:
        for i in range(sessions):
            tag = f"s{i}"
            nursery.start_soon(
                _session,
                port,
                ctx,
                password,
                lambda n, tag=tag: _body(size, f"{tag}-{n}"),
                deadline,
                lambda n, _, tag=tag: acked.__setitem__(f"{tag}-{n}", time.time()),
            )
    return acked


def _sign_ms(size: int) -> float:
    rsa, ed, op = dkim_keys.generate_rsa(), dkim_keys.generate_ed25519(), dkim_keys.generate_rsa()
    signer = Signer(
        [
            SigningKey("example.org", "s1r", "rsa", rsa.private),
            SigningKey("example.org", "s1e", "ed25519", ed.private),
            SigningKey("relay.bench", "op", "rsa", op.private),
        ]
    )
    body = _body(size, "sign")
    n = 200
    t = time.process_time()
    for _ in range(n):
        signer.sign(body)
    return (time.process_time() - t) / n * 1000


def _run(sessions: int, size: int, seconds: float, ca: trustme.CA, deliver: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(dir=ROOT) as d:
        tmp = Path(d)
        cert = tmp / "tls.pem"
        ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert))
        sink = Sink(tmp)
        delivery = (
            f'smarthost = "127.0.0.1:{sink.port}"\nconcurrency = 16\n'
            if deliver
            else "enabled = false\n"
        )
        server, password = _ours(tmp, cert, delivery)
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        try:
            tree = [server.proc.pid, *children(server.proc.pid)]
            cpu0 = tree_cpu_seconds(tree)
            start = time.time()
            acked = trio.run(_drive, server.port, ctx, password, sessions, size, seconds)
            limit = time.monotonic() + 120
            arrivals: dict[str, list[float]] = {}
            while deliver and sink.count() < len(acked) and time.monotonic() < limit:
                time.sleep(0.1)
            cpu = tree_cpu_seconds(tree) - cpu0
        finally:
            server.stop()
            arrivals = sink.stop()
    n = len(acked)
    result: dict[str, Any] = {"sessions": sessions, "messages": n, "cpu_ms": cpu / max(1, n) * 1e3}
    if deliver:
        got = [arrivals[s][0] for s in acked if s in arrivals]
        last = max(got) if got else start
        latencies = [arrivals[s][0] - acked[s] for s in acked if s in arrivals]
        result.update(
            delivered=len(got),
            duplicates=sum(len(v) - 1 for v in arrivals.values()),
            per_s=len(got) / (last - start),
            p50_ms=_pct(latencies, 0.5),
            p99_ms=_pct(latencies, 0.99),
        )
    else:
        result["per_s"] = n / seconds
    return result


def bench_record(i: int, body: bytes, now: float) -> Accepted:
    """The ACCEPTED record of the ``i``-th bench message of ``body``: one recipient, a
    receipt, a member's."""
    return Accepted(
        id=new_queue_id(now),
        accepted_at=now,
        did=DID,
        sender="bench@example.org",
        recipients=(Recipient(f"r{i}@example.net"),),
        ret=None,
        envid=None,
        category="receipt",
        bulk=False,
        tags=(),
        metadata={},
        client={},
        size=len(body),
    )


def queue_in_journal(directory: Path, n: int, body: bytes) -> None:
    """``n`` ACCEPTED records of ``body`` (one recipient each) written straight to a journal,
    as a relay stopped with that many messages queued would leave it."""
    log, _ = Log.open(OsFS(), str(directory))
    now = time.time()
    batch = []
    for i in range(n):
        record = bench_record(i, body, now)
        batch.append((int(RecordType.ACCEPTED), encode_accepted(record, body)))
        if len(batch) == 1000:
            log.write_batch(batch)
            batch = []
    if batch:
        log.write_batch(batch)
    log.close()


def restart(n: int, ca: trustme.CA) -> dict[str, Any]:
    """N queued messages of 1 KiB in the journal; start the relay; time to the first
    delivery, and resident memory then."""
    with tempfile.TemporaryDirectory(dir=ROOT) as d:
        tmp = Path(d)
        cert = tmp / "tls.pem"
        ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert))
        queue_in_journal(tmp / "var" / "journal", n, _body(1024, "queued"))
        # a restart, not a first start: the operator key exists already
        dkim_keys.ensure_operator_key(tmp / "var" / "dkim", "atmosrelay.localhost")
        sink = Sink(tmp)
        t0 = time.time()
        server, _ = _ours(tmp, cert, f'smarthost = "127.0.0.1:{sink.port}"\nconcurrency = 16\n')
        try:
            deadline = time.monotonic() + 60
            while sink.first() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            first = sink.first()
            rss = _rss_mb(server.proc.pid)
        finally:
            server.stop()
            sink.stop()
    return {"queued": n, "first_delivery_s": (first - t0) if first else None, "rss_mb": rss}


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 s per run instead of 5")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--sessions", default="1,10,50")
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--restart", type=int, default=100_000, help="0 skips it")
    args = parser.parse_args()
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    ca = trustme.CA()
    rows = []
    for label, size in SIZES.items():
        sign = _sign_ms(size)
        for sessions in (int(x) for x in args.sessions.split(",")):
            accept = _run(sessions, size, seconds, ca, deliver=False)
            full = _run(sessions, size, seconds, ca, deliver=True)
            full.update(
                size=label,
                accept_cpu_ms=accept["cpu_ms"],
                sign_cpu_ms=sign,
                deliver_cpu_ms=full["cpu_ms"] - accept["cpu_ms"] - sign,
            )
            rows.append(full)
            if not args.json:
                print(
                    f"{label:>7} {sessions:>3} sessions: {full['per_s']:7.1f} delivered/s "
                    f"({full['delivered']}/{full['messages']}, {full['duplicates']} dup), "
                    f"250->sink p50 {full['p50_ms']:.0f} ms p99 {full['p99_ms']:.0f} ms; "
                    f"CPU/msg {full['cpu_ms']:.2f} ms = accept {accept['cpu_ms']:.2f} + "
                    f"sign {sign:.2f} + deliver {full['deliver_cpu_ms']:.2f}",
                    flush=True,
                )
    restarted = restart(args.restart, ca) if args.restart else None
    if args.json:
        print(json.dumps({"runs": rows, "restart": restarted, "machine": platform.platform()}))
    elif restarted:
        print(
            f"restart with {restarted['queued']} queued: first delivery after "
            f"{restarted['first_delivery_s']:.2f} s, RSS {restarted['rss_mb']:.0f} MB"
        )


if __name__ == "__main__":
    main()
