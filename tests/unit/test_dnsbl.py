"""tayori.policy.dnsbl: blocklists and allowlists against a real DNS server on loopback."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from dns_fixtures import stub_and_resolver
from tayori.dns import DnsPythonResolver
from tayori.policy.dnsbl import DnsblVerdict, DnsblZone, check, query_name
from tayori.testing.dnsstub import DnsStub, StaticResolver, Zone

T = TypeVar("T")
TEST_TIMEOUT = 10.0

V6_LISTED = "2001:db8::1"
V6_NAME = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"

ZONE: Zone = {
    # bl.test: a blocklist with a TXT reason per listing
    "1.2.0.192.bl.test": {"A": ["127.0.0.2"],
                          "TXT": ["Listed, see https://bl.test/q?ip=192.0.2.1"]},
    "2.0.0.127.bl.test": {"A": ["127.0.0.2"]},                   # RFC 5782 §5 test entry
    f"{V6_NAME}.bl.test": {"A": ["127.0.0.2"], "TXT": ["IPv6 listed"]},
    "10.2.0.192.bl.test": {"A": ["127.0.0.10"]},
    "3.2.0.192.bl.test": {"A": ["127.255.255.254"]},               # "open resolver" error
    "4.2.0.192.bl.test": {"A": ["10.0.0.1"]},                      # outside 127/8
    "5.2.0.192.bl.test": {"A": ["127.0.0.2"], "TXT": ["ugly\r\nreason\x00 \xff" + "x" * 400]},
    "6.2.0.192.bl.test": {"A": ["127.0.0.2", "127.0.0.4"]},
    # pbl.test: a second blocklist
    "1.2.0.192.pbl.test": {"A": ["127.0.0.11"]},
    "6.2.0.192.pbl.test": {"A": ["127.0.0.11"], "TXT": ["pbl reason"]},
    # wl.test: an allowlist (DNSWL-style codes)
    "5.2.0.192.wl.test": {"A": ["127.0.10.3"]},
    "7.2.0.192.wl.test": {"A": ["127.0.0.255"]},                  # DNSWL "limit exceeded"
    # broken and silent lists
    "1.2.0.192.broken.test": "SERVFAIL",
    "5.2.0.192.broken.test": "SERVFAIL",
    "1.2.0.192.slow.test": "TIMEOUT",
}


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, TEST_TIMEOUT))


stub, resolver = stub_and_resolver(ZONE)


def ask(resolver: DnsPythonResolver, ip: str, zones: list[DnsblZone],
        threshold: int = 1, **options: Any) -> DnsblVerdict:
    return run(check(resolver, ip, zones, threshold, **options))


BL = DnsblZone("bl.test")


# --- query names -----------------------------------------------------------------------------


def test_query_names_reverse_octets_and_nibbles() -> None:
    assert query_name(ipaddress.ip_address("192.0.2.1"), "bl.test") == "1.2.0.192.bl.test"
    assert query_name(ipaddress.ip_address(V6_LISTED), "bl.test") == f"{V6_NAME}.bl.test"


def test_zone_names_are_normalised_and_checked() -> None:
    assert DnsblZone("BL.Test.").name == "bl.test"
    with pytest.raises(ValueError):
        DnsblZone("not a zone")
    with pytest.raises(ValueError):
        DnsblZone("bl.test", kind="maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        DnsblZone("bl.test", weight=-1)
    with pytest.raises(ValueError):
        DnsblZone("bl.test", match=("::1",))


# --- listings over real DNS ---------------------------------------------------------------------


def test_a_listed_client_is_blocked_with_the_list_and_its_txt_in_the_reply(
        resolver: DnsPythonResolver) -> None:
    verdict = ask(resolver, "192.0.2.1", [BL])
    assert verdict.blocked and verdict.score == 1
    assert verdict.listed_in == ("bl.test",)
    assert verdict.hits[0].answers == ("127.0.0.2",)
    reply = verdict.reply()
    assert reply is not None
    assert reply.to_bytes() == (b"554 5.7.1 Service unavailable; client [192.0.2.1] blocked "
                                b"using bl.test; Listed, see https://bl.test/q?ip=192.0.2.1\r\n")


def test_an_unlisted_client_passes(resolver: DnsPythonResolver) -> None:
    verdict = ask(resolver, "192.0.2.99", [BL])
    assert not verdict.blocked and verdict.score == 0 and verdict.hits == ()
    assert verdict.reply() is None and verdict.problems == ()


def test_rfc5782_test_entry_and_ipv6_nibbles(resolver: DnsPythonResolver) -> None:
    assert ask(resolver, "127.0.0.2", [BL]).blocked
    assert not ask(resolver, "127.0.0.1", [BL]).blocked
    verdict = ask(resolver, V6_LISTED, [BL])
    assert verdict.blocked and verdict.reason == "IPv6 listed"
    assert verdict.reply() is not None
    assert f"client [{V6_LISTED}] blocked using bl.test" in str(verdict.reply())


def test_an_ipv4_mapped_client_is_asked_as_ipv4(resolver: DnsPythonResolver) -> None:
    verdict = ask(resolver, "::ffff:192.0.2.1", [BL])
    assert verdict.blocked and verdict.client_ip == "192.0.2.1"
    assert ask(resolver, "::ffff:7f00:2", [BL]).blocked  # RFC 5782 §5's IPv6 test entry


def test_without_fetch_reason_no_txt_is_asked(stub: DnsStub,
                                             resolver: DnsPythonResolver) -> None:
    verdict = ask(resolver, "192.0.2.1", [BL], fetch_reason=False)
    assert verdict.blocked and verdict.reason is None
    assert stub.count("1.2.0.192.bl.test", "TXT") == 0
    reply = verdict.reply()
    assert reply is not None and reply.to_bytes().endswith(b"blocked using bl.test\r\n")


def test_a_hostile_txt_reason_is_cleaned_and_cut(resolver: DnsPythonResolver) -> None:
    verdict = ask(resolver, "192.0.2.5", [BL])
    assert verdict.reason is not None
    assert verdict.reason.startswith("ugly reason ")
    assert len(verdict.reason) == 200 and verdict.reason.endswith("...")
    assert verdict.reason.isascii() and verdict.reason.isprintable()
    assert verdict.reply() is not None


# --- weights, codes, allowlists ---------------------------------------------------------------


def test_weights_add_up_against_the_threshold(resolver: DnsPythonResolver) -> None:
    zones = [BL, DnsblZone("pbl.test")]
    one = ask(resolver, "192.0.2.10", zones, threshold=2)   # only bl.test
    assert one.score == 1 and not one.blocked and one.reply() is None
    both = ask(resolver, "192.0.2.6", zones, threshold=2)
    assert both.score == 2 and both.blocked
    assert set(both.listed_in) == {"bl.test", "pbl.test"}


def test_the_heaviest_list_comes_first_and_gives_the_reason(
        resolver: DnsPythonResolver) -> None:
    zones = [BL, DnsblZone("pbl.test", weight=5)]
    verdict = ask(resolver, "192.0.2.6", zones)
    assert verdict.listed_in == ("pbl.test", "bl.test") and verdict.score == 6
    assert verdict.reason == "pbl reason"


def test_entries_of_one_zone_weigh_return_codes_with_one_query(
        stub: DnsStub, resolver: DnsPythonResolver) -> None:
    zones = [DnsblZone("bl.test", weight=3, match=("127.0.0.2",)),
             DnsblZone("bl.test", weight=1, match=("127.0.0.10/31",))]
    assert ask(resolver, "192.0.2.1", zones, threshold=3).score == 3
    assert stub.count("1.2.0.192.bl.test", "A") == 1
    low = ask(resolver, "192.0.2.10", zones, threshold=3)
    assert low.score == 1 and not low.blocked
    assert low.listed_in == ("bl.test",)


def test_a_match_excludes_other_codes(resolver: DnsPythonResolver) -> None:
    verdict = ask(resolver, "192.0.2.10", [DnsblZone("bl.test", match=("127.0.0.2",))])
    assert not verdict.blocked and verdict.problems == ()


def test_several_answers_are_all_reported(resolver: DnsPythonResolver) -> None:
    verdict = ask(resolver, "192.0.2.6", [BL])
    assert sorted(verdict.hits[0].answers) == ["127.0.0.2", "127.0.0.4"]


def test_error_codes_are_ignored_and_logged(resolver: DnsPythonResolver) -> None:
    verdict = ask(resolver, "192.0.2.3", [BL])
    assert not verdict.blocked and verdict.hits == ()
    assert len(verdict.problems) == 1
    assert "127.255.255.254" in verdict.problems[0] and "error code" in verdict.problems[0]


def test_an_error_code_counts_when_a_match_names_it(resolver: DnsPythonResolver) -> None:
    verdict = ask(resolver, "192.0.2.3", [DnsblZone("bl.test", match=("127.255.255.254",))])
    assert verdict.blocked


def test_answers_outside_127_are_ignored_and_logged(resolver: DnsPythonResolver) -> None:
    verdict = ask(resolver, "192.0.2.4", [BL])
    assert not verdict.blocked
    assert verdict.problems == ("bl.test answered 10.0.0.1, outside 127.0.0.0/8: ignored",)


def test_an_allowlist_hit_exempts_from_the_blocklists(resolver: DnsPythonResolver) -> None:
    zones = [BL, DnsblZone("wl.test", kind="allow")]
    verdict = ask(resolver, "192.0.2.5", zones)
    assert verdict.exempt and not verdict.blocked and verdict.reply() is None
    assert verdict.allowed_by[0].zone == "wl.test"
    assert verdict.score == 1  # still reported, for the log
    assert verdict.reason is None


def test_an_allowlist_limit_code_does_not_exempt(resolver: DnsPythonResolver) -> None:
    verdict = ask(resolver, "192.0.2.7", [DnsblZone("wl.test", kind="allow")])
    assert not verdict.exempt
    assert "127.0.0.255" in verdict.problems[0]


# --- failing open --------------------------------------------------------------------------------


def test_a_failing_list_is_skipped_and_the_others_still_count(
        resolver: DnsPythonResolver) -> None:
    verdict = ask(resolver, "192.0.2.1", [DnsblZone("broken.test"), BL])
    assert verdict.blocked and verdict.listed_in == ("bl.test",)
    assert len(verdict.problems) == 1
    assert verdict.problems[0].startswith("broken.test skipped: ")


def test_a_failing_allowlist_exempts_nobody(resolver: DnsPythonResolver) -> None:
    verdict = ask(resolver, "192.0.2.5", [BL, DnsblZone("broken.test", kind="allow")])
    assert verdict.blocked and not verdict.exempt


def test_a_silent_list_is_skipped_at_the_time_limit(resolver: DnsPythonResolver) -> None:
    verdict = ask(resolver, "192.0.2.1", [DnsblZone("slow.test"), BL], time_limit=0.3)
    assert verdict.blocked and verdict.listed_in == ("bl.test",)
    assert verdict.problems == ("slow.test skipped: no answer for 1.2.0.192.slow.test "
                                "within the time limit",)


def test_no_zones_no_verdict(resolver: DnsPythonResolver) -> None:
    verdict = ask(resolver, "192.0.2.1", [])
    assert not verdict.blocked and verdict.problems == ()


def test_caller_errors_raise() -> None:
    resolver = StaticResolver({})
    with pytest.raises(ValueError):
        run(check(resolver, "not-an-ip", [BL]))
    with pytest.raises(ValueError):
        run(check(resolver, "192.0.2.1", [BL], threshold=0))
