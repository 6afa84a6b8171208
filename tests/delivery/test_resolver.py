"""MX resolution against a real DNS server started by the test."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import trio

from atmosrelay.accounts.identity import DnsSettings
from atmosrelay.delivery.resolver import Destination, DnsResolver, ResolutionFailed, order_mx
from tests.accounts.dns_server import DnsServer


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


def resolver(dns: DnsServer, **kw: object) -> DnsResolver:
    return DnsResolver(
        DnsSettings(nameservers=(dns.address,), timeout=0.5), rng=random.Random(1), **kw
    )  # type: ignore[arg-type]


def test_preference_order_and_ties_shuffled() -> None:
    records = [(20, "c"), (10, "a"), (10, "b"), (30, "d")]
    orders = {tuple(order_mx(records, random.Random(seed))) for seed in range(50)}
    assert orders == {("a", "b", "c", "d"), ("b", "a", "c", "d")}


async def test_mx_in_preference_order_with_addresses_from_the_same_resolver(
    dns: DnsServer,
) -> None:
    dns.mx("example.net", 20, "mx2.example.net.")
    dns.mx("example.net", 10, "mx1.example.net.")
    dns.mx("example.net", 30, "gone.example.net.")  # no address: skipped
    dns.a("mx1.example.net", "127.0.0.2")
    dns.aaaa("mx1.example.net", "::1")
    dns.a("mx2.example.net", "127.0.0.3")
    with trio.fail_after(10):
        dest = await resolver(dns).destination("example.net")
    assert dest == Destination((("mx1.example.net", 25), ("mx2.example.net", 25)))
    assert dest.key == "mx1.example.net:25,mx2.example.net:25"
    assert dest.addresses == {
        "mx1.example.net": ("127.0.0.2", "::1"),
        "mx2.example.net": ("127.0.0.3",),
        "gone.example.net": (),
    }


async def test_no_mx_host_with_an_address_defers(dns: DnsServer) -> None:
    dns.mx("lost.example", 10, "mx.lost.example.")
    with trio.fail_after(10), pytest.raises(ResolutionFailed) as info:
        await resolver(dns).destination("lost.example")
    assert info.value.status == "4.4.4" and not info.value.permanent


async def test_implicit_mx(dns: DnsServer) -> None:
    dns.a("plain.example", "192.0.2.10")
    with trio.fail_after(10):
        dest = await resolver(dns).destination("plain.example")
    assert dest == Destination((("plain.example", 25),), implicit=True)
    assert dest.addresses == {"plain.example": ("192.0.2.10",)}


@pytest.mark.parametrize(
    ("domain", "setup", "status", "message"),
    [
        ("nomail.example", lambda d: d.mx("nomail.example", 0, "."), "5.1.10", "null MX"),
        ("nowhere.example", lambda d: None, "5.1.2", "NXDOMAIN"),
        (
            "bare.example",
            lambda d: d.txt("bare.example", "v=spf1 -all"),
            "5.1.2",
            "no MX and no address",
        ),
        ("broken.example", lambda d: d.servfail("broken.example"), "4.4.3", "MX lookup"),
        ("slow.example", lambda d: d.silent("slow.example"), "4.4.3", "MX lookup"),
        (
            "mxslow.example",
            lambda d: (
                d.mx("mxslow.example", 10, "mx.mxslow.example."),
                d.silent("mx.mxslow.example"),
            ),
            "4.4.3",
            "address lookup for mx.mxslow.example",
        ),
    ],
)
async def test_failures_bounce_or_defer(
    dns: DnsServer, domain: str, setup: object, status: str, message: str
) -> None:
    setup(dns)  # type: ignore[operator]
    with trio.fail_after(10), pytest.raises(ResolutionFailed) as info:
        await resolver(dns).destination(domain)
    assert info.value.status == status
    assert info.value.permanent is status.startswith("5")
    assert message in str(info.value)


async def test_smarthost_overrides_dns(dns: DnsServer) -> None:
    dest = await resolver(dns, smarthost=("127.0.0.1", 2525)).destination("anything.example")
    assert dest == Destination((("127.0.0.1", 2525),))
    assert not dns.queries  # not even asked
