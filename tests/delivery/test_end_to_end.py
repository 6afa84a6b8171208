"""Accept -> sign -> deliver, for real: smtplib submits to the relay over STARTTLS; the relay
looks up the MX in a DNS server the test started, connects to aiosmtpd (not our code) with
verified STARTTLS, and the delivered bytes carry three DKIM signatures that dkimpy verifies
against the records that DNS server publishes. Bounces come back as DSNs."""

from __future__ import annotations

import email
import email.message
import smtplib
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import dkim
import dns.resolver
import pytest
import trio
import trustme

from atmosrelay.accounts.dkim_keys import (
    dkim_record_value,
    ensure_operator_key,
    public_from_private,
    split_txt,
)
from atmosrelay.accounts.store import Store
from atmosrelay.config import Config
from tests.accounts.dns_server import DnsServer
from tests.relay.harness import Relay, make_config, running_relay
from tests.sink import Received, Sink, aiosmtpd_sink


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


def publish(config: Config, server: DnsServer) -> None:
    """MX records for both domains at the sink, and every DKIM key the relay signs with."""
    for domain in ("example.net", "example.org"):
        server.mx(domain, 10, "mx.example.net.")
    server.a("mx.example.net", "127.0.0.1")
    operator, _ = ensure_operator_key(config.dkim_dir, "relay.test")
    server.txt(
        f"{operator.selector}._domainkey.relay.test",
        split_txt(dkim_record_value("rsa", operator.key.public_b64)),
    )
    store = Store(config.accounts_db)
    try:
        domain = store.domain("example.org")
    finally:
        store.close()
    for suffix, algorithm, private in (
        ("r", "rsa", domain.dkim_rsa_private),
        ("e", "ed25519", domain.dkim_ed25519_private),
    ):
        name = f"{domain.dkim_selector_stem}{suffix}._domainkey.example.org"
        public = public_from_private(algorithm, private)
        server.txt(name, split_txt(dkim_record_value(algorithm, public)))


