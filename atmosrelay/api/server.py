"""The HTTP listeners: hypercorn's trio worker inside the relay's own ``trio.run``.

Started with ``task_status`` (ready only once every socket listens), it serves until the
relay's stop event fires, together with the SMTP listeners: then it stops accepting, lets
requests in hand finish within the relay's ``smtp.shutdown_grace``, and closes idle
keep-alive connections. A send past the journal is shielded beyond that (api/common.py
``shield_from_here``), so its 200 is never cut off.

What the stop waits for is the requests in hand (``_InHand``), not the connections: once
none is left, whatever connections remain are ended. Waiting for hypercorn to close every
connection itself held a stop under HTTP keep-alive load for the whole grace, about one
time in four: when a client's next request arrives while the request before it is still
finishing (answered, the app not yet returned) and the stop comes in between, hypercorn's
HTTP/1.1 reader waits for a turn that never comes (tests/api/test_http_stop.py).
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

log = logging.getLogger("atmosrelay.http")

BACKLOG = 512


class BindError(Exception):
    def __init__(self, host: str, port: int, error: OSError) -> None:
        super().__init__(f"{host}:{port}: {error}")
        self.host, self.port, self.error = host, port, error


class _Config(HypercornConfig):
    def __init__(self, tls: ssl.SSLContext | None) -> None:
        super().__init__()
        self._tls = tls

    def create_ssl_context(self) -> ssl.SSLContext | None:
        return self._tls


def _socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.setblocking(False)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


class _InHand:
    """The app, counting the HTTP requests it has in hand."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.count = 0
        self._none = trio.Event()
        self._none.set()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.count += 1
        if self.count == 1:
            self._none = trio.Event()
        try:
            await self.app(scope, receive, send)
        finally:
            self.count -= 1
            if not self.count:
                self._none.set()

    async def wait_none(self) -> None:
        while self.count:
            await self._none.wait()


async def serve_http(
    app: Any,
    listeners: tuple[tuple[str, int, bool], ...],
    tls: ssl.SSLContext | None,
    *,
    grace: float,
    read_timeout: float,
    shutdown: Callable[[], Awaitable[None]],
    task_status: trio.TaskStatus[list[tuple[str, int, bool]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until ``shutdown`` returns and the requests in hand have finished
    (within ``grace``); ``task_status.started`` gets the (host, port, tls) actually
    listening."""
    in_hand = _InHand(app)
    asgi: Any = in_hand  # an ASGI app, as hypercorn's stricter type cannot tell
    config = _Config(tls)
    config.graceful_timeout = grace
    config.read_timeout = max(1, int(read_timeout))
    config.keep_alive_timeout = 5.0
    config.include_server_header = False
    config.accesslog = None
    config.errorlog = log
    secure: list[socket.socket] = []
    insecure: list[socket.socket] = []
    bound = []
    for host, port, use_tls in listeners:
        try:
            sock = _socket(host, port)
        except OSError as exc:
            for opened in [*secure, *insecure]:
                opened.close()
            raise BindError(host, port, exc) from None
        (secure if use_tls else insecure).append(sock)
        bound.append((host, sock.getsockname()[1], use_tls))
    if secure and tls is None:
        raise ValueError("an HTTP listener asks for TLS and no TLS context was given")

    async def started(
        *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await worker_serve(
            wrap_app(asgi, config.wsgi_max_body_size, "asgi"),
            config,
            sockets=Sockets(secure, insecure, []),
            shutdown_trigger=shutdown,
            task_status=task_status,
        )

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(started)
            task_status.started(bound)
            await shutdown()
            with trio.move_on_after(grace):
                await in_hand.wait_none()
            nursery.cancel_scope.cancel()
    finally:
        for sock in [*secure, *insecure]:
            sock.close()
