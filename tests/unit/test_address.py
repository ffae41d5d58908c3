"""Unit and property tests for tayori.address: paths, mailboxes, IDNA, literals, xtext."""

from __future__ import annotations

import contextlib
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tayori.address import (
    MAX_LOCAL_PART,
    MAX_PATH,
    AddressError,
    Mailbox,
    check_address_literal,
    is_xtext,
    parse_mailbox,
    parse_path,
    split_path,
    to_ascii_domain,
    xtext_decode,
    xtext_encode,
)

PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None)

ATEXT = string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~"


def _domain_of_length(length: int) -> str:
    """A syntactically valid LDH domain of exactly ``length`` octets."""
    labels: list[str] = []
    remaining = length
    while remaining > 0:
        size = min(63, remaining)
        if remaining - size == 1:  # never leave room for a lone dot
            size -= 2
        labels.append("a" * size)
        remaining -= size + 1
    domain = ".".join(labels)
    assert len(domain) == length, (len(domain), length)
    return domain


# --- valid paths -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "local", "domain", "ascii_domain"),
    [
        ("<user@example.com>", "user", "example.com", "example.com"),
        ("<User.Name+tag@Example.COM>", "User.Name+tag", "Example.COM", "example.com"),
        ('<"john doe"@example.com>', '"john doe"', "example.com", "example.com"),
        ('<"a\\"b"@example.com>', '"a\\"b"', "example.com", "example.com"),
        ('<"a\\\\b"@example.com>', '"a\\\\b"', "example.com", "example.com"),
        ('<"with@at"@example.com>', '"with@at"', "example.com", "example.com"),
        ("<user@xn--bcher-kva.example>", "user", "xn--bcher-kva.example",
         "xn--bcher-kva.example"),
        ("<user@XN--BCHER-KVA.Example>", "user", "XN--BCHER-KVA.Example",
         "xn--bcher-kva.example"),
        ("<user@[192.0.2.1]>", "user", "[192.0.2.1]", "[192.0.2.1]"),
        ("<user@[IPv6:2001:DB8::1]>", "user", "[IPv6:2001:DB8::1]", "[IPv6:2001:db8::1]"),
        ("<user@[IPv6:2001:db8:0:0:0:0:0:1]>", "user", "[IPv6:2001:db8:0:0:0:0:0:1]",
         "[IPv6:2001:db8::1]"),
        ("<user@[x-tag:some-content]>", "user", "[x-tag:some-content]",
         "[x-tag:some-content]"),
        ("user@example.com", "user", "example.com", "example.com"),
    ],
)
def test_valid_ascii_paths(path: str, local: str, domain: str, ascii_domain: str) -> None:
    mailbox = parse_path(path, utf8=False, allow_null=False)
    assert mailbox == Mailbox(local, domain, ascii_domain)
    assert str(mailbox) == f"{local}@{domain}"
    assert not mailbox.needs_smtputf8


def test_literal_flag() -> None:
    assert parse_mailbox("u@[192.0.2.1]", utf8=False).is_literal
    assert not parse_mailbox("u@example.com", utf8=False).is_literal


@pytest.mark.parametrize(
    ("path", "ascii_domain"),
    [
        ("<user@bücher.example>", "xn--bcher-kva.example"),
        ("<用户@例子.广告>", "xn--fsqu00a.xn--4rr70v"),
        ("<josé@exämple.org>", "xn--exmple-cua.org"),
        ('<"jo sé"@example.org>', "example.org"),
    ],
)
def test_utf8_paths_with_smtputf8(path: str, ascii_domain: str) -> None:
    mailbox = parse_path(path, utf8=True, allow_null=False)
    assert mailbox is not None
    assert mailbox.ascii_domain == ascii_domain
    assert str(mailbox) == path[1:-1]  # stored as the client wrote it
    assert mailbox.needs_smtputf8


@pytest.mark.parametrize(
    "path",
    ["<@a.example,@b.example:user@c.example>", "<@a.example:user@c.example>",
     "<@[192.0.2.1],@b.example:user@c.example>"],
)
def test_source_route_is_dropped(path: str) -> None:
    mailbox = parse_path(path, utf8=False, allow_null=False)
    assert mailbox == Mailbox("user", "c.example", "c.example")
    assert str(mailbox) == "user@c.example"


def test_null_path_where_allowed() -> None:
    assert parse_path("<>", utf8=False, allow_null=True) is None


def test_null_path_where_not_allowed() -> None:
    with pytest.raises(AddressError):
        parse_path("<>", utf8=False, allow_null=False)


def test_length_limits_at_the_boundary_are_accepted() -> None:
    local = "l" * MAX_LOCAL_PART
    domain = _domain_of_length(MAX_PATH - 2 - len(local) - 1)
    path = f"<{local}@{domain}>"
    assert len(path) == MAX_PATH  # RFC 5321 §4.5.3.1.3 counts the brackets too
    mailbox = parse_path(path, utf8=False, allow_null=False)
    assert mailbox is not None and mailbox.local == local
    assert to_ascii_domain(_domain_of_length(255)) == _domain_of_length(255)


