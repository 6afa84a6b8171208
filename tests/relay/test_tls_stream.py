"""The TLS stream of the sessions and the delivery client (atmosrelay/stream_io.py) over real
loopback sockets and real certificates, against trio's own ``SSLStream`` as the peer: the
handshake both ways, bytes whole and in order however the kernel takes them, every record
already received in one read, the ends a peer can choose (close_notify, a bare close, bytes
that are not TLS, a handshake it cannot finish), a peer that never reads, the rules on
concurrent use, a TLS 1.2 peer, and OpenSSL's own client asking for a TLS 1.3 key update."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme

from atmosrelay.stream_io import StreamIO, TLSStream, start_tls, tls_name
from tests.relay.test_stream_io import pair

CA = trustme.CA()


def server_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    CA.issue_cert("mx.example").configure_cert(ctx)
    return ctx


def client_context(trusting: trustme.CA = CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    trusting.configure_trust(ctx)
    return ctx


@asynccontextmanager
async def ours_serving() -> AsyncIterator[tuple[TLSStream, trio.SSLStream[trio.SocketStream]]]:
    """Our stream as the server, trio's as the client, both past the handshake."""
    server, client = await pair()
    ours = start_tls(server, server_context(), server_side=True)
    assert isinstance(ours, TLSStream)  # a socket: our stream, not trio's
    theirs = trio.SSLStream(client, client_context(), server_hostname="mx.example")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ours.do_handshake)
            nursery.start_soon(theirs.do_handshake)
    try:
        yield ours, theirs
    finally:
        await trio.aclose_forcefully(theirs)
        await ours.aclose()


async def test_both_ways_bytes_arrive_whole_and_in_order() -> None:
    async with ours_serving() as (ours, theirs):
        assert (tls_name(ours) or "").startswith("TLSv1.3 TLS_")
        io = StreamIO(ours)
        assert io.tls is ours
        big = bytes(range(256)) * 40_000  # 10 MB: more than the kernel takes at once
        received = bytearray()

        async def drain() -> None:
            while len(received) < 3 + len(big):
                received.extend(await theirs.receive_some(1 << 20))

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await io.write(b"220", 5)
                nursery.start_soon(drain)
                await io.write(big, 30)
        assert bytes(received) == b"220" + big

        sent = bytes(range(7, 251)) * 20_000  # ~4.9 MB the other way
        got = bytearray()

        async def send() -> None:
            await theirs.send_all(sent)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                while len(got) < len(sent):
                    got.extend(await io.read(65536))
        assert bytes(got) == sent


async def test_one_read_takes_every_record_already_received() -> None:
    """trio's stream gives one TLS record (at most 16 KiB) a call; ours decrypts what the
    socket holds, up to the size asked for, and keeps the rest for the next read."""
    async with ours_serving() as (ours, theirs):
        for i in range(5):  # five writes: five records, all in our socket's buffer after
            await theirs.send_all(bytes([65 + i]) * 10_000)
        first = await ours.read(65536)
        assert first == b"".join(bytes([65 + i]) * 10_000 for i in range(5))
        for i in range(3):
            await theirs.send_all(bytes([97 + i]) * 10_000)
        assert await ours.read(15_000) == b"a" * 10_000 + b"b" * 5_000
        # the rest was already decrypted or received: no wait for the peer
        with trio.fail_after(1):
            assert await ours.read(65536) == b"b" * 5_000 + b"c" * 10_000


