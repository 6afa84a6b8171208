"""A real server object answered by a small policy, and a client/server pair wired together
in memory (no sockets, no mocks): the h11 way of testing a protocol core."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

from atmosrelay.smtp import (
    NEED_DATA,
    PAUSED,
    AuthCredentials,
    ClientConnection,
    ConnectionClosed,
    Event,
    MessageData,
    RemoteProtocolError,
    Reply,
    ServerConnection,
    ServerReply,
    TLSReady,
    permissive_reply,
)
from atmosrelay.smtp import replies as R

HOST = "mx.test"
PASSWORD = "secret"


def answer(conn: ServerConnection, event: Event) -> Reply | None:
    """What a permissive server says to each event (None: no reply owed)."""
    if isinstance(event, AuthCredentials):
        return R.AUTH_SUCCESS if event.password == PASSWORD else R.AUTH_FAILED
    return permissive_reply(conn, event, HOST)


def splits(data: bytes, how: str, rng: random.Random) -> list[bytes]:
    if how == "whole":
        return [data]
    if how == "bytes":
        return [data[i : i + 1] for i in range(len(data))]
    cuts = (
        sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 12))))
        if len(data) > 1
        else []
    )
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def drive_server(
    conn: ServerConnection,
    chunks: Iterable[bytes],
    respond: Callable[[ServerConnection, Event], Reply | None] = answer,
) -> tuple[list[object], bytes]:
    """Feed ``chunks`` then EOF; answer every event. Returns (events, bytes sent), where
    consecutive MessageData are merged (chunking must not matter) and a RemoteProtocolError
    ends the list as ("error", message)."""
    events: list[object] = []
    out = bytearray()
    feed = iter([*chunks, b""])
    while True:
        try:
            event = conn.next_event()
        except RemoteProtocolError as exc:
            events.append(("error", str(exc)))
            if exc.reply is not None:
                out += conn.send(exc.reply)
            return events, bytes(out)
        if event is NEED_DATA:
            conn.receive_data(next(feed))
            continue
        assert event is not PAUSED, "a reply was owed and not sent"
        if isinstance(event, MessageData) and events and isinstance(events[-1], MessageData):
            events[-1] = MessageData(events[-1].data + event.data)
        else:
            events.append(event)
        if isinstance(event, (ConnectionClosed, TLSReady)):
            return events, bytes(out)
        reply = respond(conn, event)
        if reply is not None:
            out += conn.send(reply)


def talk(
    client: ClientConnection,
    server: ServerConnection,
    to_server: bytes,
) -> list[ServerReply]:
    """Hand ``to_server`` to the server, answer it, hand the replies to the client and
    return the client's events."""
    if to_server:
        server.receive_data(to_server)
    out = bytearray()
    while True:
        event = server.next_event()
        if event is NEED_DATA or isinstance(event, (ConnectionClosed, TLSReady)):
            break
        reply = answer(server, event)
        if reply is not None:
            out += server.send(reply)
    client.receive_data(bytes(out))
    got = []
    while True:
        ev = client.next_event()
        if ev is NEED_DATA or isinstance(ev, (TLSReady, ConnectionClosed)):
            break
        assert isinstance(ev, ServerReply)
        got.append(ev)
    return got