# --- invalid paths -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "<a@xn--->",
        "<a@xn--a>",
        "<a@xn--bcher-kva-.example>",
        "<a@xn--zz-zzzzzzzz.example>",
    ],
)
def test_bad_a_labels_are_idna_failures(path: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_path(path, utf8=False, allow_null=False)
    assert info.value.idna_failure


def test_bad_u_label_is_idna_failure() -> None:
    with pytest.raises(AddressError) as info:
        parse_path("<a@\u00df\u200d.example>", utf8=True, allow_null=False)  # ZWJ out of context
    assert info.value.idna_failure


@pytest.mark.parametrize(
    "text",
    [
        "l" * 65 + "@example.com",
        '"' + "q" * 63 + '"@example.com',
        "é" * 33 + "@example.com",  # 66 octets in UTF-8 (the limit is in octets)
    ],
)
def test_local_part_over_64_octets(text: str) -> None:
    with pytest.raises(AddressError, match="Local part too long"):
        parse_mailbox(text, utf8=True)


def test_domain_over_255_octets() -> None:
    with pytest.raises(AddressError):
        to_ascii_domain(_domain_of_length(256))
    with pytest.raises(AddressError):
        parse_mailbox("a@" + _domain_of_length(256), utf8=False)


def test_path_over_256_octets() -> None:
    domain = _domain_of_length(250)
    with pytest.raises(AddressError, match="too long"):
        parse_path(f"<{'l' * 10}@{domain}>", utf8=False, allow_null=False)


def test_path_limit_counts_the_angle_brackets() -> None:
    """RFC 5321 §4.5.3.1.3: a path is at most 256 octets "including the punctuation and
    element separators"; Path = "<" [A-d-l ":"] Mailbox ">", so the brackets count."""
    local = "l" * MAX_LOCAL_PART
    domain = _domain_of_length(MAX_PATH + 1 - 2 - len(local) - 1)
    path = f"<{local}@{domain}>"
    assert len(path) == MAX_PATH + 1
    with pytest.raises(AddressError):
        parse_path(path, utf8=False, allow_null=False)


@pytest.mark.parametrize(
    "text",
    ["a\x01b@example.com", "ab@exam\x00ple.com", "a\x7f@example.com", "a@example.com\t",
     '"a\x0bb"@example.com', "a\r\n@example.com"],
)
def test_control_characters(text: str) -> None:
    with pytest.raises(AddressError, match="Control"):
        parse_mailbox(text, utf8=True)


@pytest.mark.parametrize(
    "path", ["<用户@example.com>", "<user@bücher.example>", '<"jo sé"@example.org>']
)
def test_non_ascii_without_smtputf8_needs_utf8(path: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_path(path, utf8=False, allow_null=False)
    assert info.value.needs_utf8
    assert not info.value.idna_failure


@pytest.mark.parametrize(
    "text",
    ["example.com", "@example.com", "user@", "", "user", '"a@b"'],
)
def test_missing_at_or_part(text: str) -> None:
    with pytest.raises(AddressError):
        parse_mailbox(text, utf8=False)


@pytest.mark.parametrize(
    "text",
    [
        "a.@example.com",
        ".a@example.com",
        "a..b@example.com",
        "a@.example.com",
        "a@example..com",
        "a@example.com..",
        "a@example.com...",
        "a@.",
    ],
)
def test_empty_labels_and_stray_dots(text: str) -> None:
    with pytest.raises(AddressError):
        parse_mailbox(text, utf8=False)


def test_domain_with_trailing_root_dot_is_not_smtp_syntax() -> None:
    """RFC 5321 §4.1.2: Domain = sub-domain *("." sub-domain); no trailing dot."""
    with pytest.raises(AddressError):
        parse_mailbox("a@example.com.", utf8=False)


@pytest.mark.parametrize(
    "text",
    [
        "a@-example.com",
        "a@example-.com",
        "a@exa_mple.com",
        "a@" + "l" * 64 + ".com",
        'a"b@example.com',
        '"a"b"@example.com',
        '"unterminated@example.com',
        "a b@example.com",
        "a(b)@example.com",
        "a@exa mple.com",
    ],
)
def test_malformed_mailboxes(text: str) -> None:
    with pytest.raises(AddressError):
        parse_mailbox(text, utf8=False)


@pytest.mark.parametrize(
    "literal",
    ["[300.1.1.1]", "[1.2.3]", "[IPv6:zz::1]", "[IPv6:1::2::3]", "[1.2.3.4", "[:x]",
     "[tag:]", "[tag:a b]", "[tag-:x]", "[]", "[IPv6:]"],
)
def test_malformed_address_literals(literal: str) -> None:
    with pytest.raises(AddressError):
        check_address_literal(literal)


def test_ipv6_literal_with_zone_identifier_is_refused() -> None:
    """RFC 5321 §4.1.3: IPv6-addr has no zone/scope identifier (``%eth0``)."""
    with pytest.raises(AddressError):
        check_address_literal("[IPv6:fe80::1%eth0]")


def test_ipv4_mapped_literal_normal_form() -> None:
    assert check_address_literal("[IPv6:::ffff:192.0.2.1]").startswith("[IPv6:::ffff:")


# --- split_path --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argument", "path", "rest"),
    [
        ("<a@b.example>", "<a@b.example>", ""),
        ("<a@b.example> SIZE=10", "<a@b.example>", " SIZE=10"),
        ('<"a>b"@x.example> SIZE=1', '<"a>b"@x.example>', " SIZE=1"),
        ('<"a\\">b"@x.example> BODY=8BITMIME', '<"a\\">b"@x.example>', " BODY=8BITMIME"),
        ('<"x y"@x.example>', '<"x y"@x.example>', ""),
        ("   <a@b.example>", "<a@b.example>", ""),
        ("a@b.example SIZE=5", "a@b.example", "SIZE=5"),
        ("<>", "<>", ""),
    ],
)
def test_split_path(argument: str, path: str, rest: str) -> None:
    assert split_path(argument) == (path, rest)


@pytest.mark.parametrize("argument", ["", "   ", "<a@b.example", '<"a>b@x.example'])
def test_split_path_errors(argument: str) -> None:
    with pytest.raises(AddressError):
        split_path(argument)


# --- xtext -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "encoded"),
    [("abc", "abc"), ("a+b", "a+2Bb"), ("a=b", "a+3Db"), ("a b", "a+20b"), ("", "")],
)
def test_xtext_encode_examples(raw: str, encoded: str) -> None:
    assert xtext_encode(raw) == encoded
    assert xtext_decode(encoded) == raw


