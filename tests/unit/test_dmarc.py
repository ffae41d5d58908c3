"""DMARC: organizational domains, records, alignment, the author, discovery, the verdict."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tayori.auth import orgdomain
from tayori.auth.dmarc import (
    MAX_AUTHOR_DOMAINS,
    AlignMode,
    DmarcResult,
    DmarcVerdict,
    Policy,
    RecordError,
    RecordSource,
    ReportUri,
    aligned,
    author_domains,
    discover,
    evaluate,
    from_field_values,
    is_dmarc_record,
    parse_record,
    parse_uris,
    reply_for,
)
from tayori.testing.dnsstub import StaticResolver, Zone

T = TypeVar("T")
PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None)
R, S = AlignMode.RELAXED, AlignMode.STRICT


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, 10))


# --- organizational domains -----------------------------------------------------------------

@pytest.mark.parametrize(("domain", "org"), [
    ("mail.example.com", "example.com"),
    ("example.com", "example.com"),
    ("a.b.example.co.uk", "example.co.uk"),
    ("Mail.Example.COM.", "example.com"),
    ("example.gov", "example.gov"),
    ("gov", "gov"),
    ("co.uk", "co.uk"),
    ("a.b.unknowntld", "b.unknowntld"),              # the implicit "*" rule
    ("foo.blogspot.com", "foo.blogspot.com"),        # the private section counts
    ("x.y.kobe.jp", "x.y.kobe.jp"),                  # wildcard *.kobe.jp
    ("a.b.city.kobe.jp", "city.kobe.jp"),            # exception !city.kobe.jp
    ("www.xn--85x722f.xn--55qx5d.cn", "xn--85x722f.xn--55qx5d.cn"),  # IDN suffix
])
def test_organizational_domain(domain: str, org: str) -> None:
    assert orgdomain.organizational_domain(domain) == org


def test_public_suffix() -> None:
    assert orgdomain.public_suffix("example.gov") == "gov"
    assert orgdomain.public_suffix("a.example.co.uk") == "co.uk"
    assert orgdomain.is_public_suffix("co.uk")
    assert not orgdomain.is_public_suffix("example.co.uk")


@pytest.mark.parametrize("bad", ["", ".", "a..b", "..com"])
def test_organizational_domain_rejects_empty_labels(bad: str) -> None:
    with pytest.raises(ValueError, match="not a domain"):
        orgdomain.organizational_domain(bad)


def test_suffix_list_loads_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the public suffix list must never be downloaded")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    orgdomain._suffix_list.cache_clear()
    assert orgdomain.organizational_domain("www.example.co.uk") == "example.co.uk"


# --- alignment ------------------------------------------------------------------------------

# OpenDMARC libopendmarc/tests/test_alignment.c, restated: (domain, other, mode, aligned).
OPENDMARC_ALIGNMENT = [
    ("a.b.c.bcx.com", "bcx.com", R, True),
    ("a.b.c.edu.ar", "edr.au", S, False),
    ("oooo.com", "ooo.com", S, False),
    ("a.foo.com", "b.foo.com", R, True),
    (".mac.com.", "mac.com", S, True),
    ("....mac.com....", "mac.com", S, True),
    ("mac...com", "..com", S, False),
    ("a.b.com", "b.com", R, True),
    ("b.com", "a.b.com", R, True),
    ("a.b.de", "a.b.de", S, True),
]

# RFC 7489 §3.1.1 and §3.1.2 examples, and public-suffix edge cases.
MORE_ALIGNMENT = [
    ("example.com", "news.example.com", R, True),            # §3.1.1, DKIM d=
    ("example.com", "news.example.com", S, False),
    ("cbg.bounces.example.com", "example.com", R, True),     # §3.1.2, MAIL FROM
    ("cbg.bounces.example.com", "example.com", S, False),
    ("a.example.co.uk", "b.example.co.uk", R, True),
    ("example.co.uk", "other.co.uk", R, False),
    ("co.uk", "example.co.uk", R, False),
    ("foo.blogspot.com", "bar.blogspot.com", R, False),
    ("EXAMPLE.com", "example.COM", S, True),
    ("", "example.com", R, False),
    ("example.com", "example.net", R, False),
    ("xn--bcher-kva.example", "bücher.example", S, True),
]


@pytest.mark.parametrize(("domain", "other", "mode", "expected"), OPENDMARC_ALIGNMENT,
                         ids=[f"opendmarc-{i}" for i in range(1, len(OPENDMARC_ALIGNMENT) + 1)])
def test_opendmarc_alignment(domain: str, other: str, mode: AlignMode, expected: bool) -> None:
    assert aligned(domain, other, mode) is expected


@pytest.mark.parametrize(("domain", "other", "mode", "expected"), MORE_ALIGNMENT)
def test_alignment(domain: str, other: str, mode: AlignMode, expected: bool) -> None:
    assert aligned(domain, other, mode) is expected


def test_opendmarc_alignment_table_is_complete() -> None:
    assert len(OPENDMARC_ALIGNMENT) == 10


# --- records --------------------------------------------------------------------------------

# OpenDMARC libopendmarc/tests/test_dmarc_parse.c inputs, with the outcome RFC 7489 gives
# (OpenDMARC is stricter: it refuses invalid optional values that §6.3 says to default).
# An outcome is a Policy (the record's p=) or the DmarcResult of a RecordError.
OPENDMARC_PARSE = [
    ("v=DMARC1; p=none; rf=afrf; rua=mailto:dmarc-a@abuse.net; ruf=mailto:dmarc-f@abuse.net",
     Policy.NONE),
    ("v=DMARC1; p=none;", Policy.NONE),
    ("v=DMARC1; p=reject;", Policy.REJECT),
    ("v=DMARC1; p=quarantine;", Policy.QUARANTINE),
    ("v=DMARC1; p=n;", DmarcResult.NONE),               # not a policy; no rua= to save it
    ("", DmarcResult.NONE),
    ("V=BOB", DmarcResult.NONE),
    ("v=DMARC1; p=bob;", DmarcResult.NONE),
    ("v=DMARC1; p=none; sp=bob;", DmarcResult.NONE),
    ("v=DMARC1; p=none; adkim=bob;", Policy.NONE),
    ("v=DMARC1; p=none; aspf=bob;", Policy.NONE),
    ("v=DMARC1; p=none; rf=bob;", Policy.NONE),
    ("v=DMARC1; p=none; ri=bob;", Policy.NONE),
    ("v=DMARC1; p=none; pct=500;", Policy.NONE),
    ("v=DMARC1; pct=100;", DmarcResult.NONE),
    ("v=DMARC1; p=none; rua=ftp://abuse.com", Policy.NONE),
    ("v=DMARC1; p=none; ruf=mailto://abuse.com", Policy.NONE),
    ("v=DMARC1; p=none; ruf=mailto://abuse.com; foo=bar; buzz=happy;", Policy.NONE),
    ("v=DMARC1; p=none; rf=000000000000000000000000000000000", Policy.NONE),
    # tayori's own
    ("v=DMARC1; p=none; reject", DmarcResult.PERMERROR),          # not a tag-list
    ("v=DMARC1; p=none; p=reject", DmarcResult.PERMERROR),        # a tag twice
    ("v=dmarc1; p=reject", DmarcResult.NONE),                     # DMARC1 is case-sensitive
    ("v=spf1 -all", DmarcResult.NONE),
    ("v = DMARC1 ; P = Reject ;", Policy.REJECT),
    ("v=DMARC1;p=quarantine", Policy.QUARANTINE),
    ("v=DMARC1; p=bogus; rua=mailto:a@example.com", Policy.NONE),  # §6.6.3: as p=none
    ("v=DMARC1; p=reject; sp=bogus; rua=mailto:a@example.com", Policy.NONE),
    ("v=DMARC1; p=bogus; rua=bogus", DmarcResult.NONE),
]


@pytest.mark.parametrize(("text", "outcome"), OPENDMARC_PARSE)
def test_parse_record(text: str, outcome: Policy | DmarcResult) -> None:
    if isinstance(outcome, Policy):
        assert parse_record(text).p is outcome
    else:
        with pytest.raises(RecordError) as caught:
            parse_record(text)
        assert caught.value.result is outcome


def test_parse_record_defaults_and_values() -> None:
    record = parse_record(b"v=DMARC1; p=reject")
    assert (record.sp, record.np, record.pct, record.adkim, record.aspf) == (
        None, None, 100, R, R)
    assert (record.fo, record.rf, record.ri, record.psd, record.p_assumed) == (
        "0", "afrf", 86400, "u", False)
    record = parse_record("v=DMARC1; p=none; sp=quarantine; np=reject; pct=0; adkim=s; "
                          "aspf=S; fo=1:d; ri=3600; psd=y; "
                          "rua=mailto:a@example.com!10m, mailto:b@example.net!500")
    assert (record.sp, record.np, record.pct) == (Policy.QUARANTINE, Policy.REJECT, 0)
    assert (record.adkim, record.aspf, record.fo, record.ri, record.psd) == (
        S, S, "1:d", 3600, "y")
    assert record.rua == (ReportUri("mailto:a@example.com", 10 << 20),
                          ReportUri("mailto:b@example.net", 500))
    assumed = parse_record("v=DMARC1; p=bogus; sp=reject; rua=mailto:a@example.com")
    assert assumed.p_assumed and assumed.sp is None and assumed.p is Policy.NONE


def test_policy_for() -> None:
    record = parse_record("v=DMARC1; p=reject; sp=quarantine; np=none")
    assert record.policy_for(subdomain=False) is Policy.REJECT
    assert record.policy_for(subdomain=True) is Policy.QUARANTINE
    assert record.policy_for(subdomain=True, exists=False) is Policy.NONE
    plain = parse_record("v=DMARC1; p=reject")
    assert plain.policy_for(subdomain=True, exists=False) is Policy.REJECT


def test_parse_uris() -> None:
    assert parse_uris("mailto:a@example.com!1k,bogus, mailto:b%40x@example.org!2G") == (
        ReportUri("mailto:a@example.com", 1024), ReportUri("mailto:b%40x@example.org", 2 << 30))
    uri = ReportUri("mailto:Reports@Example.COM?subject=x")
    assert (uri.mailbox, uri.host) == ("Reports@Example.COM", "example.com")
    assert ReportUri("https://example.com/r").host is None
    assert ReportUri("mailto://abuse.com").mailbox is None


def test_is_dmarc_record() -> None:
    assert is_dmarc_record(b"v=DMARC1; p=none")
    assert is_dmarc_record("v=DMARC1")
    assert not is_dmarc_record("v=DMARC10; p=none")
    assert not is_dmarc_record("p=none; v=DMARC1")


@PROPERTY
@given(st.text(max_size=200))
def test_parse_record_fails_only_with_record_error(text: str) -> None:
    try:
        record = parse_record("v=DMARC1; " + text)
    except RecordError as exc:
        assert exc.result in (DmarcResult.NONE, DmarcResult.PERMERROR)
    else:
        assert 0 <= record.pct <= 100


# --- the author domain ----------------------------------------------------------------------

@pytest.mark.parametrize(("value", "domains"), [
    ("Test User <test@example.com>", ("example.com",)),
    ('"Test, User" <test@example.com>', ("example.com",)),
    ("test@example.com", ("example.com",)),
    ("test@example.com (a comment, with comma)", ("example.com",)),
    ("(comment) <test@Example.COM>", ("example.com",)),
    ("=?UTF-8?B?QmVkIEJhdGggJiBCZXlvbmQ=?=<BdBth&Byond@example.com>", ("example.com",)),
    ("a@one.example, b@two.example", ("one.example", "two.example")),
    ("a@one.example, A@ONE.example", ("one.example",)),
    ('"ceo@bank.example" <x@evil.example>', ("evil.example",)),
    ("ceo@bank.example <x@evil.example>", ("evil.example", "bank.example")),
    ("Team: a@one.example, b@two.example;", ("one.example", "two.example")),
    ("undisclosed-recipients:;", ()),
    ("<@route.example,@r2.example:user@real.example>", ("real.example",)),
    ("user@[192.0.2.1]", ()),
    ("Test User", ()),
    ("user@bücher.example", ("xn--bcher-kva.example",)),
    ("user@example.com.", ("example.com",)),
    ("Test\r\n User <a@example.com>", ("example.com",)),
    ("a . b @ example . com", ("example.com",)),
    ("<a@example.com", ("example.com",)),
])
def test_author_domains(value: str, domains: tuple[str, ...]) -> None:
    assert author_domains([value]).domains == domains


def test_author_problems() -> None:
    assert author_domains([]).problem == "no From field"
    assert author_domains(["Test User"]).problem == "no address with a usable domain in From"
    assert author_domains(["a@x.example", "b@y.example"]).problem == "2 From fields"
    assert author_domains(["a@x.example, junk"]).problem == "1 From address without a usable domain"
    assert author_domains(["a@x.example"]).problem == ""


def test_from_field_values() -> None:
    header = (b"Received: x\r\nFROM : A <a@example.com>\r\nSubject: s\r\nFrom: b@example.org,\r\n"
              b" c@example.net\r\n\r\nFrom: body@example.com\r\n")
    assert from_field_values(header) == [b" A <a@example.com>\r\n",
                                         b" b@example.org,\r\n c@example.net\r\n"]


@PROPERTY
@given(st.text(max_size=200))
def test_author_domains_never_raises(text: str) -> None:
    authors = author_domains([text, text.encode("utf-8", "surrogatepass")])
    assert all(domain == domain.lower() for domain in authors.domains)


# --- discovery and evaluation ---------------------------------------------------------------

ZONE: Zone = {
    "_dmarc.example.com": {"TXT": ["v=DMARC1; p=reject; rua=mailto:dmarc@example.com"]},
    "_dmarc.quarantine.test": {"TXT": ["v=spf1 -all", "v=DMARC1; p=quarantine"]},
    "_dmarc.two.test": {"TXT": ["v=DMARC1; p=reject", "v=DMARC1; p=none"]},
    "_dmarc.broken.test": "SERVFAIL",
    "_dmarc.strict.test": {"TXT": ["v=DMARC1; p=reject; adkim=s; aspf=s"]},
    "_dmarc.pct.test": {"TXT": ["v=DMARC1; p=reject; pct=50"]},
    "_dmarc.pctq.test": {"TXT": ["v=DMARC1; p=quarantine; pct=0"]},
    "_dmarc.np.test": {"TXT": ["v=DMARC1; p=none; sp=quarantine; np=reject"]},
    "exists.np.test": {"A": ["192.0.2.1"]},
    "aaaa.np.test": {"AAAA": ["2001:db8::1"]},
    "empty.np.test": {"TXT": ["not an address"]},
    "flaky.np.test": "SERVFAIL",
    "_dmarc.gov": {"TXT": ["v=DMARC1; p=reject; psd=y"]},
    "_dmarc.co.uk": {"TXT": ["v=DMARC1; p=quarantine"]},
    "_dmarc.sub.example.org": {"TXT": ["v=DMARC1; p=quarantine"]},
}


def verdict(from_value: str | Sequence[str], *, spf: tuple[str, str] | None = None,
            dkim: Sequence[tuple[str, str]] = (), zone: Zone = ZONE,
            **options: Any) -> DmarcVerdict:
    fields = [from_value] if isinstance(from_value, str) else list(from_value)
    return run(evaluate(fields, spf=spf, dkim=dkim, resolver=StaticResolver(zone), **options))


def never() -> float:
    raise AssertionError("pct=100 needs no sampling")


def test_discover_from_org_and_nothing() -> None:
    resolver = StaticResolver(ZONE)
    found = run(discover("example.com", resolver))
    assert (found.domain, found.source) == ("example.com", RecordSource.FROM)
    found = run(discover("a.b.example.com", resolver))
    assert (found.domain, found.source) == ("example.com", RecordSource.ORG)
    assert resolver.queries[("_dmarc.a.b.example.com", "TXT")] == 1
    assert resolver.queries[("_dmarc.b.example.com", "TXT")] == 0  # no tree walk in 7489
    found = run(discover("example.net", resolver))
    assert found.text is None and found.reason == "no DMARC record"


def test_non_dmarc_txt_records_are_discarded() -> None:
    result = verdict("a@quarantine.test")
    assert (result.result, result.policy) == (DmarcResult.FAIL, Policy.QUARANTINE)


def test_several_records_mean_none() -> None:
    result = verdict("a@two.test")
    assert result.result is DmarcResult.NONE and result.policy is None
    assert "2 DMARC records" in result.reason


def test_author_domain_record_wins() -> None:
    """A record at the author domain wins over the org domain's, whatever it says."""
    result = verdict("a@sub.example.org")
    assert (result.policy_domain, result.policy) == ("sub.example.org", Policy.QUARANTINE)


