"""SMTP command lines and ESMTP parameters, parsed into typed values.

Takes: one command line (bytes, CRLF already removed) and, for MAIL/RCPT, the set of
extensions the session offered.
Promises: :func:`parse_command` gives ``(verb, argument)`` with the verb upper-cased;
:func:`parse_mail_params` / :func:`parse_rcpt_params` give frozen parameter records or
raise :class:`ParamError` carrying the exact reply (501 for a bad value, 555 for a
parameter that was not offered). Values are validated, and stored as the client sent
them (ENVID, ORCPT and AUTH stay xtext), so they can be passed on and reported unchanged.
Those three are written into header fields and DSNs later (``Delivered-To``,
``Original-Recipient``, ``Original-Envelope-Id``), so a value whose decoded form holds a
control character (CR, LF, NUL, any other C0 or C1 control, DEL), a Unicode line or
paragraph separator, or a lone surrogate is refused with ``501 5.5.4``: RFC 3461 §4.2
makes them printable text, and a decoded line break would let a client forge header
lines.
MAIL's AUTH= (``MailParams.auth``, ``<>`` or an xtext address) is only parsed here: the
session decides whether to trust it (tayori ignores it from unauthenticated clients).
Failure policy: pure functions; malformed input raises, never returns a partial value.
Standards: RFC 5321 §4.1.1, §4.1.2; RFC 1870 (SIZE); RFC 6152 (8BITMIME); RFC 3030
(BINARYMIME); RFC 3461 (DSN: RET, ENVID, NOTIFY, ORCPT); RFC 6531 (SMTPUTF8);
RFC 6533 (utf-8 ORCPT address type); RFC 4954 §5 (AUTH=).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from tayori.address import is_xtext, xtext_decode
from tayori.errors import Reply

MAX_ENVID = 100
MAX_ORCPT = 500
MAX_AUTH = 500
_UTF8_ADDR_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x5b\x5d-\x7e\u0080-\U0010ffff]"
                              r"|\\x\{[0-9A-F]{2,6}\})+\Z")
_UTF8_ESCAPE = re.compile(r"\\x\{([0-9A-F]{2,6})\}")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_UNPRINTABLE = frozenset({"Cc", "Cs", "Zl", "Zp"})
"""Unicode categories never allowed in a decoded ENVID, ORCPT or AUTH value: controls,
surrogates, line and paragraph separators."""


class ParamError(ValueError):
    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclass(frozen=True, slots=True)
class MailParams:
    """Parameters of MAIL FROM."""

    size: int | None = None
    body: str = "7BIT"
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None
    auth: str | None = None  # RFC 4954 §5, xtext as sent; "<>": the submitter is unknown


@dataclass(frozen=True, slots=True)
class RcptParams:
    """Parameters of RCPT TO. ``notify`` is None when the client gave no NOTIFY."""

    notify: tuple[str, ...] | None = None
    orcpt: str | None = None


def parse_command(line: bytes) -> tuple[str, str]:
    """Split a command line into (VERB, argument). Raises UnicodeDecodeError on bad UTF-8."""
    text = line.decode("utf-8")
    verb, _, argument = text.partition(" ")
    return verb.upper(), argument


def split_params(text: str) -> dict[str, str | None]:
    """``A=1 B`` -> {"A": "1", "B": None}; keywords upper-cased.

    A parameter repeated with the same value is taken once (Python's smtplib repeats
    SMTPUTF8, and Postfix accepts it); repeated with another value it is refused.
    """
    params: dict[str, str | None] = {}
    for item in text.split():
        key, eq, value = item.partition("=")
        if not _KEYWORD.match(key) or (eq and not value):
            raise ParamError(Reply(501, "5.5.4", f"Malformed parameter: {_printable(item)}"))
        key = key.upper()
        if key in params and params[key] != (value if eq else None):
            raise ParamError(Reply(501, "5.5.4", f"Conflicting values for parameter {key}"))
        params[key] = value if eq else None
    return params


def parse_mail_params(text: str, offered: frozenset[str], max_size: int) -> MailParams:
    params = split_params(text)
    _refuse_unoffered(params, offered, {"SIZE": "SIZE", "BODY": "8BITMIME", "SMTPUTF8": "SMTPUTF8",
                                        "RET": "DSN", "ENVID": "DSN", "AUTH": "AUTH"})
    size = None
    if "SIZE" in params:
        size = _size(params["SIZE"], max_size)
    body = "7BIT"
    if "BODY" in params:
        body = (params["BODY"] or "").upper()
        allowed = {"7BIT", "8BITMIME"} | ({"BINARYMIME"} if "BINARYMIME" in offered else set())
        if body not in allowed:
            choices = ", ".join(sorted(allowed))
            raise ParamError(Reply(501, "5.5.4", f"BODY must be one of {choices}"))
    if "SMTPUTF8" in params and params["SMTPUTF8"] is not None:
        raise ParamError(Reply(501, "5.5.4", "SMTPUTF8 takes no value"))
    ret = None
    if "RET" in params:
        ret = (params["RET"] or "").upper()
        if ret not in ("FULL", "HDRS"):
            raise ParamError(Reply(501, "5.5.4", "RET must be FULL or HDRS"))
    return MailParams(size=size, body=body, smtputf8="SMTPUTF8" in params, ret=ret,
                      envid=_xtext(params, "ENVID", MAX_ENVID),
                      auth=_xtext(params, "AUTH", MAX_AUTH))


def parse_rcpt_params(text: str, offered: frozenset[str], smtputf8: bool) -> RcptParams:
    params = split_params(text)
    _refuse_unoffered(params, offered, {"NOTIFY": "DSN", "ORCPT": "DSN"})
    notify = None
    if "NOTIFY" in params:
        notify = _notify(params["NOTIFY"] or "")
    orcpt = params.get("ORCPT")
    if "ORCPT" in params:
        _check_orcpt(orcpt or "", smtputf8)
    return RcptParams(notify=notify, orcpt=orcpt)


def _refuse_unoffered(params: dict[str, str | None], offered: frozenset[str],
                      needs: dict[str, str]) -> None:
    for key in params:
        extension = needs.get(key)
        if extension is None or extension not in offered:
            raise ParamError(Reply(555, "5.5.4", f"Unsupported parameter: {_printable(key)}"))


def _size(value: str | None, max_size: int) -> int:
    if not value or not (value.isascii() and value.isdigit()) or len(value) > 20:
        raise ParamError(Reply(501, "5.5.4", "SIZE must be a decimal number"))
    size = int(value)
    if max_size and size > max_size:
        raise ParamError(Reply(552, "5.3.4", "Message size exceeds fixed maximum message size"))
    return size


def _xtext(params: dict[str, str | None], key: str, limit: int) -> str | None:
    value = params.get(key)
    if key not in params:
        return None
    if not value or len(value) > limit or not is_xtext(value):
        raise ParamError(Reply(501, "5.5.4",
                               f"{key} must be xtext of at most {limit} characters"))
    _refuse_unprintable(key, _text_of(xtext_decode(value)))
    return value


def _refuse_unprintable(key: str, decoded: str) -> None:
    """501 when a decoded value holds a control character (or a line separator)."""
    if any(unicodedata.category(char) in _UNPRINTABLE for char in decoded):
        raise ParamError(Reply(501, "5.5.4", f"{key} must not contain control characters"))


def _text_of(decoded: str) -> str:
    """xtext decodes byte by byte (one character per byte): the text those bytes spell
    when they are UTF-8 (a non-ASCII address from Postfix: ``+C3+A4``); else only their
    ASCII part, where the controls that matter (CR, LF, NUL) would be."""
    raw = decoded.encode("latin-1")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("ascii", "ignore")


def _notify(value: str) -> tuple[str, ...]:
    items = tuple(item.upper() for item in value.split(","))
    if items == ("NEVER",):
        return items
    if items and len(set(items)) == len(items) and set(items) <= {"SUCCESS", "FAILURE", "DELAY"}:
        return items
    raise ParamError(Reply(501, "5.5.4",
                           "NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY"))


def _check_orcpt(value: str, smtputf8: bool) -> None:
    addr_type, sep, address = value.partition(";")
    kind = addr_type.lower()
    decoded = None
    if sep and address and len(value) <= MAX_ORCPT:
        if kind == "rfc822" and is_xtext(address):
            decoded = _text_of(xtext_decode(address))
        elif kind == "utf-8" and smtputf8 and _UTF8_ADDR_XTEXT.match(address):
            decoded = _utf8_addr_decode(address)
    if decoded is None:
        raise ParamError(Reply(501, "5.5.4",
                               "ORCPT must be rfc822;xtext (or utf-8;... with SMTPUTF8)"))
    _refuse_unprintable("ORCPT", decoded)


def _utf8_addr_decode(text: str) -> str | None:
    """RFC 6533 utf-8-addr-xtext with its ``\\x{HEX}`` escapes decoded; None when an
    escape names no code point."""
    try:
        return _UTF8_ESCAPE.sub(lambda match: chr(int(match.group(1), 16)), text)
    except ValueError:   # beyond U+10FFFF
        return None


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)[:64]
