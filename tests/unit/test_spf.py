"""tayori.auth.spf (with spf_macro and spf_record): macros, records, limits, identities, reports.

DNS comes from StaticResolver zones (no sockets); the clock is injected, so ``%{t}`` is
fixed. pyspf serves as an oracle for a handful of records at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest
import spf as pyspf
from hypothesis import given, settings
from hypothesis import strategies as st

from tayori.auth.spf import (
    RECOMMENDED_REPLIES,
    SpfOptions,
    SpfResult,
    SpfVerdict,
    authentication_results_part,
    check,
    check_host,
    client_address,
    received_spf,
    recommended_reply,
    valid_domain,
)
from tayori.auth.spf_macro import (
    MAX_EXPANSION,
    MacroSyntaxError,
    MacroTooLong,
    MacroValues,
    domain_name,
    expand,
    parse_macro_string,
)
from tayori.auth.spf_record import (
    MultipleRecords,
    SpfSyntaxError,
    parse_record,
    select_record,
)
from tayori.dns import MxRecord
from tayori.testing.dnsstub import StaticResolver, Zone

T = TypeVar("T")
TEST_TIMEOUT = 10.0
NOW = 1_700_000_000.0
PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None)
OPTIONS = SpfOptions(clock=lambda: NOW)


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, TEST_TIMEOUT))


def verdict_for(zone: Zone, ip: str, domain: str = "example.test", *,
                sender: str | None = None, helo: str = "mx.client.test",
                options: SpfOptions = OPTIONS) -> SpfVerdict:
    return run(check_host(StaticResolver(zone), ip, domain, sender or f"user@{domain}",
                          helo=helo, receiver="mx.receiver.test", options=options))


def result_for(record: str, ip: str = "192.0.2.1", extra: Zone | None = None) -> SpfResult:
    return verdict_for({"example.test": {"TXT": [record]}, **(extra or {})}, ip).result


# --- macros (RFC 7208 §7) --------------------------------------------------------------------

RFC_VALUES = MacroValues(sender="strong-bad@email.example.com", local_part="strong-bad",
                         sender_domain="email.example.com", domain="email.example.com",
                         ip=ipaddress.ip_address("192.0.2.3"), helo="mx.example.org",
                         receiver="mx.receiver.test", timestamp=int(NOW))


@pytest.mark.parametrize(("macro", "expansion"), [  # the table of RFC 7208 §7.4
    ("%{s}", "strong-bad@email.example.com"),
    ("%{o}", "email.example.com"),
    ("%{d}", "email.example.com"),
    ("%{d4}", "email.example.com"),
    ("%{d3}", "email.example.com"),
    ("%{d2}", "example.com"),
    ("%{d1}", "com"),
    ("%{dr}", "com.example.email"),
    ("%{d2r}", "example.email"),
    ("%{l}", "strong-bad"),
    ("%{l-}", "strong.bad"),
    ("%{lr}", "strong-bad"),
    ("%{lr-}", "bad.strong"),
    ("%{l1r-}", "strong"),
    ("%{ir}.%{v}._spf.%{d2}", "3.2.0.192.in-addr._spf.example.com"),
    ("%{lr-}.lp._spf.%{d2}", "bad.strong.lp._spf.example.com"),
    ("%{lr-}.lp.%{ir}.%{v}._spf.%{d2}", "bad.strong.lp.3.2.0.192.in-addr._spf.example.com"),
    ("%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}", "3.2.0.192.in-addr.strong.lp._spf.example.com"),
    ("%{d2}.trusted-domains.example.net", "example.com.trusted-domains.example.net"),
])
def test_rfc_macro_examples(macro: str, expansion: str) -> None:
    assert expand(parse_macro_string(macro), RFC_VALUES) == expansion


def test_ipv6_macro_example_of_the_rfc() -> None:
    values = MacroValues(**{**_fields(RFC_VALUES), "ip": ipaddress.ip_address("2001:db8::cb01")})
    expanded = expand(parse_macro_string("%{ir}.%{v}._spf.%{d2}"), values)
    # RFC 7208 §7.4 writes the nibbles in lower case; we write them upper (see spf_macro)
    assert expanded.lower() == ("1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0."
                                "8.b.d.0.1.0.0.2.ip6._spf.example.com")


def _fields(values: MacroValues) -> dict[str, Any]:
    return {name: getattr(values, name) for name in MacroValues.__dataclass_fields__}


def test_explanation_letters_escapes_and_url_encoding() -> None:
    text = parse_macro_string("%{c} %{r} %{t} %{h} %{p} %% %_ %- %{L} %{S}", explanation=True)
    values = MacroValues(**{**_fields(RFC_VALUES), "local_part": "~jack&jill=up-a_b3.c"})
    assert expand(text, values) == ("192.0.2.3 mx.receiver.test 1700000000 mx.example.org "
                                    "unknown %   %20 ~jack%26jill%3Dup-a_b3.c "
                                    "strong-bad%40email.example.com")


def test_ipv6_client_letters() -> None:
    values = MacroValues(**{**_fields(RFC_VALUES), "ip": ipaddress.ip_address("2001:db8::cb01")})
    assert expand(parse_macro_string("%{c} %{v} %{C}", explanation=True), values) == \
        "2001:db8::cb01 ip6 2001%3Adb8%3A%3Acb01"


@pytest.mark.parametrize("text", [
    "%", "%a", "%{", "%{d", "%{x}", "%{}", "%{d0}", "%{d2x}", "%{dr!}", "%{c}", "%{r}",
    "%{t}", "foo bar", "tab\there", "caf\u00e9",
])
def test_macro_syntax_errors(text: str) -> None:
    with pytest.raises(MacroSyntaxError):
        parse_macro_string(text)


def test_explanation_text_admits_spaces_and_crt_but_not_controls() -> None:
    assert parse_macro_string("a b %{c}%{r}%{t}", explanation=True)
    with pytest.raises(MacroSyntaxError):
        parse_macro_string("line\r\nbreak", explanation=True)


def test_huge_digit_transformer_keeps_every_part() -> None:
    assert expand(parse_macro_string("%{d" + "9" * 5000 + "}"), RFC_VALUES) == \
        "email.example.com"


def test_expansion_is_capped() -> None:
    with pytest.raises(MacroTooLong):
        expand(parse_macro_string("%{s}" * (MAX_EXPANSION // 10)), RFC_VALUES)


@pytest.mark.parametrize(("expanded", "name"), [
    ("Example.COM.", "example.com"),
    ("a..b", None),
    ("x" * 64 + ".test", None),
    ("", None),
    (".", None),
    ("a" * 60 + "." + ".".join(["b" * 60] * 4) + ".test", ".".join(["b" * 60] * 4) + ".test"),
])
def test_domain_name_after_expansion(expanded: str, name: str | None) -> None:
    assert domain_name(expanded) == name
    assert name is None or len(name) <= 253


@PROPERTY
@given(st.text(max_size=60))
def test_macro_parser_raises_only_syntax_errors(text: str) -> None:
    for explanation in (False, True):
        try:
            macro = parse_macro_string(text, explanation=explanation)
        except MacroSyntaxError:
            continue
        expand(macro, RFC_VALUES)


@PROPERTY
@given(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e,
                                      blacklist_characters="%"), max_size=40))
def test_plain_text_expands_to_itself(text: str) -> None:
    assert expand(parse_macro_string(text), RFC_VALUES) == text


# --- records (RFC 7208 §4.5, §4.6, §5) -------------------------------------------------------


def test_record_selection() -> None:
    assert select_record([b"hello", b"v=spf1 -all", b"v=spf10 +all"]) == b"v=spf1 -all"
    assert select_record([b"v=spf1mx", b"spf2.0/pra"]) is None
    with pytest.raises(MultipleRecords):
        select_record([b"v=spf1 -all", b"V=SPF1 +all"])


def test_record_parse_terms_and_modifiers() -> None:
    record = parse_record(b"v=spf1  A:mail.example.test/24//64 ~MX ip4:192.0.2.0/24 "
                          b"ip6:2001:db8::/32 ?include:_spf.example.test ptr exists:%{i}.x.test "
                          b"unknown-mod=%{d} redirect=other.test exp=why.%{d} ")
    names = [(d.qualifier, d.mechanism) for d in record.directives]
    assert names == [("+", "a"), ("~", "mx"), ("+", "ip4"), ("+", "ip6"), ("?", "include"),
                     ("+", "ptr"), ("+", "exists")]
    a = record.directives[0]
    assert (a.cidr4, a.cidr6, a.text) == (24, 64, "A:mail.example.test/24//64")
    assert record.redirect is not None and record.explanation is not None
    assert record.directives[2].network == ipaddress.ip_network("192.0.2.0/24")


@pytest.mark.parametrize("record", [
    "v=spf1 -all moo", "v=spf1 a/33", "v=spf1 a//129", "v=spf1 a/24/64", "v=spf1 ip4:1.2.3.4/032",
    "v=spf1 ip4:01.2.3.4", "v=spf1 ip4:1.2.3", "v=spf1 ip4", "v=spf1 ip6:::1//64",
    "v=spf1 ip6:1:2:3", "v=spf1 include", "v=spf1 include:", "v=spf1 exists:x.test/24",
    "v=spf1 ptr/24", "v=spf1 all:x.test", "v=spf1 a:museum", "v=spf1 a:museum.",
    "v=spf1 a:abc.123", "v=spf1 a:example.-com", "v=spf1 redirect=a.test redirect=b.test",
    "v=spf1 exp=a.test exp=b.test", "v=spf1 exp=", "v=spf1 1up=x", "v=spf1 =all",
    "v=spf1 foo=%x", "v=spf1 a:x.test\x00", "v=spf1 a:x.test\rptr", "v=spf1 exists:%{r}.test",
    "v=spf1 redirect:x.test", "v=spf1 +", "v=spf1 a:%{d}.caf\u00e9.test",
])
def test_record_syntax_errors(record: str) -> None:
    with pytest.raises(SpfSyntaxError):
        parse_record(record.encode("utf-8"))


@pytest.mark.parametrize("record", [
    "v=spf1", "v=spf1 a:foo:bar/baz.example.com", "v=spf1 a:%{d}", "v=spf1 a:x.xn--zckzah",
    "v=spf1 ip6:::1.1.1.1/0", "v=spf1 moo.cow-far_out=man:dog/cat", "v=spf1 default=+",
    "v=spf1 a:%{H}.bar -all", "v=spf1 exists:x.test%%",
])
def test_record_syntax_accepted(record: str) -> None:
    parse_record(record.encode())


@PROPERTY
@given(st.binary(max_size=80))
def test_record_parser_raises_only_syntax_errors(data: bytes) -> None:
    with contextlib.suppress(SpfSyntaxError):
        parse_record(b"v=spf1 " + data)


# --- check_host: mechanisms ------------------------------------------------------------------

HOSTS: Zone = {
    "mail.example.test": {"A": ["192.0.2.10", "192.0.2.11"], "AAAA": ["2001:db8::10"]},
    "mx1.example.test": {"A": ["192.0.2.20"]},
    "mx2.example.test": {"AAAA": ["2001:db8::20"]},
    "example.test.mx": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
    "null.example.test": {"MX": [(0, ".")]},
    "10.2.0.192.in-addr.arpa": {"PTR": ["mail.example.test", "liar.other.test"]},
    "30.2.0.192.in-addr.arpa": {"PTR": ["liar.example.test"]},
    "liar.example.test": {"A": ["192.0.2.99"]},
    "exists.example.test": {"A": ["127.0.0.2"]},
    "ipv6only.example.test": {"AAAA": ["2001:db8::1"]},
    "pass.example.test": {"TXT": ["v=spf1 +all"]},
    "fail.example.test": {"TXT": ["v=spf1 -all"]},
    "softfail.example.test": {"TXT": ["v=spf1 ~all"]},
    "neutral.example.test": {"TXT": ["v=spf1 ?all"]},
    "broken.example.test": {"TXT": ["v=spf1 bogus"]},
    "nospf.example.test": {"TXT": ["just text"]},
    "slow.example.test": "TIMEOUT",
    "servfail.example.test": "SERVFAIL",
}


@pytest.mark.parametrize(("record", "ip", "result"), [
    ("v=spf1 ip4:192.0.2.0/24 -all", "192.0.2.7", SpfResult.PASS),
    ("v=spf1 ip4:192.0.2.0/24 -all", "198.51.100.7", SpfResult.FAIL),
    ("v=spf1 ip4:192.0.2.0/24 -all", "::ffff:192.0.2.7", SpfResult.PASS),
    ("v=spf1 ip6:2001:db8::/32 -all", "2001:db8::7", SpfResult.PASS),
    ("v=spf1 ip6:::ffff:192.0.2.7 -all", "192.0.2.7", SpfResult.FAIL),
    ("v=spf1 ip6:::/0 -all", "::ffff:192.0.2.7", SpfResult.FAIL),
    ("v=spf1 a:mail.example.test -all", "192.0.2.11", SpfResult.PASS),
    ("v=spf1 a:mail.example.test -all", "192.0.2.12", SpfResult.FAIL),
    ("v=spf1 a:mail.example.test/24 -all", "192.0.2.12", SpfResult.PASS),
    ("v=spf1 a:mail.example.test -all", "2001:db8::10", SpfResult.PASS),
    ("v=spf1 a:mail.example.test//64 -all", "2001:db8::ffff", SpfResult.PASS),
    ("v=spf1 mx:example.test.mx -all", "192.0.2.20", SpfResult.PASS),
    ("v=spf1 mx:example.test.mx -all", "2001:db8::20", SpfResult.PASS),
    ("v=spf1 mx:example.test.mx -all", "192.0.2.21", SpfResult.FAIL),
    ("v=spf1 mx:null.example.test ~all", "192.0.2.20", SpfResult.SOFTFAIL),
    ("v=spf1 ptr:example.test -all", "192.0.2.10", SpfResult.PASS),
    ("v=spf1 ptr:other.test -all", "192.0.2.10", SpfResult.FAIL),  # liar.other.test: no A
    ("v=spf1 ptr:example.test -all", "192.0.2.30", SpfResult.FAIL),  # not forward-confirmed
    ("v=spf1 exists:exists.example.test -all", "192.0.2.1", SpfResult.PASS),
    ("v=spf1 exists:ipv6only.example.test -all", "2001:db8::1", SpfResult.FAIL),
    ("v=spf1 include:pass.example.test -all", "192.0.2.1", SpfResult.PASS),
    ("v=spf1 include:fail.example.test ~all", "192.0.2.1", SpfResult.SOFTFAIL),
    ("v=spf1 -include:softfail.example.test ?all", "192.0.2.1", SpfResult.NEUTRAL),
    ("v=spf1 include:neutral.example.test -all", "192.0.2.1", SpfResult.FAIL),
    ("v=spf1 include:nospf.example.test +all", "192.0.2.1", SpfResult.PERMERROR),
    ("v=spf1 include:gone.example.test +all", "192.0.2.1", SpfResult.PERMERROR),
    ("v=spf1 include:broken.example.test +all", "192.0.2.1", SpfResult.PERMERROR),
    ("v=spf1 include:slow.example.test +all", "192.0.2.1", SpfResult.TEMPERROR),
    ("v=spf1 redirect=fail.example.test", "192.0.2.1", SpfResult.FAIL),
    ("v=spf1 ip4:192.0.2.1 redirect=fail.example.test", "192.0.2.1", SpfResult.PASS),
    ("v=spf1 redirect=gone.example.test", "192.0.2.1", SpfResult.PERMERROR),
    ("v=spf1 ?all redirect=gone.example.test", "192.0.2.1", SpfResult.NEUTRAL),
    ("v=spf1 a:servfail.example.test +all", "192.0.2.1", SpfResult.TEMPERROR),
    ("v=spf1 mx:servfail.example.test +all", "192.0.2.1", SpfResult.TEMPERROR),
    ("v=spf1 exists:slow.example.test +all", "192.0.2.1", SpfResult.TEMPERROR),
    ("v=spf1 ip4:192.0.2.2", "192.0.2.1", SpfResult.NEUTRAL),
    ("v=spf1 ALL", "192.0.2.1", SpfResult.PASS),
])
def test_mechanisms(record: str, ip: str, result: SpfResult) -> None:
    assert result_for(record, ip, HOSTS) is result


def test_ptr_dns_errors_only_mean_no_match() -> None:
    zone: Zone = {"example.test": {"TXT": ["v=spf1 ptr ?all"]},
                  "1.2.0.192.in-addr.arpa": "SERVFAIL"}
    assert verdict_for(zone, "192.0.2.1").result is SpfResult.NEUTRAL
    zone = {"example.test": {"TXT": ["v=spf1 ptr ?all"]},
            "1.2.0.192.in-addr.arpa": {"PTR": ["host.example.test"]},
            "host.example.test": "TIMEOUT"}
    assert verdict_for(zone, "192.0.2.1").result is SpfResult.NEUTRAL


def test_p_macro_prefers_the_domain_then_a_subdomain() -> None:
    zone: Zone = {
        "example.test": {"TXT": ["v=spf1 -all exp=why.example.test"]},
        "why.example.test": {"TXT": ["from %{p}"]},
        "1.2.0.192.in-addr.arpa": {"PTR": ["other.test", "mx.example.test", "bad.example.test"]},
        "other.test": {"A": ["192.0.2.1"]},
        "mx.example.test": {"A": ["192.0.2.1"]},
    }
    assert verdict_for(zone, "192.0.2.1").explanation == "from mx.example.test"
    assert verdict_for(zone, "192.0.2.2").explanation == "from unknown"


# --- check_host: initial processing, explanations --------------------------------------------


@pytest.mark.parametrize("domain", ["nolabels", "a..example.test", "x" * 64 + ".test",
                                    "[192.0.2.1]", "caf\u00e9.test", ""])
def test_malformed_domains_are_none_without_dns(domain: str) -> None:
    resolver = StaticResolver({})
    verdict = run(check_host(resolver, "192.0.2.1", domain, f"a@{domain}", helo="h.test"))
    assert verdict.result is SpfResult.NONE
    assert not resolver.queries


def test_no_record_and_no_domain_are_none() -> None:
    assert verdict_for({"example.test": {"TXT": ["other"]}}, "192.0.2.1").result \
        is SpfResult.NONE
    assert verdict_for({}, "192.0.2.1").result is SpfResult.NONE
    assert verdict_for({"example.test": "SERVFAIL"}, "192.0.2.1").result \
        is SpfResult.TEMPERROR


def test_explanations() -> None:
    zone: Zone = {"example.test": {"TXT": ["v=spf1 -all exp=why.example.test"]},
                  "why.example.test": {"TXT": [["%{i} is not one of ", "%{d}'s hosts"]]}}
    verdict = verdict_for(zone, "192.0.2.1")
    assert (verdict.result, verdict.mechanism) == (SpfResult.FAIL, "-all")
    assert verdict.explanation == "192.0.2.1 is not one of example.test's hosts"


@pytest.mark.parametrize("why", [
    {"TXT": ["one", "two"]}, {"TXT": ["%{x}"]}, {"TXT": ["caf\u00e9"]}, "SERVFAIL", {},
])
def test_broken_explanations_fall_back_to_the_default(why: Any) -> None:
    zone: Zone = {"example.test": {"TXT": ["v=spf1 -all exp=why.example.test"]},
                  "why.example.test": why}
    verdict = verdict_for(zone, "192.0.2.1", sender="joe@example.test")
    assert verdict.explanation == "example.test does not designate 192.0.2.1 as a permitted sender"


def test_explanation_only_for_fail_and_not_from_includes() -> None:
    zone: Zone = {"example.test": {"TXT": ["v=spf1 include:inner.test ~all exp=outer.test"]},
                  "inner.test": {"TXT": ["v=spf1 -all exp=inner-why.test"]},
                  "outer.test": {"TXT": ["outer"]}, "inner-why.test": {"TXT": ["inner"]}}
    resolver = StaticResolver(zone)
    verdict = run(check_host(resolver, "192.0.2.1", "example.test", "a@example.test",
                             helo="h.test", options=OPTIONS))
    assert (verdict.result, verdict.explanation) == (SpfResult.SOFTFAIL, None)
    assert ("inner-why.test", "TXT") not in resolver.queries
    assert ("outer.test", "TXT") not in resolver.queries


def test_sender_without_local_part_is_postmaster() -> None:
    zone: Zone = {"example.test": {"TXT": ["v=spf1 -all exp=why.example.test"]},
                  "why.example.test": {"TXT": ["%{s} %{l}"]}}
    verdict = verdict_for(zone, "192.0.2.1", sender="@example.test")
    assert verdict.sender == "postmaster@example.test"
    assert verdict.explanation == "postmaster@example.test postmaster"


def test_explanation_is_printable_and_bounded() -> None:
    zone: Zone = {"example.test": {"TXT": ["v=spf1 -all exp=why.example.test"]},
                  "why.example.test": {"TXT": ["%{l}" + "x" * 1000]}}
    verdict = verdict_for(zone, "192.0.2.1", sender="caf\u00e9\r\n@example.test")
    assert verdict.explanation is not None and verdict.explanation.startswith("caf???x")
    assert len(verdict.explanation) == 400


# --- limits (RFC 7208 §4.6.4) ----------------------------------------------------------------


def test_ten_dns_terms_pass_the_eleventh_is_permerror() -> None:
    zone: Zone = {"ten.test": {"TXT": ["v=spf1 " + "a " * 9 + "ip4:192.0.2.1 a -all"],
                               "A": ["198.51.100.1"]}}
    assert verdict_for({**zone, "example.test": {"TXT": ["v=spf1 include:ten.test -all"]}},
                       "192.0.2.1").result is SpfResult.PASS
    zone = {"example.test": {"TXT": ["v=spf1 " + "a " * 11 + "-all"], "A": ["198.51.100.1"]}}
    verdict = verdict_for(zone, "192.0.2.1")
    assert verdict.result is SpfResult.PERMERROR
    assert verdict.problem is not None and "10 DNS-querying terms" in verdict.problem


@pytest.mark.parametrize("record", ["v=spf1 include:example.test",
                                    "v=spf1 redirect=example.test",
                                    "v=spf1 include:%{d} -all"])
def test_loops_end_at_the_limit(record: str) -> None:
    resolver = StaticResolver({"example.test": {"TXT": [record]}})
    verdict = run(check_host(resolver, "192.0.2.1", "example.test", "a@example.test",
                             helo="h.test"))
    assert verdict.result is SpfResult.PERMERROR
    assert resolver.queries[("example.test", "TXT")] == 11


def test_two_void_lookups_allowed_the_third_is_permerror() -> None:
    assert result_for("v=spf1 a:gone1.test mx:gone2.test ?all") is SpfResult.NEUTRAL
    assert result_for("v=spf1 a:gone1.test mx:gone2.test exists:gone3.test ?all") \
        is SpfResult.PERMERROR
    zone: Zone = {"nodata.test": {"TXT": ["text"]}}
    assert result_for("v=spf1 a:nodata.test a:nodata.test a:nodata.test ?all",
                      extra=zone) is SpfResult.PERMERROR


def test_exp_lookup_is_not_a_void_lookup() -> None:
    assert result_for("v=spf1 a:gone1.test a:gone2.test exp=gone3.test -all") \
        is SpfResult.FAIL


def test_ten_mx_hosts_the_eleventh_is_permerror() -> None:
    hosts = {f"h{i}.test": {"A": [f"198.51.100.{i}"]} for i in range(12)}
    zone: Zone = {**hosts, "example.test": {
        "TXT": ["v=spf1 mx -all"], "MX": [(i, f"h{i}.test") for i in range(11)]}}
    assert verdict_for(zone, "198.51.100.9").result is SpfResult.PASS
    assert verdict_for(zone, "198.51.100.10").result is SpfResult.PERMERROR


def test_only_ten_ptr_names_are_considered() -> None:
    names = [f"h{i}.example.test" for i in range(11)]
    zone: Zone = {"example.test": {"TXT": ["v=spf1 ptr -all"]},
                  "1.2.0.192.in-addr.arpa": {"PTR": names},
                  **{name: {"A": ["192.0.2.1"]} for name in names[10:]}}
    resolver = StaticResolver(zone)
    verdict = run(check_host(resolver, "192.0.2.1", "example.test", "a@example.test",
                             helo="h.test"))
    assert verdict.result is SpfResult.FAIL
    assert ("h10.example.test", "A") not in resolver.queries


class HangingResolver(StaticResolver):
    """Answers TXT from the zone, and never answers anything else."""

    async def addresses(self, host: str, family: int) -> list[str]:
        await asyncio.Event().wait()
        return []


def test_time_budget_gives_temperror() -> None:
    resolver = HangingResolver({"example.test": {"TXT": ["v=spf1 a -all"]}})
    verdict = run(check_host(resolver, "192.0.2.1", "example.test", "a@example.test",
                             helo="h.test", options=SpfOptions(budget=0.01)))
    assert verdict.result is SpfResult.TEMPERROR
    assert verdict.problem is not None and "longer than" in verdict.problem


class BrokenResolver(StaticResolver):
    """A resolver with a bug: it raises something that is not a DNS error."""

    async def mx(self, domain: str) -> list[MxRecord]:
        raise RuntimeError("resolver bug")


def test_unexpected_resolver_exceptions_are_temperror() -> None:
    resolver = BrokenResolver({"example.test": {"TXT": ["v=spf1 mx -all"]}})
    verdict = run(check_host(resolver, "192.0.2.1", "example.test", "a@example.test",
                             helo="h.test"))
    assert verdict.result is SpfResult.TEMPERROR


TERMS = st.sampled_from([
    "a", "mx", "ptr", "a:%{d}", "mx:%{o}", "exists:%{i}.%{d}", "include:%{d}",
    "include:pass.example.test", "include:slow.example.test", "a:gone.test", "ip4:192.0.2.0/24",
    "ip6:2001:db8::/32", "-all", "~all", "redirect=%{d}", "exp=%{d}", "%{l}", "a:%{p}.test",
    "exists:%{l}%{l}%{l}%{l}.test", "a/0", "mx//0", "ptr:%{h}", "?include:broken.example.test",
])


@PROPERTY
@given(st.lists(TERMS, max_size=12), st.sampled_from(["192.0.2.10", "2001:db8::10",
                                                      "::ffff:192.0.2.30"]))
def test_hostile_records_always_give_a_verdict(terms: list[str], ip: str) -> None:
    zone: Zone = {**HOSTS, "example.test": {"TXT": ["v=spf1 " + " ".join(terms)],
                                            "MX": [(1, "mail.example.test")]}}
    resolver = StaticResolver(zone)
    verdict = run(check_host(resolver, ip, "example.test", "a@example.test", helo="h.test"))
    assert isinstance(verdict.result, SpfResult)
    assert sum(resolver.queries.values()) <= 200


# --- check(): the identities (RFC 7208 §2.3, §2.4) -------------------------------------------

IDENTITIES: Zone = {
    "helo-pass.test": {"TXT": ["v=spf1 +all"]},
    "helo-fail.test": {"TXT": ["v=spf1 -all"]},
    "helo-neutral.test": {"TXT": ["v=spf1 ?all"]},
    "sender.test": {"TXT": ["v=spf1 -all"]},
    "good.test": {"TXT": ["v=spf1 ip4:192.0.2.1 -all"]},
}


def checked(mail_from: str, helo: str, **options: Any) -> SpfVerdict:
    return run(check(StaticResolver(IDENTITIES), "192.0.2.1", mail_from, helo,
                     "mx.receiver.test", **options))


def test_null_sender_checks_the_helo_identity() -> None:
    verdict = checked("", "helo-fail.test")
    assert (verdict.identity, verdict.result) == ("helo", SpfResult.FAIL)
    assert (verdict.sender, verdict.domain) == ("postmaster@helo-fail.test", "helo-fail.test")
    assert checked("", "helo-fail.test", check_helo=False).identity == "helo"


def test_helo_fail_decides_otherwise_mail_from_does() -> None:
    assert checked("joe@good.test", "helo-fail.test").identity == "helo"
    for helo in ("helo-pass.test", "helo-neutral.test", "[192.0.2.1]", "localhost", "gone.test"):
        verdict = checked("joe@good.test", helo)
        assert (verdict.identity, verdict.result) == ("mailfrom", SpfResult.PASS), helo
    assert checked("joe@good.test", "helo-fail.test", check_helo=False).result is SpfResult.PASS
    assert checked("joe@sender.test", "helo-pass.test").result is SpfResult.FAIL


def test_idn_sender_domain_is_checked_as_a_label() -> None:
    zone: Zone = {"xn--caf-dma.test": {"TXT": ["v=spf1 +all"]}}
    verdict = run(check(StaticResolver(zone), "192.0.2.1", "joe@caf\u00e9.test", "h.test",
                        "r.test"))
    assert (verdict.result, verdict.domain) == (SpfResult.PASS, "xn--caf-dma.test")


def test_helpers() -> None:
    assert client_address("::ffff:192.0.2.1") == ipaddress.ip_address("192.0.2.1")
    assert client_address("2001:DB8::1") == ipaddress.ip_address("2001:db8::1")
    assert valid_domain("example.test.") and not valid_domain("example")
    with pytest.raises(ValueError):
        client_address("not an address")
    with pytest.raises(ValueError):
        SpfOptions(default_explanation="%{x}")


# --- reports ---------------------------------------------------------------------------------


def test_received_spf_field() -> None:
    verdict = SpfVerdict(SpfResult.PASS, "mailfrom", "example.com", "myname@example.com",
                         "192.0.2.1", "foo.example.com", mechanism="ip4:192.0.2.0/24")
    assert received_spf(verdict, "mybox.example.org") == (
        "pass (mybox.example.org: domain of myname@example.com designates 192.0.2.1 as "
        "permitted sender) client-ip=192.0.2.1; envelope-from=\"myname@example.com\"; "
        "helo=foo.example.com; receiver=mybox.example.org; identity=mailfrom; "
        "mechanism=\"ip4:192.0.2.0/24\";")


def test_received_spf_quotes_what_the_client_chose() -> None:
    verdict = SpfVerdict(SpfResult.PERMERROR, "helo", "x.test", 'post"master@x.test',
                         "2001:db8::1", "evil (helo)\r\n", problem="bad \\ record")
    field = received_spf(verdict, "r.test")
    assert "\r" not in field and "\n" not in field
    assert 'envelope-from="post\\"master@x.test"' in field
    assert 'client-ip="2001:db8::1"' in field
    assert 'helo="evil (helo)??"' in field
    assert 'problem="bad \\\\ record"' in field
    assert field.startswith("permerror (r.test: permanent error in processing domain of "
                            'post"master@x.test) ')


def test_authentication_results_part() -> None:
    mailfrom = SpfVerdict(SpfResult.FAIL, "mailfrom", "example.com", "a@example.com",
                          "192.0.2.1", "h.test")
    helo = SpfVerdict(SpfResult.NONE, "helo", "[192.0.2.1]", "postmaster@[192.0.2.1]",
                      "192.0.2.1", "[192.0.2.1]")
    assert authentication_results_part(mailfrom) == "spf=fail smtp.mailfrom=example.com"
    assert authentication_results_part(helo) == 'spf=none smtp.helo="[192.0.2.1]"'


def test_recommended_replies() -> None:
    assert {result: (reply.code, reply.status)
            for result, reply in RECOMMENDED_REPLIES.items()} == {
        SpfResult.FAIL: (550, "5.7.23"), SpfResult.TEMPERROR: (451, "4.7.24"),
        SpfResult.PERMERROR: (550, "5.7.24")}
    base = SpfVerdict(SpfResult.FAIL, "mailfrom", "x.test", "a@x.test", "192.0.2.1", "h.test",
                      explanation="x.test does not designate 192.0.2.1")
    reply = recommended_reply(base)
    assert reply is not None
    assert reply.to_bytes() == (b"550 5.7.23 SPF validation failed: x.test does not "
                                b"designate 192.0.2.1\r\n")
    softfail = SpfVerdict(SpfResult.SOFTFAIL, "mailfrom", "x.test", "a@x.test", "192.0.2.1",
                          "h.test")
    assert recommended_reply(softfail) is None


# --- pyspf as an oracle ----------------------------------------------------------------------

ORACLE_ZONE: dict[str, dict[str, list[Any]]] = {
    "example.test": {"TXT": ["v=spf1 include:a.example.test a:mail.example.test "
                             "mx:mx.example.test ip6:2001:db8:1::/48 ~all"]},
    "a.example.test": {"TXT": ["v=spf1 ip4:198.51.100.0/24 exists:%{ir}.bl.example.test "
                               "-all"]},
    "1.0.0.203.bl.example.test": {"A": ["127.0.0.2"]},
    "mail.example.test": {"A": ["192.0.2.10"], "AAAA": ["2001:db8::10"]},
    "mx.example.test": {"MX": [(10, "mx1.example.test")]},
    "mx1.example.test": {"A": ["192.0.2.20"]},
    "redirect.test": {"TXT": ["v=spf1 -ip4:192.0.2.10 redirect=example.test"]},
    "voids.test": {"TXT": ["v=spf1 a:n1.test a:n2.test a:n3.test +all"]},
}


def _oracle_lookup(name: str, qtype: str, *args: Any, **kwargs: Any) -> Iterator[Any]:
    for value in ORACLE_ZONE.get(name.lower().rstrip("."), {}).get(qtype, []):
        yield ((name, qtype), (value.encode(),) if qtype == "TXT" else value)


@pytest.mark.parametrize(("ip", "domain"), [
    ("198.51.100.9", "example.test"), ("203.0.0.1", "example.test"),
    ("192.0.2.10", "example.test"), ("2001:db8::10", "example.test"),
    ("192.0.2.20", "example.test"), ("2001:db8:1::5", "example.test"),
    ("192.0.2.99", "example.test"), ("192.0.2.10", "redirect.test"),
    ("192.0.2.20", "redirect.test"), ("192.0.2.1", "voids.test"),
])
def test_agrees_with_pyspf(monkeypatch: pytest.MonkeyPatch, ip: str, domain: str) -> None:
    monkeypatch.setattr(pyspf, "DNSLookup", _oracle_lookup)
    expected, _, _ = pyspf.query(i=ip, s=f"joe@{domain}", h="h.test").check()
    zone: Zone = {name: {rtype: values for rtype, values in records.items()}
                  for name, records in ORACLE_ZONE.items()}
    verdict = run(check_host(StaticResolver(zone), ip, domain, f"joe@{domain}", helo="h.test"))
    assert verdict.result.value == expected


# Every name a term below can reach exists with A and AAAA records and every client has a
# PTR name, so the one place where pyspf and tayori count differently does not arise:
# pyspf also counts empty address lookups of MX hosts and PTR lookups as void lookups,
# tayori counts only the query a term itself makes (see the spf module docstring).
DIFFERENTIAL_ZONE: dict[str, dict[str, list[Any]]] = {
    "mail.example.test": {"A": ["192.0.2.10"], "AAAA": ["2001:db8::10"]},
    "mx1.example.test": {"A": ["192.0.2.20"], "AAAA": ["2001:db8::21"]},
    "mx2.example.test": {"A": ["192.0.2.21"], "AAAA": ["2001:db8::20"]},
    "other.test": {"A": ["192.0.2.99"], "AAAA": ["2001:db8::99"]},
    "pass.example.test": {"TXT": ["v=spf1 +all"]},
    "fail.example.test": {"TXT": ["v=spf1 -all"]},
    "inc.example.test": {"TXT": ["v=spf1 a:mail.example.test mx:example.test -all"]},
    "ptr.example.test": {"TXT": ["v=spf1 ptr:example.test ?all"]},
    "10.2.0.192.bl.test": {"A": ["127.0.0.2"]},
    "joe.users.example.test": {"A": ["127.0.0.2"]},
    **{f"{name}.x.test": {"A": ["127.0.0.2"]}
       for name in ("example.test", "mail.example.test", "mx1.example.test", "unknown")},
    **{ipaddress.ip_address(ip).reverse_pointer: {"PTR": [name]} for ip, name in (
        ("192.0.2.10", "mail.example.test"), ("192.0.2.20", "mx1.example.test"),
        ("192.0.2.30", "other.test"), ("192.0.2.5", "other.test"),
        ("2001:db8::10", "mail.example.test"), ("2001:db8::20", "other.test"),
        ("198.51.100.1", "other.test"))},
}
DIFFERENTIAL_TERMS = st.sampled_from([
    "a", "mx", "ptr", "a:mail.example.test", "a:mail.example.test/24", "a//64", "mx/24",
    "mx:example.test//48", "ptr:example.test", "ptr:other.test", "exists:%{i}.bl.test",
    "exists:%{l}.users.%{d}", "include:pass.example.test", "include:fail.example.test",
    "include:inc.example.test", "include:ptr.example.test", "-include:pass.example.test",
    "ip4:192.0.2.0/28", "ip4:192.0.2.20", "ip6:2001:db8::/64", "a:gone.test", "mx:gone.test",
    "-all", "~all", "?all", "redirect=inc.example.test", "redirect=ptr.example.test",
    "exists:%{p}.x.test", "a:%{d}", "-a", "~mx", "?ptr",
])
DIFFERENTIAL_CLIENTS = st.sampled_from([
    "192.0.2.10", "192.0.2.20", "192.0.2.30", "192.0.2.5", "2001:db8::10", "2001:db8::20",
    "198.51.100.1", "::ffff:192.0.2.10",
])


@PROPERTY
@given(st.lists(DIFFERENTIAL_TERMS, max_size=8), DIFFERENTIAL_CLIENTS)
def test_random_records_agree_with_pyspf(terms: list[str], ip: str) -> None:
    record = "v=spf1 " + " ".join(terms)
    zone = {**DIFFERENTIAL_ZONE, "example.test": {
        "TXT": [record], "A": ["192.0.2.30"], "AAAA": ["2001:db8::30"],
        "MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]}}

    def lookup(name: str, qtype: str, *args: Any, **kwargs: Any) -> Iterator[Any]:
        for value in zone.get(name.lower().rstrip("."), {}).get(qtype, []):
            yield ((name, qtype), (value.encode(),) if qtype == "TXT" else value)

    saved = pyspf.DNSLookup
    pyspf.DNSLookup = lookup
    try:
        expected = pyspf.query(i=ip, s="joe@example.test", h="h.test").check()[0]
    finally:
        pyspf.DNSLookup = saved
    verdict = run(check_host(StaticResolver(zone), ip, "example.test", "joe@example.test",
                             helo="h.test"))
    assert verdict.result.value == expected, record