def dnsfunc(server: DnsServer) -> Callable[..., bytes | None]:
    """dkimpy's key lookup, asked of the test's DNS server over the wire."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [server.address[0]]
    resolver.port = server.address[1]

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode().rstrip("."), "TXT", lifetime=timeout)
        except dns.exception.DNSException:
            return None
        return b"".join(b"".join(r.strings) for r in answer)

    return lookup


def config_for(tmp: Path, ca: trustme.CA, server: DnsServer, sink: Sink, more: str = "") -> Config:
    (tmp / "ca.pem").write_bytes(ca.cert_pem.bytes())
    return make_config(
        tmp,
        ca,
        f'[dns]\nnameservers = ["{server.spec}"]\ntimeout = 2.0\n'
        f"[delivery]\nport = {sink.port}\ntls_verify = true\n"
        f'ca_file = "{tmp / "ca.pem"}"\nrequire_tls = ["example.net"]\n{more}',
    )


def submit(relay: Relay, message: bytes, *recipients: str, **mail_options: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", relay.starttls_port, timeout=10) as smtp:
        smtp.starttls(context=relay.client_context())
        smtp.login("alice.test", relay.key)
        refused = smtp.sendmail("alice@example.org", list(recipients), message, **mail_options)
        assert not refused


async def wait_for(sink: Sink, n: int, limit: float = 20) -> list[Received]:
    with trio.fail_after(limit):
        while len(sink.snapshot()) < n:  # noqa: ASYNC110 - the sink is another thread
            await trio.sleep(0.02)
    return sink.snapshot()


@asynccontextmanager
async def delivering(
    tmp: Path, dns_server: DnsServer, refuse: dict[str, str] | None = None
) -> AsyncIterator[tuple[Relay, Sink]]:
    """A relay delivering by MX (from the test's DNS server) to the sink, DKIM published."""
    ca = trustme.CA()
    with aiosmtpd_sink(ca) as sink:
        sink.refuse.update(refuse or {})
        config = config_for(tmp, ca, dns_server, sink)
        async with running_relay(tmp, config=config, ca=ca) as relay:
            publish(config, dns_server)
            yield relay, sink


TRANSACTIONAL = (
    b"From: Alice <alice@example.org>\r\nTo: bob@example.net, carol@example.net\r\n"
    b"Subject: your code\r\nX-Atmos-Category: password-reset\r\n\r\n"
    b".a line that starts with a dot\r\nyour code is 1234\r\n"
)


async def test_delivered_over_verified_starttls_with_three_dkim_signatures_that_verify(
    tmp_path: Path, dns_server: DnsServer
) -> None:
    async with delivering(tmp_path, dns_server) as (relay, sink):
        await trio.to_thread.run_sync(
            submit, relay, TRANSACTIONAL, "bob@example.net", "carol@example.net"
        )
        (got,) = await wait_for(sink, 1)
        queue = relay.handle.ctx.queue.state
        (msg,) = queue.messages.values()
        with trio.fail_after(10):
            while not msg.terminal:  # noqa: ASYNC110 - the record follows the 250
                await trio.sleep(0.02)
    # one transaction for both recipients (transactional mail is not split), over TLS
    # the VERP return path: the relay's domain, a token naming the message (index 0: the
    # transaction carried both recipients), so a later bounce comes back to the relay
    local, _, domain = got.mail_from.partition("@")
    assert domain == "relay.test"
    assert local.startswith(f"bounces+{msg.id}-0-")
    assert got.rcpt_tos == ("bob@example.net", "carol@example.net")
    assert got.tls
    assert msg.recipient_states == {"bob@example.net": "sent", "carol@example.net": "sent"}
    assert msg.history[-1].outcomes[0].reply == "250 2.0.0 stored by the sink"
    assert msg.history[-1].mta == "mx.example.net"
    parsed = email.message_from_bytes(got.content)
    signatures = parsed.get_all("DKIM-Signature") or []
    tags = [
        dict(t.strip().split("=", 1) for t in s.replace("\r\n", "").split(";")) for s in signatures
    ]
    assert [(t["d"], t["a"]) for t in tags] == [
        ("example.org", "rsa-sha256"),
        ("example.org", "ed25519-sha256"),
        ("relay.test", "rsa-sha256"),
    ]
    lookup = dnsfunc(dns_server)
    for idx in range(3):
        assert dkim.DKIM(got.content).verify(idx=idx, dnsfunc=lookup), idx
    assert b"\r\n.a line that starts with a dot\r\n" in got.content  # dot-stuffing undone
    assert "List-Unsubscribe" not in parsed  # transactional: no unsubscribe link
    tampered = got.content.replace(b"1234", b"9999")
    with pytest.raises(dkim.ValidationError, match="body hash mismatch"):
        dkim.DKIM(tampered).verify(idx=0, dnsfunc=lookup)


BULK = (
    b"From: Alice <alice@example.org>\r\nTo: news@example.org\r\nSubject: our news\r\n\r\n"
    b"this month\r\n"
)


async def test_bulk_mail_gets_a_signed_list_unsubscribe_per_recipient(
    tmp_path: Path, dns_server: DnsServer
) -> None:
    async with delivering(tmp_path, dns_server) as (relay, sink):
        await trio.to_thread.run_sync(submit, relay, BULK, "bob@example.net", "carol@example.net")
        got = await wait_for(sink, 2)
    assert sorted(r.rcpt_tos for r in got) == [("bob@example.net",), ("carol@example.net",)]
    links = set()
    for r in got:
        parsed = email.message_from_bytes(r.content)
        (rcpt,) = r.rcpt_tos
        link = parsed["List-Unsubscribe"]
        assert rcpt.replace("@", "%40") in link and link.startswith("<https://relay.test/")
        assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        links.add(link)
        for idx in range(3):  # the signatures cover the per-recipient headers
            assert dkim.DKIM(r.content).verify(idx=idx, dnsfunc=dnsfunc(dns_server)), idx
        h = (parsed.get_all("DKIM-Signature") or [""])[0].replace("\r\n", "").replace("\t", "")
        assert "list-unsubscribe:list-unsubscribe-post" in h
    assert len(links) == 2  # one token per recipient


async def test_a_refused_recipient_bounces_with_a_dsn_to_the_sender(
    tmp_path: Path, dns_server: DnsServer
) -> None:
    refuse = {"nobody@example.net": "550 5.1.1 <nobody@example.net>: no such user"}
    async with delivering(tmp_path, dns_server, refuse) as (relay, sink):
        await trio.to_thread.run_sync(
            lambda: submit(
                relay,
                TRANSACTIONAL,
                "bob@example.net",
                "nobody@example.net",
                rcpt_options=["NOTIFY=FAILURE", "ORCPT=rfc822;nobody@example.net"],
                mail_options=["RET=HDRS", "ENVID=batch-7"],
            )
        )
        delivered, dsn = await wait_for(sink, 2)
        state = relay.handle.ctx.queue.state
        with trio.fail_after(10):  # the DSN's own outcome is recorded after the sink's 250
            while not all(m.terminal for m in state.messages.values()):  # noqa: ASYNC110
                await trio.sleep(0.02)
        assert len(state.messages) == 2  # the message and its one DSN
        assert not any(m.dsn_owed() for m in state.messages.values())
        assert len(sink.snapshot()) == 2
    assert delivered.rcpt_tos == ("bob@example.net",)
    assert dsn.mail_from == "<>"  # the null reverse path, as aiosmtpd reports it
    assert dsn.rcpt_tos == ("alice@example.org",)
    report = email.message_from_bytes(dsn.content)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    human, status, original = report.get_payload()  # type: ignore[misc]
    assert "nobody@example.net" in human.get_payload()
    per_message, per_recipient = status.get_payload()
    assert per_message["Original-Envelope-Id"] == "batch-7"
    assert per_recipient["Final-Recipient"] == "rfc822; nobody@example.net"
    assert per_recipient["Original-Recipient"] == "rfc822; nobody@example.net"
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.1.1"
    assert per_recipient["Remote-MTA"] == "dns; mx.example.net"
    assert per_recipient["Diagnostic-Code"] == (
        "smtp; 550 5.1.1 <nobody@example.net>: no such user"
    )
    assert original.get_content_type() == "text/rfc822-headers"  # RET=HDRS
    assert b"your code is 1234" not in dsn.content
    signatures = report.get_all("DKIM-Signature") or []
    assert len(signatures) == 1 and "d=relay.test" in signatures[0]  # the operator's alone
    assert dkim.DKIM(dsn.content).verify(idx=0, dnsfunc=dnsfunc(dns_server))
