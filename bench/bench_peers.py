"""The relay side by side with Postfix, interleaved in one run, with Postfix's own tools.

    python bench/bench_peers.py [--quick] [--json] [--rounds N] [--restart N] [--only W,...]

Both servers get the same client, Postfix's ``smtp-source``, on loopback, and deliver to the
same sink, Postfix's ``smtp-sink``. Postfix is a throwaway instance this script configures
under a temporary directory (its own config_directory, queue_directory, data_directory and
loopback ports; the system's Postfix, running or not, is never touched), started and stopped
with ``postfix -c DIR``; it needs root, as Postfix's master does. The relay runs as its own
process (``atmosrelay serve``) on a trusted listener, as a co-located application would use
it (no TLS, no AUTH: smtp-source speaks neither).

Rows (``work`` in ``--json``):

* ``accept``: sessions kept open (smtp-source -d), 1 KiB and 100 KiB, 10/50/100 sessions;
  the relay with delivery off, Postfix holding every message (the hold queue: accepted,
  fsynced, not delivered);
* ``perconn``: one message per connection (smtp-source's default), 1 KiB, 10/50 sessions;
* ``e2e``: accepted and delivered to smtp-sink, 1 KiB and 100 KiB, 10/50 sessions: the
  relay signs three DKIM signatures, Postfix none; msgs/s from the first connection to the
  sink's count reaching the total;
* ``e2e-postfix-dkim``: the same relay runs against Postfix with OpenDKIM as its milter (one
  RSA signature), where opendkim is installed;
* ``restart``: N messages queued, then each server started: seconds to the first delivery
  and to the last, and the relay's peak resident memory. The relay's queue is written to its
  journal directly, then a run with delivery off folds it and stops (SIGTERM: it writes the
  queue checkpoint), and the timed start reads the checkpoint; a second relay row has that
  run killed (kill -9: no checkpoint), so its start folds the whole journal. Postfix's is
  submitted into its hold queue, then released with ``postsuper -H ALL`` and
  ``postqueue -f`` right after ``postfix start``.

Each row runs ``--rounds`` times (default 3), the servers alternating which goes first, and
the table gives medians, the ratio relay/peer, the 1-minute load average at the end of the
row's last round, the CPU the relay spent a message (its own process's user and system
time, and its delivery processes'; ``relay_cpu_ms`` in ``--json``), and, with each server, the
whole machine's CPU a message and the share of the cores' time they were busy
(``machine_cpu_ms`` and ``busy``; ``Machine``), with each target set against the CPU a
message it leaves the machine (``target_reach``). Before the rows, the
relay's DKIM signer is timed alone (``signing_floor``): three signatures a message set a
ceiling on any end-to-end rate on these cores, and each end-to-end target is shown against
it. Destination concurrency is 20 for both (Postfix's default).

Install the tools on Debian: ``apt-get install postfix opendkim opendkim-tools`` (choose "No
configuration" for Postfix: this script never uses the system's instance).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atmosrelay.accounts import dkim_keys, domains
from atmosrelay.accounts.store import Store
from atmosrelay.message.dkim import Signer, SigningKey
from bench.bench_accept import HTTP_ON, Server, children
from bench.bench_delivery import queue_in_journal
from bench.postfix import Postfix, free_port, reachable, wait_port

ROOT = Path(__file__).resolve().parents[1]
DID = "did:plc:abcdefghijklmnopqrstuvwx"
SENDER, RCPT = "bench@example.org", "sink@example.net"
CONCURRENCY = 20  # connections per destination, both servers (Postfix's default)
KIB = 1024


def _load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _children_peak_rss_mb(pid: int) -> float:
    """The peak resident memory of ``pid``'s children (the delivery processes), summed."""
    return sum(_peak_rss_mb(child) for child in children(pid))


