"""'queue retry' and 'queue delete' against a running relay, through the real CLI and the
control socket; one relay per data directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
import trustme

from atmosrelay.runtime import DataDirLocked, run_relay
from tests.delivery.test_end_to_end import TRANSACTIONAL, submit
from tests.relay.harness import make_config, running_relay
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
            assert "1 recipient(s) due now" in retry.stdout
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
    listed = json.loads(cli("queue", "list", "--json", *cfg).stdout)
    assert [m["id"] for m in listed] == [first]  # the deletion is in the journal
    assert len(sink.snapshot()) == 1  # carol's copy never went out


def test_without_a_running_relay_the_cli_says_so(tmp_path: Path) -> None:
    (tmp_path / "cli.toml").write_text(f'[relay]\ndata_dir = "{tmp_path / "var"}"\n')
    result = cli("queue", "retry", "--all", "--config", str(tmp_path / "cli.toml"))
    assert result.returncode == 1
    assert "no running relay answers at" in result.stderr and "atmosrelay serve" in result.stderr