@pytest.mark.parametrize("text", ["a+", "a+2", "a+2b", "a+GG", "a b", "a=b", "é", "a\x00"])
def test_invalid_xtext(text: str) -> None:
    assert not is_xtext(text)
    with pytest.raises(ValueError, match="xtext"):
        xtext_decode(text)


PRINTABLE_ASCII = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E))


@PROPERTY
@given(PRINTABLE_ASCII)
def test_xtext_round_trip(text: str) -> None:
    encoded = xtext_encode(text)
    assert is_xtext(encoded)
    assert xtext_decode(encoded) == text


XCHAR = st.characters(min_codepoint=0x21, max_codepoint=0x7E).filter(lambda c: c not in "+=")
HEXCHAR = st.tuples(st.sampled_from("0123456789ABCDEF"), st.sampled_from("0123456789ABCDEF"))
XTEXT = st.lists(
    st.one_of(XCHAR, HEXCHAR.map(lambda pair: "+" + "".join(pair)))
).map("".join)


@PROPERTY
@given(XTEXT)
def test_any_accepted_xtext_decodes(text: str) -> None:
    assert is_xtext(text)
    decoded = xtext_decode(text)
    assert len(decoded) <= len(text)
    assert all(ord(c) < 256 for c in decoded)


@PROPERTY
@given(st.text(max_size=40))
def test_xtext_decode_accepts_exactly_is_xtext(text: str) -> None:
    if is_xtext(text):
        xtext_decode(text)
    else:
        with pytest.raises(ValueError, match="xtext"):
            xtext_decode(text)


# --- generated addresses -----------------------------------------------------------------

ATOM = st.text(alphabet=ATEXT, min_size=1, max_size=12)
DOT_ATOM = st.lists(ATOM, min_size=1, max_size=4).map(".".join).filter(
    lambda s: len(s) <= MAX_LOCAL_PART)
LDH_LABEL = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,20}[A-Za-z0-9])?", fullmatch=True).filter(
    lambda s: not s.lower().startswith("xn--"))
LDH_DOMAIN = st.lists(LDH_LABEL, min_size=1, max_size=5).map(".".join)


@PROPERTY
@given(DOT_ATOM, LDH_DOMAIN, st.booleans())
def test_generated_addresses_parse_and_round_trip(local: str, domain: str, utf8: bool) -> None:
    mailbox = parse_path(f"<{local}@{domain}>", utf8=utf8, allow_null=False)
    assert mailbox == Mailbox(local, domain, domain.lower())
    assert str(mailbox) == f"{local}@{domain}"
    assert parse_path(str(mailbox), utf8=utf8, allow_null=False) == mailbox
    assert split_path(f"<{mailbox}> NOTIFY=NEVER") == (f"<{mailbox}>", " NOTIFY=NEVER")


@PROPERTY
@given(st.text(max_size=80), st.booleans(), st.booleans())
def test_parse_path_raises_only_address_error(text: str, utf8: bool, allow_null: bool) -> None:
    with contextlib.suppress(AddressError):
        parse_path(text, utf8=utf8, allow_null=allow_null)