def cpu_ticks(pid: int) -> tuple[int, int]:
    """The clock ticks of user and system CPU ``pid`` has used (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


class Cpu:
    """CPU seconds the relay's process (user, system) and its delivery processes (together)
    spend between ``__init__`` and ``stop()``: where a row's time goes, per message."""

    def __init__(self, pid: int) -> None:
        self.pid, self.children = pid, children(pid)
        self.start = self._read()

    def _read(self) -> tuple[float, float, float]:
        tick = os.sysconf("SC_CLK_TCK")
        user, system = (t / tick for t in cpu_ticks(self.pid))
        return user, system, sum(sum(cpu_ticks(child)) / tick for child in self.children)

    def stop(self, messages: int) -> dict[str, float]:
        """Milliseconds a message: ``user`` and ``sys`` of the accepting process,
        ``delivery`` of the delivery processes."""
        end = self._read()
        ms = [round(1000 * (b - a) / messages, 3) for a, b in zip(self.start, end, strict=True)]
        return dict(zip(("user", "sys", "delivery"), ms, strict=True))


class Machine:
    """The whole machine's CPU (every core, from ``/proc/stat``) between ``__init__`` and
    ``stop()``: what a row cost everything that ran, the server, its client and its sink
    alike, so the two servers' rows compare by the CPU each made the machine spend a message,
    and by how busy it kept the cores (a row below 100% busy waits on something other than
    CPU: round trips, fsyncs). Time the hypervisor gave to other machines (steal) counts as
    neither busy nor idle."""

    def __init__(self) -> None:
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[int, int]:
        first = Path("/proc/stat").read_text().split("\n", 1)[0]
        user, nice, system, idle, iowait, irq, softirq = map(int, first.split()[1:8])
        busy = user + nice + system + irq + softirq  # guest time is within user
        return busy, busy + idle + iowait

    def stop(self, messages: int) -> dict[str, float]:
        """``ms``: CPU milliseconds a message, all cores; ``busy``: the share of the cores'
        time they were busy."""
        (busy0, total0), (busy1, total1) = self.start, self._read()
        tick = os.sysconf("SC_CLK_TCK")
        return {
            "ms": round(1000 * (busy1 - busy0) / tick / messages, 3),
            "busy": round((busy1 - busy0) / max(1, total1 - total0), 3),
        }


# -- the sink and the client -------------------------------------------------------------------


class Sink:
    """smtp-sink on a free port, counting what arrives (its -c counter, read live)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.count = 0
        self.first: float | None = None
        self.changed = threading.Condition()
        self.proc = subprocess.Popen(
            ["smtp-sink", "-u", "postfix", "-c", f"127.0.0.1:{self.port}", "1024"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        threading.Thread(target=self._read, daemon=True).start()
        wait_port(self.port)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(65536):  # type: ignore[attr-defined]
            found = re.findall(rb"mesg=(\d+)", chunk)
            if found and int(found[-1]) > 0:  # (a probe's connection prints mesg=0)
                with self.changed:
                    if self.first is None:
                        self.first = time.time()
                    self.count = int(found[-1])
                    self.changed.notify_all()

    def wait_for(self, n: int, timeout: float) -> float | None:
        """The time the count reached ``n``, or None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while self.count < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.changed.wait(left)
        return time.time()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def smtp_source_command(
    port: int, messages: int, sessions: int, size: int, keep_open: bool
) -> list[str]:
    """smtp-source sending ``messages`` of ``size`` octets over ``sessions`` sessions, each
    kept open for many messages or one connection a message."""
    cmd = ["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", str(size)]
    cmd += ["-d"] if keep_open else []
    return [*cmd, "-f", SENDER, "-t", RCPT, f"127.0.0.1:{port}"]


def smtp_source(port: int, messages: int, sessions: int, size: int, keep_open: bool) -> float:
    """Send ``messages`` with smtp-source; the seconds it took. Any error fails the row."""
    cmd = smtp_source_command(port, messages, sessions, size, keep_open)
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    took = time.perf_counter() - t
    if done.returncode != 0 or done.stderr.strip():
        raise RuntimeError(f"smtp-source: {done.returncode} {done.stderr.strip()[:500]}")
    return took


