"""Authentication-Results header fields (RFC 8601): write ours, read any, strip forgeries.

Takes: method results as plain values (:class:`MethodResult`: method, result, reason,
properties, comment), tayori's authserv-id (config ``auth.authserv_id``, by default the
host name), and raw header blocks of messages (bytes, CRLF line ends, as received).
Promises:
- :func:`authentication_results` renders one field, ``Authentication-Results:`` (or
  ``ARC-Authentication-Results:`` with an instance), folded: each method result on its
  own continuation line, long ones folded between properties, no line over 78 characters
  unless one word is longer. Values are written as RFC 2045 tokens, as
  ``local-part@domain`` where RFC 8601 §2.2 allows it, or else as quoted strings; CR and
  LF in any input become spaces, so no input can add a header line. ``none`` when there
  are no results.
- :func:`parse` reads a field value back into :class:`AuthResults` (authserv-id,
  version, method results with their comment, reason and properties), tolerant of
  comments and folding anywhere RFC 8601 allows CFWS, and of two common deviations
  (a property without a ptype, an empty property value); :func:`parse_arc` reads an
  ARC-Authentication-Results value (``i=N;`` first).
- :func:`strip_forged` removes, from a raw header block, every Authentication-Results
  field whose authserv-id equals ours, compared case-insensitively, without
  surrounding blanks or a trailing dot (RFC 8601 §5): a field claiming our id did not
  come from us. The id is read twice, and either reading matching ours removes the
  field: as RFC 8601 has it (a token or a quoted string), and leniently, as a sloppier
  reader downstream might: the text up to the first ``;``, whitespace or comment, with
  quotes and backslashes dropped (so ``"mx.example; dkim=pass`` with its quote never
  closed, or ``mx.example\\;``, is removed too). Every other byte is kept as it was,
  including the body or blank line after the header, if given.
Failure policy: :func:`parse` raises :class:`ResultsSyntaxError` (a ValueError) on a
value it cannot read; :func:`strip_forged` never raises: a field whose authserv-id no
reading makes ours is kept (it claims nothing we can match).
Config keys: ``auth.authserv_id`` (the caller hands it in).
Standards: RFC 8601 (the field, §5 removal of forged fields), RFC 6008 (header.b),
RFC 8617 §4.1.2 (ARC-Authentication-Results), RFC 2045 §5.1 (token), RFC 5322 §2.2.3
(folding), RFC 7601/8601 IANA method registry names (spf, dkim, dmarc, arc, iprev, auth).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

FIELD_NAME = "Authentication-Results"
ARC_FIELD_NAME = "ARC-Authentication-Results"
LINE_LIMIT = 78
"""Fold so that no line is longer than this (RFC 5322 §2.1.1 SHOULD)."""
HEADER_B_LENGTH = 8
"""Characters of a DKIM signature written as ``header.b`` (RFC 6008 §4: at least 8)."""

_TSPECIALS = frozenset('()<>@,;:\\"/[]?=')
_WSP = " \t\r\n"
_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\u0080-\U0010ffff"
_ADDRESS = re.compile(rf"(?:[{_ATEXT}]+(?:\.[{_ATEXT}]+)*)?@[A-Za-z0-9\u0080-\U0010ffff.-]+\Z")
_KEYWORD = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\Z")
_LENIENT_ID = re.compile(r"[^;\s(]*")


class ResultsSyntaxError(ValueError):
    """An Authentication-Results value that does not follow RFC 8601 §2.2."""


@dataclass(frozen=True, slots=True)
class MethodResult:
    """One ``method=result`` of an Authentication-Results field.

    ``properties`` are ``(ptype.property, value)`` pairs in order, e.g.
    ``("header.d", "example.com")``; ``reason`` is written as ``reason="..."``;
    ``comment`` as a parenthesised comment after the result. ``version`` is the
    method version (``dkim/1``), rarely written.
    """

    method: str
    result: str
    reason: str = ""
    properties: tuple[tuple[str, str], ...] = ()
    comment: str = ""
    version: int | None = None

    def get(self, name: str) -> str | None:
        """The first value of property ``name`` (``header.d``), case-insensitive."""
        wanted = name.lower()
        return next((value for key, value in self.properties if key.lower() == wanted), None)


@dataclass(frozen=True, slots=True)
class AuthResults:
    """A parsed field: who wrote it, and what it says."""

    authserv_id: str
    results: tuple[MethodResult, ...]
    version: int | None = None

    def find(self, method: str) -> list[MethodResult]:
        """The results of ``method`` (case-insensitive), in field order."""
        return [r for r in self.results if r.method.lower() == method.lower()]


# --- convenience constructors ---------------------------------------------------------------

def _props(*pairs: tuple[str, str | None]) -> tuple[tuple[str, str], ...]:
    return tuple((key, value) for key, value in pairs if value)


def spf_result(result: str, *, mailfrom: str | None = None, helo: str | None = None,
               reason: str = "") -> MethodResult:
    """``spf=<result> smtp.mailfrom=... smtp.helo=...`` (RFC 8601 §2.7.2)."""
    return MethodResult("spf", result, reason,
                        _props(("smtp.mailfrom", mailfrom), ("smtp.helo", helo)))


def dkim_result(result: str, *, domain: str | None = None, selector: str | None = None,
                signature: str | None = None, identity: str | None = None,
                reason: str = "") -> MethodResult:
    """``dkim=<result> header.d= header.i= header.s= header.b=`` (RFC 8601 §2.7.1).

    ``signature`` is the b= value; its first :data:`HEADER_B_LENGTH` characters
    (whitespace removed) are written (RFC 6008).
    """
    short = "".join(signature.split())[:HEADER_B_LENGTH] if signature else None
    return MethodResult("dkim", result, reason,
                        _props(("header.d", domain), ("header.i", identity),
                               ("header.s", selector), ("header.b", short)))


def iprev_result(result: str, *, address: str, name: str | None = None,
                 reason: str = "") -> MethodResult:
    """``iprev=<result> policy.iprev=<address>`` (RFC 8601 §3), the name as a comment."""
    return MethodResult("iprev", result, reason, _props(("policy.iprev", address)),
                        comment=name or "")


def auth_result(result: str, *, user: str | None = None, mailfrom: str | None = None,
                reason: str = "") -> MethodResult:
    """``auth=<result> smtp.auth=<user>`` for SMTP AUTH (RFC 8601 §2.7.4)."""
    return MethodResult("auth", result, reason,
                        _props(("smtp.auth", user), ("smtp.mailfrom", mailfrom)))


def arc_result(result: str, *, remote_ip: str | None = None, oldest_pass: int | None = None,
               reason: str = "") -> MethodResult:
    """``arc=<result> smtp.remote-ip= header.oldest-pass=`` (RFC 8617 §10.2)."""
    oldest = str(oldest_pass) if oldest_pass is not None else None
    return MethodResult("arc", result, reason,
                        _props(("smtp.remote-ip", remote_ip), ("header.oldest-pass", oldest)))


# --- writing --------------------------------------------------------------------------------

def _clean(text: str) -> str:
    """Text with CR, LF and other controls turned into spaces: nothing can start a line."""
    return "".join(" " if ord(ch) < 32 or ch == "\x7f" else ch for ch in text)


def _is_token(text: str) -> bool:
    return bool(text) and not any(ch in _TSPECIALS or ch <= " " or ch == "\x7f" for ch in text)


def _quoted(text: str) -> str:
    escaped = _clean(text).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _value(text: str) -> str:
    """RFC 8601 ``value``: a token, or a quoted string."""
    text = _clean(text)
    return text if _is_token(text) else _quoted(text)


def _pvalue(text: str) -> str:
    """RFC 8601 ``pvalue``: a value, or ``[local-part]@domain`` written bare."""
    text = _clean(text)
    if _is_token(text) or _ADDRESS.match(text):
        return text
    return _quoted(text)


def _comment(text: str) -> str:
    escaped = re.sub(r"([()\\])", r"\\\1", _clean(text))
    return f"({escaped})"


def _check_name(name: str, what: str, parts_wanted: int = 1) -> str:
    parts = name.split(".")
    if len(parts) != parts_wanted or not all(_KEYWORD.match(part) for part in parts):
        raise ValueError(f"not an RFC 8601 {what}: {name!r}")
    return name


def _words(result: MethodResult) -> list[str]:
    """The words of one resinfo, each kept whole when folding."""
    method = _check_name(result.method, "method")
    if result.version is not None:
        method = f"{method}/{result.version}"
    words = [f"{method}={_check_name(result.result, 'result')}"]
    if result.comment:
        words.append(_comment(result.comment))
    if result.reason:
        words.append(f"reason={_quoted(result.reason)}")
    for key, value in result.properties:
        words.append(f"{_check_name(key, 'property', 2)}={_pvalue(value)}")
    return words


def _fold(words: Sequence[str]) -> list[str]:
    """Pack ``words`` into continuation lines: the first indented by a tab, the rest by a
    tab and two spaces, so a folded result stays visibly one result."""
    lines: list[str] = []
    current = "\t"
    for word in words:
        if current.strip() and len(current) + 1 + len(word) > LINE_LIMIT - 1:  # room for ";"
            lines.append(current)
            current = "\t  " + word
        else:
            current = f"{current} {word}" if current.strip() else current + word
    lines.append(current)
    return lines


def authentication_results(authserv_id: str, results: Iterable[MethodResult], *,
                           instance: int | None = None) -> bytes:
    """The whole header field, folded, ending in CRLF, ready to prepend to a message.

    With ``instance`` it is an ARC-Authentication-Results field (``i=<instance>;`` first).
    Raises ValueError for a method, result or property name that is not a keyword.
    """
    name = FIELD_NAME if instance is None else ARC_FIELD_NAME
    head = f"{name}: " + ("" if instance is None else f"i={instance}; ") + _value(authserv_id)
    blocks = [_fold(_words(result)) for result in results]
    if not blocks:
        return f"{head}; none\r\n".encode()
    lines = [head + ";"]
    for index, block in enumerate(blocks):
        if index < len(blocks) - 1:
            block[-1] += ";"
        lines.extend(block)
    return ("\r\n".join(lines) + "\r\n").encode()


# --- reading --------------------------------------------------------------------------------

class _Reader:
    """A cursor over a field value with RFC 5322 CFWS skipping; comments are kept."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.comments: list[str] = []

    def at_end(self) -> bool:
        self.skip()
        return self.pos >= len(self.text)

    def peek(self) -> str:
        self.skip()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise ResultsSyntaxError(f"expected {char!r} at offset {self.pos}")
        self.pos += 1

    def skip(self) -> None:
        """Skip whitespace and comments, remembering each comment's text."""
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char in _WSP:
                self.pos += 1
            elif char == "(":
                self.comments.append(self._comment())
            else:
                return

    def _take(self) -> tuple[str, bool]:
        """The next character, and whether it came as a quoted-pair (``\\`` and the
        character: RFC 5322 §3.2.1, in comments and quoted strings alike)."""
        char = self.text[self.pos]
        self.pos += 1
        if char == "\\" and self.pos < len(self.text):
            self.pos += 1
            return self.text[self.pos - 1], True
        return char, False

    def _comment(self) -> str:
        depth, out = 0, []
        while self.pos < len(self.text):
            char, escaped = self._take()
            if escaped:
                out.append(char)
                continue
            if char == "(":
                depth += 1
                if depth == 1:
                    continue
            elif char == ")":
                depth -= 1
                if depth == 0:
                    return "".join(out).strip()
            out.append(char)
        raise ResultsSyntaxError("unterminated comment")

    def quoted(self) -> str:
        self.pos += 1  # the opening quote
        out = []
        while self.pos < len(self.text):
            char, escaped = self._take()
            if escaped:
                out.append(char)
            elif char == '"':
                return "".join(out)
            elif char not in "\r\n":
                out.append(char)
        raise ResultsSyntaxError("unterminated quoted string")

    def run(self, stop: str) -> str:
        """Characters up to whitespace, a comment, a quote, or one of ``stop``."""
        start = self.pos
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char in _WSP or char in '("' or char in stop:
                break
            self.pos += 1
        return self.text[start : self.pos]

    def value(self, stop: str = ";") -> str:
        """A token or a quoted string; leniently, any run of non-special characters."""
        if self.peek() == '"':
            return self.quoted()
        word = self.run(stop)
        if not word:
            raise ResultsSyntaxError(f"expected a value at offset {self.pos}")
        return word

    def keyword(self) -> str:
        self.skip()
        word = self.run(";=./")
        if not _KEYWORD.match(word):
            raise ResultsSyntaxError(f"expected a keyword at offset {self.pos}")
        return word

    def pvalue(self) -> str:
        """A property value: quoted string (maybe ``"local"@domain``), a bare run, or
        (leniently) nothing before the ``;``."""
        if self.peek() in ("", ";"):
            return ""
        if self.peek() == '"':
            text = self.quoted()
            if self.pos < len(self.text) and self.text[self.pos] == "@":
                text += self.run(";")
            return text
        return self.value()