async def test_the_peers_ends() -> None:
    # close_notify, then the socket: EOF, as SSLStream gives it
    async with ours_serving() as (ours, theirs):
        await theirs.aclose()
        assert await ours.read(100) == b""
    # the socket closed without close_notify: broken (a truncation attack looks the same)
    async with ours_serving() as (ours, theirs):
        await ours.write(b"hi")  # read with our session tickets: nothing left unread to
        assert await theirs.receive_some(10) == b"hi"  # make their close a reset
        await theirs.transport_stream.aclose()
        with pytest.raises(trio.BrokenResourceError) as info:
            await ours.read(100)
        assert isinstance(info.value.__cause__, ssl.SSLEOFError)
        with pytest.raises(trio.BrokenResourceError):  # broken for good
            await ours.write(b"x")
    # bytes that are not TLS records, mid-session: broken, with OpenSSL's reason
    async with ours_serving() as (ours, theirs):
        await theirs.transport_stream.send_all(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)
        with pytest.raises(trio.BrokenResourceError) as info:
            await ours.read(100)
        assert isinstance(info.value.__cause__, ssl.SSLError)
        assert "TLS failed: " in str(info.value)


async def test_our_close_sends_close_notify_and_wakes_our_reader() -> None:
    async with ours_serving() as (ours, theirs):
        io = StreamIO(ours)
        woken: list[type[BaseException]] = []

        async def reader() -> None:
            try:
                await io.read(100)
            except trio.ClosedResourceError as exc:
                woken.append(type(exc))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            with trio.CancelScope() as scope:  # a session's last step, even when cancelled
                scope.cancel()
                await io.aclose()
        assert woken == [trio.ClosedResourceError]
        assert ours.socket.fileno() == -1
        assert await theirs.receive_some(100) == b""  # close_notify: a clean EOF for them
        with pytest.raises(trio.ClosedResourceError):
            await ours.read(100)


async def test_handshakes_that_fail_break_the_stream_and_say_why() -> None:
    # a client that does not trust our certificate: the client side of ours says why
    server, client = await pair()
    ours = start_tls(client, client_context(trustme.CA()), server_hostname="mx.example")
    theirs = trio.SSLStream(server, server_context(), server_side=True)
    failures: list[BaseException] = []

    async def expect_broken(stream: TLSStream | trio.SSLStream[trio.SocketStream]) -> None:
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            failures.append(exc)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(expect_broken, ours)
            nursery.start_soon(expect_broken, theirs)
    assert isinstance(ours, TLSStream)
    ours_failure = [f for f in failures if isinstance(f.__cause__, ssl.SSLCertVerificationError)]
    assert len(ours_failure) == 1
    assert "CERTIFICATE_VERIFY_FAILED" in str(ours_failure[0])
    assert len(failures) == 2  # theirs learnt of it from our alert
    with pytest.raises(trio.BrokenResourceError):
        await ours.read(10)
    await ours.aclose()
    await theirs.aclose()

    # plain text where a handshake was due
    server, client = await pair()
    ours = start_tls(server, server_context(), server_side=True)
    await client.send_all(b"EHLO plain.example\r\n")
    with trio.fail_after(10), pytest.raises(trio.BrokenResourceError):
        await ours.do_handshake()
    await ours.aclose()
    await client.aclose()


async def test_a_peer_that_never_reads_is_given_up_on() -> None:
    async with ours_serving() as (ours, _theirs):
        with trio.fail_after(10), pytest.raises(trio.TooSlowError):
            await ours.write(b"x" * (32 << 20), 0.2)  # 32 MB into buffers nobody empties


async def test_one_reader_and_one_writer_at_a_time_and_handshake_first() -> None:
    server, client = await pair()
    early = start_tls(server, server_context(), server_side=True)
    assert isinstance(early, TLSStream)
    with pytest.raises(RuntimeError, match="do_handshake first"):
        await early.read(10)
    with pytest.raises(RuntimeError, match="do_handshake first"):
        await early.write(b"x")
    await early.aclose()
    await client.aclose()

    async with ours_serving() as (ours, theirs), trio.open_nursery() as nursery:
        nursery.start_soon(ours.read, 10)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await ours.read(10)
        await ours.write(b"a writer beside the reader is fine")
        assert await theirs.receive_some(100) == b"a writer beside the reader is fine"
        nursery.cancel_scope.cancel()


