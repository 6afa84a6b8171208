"""The HTTP API of a real relay (tests/relay/harness.py: real listeners on 127.0.0.1 port
0, a real account store and journal), spoken to by httpx over a real socket."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from tests.relay.harness import ALICE, MALLORY, Relay, running_relay


@attrs.define
class Api:
    relay: Relay
    http: httpx.AsyncClient

    @property
    def alice(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.relay.key}", "X-Atmos-DID": ALICE}

    @property
    def mallory(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.relay.mallory_key}", "X-Atmos-DID": MALLORY}

    async def send(self, auth: dict[str, str] | None = None, **body: Any) -> httpx.Response:
        """POST /v1/send of a small message with ``body``'s fields; ``auth``: the request's
        headers (Alice's credentials unless given)."""
        message = {"from": "alice@example.org", "to": "bob@example.net", "text": "hello"}
        message.update(body)
        return await self.http.post(
            "/v1/send", json=message, headers=self.alice if auth is None else auth
        )

    def queued(self) -> set[str]:
        return set(self.relay.handle.ctx.queue.state.messages)


@asynccontextmanager
async def api_relay(tmp: Path, **kwargs: Any) -> AsyncIterator[Api]:
    async with (
        running_relay(tmp, **kwargs) as relay,
        httpx.AsyncClient(base_url=relay.handle.http_url, timeout=20) as http,
    ):
        yield Api(relay, http)


async def eventually(check: Any, limit: float = 10.0) -> None:
    """Poll ``check()`` until true (bounded): for state another thread or task changes."""
    with trio.fail_after(limit):
        while not await check():  # noqa: ASYNC110 - the state is another task's or thread's
            await trio.sleep(0.05)