def _resinfo(reader: _Reader) -> MethodResult:
    reader.comments = []
    method = reader.keyword()
    version: int | None = None
    if reader.peek() == "/":
        reader.pos += 1
        reader.skip()
        digits = reader.run(";=")
        if not digits.isdigit():
            raise ResultsSyntaxError(f"bad method version for {method}")
        version = int(digits)
    reader.expect("=")
    result = reader.keyword()
    reason, properties = "", []
    while reader.peek() not in ("", ";"):
        name = reader.keyword()
        if name.lower() == "reason" and reader.peek() == "=":
            reader.expect("=")
            reason = reader.value()
            continue
        if reader.peek() == ".":  # without a ptype (seen in the wild), the bare name
            reader.expect(".")
            name = f"{name}.{reader.keyword()}"
        reader.expect("=")
        properties.append((name, reader.pvalue()))
    comment = " ".join(reader.comments)
    return MethodResult(method, result, reason, tuple(properties), comment, version)


def _version(reader: _Reader) -> int | None:
    if reader.peek().isdigit():
        digits = reader.run(";")
        if not digits.isdigit():
            raise ResultsSyntaxError("bad authres-version")
        return int(digits)
    return None


def _body(reader: _Reader) -> AuthResults:
    if reader.at_end():
        raise ResultsSyntaxError("empty Authentication-Results")
    authserv_id = reader.value()
    version = _version(reader)
    reader.expect(";")
    results: list[MethodResult] = []
    first = True
    while not reader.at_end():
        if not first:
            reader.expect(";")
            if reader.at_end():  # a trailing ";" is tolerated
                break
        first = False
        start = reader.pos
        if reader.keyword().lower() == "none" and reader.peek() in ("", ";"):
            continue
        reader.pos = start
        results.append(_resinfo(reader))
    return AuthResults(authserv_id, tuple(results), version)


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def parse(value: str | bytes) -> AuthResults:
    """Read an Authentication-Results field value (the part after the colon)."""
    return _body(_Reader(_text(value)))


