"""The inbound listener for real: the relay delivers to aiosmtpd (found through the test's
DNS server), the test reads the VERP return path the sink saw, then hands the relay's
inbound listener what a remote would send later (DSNs, ARF reports, replies, the
unsubscribe mailto) with smtplib, and checks what the member's figures became."""

from __future__ import annotations

import json
import os
import smtplib
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from email import message_from_bytes
from email.policy import default as default_policy
from pathlib import Path
from urllib.parse import unquote

import httpx
import pytest
import trio
import trustme

from atmosrelay.accounts.store import Store
from atmosrelay.queue.records import Inbound, InboundRecipient, new_queue_id
from atmosrelay.queue.store import QueueStore
from journal import open_journal
from tests.accounts.dns_server import DnsServer
from tests.delivery.test_end_to_end import config_for, publish, submit, wait_for
from tests.inbound import samples
from tests.relay.harness import ALICE, Relay, make_config, running_relay
from tests.sink import Sink, aiosmtpd_sink

ROOT = Path(__file__).resolve().parents[2]
BULK = (
    b"From: Alice <alice@example.org>\r\nTo: readers\r\nSubject: the newsletter\r\n"
    b"X-Atmos-Category: newsletter\r\n\r\nhello\r\n"
)


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


@asynccontextmanager
async def delivering(
    tmp: Path, dns: DnsServer, more: str = ""
) -> AsyncIterator[tuple[Relay, Sink]]:
    ca = trustme.CA()
    with aiosmtpd_sink(ca) as sink:
        config = config_for(tmp, ca, dns, sink, more)
        (tmp / "relay.toml").write_text(f'[relay]\ndata_dir = "{config.data_dir}"\n')
        async with running_relay(tmp, config=config, ca=ca) as relay:
            publish(config, dns)
            dns.mx("remote.test", 10, "mx.example.net.")  # replies' senders, bounced back
            yield relay, sink


def inbound(
    relay: Relay, sender: str, recipients: list[str], message: bytes, *, tls: bool = False
) -> dict[str, tuple[int, bytes]]:
    """Hand the inbound listener a message as a remote MX would; returns what RCPT
    refused (smtplib raises if every recipient is refused)."""
    with smtplib.SMTP("127.0.0.1", relay.handle.port("inbound"), timeout=10) as smtp:
        smtp.ehlo("mx.example.net")
        if tls:
            smtp.starttls(context=relay.client_context())
        return smtp.sendmail(sender, recipients, message)


def rcpt_reply(relay: Relay, recipient: str, sender: str = "") -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", relay.handle.port("inbound"), timeout=10) as smtp:
        smtp.ehlo("probe.example.net")
        assert smtp.mail(sender)[0] == 250
        return smtp.rcpt(recipient)


