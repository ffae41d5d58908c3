"""Authentication-Results (RFC 8601): rendering, parsing, removal of forged fields."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tayori.auth.results import (
    LINE_LIMIT,
    MethodResult,
    ResultsSyntaxError,
    arc_result,
    auth_result,
    authentication_results,
    authserv_id_of,
    claimed_ids,
    dkim_result,
    header_fields,
    iprev_result,
    parse,
    parse_arc,
    spf_result,
    strip_forged,
)

PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None)
OURS = "mx.tayori.test"


def value_of(field: bytes) -> bytes:
    return field.split(b":", 1)[1]


# --- rendering ------------------------------------------------------------------------------

def test_render_typical_field() -> None:
    field = authentication_results(OURS, [
        spf_result("pass", mailfrom="bounce@example.com", helo="mail.example.com"),
        dkim_result("pass", domain="example.com", selector="s2024",
                    signature="dOdFEyhrk/tw5wl3vMIog oxhaVsKJ", identity="@example.com"),
        MethodResult("dmarc", "pass", properties=(("header.from", "example.com"),)),
    ])
    assert field == (
        b"Authentication-Results: mx.tayori.test;\r\n"
        b"\tspf=pass smtp.mailfrom=bounce@example.com smtp.helo=mail.example.com;\r\n"
        b"\tdkim=pass header.d=example.com header.i=@example.com header.s=s2024\r\n"
        b"\t  header.b=dOdFEyhr;\r\n"
        b"\tdmarc=pass header.from=example.com\r\n")
    slash = dkim_result("pass", domain="example.com", signature="ab/cd+efgh==")
    assert b' header.b="ab/cd+ef"' in authentication_results(OURS, [slash])


def test_render_none() -> None:
    assert authentication_results(OURS, []) == b"Authentication-Results: mx.tayori.test; none\r\n"


def test_render_other_methods() -> None:
    field = authentication_results(OURS, [
        iprev_result("pass", address="192.0.2.1", name="mail.example.com"),
        auth_result("pass", user="alice@example.com"),
        arc_result("pass", remote_ip="2001:db8::1", oldest_pass=0),
        MethodResult("dkim", "fail", reason='bad "signature"\r\nX-Injected: 1'),
    ])
    parsed = parse(value_of(field))
    iprev, auth, arc, dkim = parsed.results
    assert (iprev.get("policy.iprev"), iprev.comment) == ("192.0.2.1", "mail.example.com")
    assert auth.get("smtp.auth") == "alice@example.com"
    assert (arc.get("smtp.remote-ip"), arc.get("header.oldest-pass")) == ("2001:db8::1", "0")
    assert dkim.reason == 'bad "signature"  X-Injected: 1'
    assert all(line[:1] in (b" ", b"\t") for line in field.split(b"\r\n")[1:-1])


def test_render_arc_instance() -> None:
    field = authentication_results(OURS, [spf_result("fail", mailfrom="a@b.example")],
                                   instance=2)
    assert field.startswith(b"ARC-Authentication-Results: i=2; mx.tayori.test;\r\n")
    instance, parsed = parse_arc(value_of(field))
    assert (instance, parsed.authserv_id, parsed.results[0].result) == (2, OURS, "fail")


def test_render_refuses_non_keywords() -> None:
    with pytest.raises(ValueError, match="method"):
        authentication_results(OURS, [MethodResult("dk im", "pass")])
    with pytest.raises(ValueError, match="property"):
        authentication_results(OURS, [MethodResult("dkim", "pass",
                                                    properties=(("header.d", "x"), ("d", "x")))])
    with pytest.raises(ValueError, match="property"):
        authentication_results(OURS, [MethodResult("dkim", "pass", properties=(("a;b.c", "x"),))])


def test_long_results_fold() -> None:
    props = tuple((f"header.p{i}", "x" * 20) for i in range(12))
    field = authentication_results(OURS, [MethodResult("dkim", "pass", properties=props)])
    lines = field.decode().split("\r\n")[:-1]
    assert len(lines) > 3 and all(len(line) <= LINE_LIMIT for line in lines)
    assert parse(value_of(field)).results[0].properties == props


# --- parsing --------------------------------------------------------------------------------

def test_parse_rfc8601_examples() -> None:
    """Appendix B of RFC 8601, restated."""
    assert parse("example.org 1; none").results == ()
    assert parse("example.org 1; none").version == 1
    spf = parse("example.com; spf=pass smtp.mailfrom=example.net").results[0]
    assert (spf.method, spf.result, spf.get("smtp.mailfrom")) == ("spf", "pass", "example.net")
    auth = parse("example.com;\r\n auth=pass (cram-md5) smtp.auth=sender@example.net;\r\n"
                 " spf=pass smtp.mailfrom=example.net")
    assert [(r.method, r.comment) for r in auth.results] == [("auth", "cram-md5"), ("spf", "")]
    two = parse("mail-router.example.net;\r\n"
                "  dkim=pass (good signature) header.d=newyork.example.com\r\n"
                "        header.b=oINEO8hg;\r\n"
                "  dkim=fail (bad signature) header.d=newyork.example.com\r\n"
                "        header.b=EToRSuvU")
    assert [(r.result, r.get("header.b")) for r in two.find("DKIM")] == [
        ("pass", "oINEO8hg"), ("fail", "EToRSuvU")]


def test_parse_comments_everywhere() -> None:
    """RFC 8601 Appendix B.7: comments in every place CFWS is allowed."""
    parsed = parse("foo.example.net (foobar) 1 (baz);\r\n"
                   "    dkim (Because I like it) / 1 (One yay) = (wait for it) fail\r\n"
                   "      policy (A dot can go here) . (like that) expired\r\n"
                   "      (this surprised me) = (as I wasn't expecting it) 1362471462")
    assert (parsed.authserv_id, parsed.version) == ("foo.example.net", 1)
    dkim = parsed.results[0]
    assert (dkim.method, dkim.version, dkim.result) == ("dkim", 1, "fail")
    assert dkim.properties == (("policy.expired", "1362471462"),)


def test_parse_received_examples() -> None:
    parsed = parse(b" lists.example.org; arc=none; spf=pass smtp.mfrom=jqd@d1.example;"
                   b" dkim=pass (1024-bit key) header.i=@d1.example; dmarc=pass\r\n")
    assert parsed.authserv_id == "lists.example.org"
    assert [(r.method, r.result) for r in parsed.results] == [
        ("arc", "none"), ("spf", "pass"), ("dkim", "pass"), ("dmarc", "pass")]
    assert parsed.results[2].comment == "1024-bit key"
    gmail = parse('mx.google.com; dmarc=pass (p=NONE sp=NONE dis=NONE) header.from=x.example;'
                  ' dkim=pass header.i=@x.example header.s=sel header.b="AbC/dE+f";')
    assert gmail.results[0].comment == "p=NONE sp=NONE dis=NONE"
    assert gmail.results[1].get("header.b") == "AbC/dE+f"
    quoted = parse('"odd id"; spf=pass reason="it is fine" smtp.mailfrom="a b"@example.com')
    assert (quoted.authserv_id, quoted.results[0].reason) == ("odd id", "it is fine")
    assert quoted.results[0].get("smtp.mailfrom") == "a b@example.com"


def test_parse_common_deviations() -> None:
    parsed = parse("mx.example.net; spf=pass (sender IP is 192.0.2.1) smtp.mailfrom=a.example;"
                   " dkim=none (message not signed) header.d=none;dmarc=none action=none"
                   " header.from=example.com;compauth=pass reason=100; spf=none smtp.mailfrom=")
    dmarc = parsed.find("dmarc")[0]
    assert dmarc.properties == (("action", "none"), ("header.from", "example.com"))
    assert parsed.find("compauth")[0].reason == "100"
    assert parsed.results[-1].get("smtp.mailfrom") == ""


@pytest.mark.parametrize("bad", ["", "   ", "example.com", "example.com; spf",
                                 "example.com; spf=", "example.com; spf=pass smtp",
                                 "example.com; spf=pass (open comment", "(only a comment)",
                                 'example.com; spf=pass reason="open'])
def test_parse_errors(bad: str) -> None:
    with pytest.raises(ResultsSyntaxError):
        parse(bad)


# --- property: what we write, we read back --------------------------------------------------

KEYWORD = st.from_regex(r"[a-z][a-z0-9-]{0,8}[a-z0-9]", fullmatch=True)
TEXT = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=30)
COMMENT = TEXT.map(str.strip)
RESULTS = st.builds(
    MethodResult,
    method=KEYWORD.filter(lambda k: k not in ("none", "reason")),
    result=KEYWORD,
    reason=TEXT,
    properties=st.lists(st.tuples(st.builds("{}.{}".format, KEYWORD, KEYWORD), TEXT),
                        max_size=4).map(tuple),
    comment=COMMENT,
)


@PROPERTY
@given(st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=20),
       st.lists(RESULTS, max_size=4))
def test_render_then_parse_round_trips(authserv_id: str, results: list[MethodResult]) -> None:
    field = authentication_results(authserv_id, results)
    lines = field.split(b"\r\n")
    assert lines[-1] == b"" and all(line[:1] in (b" ", b"\t") for line in lines[1:-1])
    parsed = parse(value_of(field))
    assert parsed.authserv_id == authserv_id
    assert list(parsed.results) == results


@PROPERTY
@given(st.text(max_size=100))
def test_parse_fails_only_with_syntax_error(text: str) -> None:
    with contextlib.suppress(ResultsSyntaxError):
        parse(text)
    authserv_id_of(text)


# --- removing forged fields -----------------------------------------------------------------

# The lines of HEADER, each with what strip_forged(HEADER, "MX.TAYORI.TEST") does to it.
HEADER_LINES = [
    ("drop", b"Authentication-Results: mx.tayori.test; spf=pass smtp.mailfrom=evil.example\r\n"),
    ("keep", b"Received: from a by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n"),
    ("drop", b'authentication-results: (forged) "MX.Tayori.Test";\r\n'),
    ("drop", b"\tdkim=pass header.d=bank.example\r\n"),
    ("keep", b"Authentication-Results: other.example; dmarc=pass\r\n"),
    ("keep", b"ARC-Authentication-Results: i=1; mx.tayori.test; arc=none\r\n"),
    ("drop", b"Authentication-Results : mx.tayori.test.; none\r\n"),
    ("keep", b"Authentication-Results: mx.tayori.test.evil.example; dkim=pass\r\n"),
    ("keep", b"Authentication-Results: mx.tayori.testing; dkim=pass\r\n"),
    ("keep", b"Authentication-Results: ; dkim=pass\r\n"),
    # unreadable by RFC 8601, but a lax reader downstream sees our id: dropped
    ("drop", b'Authentication-Results: "mx.tayori.test; dkim=pass header.d=bank.example\r\n'),
    ("drop", b"Authentication-Results: mx.tayori.test\\; dkim=pass\r\n"),
    ("drop", b'Authentication-Results: "mx.tayori.test\\"; dkim=pass\r\n'),
    ("drop", b'Authentication-Results: " mx.tayori.test"; dkim=pass\r\n'),
    ("drop", b"Authentication-Results: mx.tayori.test(c); dkim=pass\r\n"),
    ("drop", b"Authentication-Results: mx.tayori.test dkim=pass\r\n"),
    ("keep", b"Authentication-Results: (unclosed mx.tayori.test; dkim=pass\r\n"),
    ("keep", b'Authentication-Results: "other.example; dkim=pass\r\n'),
    ("keep", b"X-Authentication-Results: mx.tayori.test; dkim=pass\r\n"),
    ("keep", b"Subject: hello\r\n"),
    ("keep", b"\r\n"),
    ("keep", b"Authentication-Results: mx.tayori.test; this is the body\r\n"),
]
HEADER = b"".join(line for _, line in HEADER_LINES)


def test_strip_forged() -> None:
    assert strip_forged(HEADER, "MX.TAYORI.TEST") == b"".join(
        line for fate, line in HEADER_LINES if fate == "keep")


@pytest.mark.parametrize(("value", "ids"), [
    (' "mx.tayori.test; dkim=pass', {"mx.tayori.test"}),           # strict: unreadable
    (" mx.tayori.test\\; dkim=pass", {"mx.tayori.test\\", "mx.tayori.test"}),
    (' (comment) "MX.Tayori.Test."; none', {"mx.tayori.test"}),
    (" other.example; spf=pass", {"other.example"}),
    (" ; dkim=pass", set()),
    ("", set()),
])
def test_claimed_ids_read_strictly_and_leniently(value: str, ids: set[str]) -> None:
    assert claimed_ids(value) == ids


def test_strip_forged_several_ids() -> None:
    stripped = strip_forged(HEADER, ["other.example", "mx.tayori.test"])
    assert b"other.example" not in stripped and b"MX.Tayori.Test" not in stripped
    assert b"mx.tayori.testing" in stripped


def test_strip_forged_keeps_everything_else_byte_for_byte() -> None:
    header = b"From: a@example.com\r\nSubject: x\r\n  folded\r\n"
    assert strip_forged(header, OURS) == header
    assert strip_forged(b"", OURS) == b""


def test_header_fields() -> None:
    fields, rest = header_fields(b" stray\r\nA: 1\r\n 2\r\nB: 3\nC: 4\r\n\r\nbody")
    assert fields == [b" stray\r\n", b"A: 1\r\n 2\r\n", b"B: 3\n", b"C: 4\r\n"]
    assert rest == b"\r\nbody"
    assert header_fields(b"A: 1") == ([b"A: 1"], b"")


@PROPERTY
@given(st.binary(max_size=300))
def test_strip_forged_only_removes(data: bytes) -> None:
    stripped = strip_forged(data, OURS)
    fields, rest = header_fields(data)
    kept, kept_rest = header_fields(stripped)
    assert kept_rest == rest
    assert all(field in fields for field in kept)