def parse_arc(value: str | bytes) -> tuple[int, AuthResults]:
    """Read an ARC-Authentication-Results value: ``(instance, results)``."""
    reader = _Reader(_text(value))
    if reader.keyword().lower() != "i":
        raise ResultsSyntaxError("ARC-Authentication-Results must start with i=")
    reader.expect("=")
    reader.skip()
    digits = reader.run(";")
    if not digits.isdigit():
        raise ResultsSyntaxError("bad ARC instance")
    reader.expect(";")
    return int(digits), _body(reader)


def authserv_id_of(value: str | bytes) -> str | None:
    """The authserv-id a field value claims, or None when it cannot be read."""
    reader = _Reader(_text(value))
    try:
        return None if reader.at_end() else reader.value()
    except ResultsSyntaxError:
        return None


# --- header blocks --------------------------------------------------------------------------

def header_fields(data: bytes) -> tuple[list[bytes], bytes]:
    """Split raw header bytes into fields (each with its continuation lines and line
    ends, byte for byte) and the rest: the blank line and body, or ``b""``.

    A line that starts with whitespace continues the field before it; one at the very
    start is kept as a field of its own (malformed, but kept).
    """
    fields: list[bytes] = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        end = len(data) if end < 0 else end + 1
        line = data[pos:end]
        if line in (b"\r\n", b"\n"):
            return fields, data[pos:]
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
        pos = end
    return fields, b""


