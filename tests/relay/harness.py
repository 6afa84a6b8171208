"""A real relay in the test's trio run: real listeners on 127.0.0.1 port 0, real TLS
(trustme), a member with a verified domain and an API key in a real account store."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio
import trustme

from atmosrelay.accounts import api_keys, domains
from atmosrelay.accounts.store import Store
from atmosrelay.config import Config, parse_config
from atmosrelay.runtime import RelayHandle, run_relay
from journal import FS

ALICE = "did:plc:abcdefghijklmnopqrstuvwx"
MALLORY = "did:plc:mmmmmmmmmmmmmmmmmmmmmmmm"
HIGH_LIMIT = 1_000_000


@attrs.define
class Relay:
    handle: RelayHandle
    config: Config
    key: str  # Alice's API key
    mallory_key: str
    ca: trustme.CA
    lines: list[str]

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx

    @property
    def starttls_port(self) -> int:
        return self.handle.port("starttls")

    @property
    def implicit_port(self) -> int:
        return self.handle.port("implicit")


def make_config(tmp: Path, ca: trustme.CA, extra: str = "", auth: str = "") -> Config:
    """``extra``: TOML for [smtp] (or whole sections); ``auth``: lines for [auth]."""
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp / "tls.pem"))
    text = (
        f'[relay]\ndata_dir = "{tmp / "var"}"\n'
        '[operator]\ndomain = "relay.test"\n'
        f"[auth]\nbcrypt_cost = 4\n{auth}"
        "[journal]\nsegment_size = 1048576\n" + (extra if "[smtp]" in extra else f"[smtp]\n{extra}")
    )
    if "[delivery]" not in text:  # submission tests: nothing leaves the relay
        text += "[delivery]\nenabled = false\n"
    if "listeners" not in text:
        text = text.replace(
            "[smtp]\n",
            '[smtp]\nlisteners = ["127.0.0.1:0 starttls", "127.0.0.1:0 implicit", "127.0.0.1:0 inbound"]\n',
            1,
        )
    if "[http]" not in text:  # the HTTP API on a free port (tests/api use it)
        text += '[http]\nlisteners = ["127.0.0.1:0"]\n'
    text = text.replace(
        "[smtp]\n",
        f'[smtp]\nhostname = "mx.test"\ntls_cert = "{tmp / "tls.pem"}"\ntls_key = "{tmp / "tls.pem"}"\n',
        1,
    )
    return parse_config(text, source="test")


def enroll(config: Config) -> tuple[str, str]:
    store = Store(config.accounts_db)
    try:
        store.add_member(ALICE, "alice.test")
        domains.enroll(store, ALICE, "example.org", limit=2, clock_now=0)
        store.mark_verified("example.org", without_dns=True)
        domains.enroll(store, ALICE, "pending.example.org", limit=2, clock_now=0)  # never verified
        key = api_keys.issue(store, ALICE, cost=4).secret
        store.add_member(MALLORY, "mallory.test")
        domains.enroll(store, MALLORY, "mallory.example", limit=2, clock_now=0)
        store.mark_verified("mallory.example", without_dns=True)
        mallory = api_keys.issue(store, MALLORY, cost=4).secret
        # Both are long-standing senders here: explicit limits far above what any test
        # sends, so the warming tiers of a member added a moment ago do not apply. Tests of
        # the policy itself enroll a member of their own (tests/relay/test_policy.py).
        for did in (ALICE, MALLORY):
            store.set_limits(did, hourly=HIGH_LIMIT, daily=HIGH_LIMIT)
    finally:
        store.close()
    return key, mallory


@asynccontextmanager
async def running_relay(
    tmp: Path,
    *,
    extra: str = "",
    auth: str = "",
    fs: FS | None = None,
    config: Config | None = None,
    ca: trustme.CA | None = None,
) -> AsyncIterator[Relay]:
    ca = ca or trustme.CA()
    config = config or make_config(tmp, ca, extra, auth)
    key, mallory = enroll(config)
    lines: list[str] = []
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(
            lambda task_status: run_relay(
                config, announce=lines.append, fs=fs, handle_signals=False, task_status=task_status
            )
        )
        try:
            yield Relay(handle, config, key, mallory, ca, lines)
        finally:
            handle.stop()


async def until_the_relay_sees_an_account_change(relay: Relay, before: int) -> None:
    """Wait (bounded) until the relay has noticed a write to the account store by another
    connection: it polls SQLite's change counter every ``auth.revocation_poll`` (1 s)."""
    with trio.fail_after(10):
        while relay.handle.ctx.keys.generation == before:  # noqa: ASYNC110 - its own poll
            await trio.sleep(0.05)
