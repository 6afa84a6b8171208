"""DIDs, handles, and handle resolution against a real DNS server started by the test."""

from __future__ import annotations

import re
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import trio
import trio.testing
import trustme

from atmosrelay.accounts.identity import (
    DnsSettings,
    HandleResolver,
    InvalidDID,
    InvalidHandle,
    ResolutionError,
    normalize_handle,
    username_candidates,
    validate_did,
)
from tests.accounts.dns_server import DnsServer

PLC = "did:plc:abcdefghijklmnopqrstuvwx"
PLC2 = "did:plc:zyxwvutsrqponmlkjihgfedc"


@pytest.mark.parametrize(
    "did",
    [PLC, "did:plc:234567abcdefghijklmnopqr", "did:web:example.com", "did:web:a.b.example.org"],
)
def test_valid_dids(did: str) -> None:
    assert validate_did(did) == did


@pytest.mark.parametrize(
    "did",
    [
        "",
        "did:plc:",
        "did:plc:abc",
        "did:plc:ABCDEFGHIJKLMNOPQRSTUVWX",  # upper case
        "did:plc:abcdefghijklmnopqrstuvw1",  # 1 is not base32
        "did:plc:abcdefghijklmnopqrstuvwxy",  # 25 characters
        "did:web:",
        "did:web:localhost",  # one label
        "did:web:example.com:8080",
        "did:web:example.com/path",
        "did:key:z6Mkabc",
        "did:example:123",
        "plc:abcdefghijklmnopqrstuvwx",
    ],
)
def test_invalid_dids(did: str) -> None:
    with pytest.raises(InvalidDID):
        validate_did(did)


@pytest.mark.parametrize(
    ("handle", "normal"),
    [
        ("alice.bsky.social", "alice.bsky.social"),
        ("Alice.Example.COM", "alice.example.com"),
        ("@alice.example.com", "alice.example.com"),
        ("a.co", "a.co"),
        ("xn--ls8h.test", "xn--ls8h.test"),
        ("a-b.c-d.net", "a-b.c-d.net"),
        ("1.example.org", "1.example.org"),
        ("x" * 63 + ".test", "x" * 63 + ".test"),
    ],
)
def test_valid_handles(handle: str, normal: str) -> None:
    assert normalize_handle(handle) == normal


@pytest.mark.parametrize(
    "handle",
    [
        "alice",
        "alice.",
        ".alice.com",
        "alice..com",
        "-alice.com",
        "alice-.com",
        "alice.com-",
        "alice.123",  # the TLD may not start with a digit
        "al ice.com",
        "alice_b.com",
        "x" * 64 + ".test",
        ("a." * 127) + "com",  # over 253 characters
        "alice.local",
        "alice.onion",
        "alice.localhost",
        "did:plc:abcdefghijklmnopqrstuvwx",
    ],
)
def test_invalid_handles(handle: str) -> None:
    with pytest.raises(InvalidHandle):
        normalize_handle(handle)


def test_username_may_be_a_did_or_a_handle() -> None:
    assert username_candidates(PLC) == (PLC,)
    assert username_candidates("Alice.Test") == ("alice.test",)
    assert username_candidates("not a handle") == ()


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


def resolver(dns: DnsServer, **kw: object) -> HandleResolver:
    return HandleResolver(DnsSettings(nameservers=(dns.address,), timeout=0.5), **kw)  # type: ignore[arg-type]


async def test_resolution_found(dns: DnsServer) -> None:
    dns.txt("_atproto.alice.test", f"did={PLC}")
    dns.txt("_atproto.alice.test", "something-else=1")  # other records are ignored
    with trio.fail_after(10):
        assert await resolver(dns).resolve("Alice.Test") == PLC


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: None, "_atproto.nobody.test does not exist (NXDOMAIN)"),
        (lambda d: d.a("_atproto.nobody.test", "127.0.0.1"), "exists but has no TXT record"),
        (lambda d: d.txt("_atproto.nobody.test", "hello"), "none starts with did="),
        (
            lambda d: (
                d.txt("_atproto.nobody.test", f"did={PLC}"),
                d.txt("_atproto.nobody.test", f"did={PLC2}"),
            ),
            "has 2 did= records",
        ),
        (lambda d: d.txt("_atproto.nobody.test", "did=did:key:z6Mk"), "only did:plc: and did:web:"),
        (
            lambda d: d.silent("_atproto.nobody.test"),
            "no answer for _atproto.nobody.test within 0.5 s",
        ),
    ],
)
async def test_resolution_failures_say_what_was_found(
    dns: DnsServer, setup: object, message: str
) -> None:
    setup(dns)  # type: ignore[operator]
    with (
        trio.fail_after(10),
        pytest.raises((ResolutionError, InvalidDID), match=re.escape(message)),
    ):
        await resolver(dns).resolve("nobody.test")


async def test_several_txt_strings_are_joined(dns: DnsServer) -> None:
    dns.txt("_atproto.split.test", ("did=did:plc:abcdefghij", "klmnopqrstuvwx"))
    with trio.fail_after(10):
        assert await resolver(dns).resolve("split.test") == PLC


async def test_cache_ttl_on_the_autojump_clock(
    dns: DnsServer, autojump_clock: trio.testing.MockClock
) -> None:
    dns.txt("_atproto.alice.test", f"did={PLC}")
    r = resolver(dns, cache_ttl=300.0)
    assert await r.resolve("alice.test") == PLC
    dns.clear("_atproto.alice.test")
    dns.txt("_atproto.alice.test", f"did={PLC2}")
    asked = len(dns.queries)
    await trio.sleep(299)
    assert await r.resolve("alice.test") == PLC  # still cached
    assert len(dns.queries) == asked
    await trio.sleep(2)
    assert await r.resolve("alice.test") == PLC2  # expired, asked again


async def test_https_well_known_fallback(dns: DnsServer) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("web.test").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.path == "/.well-known/atproto-did" and self.headers["Host"] == "web.test"
            self.send_response(200 if ok else 404)
            self.end_headers()
            self.wfile.write(f"{PLC}\n".encode() if ok else b"")

        def log_message(self, *args: object) -> None:
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    httpd.socket = server_ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        dns.a("web.test", "127.0.0.1")
        r = resolver(dns, https=True, https_port=httpd.server_address[1], https_context=client_ctx)
        with trio.fail_after(10):
            assert await r.resolve("web.test") == PLC
        without = resolver(dns, https=False)
        with trio.fail_after(10), pytest.raises(ResolutionError, match="NXDOMAIN"):
            await without.resolve("web.test")
    finally:
        httpd.shutdown()
        httpd.server_close()
