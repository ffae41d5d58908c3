"""SPF records (RFC 7208 §4.5, §4.6, §5, §6): which TXT strings are one, and their terms.

Takes: TXT records as the resolver returns them (bytes, the character-strings of each
record already joined, RFC 7208 §3.3).
Promises: :func:`select_record` picks the one record starting ``v=spf1`` (case-insensitive,
then a space or the end), ignoring every other TXT record whatever it holds;
:func:`parse_record` checks the whole record before anything is evaluated (§4.6: a
syntax error anywhere is a permerror, even after ``all``) and returns an
:class:`SpfRecord`: the directives in order, and the ``redirect=`` and ``exp=`` targets.
Every domain-spec is checked against the domain-end rule (a literal ``.toplabel`` or a
macro at the end, §7.1) before expansion; ``ip4``/``ip6`` networks and CIDR lengths
follow the ABNF strictly (no leading zeros, ranges 0-32 and 0-128).
Failure policy: pure functions; :class:`SpfSyntaxError` (a ValueError) says what is
wrong; the evaluator turns it into permerror. Several SPF records are
:class:`MultipleRecords` (also a permerror, §4.5).
Config keys: none.
Standards: RFC 7208 §4.5-§4.6, §5, §6, §7.1, §12 (the ABNF).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from tayori.auth.spf_macro import MacroString, MacroSyntaxError, parse_macro_string

VERSION = "v=spf1"
QUALIFIERS = "+-~?"
MECHANISMS = frozenset({"all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists"})
DNS_MECHANISMS = frozenset({"include", "a", "mx", "ptr", "exists"})
"""Mechanisms that query DNS, so count against the 10-lookup limit (with redirect=)."""

_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9\-_.]*)=(.*)\Z", re.DOTALL)
_MECHANISM_NAME = re.compile(r"[A-Za-z0-9]*")
_CIDR4 = r"(?:0|[1-9][0-9]?)"
_CIDR6 = r"(?:0|[1-9][0-9]{0,2})"
_DUAL_CIDR = re.compile(rf"(?:/(?P<v4>{_CIDR4}))?(?://(?P<v6>{_CIDR6}))?\Z")
_SPEC_AND_CIDR = re.compile(rf"(?P<spec>.*?)(?:/(?P<v4>{_CIDR4}))?(?://(?P<v6>{_CIDR6}))?\Z",
                            re.DOTALL)
_QNUM = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
_IP4_NETWORK = re.compile(rf"(?P<addr>{_QNUM}(?:\.{_QNUM}){{3}})(?:/(?P<len>{_CIDR4}))?\Z")
_IP6_NETWORK = re.compile(rf"(?P<addr>[0-9A-Fa-f:.]+)(?:/(?P<len>{_CIDR6}))?\Z")
_TOPLABEL = r"(?:[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9-]*[A-Za-z0-9])"
_DOMAIN_END = re.compile(rf"\.{_TOPLABEL}\.?\Z")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class SpfSyntaxError(ValueError):
    """The record breaks the RFC 7208 grammar; the text says where."""


class MultipleRecords(SpfSyntaxError):
    """The domain publishes more than one SPF record (RFC 7208 §4.5: permerror)."""


@dataclass(frozen=True, slots=True)
class Directive:
    """One ``[qualifier]mechanism``; ``text`` is how the record wrote it.

    ``target`` is the domain-spec (None: the current domain); ``network`` belongs to
    ip4/ip6; ``cidr4``/``cidr6`` to a and mx.
    """

    qualifier: str
    mechanism: str
    text: str
    target: MacroString | None = None
    network: Network | None = None
    cidr4: int = 32
    cidr6: int = 128


@dataclass(frozen=True, slots=True)
class SpfRecord:
    """A parsed record: directives in order, and the two modifiers RFC 7208 defines."""

    directives: tuple[Directive, ...]
    redirect: MacroString | None = None
    explanation: MacroString | None = None


def is_spf_record(txt: bytes) -> bool:
    """Whether a TXT record claims to be SPF version 1 (RFC 7208 §4.5)."""
    head = txt[: len(VERSION) + 1]
    return head[: len(VERSION)].lower() == VERSION.encode() and head[len(VERSION):] in (b"", b" ")


def select_record(records: list[bytes]) -> bytes | None:
    """The SPF record among a name's TXT records; None without one."""
    chosen = [txt for txt in records if is_spf_record(txt)]
    if len(chosen) > 1:
        raise MultipleRecords(f"{len(chosen)} SPF records published")
    return chosen[0] if chosen else None


def parse_record(txt: bytes) -> SpfRecord:
    """Parse a whole record (starting with ``v=spf1``), or raise SpfSyntaxError."""
    try:
        text = txt.decode("ascii")
    except UnicodeDecodeError as exc:
        raise SpfSyntaxError("the record is not 7-bit ASCII") from exc
    if not is_spf_record(txt):
        raise SpfSyntaxError("the record does not start with v=spf1")
    directives: list[Directive] = []
    modifiers: dict[str, MacroString] = {}
    for term in text[len(VERSION):].split(" "):
        if not term:
            continue
        modifier = _MODIFIER.match(term)
        if modifier:
            _add_modifier(modifiers, modifier.group(1).lower(), modifier.group(2))
        else:
            directives.append(parse_directive(term))
    return SpfRecord(tuple(directives), modifiers.get("redirect"), modifiers.get("exp"))