def test_pass_by_aligned_dkim_or_spf() -> None:
    by_dkim = verdict("a@mail.example.com", dkim=[("fail", "example.com"),
                                                 ("pass", "other.test"),
                                                 ("pass", "example.com")])
    assert by_dkim.result is DmarcResult.PASS
    assert by_dkim.alignment.dkim and by_dkim.alignment.dkim_domain == "example.com"
    assert by_dkim.disposition is Policy.NONE and reply_for(by_dkim) is None
    by_spf = verdict("a@example.com", spf=("pass", "bounce@bounces.example.com"))
    assert by_spf.result is DmarcResult.PASS and by_spf.alignment.spf
    assert by_spf.alignment.spf_domain == "bounces.example.com"


def test_fail_rejects_with_550() -> None:
    result = verdict("a@example.com", spf=("softfail", "example.com"),
                     dkim=[("pass", "example.net")])
    assert (result.result, result.policy, result.applied, result.disposition) == (
        DmarcResult.FAIL, Policy.REJECT, Policy.REJECT, Policy.REJECT)
    reply = reply_for(result)
    assert reply is not None and (reply.code, reply.status) == (550, "5.7.1")


def test_strict_alignment() -> None:
    assert verdict("a@strict.test", dkim=[("pass", "strict.test")]).result is DmarcResult.PASS
    assert verdict("a@strict.test", spf=("pass", "strict.test")).result is DmarcResult.PASS
    assert verdict("a@x.strict.test", dkim=[("pass", "strict.test")],
                   spf=("pass", "strict.test")).result is DmarcResult.FAIL