class OpenDkim:
    """opendkim signing example.org (one RSA-2048 signature) as a milter on a unix socket,
    as packaged setups run it (over a loopback TCP socket, libmilter's small writes meet
    delayed ACKs: about 90 ms a message, which would measure the socket, not OpenDKIM)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        reachable(directory)
        subprocess.run(
            [
                "opendkim-genkey",
                "-b",
                "2048",
                "-D",
                str(directory),
                "-d",
                "example.org",
                "-s",
                "bench",
            ],
            check=True,
        )
        shutil.chown(directory / "bench.private", "opendkim")
        shutil.chown(directory, "opendkim")  # its socket is made here, after it drops root
        self.socket = directory / "milter.sock"
        conf = directory / "opendkim.conf"
        conf.write_text(
            "Mode s\nDomain example.org\nSelector bench\n"
            f"KeyFile {directory / 'bench.private'}\nSocket local:{self.socket}\nUMask 000\n"
            "Canonicalization relaxed/simple\nSyslog no\nUserID opendkim\n"
            "RequireSafeKeys false\n"  # the key is under /tmp, which others may write
            f"PidFile {directory / 'opendkim.pid'}\n"
        )
        self.proc = subprocess.Popen(
            ["opendkim", "-f", "-x", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("opendkim did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


# -- our relay -----------------------------------------------------------------------------------


def relay(tmp: Path, delivery: str, *, http: bool = False) -> Server:
    """The relay as a process with a trusted listener; ``delivery`` is its [delivery];
    ``http``: an HTTP listener too, for /metrics."""
    config = tmp / "relay.toml"
    config.write_text(
        f'[relay]\ndata_dir = "{tmp / "var"}"\nlog_level = "warning"\n'
        '[smtp]\nlisteners = ["127.0.0.1:0 trusted"]\nhostname = "bench.test"\n'
        f'trusted_did = "{DID}"\nmax_connections_per_ip = 1000\n'
        + ("" if SESSION_PROCESSES[0] is None else f"processes = {SESSION_PROCESSES[0]}\n")
        + f"[http]\nlisteners = {HTTP_ON if http else '[]'}\n[delivery]\n{delivery}"
    )
    if not (tmp / "var" / "accounts.sqlite3").exists():
        _member(tmp / "var")
    return Server(
        [sys.executable, "-m", "atmosrelay", "serve", "--config", str(config)],
        tmp / "relay.out",
        "ready",
        r"listening on 127\.0\.0\.1:(\d+) \(trusted\)",
    )


def _member(var: Path) -> None:
    var.mkdir(parents=True, exist_ok=True)
    store = Store(var / "accounts.sqlite3")
    store.add_member(DID, "bench.test")
    domains.enroll(store, DID, "example.org", limit=2, clock_now=0)
    store.mark_verified("example.org", without_dns=True)
    store.set_limits(DID, hourly=100_000_000, daily=100_000_000)  # far from its limits
    store.close()


# delivery.processes for the relay's rows; None: the relay's default
DELIVERY_PROCESSES: list[int | None] = [None]
# smtp.processes (session processes) for the relay's rows; None: the relay's default
SESSION_PROCESSES: list[int | None] = [None]


def _delivering(sink: Sink) -> str:
    count = DELIVERY_PROCESSES[0]
    chosen = "" if count is None else f"processes = {count}\n"
    return f'smarthost = "127.0.0.1:{sink.port}"\nconcurrency = {CONCURRENCY}\n{chosen}'


# -- the rows ------------------------------------------------------------------------------------


# msgs/s; for the relay the CPU it spent a message (Cpu.stop); the machine's (Machine.stop)
Result = tuple[float, dict[str, float] | None, dict[str, float]]


def run_accept(side: str, tmp: Path, n: int, sessions: int, size: int, keep: bool) -> Result:
    if side == "relay":
        server = relay(tmp, "enabled = false\n")
        try:
            cpu, machine = Cpu(server.proc.pid), Machine()
            took = smtp_source(server.port, n, sessions, size, keep)
            spent, used = cpu.stop(n), machine.stop(n)
        finally:
            server.stop()
        return n / took, spent, used
    sink = Sink()
    peer = Postfix(tmp, sink.port, hold=True, concurrency=CONCURRENCY)
    try:
        machine = Machine()
        took = smtp_source(peer.port, n, sessions, size, keep)
        used = machine.stop(n)
    finally:
        peer.stop()
        sink.stop()
    return n / took, None, used


def run_e2e(side: str, tmp: Path, n: int, sessions: int, size: int) -> Result:
    sink = Sink()
    milter = OpenDkim(tmp / "dkim") if side == "postfix-dkim" else None
    try:
        if side == "relay":
            server: Server | Postfix = relay(tmp, _delivering(sink))
        else:
            server = Postfix(
                tmp,
                sink.port,
                hold=False,
                milter=milter.socket if milter is not None else None,
                concurrency=CONCURRENCY,
            )
        try:
            cpu = Cpu(server.proc.pid) if isinstance(server, Server) else None
            machine = Machine()
            t0 = time.time()
            smtp_source(server.port, n, sessions, size, keep_open=True)
            t1 = sink.wait_for(n, 300)
            spent = cpu.stop(n) if cpu is not None else None
            used = machine.stop(n)
        finally:
            server.stop()
    finally:
        sink.stop()
        if milter is not None:
            milter.stop()
    if t1 is None:
        raise RuntimeError(f"{side}: only {sink.count} of {n} arrived at the sink")
    return n / (t1 - t0), spent, used


def run_restart(side: str, tmp: Path, n: int, *, killed: bool = False) -> dict[str, float]:
    """Seconds from the start to the first and to the last delivery of ``n`` queued. The
    relay restarts after a run that queued them (delivery off) and was stopped by SIGTERM,
    which writes the queue checkpoint; or, ``killed``, by kill -9, which does not, so the
    start folds the whole journal."""
    sink = Sink()
    try:
        if side == "relay":
            _member(tmp / "var")
            head = f"From: {SENDER}\r\nTo: {RCPT}\r\nSubject: queued\r\n\r\n".encode()
            body = head + (b"y" * 76 + b"\r\n") * ((KIB - len(head)) // 78)
            queue_in_journal(tmp / "var" / "journal", n, body)
            _run_before(tmp, killed)
            t0 = time.time()
            server = relay(tmp, _delivering(sink))
            try:
                t_all = sink.wait_for(n, 900)
                rss = _peak_rss_mb(server.proc.pid)
                children_rss = _children_peak_rss_mb(server.proc.pid)
            finally:
                server.stop()
        else:
            held = Postfix(tmp, sink.port, hold=True, concurrency=CONCURRENCY)
            smtp_source(held.port, n, 50, KIB, keep_open=True)
            held.stop()
            t0 = time.time()
            peer = Postfix(tmp, sink.port, hold=False, concurrency=CONCURRENCY)
            peer.release_held()
            try:
                t_all = sink.wait_for(n, 900)
            finally:
                peer.stop()
            rss = children_rss = float("nan")
    finally:
        sink.stop()
    if t_all is None or sink.first is None:
        raise RuntimeError(f"{side}: only {sink.count} of {n} arrived at the sink")
    return {
        "first_s": sink.first - t0,
        "all_s": t_all - t0,
        "peak_rss_mb": rss,
        "delivery_processes_peak_rss_mb": children_rss,
    }


def _run_before(tmp: Path, killed: bool) -> None:
    """The run before the restart: it folds the queue and brings the status index up to date
    (as a relay that has been running has it), then stops cleanly or is killed."""
    server = relay(tmp, "enabled = false\n")
    deadline = time.monotonic() + 300
    while "status index:" not in server.out.read_text():  # its rebuild from the journal
        if time.monotonic() > deadline:
            raise RuntimeError(f"the status index never caught up: {server.out.read_text()}")
        time.sleep(0.1)
    if killed:
        server.proc.kill()
        server.proc.wait()
        return
    said = server.stop()
    if "queue checkpoint: " not in said:
        raise RuntimeError(f"the stop wrote no queue checkpoint: {said}")


def postfix_missing() -> str:
    """Why the Postfix rows cannot run here, or "" when they can."""
    missing = [t for t in ("postfix", "smtp-source", "smtp-sink") if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not installed"
    return "Postfix's master needs root" if os.geteuid() != 0 else ""


# -- the floor ----------------------------------------------------------------------------------


def signing_floor(size: int, seconds: float = 2.0) -> dict[str, float]:
    """What the three signatures alone cost: the relay's own ``Signer`` (member RSA-2048 and
    Ed25519, operator RSA-2048, as every delivered message carries) timed on one core, and
    the most messages a second both cores could sign if they did nothing else. No end-to-end
    rate, of the relay or of anything that signs like it, can be above that ceiling."""
    rsa_a, ed, rsa_b = (
        dkim_keys.generate_rsa(),
        dkim_keys.generate_ed25519(),
        dkim_keys.generate_rsa(),
    )
    signer = Signer(
        [
            SigningKey("example.org", "benchr", "rsa", rsa_a.private),
            SigningKey("example.org", "benche", "ed25519", ed.private),
            SigningKey("atmosrelay.localhost", "op", "rsa", rsa_b.private),
        ]
    )
    body = (b"x" * 76 + b"\r\n") * max(1, size // 78)
    message = (
        b"From: <bench@example.org>\r\nTo: <sink@example.net>\r\nSubject: floor\r\n"
        b"Date: Fri, 27 Nov 2026 12:00:00 +0000\r\nMessage-ID: <floor@example.org>\r\n\r\n" + body
    )
    signed, start = 0, time.process_time()
    while (spent := time.process_time() - start) < seconds:
        signer.sign(message)
        signed += 1
    per_message = spent / signed
    cores = os.cpu_count() or 1
    return {"size": size, "ms": round(1000 * per_message, 3), "ceiling": round(cores / per_message)}


# -- the table -----------------------------------------------------------------------------------


def _rows(quick: bool, only: set[str] | None, has_dkim: bool) -> list[dict[str, Any]]:
    scale = 5 if quick else 1
    rows: list[dict[str, Any]] = []

    def add(work: str, size: int, sessions: int, n: int) -> None:
        if only is None or work in only:
            rows.append({"work": work, "size": size, "sessions": sessions, "n": n // scale})

    for size, n in ((KIB, 10_000), (100 * KIB, 3_000)):
        for sessions in (10, 50, 100):
            add("accept", size, sessions, n)
    for sessions in (10, 50):
        add("perconn", KIB, sessions, 5_000)
    for size, n in ((KIB, 5_000), (100 * KIB, 2_000)):
        for sessions in (10, 50):
            add("e2e", size, sessions, n)
            if has_dkim:
                add("e2e-postfix-dkim", size, sessions, n)
    return rows


def measure(row: dict[str, Any], side: str) -> Result:
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as d:
        tmp = Path(d)
        work, n, s, size = row["work"], row["n"], row["sessions"], row["size"]
        if work in ("accept", "perconn"):
            return run_accept(side, tmp, n, s, size, keep=work == "accept")
        if side == "relay":
            return run_e2e("relay", tmp, n, s, size)
        return run_e2e("postfix-dkim" if work == "e2e-postfix-dkim" else "postfix", tmp, n, s, size)


# issue 15's end-to-end targets: the relay against Postfix without DKIM, and with OpenDKIM
E2E_TARGETS = {"e2e": 1.5, "e2e-postfix-dkim": 3.0}


# ... and its accepting targets: work -> {size: times Postfix}
ACCEPT_TARGETS = {"accept": {KIB: 3.0, 100 * KIB: 2.0}, "perconn": {KIB: 2.0}}


def machine_budget_ms(rate: float) -> float:
    """The ms of the machine's CPU a message that ``rate`` msgs/s leaves, every core busy."""
    return 1000 * (os.cpu_count() or 1) / rate