def cli(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "atmosrelay", *args, "--config", str(tmp / "relay.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


async def processed(relay: Relay, n: int) -> None:
    """Wait until ``n`` inbound messages are processed: what each changed (suppressions,
    pauses, counters, the status index) is on disk by then (processor.py step 4)."""
    assert relay.handle.inbound is not None
    with trio.fail_after(20):
        while sum(relay.handle.inbound.processed.values()) < n:  # noqa: ASYNC110
            await trio.sleep(0.02)


def suppressions(relay: Relay) -> dict[str, str]:
    store = Store(relay.config.accounts_db)
    try:
        return {s.address: s.source for s in store.suppressions(ALICE)}
    finally:
        store.close()


def paused(relay: Relay) -> str | None:
    store = Store(relay.config.accounts_db)
    try:
        return store.domain("example.org").paused_reason
    finally:
        store.close()


async def delivered(relay: Relay, sink: Sink, n: int) -> dict[str, str]:
    """Wait for ``n`` deliveries and every message's final state; recipient -> return path."""
    got = await wait_for(sink, n)
    state = relay.handle.ctx.queue.state
    with trio.fail_after(10):
        while not all(m.terminal for m in state.messages.values()):  # noqa: ASYNC110
            await trio.sleep(0.02)
    return {r.rcpt_tos[0]: r.mail_from for r in got}


async def deliverability(relay: Relay) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {relay.key}", "X-Atmos-DID": ALICE}
    async with httpx.AsyncClient(base_url=relay.handle.http_url, timeout=10) as http:
        got = await http.get("/member/deliverability", headers=headers)
    assert got.status_code == 200, got.text
    return dict(got.json())


async def test_a_later_bounce_turns_the_recipient_bounced_suppresses_and_pauses(
    tmp_path: Path, dns_server: DnsServer
) -> None:
    readers = [f"reader{i}@example.net" for i in range(1, 6)]
    async with delivering(tmp_path, dns_server) as (relay, sink):
        await trio.to_thread.run_sync(submit, relay, BULK, *readers)
        paths = await delivered(relay, sink, 5)
        (queue_id,) = relay.handle.ctx.queue.state.messages
        # bulk mail goes one recipient per transaction: each has its own return path
        assert len(set(paths.values())) == 5
        assert all(p.endswith("@relay.test") for p in paths.values())
        assert (await deliverability(relay))["bounced_14d"] == 0

        dsn = samples.postfix_dsn(paths["reader1@example.net"], "reader1@example.net")
        await trio.to_thread.run_sync(inbound, relay, "", [paths["reader1@example.net"]], dsn)
        await processed(relay, 1)
        headers = {"Authorization": f"Bearer {relay.key}", "X-Atmos-DID": ALICE}
        async with httpx.AsyncClient(base_url=relay.handle.http_url, timeout=10) as http:
            got = (await http.get(f"/v1/messages/{queue_id}", headers=headers)).json()
        by_address = {r["recipient"]: r for r in got["recipients"]}
        assert by_address["reader1@example.net"]["status"] == "bounced"
        assert by_address["reader2@example.net"]["status"] == "sent"
        late = by_address["reader1@example.net"]["attempts"]
        assert [(a["status"], a["code"], a["remote"]) for a in late] == [
            ("sent", "2.0.0", "mx.example.net"),  # the sink took it ...
            ("bounced", "5.1.1", "inner.example.net"),  # ... and its MX reported later
        ]
        assert suppressions(relay) == {"reader1@example.net": "hard-bounce"}
        figures = await deliverability(relay)
        assert (figures["sent_14d"], figures["bounced_14d"]) == (5, 1)
        # 5 sent + 1 bounced is under rate_min_messages (10): no pause yet
        assert paused(relay) is None

        # the same DSN again (a remote that retries its report) counts nothing twice
        await trio.to_thread.run_sync(inbound, relay, "", [paths["reader1@example.net"]], dsn)
        await processed(relay, 2)
        assert (await deliverability(relay))["bounced_14d"] == 1

        for reader in readers[1:]:
            await trio.to_thread.run_sync(
                inbound, relay, "", [paths[reader]], samples.postfix_dsn(paths[reader], reader)
            )
        await processed(relay, 6)
        figures = await deliverability(relay)
        assert (figures["sent_14d"], figures["bounced_14d"]) == (5, 5)
    reason = paused(relay)
    assert reason is not None and reason.startswith("bounce rate 5/10")
    listed = cli(tmp_path, "inbound", "list", "--kind", "bounce", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert len(rows) == 6
    assert {r["recipient"] for r in rows} == set(readers)
    assert all(r["did"] == ALICE and r["queue_id"] == queue_id for r in rows)


async def test_delay_reports_and_plain_bounces(tmp_path: Path, dns_server: DnsServer) -> None:
    async with delivering(tmp_path, dns_server) as (relay, sink):
        await trio.to_thread.run_sync(submit, relay, BULK, "slow@example.net", "gone@example.net")
        paths = await delivered(relay, sink, 2)
        delay = samples.postfix_dsn(
            paths["slow@example.net"], "slow@example.net", status="4.4.7", action="delayed"
        )
        await trio.to_thread.run_sync(inbound, relay, "", [paths["slow@example.net"]], delay)
        qmail = samples.qmail_bounce(paths["gone@example.net"], "gone@example.net")
        await trio.to_thread.run_sync(
            inbound, relay, "MAILER-DAEMON@mx.example.net", [paths["gone@example.net"]], qmail
        )
        await processed(relay, 2)
        assert relay.handle.inbound is not None
        assert relay.handle.inbound.processed["delay"] == 1
        assert relay.handle.inbound.processed["bounce"] == 1
        assert suppressions(relay) == {"gone@example.net": "hard-bounce"}  # 5.1.1, from text
        figures = await deliverability(relay)
        assert figures["bounced_14d"] == 1  # a delay is no bounce


async def test_complaints_suppress_and_count(tmp_path: Path, dns_server: DnsServer) -> None:
    async with delivering(tmp_path, dns_server) as (relay, sink):
        await trio.to_thread.run_sync(
            submit, relay, BULK, "angry@example.net", "cross@example.net", "quiet@example.net"
        )
        paths = await delivered(relay, sink, 3)
        # 1. a feedback loop that sends its report to the message's return path
        report = samples.arf(paths["angry@example.net"], rcpt="angry@example.net")
        await trio.to_thread.run_sync(inbound, relay, "", [paths["angry@example.net"]], report)
        # 2. one that sends to fbl@ with the reported message's headers (VERP Return-Path)
        report = samples.arf(
            "fbl@relay.test",
            rcpt="cross@example.net",
            did=ALICE,
            return_path=paths["cross@example.net"],
            agent="Yahoo!-Mail-Feedback/2.0",
            headers_only=True,
        )
        await trio.to_thread.run_sync(
            inbound, relay, "fbl@feedback.example", ["fbl@relay.test"], report
        )
        # 3. a redacted complainant, attributed by X-Atmos-Member-Did only
        report = samples.arf("abuse@relay.test", did=ALICE, redact=True)
        await trio.to_thread.run_sync(
            inbound, relay, "fbl@aol.example", ["abuse@relay.test"], report
        )
        # 4. no return path at all: attributed by X-Atmos-Member-Did and the Message-ID of
        #    a message the member really sent to the complainant
        quiet = next(m for m in sink.snapshot() if m.rcpt_tos == ("quiet@example.net",))
        message_id = str(message_from_bytes(quiet.content, policy=default_policy)["Message-ID"])
        report = samples.arf(
            "abuse@relay.test", rcpt="quiet@example.net", did=ALICE, message_id=message_id
        )
        await trio.to_thread.run_sync(
            inbound, relay, "fbl@other.example", ["abuse@relay.test"], report
        )
        # 5. a forgery: the member's header copied, someone the member never wrote to named
        report = samples.arf("abuse@relay.test", rcpt="victim@example.net", did=ALICE)
        await trio.to_thread.run_sync(
            inbound, relay, "forger@evil.example", ["abuse@relay.test"], report
        )
        await processed(relay, 5)
        assert relay.handle.inbound is not None
        assert relay.handle.inbound.processed["complaint"] == 5
        assert suppressions(relay) == {
            "angry@example.net": "complaint",
            "cross@example.net": "complaint",
            "quiet@example.net": "complaint",
        }  # never victim@: a report cannot suppress someone the member did not write to
        figures = await deliverability(relay)
        assert figures["complaints_14d"] == 5
        async with httpx.AsyncClient(base_url=relay.handle.http_url, timeout=10) as http:
            metrics = (await http.get("/metrics")).text
        assert 'atmosrelay_inbound_processed_total{kind="complaint"} 5.0' in metrics
        assert "atmosrelay_inbound_received_total 5.0" in metrics
        # complaint-rate pause: 5 complaints of 3 sent is far over 0.08%, but under the
        # rule's minimum of finished deliveries (10): the domain still sends
        assert paused(relay) is None


async def test_forged_tokens_and_foreign_addresses_are_refused(
    tmp_path: Path, dns_server: DnsServer
) -> None:
    async with delivering(tmp_path, dns_server) as (relay, sink):
        await trio.to_thread.run_sync(submit, relay, BULK, "reader@example.net")
        paths = await delivered(relay, sink, 1)
        real = paths["reader@example.net"]
        local = real.rpartition("@")[0]
        forged = local[:-4] + ("aaaa" if not local.endswith("aaaa") else "bbbb") + "@relay.test"
        for recipient in (
            "someone@elsewhere.example",  # a foreign domain: never an open relay
            "bob@example.net",
            "alice@example.org",  # an enrolled domain without forward-to
            "alice@mallory.example",
            forged,  # a VERP token whose MAC does not hold
            "bounces+01JAAAAAAAAAAAAAAAAAAAAAAA-1-aaaaaaaaaaaaaaaa@relay.test",
            "SRS0=abcd=aa=remote.test=stranger@relay.test",  # SRS whose hash does not hold
            "nobody@relay.test",
            "alice@[127.0.0.1]",
        ):
            for sender in ("", "spammer@elsewhere.example"):
                code, text = await trio.to_thread.run_sync(rcpt_reply, relay, recipient, sender)
                assert (code, text[:5]) == (550, b"5.1.1"), (recipient, code, text)
        assert (await trio.to_thread.run_sync(rcpt_reply, relay, real))[0] == 250
        assert (await trio.to_thread.run_sync(rcpt_reply, relay, "postmaster@relay.test"))[0] == 250
        assert (await trio.to_thread.run_sync(rcpt_reply, relay, "PostMaster@Relay.Test"))[0] == 250
        # and nothing of it was queued for delivery anywhere
        assert len(relay.handle.ctx.queue.state.messages) == 1
        assert relay.handle.ctx.inbound is not None
        assert relay.handle.ctx.inbound.refused_rcpt == 18


async def test_no_auth_on_the_inbound_listener_and_starttls_is_offered(
    tmp_path: Path, dns_server: DnsServer
) -> None:
    async with delivering(tmp_path, dns_server) as (relay, _):

        def probe() -> tuple[bool, bool, int]:
            with smtplib.SMTP("127.0.0.1", relay.handle.port("inbound"), timeout=10) as smtp:
                smtp.ehlo("x.example")
                offers_tls = smtp.has_extn("starttls")
                offers_auth = smtp.has_extn("auth")
                smtp.starttls(context=relay.client_context())
                smtp.ehlo("x.example")
                code, _ = smtp.docmd("AUTH", "PLAIN AGFiYwBkZWY=")
                return offers_tls, offers_auth or smtp.has_extn("auth"), code

        offers_tls, offers_auth, code = await trio.to_thread.run_sync(probe)
        assert offers_tls and not offers_auth
        assert code == 503
        report = samples.arf("abuse@relay.test", did=ALICE, redact=True)
        refused = await trio.to_thread.run_sync(
            lambda: inbound(relay, "x@aol.example", ["abuse@relay.test"], report, tls=True)
        )
        assert refused == {}
        await processed(relay, 1)


async def test_role_mail_is_kept_and_forwarded_and_unparseable_reports_counted(
    tmp_path: Path, dns_server: DnsServer
) -> None:
    more = '[inbound]\nrole_forward = "ops@example.net"\n'
    async with delivering(tmp_path, dns_server, more) as (relay, sink):
        note = b"From: someone@remote.test\r\nSubject: your relay\r\n\r\nhello postmaster\r\n"
        await trio.to_thread.run_sync(
            inbound, relay, "someone@remote.test", ["postmaster@relay.test"], note
        )
        broken = (
            b'Content-Type: multipart/report; report-type=feedback-report; boundary="z"\r\n\r\n'
            b"--z\r\nContent-Type: text/plain\r\n\r\nno report part at all\r\n--z--\r\n"
        )
        await trio.to_thread.run_sync(inbound, relay, "", ["fbl@relay.test"], broken)
        await processed(relay, 2)
        both = await wait_for(sink, 2)  # what the operator should see goes to role_forward
        (forwarded,) = [m for m in both if b"hello postmaster" in m.content]
        (report,) = [m for m in both if b"no report part" in m.content]
        assert report.mail_from == "<>"  # from the null sender, so it is passed on from it
        assert forwarded.rcpt_tos == report.rcpt_tos == ("ops@example.net",)
        assert forwarded.mail_from.startswith("SRS0=")
        assert forwarded.mail_from.endswith("=remote.test=someone@relay.test")
        assert b"hello postmaster" in forwarded.content
        assert relay.handle.inbound is not None
        assert relay.handle.inbound.unparseable == 1
    listed = cli(tmp_path, "inbound", "list", "--json")
    rows = {r["kind"]: r for r in json.loads(listed.stdout)}
    assert set(rows) == {"role", "other"}
    assert "forwarded to ops@example.net" in rows["role"]["summary"]
    store = Store(relay.config.accounts_db)
    try:
        kept = store.inbound_message(rows["other"]["id"])
    finally:
        store.close()
    assert kept == broken  # kept for the operator to read
    human = cli(tmp_path, "inbound", "list", "--kind", "role")
    assert (
        human.returncode == 0 and "role" in human.stdout and "postmaster@relay.test" in human.stdout
    )


async def test_replies_are_forwarded_with_srs_and_their_bounces_find_the_sender(
    tmp_path: Path, dns_server: DnsServer
) -> None:
    async with delivering(tmp_path, dns_server) as (relay, sink):
        headers = {"Authorization": f"Bearer {relay.key}", "X-Atmos-DID": ALICE}
        async with httpx.AsyncClient(base_url=relay.handle.http_url, timeout=10) as http:
            bad = await http.put(
                "/member/forward-to",
                json={"domain": "mallory.example", "forward_to": "a@example.net"},
                headers=headers,
            )
            assert (bad.status_code, bad.json()["code"]) == (403, "DOMAIN_MISMATCH")
            loop = await http.put(
                "/member/forward-to",
                json={"domain": "example.org", "forward_to": "me@example.org"},
                headers=headers,
            )
            assert (loop.status_code, loop.json()["code"]) == (400, "INVALID_REQUEST")
            ok = await http.put(
                "/member/forward-to",
                json={"domain": "example.org", "forward_to": "alice.inbox@example.net"},
                headers=headers,
            )
            assert ok.status_code == 200, ok.text
            assert ok.json() == {"domain": "example.org", "forward_to": "alice.inbox@example.net"}
        reply = (
            b"From: Stranger <stranger@remote.test>\r\nTo: alice@example.org\r\n"
            b"Subject: Re: the newsletter\r\nMessage-ID: <r1@remote.test>\r\n\r\nthanks!\r\n"
        )
        refused = await trio.to_thread.run_sync(
            inbound,
            relay,
            "stranger@remote.test",
            ["alice@example.org", "hello@example.org"],
            reply,
        )
        assert refused == {}
        (got,) = await wait_for(sink, 1)
        assert got.rcpt_tos == ("alice.inbox@example.net",)  # both addresses, one copy
        assert got.mail_from.startswith("SRS0=") and got.mail_from.endswith("@relay.test")
        forwarded = message_from_bytes(got.content, policy=default_policy)
        assert forwarded["Message-ID"] == "<r1@remote.test>"  # the reply itself, unchanged
        assert str(forwarded["Received"]).startswith("from mx.example.net ([127.0.0.1])")

        # the forward bounces at the member's inbox: the DSN comes back to the SRS address
        # and is passed on to the reply's sender, from the null sender
        dsn = samples.postfix_dsn(got.mail_from, "alice.inbox@example.net")
        await trio.to_thread.run_sync(inbound, relay, "", [got.mail_from], dsn)
        received = await wait_for(sink, 2)
        back = received[1]
        assert back.rcpt_tos == ("stranger@remote.test",)
        assert back.mail_from == "<>"
        assert b"Undelivered Mail Returned to Sender" in back.content
        await processed(relay, 2)
        # a forward is the relay's own mail: the member's figures do not move
        figures = await deliverability(relay)
        assert (figures["sent_14d"], figures["bounced_14d"]) == (0, 0)
        assert suppressions(relay) == {}

        # the CLI refuses what the API refuses, and turns forwarding off; then the domain
        # answers 550 5.1.1 again
        loop = cli(tmp_path, "domain", "forward-to", "example.org", "me@Example.ORG")
        assert (loop.returncode, "itself" in loop.stderr) == (65, True), loop.stderr
        bad = cli(tmp_path, "domain", "forward-to", "example.org", "not an address")
        assert (bad.returncode, "not an email address" in bad.stderr) == (65, True)
        off = cli(tmp_path, "domain", "forward-to", "example.org", "--clear")
        assert off.returncode == 0, off.stderr
        code, _ = await trio.to_thread.run_sync(rcpt_reply, relay, "alice@example.org")
        assert code == 550


async def test_the_unsubscribe_mailto_suppresses_like_the_one_click_post(
    tmp_path: Path, dns_server: DnsServer
) -> None:
    async with delivering(tmp_path, dns_server) as (relay, sink):
        await trio.to_thread.run_sync(submit, relay, BULK, "reader@example.net")
        (got,) = await wait_for(sink, 1)
        header = message_from_bytes(got.content, policy=default_policy)["List-Unsubscribe"]
        mailto = next(p.strip("<> ") for p in str(header).split(",") if "mailto:" in p)
        address, _, query = mailto.removeprefix("mailto:").partition("?")
        subject = unquote(query.removeprefix("subject="))
        request = (
            f"From: reader@example.net\r\nTo: {address}\r\nSubject: {subject}\r\n\r\n".encode()
        )
        await trio.to_thread.run_sync(inbound, relay, "reader@example.net", [address], request)
        # a forged one: someone else's address with this token
        forged = request.replace(b"unsubscribe did", b"unsubscribe did").replace(
            b" reader@example.net ", b" victim@example.net "
        )
        await trio.to_thread.run_sync(inbound, relay, "x@example.net", [address], forged)
        await processed(relay, 2)
        assert relay.handle.inbound is not None
        assert relay.handle.inbound.processed["unsubscribe"] == 1
        assert relay.handle.inbound.processed["other"] == 1
        assert suppressions(relay) == {"reader@example.net": "unsubscribe"}


async def test_an_inbound_flood_from_one_address_is_slowed(
    tmp_path: Path, dns_server: DnsServer
) -> None:
    async with delivering(tmp_path, dns_server, "[inbound]\nhourly_per_ip = 2\n") as (relay, _):
        note = b"Subject: hi\r\n\r\nhi\r\n"
        for _ in range(2):
            await trio.to_thread.run_sync(
                inbound, relay, "a@remote.test", ["abuse@relay.test"], note
            )

        def third() -> int:
            with smtplib.SMTP("127.0.0.1", relay.handle.port("inbound"), timeout=10) as smtp:
                smtp.ehlo("x.example")
                return smtp.mail("a@remote.test")[0]

        assert await trio.to_thread.run_sync(third) == 450


async def test_an_inbound_message_left_unprocessed_is_applied_before_ready(
    tmp_path: Path,
) -> None:
    """The state a kill -9 between the fsync and the processing leaves: an INBOUND record
    without its DONE. The next start applies it before it says ready."""
    ca = trustme.CA()
    config = make_config(tmp_path, ca)
    report = samples.arf("abuse@relay.test", did=ALICE, redact=True)
    record = Inbound(
        id=new_queue_id(),
        received_at=1_795_000_000.0,
        sender="fbl@aol.example",
        recipients=(InboundRecipient("abuse@relay.test", "role"),),
        client={"ip": "192.0.2.9", "helo": "mx.aol.example", "tls": None},
        size=len(report),
    )
    async with open_journal(str(config.journal_dir)) as journal:
        await QueueStore(journal).receive(record, report)
    async with running_relay(tmp_path, config=config, ca=ca) as relay:
        assert relay.handle.inbound is not None
        assert dict(relay.handle.inbound.processed) == {"complaint": 1}
        store = Store(relay.config.accounts_db)
        try:
            (entry,) = store.inbound()
        finally:
            store.close()
        assert (entry.id, entry.kind, entry.did) == (record.id, "complaint", ALICE)
        assert relay.handle.ctx.queue.pending_inbound() == []


async def test_one_complaint_in_ten_deliveries_pauses_the_domain(
    tmp_path: Path, dns_server: DnsServer
) -> None:
    readers = [f"reader{i}@example.net" for i in range(10)]
    async with delivering(tmp_path, dns_server) as (relay, sink):
        await trio.to_thread.run_sync(submit, relay, BULK, *readers)
        paths = await delivered(relay, sink, 10)
        assert paused(relay) is None
        report = samples.arf(paths["reader3@example.net"], rcpt="reader3@example.net")
        await trio.to_thread.run_sync(inbound, relay, "", [paths["reader3@example.net"]], report)
        await processed(relay, 1)
        reason = paused(relay)
        assert reason is not None and reason.startswith("complaint rate 1/10 = 10.00%")

        def mail_from() -> int:
            with smtplib.SMTP("127.0.0.1", relay.starttls_port, timeout=10) as smtp:
                smtp.starttls(context=relay.client_context())
                smtp.login("alice.test", relay.key)
                return smtp.mail("alice@example.org")[0]

        assert await trio.to_thread.run_sync(mail_from) == 550  # DOMAIN_PAUSED
