"""tayori.dns: DnsPythonResolver against a real DNS server on loopback (DnsStub)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from tayori.dns import (
    MAX_NEGATIVE_TTL,
    MAX_POSITIVE_TTL,
    DnsPythonResolver,
    DnsTemporaryError,
    MxRecord,
    NxDomain,
)
from tayori.testing.dnsstub import DnsStub, StaticResolver, Zone

T = TypeVar("T")
TEST_TIMEOUT = 10.0
TTL = 300
NEGATIVE_TTL = 60

ZONE: Zone = {
    "example.test": {
        "MX": [(10, "MX1.example.test."), (20, "mx2.example.test")],
        "TXT": ["v=spf1 -all", ("two ", "strings"), b"\xffraw"],
    },
    "mx1.example.test": {"A": ["127.0.0.2", "127.0.0.3"], "AAAA": ["2001:db8::2"]},
    "mx2.example.test": {"A": ["127.0.0.4"]},
    "null.test": {"MX": [(0, ".")]},
    "big.test": {"TXT": [f"record {i} " + "x" * 300 for i in range(8)]},
    "2.0.0.127.in-addr.arpa": {"PTR": ["mx1.example.test."]},
    "2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa": {
        "PTR": ["mx1.example.test"],
    },
    "servfail.test": "SERVFAIL",
    "refused.test": "REFUSED",
    "slow.test": "TIMEOUT",
}


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run one test's async part, bounded by a deadline."""
    return asyncio.run(asyncio.wait_for(coroutine, TEST_TIMEOUT))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def stub() -> Iterator[DnsStub]:
    with DnsStub(ZONE, ttl=TTL, negative_ttl=NEGATIVE_TTL) as server:
        yield server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def resolver(stub: DnsStub, clock: FakeClock) -> DnsPythonResolver:
    return DnsPythonResolver([stub.address], timeout=2.0, clock=clock)


# --- answers ----------------------------------------------------------------------------------


def test_mx_records_are_lower_case_without_the_final_dot(resolver: DnsPythonResolver) -> None:
    records = run(resolver.mx("example.test"))
    assert sorted(records, key=lambda r: r.preference) == [
        MxRecord(10, "mx1.example.test"), MxRecord(20, "mx2.example.test")]


def test_null_mx_host_is_empty(resolver: DnsPythonResolver) -> None:
    assert run(resolver.mx("null.test")) == [MxRecord(0, "")]


def test_a_and_aaaa(resolver: DnsPythonResolver) -> None:
    assert sorted(run(resolver.addresses("mx1.example.test", socket.AF_INET))) == [
        "127.0.0.2", "127.0.0.3"]
    assert run(resolver.addresses("mx1.example.test", socket.AF_INET6)) == ["2001:db8::2"]


def test_address_family_must_be_ip(resolver: DnsPythonResolver) -> None:
    with pytest.raises(ValueError, match="family"):
        run(resolver.addresses("mx1.example.test", socket.AF_UNIX))


def test_txt_joins_each_records_strings(resolver: DnsPythonResolver) -> None:
    assert sorted(run(resolver.txt("example.test"))) == [
        b"two strings", b"v=spf1 -all", b"\xffraw"]


def test_long_answer_is_truncated_over_udp_and_retried_over_tcp(
    resolver: DnsPythonResolver, stub: DnsStub
) -> None:
    records = run(resolver.txt("big.test"))
    assert sorted(records) == sorted(f"record {i} ".encode() + b"x" * 300 for i in range(8))
    assert stub.count("big.test", "TXT") == 2  # UDP (truncated), then TCP


def test_ptr_ipv4_and_ipv6(resolver: DnsPythonResolver) -> None:
    assert run(resolver.ptr("127.0.0.2")) == ["mx1.example.test"]
    assert run(resolver.ptr("2001:db8::2")) == ["mx1.example.test"]


def test_ptr_needs_an_ip_address(resolver: DnsPythonResolver) -> None:
    with pytest.raises(ValueError):
        run(resolver.ptr("mx1.example.test"))


def test_nxdomain(resolver: DnsPythonResolver) -> None:
    with pytest.raises(NxDomain, match=r"nowhere\.test"):
        run(resolver.mx("nowhere.test"))


def test_nodata_is_an_empty_list(resolver: DnsPythonResolver) -> None:
    assert run(resolver.mx("mx1.example.test")) == []
    assert run(resolver.addresses("mx2.example.test", socket.AF_INET6)) == []


@pytest.mark.parametrize("name", ["servfail.test", "refused.test"])
def test_servfail_and_refused_are_temporary(resolver: DnsPythonResolver, name: str) -> None:
    with pytest.raises(DnsTemporaryError, match=name):
        run(resolver.mx(name))


