"""Listeners: accept connections, enforce connection limits, hand each to a Session.

Every session task is started in the caller's sessions nursery (so shutdown can give them a
grace deadline after the listeners are closed). Implicit-TLS listeners do the handshake before
the session starts; a client over the limits gets 421 4.7.0 and is closed.

An ``auto`` listener looks at a new connection's first byte without consuming it (MSG_PEEK)
for up to ``smtp.auto_tls_window``: 0x16 is a TLS handshake record (RFC 8446 5.1; every TLS
version's ClientHello starts so), and the connection is served as implicit TLS; anything else,
or nothing within the window (an SMTP client waits for the greeting), and it is served as a
STARTTLS listener's connection. A plain client's greeting comes ``auto_tls_window`` later.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import ipaddress
import logging
import socket
from collections.abc import Sequence

import attrs
import trio

from atmosrelay.inbound.session import InboundSession
from atmosrelay.sections import ListenerMode
from atmosrelay.server.context import SessionContext
from atmosrelay.server.session import TLS_HANDSHAKE_TIMEOUT, Session
from atmosrelay.smtp import replies as R
from atmosrelay.stream_io import start_tls, tls_failure

log = logging.getLogger("atmosrelay.smtp")

# accept() errors that mean "out of file descriptors or memory for now" (trio's own list in
# serve_listeners): wait a little and go on, rather than crash the listener.
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ACCEPT_BACKOFF = 0.1


@attrs.define
class ConnectionLimits:
    total: int
    per_ip: int
    active: int = 0
    by_ip: collections.Counter[str] = attrs.field(factory=collections.Counter)

    def admit(self, ip: str) -> bool:
        if self.active >= self.total or self.by_ip[ip] >= self.per_ip:
            return False
        self.active += 1
        self.by_ip[ip] += 1
        return True

    def leave(self, ip: str) -> None:
        self.active -= 1
        self.by_ip[ip] -= 1
        if not self.by_ip[ip]:
            del self.by_ip[ip]


def _peer(stream: trio.SocketStream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except OSError:
        return "?"


async def _wrap_tls(stream: trio.SocketStream, ctx: SessionContext) -> trio.abc.Stream | None:
    tls = start_tls(stream, ctx.tls_context, server_side=True)
    line = "tls-timeout"  # the words a session's line uses after STARTTLS
    with trio.move_on_after(TLS_HANDSHAKE_TIMEOUT):
        try:
            await tls.do_handshake()
            return tls
        except trio.BrokenResourceError as exc:
            line = f"tls-failed {tls_failure(exc)}"
    log.info("%s %s", _peer(stream), line)
    ctx.tls_failures += 1
    await trio.aclose_forcefully(stream)
    return None


TLS_HANDSHAKE_RECORD = b"\x16"


async def _sniff(stream: trio.SocketStream, window: float) -> ListenerMode:
    """IMPLICIT if the client's first byte, within ``window``, starts a TLS handshake."""
    with trio.move_on_after(window):
        with contextlib.suppress(OSError):
            first = await stream.socket.recv(1, socket.MSG_PEEK)
            if first == TLS_HANDSHAKE_RECORD:
                return ListenerMode.IMPLICIT
    return ListenerMode.STARTTLS


async def _refuse(
    stream: trio.SocketStream, mode: ListenerMode, ctx: SessionContext, reply: R.Reply
) -> None:
    if mode is ListenerMode.AUTO:
        mode = await _sniff(stream, ctx.auto_tls_window)
    target: trio.abc.Stream | None = stream
    if mode is ListenerMode.IMPLICIT:
        target = await _wrap_tls(stream, ctx)
    if target is None:
        return
    with trio.move_on_after(5):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await target.send_all(reply.to_bytes())
    await trio.aclose_forcefully(target)


async def _connection(
    stream: trio.SocketStream,
    peer: str,
    mode: ListenerMode,
    ctx: SessionContext,
    limits: ConnectionLimits,
) -> None:
    try:
        if mode is ListenerMode.AUTO:
            mode = await _sniff(stream, ctx.auto_tls_window)
        session_stream: trio.abc.Stream | None = stream
        if mode is ListenerMode.IMPLICIT:
            session_stream = await _wrap_tls(stream, ctx)
        if session_stream is not None and mode is ListenerMode.INBOUND:
            assert ctx.inbound is not None  # set by the runtime with the listeners
            await InboundSession(session_stream, peer, ctx, ctx.inbound).run()
        elif session_stream is not None:
            await Session(session_stream, peer, mode, ctx).run()
    finally:
        limits.leave(peer)


async def serve_listener(
    listener: trio.SocketListener,
    mode: ListenerMode,
    ctx: SessionContext,
    sessions: trio.Nursery,
    limits: ConnectionLimits,
    trusted_networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
) -> None:
    """Accept forever (until cancelled); each connection runs in ``sessions``."""
    trusted: dict[str, bool] = {}  # peer -> in ``trusted_networks``: parsed once a peer
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in _RESOURCE_ERRNOS:
                raise
            log.error("accept failed (%s); backing off", exc)
            await trio.sleep(_ACCEPT_BACKOFF)
            continue
        peer = _peer(stream)
        if mode is ListenerMode.TRUSTED and not _trusted(peer, trusted_networks, trusted):
            log.warning("%s refused: not in trusted_networks", peer)
            sessions.start_soon(_refuse, stream, mode, ctx, R.NO_SERVICE)
            continue
        if not limits.admit(peer):
            log.warning("%s refused: connection limit", peer)
            sessions.start_soon(_refuse, stream, mode, ctx, R.TOO_MANY_CONNECTIONS)
            continue
        sessions.start_soon(_connection, stream, peer, mode, ctx, limits)


def _trusted(
    peer: str,
    networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
    known: dict[str, bool],
) -> bool:
    """Whether ``peer`` is in ``networks``, remembered in ``known`` (a listener's, for its
    networks): parsing the address and testing it cost 2.5 us a connection, 1.7% of the
    event loop with one message a connection. Bounded: emptied when full."""
    verdict = known.get(peer)
    if verdict is None:
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        verdict = any(address in net for net in networks)
        if len(known) >= 4096:
            known.clear()
        known[peer] = verdict
    return verdict
