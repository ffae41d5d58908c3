"""Header fields of a raw message, as DKIM and ARC read them.

Takes: a message as raw bytes with CRLF line endings (header block, empty line, body), as
tayori stores it; a bare LF is not a line ending here.
Promises: :func:`parse_message` splits the header into :class:`HeaderField` values that
keep each field's exact bytes (name, colon, value, folding, final CRLF), as simple
canonicalization needs them, and tells where the body begins. :func:`select_headers` picks
the instances an ``h=`` list names, the last unused instance first, ``None`` when none is
left (a "null" entry, which is how over-signing works). :func:`signed_header_names` makes
a signer's ``h=`` list from the names it wants signed and the names to over-sign.
Failure policy: pure functions that never raise on malformed input: a header line without
a colon (or with a malformed name) is kept as a field with an empty name, which no ``h=``
entry selects; a message without an empty line is all header, with an empty body.
Config keys: none.
Standards: RFC 5322 §2.2 (header fields, folding), RFC 6376 §5.4.2 (selecting instances).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

CRLF = b"\r\n"
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+\Z")  # RFC 5322 ftext: printable but ':'


@dataclass(frozen=True, slots=True)
class HeaderField:
    """One header field: ``raw`` is every byte of it, folding and final CRLF included.

    ``name`` is the field name as written (without whitespace before the colon), or
    ``b""`` for a line that is not a well-formed field. ``colon`` indexes the colon in
    ``raw`` (-1 when there is none).
    """

    name: bytes
    raw: bytes
    colon: int

    @property
    def key(self) -> str:
        """The lower-case field name, for matching (``""`` for a malformed line)."""
        return self.name.decode("ascii").lower()

    @property
    def value(self) -> bytes:
        """The raw value: after the colon, folding kept, without the final CRLF."""
        end = len(self.raw) - 2 if self.raw.endswith(CRLF) else len(self.raw)
        return self.raw[self.colon + 1 : end]

    def with_value(self, value: bytes) -> bytes:
        """The raw field with its value replaced (name and colon kept, CRLF appended)."""
        return self.raw[: self.colon + 1] + value + CRLF


@dataclass(frozen=True, slots=True)
class ParsedMessage:
    """The header fields in order, and the offset in the message where the body starts."""

    fields: tuple[HeaderField, ...]
    body_offset: int


def make_field(raw: bytes) -> HeaderField:
    """A :class:`HeaderField` from one field's raw bytes (folding and CRLF included)."""
    first_line = raw.split(CRLF, 1)[0]
    colon = first_line.find(b":")
    if colon < 0:
        return HeaderField(b"", raw, -1)
    name = raw[:colon].rstrip(b" \t")
    if not _FIELD_NAME.match(name):
        return HeaderField(b"", raw, colon)
    return HeaderField(name, raw, colon)


def parse_message(message: bytes) -> ParsedMessage:
    """Split ``message`` into header fields (kept byte for byte) and the body offset."""
    spans: list[list[int]] = []
    pos, size = 0, len(message)
    while pos < size:
        eol = message.find(CRLF, pos)
        end = size if eol < 0 else eol + 2
        if eol == pos:  # the empty line ending the header
            return ParsedMessage(_fields(message, spans), end)
        if spans and message[pos] in b" \t":
            spans[-1][1] = end  # a continuation line folds into the field above
        else:
            spans.append([pos, end])
        pos = end
    return ParsedMessage(_fields(message, spans), size)


def _fields(message: bytes, spans: list[list[int]]) -> tuple[HeaderField, ...]:
    return tuple(make_field(message[start:end]) for start, end in spans)


def select_headers(
    fields: Sequence[HeaderField], names: Iterable[str]
) -> list[HeaderField | None]:
    """The instances ``names`` (an ``h=`` list) select: for each name in order, the last
    instance not yet used, bottom up; ``None`` when the name has no instance left.
    """
    remaining: dict[str, list[HeaderField]] = {}
    for field in fields:
        if field.name:
            remaining.setdefault(field.key, []).append(field)
    chosen: list[HeaderField | None] = []
    for name in names:
        instances = remaining.get(name.lower())
        chosen.append(instances.pop() if instances else None)
    return chosen


def signed_header_names(
    fields: Sequence[HeaderField], headers: Iterable[str], oversign: Iterable[str]
) -> list[str]:
    """A signer's ``h=`` list: each name of ``headers`` once per instance present, then
    each name of ``oversign`` once more than it has instances, so that no instance can be
    added (or, for a name absent from ``headers``, removed) without breaking the signature.
    """
    counts: dict[str, int] = {}
    for field in fields:
        if field.name:
            counts[field.key] = counts.get(field.key, 0) + 1
    listed = [name.lower() for name in headers]
    names = [name for name in listed for _ in range(counts.get(name, 0))]
    for name in (name.lower() for name in oversign):
        extra = 1 if name in listed else counts.get(name, 0) + 1
        names.extend([name] * extra)
    return names


__all__ = [
    "HeaderField",
    "ParsedMessage",
    "make_field",
    "parse_message",
    "select_headers",
    "signed_header_names",
]
