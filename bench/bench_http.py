"""HTTP submission against SMTP submission, side by side, on one relay process.

    python bench/bench_http.py [--clients 1,10,50] [--seconds S] [--rounds R] [--json]

One relay (``atmosrelay serve``, delivery off, a steady-state member far from its limits, so
the policy runs on every message) listens on an implicit-TLS SMTP port and a plain HTTP
port. For each client count, alternating within each round (and which goes first), this
process drives:

- **http**: N keep-alive connections, each sending ``POST /v1/send`` back to back (JSON
  with a 1 KiB text body; a Bearer key, verified once then cached by the relay, as AUTH is);
  the latency is from the request's last byte to the response;
- **smtp**: N sessions over implicit TLS with AUTH once, then MAIL/RCPT/DATA (pipelined) of
  a 1 KiB message back to back (bench/bench_accept.py's client); the latency is from the
  end of data to the 250.

Every 200 and every 250 means fsynced. It prints requests/s, p50/p99 latency, the relay's
fsyncs per message (from its journal totals, per row) and its CPU per message; the
median of the rounds per row. The client is raw HTTP/1.1 on trio in this process (a full
client library would cost more CPU than the server on this 2-core machine); the HTTP
listener is plain, as behind a TLS-terminating proxy.
"""

from __future__ import annotations

import argparse
import json
import re
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
import trustme

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_accept import DID, Server, _drive, _ours, _pct, children, tree_cpu_seconds

ROOT = Path(__file__).resolve().parents[1]
TEXT = "y" * 900 + "\n"  # with the headers the relay writes, about 1 KiB


def _relay(tmp: Path, cert: Path) -> tuple[Server, str, int]:
    server, key = _ours(tmp, cert, http=True)
    found = re.search(r"listening on 127\.0\.0\.1:(\d+) \(http\)", server.out.read_text())
    assert found
    return server, key, int(found.group(1))


def _request(port: int, key: str, n: int) -> bytes:
    body = json.dumps(
        {
            "from": "bench@example.org",
            "to": "sink@example.net",
            "subject": f"bench {n}",
            "text": TEXT,
            "category": "transactional",
        }
    ).encode()
    head = (
        f"POST /v1/send HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {key}\r\nX-Atmos-DID: {DID}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


async def _response(stream: trio.SocketStream, buffer: bytearray) -> tuple[int, bool]:
    """Read one response (Content-Length framed); returns its status and whether the
    server closes the connection after it (hypercorn does after 1,000 requests)."""
    while b"\r\n\r\n" not in buffer:
        data = await stream.receive_some(65536)
        if not data:
            raise ConnectionError("server closed")
        buffer += data
    end = buffer.index(b"\r\n\r\n") + 4
    head = bytes(buffer[:end])
    length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(buffer) < end + length:
        data = await stream.receive_some(65536)
        if not data:
            raise ConnectionError("server closed")
        buffer += data
    del buffer[: end + length]
    closing = re.search(rb"(?i)\r\nconnection: *close", head) is not None
    return int(head.split(b" ", 2)[1]), closing


async def _http_client(
    port: int, key: str, deadline: float, latencies: list[float], errors: list[int]
) -> None:
    n = 0
    while trio.current_time() < deadline:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        buffer = bytearray()
        async with stream:
            closing = False
            while not closing and trio.current_time() < deadline:
                n += 1
                request = _request(port, key, n)
                await stream.send_all(request)
                t = time.perf_counter()
                status, closing = await _response(stream, buffer)
                if status != 200:
                    errors.append(status)
                    continue
                latencies.append(time.perf_counter() - t)


async def _drive_http(
    port: int, key: str, clients: int, seconds: float
) -> tuple[list[float], float]:
    latencies: list[float] = []
    errors: list[int] = []
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(_http_client, port, key, start + seconds, latencies, errors)
    assert not errors, f"non-200 answers: {sorted(set(errors))}"
    return latencies, trio.current_time() - start


async def _scrape(port: int) -> dict[str, float]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    out = {}
    for line in data.decode().splitlines():
        found = re.match(r"(atmosrelay_journal_(?:appends|fsyncs)_total) (\S+)", line)
        if found:
            out[found.group(1)] = float(found.group(2))
    return out


def row(
    way: str, clients: int, seconds: float, server: Server, key: str, http: int, ctx: ssl.SSLContext
) -> dict[str, Any]:
    before = trio.run(_scrape, http)
    tree = [server.proc.pid, *children(server.proc.pid)]  # the SMTP sessions' processes too
    cpu0 = tree_cpu_seconds(tree)
    if way == "http":
        latencies, elapsed = trio.run(_drive_http, http, key, clients, seconds)
    else:
        latencies, _, elapsed = trio.run(_drive, server.port, ctx, key, clients, 1024, seconds)
    cpu = tree_cpu_seconds(tree) - cpu0
    after = trio.run(_scrape, http)
    n = len(latencies)
    appends = after["atmosrelay_journal_appends_total"] - before["atmosrelay_journal_appends_total"]
    fsyncs = after["atmosrelay_journal_fsyncs_total"] - before["atmosrelay_journal_fsyncs_total"]
    return {
        "way": way,
        "clients": clients,
        "messages": n,
        "per_s": n / elapsed,
        "p50_ms": _pct(latencies, 0.5),
        "p99_ms": _pct(latencies, 0.99),
        "fsyncs_per_msg": fsyncs / max(1.0, appends),
        "cpu_ms_per_msg": cpu / max(1, n) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,10,50")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    counts = [int(x) for x in args.clients.split(",")]
    ca = trustme.CA()
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(dir=ROOT) as d:
        tmp = Path(d)
        cert = tmp / "tls.pem"
        ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert))
        server, key, http = _relay(tmp, cert)
        try:
            for r in range(args.rounds):
                for clients in counts:
                    ways = ("http", "smtp") if (r + clients) % 2 == 0 else ("smtp", "http")
                    for way in ways:
                        results.setdefault((way, clients), []).append(
                            row(way, clients, args.seconds, server, key, http, ctx)
                        )
        finally:
            server.stop()
    table = []
    for (way, clients), rows in sorted(results.items(), key=lambda x: (x[0][1], x[0][0])):
        median = {
            k: statistics.median(r[k] for r in rows)
            for k in ("per_s", "p50_ms", "p99_ms", "fsyncs_per_msg", "cpu_ms_per_msg")
        }
        table.append({"way": way, "clients": clients, "rounds": len(rows), **median})
    if args.json:
        print(json.dumps(table, indent=2))
        return
    print(f"HTTP vs SMTP submission, 1 KiB, {args.rounds} round(s) x {args.seconds:g} s, medians")
    print(
        f"{'way':<5} {'clients':>7} {'msgs/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'fsync/msg':>9} {'cpu ms/msg':>10}"
    )
    for t in table:
        print(
            f"{t['way']:<5} {t['clients']:>7} {t['per_s']:>8.0f} {t['p50_ms']:>8.1f} "
            f"{t['p99_ms']:>8.1f} {t['fsyncs_per_msg']:>9.2f} {t['cpu_ms_per_msg']:>10.2f}"
        )
    by = {(t["way"], t["clients"]): t for t in table}
    for clients in counts:
        if ("http", clients) in by and ("smtp", clients) in by:
            share = by[("http", clients)]["per_s"] / by[("smtp", clients)]["per_s"]
            print(f"http/smtp at {clients} client(s): {share:.0%}")


if __name__ == "__main__":
    main()
