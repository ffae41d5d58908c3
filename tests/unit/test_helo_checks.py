"""tayori.policy.helo: HELO/EHLO syntax, and FCrDNS over a real DNS server on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from dns_fixtures import stub_and_resolver
from tayori.dns import DnsPythonResolver, Resolver
from tayori.policy.helo import (
    MAX_PTR_NAMES,
    FcrdnsResult,
    check_helo,
    fcrdns,
    fcrdns_reply,
    helo_reply,
)
from tayori.testing.dnsstub import StaticResolver, Zone

T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, 10.0))


# --- HELO syntax ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "mail.example.org",
    "MX1.Example.ORG",
    "a-b.c-d.example",
    "xn--bcher-kva.example",
    "[192.0.2.1]",
    "[IPv6:2001:db8::1]",
    "[ipv6:::1]",
    "x" * 63 + ".example",
])
def test_acceptable_names(name: str) -> None:
    assert check_helo(name) is None


@pytest.mark.parametrize(("name", "reason"), [
    ("", "a host name is required"),
    ("mail.example.org extra", "one host name is expected"),
    ("192.0.2.1", "an address must be written as a literal: [192.0.2.1]"),
    ("2001:db8::1", "an address must be written as a literal: [IPv6:2001:db8::1]"),
    ("localhost", "a fully-qualified host name is required"),
    ("mail_server.example.org", "underscores are not allowed in a host name"),
    ("mail.example.org.", "no trailing dot in a host name"),
    ("mail..example.org", "empty label in the host name"),
    ("-mail.example.org", "a label cannot begin or end with a hyphen"),
    ("mail-.example.org", "a label cannot begin or end with a hyphen"),
    ("mail!.example.org", "only letters, digits, hyphens and dots are allowed in a host name"),
    ("1.2.3", "the top-level label cannot be all digits"),
    ("192.0.2.256", "the top-level label cannot be all digits"),
    ("bücher.example", "the host name must be ASCII (A-labels)"),
    ("xn--zz.example", "invalid IDNA label in the host name"),
    ("x" * 64 + ".example", "a label of the host name is longer than 63 characters"),
    (".".join(["abcdefg"] * 40), "the host name is too long"),
    ("[192.0.2.300]", "malformed address literal"),
    ("[IPv6:2001:db8::zz]", "malformed address literal"),
    ("[192.0.2.1", "malformed address literal"),
    ("[x-tag:content]", "only IPv4 and IPv6 address literals are accepted"),
    ("[abc:def]", "only IPv4 and IPv6 address literals are accepted"),
])
def test_refused_names_say_why(name: str, reason: str) -> None:
    assert check_helo(name) == reason


def test_single_labels_and_literals_are_configurable() -> None:
    assert check_helo("localhost", allow_single_label=True) is None
    assert check_helo("[192.0.2.1]", allow_literal=False) == (
        "an address literal is not accepted here, a host name is")
    assert check_helo("1234", allow_single_label=True) is None  # a label, not a TLD


def test_our_own_names_are_refused_however_written() -> None:
    ours = ["mx.example.org", "[192.0.2.25]", "[IPv6:2001:db8::25]"]
    for claim in ("MX.Example.org", "[192.0.2.25]", "[ipv6:2001:DB8:0::25]"):
        assert check_helo(claim, forbidden=ours) == "that name is ours, not yours"
    assert check_helo("mx2.example.org", forbidden=ours) is None


def test_the_helo_reply() -> None:
    assert helo_reply("a fully-qualified host name is required").to_bytes() == (
        b"501 5.5.2 Helo command rejected: a fully-qualified host name is required\r\n")


# --- FCrDNS -------------------------------------------------------------------------------------

ZONE: Zone = {
    # 192.0.2.1: a good client
    "1.2.0.192.in-addr.arpa": {"PTR": ["mail.example.org"]},
    "mail.example.org": {"A": ["192.0.2.1"], "AAAA": ["2001:db8::1"]},
    # 2001:db8::1: a good IPv6 client, its AAAA written another way
    "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa": {
        "PTR": ["v6.example.org"]},
    "v6.example.org": {"AAAA": ["2001:0db8:0:0::1"]},
    # 192.0.2.2: PTR names something that points elsewhere
    "2.2.0.192.in-addr.arpa": {"PTR": ["liar.example.org"]},
    "liar.example.org": {"A": ["198.51.100.1"]},
    # 192.0.2.3: PTR SERVFAIL
    "3.2.0.192.in-addr.arpa": "SERVFAIL",
    # 192.0.2.4: one name's forward lookup fails, the other confirms
    "4.2.0.192.in-addr.arpa": {"PTR": ["broken.example.org", "good.example.org"]},
    "broken.example.org": "SERVFAIL",
    "good.example.org": {"A": ["192.0.2.4"]},
    # 192.0.2.5: the only name's forward lookup fails
    "5.2.0.192.in-addr.arpa": {"PTR": ["broken.example.org"]},
    # 192.0.2.6: PTR exists without records (NODATA)
    "6.2.0.192.in-addr.arpa": {"A": ["127.0.0.1"]},
    # 192.0.2.7: the PTR name does not exist
    "7.2.0.192.in-addr.arpa": {"PTR": ["gone.example.org"]},
}


stub, resolver = stub_and_resolver(ZONE)


def test_a_confirmed_ipv4_client_passes(resolver: DnsPythonResolver) -> None:
    result = run(fcrdns(resolver, "192.0.2.1"))
    assert result == FcrdnsResult("pass", ("mail.example.org",), ("mail.example.org",))
    assert fcrdns_reply(result) is None


def test_a_confirmed_ipv6_client_passes_whatever_the_spelling(
        resolver: DnsPythonResolver) -> None:
    result = run(fcrdns(resolver, "2001:db8::1"))
    assert result.status == "pass" and result.names == ("v6.example.org",)


def test_an_ipv4_mapped_client_is_checked_as_ipv4(resolver: DnsPythonResolver) -> None:
    assert run(fcrdns(resolver, "::ffff:192.0.2.1")).status == "pass"


def test_a_ptr_pointing_elsewhere_fails(resolver: DnsPythonResolver) -> None:
    result = run(fcrdns(resolver, "192.0.2.2"))
    assert result.status == "fail" and result.names == ()
    assert result.ptr_names == ("liar.example.org",)
    reply = fcrdns_reply(result)
    assert reply is not None and reply.code == 550 and reply.status == "5.7.25"


@pytest.mark.parametrize("ip", ["192.0.2.6", "192.0.2.7", "192.0.2.99"])
def test_no_usable_ptr_fails(resolver: DnsPythonResolver, ip: str) -> None:
    assert run(fcrdns(resolver, ip)).status == "fail"


def test_a_failing_ptr_lookup_is_a_temperror(resolver: DnsPythonResolver) -> None:
    result = run(fcrdns(resolver, "192.0.2.3"))
    assert result.status == "temperror" and result.note
    reply = fcrdns_reply(result)
    assert reply is not None and reply.code == 450 and reply.status == "4.7.25"


def test_one_confirmed_name_is_enough(resolver: DnsPythonResolver) -> None:
    result = run(fcrdns(resolver, "192.0.2.4"))
    assert result.status == "pass" and result.names == ("good.example.org",)


def test_a_failing_forward_lookup_without_a_match_is_a_temperror(
        resolver: DnsPythonResolver) -> None:
    assert run(fcrdns(resolver, "192.0.2.5")).status == "temperror"


def test_at_most_ten_ptr_names_are_followed() -> None:
    names = [f"n{i}.example.org" for i in range(15)]
    zone: Zone = {"1.2.0.192.in-addr.arpa": {"PTR": names},
                  "n14.example.org": {"A": ["192.0.2.1"]}}
    resolver = StaticResolver(zone)
    result = run(fcrdns(resolver, "192.0.2.1"))
    assert result.status == "fail" and len(result.ptr_names) == 15
    asked = [name for (name, rtype) in resolver.queries if rtype == "A"]
    assert len(asked) == MAX_PTR_NAMES


class _Picky(StaticResolver):
    """Refuses a malformed name as DnsPythonResolver does (ValueError)."""

    async def addresses(self, host: str, family: int) -> list[str]:
        if "_" in host:
            raise ValueError(f"not a DNS name: {host!r}")
        return await super().addresses(host, family)


def test_a_ptr_name_that_is_no_host_name_is_skipped() -> None:
    zone: Zone = {"1.2.0.192.in-addr.arpa": {"PTR": ["bad_name.example", "ok.example"]},
                  "ok.example": {"A": ["192.0.2.1"]}}
    resolver: Resolver = _Picky(zone)
    assert run(fcrdns(resolver, "192.0.2.1")).names == ("ok.example",)


def test_a_malformed_address_is_a_caller_error() -> None:
    with pytest.raises(ValueError):
        run(fcrdns(StaticResolver({}), "mail.example.org"))
