"""Submission throughput: our relay against aiosmtpd with an fsync handler, side by side.

    python bench/bench_accept.py [--quick] [--json] [--sessions 1,10,50,100] [--seconds S]
                                 [--per-connection]
    python bench/bench_accept.py --policy-cost [--rounds 3]

``--policy-cost`` measures what the acceptance policy costs: our relay with its limits
enforced (a steady-state member far from them, so every message is checked and counted)
against the same relay with them off, both started by bench/relay_process.py, 50 sessions
of 1 KiB messages, alternating in one run (and which goes first) so both see the same
machine.

Each server runs as its own process on 127.0.0.1 with implicit TLS and AUTH. The load
generator (this process, trio, our ClientConnection) opens N sessions, authenticates once per
session, then sends messages back to back, pipelining MAIL/RCPT/DATA where the server offers
PIPELINING. It measures accepted messages/s, p50/p99 latency from the end of data to the 250,
the server's CPU per message (from /proc, its child processes included: the relay's session
and delivery processes), and for our relay the fsyncs per message (the relay reports its
journal totals on shutdown). Every 250 from our relay means fsynced; every 250 from the
baseline means its handler fsynced too.

Postfix, where installed, is measured the same way by pointing its smtp-source at our trusted
listener (see bench/README.md); this script does not start Postfix.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import trio
import trustme

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atmosrelay.accounts import api_keys, domains
from atmosrelay.accounts.store import Store
from atmosrelay.smtp import (
    NEED_DATA,
    Address,
    AuthPlain,
    ClientConnection,
    Data,
    Event,
    Hello,
    MailFrom,
    RcptTo,
    ServerReply,
)

ROOT = Path(__file__).resolve().parents[1]
DID = "did:plc:abcdefghijklmnopqrstuvwx"
SIZES = {"1KiB": 1024, "100KiB": 100 * 1024}
HTTP_ON = '["127.0.0.1:0"]'


def _message(size: int) -> bytes:
    head = b"From: bench@example.org\r\nTo: sink@example.net\r\nSubject: bench\r\n\r\n"
    line = b"y" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """``pid``'s children (the relay's session and delivery processes)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            lines = status.read_text().splitlines()
        except OSError:  # it exited meanwhile
            continue
        if f"PPid:\t{pid}" in lines:
            found.append(int(status.parent.name))
    return found


def tree_cpu_seconds(pids: list[int]) -> float:
    """CPU seconds of these processes together: a server and its children (the relay's
    session and delivery processes, which live as long as it does; the baseline has none)."""
    return sum(_cpu_seconds(pid) for pid in pids)


class Server:
    """A server process; ``port``; ``stop()`` returns what it printed."""

    def __init__(self, cmd: list[str], out: Path, ready: str, port_re: str) -> None:
        self.out = out
        self._file = out.open("w")
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._file,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        deadline = time.monotonic() + 60
        while ready not in out.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {out.read_text()}")
            time.sleep(0.05)
        self.port = int(re.search(port_re, out.read_text()).group(1))  # type: ignore[union-attr]

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._file.close()
        return self.out.read_text()


# Linux's SO_TIMESTAMPNS (the socket module does not name it): the kernel stamps each received
# segment with CLOCK_REALTIME, readable with recvmsg as SCM_TIMESTAMPNS (struct timespec).
SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("qq")


