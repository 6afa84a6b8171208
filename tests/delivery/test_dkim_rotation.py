"""Two-phase DKIM rotation and domain removal, through the operator's CLI beside a running,
delivering relay: before --activate every message is signed with the old (published) keys,
the new keys sign nothing; --activate refuses until DNS serves the new records; after it the
next message is signed with the new keys, and every signature verifies against the test's DNS
server (dkimpy). A domain with queued mail is not removed without --force."""

from __future__ import annotations

import email
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest
import trio

from atmosrelay.accounts.dkim_keys import ensure_operator_key
from atmosrelay.accounts.store import Domain, NotFound, Store
from tests.accounts.dns_server import DnsServer
from tests.delivery.test_end_to_end import (
    TRANSACTIONAL,
    delivering,
    dnsfunc,
    submit,
    wait_for,
)
from tests.delivery.test_queue_control import cli
from tests.relay.harness import Relay, running_relay, until_the_relay_sees_an_account_change


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


def signed_by(content: bytes, server: DnsServer) -> set[str]:
    """The ``d=``/``s=`` of every signature, each verified against the DNS server."""
    message = email.message_from_bytes(content)
    found = set()
    for idx, header in enumerate(message.get_all("DKIM-Signature") or []):
        assert dkim.DKIM(content).verify(idx=idx, dnsfunc=dnsfunc(server)), header
        tags = dict(
            (k.strip(), v.strip()) for k, _, v in (t.partition("=") for t in header.split(";"))
        )
        found.add(f"{tags['s']}._domainkey.{tags['d']}")
    return found


def enrolled(relay: Relay, name: str) -> Domain:
    store = Store(relay.config.accounts_db)
    try:
        return store.domain(name)
    finally:
        store.close()


def cli_config(tmp_path: Path, relay: Relay, server: DnsServer) -> list[str]:
    path = tmp_path / "cli.toml"
    path.write_text(
        f'[relay]\ndata_dir = "{relay.config.data_dir}"\n[operator]\ndomain = "relay.test"\n'
        f'[dns]\nnameservers = ["{server.spec}"]\ntimeout = 2.0\n'
    )
    return ["--config", str(path)]


async def run(*args: str) -> subprocess.CompletedProcess[str]:
    return await trio.to_thread.run_sync(lambda: cli(*args))


async def test_two_phase_rotation_never_signs_with_an_unpublished_key(
    tmp_path: Path, dns_server: DnsServer
) -> None:
    async with delivering(tmp_path, dns_server) as (relay, sink):
        cfg = cli_config(tmp_path, relay, dns_server)
        old = enrolled(relay, "example.org").dkim_selector_stem
        old_selectors = {f"{old}r._domainkey.example.org", f"{old}e._domainkey.example.org"}

        await trio.to_thread.run_sync(submit, relay, TRANSACTIONAL, "bob@example.net")
        (first,) = await wait_for(sink, 1)
        assert old_selectors <= signed_by(first.content, dns_server)

        before = relay.handle.ctx.keys.generation
        started = await run("domain", "rotate-dkim", "example.org", "--json", *cfg)
        assert started.returncode == 0, started.stderr
        rotation = json.loads(started.stdout)
        new = rotation["next"]
        assert rotation["signing"] == old and new != old
        new_selectors = {r["name"] for r in rotation["records"]}
        assert new_selectors == {f"{new}r._domainkey.example.org", f"{new}e._domainkey.example.org"}
        again = await run("domain", "rotate-dkim", "example.org", "--json", *cfg)
        assert json.loads(again.stdout)["records"] == rotation["records"]  # the same pair
        shown = await run("domain", "records", "example.org", *cfg)
        assert f"{new}r._domainkey.example.org" in shown.stdout and "--activate" in shown.stdout

        # between the phases: still the old keys, never the new
        await until_the_relay_sees_an_account_change(relay, before)  # it knows of the new pair
        await trio.to_thread.run_sync(submit, relay, TRANSACTIONAL, "carol@example.net")
        second = (await wait_for(sink, 2))[1]
        used = signed_by(second.content, dns_server)
        assert old_selectors <= used and not used & new_selectors

        # activation checks DNS first: nothing is published yet
        early = await run("domain", "rotate-dkim", "example.org", "--activate", *cfg)
        assert early.returncode == 1
        assert "not activated, example.org still signs with the old keys" in early.stderr
        assert f"{new}r._domainkey.example.org does not exist" in early.stderr

        for record in rotation["records"]:
            dns_server.txt(record["name"], tuple(record["strings"]))
        before = relay.handle.ctx.keys.generation
        done = await run("domain", "rotate-dkim", "example.org", "--activate", *cfg)
        assert done.returncode == 0, done.stderr
        assert f"now signs with {new}r/e" in done.stdout and "Keep their records" in done.stdout
        await until_the_relay_sees_an_account_change(relay, before)

        await trio.to_thread.run_sync(submit, relay, TRANSACTIONAL, "dave@example.net")
        third = (await wait_for(sink, 3))[2]
        used = signed_by(third.content, dns_server)
        assert new_selectors <= used and not used & old_selectors
        assert "relay.test" in " ".join(used)  # the operator's signature as before

        nothing = await run("domain", "rotate-dkim", "example.org", "--activate", *cfg)
        assert nothing.returncode == 1 and "no DKIM rotation of example.org" in nothing.stderr


