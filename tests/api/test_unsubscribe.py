"""RFC 8058 one-click unsubscribe at the link the relay wrote into a delivered message:
a POST with ``List-Unsubscribe=One-Click`` suppresses, a GET never does, a tampered token
changes nothing; and a person in a real browser (headless Chromium) opens the link, presses
the button, and is unsubscribed."""

from __future__ import annotations

import email
import re
import shutil
from pathlib import Path

import pytest
import trio
import trustme

from atmosrelay.accounts.store import Store
from tests.api.client import Api, api_relay, eventually
from tests.relay.harness import ALICE, make_config
from tests.sink import Sink, aiosmtpd_sink

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


def _suppressed(api: Api) -> dict[str, str]:
    store = Store(api.relay.config.accounts_db)
    try:
        return {s.address: s.source for s in store.suppressions(ALICE)}
    finally:
        store.close()


async def _link(api: Api, sink: Sink, rcpt: str) -> str:
    """Deliver a bulk message to ``rcpt``; return its List-Unsubscribe https link, pointed
    at this relay's HTTP listener (the path and query are what the relay signed)."""
    r = await api.send(to=rcpt, subject=f"news for {rcpt}")
    assert r.status_code == 200, r.text

    async def arrived() -> bool:
        return any(rcpt in x.rcpt_tos for x in sink.snapshot())

    await eventually(arrived, 20)
    (got,) = [x for x in sink.snapshot() if rcpt in x.rcpt_tos]
    header = str(email.message_from_bytes(got.content)["List-Unsubscribe"])
    found = re.search(r"<https://relay\.test(/unsubscribe\?[^>]+)>", header.replace("\r\n", ""))
    assert found, header
    return api.relay.handle.http_url + found.group(1)


def _delivering_config(tmp: Path, ca: trustme.CA, sink: Sink) -> object:
    return make_config(tmp, ca, f'[delivery]\nsmarthost = "127.0.0.1:{sink.port}"\n')


async def test_one_click_post_suppresses_and_a_get_does_not(tmp_path: Path) -> None:
    ca = trustme.CA()
    with aiosmtpd_sink() as sink:
        config = _delivering_config(tmp_path, ca, sink)
        async with api_relay(tmp_path, config=config, ca=ca) as api:
            link = await _link(api, sink, "reader@example.net")
            page = await api.http.get(link)
            after_get = _suppressed(api)
            tampered = await api.http.post(
                link[:-3] + ("AAA" if not link.endswith("AAA") else "BBB"),
                content=b"List-Unsubscribe=One-Click",
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            wrong_body = await api.http.post(link, content=b"unsubscribe=yes")
            after_bad = _suppressed(api)
            one_click = await api.http.post(
                link,
                content=b"List-Unsubscribe=One-Click",
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            twice = await api.http.post(link, files={"List-Unsubscribe": (None, "One-Click")})
            after = _suppressed(api)
            again = await api.send(to="reader@example.net")  # bulk: no longer sent
            receipt = await api.send(to="reader@example.net", category="password-reset")
    assert page.status_code == 200 and b'<form method="post"' in page.content
    assert page.headers["Cache-Control"] == "no-store"
    assert after_get == {}  # a GET (a mail scanner's prefetch) changes nothing
    assert tampered.status_code == 400 and b"INVALID_TOKEN" in tampered.content
    assert wrong_body.status_code == 400
    assert after_bad == {}
    assert one_click.status_code == 200 and "location" not in one_click.headers
    assert twice.status_code == 200  # RFC 8058 also allows multipart/form-data
    assert after == {"reader@example.net": "unsubscribe"}
    assert again.status_code == 200 and again.json()["accepted"] == []
    assert [r["code"] for r in again.json()["rejected"]] == ["RECIPIENT_SUPPRESSED"]
    assert [a["recipient"] for a in receipt.json()["accepted"]] == ["reader@example.net"]


async def test_a_link_for_another_recipient_or_member_does_not_verify(tmp_path: Path) -> None:
    ca = trustme.CA()
    with aiosmtpd_sink() as sink:
        config = _delivering_config(tmp_path, ca, sink)
        async with api_relay(tmp_path, config=config, ca=ca) as api:
            link = await _link(api, sink, "reader@example.net")
            swapped = link.replace("reader%40example.net", "victim%40example.net")
            other = link.replace(
                "did%3Aplc%3Aabcdefghijklmnopqrstuvwx", "did%3Aplc%3Ammmmmmmmmmmmmmmmmmmmmmmm"
            )
            assert swapped != link and other != link
            answers = [
                await api.http.post(u, content=b"List-Unsubscribe=One-Click")
                for u in (swapped, other)
            ]
            after = _suppressed(api)
    assert [a.status_code for a in answers] == [400, 400]
    assert after == {}


@pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="Debian's chromium and chromium-driver are not installed (.ci/run installs them)",
)
async def test_a_person_in_a_browser_presses_the_button(tmp_path: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    ca = trustme.CA()

    def press(url: str) -> tuple[str, str]:
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium'}",
        ):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        try:
            driver.set_page_load_timeout(30)
            driver.get(url)
            before = driver.title
            driver.find_element(By.ID, "unsubscribe").click()
            # The click starts a navigation and returns: wait (bounded) for the answer's page.
            done = WebDriverWait(driver, 30).until(
                expected_conditions.presence_of_element_located((By.ID, "done"))
            )
            return before, done.text
        finally:
            driver.quit()

    with aiosmtpd_sink() as sink:
        config = _delivering_config(tmp_path, ca, sink)
        async with api_relay(tmp_path, config=config, ca=ca) as api:
            link = await _link(api, sink, "reader@example.net")
            title, done = await trio.to_thread.run_sync(press, link)
            after = _suppressed(api)
    assert title == "Unsubscribe"
    assert "reader@example.net" in done and "no more" in done
    assert after == {"reader@example.net": "unsubscribe"}
