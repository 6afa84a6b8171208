"""POST /v1/send against a real relay: what it takes, what it refuses (each code with its
HTTP status and ``retryable``), and that a 200 means the message is in the journal."""

from __future__ import annotations

import contextlib
import email
import email.policy
import errno
import json
import logging
from pathlib import Path

import pytest
import trio

from atmosrelay.accounts import api_keys, domains
from atmosrelay.accounts.store import Store
from atmosrelay.queue.records import RecordType, decode_accepted
from journal.testing import CrashableMemFS, FaultFS
from tests.api.client import Api, api_relay
from tests.relay.harness import ALICE, until_the_relay_sees_an_account_change


async def _message(api: Api, queue_id: str) -> bytes:
    """The message as the journal holds it."""
    queue = api.relay.handle.ctx.queue
    msg = queue.state.messages[queue_id]
    record = await queue.journal.read(msg.position)
    return record.payload[msg.body_offset :]


async def test_a_text_message_is_queued_and_answered_with_its_id(tmp_path: Path) -> None:
    async with api_relay(tmp_path) as api:
        r = await api.send(to=["bob@example.net", "Carol <carol@example.net>"], subject="Hi")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["id"] in api.queued()
        assert [a["recipient"] for a in body["accepted"]] == [
            "bob@example.net",
            "carol@example.net",
        ]
        assert {a["messageId"] for a in body["accepted"]} == {body["messageId"]}
        assert body["rejected"] == []
        data = await _message(api, body["id"])
        record = api.relay.handle.ctx.queue.state.messages[body["id"]].record
    assert record.sender == "alice@example.org"
    assert record.client["via"] == "http"
    assert record.message_id == body["messageId"]
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert parsed["Subject"] == "Hi"
    assert parsed["To"] == "bob@example.net, Carol <carol@example.net>"
    assert parsed.get_content_type() == "text/plain" and parsed["X-Atmos-Member-Did"] == ALICE


@pytest.mark.parametrize(
    ("parts", "content_type"),
    [
        ({"text": "plain words"}, b"text/plain"),
        ({"html": "<p>marked up</p>"}, b"text/html"),
        ({"text": "plain words", "html": "<p>marked up</p>"}, b"multipart/alternative"),
    ],
)
async def test_text_html_or_both(
    tmp_path: Path, parts: dict[str, str], content_type: bytes
) -> None:
    async with api_relay(tmp_path) as api:
        message = {"from": "alice@example.org", "to": "bob@example.net", **parts}
        r = await api.http.post("/v1/send", json=message, headers=api.alice)
        assert r.status_code == 200, r.text
        data = await _message(api, r.json()["id"])
    assert b"Content-Type: " + content_type in data
    for value in parts.values():
        assert value.encode() in data


async def test_non_ascii_is_encoded_and_settings_become_the_records(tmp_path: Path) -> None:
    async with api_relay(tmp_path) as api:
        r = await api.send(
            subject="Grüße",
            text="Ça va?",
            replyTo="Desk <desk@example.org>",
            headers={"X-Campaign": "autumn"},
            category="password-reset",
            tags=["signup", "eu"],
            metadata={"user": "42"},
        )
        assert r.status_code == 200, r.text
        queue_id = r.json()["id"]
        data = await _message(api, queue_id)
        record = api.relay.handle.ctx.queue.state.messages[queue_id].record
    assert data.isascii()  # RFC 2047 words and quoted-printable: no 8BITMIME needed
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert parsed["Subject"] == "Grüße"
    assert parsed.get_content().strip() == "Ça va?"
    assert parsed["Reply-To"] == "Desk <desk@example.org>" and parsed["X-Campaign"] == "autumn"
    assert b"X-Atmos-Category" not in data  # read and removed, as from SMTP
    assert (record.category, record.bulk, record.tags) == (
        "password-reset",
        False,
        ("signup", "eu"),
    )
    assert record.metadata == {"user": "42"}