def target_reach(times: float, row: dict[str, Any]) -> str:
    """Whether ``times`` Postfix's rate fits this machine at the CPU a message it spent with
    the relay: the target rate leaves the machine's cores, all busy, so many ms a message."""
    target = times * row["peer"]
    budget = machine_budget_ms(target)
    spent, busy = row["machine_cpu_ms"]["relay"], row["busy"]["relay"]
    verdict = (
        f"beyond this machine at that cost ({spent / budget:.2f}x the budget)"
        if spent > budget
        else f"within reach with {100 * spent / budget:.0f}% of the cores busy"
    )
    return (
        f"  reach {row['work']} {row['size'] // KIB} KiB {row['sessions']} sessions: {times}x "
        f"{row['peer']:.0f} = {target:.0f} msgs/s leaves {budget:.2f} ms of the machine a "
        f"message; with the relay it spent {spent:.2f} ms, {100 * busy:.0f}% busy: {verdict}"
    )


def _print_targets(floors: dict[int, dict[str, float]], table: list[dict[str, Any]]) -> None:
    for t in table:
        times = ACCEPT_TARGETS.get(t["work"], {}).get(t["size"]) or E2E_TARGETS.get(t["work"])
        if times is not None:
            print(target_reach(times, t))
    for size, floor in floors.items():
        print(
            f"signing floor, {size // KIB} KiB: three signatures {floor['ms']:.2f} ms of CPU a "
            f"message; all {os.cpu_count()} cores signing and nothing else: at most "
            f"{floor['ceiling']:.0f} msgs/s"
        )
    for t in table:
        times = ACCEPT_TARGETS.get(t["work"], {}).get(t["size"])
        if times is not None:
            target, c = times * t["peer"], t["relay_cpu_ms"]
            print(
                f"  target {t['work']} {t['size'] // KIB} KiB {t['sessions']} sessions: "
                f"{times}x {t['peer']:.0f} = {target:.0f} msgs/s: one accepting process has "
                f"{1000 / target:.2f} ms of a core a message; it spends {c['user']:.2f} ms "
                f"in user space and {c['sys']:.2f} ms in the kernel now"
            )
        if t["work"] in E2E_TARGETS and t["size"] in floors:
            target = E2E_TARGETS[t["work"]] * t["peer"]
            ceiling = floors[t["size"]]["ceiling"]
            # all the machine's CPU, a message, at the target's rate; what signing leaves of it
            budget = machine_budget_ms(target)
            rest, c = budget - floors[t["size"]]["ms"], t["relay_cpu_ms"]
            spent = c["user"] + c["sys"] + c["delivery"] - floors[t["size"]]["ms"]
            print(
                f"  target {t['work']} {t['size'] // KIB} KiB {t['sessions']} sessions: "
                f"{E2E_TARGETS[t['work']]}x {t['peer']:.0f} = {target:.0f} msgs/s, "
                f"{100 * target / ceiling:.0f}% of the signing ceiling: {budget:.2f} ms of CPU a "
                f"message, {rest:.2f} ms besides signing for accepting, journaling and sending "
                f"it (the relay spends {spent:.2f} ms now, the client and sink beside)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round, a fifth of the mail")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--restart", type=int, help="messages queued for the restart row")
    parser.add_argument("--only", help="works to run, e.g. accept,e2e,restart")
    parser.add_argument(
        "--delivery-processes",
        type=int,
        help="the relay's delivery.processes (default: its own default)",
    )
    parser.add_argument(
        "--session-processes",
        type=int,
        help="the relay's smtp.processes (default: its own default)",
    )
    args = parser.parse_args()
    DELIVERY_PROCESSES[0] = args.delivery_processes
    SESSION_PROCESSES[0] = args.session_processes
    rounds = args.rounds or (1 if args.quick else 3)
    only = set(args.only.split(",")) if args.only else None
    why = postfix_missing()
    if why:
        print(f"bench_peers: no Postfix rows: {why} (see this script's docstring)")
        return
    has_dkim = shutil.which("opendkim") is not None and shutil.which("opendkim-genkey") is not None
    if not has_dkim and not args.json:
        print("bench_peers: opendkim not installed: no e2e-postfix-dkim rows")
    rows = _rows(args.quick, only, has_dkim)
    # The relay as installed from a wheel, with its bytecode: where PYTHONDONTWRITEBYTECODE
    # is set (this machine sets it) a checkout's modules are compiled again at every start
    # of the relay and of each delivery process, 0.4-0.7 s of the restart row's first
    # delivery that no installed relay pays.
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(ROOT / "atmosrelay"), str(ROOT / "journal")],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    # measured first, on an idle machine: what no signing relay can beat on these cores
    floors = {
        size: signing_floor(size)
        for size in sorted({r["size"] for r in rows if r["work"].startswith("e2e")})
    }
    results: dict[int, dict[str, list[float]]] = {
        i: {"relay": [], "peer": []} for i in range(len(rows))
    }
    cpus: dict[int, list[dict[str, float]]] = {i: [] for i in range(len(rows))}
    machines: dict[int, dict[str, list[dict[str, float]]]] = {
        i: {"relay": [], "peer": []} for i in range(len(rows))
    }
    relay_e2e: dict[tuple[int, int, int], Result] = {}  # (round, size, sessions) -> relay e2e
    for r in range(rounds):
        for i, row in enumerate(rows):
            sides = ["relay", "peer"] if r % 2 == 0 else ["peer", "relay"]
            for side in sides:
                key = (r, row["size"], row["sessions"])
                if row["work"] == "e2e-postfix-dkim" and side == "relay" and key in relay_e2e:
                    value = relay_e2e[key]  # the same relay run as the e2e row's
                else:
                    value = measure(row, side)
                if row["work"] == "e2e" and side == "relay":
                    relay_e2e[key] = value
                rate, cpu, used = value
                results[i][side].append(rate)
                machines[i][side].append(used)
                if cpu is not None:
                    cpus[i].append(cpu)
            row["load"] = _load()
            if not args.json:
                print(
                    f"  round {r + 1}: {row['work']:<17} {row['size'] // KIB:>4} KiB "
                    f"{row['sessions']:>3} sessions: relay {results[i]['relay'][-1]:8.0f} "
                    f"peer {results[i]['peer'][-1]:8.0f} msgs/s",
                    file=sys.stderr,
                    flush=True,
                )
    table = []
    for i, row in enumerate(rows):
        ours = statistics.median(results[i]["relay"])
        peer = statistics.median(results[i]["peer"])
        table.append(
            {
                "work": row["work"],
                "size": row["size"],
                "sessions": row["sessions"],
                "relay": round(ours, 1),
                "peer": round(peer, 1),
                "ratio": round(ours / peer, 2),
                "load": row["load"],
                # medians over the rounds, ms a message (Cpu.stop)
                "relay_cpu_ms": {
                    k: statistics.median(c[k] for c in cpus[i]) for k in ("user", "sys", "delivery")
                },
                # medians over the rounds: every core's CPU ms a message, and the cores' busy
                # share, with each server (Machine.stop)
                "machine_cpu_ms": {
                    side: statistics.median(m["ms"] for m in machines[i][side])
                    for side in ("relay", "peer")
                },
                "busy": {
                    side: statistics.median(m["busy"] for m in machines[i][side])
                    for side in ("relay", "peer")
                },
            }
        )
    restart: dict[str, Any] | None = None
    if only is None or "restart" in only:
        n = args.restart or (10_000 if args.quick else 100_000)
        restart = {"queued": n}
        for side in ("relay", "relay_killed", "postfix"):
            with tempfile.TemporaryDirectory(prefix="bench-peers-") as d:
                name = side.split("_")[0]
                restart[side] = run_restart(name, Path(d), n, killed=side == "relay_killed")
        restart["load"] = _load()
    if args.json:
        print(
            json.dumps(
                {
                    "rows": table,
                    "restart": restart,
                    "signing_floor": list(floors.values()),
                    "machine": platform.platform(),
                }
            )
        )
        return
    print(
        f"{'work':<17} {'size':>7} {'sessions':>8} {'relay':>9} {'Postfix':>9} {'ratio':>6} "
        f"{'load':>5}   relay CPU ms/msg: user sys delivery   machine ms/msg, busy: "
        "relay Postfix"
    )
    for t in table:
        c, m, b = t["relay_cpu_ms"], t["machine_cpu_ms"], t["busy"]
        print(
            f"{t['work']:<17} {t['size'] // KIB:>4} KiB {t['sessions']:>8} {t['relay']:>9.0f} "
            f"{t['peer']:>9.0f} {t['ratio']:>5.2f}x {t['load']:>5.2f}   "
            f"{c['user']:>21.2f} {c['sys']:>4.2f} {c['delivery']:>8.2f}   "
            f"{m['relay']:>5.2f} {100 * b['relay']:3.0f}% {m['peer']:>5.2f} {100 * b['peer']:3.0f}%"
        )
    _print_targets(floors, table)
    if restart:
        ours, peer = restart["relay"], restart["postfix"]
        killed = restart["relay_killed"]
        print(
            f"restart, {restart['queued']} queued: first delivery relay {ours['first_s']:.2f} s "
            f"(after kill -9, without the checkpoint: {killed['first_s']:.2f} s), "
            f"Postfix {peer['first_s']:.2f} s; all delivered relay {ours['all_s']:.1f} s, "
            f"Postfix {peer['all_s']:.1f} s ({peer['all_s'] / ours['all_s']:.2f}x); relay peak "
            f"RSS {ours['peak_rss_mb']:.0f} MB (delivery processes "
            f"{ours['delivery_processes_peak_rss_mb']:.0f} MB more); load {restart['load']:.2f}"
        )


if __name__ == "__main__":
    main()
