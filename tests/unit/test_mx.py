"""tayori.route.mx: MX hops from a StaticResolver zone, and once end to end over DnsStub."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from tayori.dns import DnsPythonResolver
from tayori.route.mx import MAX_ADDRESSES, MAX_MX_HOSTS, Hop, RouteError, mx_hops
from tayori.testing.dnsstub import DnsStub, StaticResolver, Zone

T = TypeVar("T")
TEST_TIMEOUT = 10.0

ZONE: Zone = {
    "example.test": {"MX": [(20, "mx2.example.test"), (10, "mx1.example.test"),
                            (30, "mx3.example.test")]},
    "mx1.example.test": {"A": ["192.0.2.1"], "AAAA": ["2001:db8::1"]},
    "mx2.example.test": {"A": ["192.0.2.2"], "AAAA": ["2001:db8::2"]},
    "mx3.example.test": {"A": ["192.0.2.3"]},
    "equal.test": {"MX": [(10, "a.equal.test"), (10, "b.equal.test"), (20, "c.equal.test")]},
    "a.equal.test": {"A": ["192.0.2.10"]},
    "b.equal.test": {"A": ["192.0.2.11"]},
    "c.equal.test": {"A": ["192.0.2.12"]},
    "implicit.test": {"A": ["192.0.2.20"], "AAAA": ["2001:db8::20"]},
    "nothing.test": {"TXT": ["v=spf1 -all"]},
    "null.test": {"MX": [(0, ".")]},
    "servfail.test": "SERVFAIL",
    "slow.test": "TIMEOUT",
    "dangling.test": {"MX": [(10, "gone.dangling.test"), (20, "mx.dangling.test")]},
    "mx.dangling.test": {"A": ["192.0.2.30"]},
    "allgone.test": {"MX": [(10, "gone.allgone.test"), (20, "empty.allgone.test")]},
    "empty.allgone.test": {"TXT": ["no address here"]},
    "flaky.test": {"MX": [(10, "down.flaky.test"), (20, "gone.flaky.test")]},
    "down.flaky.test": "SERVFAIL",
    "halfflaky.test": {"MX": [(10, "down.flaky.test"), (20, "mx.dangling.test")]},
    "shared.test": {"MX": [(10, "mx1.example.test"), (20, "alias.shared.test")]},
    "alias.shared.test": {"A": ["192.0.2.1", "192.0.2.40"]},
    "many.test": {"MX": [(i, f"h{i}.many.test") for i in range(15)]},
    **{f"h{i}.many.test": {"A": [f"192.0.2.{100 + i}", f"192.0.2.{200 + i}"]}
       for i in range(15)},
}


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, TEST_TIMEOUT))


def hops(domain: str, **options: Any) -> list[Hop]:
    return run(mx_hops(StaticResolver(ZONE), domain, **options))


def refused(domain: str, **options: Any) -> RouteError:
    with pytest.raises(RouteError) as caught:
        hops(domain, **options)
    return caught.value


def hosts(found: list[Hop]) -> list[str]:
    return list(dict.fromkeys(hop.host for hop in found))


# --- order ------------------------------------------------------------------------------------


def test_mx_by_preference_each_host_ipv4_first() -> None:
    assert hops("example.test") == [
        Hop("mx1.example.test", "192.0.2.1", 10), Hop("mx1.example.test", "2001:db8::1", 10),
        Hop("mx2.example.test", "192.0.2.2", 20), Hop("mx2.example.test", "2001:db8::2", 20),
        Hop("mx3.example.test", "192.0.2.3", 30),
    ]


def test_equal_preferences_are_shuffled_by_the_rng() -> None:
    orders = {tuple(hosts(hops("equal.test", rng=random.Random(seed)))) for seed in range(20)}
    assert orders == {("a.equal.test", "b.equal.test", "c.equal.test"),
                      ("b.equal.test", "a.equal.test", "c.equal.test")}


def test_same_seed_same_order() -> None:
    first = hops("equal.test", rng=random.Random(7))
    assert hops("equal.test", rng=random.Random(7)) == first


def test_prefer_ipv6_puts_aaaa_first_for_each_host() -> None:
    found = hops("example.test", prefer_ipv6=True)
    assert [hop.address for hop in found] == [
        "2001:db8::1", "192.0.2.1", "2001:db8::2", "192.0.2.2", "192.0.2.3"]


def test_families_can_be_disabled() -> None:
    assert [hop.address for hop in hops("example.test", ipv6=False)] == [
        "192.0.2.1", "192.0.2.2", "192.0.2.3"]
    assert [hop.address for hop in hops("example.test", ipv4=False)] == [
        "2001:db8::1", "2001:db8::2"]
    with pytest.raises(ValueError):
        hops("example.test", ipv4=False, ipv6=False)


def test_an_address_is_listed_once_at_its_best_place() -> None:
    assert hops("shared.test", ipv6=False) == [
        Hop("mx1.example.test", "192.0.2.1", 10), Hop("alias.shared.test", "192.0.2.40", 20)]


def test_hosts_and_addresses_are_capped() -> None:
    resolver = StaticResolver(ZONE)
    found = run(mx_hops(resolver, "many.test", ipv6=False))
    assert len(found) == MAX_ADDRESSES
    assert hosts(found) == [f"h{i}.many.test" for i in range(MAX_MX_HOSTS)]
    assert ("h10.many.test", "A") not in resolver.queries


def test_domain_spelling_is_normalised() -> None:
    assert hops("Example.TEST.") == hops("example.test")


# --- no MX, null MX, no domain ----------------------------------------------------------------


def test_no_mx_means_the_domain_is_its_own_mx() -> None:
    assert hops("implicit.test") == [Hop("implicit.test", "192.0.2.20", 0),
                                     Hop("implicit.test", "2001:db8::20", 0)]


def test_no_mx_and_no_address_is_permanent() -> None:
    reply = refused("nothing.test").reply
    assert (reply.code, reply.status) == (550, "5.1.2")
    assert "nothing.test" in reply.text


def test_null_mx_does_not_accept_mail() -> None:
    reply = refused("null.test").reply
    assert (reply.code, reply.status) == (556, "5.1.10")
    assert reply.text == "Domain null.test does not accept mail (null MX)"


def test_nxdomain_is_permanent() -> None:
    reply = refused("nowhere.test").reply
    assert (reply.code, reply.status) == (550, "5.1.2")
    assert reply.text == "Domain nowhere.test does not exist"


@pytest.mark.parametrize("domain", ["servfail.test", "slow.test"])
def test_dns_failure_on_the_mx_query_is_temporary(domain: str) -> None:
    reply = refused(domain).reply
    assert (reply.code, reply.status) == (451, "4.4.3")
    assert reply.text == f"Temporary DNS failure looking up the mail servers of {domain}"
    assert not reply.is_permanent


# --- MX hosts that do not resolve ---------------------------------------------------------------


def test_a_dangling_mx_host_is_skipped() -> None:
    assert hops("dangling.test") == [Hop("mx.dangling.test", "192.0.2.30", 20)]


def test_mx_hosts_without_any_address_is_permanent() -> None:
    reply = refused("allgone.test").reply
    assert (reply.code, reply.status) == (550, "5.4.4")
    assert "allgone.test" in reply.text


def test_mx_hosts_failing_for_now_make_it_temporary() -> None:
    reply = refused("flaky.test").reply
    assert (reply.code, reply.status) == (451, "4.4.3")


def test_a_host_failing_for_now_is_skipped_when_others_resolve() -> None:
    assert hops("halfflaky.test") == [Hop("mx.dangling.test", "192.0.2.30", 20)]


# --- loops ------------------------------------------------------------------------------------


@pytest.mark.parametrize("us", [
    {"own_names": frozenset({"MX1.example.test."})},
    {"own_addresses": frozenset({"192.0.2.1"})},
    {"own_addresses": frozenset({"2001:DB8:0::1"})},  # compared in canonical form
])
def test_self_as_primary_mx_is_a_loop(us: dict[str, frozenset[str]]) -> None:
    reply = refused("example.test", **us).reply
    assert (reply.code, reply.status) == (554, "5.4.6")
    assert reply.text == "Mail for example.test loops back to myself"


def test_self_as_backup_keeps_only_the_more_preferred() -> None:
    found = hops("example.test", own_names=frozenset({"mx2.example.test"}))
    assert hosts(found) == ["mx1.example.test"]


def test_self_as_implicit_mx_is_a_loop() -> None:
    reply = refused("implicit.test", own_addresses=frozenset({"192.0.2.20"})).reply
    assert reply.status == "5.4.6"


# --- address literals -------------------------------------------------------------------------


def test_ipv4_literal_is_one_hop_without_dns() -> None:
    resolver = StaticResolver(ZONE)
    assert run(mx_hops(resolver, "[192.0.2.9]")) == [Hop("[192.0.2.9]", "192.0.2.9", 0)]
    assert not resolver.queries


def test_ipv6_literal_is_normalised() -> None:
    assert hops("[IPv6:2001:DB8:0::9]") == [Hop("[IPv6:2001:db8::9]", "2001:db8::9", 0)]


def test_literal_of_ourselves_is_a_loop() -> None:
    reply = refused("[127.0.0.1]", own_addresses=frozenset({"127.0.0.1"})).reply
    assert (reply.code, reply.status) == (554, "5.4.6")


@pytest.mark.parametrize("literal", ["[tag:content]", "[300.1.2.3]", "[IPv6:nonsense]"])
def test_unroutable_literals_are_permanent(literal: str) -> None:
    reply = refused(literal).reply
    assert (reply.code, reply.status) == (550, "5.1.2")


def test_literal_of_a_disabled_family_is_refused() -> None:
    reply = refused("[IPv6:2001:db8::9]", ipv6=False).reply
    assert (reply.code, reply.status) == (550, "5.4.4")


# --- end to end -------------------------------------------------------------------------------


def test_over_a_real_dns_server() -> None:
    with DnsStub(ZONE) as stub:
        resolver = DnsPythonResolver([stub.address], timeout=2.0)
        assert run(mx_hops(resolver, "example.test")) == hops("example.test")
        with pytest.raises(RouteError) as caught:
            run(mx_hops(resolver, "servfail.test"))
        assert caught.value.reply.code == 451
