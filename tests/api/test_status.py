"""What became of a message (GET /v1/messages), idempotent sends, a member's own figures,
and the operator's /metrics: against a real relay, delivering to a stand-in MX (aiosmtpd)
that accepts, defers and refuses chosen recipients."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import trio
import trustme
from prometheus_client.parser import text_string_to_metric_families

from tests.api.client import Api, api_relay, eventually
from tests.delivery.test_end_to_end import TRANSACTIONAL, submit
from tests.relay.harness import make_config
from tests.relay.test_kill import cli_json
from tests.sink import Sink, aiosmtpd_sink

REFUSE = {
    "later@example.net": "451 4.2.0 <later@example.net>: mailbox busy, try later",
    "nobody@example.net": "550 5.1.1 <nobody@example.net>: no such user",
}


@asynccontextmanager
async def delivering(tmp: Path) -> AsyncIterator[tuple[Api, Sink]]:
    ca = trustme.CA()
    with aiosmtpd_sink() as sink:
        sink.refuse.update(REFUSE)
        config = make_config(tmp, ca, f'[delivery]\nsmarthost = "127.0.0.1:{sink.port}"\n')
        async with api_relay(tmp, config=config, ca=ca) as api:
            yield api, sink


async def _status(api: Api, queue_id: str, headers: dict[str, str] | None = None) -> Any:
    r = await api.http.get(f"/v1/messages/{queue_id}", headers=headers or api.alice)
    return r.status_code, r.json()


async def test_each_recipient_through_sent_deferred_and_bounced(tmp_path: Path) -> None:
    async with delivering(tmp_path) as (api, sink):
        r = await api.send(
            to=["bob@example.net", "later@example.net", "nobody@example.net"],
            category="transactional",
            tags=["receipt"],
            metadata={"order": "7"},
        )
        assert r.status_code == 200, r.text
        queue_id = r.json()["id"]
        first = await _status(api, queue_id)

        async def settled() -> bool:
            _, body = await _status(api, queue_id)
            return all(x["status"] != "accepted" for x in body["recipients"])

        await eventually(settled, 20)
        code, body = await _status(api, queue_id)
    assert first[0] == 200 and first[1]["status"] == "accepted"
    assert code == 200
    by = {x["recipient"]: x for x in body["recipients"]}
    assert {a: x["status"] for a, x in by.items()} == {
        "bob@example.net": "sent",
        "later@example.net": "deferred",
        "nobody@example.net": "bounced",
    }
    assert body["status"] == "deferred"  # the message still has a recipient to deliver
    assert body["finishedAt"] is None
    (sent,) = by["bob@example.net"]["attempts"]
    (bounced,) = by["nobody@example.net"]["attempts"]
    (deferred,) = by["later@example.net"]["attempts"]
    assert (bounced["code"], bounced["remote"]) == ("5.1.1", "127.0.0.1")
    assert "no such user" in bounced["reply"]
    assert deferred["code"] == "4.2.0" and "mailbox busy" in deferred["reply"]
    assert sent["status"] == "sent" and sent["at"] >= body["acceptedAt"]
    assert (body["category"], body["tags"], body["metadata"]) == (
        "transactional",
        ["receipt"],
        {"order": "7"},
    )
    assert body["sender"] == "alice@example.org" and body["messageId"] == r.json()["messageId"]
    delivered = {r for x in sink.snapshot() for r in x.rcpt_tos}
    assert delivered - {"alice@example.org"} == {"bob@example.net"}  # (and perhaps the DSN)


async def test_a_member_sees_only_its_own_messages(tmp_path: Path) -> None:
    async with api_relay(tmp_path) as api:
        alices = (await api.send()).json()["id"]
        mallorys = (await api.send(auth=api.mallory, **{"from": "m@mallory.example"})).json()["id"]
        as_mallory = await _status(api, alices, api.mallory)
        missing = await _status(api, "01ZZZZZZZZZZZZZZZZZZZZZZZZ")
        listed = await api.http.get("/v1/messages", headers=api.mallory)
    assert as_mallory[0] == 404 and as_mallory[1]["code"] == "NOT_FOUND"
    assert missing[0] == 404 and as_mallory[1]["error"].startswith("No message")
    assert [m["id"] for m in listed.json()["messages"]] == [mallorys]


async def test_pages_newest_first_without_repeats_and_by_status(tmp_path: Path) -> None:
    async with api_relay(tmp_path) as api:
        sent = []
        for i in range(7):
            r = await api.send(subject=f"n{i}")
            sent.append(r.json()["id"])
            await trio.sleep(0.002)  # distinct acceptance times (ordering is also by id)
        pages, cursor = [], None
        while True:
            params: dict[str, Any] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
            r = await api.http.get("/v1/messages", params=params, headers=api.alice)
            assert r.status_code == 200, r.text
            pages.append([m["id"] for m in r.json()["messages"]])
            cursor = r.json()["cursor"]
            if cursor is None:
                break
            await api.send(subject="arrives while paging")  # newer: never in a later page
        accepted = await api.http.get("/v1/messages?status=accepted&limit=100", headers=api.alice)
        bounced = await api.http.get("/v1/messages?status=bounced", headers=api.alice)
        future = await api.http.get("/v1/messages?since=2099-01-01T00:00:00Z", headers=api.alice)
        bad = await api.http.get("/v1/messages?cursor=bm90IG1pbmU", headers=api.alice)
        bad_status = await api.http.get("/v1/messages?status=lost", headers=api.alice)
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [q for p in pages for q in p] == list(reversed(sent))
    assert len(accepted.json()["messages"]) == 7 + 2
    assert bounced.json() == {"messages": [], "cursor": None}
    assert future.json()["messages"] == []
    assert bad.status_code == 400 and "cursor" in bad.json()["error"]
    assert bad_status.status_code == 400 and bad_status.json()["code"] == "INVALID_REQUEST"


async def test_the_same_idempotency_key_returns_the_first_answer(tmp_path: Path) -> None:
    async with api_relay(tmp_path) as api:
        key = {**api.alice, "Idempotency-Key": "order-7-receipt"}
        first = await api.send(auth=key, to=["bob@example.net", "carol@example.net"])
        again = await api.send(auth=key, to=["bob@example.net", "carol@example.net"])
        other = await api.send(auth=key, to=["bob@example.net"])
        # the same key is another member's own
        theirs = await api.send(
            auth={**api.mallory, "Idempotency-Key": "order-7-receipt"},
            **{"from": "m@mallory.example"},
        )
        await api.relay.handle.ctx.queue.journal.rotate()  # and from the index, once committed
        await api.relay.handle.ctx.queue.journal.rotate()
        await api.send(subject="more")  # the index commits in the background
        third = await api.send(auth=key, to=["bob@example.net", "carol@example.net"])
        queued = len(api.queued())
    assert first.status_code == again.status_code == third.status_code == 200
    assert again.json() == first.json() == third.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert other.status_code == 422 and other.json()["code"] == "IDEMPOTENCY_CONFLICT"
    assert theirs.status_code == 200 and theirs.json()["id"] != first.json()["id"]
    assert queued == 3  # Alice's first, Mallory's, and "more"


async def test_concurrent_retries_with_one_key_queue_once(tmp_path: Path) -> None:
    async with api_relay(tmp_path) as api:
        key = {**api.alice, "Idempotency-Key": "k-1"}
        answers: list[httpx.Response] = []
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(lambda: _append(answers, api.send(auth=key)))
        queued = len(api.queued())
    assert [a.status_code for a in answers] == [200] * 5
    assert len({a.json()["id"] for a in answers}) == 1
    assert queued == 1


async def _append(into: list[httpx.Response], request: Any) -> None:
    into.append(await request)


async def test_member_status_and_deliverability(tmp_path: Path) -> None:
    async with delivering(tmp_path) as (api, _):
        await api.send(to=["bob@example.net", "nobody@example.net"])

        async def finished() -> bool:
            r = await api.http.get("/member/deliverability", headers=api.alice)
            return bool(r.json()["sent_14d"] + r.json()["bounced_14d"] == 2)

        await eventually(finished, 20)
        standing = (await api.http.get("/member/status", headers=api.alice)).json()
        figures = (await api.http.get("/member/deliverability", headers=api.alice)).json()
        anonymous = await api.http.get("/member/status")
    assert standing["did"] == figures["did"] and standing["handle"] == "alice.test"
    assert standing["status"] == "active" and standing["hourly"]["used"] == 2
    assert {d["domain"]: d["state"] for d in standing["domains"]} == {
        "example.org": "verified",
        "pending.example.org": "pending",
    }
    assert (figures["sent_14d"], figures["bounced_14d"], figures["bounce_rate"]) == (1, 1, 0.5)
    assert len(figures["daily_sends"]) == 14 and figures["daily_sends"][-1] == 2
    assert figures["hourly_limit"] == standing["hourly"]["limit"]
    assert anonymous.status_code == 400 and anonymous.json()["code"] == "AUTH_REQUIRED"


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_parse_and_move_with_traffic(tmp_path: Path) -> None:
    async with delivering(tmp_path) as (api, _):
        before = _samples((await api.http.get("/metrics")).text)
        await api.send(to=["bob@example.net"])
        await api.send(**{"from": "x@elsewhere.example"})
        await trio.to_thread.run_sync(submit, api.relay, TRANSACTIONAL, "carol@example.net")

        async def delivered() -> bool:
            now = _samples((await api.http.get("/metrics")).text)
            return now.get(("atmosrelay_delivery_outcomes_total", (("outcome", "sent"),)), 0) >= 2

        await eventually(delivered, 20)
        after = _samples((await api.http.get("/metrics")).text)
    accepted = ("atmosrelay_messages_accepted_total", (("via", "http"),))
    refused = (
        "atmosrelay_messages_refused_total",
        (("code", "DOMAIN_MISMATCH"), ("via", "http")),
    )
    assert (before[accepted], after[accepted]) == (0, 1)
    assert before.get(refused, 0) == 0 and after[refused] == 1
    appends = ("atmosrelay_journal_appends_total", ())
    assert after[appends] >= before[appends] + 2  # the message and its delivery record
    assert after[("atmosrelay_journal_batch_seconds_count", ())] >= 2
    assert after[("atmosrelay_queue_recipients", (("state", "sent"),))] == 2
    # the SMTP message's end of data to its 250, on the relay's clock: one observation,
    # in a bucket (the HTTP sends have no end of data)
    replies = "atmosrelay_smtp_data_reply_seconds"
    assert (before[(f"{replies}_count", ())], after[(f"{replies}_count", ())]) == (0, 1)
    assert 0 < after[(f"{replies}_sum", ())] < 10
    assert after[(f"{replies}_bucket", (("le", "+Inf"),))] == 1
    assert after[("atmosrelay_delivery_lanes", ())] == 1
    ok = ("atmosrelay_http_requests_total", (("route", "/v1/send"), ("status", "200")))
    assert after[ok] == 1


async def test_a_compacted_message_is_still_answered_from_the_index(tmp_path: Path) -> None:
    """The relay's own compactor drops the finished message's records (it commits the index
    first); the API and ``queue show`` still answer from the status index."""
    ca = trustme.CA()
    with aiosmtpd_sink() as sink:
        config = make_config(tmp_path, ca, f'[delivery]\nsmarthost = "127.0.0.1:{sink.port}"\n')
        config = config.evolve(**{"journal.compact_interval": 0.1})
        async with api_relay(tmp_path, config=config, ca=ca) as api:
            queue_id = (await api.send()).json()["id"]
            queue = api.relay.handle.ctx.queue

            async def delivered() -> bool:
                msg = queue.state.messages.get(queue_id)
                return msg is not None and msg.terminal

            await eventually(delivered, 20)
            await queue.journal.rotate()  # seal the segment: compaction works on sealed ones

            async def compacted() -> bool:
                return queue_id not in queue.state.messages

            await eventually(compacted, 20)
            code, body = await _status(api, queue_id)
    (tmp_path / "cli.toml").write_text(f'[relay]\ndata_dir = "{config.data_dir}"\n')
    shown = cli_json(tmp_path / "cli.toml", "queue", "show", queue_id)
    assert code == 200 and body["status"] == "sent" and body["finishedAt"] is not None
    assert body["recipients"][0]["attempts"][0]["status"] == "sent"
    assert shown["source"] == "status index" and shown["recipients"] == {"bob@example.net": "sent"}