class _Stamped(trio.abc.Stream):
    """A TCP stream that remembers when the kernel received the bytes of its latest read:
    the client's reply latency on the wire, without this process's own turn to read it (50
    sessions share one trio loop on the two cores the server uses)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.socket = stream.socket
        self.socket.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.arrived = 0.0  # time.time() scale

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data, ancillary, _flags, _addr = await self.socket.recvmsg(
            max_bytes or 65536, socket.CMSG_SPACE(_TIMESPEC.size)
        )
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                sec, nsec = _TIMESPEC.unpack(value[: _TIMESPEC.size])
                self.arrived = sec + nsec / 1e9
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


async def _reply(stream: trio.abc.Stream, conn: ClientConnection) -> ServerReply:
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            data = bytes(await stream.receive_some(65536))
            conn.receive_data(data)
            if not data:
                raise ConnectionError("server closed")
            continue
        assert isinstance(event, ServerReply), event
        return event


async def _connect(
    port: int, ctx: ssl.SSLContext, password: str
) -> tuple[trio.SSLStream[_Stamped], ClientConnection, bool]:
    """A session, greeted and authenticated: (stream, connection, PIPELINING offered)."""
    stream = trio.SSLStream(
        _Stamped(await trio.open_tcp_stream("127.0.0.1", port)),
        ctx,
        server_hostname="127.0.0.1",
        https_compatible=False,
    )
    conn = ClientConnection()
    await _reply(stream, conn)
    await stream.send_all(conn.send(Hello("bench.client", True)))
    ehlo = await _reply(stream, conn)
    pipelining = bool(ehlo.capabilities and ehlo.capabilities.has("PIPELINING"))
    await stream.send_all(conn.send(AuthPlain(DID, password)))
    assert (await _reply(stream, conn)).reply.code == 235
    return stream, conn, pipelining


async def _session(
    port: int,
    ctx: ssl.SSLContext,
    password: str,
    body: Callable[[int], bytes],
    deadline: float,
    done: Callable[[float, float], None],
    per_connection: bool = False,
) -> None:
    """One submission session sending ``body(n)`` for n = 1, 2, ... until ``deadline``;
    after each 250, ``done(seconds from the end of data to the 250 read, the same to the
    250 received by the kernel)``. ``per_connection``: a new connection (TLS handshake,
    EHLO, AUTH) for every message, closed after its 250."""
    stream, conn, pipelining = await _connect(port, ctx, password)
    sender, rcpt = Address("bench", "example.org"), Address("sink", "example.net")
    n = 0
    while trio.current_time() < deadline:
        n += 1
        if per_connection and n > 1:
            await stream.aclose()
            stream, conn, pipelining = await _connect(port, ctx, password)
        commands: list[Event] = [MailFrom(sender), RcptTo(rcpt), Data()]
        if pipelining:
            await stream.send_all(b"".join(conn.send(c) for c in commands))
            replies = [await _reply(stream, conn) for _ in commands]
        else:
            replies = []
            for c in commands:
                await stream.send_all(conn.send(c))
                replies.append(await _reply(stream, conn))
        assert replies[-1].reply.code == 354, replies
        content = conn.send_data(body(n)) + conn.end_data()
        t, wall = time.perf_counter(), time.time()
        await stream.send_all(content)
        final = await _reply(stream, conn)
        assert final.reply.code == 250, final.reply
        done(time.perf_counter() - t, stream.transport_stream.arrived - wall)
    await stream.aclose()


async def _drive(
    port: int,
    ctx: ssl.SSLContext,
    password: str,
    sessions: int,
    size: int,
    seconds: float,
    per_connection: bool = False,
) -> tuple[list[float], list[float], float]:
    latencies: list[float] = []
    wire: list[float] = []

    def done(read: float, received: float) -> None:
        latencies.append(read)
        wire.append(received)

    body = _message(size)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(sessions):
            nursery.start_soon(
                _session,
                port,
                ctx,
                password,
                lambda _: body,
                start + seconds,
                done,
                per_connection,
            )
    return latencies, wire, trio.current_time() - start


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")


# smtp.processes for our relay (None: its default); --policy-cost starts it through
# run_relay (relay_process.py), which forks no session process whatever this says
SESSION_PROCESSES: list[int | None] = [None]


def _ours(
    tmp: Path,
    cert: Path,
    delivery: str = "enabled = false\n",
    *,
    limits: bool | None = None,
    http: bool = False,
) -> tuple[Server, str]:
    """Our relay as a process (``atmosrelay serve``); ``delivery`` is its [delivery] section
    (off: accept only). ``limits`` True/False: through bench/relay_process.py with the
    policy's limits on or off (the --policy-cost row only). ``http``: the HTTP API on a
    free port too (bench/bench_http.py)."""
    config = tmp / "relay.toml"
    config.write_text(
        f'[relay]\ndata_dir = "{tmp / "var"}"\nlog_level = "warning"\n[auth]\nbcrypt_cost = 4\n'
        f'[smtp]\nlisteners = ["127.0.0.1:0 implicit"]\nhostname = "bench.test"\n'
        f'tls_cert = "{cert}"\ntls_key = "{cert}"\nmax_connections_per_ip = 1000\n'
        + ("" if SESSION_PROCESSES[0] is None else f"processes = {SESSION_PROCESSES[0]}\n")
        + f"[http]\nlisteners = {HTTP_ON if http else '[]'}\n"
        f"[delivery]\n{delivery}"
    )
    store = Store(tmp / "var" / "accounts.sqlite3")
    store.add_member(DID, "bench.test")
    domains.enroll(store, DID, "example.org", limit=2, clock_now=0)
    store.mark_verified("example.org", without_dns=True)
    # a steady-state sender far from its limits (the policy still runs on every message)
    store.set_limits(DID, hourly=100_000_000, daily=100_000_000)
    key = api_keys.issue(store, DID, cost=4).secret
    store.close()
    command = [sys.executable, "-m", "atmosrelay", "serve", "--config", str(config)]
    if limits is not None:
        launcher = str(ROOT / "bench" / "relay_process.py")
        command = [sys.executable, launcher, str(config), "on" if limits else "off"]
    server = Server(
        command,
        tmp / "relay.out",
        "ready",
        r"listening on 127\.0\.0\.1:(\d+) \(implicit\)",
    )
    return server, key


# a session process reports its sessions' figures to the owner's /metrics once a second
REPORTS_WITHIN: Final = 10.0


def read_relay_clock(printed: str, replies: int = 0) -> tuple[float, float] | None:
    """The relay's own p99 and mean from end of data to the reply written, in ms: the p99 is
    the upper bound of the /metrics histogram bucket that holds it, the mean its sum over its
    count (None when the relay serves no /metrics). Waits until the histogram counts at
    least ``replies`` (the session processes report once a second; RuntimeError when they
    have not within REPORTS_WITHIN seconds). The client's figures include this process's
    own scheduling on the shared cores."""
    found = re.search(r"listening on 127\.0\.0\.1:(\d+) \(http\)", printed)
    if found is None:
        return None
    url = f"http://127.0.0.1:{found.group(1)}/metrics"
    deadline = time.monotonic() + REPORTS_WITHIN
    while True:
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        buckets = [
            (float(le), float(n))
            for le, n in re.findall(
                r'^atmosrelay_smtp_data_reply_seconds_bucket\{le="([^"]+)"\} (\S+)$', text, re.M
            )
        ]
        total = buckets[-1][1] if buckets else 0.0
        spent = re.search(r"^atmosrelay_smtp_data_reply_seconds_sum (\S+)$", text, re.M)
        if total and total >= replies and spent is not None:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the relay reported {total:.0f} of {replies} end-of-data replies")
        time.sleep(0.1)
    p99 = next(le for le, n in buckets if n >= 0.99 * total) * 1000
    return p99, float(spent.group(1)) / total * 1000


def _baseline(tmp: Path, cert: Path) -> tuple[Server, str]:
    server = Server(
        [sys.executable, str(ROOT / "bench" / "aiosmtpd_fsync.py"), str(cert), str(tmp)],
        tmp / "aiosmtpd.out",
        "listening on",
        r"listening on (\d+)",
    )
    return server, "bench"


def measure(
    name: str,
    sessions: int,
    size_label: str,
    seconds: float,
    ca: trustme.CA,
    per_connection: bool = False,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(dir=ROOT) as d:
        tmp = Path(d)
        cert = tmp / "tls.pem"
        ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert))
        if name == "atmosrelay":  # with /metrics: the relay's own end-of-data-to-250 p99
            server, password = _ours(tmp, cert, http=True)
        elif name == "atmosrelay-limits":
            server, password = _ours(tmp, cert, limits=True)
        elif name == "atmosrelay-nolimits":
            server, password = _ours(tmp, cert, limits=False)
        else:
            server, password = _baseline(tmp, cert)
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        try:
            tree = [server.proc.pid, *children(server.proc.pid)]
            cpu0 = tree_cpu_seconds(tree)
            latencies, wire, elapsed = trio.run(
                _drive,
                server.port,
                ctx,
                password,
                sessions,
                SIZES[size_label],
                seconds,
                per_connection,
            )
            cpu = tree_cpu_seconds(tree) - cpu0
            relay_clock = read_relay_clock(server.out.read_text(), len(latencies))
        finally:
            out = server.stop()
        n = len(latencies)
        fsyncs = None
        m = re.search(r"journal: (\d+) append\(s\) in (\d+) batch\(es\), (\d+) fsync", out)
        if m:
            fsyncs = int(m.group(3)) / max(1, int(m.group(1)))
        return {
            "server": name,
            "sessions": sessions,
            "size": size_label,
            "messages": n,
            "per_s": n / elapsed,
            "p50_ms": _pct(latencies, 0.5),
            "p99_ms": _pct(latencies, 0.99),
            "wire_p50_ms": _pct(wire, 0.5),
            "wire_p99_ms": _pct(wire, 0.99),
            "relay_p99_ms": None if relay_clock is None else relay_clock[0],
            "relay_mean_ms": None if relay_clock is None else relay_clock[1],
            "fsyncs_per_msg": fsyncs,
            "server_cpu_ms_per_msg": cpu / max(1, n) * 1000,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 s per run instead of 5")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--sessions", default="1,10,50,100")
    parser.add_argument("--sizes", default="1KiB,100KiB", help=f"some of {', '.join(SIZES)}")
    parser.add_argument("--policy-cost", action="store_true", help="limits on vs off")
    parser.add_argument("--rounds", type=int, default=3, help="--policy-cost rounds")
    parser.add_argument(
        "--per-connection",
        action="store_true",
        help="a new connection (TLS, EHLO, AUTH) for every message",
    )
    parser.add_argument(
        "--session-processes", type=int, help="our relay's smtp.processes (default: its own)"
    )
    args = parser.parse_args()
    SESSION_PROCESSES[0] = args.session_processes
    unknown = [size for size in args.sizes.split(",") if size not in SIZES]
    if unknown:
        parser.error(f"--sizes: unknown {', '.join(unknown)}; choose from {', '.join(SIZES)}")
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    ca = trustme.CA()
    if args.policy_cost:
        policy_cost(ca, seconds, args.rounds)
        return
    rows = []
    for size in args.sizes.split(","):
        for sessions in (int(x) for x in args.sessions.split(",")):
            for name in ("atmosrelay", "aiosmtpd-fsync"):
                rows.append(measure(name, sessions, size, seconds, ca, args.per_connection))
    machine = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "postfix": shutil.which("postfix") is not None,
    }
    if args.json:
        print(
            json.dumps({"machine": machine, "seconds_per_run": seconds, "results": rows}, indent=2)
        )
        return
    print(
        f"accept bench: {machine['platform']}, {machine['cpus']} CPUs, Python {machine['python']}, "
        f"{seconds:g} s per run, implicit TLS, "
        + ("a connection and AUTH per message" if args.per_connection else "AUTH once per session")
    )
    print(
        f"{'server':<15}{'size':>7}{'sess':>6}{'msgs/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'wire p50':>9}{'wire p99':>9}{'relay p99':>11}{'mean':>7}{'fsync/msg':>10}"
        f"{'cpu ms/msg':>11}"
    )
    for r in rows:
        f = "-" if r["fsyncs_per_msg"] is None else f"{r['fsyncs_per_msg']:.3f}"
        own = "-" if r.get("relay_p99_ms") is None else f"<={r['relay_p99_ms']:g}"
        mean = "-" if r.get("relay_mean_ms") is None else f"{r['relay_mean_ms']:.1f}"
        print(
            f"{r['server']:<15}{r['size']:>7}{r['sessions']:>6}{r['per_s']:>9.0f}{r['p50_ms']:>9.2f}"
            f"{r['p99_ms']:>9.2f}{r['wire_p50_ms']:>9.2f}{r['wire_p99_ms']:>9.2f}{own:>11}"
            f"{mean:>7}{f:>10}{r['server_cpu_ms_per_msg']:>11.3f}"
        )
    if any(r.get("relay_p99_ms") is not None for r in rows):
        print(
            "relay p99, mean: end of data to the reply written, on the relay's clock (its "
            "/metrics histogram: the p99's bucket's upper bound, and sum / count; ms)"
        )
    print(
        "p50, p99: end of data written to the reply read by the load generator; wire p50, "
        "p99: to the reply received by its kernel (SO_TIMESTAMPNS), without its own turn to "
        "read it"
    )
    for size in args.sizes.split(","):
        for sessions in (int(x) for x in args.sessions.split(",")):
            ours = next(
                r
                for r in rows
                if r["server"] == "atmosrelay" and r["size"] == size and r["sessions"] == sessions
            )
            base = next(
                r
                for r in rows
                if r["server"] != "atmosrelay" and r["size"] == size and r["sessions"] == sessions
            )
            print(
                f"{size} x {sessions} sessions: "
                f"{ours['per_s'] / max(1e-9, base['per_s']):.1f}x the aiosmtpd fsync baseline"
            )


def policy_cost(ca: trustme.CA, seconds: float, rounds: int) -> None:
    """Limits on and off, alternating, 50 sessions of 1 KiB: the policy's share of the
    accept path."""
    rows: dict[str, list[dict[str, Any]]] = {"atmosrelay-limits": [], "atmosrelay-nolimits": []}
    for i in range(rounds):  # on first in even rounds, off first in odd ones
        for name in list(rows) if i % 2 == 0 else list(reversed(rows)):
            rows[name].append(measure(name, 50, "1KiB", seconds, ca))
    print(f"policy cost: 50 sessions, 1 KiB, {seconds:g} s per run, {rounds} round(s) each")
    print(f"{'relay':<22}{'msgs/s (each round)':<32}{'median':>8}{'cpu ms/msg':>12}")
    medians = {}
    for name, runs in rows.items():
        rates = sorted(r["per_s"] for r in runs)
        medians[name] = rates[len(rates) // 2]
        cpu = sorted(r["server_cpu_ms_per_msg"] for r in runs)[len(runs) // 2]
        each = ", ".join(f"{r['per_s']:.0f}" for r in runs)
        label = "limits on" if name == "atmosrelay-limits" else "limits off"
        print(f"{label:<22}{each:<32}{medians[name]:>8.0f}{cpu:>12.3f}")
    on, off = medians["atmosrelay-limits"], medians["atmosrelay-nolimits"]
    print(f"the policy costs {(1 - on / off) * 100:+.1f}% of accept throughput (median of rounds)")


if __name__ == "__main__":
    main()