def field_name(field: bytes) -> bytes:
    """The lower-case name of a raw field (obsolete space before the colon allowed)."""
    colon = field.find(b":")
    return field[:colon].rstrip(b" \t").lower() if colon > 0 else b""


def field_value(field: bytes) -> bytes:
    """The raw value of a field, after the colon, with its folding and line end."""
    return field[field.find(b":") + 1 :]


def _id_key(authserv_id: str) -> str:
    return authserv_id.strip().rstrip(".").lower()


def _lenient_id(value: str) -> str:
    """The authserv-id as a lax reader may see it: after any leading CFWS, the text up
    to a ``;``, whitespace or comment, without quotes and backslashes."""
    reader = _Reader(value)
    with contextlib.suppress(ResultsSyntaxError):   # an unclosed comment: read on from there
        reader.skip()
    match = _LENIENT_ID.match(value, reader.pos)
    word = match.group() if match else ""
    return word.replace('"', "").replace("\\", "")


def claimed_ids(value: str | bytes) -> set[str]:
    """The authserv-ids a field value may be read as claiming (compared forms: lower
    case, no trailing dot): the RFC 8601 reading, when there is one, and the lenient
    one."""
    text = _text(value)
    strict = authserv_id_of(text)
    return {_id_key(claimed) for claimed in (strict, _lenient_id(text)) if claimed}


def strip_forged(data: bytes, authserv_id: str | Iterable[str]) -> bytes:
    """``data`` without the Authentication-Results fields that claim ``authserv_id``
    (or any of several ids, for an ADMD whose hosts each write their own), by either
    reading of :func:`claimed_ids`."""
    ours = {_id_key(i) for i in ([authserv_id] if isinstance(authserv_id, str)
                                 else authserv_id)}
    fields, rest = header_fields(data)
    name = FIELD_NAME.lower().encode()
    kept = [field for field in fields
            if field_name(field) != name or ours.isdisjoint(claimed_ids(field_value(field)))]
    return b"".join(kept) + rest


__all__ = [
    "ARC_FIELD_NAME",
    "FIELD_NAME",
    "AuthResults",
    "MethodResult",
    "ResultsSyntaxError",
    "arc_result",
    "auth_result",
    "authentication_results",
    "authserv_id_of",
    "claimed_ids",
    "dkim_result",
    "field_name",
    "field_value",
    "header_fields",
    "iprev_result",
    "parse",
    "parse_arc",
    "spf_result",
    "strip_forged",
]
