"""The command line through its real entry point (``python -m atmosrelay``)."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
import trio

from atmosrelay.queue import checkpoint
from atmosrelay.queue.records import (
    Delivery,
    Outcome,
    RecordType,
    encode_accepted,
    encode_delivery,
)
from atmosrelay.queue.store import QueueStore
from atmosrelay.replay import REPLAY_BAR_RECORDS, progress_bar
from journal import Log, OsFS, open_journal
from journal._format import FRAME_HEADER_SIZE, segment_name
from tests.processes import delivery_pids, exited
from tests.queue.factories import accepted_record

ROOT = Path(__file__).resolve().parents[1]


def run(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "atmosrelay", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def make_journal(directory: Path, n: int = 10) -> list[int]:
    log, _ = Log.open(OsFS(), str(directory), segment_size=64 * 1024)
    offsets = [
        log.write_batch([(100 + i % 2, b"record %d" % i + b"." * 500)])[0].offset for i in range(n)
    ]
    return offsets  # not closed: like a crash, so the last batch is not attested


def test_check_healthy_journal(tmp_path: Path) -> None:
    make_journal(tmp_path / "j")
    result = run("journal", "check", str(tmp_path / "j"))
    assert result.returncode == 0, result.stderr
    assert "10 records" in result.stdout
    assert "healthy" in result.stdout
    data = json.loads(run("journal", "check", str(tmp_path / "j"), "--json").stdout)
    assert data["status"] == "healthy"
    assert data["records"] == 10


def test_check_torn_tail_exits_1_and_modifies_nothing(tmp_path: Path) -> None:
    offsets = make_journal(tmp_path / "j")
    seg = tmp_path / "j" / segment_name(1)
    seg.write_bytes(seg.read_bytes()[: offsets[-1] + FRAME_HEADER_SIZE + 3])
    before = seg.read_bytes()
    result = run("journal", "check", str(tmp_path / "j"), "--json")
    assert result.returncode == 1
    data = json.loads(result.stdout)
    assert data["status"] == "torn-tail"
    assert data["torn_tail"]["offset"] == offsets[-1]
    assert seg.read_bytes() == before


def test_check_corruption_exits_2_with_segment_and_offset(tmp_path: Path) -> None:
    offsets = make_journal(tmp_path / "j")
    seg = tmp_path / "j" / segment_name(1)
    data = bytearray(seg.read_bytes())
    data[offsets[3] + FRAME_HEADER_SIZE + 2] ^= 1
    seg.write_bytes(bytes(data))
    result = run("journal", "check", str(tmp_path / "j"))
    assert result.returncode == 2
    assert f"CORRUPT: segment 1 at offset {offsets[3]}" in result.stdout


def test_dump_lists_every_record(tmp_path: Path) -> None:
    offsets = make_journal(tmp_path / "j", n=5)
    result = run("journal", "dump", str(tmp_path / "j"))
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert [line.split("\t")[2] for line in lines] == [f"1:{o}" for o in offsets]
    js = [
        json.loads(x)
        for x in run("journal", "dump", str(tmp_path / "j"), "--json").stdout.splitlines()
    ]
    assert [(r["seq"], r["type"], r["offset"], r["size"]) for r in js] == [
        (i + 1, 100 + i % 2, offsets[i], len(b"record %d" % i) + 500) for i in range(5)
    ]


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    for action in ("check", "dump"):
        result = run("journal", action, str(tmp_path / "nope"))
        assert result.returncode == 64
        assert f"no journal directory at {tmp_path / 'nope'}" in result.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[journal]\nsegment_size = "big"\n', "journal.segment_size: expected an integer >= 65536"),
        ("[journal]\nsegment_size = 10\n", "journal.segment_size: expected an integer >= 65536"),
        ("[jornal]\n", "jornal: unknown section; known: relay, journal"),
        ("[relay]\ndata_der = 'x'\n", "relay.data_der: unknown setting"),
        ("[relay]\nlog_level = 'loud'\n", "relay.log_level: expected one of"),
        ("[relay\n", "not valid TOML"),
        ("relay = 3\n", "relay: expected a table"),
    ],
)
def test_invalid_config_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "relay.toml").write_text(text)
    result = run("serve", "--config", str(tmp_path / "relay.toml"))
    assert result.returncode == 64
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_unreadable_config_and_env_var(tmp_path: Path) -> None:
    result = run("serve", env={"ATMOSRELAY_CONFIG": str(tmp_path / "missing.toml")})
    assert result.returncode == 64
    assert "cannot read" in result.stderr


def _config(tmp_path: Path, more: str = "") -> str:
    """A config of a data directory under ``tmp_path`` and ``more``; its path."""
    (tmp_path / "relay.toml").write_text(f'[relay]\ndata_dir = "{tmp_path / "var"}"\n{more}')
    return str(tmp_path / "relay.toml")


def _serve(tmp_path: Path, more: str = "") -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "atmosrelay", "serve", "--config", _config(tmp_path, more)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def run_serve(tmp_path: Path, more: str = "") -> subprocess.CompletedProcess[str]:
    """``serve`` run until it exits by itself (60 s at most)."""
    return run("serve", "--config", _config(tmp_path, more))


def _until_ready(proc: subprocess.Popen[str]) -> list[str]:
    """The lines the relay printed up to "ready" (killed after 60 s: never wait forever)."""
    assert proc.stdout is not None
    lines = []
    deadline = threading.Timer(60, proc.kill)
    deadline.start()
    try:
        for line in proc.stdout:
            lines.append(line.strip())
            if "atmosrelay: ready;" in line:
                return lines
    finally:
        deadline.cancel()
    raise AssertionError(f"never ready: {lines} {proc.stderr.read() if proc.stderr else ''}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_recovers_reports_and_stops_on_signal(tmp_path: Path, sig: signal.Signals) -> None:
    offsets = make_journal(tmp_path / "var" / "journal", n=7)
    seg = tmp_path / "var" / "journal" / segment_name(1)
    seg.write_bytes(seg.read_bytes()[: offsets[-1] + 5])  # tear the last record
    proc = _serve(tmp_path)
    try:
        lines = _until_ready(proc)
        assert any("6 record(s)" in x and "torn tail in segment 1" in x for x in lines), lines
        # First start: the operator's DKIM key is generated, and what to publish is said.
        assert any("generated the operator DKIM key for d=atmosrelay.localhost" in x for x in lines)
        key_file = tmp_path / "var" / "dkim" / "operator-rsa.pem"
        assert key_file.stat().st_mode & 0o777 == 0o600
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert f"{sig.name} received" in out
    assert "journal closed" in out
    check = run("journal", "check", str(tmp_path / "var" / "journal"), "--json")
    assert check.returncode == 0
    assert json.loads(check.stdout)["broken_files"] == [segment_name(1) + ".broken"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_whole_process_group_stops_the_relay_as_one(
    tmp_path: Path, sig: signal.Signals
) -> None:
    # Ctrl-C in a terminal, `timeout` or `kill -TERM -PGID` signal the delivery processes
    # too: only the owner may stop them (its drain lets their attempts in hand finish)
    proc = _serve(tmp_path)
    try:
        lines = _until_ready(proc)
        assert any("delivery processes started" in x for x in lines), lines
        couriers = delivery_pids("\n".join(lines))
        assert couriers, lines
        for pid in couriers:  # what a group signal does to them
            os.kill(pid, sig)
        assert not any(exited([pid], 2.0) for pid in couriers)
        proc.send_signal(sig)  # and to the owner: it stops, and stops them
        out, err = proc.communicate(timeout=30)
        assert exited(couriers, 10.0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert f"{sig.name} received" in out and "journal closed" in out
    assert "delivery process" not in out + err  # none exited before the owner let it go


def test_serve_refuses_a_corrupt_journal_and_modifies_nothing(tmp_path: Path) -> None:
    offsets = make_journal(tmp_path / "var" / "journal")
    seg = tmp_path / "var" / "journal" / segment_name(1)
    data = bytearray(seg.read_bytes())
    data[offsets[2] + 30] ^= 0xFF
    seg.write_bytes(bytes(data))
    proc = _serve(tmp_path)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert f"segment 1 at offset {offsets[2]}" in err
    assert "atmosrelay journal check" in err
    assert seg.read_bytes() == bytes(data)
    assert sorted(os.listdir(tmp_path / "var" / "journal")) == [segment_name(1)]


def test_config_defaults_is_valid_and_complete() -> None:
    result = run("config", "defaults")
    assert result.returncode == 0
    assert "segment_size = 67108864" in result.stdout


def test_serve_refuses_a_record_it_cannot_read(tmp_path: Path) -> None:
    log, _ = Log.open(OsFS(), str(tmp_path / "var" / "journal"))
    log.write_batch([(1, b"not an accepted record")])  # type 1 is ACCEPTED
    log.close()
    proc = _serve(tmp_path)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "journal record seq 1 at 1:57 is not a valid ACCEPTED record" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("section", ["smtp", "http"])
def test_serve_names_a_port_it_cannot_listen_on(tmp_path: Path, section: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        smtp = f"127.0.0.1:{port} starttls" if section == "smtp" else "127.0.0.1:0 starttls"
        http = f"127.0.0.1:{port}" if section == "http" else "127.0.0.1:0"
        (tmp_path / "relay.toml").write_text(
            f'[relay]\ndata_dir = "{tmp_path / "var"}"\n[smtp]\nlisteners = ["{smtp}"]\n'
            f'[http]\nlisteners = ["{http}"]\n[delivery]\nenabled = false\n'
        )
        result = run("serve", "--config", str(tmp_path / "relay.toml"))
    assert result.returncode == 1
    assert (
        f"refusing to start: cannot listen on 127.0.0.1:{port}: Address already in use; "
        f"another program may hold the port, or change {section}.listeners"
    ) in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["config defaults", "journal dump", "queue list"])
def test_a_closed_standard_output_ends_quietly(tmp_path: Path, command: str) -> None:
    """`atmosrelay queue list | head` and the like: the reader is gone before the first
    write (its end of the pipe is closed before the process starts), so the outcome does
    not depend on timing. Not an error (exit 0, as `journal dump` always did), no traceback."""
    args = command.split()
    if command == "journal dump":
        make_journal(tmp_path / "j")
        args.append(str(tmp_path / "j"))
    if command == "queue list":
        (tmp_path / "relay.toml").write_text(f'[relay]\ndata_dir = "{tmp_path / "var"}"\n')
        make_journal(tmp_path / "var" / "journal", 0)
        args += ["--json", "--config", str(tmp_path / "relay.toml")]
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "atmosrelay", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (0, "")


def test_queue_show_json_of_a_message_never_tried_and_of_a_deferred_one(tmp_path: Path) -> None:
    """Read offline from the journal: a message with no attempt yet shares an empty, read-only
    retry map (queue/state.py); the JSON gives it as an empty object all the same."""
    (tmp_path / "relay.toml").write_text(f'[relay]\ndata_dir = "{tmp_path / "var"}"\n')
    fresh = accepted_record("bob@example.net", queue_id="01" + "A" * 24)
    tried = accepted_record("carol@example.net", queue_id="01" + "B" * 24)
    outcome = Outcome("carol@example.net", "deferred", "4.2.1", "451 busy", 1, 1_800_000_600.0)
    log, _ = Log.open(OsFS(), str(tmp_path / "var" / "journal"))
    log.write_batch(
        [
            (RecordType.ACCEPTED, encode_accepted(fresh, b"Subject: a\r\n\r\nbody\r\n")),
            (RecordType.ACCEPTED, encode_accepted(tried, b"Subject: b\r\n\r\nbody\r\n")),
            (RecordType.DELIVERY, encode_delivery(Delivery(tried.id, 1.8e9, None, (outcome,)))),
        ]
    )
    log.close()
    config = ["--config", str(tmp_path / "relay.toml")]
    shown = [run("queue", "show", m.id, "--json", *config) for m in (fresh, tried)]
    assert [(r.returncode, r.stderr) for r in shown] == [(0, ""), (0, "")]
    first, second = (json.loads(r.stdout) for r in shown)
    assert (first["next_attempt"], first["history"]) == ({}, [])
    assert second["next_attempt"] == {"carol@example.net": 1_800_000_600.0}
    assert [o["status"] for o in second["history"][0]["outcomes"]] == ["4.2.1"]
    # the record by its attribute names (the journal's head uses shorter ones: "t", "from")
    assert first["record"]["accepted_at"] == fresh.accepted_at
    assert (first["record"]["sender"], first["record"]["message_id"]) == (fresh.sender, "")
    assert first["record"]["recipients"] == [
        {"addr": "bob@example.net", "notify": None, "orcpt": None, "suppressed": False}
    ]


def on_terminal(
    argv: list[str], then: Callable[[subprocess.Popen[str]], None] = lambda _: None
) -> tuple[int, str, bytes]:
    """Run the CLI with its standard error on a terminal (a pty 80 columns wide, as an
    operator's); ``then`` acts on the running process. Returns its exit code, its standard
    output and what the terminal was shown."""
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    shown = bytearray()

    def drain() -> None:  # read while it runs: a pty keeps little once its writer is gone
        while True:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # EIO: the terminal's other side is closed
                return
            if not chunk:
                return
            shown.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        code, out, _ = drive(argv, secondary, then)
    finally:
        os.close(secondary)
        reader.join(10)
        os.close(primary)
    return code, out, bytes(shown)


def drive(
    argv: list[str], stderr: int, then: Callable[[subprocess.Popen[str]], None]
) -> tuple[int, str, str | None]:
    """Run the CLI, let ``then`` act on the running process, and wait for it to exit:
    (exit code, standard output, standard error when piped)."""
    with subprocess.Popen(
        [sys.executable, "-m", "atmosrelay", *argv],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    ) as proc:
        try:
            then(proc)
            out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
    return proc.returncode, out, err


def test_journal_check_shows_progress_on_a_terminal_only(tmp_path: Path) -> None:
    make_journal(tmp_path / "j", n=300)  # 150 KiB in 64 KiB segments: three of them
    quiet = run("journal", "check", str(tmp_path / "j"))
    assert quiet.returncode == 0 and quiet.stderr == ""  # a pipe: no bar
    code, out, shown = on_terminal(["journal", "check", str(tmp_path / "j")])
    assert code == 0 and "healthy" in out
    assert b"segment" in shown, (
        shown
    )  # the bar (redrawn at most every 0.1 s: a fast check shows its start)


def test_a_long_replay_shows_progress_on_a_terminal_only(tmp_path: Path) -> None:
    """A journal of REPLAY_BAR_RECORDS queued messages: the serve command draws a bar on a
    terminal while it folds them, and nothing on a pipe."""
    log, _ = Log.open(OsFS(), str(tmp_path / "var" / "journal"))
    for start in range(0, REPLAY_BAR_RECORDS, 5000):
        log.write_batch(
            [
                (
                    int(RecordType.ACCEPTED),
                    encode_accepted(accepted_record(f"r{i}@example.net"), b"x"),
                )
                for i in range(start, start + 5000)
            ]
        )
    log.close()
    (tmp_path / "relay.toml").write_text(
        f'[relay]\ndata_dir = "{tmp_path / "var"}"\n'
        '[smtp]\nlisteners = ["127.0.0.1:0 starttls"]\n'
        "[http]\nlisteners = []\n[delivery]\nenabled = false\n"
    )
    argv = ["serve", "--config", str(tmp_path / "relay.toml")]
    seen: list[str] = []

    def stop_when_ready(proc: subprocess.Popen[str]) -> None:
        seen.extend(_until_ready(proc))
        proc.send_signal(signal.SIGTERM)

    code, out, shown = on_terminal(argv, stop_when_ready)
    assert code == 0, out
    assert any(f"queue: {REPLAY_BAR_RECORDS} message(s) recovered" in x for x in seen), seen
    assert b"replaying the journal" in shown, shown
    code, _, err = drive(argv, subprocess.PIPE, stop_when_ready)
    assert code == 0
    assert err is not None and "replaying" not in err  # a pipe (a service's journal): no bar


def test_no_bar_is_built_for_a_pipe(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off a terminal the fold gets its records as they are: no disabled bar (tqdm would
    still be imported and start its monitor thread for the life of the process)."""
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress_bar(REPLAY_BAR_RECORDS) is iter
    assert progress_bar(REPLAY_BAR_RECORDS - 1) is iter


def test_a_checkpoint_chunk_that_does_not_decode_stops_serve_and_the_next_start_folds(
    tmp_path: Path,
) -> None:
    """The chunks of the queue checkpoint are decoded after delivery has begun (queue/
    checkpoint.py), past the point where the start could fold the journal instead: one that
    does not decode under a good CRC (a fault of this program's) stops the relay with the
    reason, without a traceback, and removes the file so that the next start folds."""
    var = tmp_path / "var"
    path = var / checkpoint.CHECKPOINT_NAME
    body = b"Subject: x\r\n\r\nhello\r\n"

    async def queue_three() -> None:
        async with open_journal(str(var / "journal")) as journal:
            queue = QueueStore(journal)
            for i in range(3):
                await queue.accept(accepted_record(f"r{i}@example.net", size=len(body)), body)
            said = checkpoint.save(OsFS(), str(path), queue.state, journal, first=0, chunk=2)
            assert said.startswith("queue checkpoint: 3 message(s)"), said

    trio.run(queue_three)
    written = checkpoint._DECODER.decode(path.read_bytes()[checkpoint._HEAD.size :])
    broken = msgspec.msgpack.encode(
        msgspec.structs.replace(written, more=[msgspec.Raw(b"\x91\x01"), written.more[1]])
    )
    path.write_bytes(
        checkpoint._HEAD.pack(checkpoint.MAGIC, zlib.crc32(broken), len(broken)) + broken
    )
    with socket.socket() as closed:  # delivery goes nowhere: a loopback port nobody serves
        closed.bind(("127.0.0.1", 0))
        nowhere = f'[delivery]\nsmarthost = "127.0.0.1:{closed.getsockname()[1]}"\n'
        result = run_serve(tmp_path, nowhere)
        assert result.returncode == 1, result.stderr
        assert "stopped: the queue checkpoint is unusable (a chunk of its messages" in result.stderr
        assert "Traceback" not in result.stderr
        assert not path.exists()
        proc = _serve(tmp_path, nowhere)
        try:
            lines = _until_ready(proc)
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert any(line.endswith("queue: 3 message(s) recovered") for line in lines), lines
