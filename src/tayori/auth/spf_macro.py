"""SPF macro strings (RFC 7208 §7): their syntax, and their expansion from known values.

Takes: the text of a domain-spec, an unknown modifier's value or an explanation string
(ASCII; the record parser rejects anything else), and for expansion a
:class:`MacroValues` holding everything a macro letter may stand for.
Promises: :func:`parse_macro_string` returns a :class:`MacroString` (literal text and
macro expansions, in order) or raises :class:`MacroSyntaxError` for any syntax error,
including a ``%`` not followed by ``{``, ``%``, ``_`` or ``-``, an unknown macro letter,
a zero DIGIT transformer, and the letters ``c``, ``r``, ``t`` outside explanation text.
:func:`expand` is pure and synchronous: the caller resolves ``%{p}`` (a DNS question)
beforehand, only when :meth:`MacroString.uses` says the letter occurs. Expansion stops
with :class:`MacroTooLong` past :data:`MAX_EXPANSION` characters, so a hostile record
made of thousands of ``%{s}`` costs nothing; :func:`domain_name` turns an expansion into
a name to query (one trailing dot dropped, left labels removed down to 253 characters,
RFC 7208 §7.3) or None when no DNS name can be made of it.
Deviation: ``%{i}`` of an IPv6 address writes its nibbles in upper case. RFC 7208 §7.4
shows lower case in an example; DNS does not care, and the openspf suite's explanation
texts (``v-macro-ip6``) expect upper case.
Failure policy: pure functions; malformed input raises MacroSyntaxError (a ValueError).
Config keys: none.
Standards: RFC 7208 §7 (macros), RFC 3986 §2.3 (unreserved characters for the
URL-escaping of upper-case macro letters).
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from dataclasses import dataclass

MACRO_LETTERS = frozenset("slodiphcrtv")
"""The letters RFC 7208 §7.2 defines."""
EXPLANATION_ONLY_LETTERS = frozenset("crt")
"""Letters allowed only in an explanation string (RFC 7208 §7.2)."""
DELIMITERS = frozenset(".-+,/_=")
MAX_EXPANSION = 8192
"""Characters an expansion may reach; a domain name needs 253, an explanation far less."""
MAX_DOMAIN_NAME = 253
MAX_LABEL = 63
_MAX_PARTS = 128  # a DIGIT transformer above this keeps every part anyway
_ESCAPES = {"%": "%", "_": " ", "-": "%20"}


class MacroSyntaxError(ValueError):
    """A macro string breaks the RFC 7208 §7.1 grammar."""


class MacroTooLong(ValueError):
    """An expansion would exceed :data:`MAX_EXPANSION` characters."""


@dataclass(frozen=True, slots=True)
class MacroExpand:
    """One ``%{...}``: the letter (lower case), URL-escaping, DIGIT, reversal, delimiters."""

    letter: str
    url_escape: bool
    keep: int | None
    reverse: bool
    delimiters: str


Piece = str | MacroExpand


@dataclass(frozen=True, slots=True)
class MacroString:
    """A parsed macro string; ``ends_with_expand`` serves the domain-end rule (§7.1)."""

    pieces: tuple[Piece, ...]
    ends_with_expand: bool

    def uses(self, letter: str) -> bool:
        return any(isinstance(piece, MacroExpand) and piece.letter == letter
                   for piece in self.pieces)

    def trailing_literal(self) -> str:
        """The literal text after the last macro expansion (all of it when there is none)."""
        tail: list[str] = []
        for piece in reversed(self.pieces):
            if isinstance(piece, MacroExpand):
                break
            tail.append(piece)
        return "".join(reversed(tail))


@dataclass(frozen=True, slots=True)
class MacroValues:
    """What each letter expands to; ``validated_name`` is ``%{p}`` (None: "unknown")."""

    sender: str
    local_part: str
    sender_domain: str
    domain: str
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    helo: str
    receiver: str
    timestamp: int
    validated_name: str | None = None


def parse_macro_string(text: str, *, explanation: bool = False) -> MacroString:
    """Parse ``text``; ``explanation`` admits spaces and the letters c, r, t."""
    pieces: list[Piece] = []
    literal: list[str] = []
    ends_with_expand = False
    position = 0
    while position < len(text):
        char = text[position]
        if char != "%":
            _check_literal(char, explanation)
            literal.append(char)
            position += 1
            ends_with_expand = False
            continue
        following = text[position + 1 : position + 2]
        if following in _ESCAPES:
            literal.append(_ESCAPES[following])
            position += 2
        elif following == "{":
            close = text.find("}", position)
            if close < 0:
                raise MacroSyntaxError("unterminated macro expansion")
            if literal:
                pieces.append("".join(literal))
                literal = []
            pieces.append(_parse_expand(text[position + 2 : close], explanation))
            position = close + 1
        else:
            raise MacroSyntaxError(f"'%' followed by {following or 'nothing'!r}")
        ends_with_expand = True
    if literal:
        pieces.append("".join(literal))
    return MacroString(tuple(pieces), ends_with_expand)


def _check_literal(char: str, explanation: bool) -> None:
    if "\x21" <= char <= "\x7e" or (explanation and char == " "):
        return
    raise MacroSyntaxError(f"character {char!r} not allowed in a macro string")


def _parse_expand(body: str, explanation: bool) -> MacroExpand:
    """The inside of ``%{...}``: letter, *DIGIT, optional ``r``, *delimiter."""
    if not body or body[0].lower() not in MACRO_LETTERS:
        raise MacroSyntaxError(f"unknown macro letter in %{{{body}}}")
    letter = body[0].lower()
    if letter in EXPLANATION_ONLY_LETTERS and not explanation:
        raise MacroSyntaxError(f"%{{{letter}}} is allowed in explanation text only")
    rest = body[1:]
    digits = len(rest) - len(rest.lstrip("0123456789"))
    keep = _keep(rest[:digits]) if digits else None
    rest = rest[digits:]
    reverse = rest[:1].lower() == "r"
    delimiters = rest[1:] if reverse else rest
    if any(char not in DELIMITERS for char in delimiters):
        raise MacroSyntaxError(f"bad transformer or delimiter in %{{{body}}}")
    return MacroExpand(letter, body[0].isupper(), keep, reverse, delimiters or ".")


def _keep(digits: str) -> int:
    value = digits.lstrip("0")
    if not value:
        raise MacroSyntaxError("a DIGIT transformer must not be zero")
    return _MAX_PARTS if len(value) > 3 else min(int(value), _MAX_PARTS)


def expand(macro: MacroString, values: MacroValues) -> str:
    """The expansion of ``macro``; raises MacroTooLong past MAX_EXPANSION characters."""
    out: list[str] = []
    size = 0
    for piece in macro.pieces:
        text = piece if isinstance(piece, str) else _expand_one(piece, values)
        size += len(text)
        if size > MAX_EXPANSION:
            raise MacroTooLong(f"macro expansion longer than {MAX_EXPANSION} characters")
        out.append(text)
    return "".join(out)


def _expand_one(macro: MacroExpand, values: MacroValues) -> str:
    value = letter_value(macro.letter, values)
    parts = _split(value, macro.delimiters)
    if macro.reverse:
        parts.reverse()
    if macro.keep is not None:
        parts = parts[-macro.keep :]
    text = ".".join(parts)
    return urllib.parse.quote(text, safe="") if macro.url_escape else text


def _split(value: str, delimiters: str) -> list[str]:
    parts = [""]
    for char in value:
        if char in delimiters:
            parts.append("")
        else:
            parts[-1] += char
    return parts


def letter_value(letter: str, values: MacroValues) -> str:
    """What one macro letter stands for, before transformers (RFC 7208 §7.3)."""
    ip = values.ip
    match letter:
        case "s":
            return values.sender
        case "l":
            return values.local_part
        case "o":
            return values.sender_domain
        case "d":
            return values.domain
        case "i":
            return dotted_address(ip)
        case "p":
            return values.validated_name or "unknown"
        case "v":
            return "in-addr" if ip.version == 4 else "ip6"
        case "h":
            return values.helo
        case "c":
            return str(ip)
        case "r":
            return values.receiver or "unknown"
        case "t":
            return str(values.timestamp)
    raise MacroSyntaxError(f"unknown macro letter {letter!r}")


def dotted_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """``%{i}``: dotted quad for IPv4, 32 dot-separated nibbles for IPv6."""
    if ip.version == 4:
        return str(ip)
    return ".".join(ip.exploded.replace(":", "").upper())


def domain_name(expanded: str) -> str | None:
    """The DNS name to query for an expanded domain-spec, or None when it cannot be one.

    One trailing dot is dropped; labels are removed from the left until 253 characters
    remain (RFC 7208 §7.3); then every label must be 1-63 printable ASCII characters.
    The result is lower case, as :mod:`tayori.dns` expects.
    """
    name = expanded[:-1] if expanded.endswith(".") else expanded
    labels = name.split(".")
    while labels and len(".".join(labels)) > MAX_DOMAIN_NAME:
        labels.pop(0)
    if not labels or not all(_valid_label(label) for label in labels):
        return None
    return ".".join(labels).lower()


def _valid_label(label: str) -> bool:
    return 0 < len(label) <= MAX_LABEL and label.isascii() and label.isprintable()


__all__ = [
    "DELIMITERS",
    "EXPLANATION_ONLY_LETTERS",
    "MACRO_LETTERS",
    "MAX_EXPANSION",
    "MacroExpand",
    "MacroString",
    "MacroSyntaxError",
    "MacroTooLong",
    "MacroValues",
    "domain_name",
    "dotted_address",
    "expand",
    "letter_value",
    "parse_macro_string",
]