def _add_modifier(modifiers: dict[str, MacroString], name: str, value: str) -> None:
    try:
        if name in ("redirect", "exp"):
            if name in modifiers:
                raise SpfSyntaxError(f"{name}= appears more than once")
            modifiers[name] = parse_domain_spec(value)
        else:
            parse_macro_string(value)  # unknown modifiers are ignored, but must parse
    except MacroSyntaxError as exc:
        raise SpfSyntaxError(f"{name}=: {exc}") from exc


def parse_directive(term: str) -> Directive:
    """One directive: qualifier, mechanism name, and its arguments."""
    qualifier = term[0] if term[0] in QUALIFIERS else "+"
    body = term[1:] if term[0] in QUALIFIERS else term
    name_match = _MECHANISM_NAME.match(body)
    name = name_match.group(0).lower() if name_match else ""
    if name not in MECHANISMS:
        raise SpfSyntaxError(f"unknown mechanism in {term!r}")
    rest = body[len(name):]
    try:
        return _ARGUMENTS[name](qualifier, name, term, rest)
    except MacroSyntaxError as exc:
        raise SpfSyntaxError(f"{term!r}: {exc}") from exc


def _no_argument(qualifier: str, name: str, term: str, rest: str) -> Directive:
    if rest:
        raise SpfSyntaxError(f"{name} takes no argument: {term!r}")
    return Directive(qualifier, name, term)


def _required_domain(qualifier: str, name: str, term: str, rest: str) -> Directive:
    if not rest.startswith(":"):
        raise SpfSyntaxError(f"{name} needs ':domain': {term!r}")
    return Directive(qualifier, name, term, parse_domain_spec(rest[1:]))


def _optional_domain(qualifier: str, name: str, term: str, rest: str) -> Directive:
    if not rest:
        return Directive(qualifier, name, term)
    return _required_domain(qualifier, name, term, rest)


def _domain_and_cidr(qualifier: str, name: str, term: str, rest: str) -> Directive:
    if rest.startswith(":"):
        found = _SPEC_AND_CIDR.match(rest[1:])
        assert found is not None  # the pattern matches every string
        target: MacroString | None = parse_domain_spec(found.group("spec"))
    else:
        found = _DUAL_CIDR.match(rest)
        if found is None:
            raise SpfSyntaxError(f"malformed CIDR length: {term!r}")
        target = None
    cidr4 = _cidr(found.group("v4"), 32, term)
    cidr6 = _cidr(found.group("v6"), 128, term)
    return Directive(qualifier, name, term, target, cidr4=cidr4, cidr6=cidr6)


def _cidr(text: str | None, maximum: int, term: str) -> int:
    if text is None:
        return maximum
    if int(text) > maximum:
        raise SpfSyntaxError(f"CIDR length above {maximum}: {term!r}")
    return int(text)


def _ip4(qualifier: str, name: str, term: str, rest: str) -> Directive:
    found = _IP4_NETWORK.match(rest[1:]) if rest.startswith(":") else None
    if found is None:
        raise SpfSyntaxError(f"malformed ip4 network: {term!r}")
    length = _cidr(found.group("len"), 32, term)
    network = ipaddress.IPv4Network((found.group("addr"), length), strict=False)
    return Directive(qualifier, name, term, network=network)


def _ip6(qualifier: str, name: str, term: str, rest: str) -> Directive:
    found = _IP6_NETWORK.match(rest[1:]) if rest.startswith(":") else None
    if found is None:
        raise SpfSyntaxError(f"malformed ip6 network: {term!r}")
    length = _cidr(found.group("len"), 128, term)
    try:
        network = ipaddress.IPv6Network((found.group("addr"), length), strict=False)
    except ValueError as exc:
        raise SpfSyntaxError(f"malformed ip6 network: {term!r}") from exc
    return Directive(qualifier, name, term, network=network)


_ARGUMENTS = {
    "all": _no_argument,
    "include": _required_domain,
    "exists": _required_domain,
    "ptr": _optional_domain,
    "a": _domain_and_cidr,
    "mx": _domain_and_cidr,
    "ip4": _ip4,
    "ip6": _ip6,
}


def parse_domain_spec(text: str) -> MacroString:
    """A domain-spec: a macro string ending in ``.toplabel`` or a macro (RFC 7208 §7.1)."""
    if not text:
        raise SpfSyntaxError("empty domain-spec")
    spec = parse_macro_string(text)
    if not spec.ends_with_expand and not _DOMAIN_END.search(spec.trailing_literal()):
        raise SpfSyntaxError(f"domain-spec {text!r} does not end in a valid top label")
    return spec


__all__ = [
    "DNS_MECHANISMS",
    "MECHANISMS",
    "Directive",
    "MultipleRecords",
    "SpfRecord",
    "SpfSyntaxError",
    "is_spf_record",
    "parse_directive",
    "parse_domain_spec",
    "parse_record",
    "select_record",
]