@pytest.mark.parametrize(("sample", "applied", "sampled_out"), [
    (0.0, Policy.REJECT, False),
    (0.49, Policy.REJECT, False),
    (0.5, Policy.QUARANTINE, True),
    (0.99, Policy.QUARANTINE, True),
])
def test_pct_sampling(sample: float, applied: Policy, sampled_out: bool) -> None:
    result = verdict("a@pct.test", sample=lambda: sample)
    assert (result.policy, result.applied, result.sampled_out) == (
        Policy.REJECT, applied, sampled_out)


def test_pct_zero_and_hundred() -> None:
    result = verdict("a@pctq.test", sample=lambda: 0.0)
    assert (result.applied, result.sampled_out) == (Policy.NONE, True)
    assert verdict("a@example.com", sample=never).applied is Policy.REJECT


@pytest.mark.parametrize(("ceiling", "disposition", "override"), [
    (Policy.REJECT, Policy.REJECT, False),
    (Policy.QUARANTINE, Policy.QUARANTINE, True),
    (Policy.NONE, Policy.NONE, True),
])
def test_local_enforcement(ceiling: Policy, disposition: Policy, override: bool) -> None:
    result = verdict("a@example.com", enforcement=ceiling)
    assert (result.applied, result.disposition, result.local_override) == (
        Policy.REJECT, disposition, override)
    assert (reply_for(result) is not None) is (disposition is Policy.REJECT)


