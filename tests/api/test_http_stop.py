"""The HTTP server's stop, in process, on real sockets: a request in hand when the stop
comes is answered in full, and the server ends right after it, whatever connections its
clients still hold open: an idle keep-alive one, one half way through its headers, and one
whose next request came in while the request before it was still finishing (hypercorn's
reader parks that one for good; the stop used to wait the whole grace for it)."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from atmosrelay.api.server import serve_http

GRACE = 30.0  # far longer than any step here takes: reaching it is the failure


class _App:
    """GET /slow waits for ``release`` to answer and for ``linger`` to return; anything
    else answers at once."""

    def __init__(self) -> None:
        self.entered = trio.Event()
        self.release = trio.Event()
        self.linger = trio.Event()
        self.order: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        if scope["path"] == "/slow":
            self.entered.set()
            await self.release.wait()
        body = scope["path"].encode()
        headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        self.order.append(f"answered {scope['path']}")
        if scope["path"] == "/slow":
            await self.linger.wait()


async def _response(stream: trio.SocketStream) -> bytes:
    """One whole response (the bodies here are short and sent in one piece)."""
    got = b""
    while b"\r\n\r\n" not in got or not got.endswith((b"/slow", b"/fast")):
        chunk = await stream.receive_some()
        assert chunk, f"the server closed before answering: {got!r}"
        got += chunk
    return got


async def test_the_stop_answers_the_request_in_hand_then_ends_at_once() -> None:
    app = _App()
    stop = trio.Event()
    with trio.fail_after(GRACE / 2):
        async with trio.open_nursery() as nursery:

            async def server(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
                await serve_http(
                    app,
                    (("127.0.0.1", 0, False),),
                    None,
                    grace=GRACE,
                    read_timeout=GRACE,
                    shutdown=stop.wait,
                    task_status=task_status,
                )
                app.order.append("stopped")

            bound = await nursery.start(server)
            port = bound[0][1]
            kept = await trio.open_tcp_stream("127.0.0.1", port)
            await kept.send_all(b"GET /fast HTTP/1.1\r\nHost: relay\r\n\r\n")
            assert (await _response(kept)).startswith(b"HTTP/1.1 200")
            half = await trio.open_tcp_stream("127.0.0.1", port)
            await half.send_all(b"GET /fast HTTP/1.1\r\nHost: rel")
            slow = await trio.open_tcp_stream("127.0.0.1", port)
            await slow.send_all(b"GET /slow HTTP/1.1\r\nHost: relay\r\n\r\n")
            await app.entered.wait()
            stop.set()
            await trio.testing.wait_all_tasks_blocked(0.05)  # the request in hand holds it
            assert app.order == ["answered /fast"]
            app.release.set()
            assert (await _response(slow)).startswith(b"HTTP/1.1 200")
            # the client's next request, while the one before is still finishing
            await slow.send_all(b"GET /fast HTTP/1.1\r\nHost: relay\r\n\r\n")
            await trio.testing.wait_all_tasks_blocked(0.05)  # the server has read it
            app.linger.set()
        # the nursery exits only once serve_http has returned, the two other clients still
        # connected
    assert app.order == ["answered /fast", "answered /slow", "stopped"]
    for stream in (kept, half, slow):
        await stream.aclose()
