"""'queue retry' and 'queue delete' against a running relay, through the real CLI and the
control socket; one relay per data directory."""

from __future__ import annotations

import json
import os
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
import trustme

from atmosrelay._files import DataDirLocked
from atmosrelay.runtime import run_relay
from tests.delivery.test_end_to_end import TRANSACTIONAL, submit
from tests.relay.harness import ALICE, MALLORY, Relay, make_config, running_relay
from tests.sink import aiosmtpd_sink

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "atmosrelay", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


async def until(condition: object, limit: float = 20) -> None:
    with trio.fail_after(limit):
        while not condition():  # type: ignore[operator]  # noqa: ASYNC110 - other threads
            await trio.sleep(0.02)


async def test_retry_now_and_delete_through_the_cli(tmp_path: Path) -> None:
    ca = trustme.CA()
    with aiosmtpd_sink() as sink:
        sink.refuse["bob@example.net"] = "451 4.2.1 mailbox busy, try later"
        sink.refuse["carol@example.net"] = "451 4.2.1 mailbox busy, try later"
        config = make_config(tmp_path, ca, f'[delivery]\nsmarthost = "127.0.0.1:{sink.port}"\n')
        (tmp_path / "cli.toml").write_text(f'[relay]\ndata_dir = "{config.data_dir}"\n')
        cfg = ["--config", str(tmp_path / "cli.toml")]
        async with running_relay(tmp_path, config=config, ca=ca) as relay:
            state = relay.handle.ctx.queue.state
            await trio.to_thread.run_sync(submit, relay, TRANSACTIONAL, "bob@example.net")
            await trio.to_thread.run_sync(submit, relay, TRANSACTIONAL, "carol@example.net")
            first, second = sorted(state.messages)
            await until(
                lambda: all(
                    "deferred" in m.recipient_states.values() for m in state.messages.values()
                )
            )
            assert state.messages[first].next_at["bob@example.net"] > time.time() + 30

            sink.refuse.clear()  # the mailbox frees up; nobody wants to wait a minute
            retry = await trio.to_thread.run_sync(lambda: cli("queue", "retry", first, *cfg))
            assert retry.returncode == 0, retry.stderr
            assert "1 recipient(s) of 1 message(s) due now" in retry.stdout
            await until(lambda: state.messages[first].terminal)
            assert state.messages[first].recipient_states == {"bob@example.net": "sent"}
            assert state.messages[second].recipient_states == {"carol@example.net": "deferred"}

            gone = await trio.to_thread.run_sync(
                lambda: cli("queue", "delete", second, "--reason", "asked by the member", *cfg)
            )
            assert gone.returncode == 0, gone.stderr
            assert second not in state.messages
            again = await trio.to_thread.run_sync(lambda: cli("queue", "delete", second, *cfg))
            assert again.returncode == 1 and f"no message {second}" in again.stderr
            both = await trio.to_thread.run_sync(
                lambda: cli("queue", "retry", "--all", first, *cfg)
            )
            assert both.returncode == 64

            # one relay per data directory: a second one refuses before touching anything
            with pytest.raises(DataDirLocked, match="another relay is running"):
                await run_relay(config, announce=lambda _: None, handle_signals=False)
    listed = json.loads(cli("queue", "list", "--all", "--json", *cfg).stdout)
    assert [m["id"] for m in listed] == [first]  # the deletion is in the journal
    assert json.loads(cli("queue", "list", "--json", *cfg).stdout) == []  # first is finished
    assert (
        "no message matches (finished ones are shown with --all)"
        in cli("queue", "list", *cfg).stdout
    )
    assert len(sink.snapshot()) == 1  # carol's copy never went out


def test_without_a_running_relay_the_cli_says_so(tmp_path: Path) -> None:
    (tmp_path / "cli.toml").write_text(f'[relay]\ndata_dir = "{tmp_path / "var"}"\n')
    result = cli(
        "queue", "retry", "01M8DAAVNDDE503GWFC2S5GKWT", "--config", str(tmp_path / "cli.toml")
    )
    assert result.returncode == 1
    assert "no running relay answers at" in result.stderr and "atmosrelay serve" in result.stderr


def _send_as(relay: Relay, user: str, key: str, sender: str, n: int) -> None:
    with smtplib.SMTP("127.0.0.1", relay.starttls_port, timeout=10) as smtp:
        smtp.starttls(context=relay.client_context())
        smtp.login(user, key)
        for i in range(n):
            message = f"From: {sender}\r\nSubject: {i}\r\n\r\nhi\r\n"
            assert not smtp.sendmail(sender, ["bob@example.net"], message)


async def test_queue_filters_and_bulk_actions_with_confirmation(tmp_path: Path) -> None:
    cfg = ["--config", str(tmp_path / "cli.toml")]
    async with running_relay(tmp_path) as relay:  # delivery off: everything stays live
        (tmp_path / "cli.toml").write_text(f'[relay]\ndata_dir = "{relay.config.data_dir}"\n')
        await trio.to_thread.run_sync(_send_as, relay, ALICE, relay.key, "alice@example.org", 3)
        await trio.to_thread.run_sync(
            _send_as, relay, MALLORY, relay.mallory_key, "m@mallory.example", 2
        )

        async def run(*args: str) -> subprocess.CompletedProcess[str]:
            return await trio.to_thread.run_sync(lambda: cli(*args))  # the relay answers meanwhile

        async def ids(*args: str) -> list[str]:
            result = await run("queue", "list", "--json", *args, *cfg)
            assert result.returncode == 0, result.stderr
            return [m["id"] for m in json.loads(result.stdout)]

        everything = await ids()
        assert len(everything) == 5 and everything == sorted(everything)  # oldest first
        alice = await ids("--did", ALICE)
        assert len(alice) == 3 and await ids("--domain", "EXAMPLE.org.") == alice
        assert len(await ids("--domain", "mallory.example")) == 2
        assert await ids("--limit", "2") == everything[:2]
        assert (
            await ids("--since", "1h") == everything
            and await ids("--since", "2000-01-01") == everything
        )
        assert await ids("--since", "2999-01-01T00:00") == []
        assert await ids("--state", "accepted") == everything and await ids("--state", "sent") == []
        bad = await run("queue", "list", "--since", "yesterday", *cfg)
        assert bad.returncode == 64 and "give a duration (90s, 30m, 2h, 7d)" in bad.stderr

        # several messages need a yes; a script (no terminal) is told how to give it
        unasked = await run("queue", "delete", "--did", MALLORY, *cfg)
        assert unasked.returncode == 64, unasked.stderr
        assert "2 messages match; add --yes to delete them all" in unasked.stderr
        assert len(await ids()) == 5
        mixed = await run("queue", "delete", everything[0], "--did", MALLORY, *cfg)
        assert mixed.returncode == 64 and "not both" in mixed.stderr
        deleted = await run("queue", "delete", "--did", MALLORY, "--yes", *cfg)
        assert deleted.returncode == 0 and "2 message(s) deleted" in deleted.stdout
        assert deleted.stderr == ""  # no progress bar when not on a terminal
        assert await ids() == alice
        retried = await run("queue", "retry", "--domain", "example.org", "--yes", *cfg)
        assert retried.returncode == 0, retried.stderr
        assert "3 recipient(s) of 3 message(s) due now" in retried.stdout
        assert "delivery is disabled" in retried.stdout