@pytest.mark.parametrize(("author", "policy"), [
    ("a@np.test", Policy.NONE),              # the domain itself: p=
    ("a@exists.np.test", Policy.QUARANTINE),  # an A record: exists, sp=
    ("a@aaaa.np.test", Policy.QUARANTINE),    # an AAAA record
    ("a@empty.np.test", Policy.REJECT),       # the name, but no MX/A/AAAA: np=
    ("a@missing.np.test", Policy.REJECT),     # NXDOMAIN: np=
])
def test_np_for_non_existent_subdomains(author: str, policy: Policy) -> None:
    assert verdict(author).policy is policy


def test_np_not_checked_on_pass() -> None:
    result = verdict("a@missing.np.test", dkim=[("pass", "np.test")])
    assert (result.result, result.policy) == (DmarcResult.PASS, Policy.QUARANTINE)


def test_temporary_dns_errors_are_temperror() -> None:
    for author in ("a@broken.test", "a@x.broken.test", "a@flaky.np.test"):
        result = verdict(author)
        assert result.result is DmarcResult.TEMPERROR, author
        reply = reply_for(result)
        assert reply is not None and (reply.code, reply.status) == (451, "4.7.0")


def test_psd_lookup() -> None:
    assert verdict("a@example.gov").result is DmarcResult.NONE
    psd = verdict("a@example.gov", psd=True)
    assert (psd.result, psd.policy_domain, psd.record_source) == (
        DmarcResult.FAIL, "gov", RecordSource.PSD)
    # _dmarc.co.uk lacks psd=y: used only when the operator lists co.uk
    assert verdict("a@example.co.uk", psd=True).result is DmarcResult.NONE
    listed = verdict("a@example.co.uk", psd=True, psd_domains={"CO.UK"})
    assert (listed.result, listed.policy) == (DmarcResult.FAIL, Policy.QUARANTINE)