async def test_fifty_recipients_and_not_fifty_one(tmp_path: Path) -> None:
    async with api_relay(tmp_path) as api:
        fifty = [f"r{i}@example.net" for i in range(50)]
        ok = await api.send(to=fifty)
        over = await api.send(to=[*fifty, "r50@example.net"])
        assert ok.status_code == 200, ok.text
        assert len(ok.json()["accepted"]) == 50
        assert over.status_code == 400
        assert over.json() == {
            "error": "Too many recipients",
            "code": "TOO_MANY_RECIPIENTS",
            "retryable": False,
        }
        assert len(api.queued()) == 1


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"headers": {"DKIM-Signature": "v=1"}}, "DKIM-Signature"),
        ({"headers": {"List-Unsubscribe": "<https://x>"}}, "List-Unsubscribe"),
        ({"headers": {"X-Atmos-Category": "bulk"}}, "X-Atmos-Category"),
        ({"headers": {"From": "mallory@example.org"}}, "From"),
        ({"headers": {"Bcc": "hidden@example.net"}}, "Bcc"),
        ({"headers": {"X-Ok": "line\r\nInjected: yes"}}, "X-Ok"),
        ({"subject": "Hi\r\nX-Atmos-Category: transactional"}, "subject"),
        ({"from": "Alice\n <alice@example.org>"}, "from"),
        ({"to": "Bob <bob@example.net>\r\nBcc: x@example.net"}, "to"),
        ({"to": "two@example.net, three@example.net"}, "to"),
        ({"from": "not an address"}, "from"),
        ({"text": None}, "text, html"),
        ({"cc": ["x@example.net"]}, "cc"),
        ({"tags": ["has space"]}, "tags"),
    ],
)
async def test_a_bad_request_is_refused_naming_the_field(
    tmp_path: Path, body: dict[str, object], named: str
) -> None:
    async with api_relay(tmp_path) as api:
        r = await api.send(**body)
        assert r.status_code == 400, r.text
        assert r.json()["code"] == "INVALID_REQUEST"
        assert r.json()["retryable"] is False
        assert named in r.json()["error"]
        assert not api.queued()


