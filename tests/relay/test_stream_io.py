"""A session's plain-TCP fast path (atmosrelay/stream_io.py) over real loopback
sockets: every byte arrives in order whether the kernel takes a write at once or not, a peer
that never reads is given up on, and the errors are trio's."""

from __future__ import annotations

import socket
import struct
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from atmosrelay.stream_io import StreamIO


async def pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listener:
        client = await trio.testing.open_stream_to_socket_listener(listener)
        server = await listener.accept()
    return server, client


async def test_small_writes_go_at_once_and_large_ones_arrive_whole() -> None:
    server, client = await pair()
    io = StreamIO(server)
    assert io.socket is not None  # plain TCP: the fast path
    big = bytes(range(256)) * 40_000  # 10 MB: more than the kernel takes at once
    received = bytearray()

    async def drain() -> None:
        while len(received) < 3 + len(big):
            received.extend(await client.receive_some(1 << 20))

    async with trio.open_nursery() as nursery:
        await io.write(b"220", 5)
        nursery.start_soon(drain)
        await io.write(big, 30)
    assert bytes(received) == b"220" + big
    await client.send_all(b"EHLO x\r\n")
    assert await io.read(100) == b"EHLO x\r\n"
    await client.aclose()
    assert await io.read(100) == b""  # the peer closed: EOF, as receive_some gives it
    await server.aclose()


async def test_a_peer_that_never_reads_is_given_up_on() -> None:
    server, client = await pair()
    io = StreamIO(server)
    with trio.fail_after(10), pytest.raises(trio.TooSlowError):
        await io.write(b"x" * (32 << 20), 0.2)  # 32 MB into buffers nobody empties
    await server.aclose()
    await client.aclose()


async def test_errors_are_trios() -> None:
    server, client = await pair()
    io = StreamIO(server)
    # the peer resets the connection (a close with SO_LINGER 0 sends RST)
    client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await client.aclose()
    with pytest.raises(trio.BrokenResourceError):
        await io.read(100)
    await server.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await io.write(b"250 ok\r\n", 1)
    with pytest.raises(trio.ClosedResourceError):
        await io.read(100)


async def close_under_a_reader(io: StreamIO, close: Callable[[], Awaitable[object]]) -> None:
    """``close()`` while another task waits in ``io.read``: that read ends, with
    ``trio.ClosedResourceError`` (within 10 s: a close that does not close fails here)."""

    async def reader() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await io.read(100)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            await close()


async def test_a_closed_stream_wakes_its_reader() -> None:
    server, client = await pair()
    # as a session's shutdown does, from another task
    await close_under_a_reader(StreamIO(server), server.aclose)
    await client.aclose()


async def test_tls_goes_through_the_stream() -> None:
    server, client = await pair()
    assert StreamIO(trio.StapledStream(server, server)).socket is None
    await server.aclose()
    await client.aclose()


async def test_aclose_closes_at_once_even_when_cancelled() -> None:
    """A session's last step, in its ``finally``: the peer sees the end, a task waiting to
    read is woken, and a cancelled caller (shutdown, a timeout) still closes."""
    server, client = await pair()
    io = StreamIO(server)

    async def cancelled_close() -> None:
        with trio.CancelScope() as scope:
            scope.cancel()
            await io.aclose()

    await close_under_a_reader(io, cancelled_close)
    assert server.socket.fileno() == -1
    assert await client.receive_some(100) == b""  # the peer reads the end
    await client.aclose()

    # a stream without a socket (a test's in-memory pair): closed through the stream, even
    # when cancelled
    left, right = trio.testing.memory_stream_pair()
    other = StreamIO(left)
    assert other.socket is None
    with trio.CancelScope() as scope:
        scope.cancel()
        await other.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await left.send_all(b"x")
    await right.aclose()


async def test_write_now_hands_over_what_the_kernel_takes_and_the_next_write_the_rest() -> None:
    """``write_now`` (the 250 written from the journal's callback) never waits: what the
    kernel does not take now goes first in the next write, in order."""
    server, client = await pair()
    io = StreamIO(server)
    big = bytes(range(256)) * 131_072  # 32 MB: more than the kernel takes at once
    assert io.write_now(big)
    assert io.unsent  # the peer has read nothing: the kernel's buffers are full
    assert io.write_now(b"later")  # queued behind what waits
    received = bytearray()

    async def drain() -> None:
        while len(received) < len(big) + 10:
            received.extend(await client.receive_some(1 << 20))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            await io.write(b"", 30)  # sends only what waited
            assert not io.unsent
            await io.write(b"after", 30)
    assert bytes(received) == big + b"later" + b"after"
    await client.aclose()
    await server.aclose()


async def test_write_now_on_a_stream_without_the_fast_paths_does_nothing() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    io = StreamIO(ours)
    assert not io.write_now(b"250 queued\r\n")
    assert not io.unsent
    await io.write(b"250 queued\r\n")
    assert await theirs.receive_some(100) == b"250 queued\r\n"


async def test_write_now_waits_its_turn_behind_a_write_under_way() -> None:
    server, client = await pair()
    io = StreamIO(server)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(io.write, b"x" * (32 << 20), 30)  # blocks: nobody reads
        await trio.testing.wait_all_tasks_blocked()
        assert not io.write_now(b"250 queued\r\n")  # never interleaved with it
        nursery.cancel_scope.cancel()
    await server.aclose()
    await client.aclose()