def test_timeout_is_temporary_and_bounded(stub: DnsStub) -> None:
    resolver = DnsPythonResolver([stub.address], timeout=0.3)
    started = time.monotonic()
    with pytest.raises(DnsTemporaryError, match="timed out"):
        run(resolver.mx("slow.test"))
    assert time.monotonic() - started < 0.3 + 1.0  # the timeout, plus generous slack


def test_unreachable_nameserver_is_temporary() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    resolver = DnsPythonResolver([("127.0.0.1", port)], timeout=0.2)
    with pytest.raises(DnsTemporaryError):
        run(resolver.mx("example.test"))


@pytest.mark.parametrize("name", ["", ".", "bücher.test", "a" * 64 + ".test"])
def test_malformed_names_are_the_callers_bug(resolver: DnsPythonResolver, name: str) -> None:
    with pytest.raises(ValueError):
        run(resolver.mx(name))


def test_system_resolver_configuration_is_read() -> None:
    DnsPythonResolver()  # /etc/resolv.conf, or 127.0.0.1 without one; sends nothing


# --- the cache --------------------------------------------------------------------------------


def test_positive_answers_are_cached_for_their_ttl(
    resolver: DnsPythonResolver, stub: DnsStub, clock: FakeClock
) -> None:
    run(resolver.mx("example.test"))
    clock.now += TTL - 1
    run(resolver.mx("Example.TEST."))  # same question, other spelling
    assert stub.count("example.test", "MX") == 1
    clock.now += 1
    assert len(run(resolver.mx("example.test"))) == 2
    assert stub.count("example.test", "MX") == 2


def test_types_are_cached_separately(resolver: DnsPythonResolver, stub: DnsStub) -> None:
    run(resolver.addresses("mx1.example.test", socket.AF_INET))
    run(resolver.addresses("mx1.example.test", socket.AF_INET6))
    assert stub.count("mx1.example.test", "A") == 1
    assert stub.count("mx1.example.test", "AAAA") == 1


def test_nxdomain_is_cached_for_the_soa_minimum(
    resolver: DnsPythonResolver, stub: DnsStub, clock: FakeClock
) -> None:
    for _ in range(2):
        with pytest.raises(NxDomain):
            run(resolver.mx("nowhere.test"))
    assert stub.count("nowhere.test", "MX") == 1
    clock.now += NEGATIVE_TTL
    with pytest.raises(NxDomain):
        run(resolver.mx("nowhere.test"))
    assert stub.count("nowhere.test", "MX") == 2


def test_nodata_is_cached_for_the_soa_minimum(
    resolver: DnsPythonResolver, stub: DnsStub, clock: FakeClock
) -> None:
    run(resolver.mx("mx1.example.test"))
    clock.now += NEGATIVE_TTL - 1
    assert run(resolver.mx("mx1.example.test")) == []
    assert stub.count("mx1.example.test", "MX") == 1
    clock.now += 1
    run(resolver.mx("mx1.example.test"))
    assert stub.count("mx1.example.test", "MX") == 2


def test_ttls_are_capped(clock: FakeClock) -> None:
    with DnsStub(ZONE, ttl=10 * MAX_POSITIVE_TTL, negative_ttl=10 * MAX_NEGATIVE_TTL) as stub:
        resolver = DnsPythonResolver([stub.address], timeout=2.0, clock=clock)
        run(resolver.mx("example.test"))
        with pytest.raises(NxDomain):
            run(resolver.mx("nowhere.test"))
        clock.now += MAX_NEGATIVE_TTL
        with pytest.raises(NxDomain):
            run(resolver.mx("nowhere.test"))
        run(resolver.mx("example.test"))
        clock.now += MAX_POSITIVE_TTL
        run(resolver.mx("example.test"))
        assert stub.count("nowhere.test", "MX") == 2
        assert stub.count("example.test", "MX") == 2


def test_zero_ttl_is_not_cached(clock: FakeClock) -> None:
    with DnsStub(ZONE, ttl=0) as stub:
        resolver = DnsPythonResolver([stub.address], timeout=2.0, clock=clock)
        run(resolver.mx("example.test"))
        run(resolver.mx("example.test"))
        assert stub.count("example.test", "MX") == 2
        assert resolver.cached == 0


def test_temporary_errors_are_not_cached(resolver: DnsPythonResolver, stub: DnsStub) -> None:
    for _ in range(2):
        with pytest.raises(DnsTemporaryError):
            run(resolver.mx("servfail.test"))
    assert stub.count("servfail.test", "MX") == 2


