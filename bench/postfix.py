"""A throwaway Postfix: an instance configured under a directory of its own (its own
config_directory, queue_directory, data_directory and loopback port; the system's Postfix,
running or not, is never touched), started and stopped with ``postfix -c DIR``. It needs
root, as Postfix's master does.

``bench_peers.py`` runs it as the peer the relay is measured against; the delivery tests
run it as a remote MX that is not ours (``tests/delivery/test_postfix_remote.py``), holding
what it accepts so the test can read it back with ``postcat``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reachable(directory: Path) -> None:
    """Let other users (postfix, opendkim) traverse to ``directory`` (a temporary
    directory is 0700)."""
    for p in (directory, *directory.parents):
        if p == Path("/"):
            break
        p.chmod(p.stat().st_mode | 0o055)


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
proxywrite unix - - n - 1 proxymap
smtp unix - - n - - smtp
relay unix - - n - - smtp
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"""


class Postfix:
    """A Postfix instance under ``directory``: smtpd on a free loopback port, relaying all
    mail to ``sink_port``; ``hold`` keeps every accepted message in the hold queue."""

    def __init__(
        self,
        directory: Path,
        sink_port: int,
        *,
        hold: bool,
        milter: Path | None = None,
        concurrency: int = 20,
        extra: dict[str, str] | None = None,
    ) -> None:
        """``concurrency``: connections per destination (Postfix's default); ``extra``:
        more main.cf settings."""
        self.dir = directory
        self.conf = directory / "conf"
        self.port = free_port()
        for sub in ("conf", "queue", "data"):
            (directory / sub).mkdir(parents=True, exist_ok=True)
        shutil.chown(directory / "data", "postfix")
        reachable(directory)  # the postfix user must reach it
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": directory / "queue",
            "data_directory": directory / "data",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "peer.localhost",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "relayhost": f"[127.0.0.1]:{sink_port}",
            "disable_dns_lookups": "yes",
            "smtp_host_lookup": "native",
            "maillog_file": directory / "maillog",
            "maillog_file_prefixes": directory,
            "syslog_name": "benchpeer",
            "default_process_limit": "300",
            "smtpd_client_connection_count_limit": "0",
            "default_destination_concurrency_limit": str(concurrency),
            "biff": "no",
        }
        if hold:
            settings["smtpd_end_of_data_restrictions"] = "check_client_access static:HOLD"
        if milter is not None:
            settings["smtpd_milters"] = f"unix:{milter}"
            settings["milter_default_action"] = "tempfail"
        settings.update(extra or {})
        (self.conf / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        (self.conf / "master.cf").write_text(MASTER_CF.format(port=self.port))
        self._postfix("start")
        wait_port(self.port)
        self.pid = int((directory / "queue" / "pid" / "master.pid").read_text().split()[0])

    def _postfix(self, *action: str) -> None:
        done = subprocess.run(
            ["postfix", "-c", str(self.conf), *action], capture_output=True, text=True
        )
        if done.returncode != 0:
            log = (self.dir / "maillog").read_text() if (self.dir / "maillog").exists() else ""
            raise RuntimeError(f"postfix {' '.join(action)} failed: {log[-800:]}")

    def release_held(self) -> None:
        """Release the hold queue; released mail lands in the deferred queue, which qmgr
        would only scan after queue_run_delay (300 s), so flush it at once."""
        subprocess.run(["postsuper", "-c", str(self.conf), "-H", "ALL"], check=True)
        subprocess.run(["postqueue", "-c", str(self.conf), "-f"], check=True)

    def queued(self) -> int:
        q = self.dir / "queue"
        return sum(
            len(files)
            for sub in ("incoming", "active", "deferred", "hold", "maildrop")
            for _, _, files in os.walk(q / sub)
        )

    def held(self) -> list[str]:
        """The queue IDs in the hold queue."""
        return sorted(
            name for _, _, files in os.walk(self.dir / "queue" / "hold") for name in files
        )

    def message(self, queue_id: str) -> bytes:
        """A queued message's header and body as ``postcat`` prints them (lines end in LF:
        Postfix keeps lines, not line endings), Postfix's own Received header first."""
        done = subprocess.run(
            ["postcat", "-c", str(self.conf), "-h", "-b", "-q", queue_id],
            capture_output=True,
            check=True,
        )
        return done.stdout

    def log(self) -> str:
        path = self.dir / "maillog"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        self._postfix("stop")
        deadline = time.monotonic() + 30
        while Path(f"/proc/{self.pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