def test_no_from_is_permerror() -> None:
    for fields in ([], ["Test User"], ["undisclosed-recipients:;"]):
        result = verdict(fields)
        assert (result.result, result.policy, result.malformed_from) == (
            DmarcResult.PERMERROR, Policy.NONE, True)
        assert reply_for(result) is None


def test_several_authors_strictest_failure_wins() -> None:
    value = "a@quarantine.test, b@example.com, c@example.net"
    result = verdict(value, dkim=[("pass", "quarantine.test")])
    assert (result.result, result.from_domain, result.policy) == (
        DmarcResult.FAIL, "example.com", Policy.REJECT)
    assert result.from_domains == ("quarantine.test", "example.com", "example.net")
    assert not result.malformed_from
    passing = verdict("a@example.com, b@example.net", dkim=[("pass", "example.com")])
    assert (passing.result, passing.from_domain) == (DmarcResult.NONE, "example.net")


def test_several_from_fields_are_all_checked() -> None:
    result = verdict(["a@example.net", "b@example.com"])
    assert (result.result, result.from_domain, result.disposition) == (
        DmarcResult.FAIL, "example.com", Policy.REJECT)
    assert result.malformed_from and "2 From fields" in result.reason


def test_temperror_outranks_a_monitoring_failure() -> None:
    zone = dict(ZONE, **{"_dmarc.monitor.test": {"TXT": ["v=DMARC1; p=none"]}})
    result = verdict("a@monitor.test, b@broken.test", zone=zone)
    assert result.result is DmarcResult.TEMPERROR
    result = verdict("a@example.com, b@broken.test", zone=zone)
    assert (result.result, result.disposition) == (DmarcResult.FAIL, Policy.REJECT)


