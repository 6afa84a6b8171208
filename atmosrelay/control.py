"""The operator's line to a running relay: a Unix socket at ``<data_dir>/control.sock``.

Commands that change the queue (``queue retry``, ``queue delete``) must go through the
process that owns the journal: a second writer would corrupt it. The relay listens on a
Unix socket (mode 0600: whoever may read the data directory may steer the relay); the CLI
sends one JSON line and reads one back:

    {"cmd": "retry", "id": "01J..."}            -> {"ok": true, "recipients": 2}
    {"cmd": "delete", "id": "01J...", "reason": "..."}  -> {"ok": true}
    anything wrong                               -> {"ok": false, "error": "what, in words"}

The CLI turns filters (queue retry --domain ...) into one request per id.

A delete is a DELETED record through the journal's group commit, answered after its fsync.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio

from atmosrelay.queue.records import PENDING

if TYPE_CHECKING:
    from atmosrelay.delivery.dispatcher import Dispatcher
    from atmosrelay.queue.store import QueueStore

log = logging.getLogger("atmosrelay")

MAX_REQUEST: Final = 4096
TIMEOUT: Final = 10.0

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlError(Exception):
    """No relay answers at the socket, or it refused the command."""


def socket_path(data_dir: Path) -> Path:
    return data_dir / "control.sock"


async def serve_control(
    path: Path, handler: Handler, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Listen at ``path`` (a stale socket file from a killed relay is replaced: the caller
    holds the data directory's lock, so no other relay is using it)."""
    await trio.Path(path).unlink(missing_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(16)
        listener = trio.SocketListener(sock)
    except BaseException:
        sock.close()
        raise
    task_status.started()
    try:
        await trio.serve_listeners(partial(_session, handler=handler), [listener])
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # a single unlink, no await: it runs even when cancelled


async def _session(stream: trio.SocketStream, *, handler: Handler) -> None:
    async with stream:
        with trio.move_on_after(TIMEOUT):
            data = b""
            while b"\n" not in data and len(data) < MAX_REQUEST:
                chunk = await stream.receive_some(MAX_REQUEST)
                if not chunk:
                    break
                data += chunk
            try:
                request = json.loads(data.split(b"\n", 1)[0])
                if not isinstance(request, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                reply: dict[str, Any] = {"ok": False, "error": f"bad request: {exc}"}
            else:
                reply = await handler(request)
            await stream.send_all(json.dumps(reply).encode() + b"\n")


def call(path: Path, request: dict[str, Any]) -> dict[str, Any]:
    """Send one command to the relay at ``path`` (blocking; for the CLI)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(
                f"no running relay answers at {path}; queue changes need the relay that owns "
                "the journal (start it with 'atmosrelay serve')"
            ) from None
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(MAX_REQUEST)
            if not chunk:
                break
            data += chunk
    try:
        reply: dict[str, Any] = json.loads(data)
    except ValueError:
        raise ControlError(
            f"the relay at {path} closed without an answer (is it stopping?); run this "
            "again once it runs"
        ) from None
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "refused")))
    return reply


def control_handler(queue: QueueStore, dispatcher: Dispatcher | None) -> Handler:
    """``queue retry`` and ``queue delete`` from the operator's CLI (see control.py)."""

    async def handle(request: dict[str, Any]) -> dict[str, Any]:
        cmd, queue_id = request.get("cmd"), request.get("id")
        messages = queue.state.messages
        if cmd == "retry":
            if queue_id not in messages:
                return {"ok": False, "error": f"no message {queue_id} in the queue"}
            ids = [queue_id]
            now = time.time()
            if dispatcher is not None:
                count = sum(dispatcher.schedule.retry_now(q, now) for q in ids)
                dispatcher.notify()
            else:  # nothing delivers: the count says what a delivering relay would retry
                count = sum(
                    sum(s in PENDING for s in messages[q].recipient_states.values()) for q in ids
                )
            return {"ok": True, "recipients": count, "delivering": dispatcher is not None}
        if cmd == "delete":
            reason = str(request.get("reason") or "deleted by the operator")
            try:
                await queue.delete(str(queue_id), reason, time.time())
            except KeyError:
                return {"ok": False, "error": f"no message {queue_id} in the queue"}
            log.info("%s deleted: %s", queue_id, reason)
            return {"ok": True}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    return handle
