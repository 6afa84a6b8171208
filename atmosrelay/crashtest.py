"""``atmosrelay crashtest``: prove "250 means on disk" on the operator's own disk.

    atmosrelay crashtest [DIR] [--rounds N] [--clients C] [--size BYTES] [--seed S]
                         [--max-seconds T] [--json]

Round after round:

1. ``atmosrelay serve`` starts as a real process on DIR (its journal, its account store),
   delivering to a sink inside this process (the smarthost);
2. C clients submit uniquely numbered messages over implicit TLS with AUTH;
3. at a random moment (seeded; the seed is printed) the relay gets SIGKILL: while it
   accepts, while it delivers, and while it compacts, which this mode makes frequent
   (64 KiB segments, a compaction check every 0.2 s);
4. the journal is checked read-only, as ``atmosrelay journal check`` does: healthy, or a
   torn tail (a batch whose fsync never completed: never acknowledged), is fine;
   corruption is not.

Then one last start, with no load, delivers what is queued and stops with SIGTERM. The
table counts, by Subject: what was acknowledged, what reached the sink, and what was
acknowledged but never delivered, which must be 0. Delivered twice is allowed
(at-least-once: a delivery whose record was not yet fsynced when the relay died is made
again). Delivered without an acknowledgement is a 250 lost on the wire in the kill.

``kill -9`` leaves the page cache alone, so this proves the process-crash half of the
promise on the operator's filesystem and mount options; the power-loss half is proved by
the test suite on a crashable in-memory FS (tests/relay/test_durability.py).

Exit status: 0 when nothing acknowledged was lost and no check found corruption; 1 when
something was; 2 when the test could not run (the relay would not start, DIR not empty).
"""

from __future__ import annotations

import collections
import contextlib
import json
import random
import re
import shutil
import signal
import smtplib
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import attrs

from atmosrelay.accounts import api_keys, domains
from atmosrelay.accounts.store import Store
from atmosrelay.config import load_config
from atmosrelay.smtp import (
    NEED_DATA,
    Capabilities,
    ConnectionClosed,
    EndOfMessage,
    Event,
    MailFrom,
    MessageData,
    MessageRejected,
    RemoteProtocolError,
    ServerConnection,
    State,
    permissive_reply,
)
from atmosrelay.smtp import replies as R
from journal import CorruptJournalError, check_journal

DID: Final = "did:plc:crashtestcrashtestcrasht"
DOMAIN: Final = "crashtest.example"
READY_TIMEOUT: Final = 60.0  # seconds for a start (recovery included) to say "ready"
DRAIN_TIMEOUT: Final = 120.0  # the last start gets this long to deliver what is queued
LOAD_SECONDS: Final = (0.2, 1.5)  # the kill comes at a random moment in this range


class CrashtestError(Exception):
    """The test could not run (not a finding about durability)."""