def test_header_block_input() -> None:
    header = b"Subject: x\r\nFrom: A <a@example.com>\r\n\r\nFrom: b@example.net\r\n"
    result = run(evaluate(header, spf=None, dkim=[], resolver=StaticResolver(ZONE)))
    assert (result.from_domains, result.result) == (("example.com",), DmarcResult.FAIL)


def test_monitoring_only_never_defers() -> None:
    result = verdict("a@broken.test", enforcement=Policy.NONE)
    assert result.result is DmarcResult.TEMPERROR and reply_for(result) is None


def test_address_as_display_name_is_checked() -> None:
    result = verdict("a@example.com <x@example.net>", dkim=[("pass", "example.net")])
    assert (result.result, result.from_domain, result.disposition) == (
        DmarcResult.FAIL, "example.com", Policy.REJECT)


def test_too_many_author_domains() -> None:
    value = ", ".join(f"a@d{i}.example" for i in range(MAX_AUTHOR_DOMAINS + 1))
    result = verdict(value)
    assert result.result is DmarcResult.PERMERROR and result.malformed_from
    assert "more than" in result.reason


def test_permerror_record() -> None:
    zone: Zone = {"_dmarc.bad.test": {"TXT": ["v=DMARC1; p=reject; p=none"]}}
    result = verdict("a@bad.test", zone=zone)
    assert (result.result, result.policy, result.policy_domain) == (
        DmarcResult.PERMERROR, Policy.NONE, "bad.test")


def test_method_result() -> None:
    failed = verdict("a@example.com").method_result()
    assert (failed.method, failed.result, failed.reason) == ("dmarc", "fail", "")
    assert failed.properties == (("header.from", "example.com"), ("policy.dmarc", "reject"))
    assert failed.comment == "p=reject sp=reject dis=reject"
    none = verdict("a@example.net").method_result()
    assert (none.result, none.reason, none.properties) == (
        "none", "no DMARC record", (("header.from", "example.net"),))


def test_query_names_that_are_too_long_have_no_record() -> None:
    label = "a" * 63
    author = f"x@{label}.{label}.{label}.{label[:57]}.com"
    assert verdict(author).result is DmarcResult.NONE

