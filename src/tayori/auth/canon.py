"""DKIM canonicalization of header fields and bodies, shared by DKIM and ARC.

Takes: a header field's raw bytes (folding and CRLF included), or a raw message and the
offset of its body; a mode, ``"simple"`` or ``"relaxed"``; for bodies, a hash name
(``"sha256"``, ``"sha1"``) and an optional length limit (DKIM's ``l=``).
Promises: :func:`canonical_header` returns the field as the signature hashes it;
:func:`header_hash_input` the whole header part a signature covers.
:func:`body_hash` hashes the canonical body without ever copying it whole: the body is
read in chunks that end on a line boundary (:data:`CHUNK` octets or so), each chunk is
canonicalized on its own and fed to the hash, and trailing empty lines are held back
until a non-empty line shows they were not trailing. Time is linear in the body size and
memory bounded by the chunk size (a single line longer than a chunk is one chunk).
A body whose last line lacks its CRLF is hashed as if it had one.
Failure policy: pure functions; no input makes them raise (an unknown mode or hash name is
a caller's bug: ValueError).
Config keys: none.
Standards: RFC 6376 §3.4 (canonicalization, with errata 3192: a relaxed empty body is
empty), §3.5 ``l=``; RFC 8617 §5.1.1 (ARC uses the same algorithms).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from tayori.auth.headers import CRLF, HeaderField, select_headers

Mode = Literal["simple", "relaxed"]
MODES: tuple[Mode, ...] = ("simple", "relaxed")
HashName = Literal["sha256", "sha1"]
CHUNK = 1 << 16
"""Body octets canonicalized and hashed at a time (then up to the next line end)."""

_WSP_RUN = re.compile(rb"[ \t]+")
_WSP_TO_REDUCE = re.compile(rb"(?: [ \t]|\t)[ \t]*")  # every WSP run but a lone SP


def canonical_header(raw: bytes, mode: Mode) -> bytes:
    """One header field, canonicalized; the result ends with CRLF as the input does."""
    if mode == "simple":
        return raw
    if mode == "relaxed":
        return relaxed_header(raw)
    raise ValueError(f"unknown canonicalization {mode!r}")


def relaxed_header(raw: bytes) -> bytes:
    """RFC 6376 §3.4.2: lower-case name, unfolded value, one SP per WSP run, no WSP
    around the colon or at the end of the value.
    """
    name, _, value = raw.partition(b":")
    value = _WSP_RUN.sub(b" ", value.replace(CRLF, b"")).strip(b" ")
    return name.rstrip(b" \t").lower() + b":" + value + CRLF


def header_hash_input(
    fields: Sequence[HeaderField], names: Iterable[str], signature_field: bytes, mode: Mode
) -> bytes:
    """The header part of what a DKIM (or ARC-Message-Signature) signature signs: the
    fields ``names`` selects (:func:`select_headers`), canonicalized, then the signature
    field itself, its ``b=`` already blanked, canonicalized, without its final CRLF.
    """
    parts = [canonical_header(field.raw, mode)
             for field in select_headers(fields, names) if field is not None]
    own = canonical_header(signature_field, mode)
    parts.append(own[:-2] if own.endswith(CRLF) else own)
    return b"".join(parts)


def canonical_body_chunk(data: bytes | memoryview, mode: Mode) -> bytes | memoryview:
    """Whole lines of a body, canonicalized (trailing empty lines are not handled here)."""
    if mode == "simple":
        return data
    if mode == "relaxed":
        return _WSP_TO_REDUCE.sub(b" ", data).replace(b" \r\n", CRLF)
    raise ValueError(f"unknown canonicalization {mode!r}")


@dataclass(frozen=True, slots=True)
class BodyHash:
    """A canonical body's digest, and its canonical length.

    With a limit, ``digest`` covers the first ``limit`` octets only and ``length`` stops
    counting once it reaches the limit; ``length < limit`` means the body was shorter.
    """

    digest: bytes
    length: int


def body_hash(
    message: bytes,
    offset: int,
    mode: Mode,
    hash_name: HashName,
    limit: int | None = None,
    *,
    chunk: int = CHUNK,
) -> BodyHash:
    """Hash the canonical form of the body ``message[offset:]``."""
    writer = _BodyWriter(hashlib.new(hash_name), limit)
    for lines in _line_chunks(message, offset, chunk):
        writer.lines(canonical_body_chunk(lines, mode))
        if writer.full:
            break
    return writer.finish(mode)


def _line_chunks(message: bytes, offset: int, chunk: int) -> Iterator[bytes | memoryview]:
    """The body in pieces of whole lines, each ending with CRLF (one added to the last
    line if it lacks it); memoryviews of ``message`` where no CRLF had to be added.
    """
    view = memoryview(message)
    pos, size = offset, len(message)
    while pos < size:
        target = pos + max(chunk, 2)
        eol = message.find(CRLF, target - 1) if target < size else -1
        end = size if eol < 0 else eol + 2
        if end == size and (end - pos < 2 or not message.endswith(CRLF)):  # a CRLF of the body
            yield bytes(view[pos:end]) + CRLF
        else:
            yield view[pos:end]
        pos = end


class _BodyWriter:
    """Feeds canonical lines to the hash, holding back empty lines until content follows."""

    def __init__(self, hasher: hashlib._Hash, limit: int | None) -> None:
        self._hasher = hasher
        self._limit = limit
        self._held = 0  # empty lines seen after the last non-empty one
        self.length = 0

    @property
    def full(self) -> bool:
        return self._limit is not None and self.length >= self._limit

    def lines(self, data: bytes | memoryview) -> None:
        """Take whole canonical lines (``data`` ends with CRLF)."""
        start = crlf_run_start(data)
        pairs = (len(data) - start) // 2
        if start == 0:
            self._held += pairs
            return
        if self._held:
            self._write(CRLF * self._held)
        self._write(data[: start + 2])
        self._held = pairs - 1

    def finish(self, mode: Mode) -> BodyHash:
        if self.length == 0 and mode == "simple":
            self._write(CRLF)  # simple: an empty body is one CRLF; relaxed: nothing
        return BodyHash(self._hasher.digest(), self.length)

    def _write(self, data: bytes | memoryview) -> None:
        if self._limit is not None:
            data = data[: max(self._limit - self.length, 0)]
        self._hasher.update(data)
        self.length += len(data)


def crlf_run_start(data: bytes | memoryview) -> int:
    """The index where the run of CRLF pairs ending ``data`` begins (``len(data)`` if
    ``data`` does not end with CRLF). Only the tail is looked at (and copied).
    """
    size, window = len(data), 64
    while True:
        low = max(size - window, 0)
        tail = bytes(data[low:])
        kept = len(tail.rstrip(b"\r\n"))
        if kept or not low:
            break
        window *= 4
    run = tail[kept:]  # only CRs and LFs: find the alternating "\r\n" tail
    if not run.endswith(b"\n"):
        return size
    start = max(run.rfind(b"\r\r"), run.rfind(b"\n\n")) + 1
    if run[start : start + 1] == b"\n":
        start += 1
    return low + kept + start


__all__ = [
    "CHUNK",
    "MODES",
    "BodyHash",
    "HashName",
    "Mode",
    "body_hash",
    "canonical_body_chunk",
    "canonical_header",
    "crlf_run_start",
    "header_hash_input",
    "relaxed_header",
]