def test_cache_is_bounded_and_forgets_the_least_recently_used(stub: DnsStub) -> None:
    resolver = DnsPythonResolver([stub.address], timeout=2.0, cache_size=2)
    run(resolver.mx("example.test"))
    run(resolver.mx("null.test"))
    run(resolver.mx("example.test"))  # now the most recently used
    run(resolver.mx("mx1.example.test"))  # evicts null.test
    assert resolver.cached == 2
    run(resolver.mx("example.test"))
    run(resolver.mx("null.test"))
    assert stub.count("example.test", "MX") == 1
    assert stub.count("null.test", "MX") == 2


# --- lookups in flight ------------------------------------------------------------------------


def test_concurrent_identical_questions_share_one_lookup(stub: DnsStub) -> None:
    resolver = DnsPythonResolver([stub.address], timeout=2.0, cache_size=0)

    async def ten() -> list[list[MxRecord]]:
        return await asyncio.gather(*(resolver.mx("example.test") for _ in range(10)))

    answers = run(ten())
    assert all(answer == answers[0] for answer in answers)
    assert stub.count("example.test", "MX") == 1
    run(resolver.mx("example.test"))  # nothing cached, nothing in flight: asked again
    assert stub.count("example.test", "MX") == 2


def test_a_shared_failure_reaches_every_caller(stub: DnsStub) -> None:
    resolver = DnsPythonResolver([stub.address], timeout=2.0)

    async def three() -> list[BaseException | list[MxRecord]]:
        calls = (resolver.mx("servfail.test") for _ in range(3))
        return await asyncio.gather(*calls, return_exceptions=True)

    assert all(isinstance(result, DnsTemporaryError) for result in run(three()))
    assert stub.count("servfail.test", "MX") == 1


def test_a_cancelled_caller_does_not_cancel_the_others(stub: DnsStub) -> None:
    resolver = DnsPythonResolver([stub.address], timeout=2.0)

    async def main() -> list[MxRecord]:
        first = asyncio.create_task(resolver.mx("example.test"))
        second = asyncio.create_task(resolver.mx("example.test"))
        await asyncio.sleep(0)  # both are now waiting on the same lookup
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        return await second

    assert len(run(main())) == 2
    assert stub.count("example.test", "MX") == 1


# --- the fakes --------------------------------------------------------------------------------

QUESTIONS = [
    ("mx", "example.test"), ("mx", "null.test"), ("mx", "mx1.example.test"),
    ("mx", "nowhere.test"), ("mx", "servfail.test"), ("txt", "example.test"),
    ("ptr", "127.0.0.2"), ("a", "mx1.example.test"), ("aaaa", "mx2.example.test"),
]


async def ask(resolver: DnsPythonResolver | StaticResolver, kind: str, name: str) -> object:
    try:
        if kind in ("a", "aaaa"):
            family = socket.AF_INET if kind == "a" else socket.AF_INET6
            return sorted(await resolver.addresses(name, family))
        found: list[Any] = await getattr(resolver, kind)(name)
        return sorted(found, key=repr)
    except (NxDomain, DnsTemporaryError) as exc:
        return type(exc)


@pytest.mark.parametrize(("kind", "name"), QUESTIONS)
def test_static_resolver_answers_like_the_stub(
    resolver: DnsPythonResolver, kind: str, name: str
) -> None:
    static = StaticResolver(ZONE)
    assert run(ask(static, kind, name)) == run(ask(resolver, kind, name))
    assert sum(static.queries.values()) == 1


def test_static_resolver_timeout_is_temporary() -> None:
    with pytest.raises(DnsTemporaryError):
        run(StaticResolver(ZONE).mx("slow.test"))


@pytest.mark.parametrize("zone", [{"x.test": {"SRV": []}}, {"x.test": "BROKEN"}])
def test_stub_refuses_a_zone_it_cannot_serve(zone: Zone) -> None:
    with pytest.raises(ValueError, match=r"x\.test"):
        DnsStub(zone)


def test_stub_address_needs_a_running_stub() -> None:
    stub = DnsStub(ZONE)
    with pytest.raises(RuntimeError):
        _ = stub.address
    with stub:
        host, port = stub.address
        assert host == "127.0.0.1"
        assert port > 0


def test_stub_stop_releases_unanswered_queries() -> None:
    stub = DnsStub(ZONE).start()
    resolver = DnsPythonResolver([stub.address], timeout=0.2)
    with pytest.raises(DnsTemporaryError):
        run(resolver.mx("slow.test"))
    stub.stop()  # returns although a handler thread is holding the query
    assert stub.count("slow.test", "MX") >= 1