# -- the sink: the smarthost, in this process, speaking SMTP through our protocol core --------
class Sink:
    """Counts delivered messages by Subject."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.port: int = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Sink:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def delivered(self) -> collections.Counter[str]:
        with self.lock:
            return collections.Counter(self.counts)

    def _record(self, message: bytes) -> None:
        found = re.search(rb"^Subject: ([^\r\n]*)", message, re.MULTILINE)
        subject = found.group(1).decode("ascii", "replace") if found else "(none)"
        with self.lock:
            self.counts[subject] += 1

    def _handler(self) -> type[socketserver.BaseRequestHandler]:
        sink = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with contextlib.suppress(OSError):  # the relay killed mid-transaction
                    _serve_sink(self.request, sink)

        return Handler


def _serve_sink(sock: socket.socket, sink: Sink) -> None:
    conn = ServerConnection(capabilities=Capabilities(size=None, chunking=False))
    message = bytearray()
    out = bytearray()
    while True:
        try:
            event = conn.next_event()
        except RemoteProtocolError as exc:
            if exc.reply is not None:
                sock.sendall(out + conn.send(exc.reply))
            return
        if event is NEED_DATA:
            if out:
                sock.sendall(out)
                out.clear()
            conn.receive_data(sock.recv(65536))
            continue
        assert isinstance(event, Event)  # not PAUSED: every command is answered at once
        if isinstance(event, ConnectionClosed):
            return
        if isinstance(event, MessageData):
            message += event.data
            continue
        # Whatever comes, taken (AUTH is not offered, so it never asks for a password).
        reply = permissive_reply(conn, event, "crashtest-sink", queue_id="sink")
        reply = R.NOT_IMPLEMENTED if reply is None else reply
        if isinstance(event, EndOfMessage):
            sink._record(bytes(message))
        if isinstance(event, (EndOfMessage, MessageRejected, MailFrom)):
            message.clear()
        out += conn.send(reply)
        if conn.state is State.CLOSED:
            sock.sendall(out)
            return


# -- the relay, as a real process --------------------------------------------------------------
class RelayProcess:
    """``atmosrelay serve`` in a child process; a thread reads its stdout (so the pipe never
    fills) and sets ``ready`` when it says so."""

    def __init__(self, config: Path, log: Path) -> None:
        self.lines: list[str] = []
        self.ready = threading.Event()
        started = time.monotonic()
        with log.open("a") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "atmosrelay", "serve", "--config", str(config)],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        if not self.ready.wait(READY_TIMEOUT) or self.proc.poll() is not None:
            self.proc.kill()
            self.proc.wait()
            raise CrashtestError(
                f"the relay did not start (see {log}): {''.join(self.lines)[-2000:]}"
            )
        self.restart_s = time.monotonic() - started
        found = re.search(r"listening on 127\.0\.0\.1:(\d+) \(implicit\)", "".join(self.lines))
        if found is None:
            raise CrashtestError("the relay did not say which port it listens on")
        self.port = int(found.group(1))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if "ready;" in line:
                self.ready.set()
        self.proc.stdout.close()

    def torn_tails(self) -> int:
        return sum("repaired a torn tail" in line for line in self.lines)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.reader.join(10)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        status = self.proc.wait(120)
        self.reader.join(10)
        return status


# -- clients ------------------------------------------------------------------------------
@attrs.define
class Load:
    """What the clients were told: subject -> queue id, for each 250 received."""

    acked: dict[str, str] = attrs.field(factory=dict)
    lock: threading.Lock = attrs.field(factory=threading.Lock)
    stop: threading.Event = attrs.field(factory=threading.Event)


def _client(port: int, key: str, load: Load, tag: str, size: int) -> None:
    tls = ssl.create_default_context()
    tls.check_hostname = False  # the relay's own self-signed certificate, on loopback
    tls.verify_mode = ssl.CERT_NONE
    line = b"x" * 76 + b"\r\n"
    n = 0
    try:
        with smtplib.SMTP_SSL("127.0.0.1", port, context=tls, timeout=30) as smtp:
            smtp.login(DID, key)
            while not load.stop.is_set():
                n += 1
                subject = f"crashtest {tag}.{n}"
                head = b"From: load@%s\r\nSubject: %s\r\n\r\n" % (DOMAIN.encode(), subject.encode())
                body = line * max(1, (size - len(head)) // len(line))
                smtp.mail(f"load@{DOMAIN}")
                smtp.rcpt("sink@sink.example")
                code, reply = smtp.data(head + body)
                if code == 250:
                    with load.lock:
                        load.acked[subject] = reply.decode().rsplit(" ", 1)[-1]
    except (smtplib.SMTPException, OSError):
        pass  # the relay was killed: that is the point


# -- the run ------------------------------------------------------------------------------
@attrs.define
class Result:
    directory: str
    seed: int
    rounds: int
    clients: int
    size: int
    acknowledged: int
    delivered: int
    lost: list[str]
    duplicates: int
    unacknowledged_delivered: int
    restart_s: list[float]
    torn_tails: int
    compactions: int
    checks: dict[str, int]
    corrupt: list[str]
    seconds: float

    @property
    def passed(self) -> bool:
        return not self.lost and not self.corrupt

    def as_json(self) -> dict[str, Any]:
        return {
            "directory": self.directory,
            "seed": self.seed,
            "rounds": self.rounds,
            "clients": self.clients,
            "size": self.size,
            "acknowledged": self.acknowledged,
            "delivered": self.delivered,
            "lost": len(self.lost),
            "lost_subjects": self.lost,
            "duplicates": self.duplicates,
            "unacknowledged_delivered": self.unacknowledged_delivered,
            "restart_s": _percentiles(self.restart_s),
            "torn_tails_repaired": self.torn_tails,
            "compactions": self.compactions,
            "journal_checks": self.checks,
            "corrupt": self.corrupt,
            "seconds": round(self.seconds, 1),
            "passed": self.passed,
        }


@attrs.frozen
class Tally:
    lost: list[str]  # acknowledged, never delivered
    duplicates: int  # deliveries beyond the first
    unacknowledged_delivered: int  # delivered, but the client never saw its 250


def tally(acknowledged: set[str], delivered: collections.Counter[str]) -> Tally:
    """Compare what the clients were told (by Subject) with what reached the sink."""
    return Tally(
        lost=sorted(acknowledged - delivered.keys()),
        duplicates=sum(c - 1 for c in delivered.values() if c > 1),
        unacknowledged_delivered=len(delivered.keys() - acknowledged),
    )


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values) or [0.0]

    def rank(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))], 3)

    return {"p50": rank(0.5), "p99": rank(0.99), "max": round(ordered[-1], 3)}


def _write_config(directory: Path, sink_port: int, clients: int) -> Path:
    path = directory / "crashtest.toml"
    path.write_text(
        f'[relay]\ndata_dir = "{directory / "var"}"\nlog_level = "info"\n'
        '[operator]\ndomain = "crashtest.localhost"\n'
        "[auth]\nbcrypt_cost = 4\n"
        # Small segments and a frequent check make compaction run often, so kills land in it.
        "[journal]\nsegment_size = 65536\ncompact_interval = 0.2\n"
        '[smtp]\nlisteners = ["127.0.0.1:0 implicit"]\nhostname = "localhost"\n'
        "[http]\nlisteners = []\n"
        f'[delivery]\nsmarthost = "127.0.0.1:{sink_port}"\nconcurrency = {clients}\n'
        "idle = 1.0\nrestart_spread = 1.0\nretry_initial = 1.0\n"
    )
    return path


def _enroll(config_path: Path) -> str:
    config = load_config(str(config_path))
    config.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(config.accounts_db)
    try:
        store.add_member(DID, "crashtest.test")
        domains.enroll(store, DID, DOMAIN, limit=2, clock_now=time.time())
        store.mark_verified(DOMAIN, without_dns=True)
        # A load generator, not a newcomer: its own limits, far above what a run sends
        # (the warming tiers would refuse all but the first few messages)
        store.set_limits(DID, hourly=10_000_000, daily=10_000_000)
        return api_keys.issue(store, DID, cost=4).secret
    finally:
        store.close()


def _check(journal_dir: Path) -> str:
    """'healthy', 'torn tail' or 'corrupt: ...' (read-only, as 'journal check')."""
    try:
        report = check_journal(str(journal_dir))
    except CorruptJournalError as exc:
        return f"corrupt: {exc}"
    return "torn tail" if report.torn is not None else "healthy"


def run(
    directory: Path,
    *,
    rounds: int,
    clients: int,
    size: int,
    seed: int,
    max_seconds: float,
    progress: bool,
) -> Result:
    """The crash test (module docstring). Raises CrashtestError when it cannot run."""
    if directory.exists() and any(directory.iterdir()):
        raise CrashtestError(f"{directory} is not empty; crashtest needs a directory of its own")
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    started = time.monotonic()
    restarts: list[float] = []
    checks: collections.Counter[str] = collections.Counter()
    corrupt: list[str] = []
    torn = 0
    load = Load()
    done = 0
    with Sink() as sink:
        config = _write_config(directory, sink.port, clients)
        key = _enroll(config)
        journal_dir = load_config(str(config)).journal_dir
        log = directory / "relay.log"
        for round_ in range(rounds):
            if time.monotonic() - started > max_seconds:
                break
            relay = RelayProcess(config, log)
            restarts.append(relay.restart_s)
            torn += relay.torn_tails()
            load.stop.clear()
            threads = [
                threading.Thread(
                    target=_client, args=(relay.port, key, load, f"{round_}.{c}", size), daemon=True
                )
                for c in range(clients)
            ]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(*LOAD_SECONDS))  # the random moment of the kill
            relay.kill()
            load.stop.set()
            for t in threads:
                t.join(30)
            verdict = _check(journal_dir)
            checks[verdict.split(":")[0]] += 1
            if verdict.startswith("corrupt"):
                corrupt.append(f"round {round_ + 1}: {verdict}")
            done += 1
            if progress:
                print(
                    f"\rcrashtest: round {done}/{rounds}, {len(load.acked)} acknowledged, "
                    f"{sum(sink.delivered().values())} delivered",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )
        if progress:
            print(file=sys.stderr)
        relay = RelayProcess(config, log)  # the last start: no load, deliver what is queued
        restarts.append(relay.restart_s)
        torn += relay.torn_tails()
        wanted = set(load.acked)
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while time.monotonic() < deadline and not wanted <= sink.delivered().keys():
            time.sleep(0.1)
        time.sleep(1.0)  # a moment more for duplicates still in flight to arrive
        status = relay.stop()
        if status != 0:
            raise CrashtestError(f"the relay did not stop cleanly on SIGTERM (status {status})")
        delivered = sink.delivered()
    compactions = log.read_text().count("compacted:")
    counted = tally(wanted, delivered)
    return Result(
        directory=str(directory),
        seed=seed,
        rounds=done,
        clients=clients,
        size=size,
        acknowledged=len(wanted),
        delivered=len(delivered),
        lost=counted.lost,
        duplicates=counted.duplicates,
        unacknowledged_delivered=counted.unacknowledged_delivered,
        restart_s=restarts,
        torn_tails=torn,
        compactions=compactions,
        checks=dict(checks),
        corrupt=corrupt,
        seconds=time.monotonic() - started,
    )


def table(r: Result) -> str:
    p = _percentiles(r.restart_s)
    rows = [
        ("rounds (kill -9 each)", f"{r.rounds}"),
        ("acknowledged (250 received)", f"{r.acknowledged:,}"),
        ("delivered to the sink", f"{r.delivered:,} distinct"),
        ("acknowledged, never delivered", f"{len(r.lost)}   (must be 0)"),
        (
            "delivered more than once",
            f"{r.duplicates}   at-least-once: delivered, then killed before the delivery "
            "record was fsynced",
        ),
        (
            "delivered, never acknowledged",
            f"{r.unacknowledged_delivered}   on disk when killed, the 250 lost on the wire",
        ),
        ("restart to ready p50 / p99 / max", f"{p['p50']} / {p['p99']} / {p['max']} s"),
        ("torn tails repaired at start", f"{r.torn_tails}"),
        ("compactions", f"{r.compactions}"),
        (
            "journal check after each kill",
            ", ".join(f"{n} {k}" for k, n in sorted(r.checks.items())) or "-",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    head = (
        f"atmosrelay crashtest on {r.directory}: seed {r.seed}, {r.clients} client(s), "
        f"{r.size}-byte messages, {r.seconds:.0f} s"
    )
    lines = [head, *(f"  {k.ljust(width)}  {v}" for k, v in rows)]
    lines += [f"  LOST: {s}" for s in r.lost[:20]] + [f"  {c}" for c in r.corrupt]
    verdict = "PASS: nothing acknowledged was lost" if r.passed else "FAIL"
    return "\n".join([*lines, verdict])


def main(args: Any) -> int:
    """The command line (registered in atmosrelay/cli.py)."""
    given = args.dir is not None
    directory = Path(args.dir) if given else Path(tempfile.mkdtemp(prefix="crashtest-", dir="."))
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    try:
        result = run(
            directory,
            rounds=args.rounds,
            clients=args.clients,
            size=args.size,
            seed=seed,
            max_seconds=args.max_seconds,
            progress=not args.json and sys.stderr.isatty(),
        )
    except CrashtestError as exc:
        print(f"atmosrelay: crashtest could not run: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.as_json(), indent=2) if args.json else table(result))
    if result.passed and not given:
        shutil.rmtree(directory, ignore_errors=True)
    elif not given:
        print(f"kept {directory} for inspection", file=sys.stderr)
    return 0 if result.passed else 1


def register(sub: Any) -> None:
    p = sub.add_parser(
        "crashtest",
        help="kill -9 the relay under load, round after round, on DIR; count what was lost",
    )
    p.add_argument(
        "dir", nargs="?", help="an empty directory on the disk to test (default: ./crashtest-*)"
    )
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--size", type=int, default=1024, help="bytes per message")
    p.add_argument("--seed", type=int, help="of the kill moments (default: random, printed)")
    p.add_argument(
        "--max-seconds", type=float, default=3600.0, help="stop starting rounds after this"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=main)
