"""Mailbox and path parsing for the SMTP envelope, IDNA domains, and xtext.

Takes: the text of a reverse-path or forward-path as the client sent it (``<...>`` or, for
clients that omit them, a bare mailbox), and whether SMTPUTF8 was negotiated.
Promises: a :class:`Mailbox` whose ``local`` and ``domain`` are exactly what the client
wrote (the envelope is stored as received) plus ``ascii_domain``, the lower-case A-label
form used for matching and routing; or :class:`AddressError` naming what is wrong and the
RFC 3463 status to answer with. Source routes (``@a,@b:user@c``) are accepted and ignored
(RFC 5321 §4.1.1.3, Appendix C), so routing only ever sees ``user@c``.
Failure policy: pure functions; every malformed input raises AddressError, nothing else.
Standards: RFC 5321 §4.1.2 (syntax), §4.5.3.1 (lengths); RFC 6531 (UTF-8 addresses);
RFC 5890-5893 via the ``idna`` package (IDNA2008); RFC 3461 §4 (xtext).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

import idna

MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256

_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_DOT_STRING_ASCII = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*\Z")
_DOT_STRING_UTF8 = re.compile(rf"[{_ATEXT}\u0080-\U0010ffff]+(?:\.[{_ATEXT}\u0080-\U0010ffff]+)*\Z")
_QUOTED_ASCII = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"\Z')
_QUOTED_UTF8 = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"\Z')
_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_AT_DOMAIN_LIST = re.compile(r"@[^,:@<>\s]+(?:,@[^,:@<>\s]+)*:")
_GENERAL_LITERAL = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+\Z")


class AddressError(ValueError):
    """A malformed address. ``status`` is the RFC 3463 detail (``X.1.7`` style, class-less)."""

    def __init__(self, reason: str, subject: str = "address", idna_failure: bool = False,
                 needs_utf8: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.subject = subject
        self.idna_failure = idna_failure
        self.needs_utf8 = needs_utf8


@dataclass(frozen=True, slots=True)
class Mailbox:
    """``local@domain`` as the client wrote it, and the domain in matching form.

    The one address without a domain is ``<Postmaster>`` (RFC 5321 §4.1.1.3): the
    postmaster of the receiving host; its ``domain`` and ``ascii_domain`` are empty.
    """

    local: str
    domain: str
    ascii_domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}" if self.domain else self.local

    @property
    def is_literal(self) -> bool:
        return self.domain.startswith("[")

    @property
    def needs_smtputf8(self) -> bool:
        return not str(self).isascii()


def split_path(argument: str) -> tuple[str, str]:
    """Split ``<path> params`` into the path text (brackets kept) and the rest.

    Handles ``>`` and spaces inside quoted local parts. A bare mailbox (no ``<``) runs
    to the first space.
    """
    text = argument.lstrip(" ")
    if not text:
        raise AddressError("Missing address")
    if not text.startswith("<"):
        head, _, rest = text.partition(" ")
        return head, rest
    in_quotes = escaped = False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\" and in_quotes:
            escaped = True
        elif char == '"':
            in_quotes = not in_quotes
        elif char == ">" and not in_quotes:
            return text[: index + 1], text[index + 1 :]
    raise AddressError("Missing '>' at the end of the address")


def parse_path(text: str, *, utf8: bool, allow_null: bool) -> Mailbox | None:
    """Parse a path (``<...>`` or a bare mailbox). ``<>`` gives None when allowed."""
    inner = text[1:-1] if text.startswith("<") and text.endswith(">") else text
    if inner == "":
        if allow_null:
            return None
        raise AddressError("The null address is not allowed here")
    if len(inner.encode("utf-8")) + 2 > MAX_PATH:  # the limit counts the brackets
        raise AddressError("Address too long")
    if not allow_null and inner.lower() == "postmaster":  # RFC 5321 §4.1.1.3, §4.5.1
        return Mailbox(inner, "", "")
    route = _AT_DOMAIN_LIST.match(inner)
    if route:
        inner = inner[route.end() :]
    return parse_mailbox(inner, utf8=utf8)


def parse_mailbox(text: str, *, utf8: bool) -> Mailbox:
    """Parse ``local@domain`` (RFC 5321 Mailbox, RFC 6531 when ``utf8``)."""
    if any(ord(c) < 0x20 or c == "\x7f" for c in text):
        raise AddressError("Control characters are not allowed in an address")
    if not utf8 and not text.isascii():
        raise AddressError("Non-ASCII address without SMTPUTF8", needs_utf8=True)
    at = text.rfind("@")
    if at <= 0:
        raise AddressError("Address must be of the form local-part@domain")
    local, domain = text[:at], text[at + 1 :]
    check_local_part(local, utf8=utf8)
    if domain.startswith("["):
        ascii_domain = check_address_literal(domain)
    else:
        ascii_domain = to_ascii_domain(domain)
    return Mailbox(local, domain, ascii_domain)


def check_local_part(local: str, *, utf8: bool) -> None:
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise AddressError("Local part too long")
    if local.startswith('"'):
        pattern = _QUOTED_UTF8 if utf8 else _QUOTED_ASCII
    else:
        pattern = _DOT_STRING_UTF8 if utf8 else _DOT_STRING_ASCII
    if not pattern.match(local):
        raise AddressError("Malformed local part")


def to_ascii_domain(domain: str) -> str:
    """The lower-case A-label form of a domain; IDNA2008-checked.

    Raises AddressError (``idna_failure`` set) for U-labels or A-labels that are not valid.
    """
    if not domain or len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise AddressError("Domain missing or too long")
    labels = domain.split(".")
    out: list[str] = []
    for label in labels:
        if label.isascii():
            lower = label.lower()
            if lower.startswith("xn--"):
                _check_idna(lower, decode=True)
            elif not _LDH_LABEL.match(label):
                raise AddressError("Malformed domain")
            out.append(lower)
        else:
            out.append(_check_idna(label, decode=False))
    return ".".join(out)


def _check_idna(label: str, *, decode: bool) -> str:
    try:
        if decode:
            idna.decode(label)
            return label
        return idna.encode(label, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError) as exc:
        raise AddressError("IDNA conversion failed", idna_failure=True) from exc


def check_address_literal(literal: str) -> str:
    """Validate ``[1.2.3.4]``, ``[IPv6:...]`` or ``[tag:content]``; return the normal form."""
    if not literal.endswith("]"):
        raise AddressError("Malformed address literal")
    body = literal[1:-1]
    try:
        if body[:5].lower() == "ipv6:":
            if "%" in body:
                raise ValueError("no zone identifier in an address literal")
            return f"[IPv6:{ipaddress.IPv6Address(body[5:]).compressed}]"
        if ":" not in body:
            return f"[{ipaddress.IPv4Address(body)}]"
    except ValueError as exc:
        raise AddressError("Malformed address literal") from exc
    if _GENERAL_LITERAL.match(body):
        return literal
    raise AddressError("Malformed address literal")


# --- xtext (RFC 3461 §4) -----------------------------------------------------------------

_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*\Z")
_XTEXT_ESCAPE = re.compile(r"\+([0-9A-F]{2})")


def is_xtext(text: str) -> bool:
    return bool(_XTEXT.match(text))


def xtext_decode(text: str) -> str:
    """Decode xtext; raises ValueError when ``text`` is not valid xtext."""
    if not is_xtext(text):
        raise ValueError("not valid xtext")
    raw = _XTEXT_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text)
    return raw


def xtext_encode(text: str) -> str:
    """Encode printable ASCII as xtext: ``+``, ``=`` and anything outside 33..126 escaped."""
    out = []
    for byte in text.encode("utf-8"):
        if 33 <= byte <= 126 and byte not in (0x2B, 0x3D):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)