async def test_a_domain_with_queued_mail_is_removed_only_with_force(tmp_path: Path) -> None:
    async with running_relay(tmp_path) as relay:  # delivery off: the message stays queued
        (tmp_path / "cli.toml").write_text(f'[relay]\ndata_dir = "{relay.config.data_dir}"\n')
        cfg = ["--config", str(tmp_path / "cli.toml")]
        await trio.to_thread.run_sync(submit, relay, TRANSACTIONAL, "bob@example.net")
        refused = await run("domain", "remove", "example.org", *cfg)
        assert refused.returncode == 1
        assert re.search(r"1 queued message\(s\) from example\.org \(e\.g\. \w+\)", refused.stderr)
        assert "queue delete --domain example.org" in refused.stderr
        enrolled(relay, "example.org")  # still there

        forced = await run("domain", "remove", "example.org", "--force", *cfg)
        assert forced.returncode == 0, forced.stderr
        assert "its DKIM keys are deleted" in forced.stdout
        store = Store(relay.config.accounts_db)
        try:
            try:
                store.domain("example.org")
            except NotFound:
                pass
            else:
                raise AssertionError("example.org is still enrolled")
            assert {d.name for d in store.domains()} == {"mallory.example", "pending.example.org"}
        finally:
            store.close()
        # nothing queued from it: removed without --force
        gone = await run("domain", "remove", "pending.example.org", *cfg)
        assert gone.returncode == 0, gone.stderr
        missing = await run("domain", "remove", "nowhere.example", *cfg)
        assert missing.returncode == 1 and "no enrolled domain nowhere.example" in missing.stderr


async def test_the_operator_key_rotates_in_two_phases_and_a_reload_applies_it(
    tmp_path: Path, dns_server: DnsServer
) -> None:
    async with delivering(tmp_path, dns_server) as (relay, sink):
        cfg = cli_config(tmp_path, relay, dns_server)
        old = ensure_operator_key(relay.config.dkim_dir, "relay.test")[0].selector
        started = await run("operator", "rotate-dkim", "--json", *cfg)
        assert started.returncode == 0, started.stderr
        rotation = json.loads(started.stdout)
        new = rotation["next"]
        assert rotation["signing"] == old and new != old
        (record,) = rotation["records"]
        assert record["name"] == f"{new}._domainkey.relay.test"

        await trio.to_thread.run_sync(submit, relay, TRANSACTIONAL, "bob@example.net")
        (first,) = await wait_for(sink, 1)
        assert f"{old}._domainkey.relay.test" in signed_by(first.content, dns_server)

        early = await run("operator", "rotate-dkim", "--activate", *cfg)
        assert early.returncode == 1 and f"still signs with {old}" in early.stderr
        dns_server.txt(record["name"], tuple(record["strings"]))
        done = await run("operator", "rotate-dkim", "--activate", *cfg)
        assert done.returncode == 0, done.stderr
        assert "once the relay reloads" in done.stdout

        # activated on disk, not yet reloaded: the old key (still published) signs
        await trio.to_thread.run_sync(submit, relay, TRANSACTIONAL, "carol@example.net")
        second = (await wait_for(sink, 2))[1]
        assert f"{old}._domainkey.relay.test" in signed_by(second.content, dns_server)

        assert relay.handle.reloader is not None
        assert await relay.handle.reloader.reload()  # what SIGHUP runs
        assert any(f"operator DKIM selector {new}" in line for line in relay.lines)
        await trio.to_thread.run_sync(submit, relay, TRANSACTIONAL, "dave@example.net")
        third = (await wait_for(sink, 3))[2]
        used = signed_by(third.content, dns_server)
        assert f"{new}._domainkey.relay.test" in used
        assert f"{old}._domainkey.relay.test" not in used
        records = await run("operator", "records", *cfg)
        assert f"{new}._domainkey.relay.test" in records.stdout