def test_other_streams_keep_trios_tls() -> None:
    """A test's in-memory stream has no socket: it is wrapped in trio's SSLStream."""
    left, _right = trio.testing.memory_stream_pair()
    wrapped = start_tls(left, server_context(), server_side=True)
    assert isinstance(wrapped, trio.SSLStream)
    assert tls_name(left) is None


async def test_a_tls_1_2_peer() -> None:
    server, client = await pair()
    ours = start_tls(server, server_context(), server_side=True)
    assert isinstance(ours, TLSStream)
    old = client_context()
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    theirs = trio.SSLStream(client, old, server_hostname="mx.example")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ours.do_handshake)
            nursery.start_soon(theirs.do_handshake)
        assert (tls_name(ours) or "").startswith("TLSv1.2 ")
        await theirs.send_all(b"EHLO old.example\r\n")
        assert await ours.read(100) == b"EHLO old.example\r\n"
        await ours.write(b"250 ok\r\n")
        assert await theirs.receive_some(100) == b"250 ok\r\n"
    await theirs.aclose()
    await ours.aclose()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl (.ci/run installs it)")
async def test_a_key_update_the_peer_asks_us_to_answer(tmp_path: Path) -> None:
    """OpenSSL's own client sends a TLS 1.3 KeyUpdate that asks for ours (its ``K``
    command); the talk goes on both ways after it."""
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    CA.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    command = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3"]
    command += ["-CAfile", str(tmp_path / "ca.pem"), "-servername", "mx.example"]
    command += ["-verify_return_error"]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            client = await nursery.start(
                partial(
                    trio.run_process,
                    command,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,  # where it says KEYUPDATE
                )
            )
            assert client.stdin is not None and client.stdout is not None
            ours = start_tls(await listener.accept(), server_context(), server_side=True)
            await listener.aclose()
            await ours.do_handshake()
            output = bytearray()

            async def until(text: bytes) -> None:
                while text not in output:
                    chunk = await client.stdout.receive_some(4096)  # type: ignore[union-attr]
                    assert chunk, f"s_client ended before {text!r}: {bytes(output)!r}"
                    output.extend(chunk)

            await ours.write(b"220 hello\n")
            await until(b"220 hello")
            await client.stdin.send_all(b"K\n")  # KEYUPDATE, update_requested
            await until(b"KEYUPDATE")
            await client.stdin.send_all(b"ping\n")
            assert await ours.read(100) == b"ping\n"  # their new keys, after the update
            await ours.write(b"pong\n")  # ours answer it first, then our new keys
            await until(b"pong")
            await client.stdin.aclose()  # s_client closes the connection at its EOF
            assert await ours.read(100) == b""  # its close_notify
            await ours.aclose()


async def test_write_now_hands_over_what_the_kernel_takes_and_the_next_write_the_rest() -> None:
    async with ours_serving() as (ours, theirs):
        io = StreamIO(ours)
        big = bytes(range(256)) * 131_072  # 32 MB: more than the kernel takes at once
        assert io.write_now(b"250 first\r\n")
        assert not io.unsent  # a reply: the kernel takes it whole
        assert io.write_now(big)
        assert io.unsent and ours.unsent > 0
        received = bytearray()

        async def drain() -> None:
            while len(received) < 11 + len(big) + 5:
                received.extend(await theirs.receive_some(1 << 20))

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain)
                await io.write(b"", 30)  # sends only the ciphertext that waited
                assert not io.unsent
                await io.write(b"after", 30)
        assert bytes(received) == b"250 first\r\n" + big + b"after"


async def test_write_now_waits_its_turn_behind_a_write_under_way() -> None:
    async with ours_serving() as (ours, _theirs), trio.open_nursery() as nursery:
        nursery.start_soon(partial(ours.write, b"x" * (32 << 20), 30))  # blocks: nobody reads
        await trio.testing.wait_all_tasks_blocked()
        assert not ours.write_now(b"250 queued\r\n")  # never interleaved with it
        nursery.cancel_scope.cancel()