async def _raw_post(api: Api, body: bytes) -> tuple[int, bytes]:
    """POST over a plain socket: the server may answer 413 before the body is all sent, and
    a client stream left unfinished (httpx's) would warn at garbage collection, in whichever
    test that happens to be."""
    host, port, _ = api.relay.handle.http[0]
    head = (
        f"POST /v1/send HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Authorization: {api.alice['Authorization']}\r\nX-Atmos-DID: {ALICE}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        # It may answer and close before reading it all: the answer is still there.
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(head + body)
        answer = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some():
                answer += chunk
    status = int(answer.split(b" ", 2)[1])
    return status, answer.partition(b"\r\n\r\n")[2]


async def test_a_body_that_is_not_json_or_too_large(tmp_path: Path) -> None:
    big = json.dumps(
        {"from": "alice@example.org", "to": "bob@example.net", "text": "x" * (1024 * 1024)}
    ).encode()
    async with api_relay(tmp_path) as api:
        garbled = await api.http.post("/v1/send", content=b"{not json", headers=api.alice)
        status, large = await _raw_post(api, big)
        fits = await _raw_post(api, big[: 1024 * 1024 - 200] + b'"}')
        queued = api.queued()
    assert garbled.status_code == 400 and garbled.json()["code"] == "INVALID_REQUEST"
    assert status == 413 and json.loads(large)["code"] == "MESSAGE_TOO_LARGE"
    assert fits[0] == 200, fits
    assert len(queued) == 1


async def test_credentials_refusals(tmp_path: Path) -> None:
    async with api_relay(tmp_path) as api:
        key = api.relay.key
        cases = {
            "none": ({}, 400, "AUTH_REQUIRED"),
            "no DID": ({"Authorization": f"Bearer {key}"}, 400, "AUTH_REQUIRED"),
            "basic": (
                {"Authorization": f"Basic {key}", "X-Atmos-DID": ALICE},
                400,
                "AUTH_REQUIRED",
            ),
            "bad DID": (
                {"Authorization": f"Bearer {key}", "X-Atmos-DID": "did:key:z6Mk"},
                400,
                "INVALID_DID",
            ),
            "wrong key": (
                {"Authorization": "Bearer atmos_wrong", "X-Atmos-DID": ALICE},
                401,
                "AUTH_FAILED",
            ),
            "another's key": (
                {"Authorization": f"Bearer {api.relay.mallory_key}", "X-Atmos-DID": ALICE},
                401,
                "AUTH_FAILED",
            ),
        }
        for name, (headers, status, code) in cases.items():
            r = await api.send(auth=headers)
            assert (name, r.status_code, r.json()["code"], r.json()["retryable"]) == (
                name,
                status,
                code,
                False,
            )
        handle = await api.send(
            auth={"Authorization": f"Bearer {key}", "X-Atmos-DID": "alice.test"}
        )
        assert handle.status_code == 200, handle.text
        assert len(api.queued()) == 1


async def test_sender_domain_refusals(tmp_path: Path) -> None:
    async with api_relay(tmp_path) as api:
        foreign = await api.send(**{"from": "alice@elsewhere.example"})
        mallorys = await api.send(**{"from": "alice@mallory.example"})
        pending = await api.send(**{"from": "alice@pending.example.org"})
        store = Store(api.relay.config.accounts_db)
        before = api.relay.handle.ctx.keys.generation
        store.set_paused("example.org", "bounce rate 9% over 24 h")
        store.close()
        await until_the_relay_sees_an_account_change(api.relay, before)
        paused = await api.send()
    for r in (foreign, mallorys, pending):
        assert (r.status_code, r.json()["code"]) == (403, "DOMAIN_MISMATCH")
    assert (paused.status_code, paused.json()["code"]) == (403, "DOMAIN_PAUSED")
    assert "9%" in paused.json()["error"]


async def test_a_suspended_member_gets_403(tmp_path: Path) -> None:
    async with api_relay(tmp_path) as api:
        store = Store(api.relay.config.accounts_db)
        before = api.relay.handle.ctx.keys.generation
        store.set_status(ALICE, "suspended", "under review")
        store.close()
        await until_the_relay_sees_an_account_change(api.relay, before)
        r = await api.send()
    assert (r.status_code, r.json()["code"], r.json()["retryable"]) == (
        403,
        "MEMBER_SUSPENDED",
        False,
    )


async def test_the_warming_tier_answers_429_with_retry_after(tmp_path: Path) -> None:
    newcomer = "did:plc:nnnnnnnnnnnnnnnnnnnnnnnn"
    async with api_relay(tmp_path) as api:
        store = Store(api.relay.config.accounts_db)
        store.add_member(newcomer, "newcomer.test")  # created now: warming tier 1, 5 an hour
        domains.enroll(store, newcomer, "new.example", limit=2, clock_now=0)
        store.mark_verified("new.example", without_dns=True)
        key = api_keys.issue(store, newcomer, cost=4).secret
        store.close()
        headers = {"Authorization": f"Bearer {key}", "X-Atmos-DID": newcomer}
        answers = []
        for i in range(6):
            r = await api.send(auth=headers, **{"from": "news@new.example", "subject": f"{i}"})
            answers.append(r)
        whole = await api.send(
            auth=headers,
            **{"from": "news@new.example", "to": [f"r{i}@example.net" for i in range(6)]},
        )
    assert [r.status_code for r in answers] == [200] * 5 + [429]
    limited = answers[-1]
    assert limited.json()["code"] == "RATE_LIMITED" and limited.json()["retryable"] is True
    assert 1 <= int(limited.headers["Retry-After"]) <= 3600 + 60  # an hour, and a bucket
    assert "Hourly limit of 5" in limited.json()["error"]
    # Six recipients can never fit under five an hour: refused, and not worth retrying.
    assert whole.status_code == 429 and whole.json()["retryable"] is False


async def test_suppressed_recipients_are_listed_in_rejected(tmp_path: Path) -> None:
    async with api_relay(tmp_path) as api:
        store = Store(api.relay.config.accounts_db)
        before = api.relay.handle.ctx.keys.generation
        store.suppress(ALICE, "gone@example.net", "hard-bounce", "550 5.1.1")
        store.suppress(ALICE, "left@example.net", "unsubscribe")
        store.close()
        await until_the_relay_sees_an_account_change(api.relay, before)
        mixed = await api.send(to=["bob@example.net", "gone@example.net", "left@example.net"])
        every = await api.send(to=["gone@example.net", "left@example.net"])
        transactional = await api.send(to=["left@example.net"], category="login-link")
    assert mixed.status_code == 200
    assert [a["recipient"] for a in mixed.json()["accepted"]] == ["bob@example.net"]
    assert {(r["recipient"], r["code"]) for r in mixed.json()["rejected"]} == {
        ("gone@example.net", "RECIPIENT_SUPPRESSED"),
        ("left@example.net", "RECIPIENT_SUPPRESSED"),
    }
    assert every.status_code == 200  # the reference's shape: 200, everyone in "rejected"
    assert every.json()["id"] is None and every.json()["accepted"] == []
    assert len(every.json()["rejected"]) == 2
    # An unsubscribe blocks bulk mail only.
    assert [a["recipient"] for a in transactional.json()["accepted"]] == ["left@example.net"]


async def test_a_poisoned_journal_answers_503_and_readyz_says_why(tmp_path: Path) -> None:
    fs = FaultFS(CrashableMemFS(), only="sync", fail_at=1, error=errno.EIO)  # 1 sync at open
    async with api_relay(tmp_path, fs=fs) as api:
        ready = await api.http.get("/readyz")
        failed = await api.send()
        after = await api.send()
        not_ready = await api.http.get("/readyz")
        alive = await api.http.get("/healthz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    for r in (failed, after):
        assert r.status_code == 503
        assert (r.json()["code"], r.json()["retryable"]) == ("TEMPORARILY_UNAVAILABLE", True)
        assert int(r.headers["Retry-After"]) > 0
    assert not_ready.status_code == 503
    assert any("fsync" in p for p in not_ready.json()["problems"])
    assert alive.status_code == 200


async def test_the_journal_disk_full_is_503_queue_full_until_an_append_fits(
    tmp_path: Path,
) -> None:
    fs = FaultFS(CrashableMemFS(), only="append", fail_at=2, error=errno.ENOSPC)  # 1 at open
    async with api_relay(tmp_path, fs=fs) as api:
        first = await api.send(subject="1")
        full = await api.send(subject="2")
        not_ready = await api.http.get("/readyz")
        again = await api.send(subject="3")  # the disk has room again
        ready = await api.http.get("/readyz")
        queued = len(api.queued())
    assert first.status_code == 200
    assert (full.status_code, full.json()["code"], full.json()["retryable"]) == (
        503,
        "QUEUE_FULL",
        True,
    )
    assert "Retry-After" in full.headers
    assert not_ready.status_code == 503
    assert not_ready.json()["problems"] == ["journal: the disk is full"]
    assert again.status_code == 200 and ready.status_code == 200
    assert queued == 2


async def test_no_key_reaches_a_reply_or_a_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "atmos_" + "s3cr3t" * 6
    async with api_relay(tmp_path) as api:
        answers = [
            await api.send(auth={"Authorization": f"Bearer {wrong}", "X-Atmos-DID": ALICE}),
            await api.send(auth={"Authorization": f"Bearer {wrong}", "X-Atmos-DID": "did:key:x"}),
            await api.send(),
            await api.send(auth={**api.alice, "X-Atmos-DID": "alice.test"}, cc="x"),
        ]
        secrets = [wrong, api.relay.key]
    logged = "\n".join(r.getMessage() for r in caplog.records) + caplog.text
    for secret in secrets:
        for r in answers:
            assert secret not in r.text and secret not in str(r.headers)
        assert secret not in logged
        assert secret[6:20] not in logged


async def test_x_forwarded_for_is_believed_only_from_trusted_proxies(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="atmosrelay.http")
    bad = {"Authorization": "Bearer atmos_nope", "X-Atmos-DID": ALICE}
    forwarded = {**bad, "X-Forwarded-For": "198.51.100.7, 203.0.113.9"}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with api_relay(tmp_path / "a") as api:
        await api.send(auth=forwarded)
    untrusted = caplog.text
    caplog.clear()
    extra = (
        '[http]\nlisteners = ["127.0.0.1:0"]\ntrusted_proxies = ["127.0.0.0/8"]\n'
        '[smtp]\nlisteners = ["127.0.0.1:0 implicit"]\n'
    )
    async with api_relay(tmp_path / "b", extra=extra) as api:
        await api.send(auth=forwarded)
    assert "auth-failed from 127.0.0.1" in untrusted and "203.0.113.9" not in untrusted
    assert "auth-failed from 203.0.113.9" in caplog.text  # the nearest untrusted hop


async def test_two_hundred_means_in_the_journal(tmp_path: Path) -> None:
    """Every id answered 200 is in the ACCEPTED records the journal hands back on replay,
    read from the disk, not from the relay's memory."""
    async with api_relay(tmp_path) as api:
        ids = set()
        async with trio.open_nursery() as nursery:

            async def one(i: int) -> None:
                r = await api.send(subject=f"burst {i}")
                assert r.status_code == 200, r.text
                ids.add(r.json()["id"])

            for i in range(40):
                nursery.start_soon(one, i)
        journal = api.relay.handle.ctx.queue.journal
        on_disk = {
            decode_accepted(rec.payload)[0].id
            for rec in journal.records()
            if rec.type == RecordType.ACCEPTED
        }
    assert len(ids) == 40 and ids <= on_disk
