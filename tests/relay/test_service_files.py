"""contrib/: the systemd unit passes systemd-analyze, the relay speaks the readiness protocol
the unit's Type=notify relies on, and the container's files are what the relay accepts."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from atmosrelay.config import parse_config
from tests.relay.test_kill import ROOT, Server, write_config

UNIT = ROOT / "contrib" / "systemd" / "atmosrelay.service"
CONTAINER = ROOT / "contrib" / "container"


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        if os.environ.get("CI"):  # .ci/run installs it: its absence there is a failure
            pytest.fail("systemd-analyze is not installed")
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    # the unit as installed, its ExecStart pointing at this checkout's entry point (verify
    # checks that the program exists)
    program = Path(sys.executable).parent / "atmosrelay"
    assert program.exists(), program
    unit = tmp_path / "atmosrelay.service"
    unit.write_text(UNIT.read_text().replace("/opt/atmosrelay/bin/atmosrelay", str(program)))
    result = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "KillSignal=SIGTERM",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/atmosrelay",
        "NoNewPrivileges=true",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
    ):
        assert f"\n{line}\n" in text, line
    # stop waits longer than the two graces of the drain (30 s + 30 s by default)
    stop = int(re.search(r"\nTimeoutStopSec=(\d+)\n", text).group(1))  # type: ignore[union-attr]
    defaults = parse_config("")
    assert stop > defaults.smtp.shutdown_grace + defaults.delivery.drain_grace


def test_ready_reloading_and_stopping_reach_the_service_manager(tmp_path: Path) -> None:
    config, _, _ = write_config(tmp_path)
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(path))
        manager.settimeout(30)
        os.environ["NOTIFY_SOCKET"] = str(path)
        try:
            server = Server(tmp_path, config, 0)
        finally:
            del os.environ["NOTIFY_SOCKET"]
        try:
            ready = manager.recv(4096).decode()
            assert ready.startswith("READY=1\n") and "STATUS=accepting mail" in ready, ready
            # READY means mail can be accepted: the listener answers
            with socket.create_connection(("127.0.0.1", server.port), timeout=10):
                pass
            server.proc.send_signal(signal.SIGHUP)
            reloading = manager.recv(4096).decode()
            assert reloading.startswith("RELOADING=1\nMONOTONIC_USEC="), reloading
            assert manager.recv(4096) == b"READY=1"
            server.proc.send_signal(signal.SIGTERM)
            assert manager.recv(4096).startswith(b"STOPPING=1")
            assert server.proc.wait(30) == 0
        finally:
            if server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait()


def test_the_container_files_are_what_the_relay_accepts() -> None:
    config = parse_config((CONTAINER / "relay.toml").read_text(), source="container")
    assert str(config.data_dir) == "/var/lib/atmosrelay"
    recipe = (CONTAINER / "Containerfile").read_text()
    assert "VOLUME /var/lib/atmosrelay" in recipe
    for line in re.findall(r"^COPY (.+) \S+$", recipe, re.M):
        for source in line.split():
            assert (ROOT / source).exists(), source
