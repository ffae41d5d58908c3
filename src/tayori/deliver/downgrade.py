"""The 8BITMIME downgrade: a message with 8-bit content made 7-bit for a next hop without it.

Takes: one whole message as the spool holds it (header and body, CRLF line ends). A message
whose first line ends in a bare LF is taken as LF-terminated throughout and made CRLF first.
Promises: :func:`needs_downgrade` is true when the message is not already 7bit data
(RFC 2045 §2.7: no octet over 127 and no NUL, CR and LF only as CRLF, no line over 998
octets); then, and only then, :func:`downgrade` changes it. What it returns is 7bit data
that the ``email`` package parses to the same tree of parts (same content types, same
nesting) with the same decoded content in every leaf. It rewrites only what must change
(DESIGN §2.3), and keeps every other byte: header fields, 7-bit parts, delimiter lines,
preamble and epilogue (line ends aside: a lone CR or LF there becomes CRLF).

- A leaf whose body is not 7bit data is re-encoded: quoted-printable when it is text with at
  most one octet in four to escape, base64 otherwise; its Content-Transfer-Encoding field is
  replaced (later duplicates dropped) or added. A body labelled base64 or quoted-printable is
  decoded first, leniently, as readers do, when it holds raw 8-bit octets or long lines.
  The quoted-printable written here starts no line with ``--``, so it cannot forge a
  delimiter. A message that gets a body encoding gets ``MIME-Version: 1.0`` if it had none,
  and a leaf with no Content-Type whose body has 8-bit octets gets ``text/plain;
  charset=utf-8`` (or ``unknown-8bit``, RFC 1428), since its old default, US-ASCII, is wrong.
- A multipart or message/* part labelled 8bit or binary is relabelled 7bit once something
  inside it was rewritten. A part labelled 8bit whose content is 7-bit keeps its label:
  the label is allowed, and nothing that need not change is touched.
- Header fields with 8-bit octets (or NUL) get RFC 2047 encoded-words, charset utf-8 when the
  octets are UTF-8, else unknown-8bit; lines holding them stay within 76 characters.
  Unstructured fields (and any field not named below): the words from the first 8-bit word
  to the last one. Address fields: display names and comments; an 8-bit domain becomes its
  IDNA A-label; a local part cannot be written in ASCII at all, so a field that has one
  becomes an empty group (``=?utf-8?...?= :;``, allowed even in From by RFC 6854) whose
  display name is the whole field. Content-Type and Content-Disposition: 8-bit parameter
  values become RFC 2231 ``name*=utf-8''...`` (with continuations when long); an 8-bit
  parameter name has no escape and becomes encoded-words, the type is kept. Structured
  fields such as Message-ID have no 7-bit form for 8-bit text; their 8-bit words become
  encoded-words so that nothing is lost. Lines over 998 octets are folded (at a blank
  where there is one).
- Preamble, epilogue and lines that are neither fields nor body (text that no reader
  shows): 8-bit octets and NUL become ``?``, long lines are broken. So do lines of a
  message/delivery-status that are not fields (RFC 3464 has none; no encoding can mark them).
- A header that had no blank line before its body gets one when the body changed, so
  that no rewritten body line can be read as a field.

The walker reads structure as the ``email`` package does, so that both agree on where a
part's body lies: the first field of a name counts; a header ends at a blank line or at
the first line that is not a field; a delimiter is ``--boundary``, maybe ``--``, then blanks
only; the line break before it belongs to it; repeated delimiters make no empty part; a
part ends at its own delimiter and at every enclosing one; message/* holds a message and
message/delivery-status holds header blocks; a lone CR ends a line too. Multiparts it
cannot walk are leaves, as they are to the ``email`` package: no boundary parameter, no
first delimiter, or a boundary that is not 7-bit. Content-Transfer-Encoding is read as
RFC 2045 has it, a token with blanks around it, where the ``email`` package compares the
whole value. The result parses differently only where no 7-bit form exists: 8-bit octets
in a media type, a boundary or a field name too long for a 998-octet line, and the
non-field lines of a message/delivery-status.
Failure policy: never raises on content. Malformed MIME (missing or stray delimiters,
truncated parts, junk in headers, nesting deeper than ``MAX_DEPTH``) leaves the affected
part an opaque leaf, encoded whole. Time and memory are linear in the message size.
Standards: RFC 6152 §3 and RFC 1652 (8BITMIME); RFC 2045 §2.7-2.8, §6 (encodings);
RFC 2046 §5.1 (multipart); RFC 2047 (encoded-words); RFC 2231 (parameters); RFC 1428
(unknown-8bit); RFC 5322 §2.1.1, §2.2.3 (line length, folding); RFC 6854 (group in
From); RFC 5890 (IDNA).
"""

from __future__ import annotations

import binascii
import codecs
import re
from collections.abc import Iterator
from dataclasses import dataclass

from tayori.address import AddressError, to_ascii_domain
from tayori.smtp.framing import MAX_LINE_TEXT, scan_lines

MAX_DEPTH = 100           # nested parts walked; deeper ones are encoded whole
ENCODED_LINE = 76         # RFC 2045 §6.7-6.8: quoted-printable and base64 lines
WORD_LINE = 76            # RFC 2047 §2: a header line holding encoded-words
WORD_MAX = 75             # RFC 2047 §2: one encoded-word
QP_SHARE = 4              # quoted-printable when at most 1 octet in QP_SHARE needs escaping
SEGMENT = 60              # RFC 2231 continuation: octets of value per segment
BLOCK = 1 << 20           # octets encoded at a time, to bound temporary memory

_IDENTITY_8 = (b"8bit", b"binary")
_ADDRESS_FIELDS = frozenset({
    b"from", b"sender", b"reply-to", b"to", b"cc", b"bcc", b"resent-from", b"resent-sender",
    b"resent-to", b"resent-cc", b"resent-bcc", b"disposition-notification-to",
    b"mail-followup-to", b"mail-reply-to", b"errors-to", b"return-receipt-to",
})
_PARAM_FIELDS = frozenset({b"content-type", b"content-disposition"})

_EOL = re.compile(rb"\r\n|\r|\n")
_LONE_LF = re.compile(rb"(?<!\r)\n")
_FIELD_LINE = re.compile(rb"[\x21-\x39\x3b-\x7e]*:")
_DELIMITER_REST = re.compile(rb"(--)?[ \t]*(\r\n|\r|\n|\Z)")
_BLANK_AHEAD = re.compile(rb"\n(?=\r?\n)")
_CTE_TOKEN = re.compile(rb"\s*([^\s;(]*)")
_PARAM_ITEM = re.compile(rb'(?:"(?:[^"\\]|\\.)*"?|[^;"])*', re.S)
_CONTINUATION = re.compile(rb"(\w+)\*(?:([0-9]+)\*?)?")
_WORD = re.compile(rb"([ \t]*)([^ \t]+)")
_ENCODED_WORD = re.compile(rb"=\?[^?]*\?[bBqQ]\?[^?]*\?=")
_PCT_UNSAFE = re.compile(rb"[^!#$&+\-.0-9A-Z^_`a-z{|}~]")
_PCT_UNSAFE_RAW = re.compile(rb"[^!#$%&+\-.0-9A-Z^_`a-z{|}~]")
_PCT = re.compile(rb"%([0-9A-Fa-f]{2})")
_TOKEN = re.compile(
    rb'(?P<ws>[ \t]+)|(?P<qs>"(?:[^"\\]|\\.)*"?)|(?P<angle><[^>]*>?)|(?P<literal>\[[^\]]*\]?)'
    rb'|(?P<comment>\()|(?P<special>[,;:@.])|(?P<atom>[^ \t"<\[(,;:@.]+)', re.S)

_HEX = [b"=%02X" % octet for octet in range(256)]
_Q_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/")
_Q = [bytes([o]) if o in _Q_SAFE else b"_" if o == 0x20 else _HEX[o] for o in range(256)]
_Q_LEN = [len(q) for q in _Q]
_HIGH = bytes(range(0x80, 0x100)) + b"\x00"
_QMARK = bytes.maketrans(_HIGH, b"?" * len(_HIGH))

_Piece = tuple[bytes, bytes]        # (blanks before, text); no blanks: glued, never folded
_Token = tuple[str, bytes]          # (kind, text) of a structured field value


def needs_downgrade(message: bytes) -> bool:
    """True when ``message`` is not 7bit data: an octet over 127 or NUL, a CR or LF that is
    not part of CRLF, or a line over 998 octets. Exactly then :func:`downgrade` changes it."""
    return not _is_7bit(message)


def downgrade(message: bytes) -> bytes:
    """``message`` as 7bit data with the same MIME tree and decoded content (module doc)."""
    if not needs_downgrade(message):
        return message
    first_lf = message.find(b"\n")
    if first_lf == 0 or (first_lf > 0 and message[first_lf - 1] != 0x0D):
        message = _LONE_LF.sub(b"\r\n", message)
        if _is_7bit(message):
            return message
    walker = _Walker(message)
    walker.entity(_Span(0, len(message), b"", True), b"text/plain", message=True, depth=0)
    return b"".join(walker.out)


# --- octet classes -------------------------------------------------------------------------


def _is_7bit(chunk: bytes) -> bool:
    if _has_8bit(chunk):
        return False
    bare, longest = scan_lines(chunk)
    return not bare and longest <= MAX_LINE_TEXT


def _has_8bit(chunk: bytes) -> bool:
    return not chunk.isascii() or b"\x00" in chunk


def _charset(data: bytes) -> bytes:
    """``utf-8`` when ``data`` is UTF-8, else ``unknown-8bit``; decoded piecewise."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(data)
    step = 1 << 20
    try:
        for offset in range(0, len(data), step):
            decoder.decode(view[offset:offset + step])
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return b"unknown-8bit"
    return b"utf-8"


# --- structure: header, content type, delimiters -------------------------------------------


@dataclass(frozen=True, slots=True)
class _Span:
    """A region of the message. ``tail`` is the line break after it that belongs to the
    next delimiter (the enclosing multipart writes it); ``at_eof``: it ends the message."""

    start: int
    end: int
    tail: bytes
    at_eof: bool


@dataclass(frozen=True, slots=True)
class _Field:
    """One header field, continuation lines included; ``colon`` is -1 for a line that is
    not a field (a ``From `` line, a continuation with nothing before it)."""

    start: int
    end: int
    colon: int

    @property
    def named(self) -> bool:
        return self.colon > self.start


@dataclass(frozen=True, slots=True)
class _Header:
    fields: tuple[_Field, ...]
    body: int            # where the body starts
    separator: bytes     # the blank line, or b"" when the body follows without one

    def get(self, data: bytes, key: bytes) -> bytes | None:
        """The first field named ``key`` (lower case), as the ``email`` package reads it."""
        for field in self.fields:
            if field.named and data[field.start:field.colon].lower() == key:
                return data[field.colon + 1:field.end].lstrip(b" \t").rstrip(b"\r\n")
        return None


def _parse_header(data: bytes, start: int, end: int) -> _Header:
    fields: list[_Field] = []
    pos = start
    while pos < end:
        eol = _EOL.search(data, pos, end)
        after = eol.end() if eol else end
        if eol and eol.start() == pos:
            return _Header(tuple(fields), after, data[pos:after])
        if data[pos] in b" \t":
            last = fields.pop() if fields else _Field(pos, pos, -1)
            fields.append(_Field(last.start, after, last.colon))
        elif data.startswith(b"From ", pos):
            fields.append(_Field(pos, after, -1))
        elif _FIELD_LINE.match(data, pos, after):
            fields.append(_Field(pos, after, data.index(b":", pos)))
        else:
            return _Header(tuple(fields), pos, b"")
        pos = after
    return _Header(tuple(fields), end, b"")


@dataclass(frozen=True, slots=True)
class _Info:
    """How a part's body is to be read."""

    ctype: bytes                 # lower-case type/subtype, as the ``email`` package has it
    cte: bytes                   # lower-case Content-Transfer-Encoding token
    boundary: bytes | None       # a usable boundary of a multipart
    typed: bool                  # the part has a Content-Type field

    @property
    def maintype(self) -> bytes:
        return self.ctype.partition(b"/")[0]

    @classmethod
    def read(cls, data: bytes, header: _Header, default_type: bytes) -> _Info:
        value = header.get(data, b"content-type")
        ctype = default_type
        if value is not None:
            ctype = value.partition(b";")[0].strip().lower()
            ctype = ctype if ctype.count(b"/") == 1 else b"text/plain"
        boundary = None
        if value is not None and ctype.startswith(b"multipart/"):
            boundary = _boundary(value)
        encoding = header.get(data, b"content-transfer-encoding")
        cte = b"7bit" if encoding is None else _cte_token(encoding)
        return cls(ctype, cte, boundary, value is not None)


def _cte_token(value: bytes) -> bytes:
    match = _CTE_TOKEN.match(value)
    return match.group(1).lower() if match else b""


def _split_params(value: bytes) -> list[bytes]:
    """``;``-separated items outside quoted strings, stripped; the first is the type."""
    items = []
    pos = 0
    while True:
        match = _PARAM_ITEM.match(value, pos)
        end = match.end() if match else len(value)
        items.append(value[pos:end].strip())
        if end >= len(value):
            return items
        pos = end + 1


def _unquote(value: bytes) -> bytes:
    if len(value) > 1 and value.startswith(b'"') and value.endswith(b'"'):
        return value[1:-1].replace(b"\\\\", b"\\").replace(b'\\"', b'"')
    if len(value) > 1 and value.startswith(b"<") and value.endswith(b">"):
        return value[1:-1]
    return value


def _boundary(value: bytes) -> bytes | None:
    """The boundary parameter as the ``email`` package finds it (a plain one first, else
    RFC 2231 segments), or None when there is none usable for 998-octet 7-bit lines."""
    segments: list[tuple[int, bytes, bool]] = []
    found = None
    for item in _split_params(value)[1:]:
        name, _, raw = item.partition(b"=")
        name = name.strip().lower()
        if name == b"boundary":
            found = _unquote(raw.strip())
            break
        match = _CONTINUATION.fullmatch(name)
        if match and match.group(1) == b"boundary":
            segments.append((int(match.group(2) or 0), _unquote(raw.strip()), name[-1:] == b"*"))
    if found is None and segments:
        found = _join_segments(segments)
    if found is None:
        return None
    found = found.rstrip()
    return None if _has_8bit(found) or len(found) > MAX_LINE_TEXT - 8 else found


def _join_segments(segments: list[tuple[int, bytes, bool]]) -> bytes:
    segments.sort(key=lambda segment: segment[0])
    value = b"".join(_PCT.sub(lambda m: bytes.fromhex(m.group(1).decode()), text) if extended
                     else text for _, text, extended in segments)
    parts = value.split(b"'", 2)
    return parts[2] if any(s[2] for s in segments) and len(parts) == 3 else value


@dataclass(frozen=True, slots=True)
class _Delimiter:
    start: int
    end: int          # after its line break
    rest: bytes       # after ``--boundary`` on the line: ``--`` and blanks
    ended: bool       # the line has a line break
    close: bool


def _delimiters(data: bytes, start: int, end: int, boundary: bytes) -> list[_Delimiter]:
    """The delimiter lines of one multipart body, up to and with the close delimiter."""
    marker = b"--" + boundary
    found: list[_Delimiter] = []
    pos = start
    while (at := data.find(marker, pos, end)) >= 0:
        pos = at + 1
        if at > start and data[at - 1] not in b"\r\n":
            continue
        rest = _DELIMITER_REST.match(data, at + len(marker), end)
        if rest is None:
            continue
        repeated = bool(found) and found[-1].end == at   # consumed as a separator, even --b--
        close = rest.group(1) is not None and not repeated
        text = data[at + len(marker):rest.start(2)]
        found.append(_Delimiter(at, rest.end(), text, bool(rest.group(2)), close))
        if close:
            break
        pos = rest.end()
    return found


def _break_before(data: bytes, start: int, end: int) -> bytes:
    if end - start >= 2 and data[end - 2:end] == b"\r\n":
        return b"\r\n"
    return data[end - 1:end] if end > start and data[end - 1] in b"\r\n" else b""


# --- the walk ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Edits:
    """What a part's header needs after its body was written."""

    cte: bytes | None = None           # the new Content-Transfer-Encoding
    content_type: bytes | None = None  # a Content-Type to add (the part has none)
    encoded: bool = False              # the body was re-encoded
    changed: bool = False              # something in the body was rewritten


class _Walker:
    """Writes the downgraded message into ``out``; ``rewrites`` counts real changes, so a
    container knows whether anything under it changed."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.out: list[bytes] = []
        self.rewrites = 0

    def entity(self, span: _Span, default_type: bytes, *, message: bool, depth: int) -> None:
        header = _parse_header(self.data, span.start, span.end)
        info = _Info.read(self.data, header, default_type)
        slot = len(self.out)
        self.out.append(b"")
        edits = self.body(info, _Span(header.body, span.end, span.tail, span.at_eof), depth)
        self.out[slot] = self.header(header, edits, message=message)

    def body(self, info: _Info, span: _Span, depth: int) -> _Edits:
        before = self.rewrites
        edits = self.container(info, span, depth) if depth < MAX_DEPTH else None
        if edits is None:
            edits = self.leaf(info, span)
        edits.changed = self.rewrites > before
        if edits.cte is None and edits.changed and info.cte in _IDENTITY_8:
            edits.cte = b"7bit"
        return edits

    def container(self, info: _Info, span: _Span, depth: int) -> _Edits | None:
        if info.maintype == b"multipart":
            return None if info.boundary is None else self.multipart(info, span, depth)
        if info.ctype == b"message/delivery-status":
            self.blocks(span)
            return _Edits()
        if info.maintype == b"message":
            self.entity(span, b"text/plain", message=True, depth=depth + 1)
            return _Edits()
        return None

    def multipart(self, info: _Info, span: _Span, depth: int) -> _Edits | None:
        assert info.boundary is not None
        delimiters = _delimiters(self.data, span.start, span.end, info.boundary)
        if not delimiters:
            return None
        first = delimiters[0]
        if first.close:   # no first delimiter: to the ``email`` package, a leaf up to here
            edits = self.leaf(info, _Span(span.start, first.start, b"", False))
        else:
            edits = _Edits()
            self.out.append(self.plain(self.data[span.start:first.start]))
        default = b"message/rfc822" if info.ctype == b"multipart/digest" else b"text/plain"
        for index, delimiter in enumerate(delimiters):
            self.out.append(self.delimiter(delimiter, info.boundary))
            if delimiter.close:
                self.out.append(self.plain(self.data[delimiter.end:span.end]))
                break
            last = index + 1 == len(delimiters)
            end = span.end if last else delimiters[index + 1].start
            self.part(_Span(delimiter.end, end, span.tail, span.at_eof and last),
                      last, default, depth)
        return edits

    def part(self, region: _Span, last: bool, default: bytes, depth: int) -> None:
        """One body part; ``region`` runs to the next delimiter, or for the ``last`` part of
        a multipart without its close delimiter, to the end of the multipart."""
        if last and not region.at_eof:
            child, tail = region, b""
        else:   # the line break before a delimiter, or at the very end, is not the part's
            tail = _break_before(self.data, region.start, region.end)
            child = _Span(region.start, region.end - len(tail), tail, region.at_eof and not tail)
        if region.start < region.end:
            self.entity(child, default, message=False, depth=depth + 1)
        if tail:
            self.out.append(b"\r\n")

    def delimiter(self, delimiter: _Delimiter, boundary: bytes) -> bytes:
        line = b"--" + boundary + delimiter.rest
        if len(line) > MAX_LINE_TEXT:
            line = line.rstrip(b" \t")
        return line + b"\r\n" if delimiter.ended else line

    def blocks(self, span: _Span) -> None:
        """message/delivery-status: header blocks separated by blank lines."""
        pos = span.start
        while pos < span.end:
            header = _parse_header(self.data, pos, span.end)
            self.out.extend(self.field(field) for field in header.fields)
            self.out.append(self.plain(header.separator))
            if header.separator:
                pos = header.body
                continue
            blank = _BLANK_AHEAD.search(self.data, header.body, span.end)
            stop = blank.end() if blank else span.end
            self.out.append(self.plain(self.data[header.body:stop]))
            pos = stop

    def leaf(self, info: _Info, span: _Span) -> _Edits:
        content = self.data[span.start:span.end]
        if _is_7bit(content):
            self.out.append(content)
            return _Edits()
        self.rewrites += 1
        if info.maintype == b"multipart":   # the ``email`` package keeps this line break
            content += span.tail
        decoded = _decode(content, info.cte)
        edits = _Edits(encoded=True)
        if info.maintype == b"text" and _mostly_ascii(decoded):
            self.out.append(_quoted_printable(decoded))
            edits.cte = b"quoted-printable"
        else:
            self.out.append(_base64(decoded, terminated=not span.tail))
            edits.cte = b"base64"
        if not info.typed and info.ctype == b"text/plain" and _has_8bit(decoded):
            edits.content_type = b"text/plain; charset=" + _charset(decoded)
        return edits

    def header(self, header: _Header, edits: _Edits, *, message: bool) -> bytes:
        data = self.data
        lines: list[bytes] = []
        cte = edits.cte
        for field in header.fields:
            if edits.cte is not None and field.named \
                    and data[field.start:field.colon].lower() == b"content-transfer-encoding":
                if cte is not None:
                    lines.append(data[field.start:field.colon] + b": " + cte + b"\r\n")
                    cte = None
                continue
            lines.append(self.field(field))
        added = [b"Content-Transfer-Encoding: " + cte] if cte is not None else []
        if edits.content_type is not None:
            added.append(b"Content-Type: " + edits.content_type)
        if message and edits.encoded and header.get(data, b"mime-version") is None:
            added.append(b"MIME-Version: 1.0")
        if (added or edits.changed) and lines and not lines[-1].endswith(b"\n"):
            lines.append(b"\r\n")
        lines.extend(line + b"\r\n" for line in added)
        if header.separator:
            lines.append(self.plain(header.separator))
        elif edits.changed:   # so that no rewritten body line can join this header
            lines.append(b"\r\n")
        return b"".join(lines)

    def field(self, field: _Field) -> bytes:
        raw = self.data[field.start:field.end]
        if _is_7bit(raw):
            return raw
        if not (field.named and _has_8bit(raw)):
            return self.plain(raw, header=True)
        self.rewrites += 1
        name = raw[:field.colon - field.start]
        encoded = _encode_field(name, raw[len(name) + 1:])
        return encoded if raw.endswith((b"\n", b"\r")) else encoded[:-2]

    def plain(self, chunk: bytes, *, header: bool = False) -> bytes:
        """Text that readers do not decode, made 7bit data: CRLF, ``?`` for 8-bit octets,
        long lines folded (in a header) or broken."""
        if _is_7bit(chunk):
            return chunk
        fixed = _EOL.sub(b"\r\n", chunk)
        if _has_8bit(fixed):
            fixed = fixed.translate(_QMARK)
            self.rewrites += 1
        if not _is_7bit(fixed):
            shorten = _fold_line if header else _break_line
            fixed = b"\r\n".join(map(shorten, fixed.split(b"\r\n")))
            self.rewrites += 1
        return fixed


# --- body encodings ------------------------------------------------------------------------


def _decode(content: bytes, cte: bytes) -> bytes:
    """The body's octets, decoded as the ``email`` package decodes them."""
    if cte == b"quoted-printable":
        return binascii.a2b_qp(content)
    if cte != b"base64":
        return content
    try:
        return binascii.a2b_base64(content)
    except binascii.Error:   # padding missing, or one octet too many
        try:
            return binascii.a2b_base64(content + b"==")
        except binascii.Error:
            return b"".join(content.splitlines())


def _mostly_ascii(data: bytes) -> bool:
    return (len(data) - len(data.translate(None, _HIGH))) * QP_SHARE <= len(data)


def _chunks(data: bytes) -> Iterator[bytes]:
    """``data`` in pieces of about ``BLOCK`` octets, each but the last ending in CRLF."""
    start = 0
    while start < len(data):
        cut = data.find(b"\r\n", start + BLOCK)
        end = len(data) if cut < 0 else cut + 2
        yield data[start:end]
        start = end


def _quoted_printable(data: bytes) -> bytes:
    """RFC 2045 §6.7, exact for any octets: CRLF is a line break, a lone CR or LF is
    escaped, and no line starts with ``--`` (so none can be taken for a delimiter)."""
    return b"".join(b"\r\n".join(map(_qp_line, block.split(b"\r\n"))).replace(b"=\n", b"=\r\n")
                    for block in _chunks(data))


def _qp_line(line: bytes) -> bytes:
    """One line (no CRLF in it); soft line breaks come out as ``=`` LF."""
    encoded = binascii.b2a_qp(line, istext=False)   # escapes CR, LF and trailing blanks too
    if not (encoded.startswith(b"--") or b"\n--" in encoded):
        return encoded
    escaped = encoded.replace(b"=\n", b"")
    return _soft_wrap(b"=2D" + escaped[1:] if escaped.startswith(b"--") else escaped)


def _soft_wrap(line: bytes) -> bytes:
    """An escaped line cut at 76 characters, never inside ``=XX`` nor before ``--``."""
    pieces = []
    start, prefix = 0, b""
    while len(prefix) + len(line) - start > ENCODED_LINE:
        cut = start + ENCODED_LINE - 1 - len(prefix)
        while line[cut - 1] == 0x3D or line[cut - 2] == 0x3D:   # not inside =XX
            cut -= 1
        pieces.append(prefix + line[start:cut] + b"=")
        start, prefix = (cut + 1, b"=2D") if line.startswith(b"--", cut) else (cut, b"")
    pieces.append(prefix + line[start:])
    return b"\n".join(pieces)


def _base64(data: bytes, *, terminated: bool) -> bytes:
    step = ENCODED_LINE // 4 * 3 * (BLOCK // ENCODED_LINE)   # whole lines, no padding
    text = b"\r\n".join(_base64_lines(data[i:i + step]) for i in range(0, len(data), step))
    return text + b"\r\n" if terminated and text else text


def _base64_lines(data: bytes) -> bytes:
    encoded = binascii.b2a_base64(data, newline=False)
    return b"\r\n".join(encoded[i:i + ENCODED_LINE] for i in range(0, len(encoded), ENCODED_LINE))


def _break_line(line: bytes) -> bytes:
    if len(line) <= MAX_LINE_TEXT:
        return line
    return b"\r\n".join(line[i:i + MAX_LINE_TEXT] for i in range(0, len(line), MAX_LINE_TEXT))


def _fold_line(line: bytes) -> bytes:
    """A header line over 998 octets folded before a blank, or, with none, where it must
    (there the continuation line starts with an added space)."""
    lines = []
    start, prefix = 0, b""
    while len(prefix) + len(line) - start > MAX_LINE_TEXT:
        limit = start + MAX_LINE_TEXT - len(prefix)
        cut = max(line.rfind(b" ", start + 1, limit), line.rfind(b"\t", start + 1, limit))
        folded = cut > start
        cut = cut if folded else limit - 1
        lines.append(prefix + line[start:cut])
        start, prefix = cut, b"" if folded else b" "
    lines.append(prefix + line[start:])
    return b"\r\n".join(lines)


# --- header fields -------------------------------------------------------------------------


def _encode_field(name: bytes, value: bytes) -> bytes:
    """One field with 8-bit octets, as 7-bit lines (module doc); ``value`` follows the colon."""
    text = _EOL.sub(b"", value).strip(b" \t")
    key = name.lower()
    pieces = None
    if key in _PARAM_FIELDS:
        pieces = _param_pieces(text)
    elif key in _ADDRESS_FIELDS:
        pieces = _address_pieces(text) or _group_pieces(text, len(name))
    return _fold(name + b":", pieces or _unstructured_pieces(text, len(name)))


def _fold(head: bytes, pieces: list[_Piece]) -> bytes:
    lines = []
    line, width = [head], len(head)
    for blanks, text in pieces:
        if blanks and width + len(blanks) + len(text) > WORD_LINE:
            lines.append(b"".join(line))   # fold before the blanks, keeping them (RFC 5322 §2.2.3)
            line, width = [], 0
        line += (blanks, text)
        width += len(blanks) + len(text)
    lines.append(b"".join(line))
    return b"\r\n".join(map(_fold_line, lines)) + b"\r\n"


def _encoded_words(raw: bytes, first: int = WORD_MAX) -> list[bytes]:
    """RFC 2047 encoded-words for ``raw``, each a whole number of characters, the first at
    most ``first`` characters long (when that leaves room), the others ``WORD_MAX``."""
    charset = _charset(raw)
    use_q = sum(map(_Q_LEN.__getitem__, raw)) <= (len(raw) + 2) // 3 * 4
    head = b"=?" + charset + (b"?q?" if use_q else b"?b?")
    room = (first if first >= len(head) + 16 else WORD_MAX) - len(head) - 2
    words: list[bytes] = []
    start = size = 0    # raw[start:pos] encodes to ``size`` characters
    for pos, end in _characters(raw, utf8=charset == b"utf-8"):
        cost = sum(map(_Q_LEN.__getitem__, raw[pos:end])) if use_q else 0
        grown = size + cost if use_q else (end - start + 2) // 3 * 4
        if pos > start and grown > room:
            words.append(_encoded_word(head, raw[start:pos], use_q))
            start, room = pos, WORD_MAX - len(head) - 2
            grown = cost if use_q else (end - start + 2) // 3 * 4
        size = grown
    words.append(_encoded_word(head, raw[start:], use_q))
    return words


def _characters(raw: bytes, *, utf8: bool) -> Iterator[tuple[int, int]]:
    """Where each character starts and ends: a UTF-8 sequence (``raw`` is valid UTF-8) or
    one octet."""
    pos = 0
    while pos < len(raw):
        lead = raw[pos]
        end = pos + 1 if not utf8 or lead < 0xC0 else pos + 2 if lead < 0xE0 else \
            pos + 3 if lead < 0xF0 else pos + 4
        yield pos, end
        pos = end


def _encoded_word(head: bytes, chunk: bytes, use_q: bool) -> bytes:
    text = b"".join(_Q[octet] for octet in chunk) if use_q else \
        binascii.b2a_base64(chunk, newline=False)
    return head + text + b"?="


def _spaced(words: list[bytes], blanks: bytes = b" ") -> list[_Piece]:
    return [(blanks if i == 0 else b" ", word) for i, word in enumerate(words)]


def _unstructured_pieces(text: bytes, used: int) -> list[_Piece]:
    """The words from the first to the last 8-bit one become encoded-words; so do the blanks
    between them and a neighbouring encoded-word, which a reader would otherwise drop."""
    words = _WORD.findall(text)
    marked = [i for i, (_, word) in enumerate(words) if _has_8bit(word)]
    first, last = marked[0], marked[-1]
    raw = b"".join(blanks + word for blanks, word in words[first:last + 1])[len(words[first][0]):]
    lead = words[first][0] or b" "
    if first > 0 and _ENCODED_WORD.fullmatch(words[first - 1][1]):
        raw, lead = words[first][0] + raw, b" "
    if last + 1 < len(words) and _ENCODED_WORD.fullmatch(words[last + 1][1]):
        raw += words[last + 1][0]
    pieces: list[_Piece] = [(blanks or b" ", word) for blanks, word in words[:first]]
    budget = WORD_LINE - used - 2 - sum(len(b) + len(w) for b, w in pieces) - len(lead)
    pieces += _spaced(_encoded_words(raw, budget), lead)
    pieces += [(blanks or b" ", word) for blanks, word in words[last + 1:]]
    return pieces


def _group_pieces(text: bytes, used: int) -> list[_Piece]:
    """An address field that cannot be written in ASCII: an empty group named by it."""
    return [*_spaced(_encoded_words(text, WORD_LINE - used - 2)), (b" ", b":;")]


def _tokens(text: bytes) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        kind = match.lastgroup if match and match.lastgroup else "atom"
        end = _comment_end(text, pos) if kind == "comment" else match.end() if match else len(text)
        tokens.append((kind, text[pos:end]))
        pos = end
    return tokens


def _comment_end(text: bytes, start: int) -> int:
    depth = 0
    pos = start
    while pos < len(text):
        octet = text[pos]
        if octet == 0x5C:
            pos += 1
        elif octet == 0x28:
            depth += 1
        elif octet == 0x29:
            depth -= 1
            if depth == 0:
                return pos + 1
        pos += 1
    return len(text)


def _address_pieces(text: bytes) -> list[_Piece] | None:
    """Display names and comments encoded, 8-bit domains as A-labels; None when a local
    part is 8-bit (nothing in ASCII can say it)."""
    tokens = _tokens(text)
    out: list[_Token] = []
    start = 0
    for index, (kind, token) in enumerate(tokens):
        if kind == "angle" or token == b":":
            address = _angle(token) if kind == "angle" else token
            if address is None:
                return None
            out += [*_phrase(tokens[start:index]), (kind, address)]
            start = index + 1
        elif kind == "special" and token in (b",", b";"):
            spec = _addr_spec(tokens[start:index])
            if spec is None:
                return None
            out += [*spec, (kind, token)]
            start = index + 1
    spec = _addr_spec(tokens[start:])
    return None if spec is None else _token_pieces(out + spec)


def _token_pieces(tokens: list[_Token]) -> list[_Piece]:
    pieces: list[_Piece] = []
    blanks = b" "
    for kind, token in tokens:
        if kind == "ws":
            blanks = token
        else:
            pieces.append((blanks, token))
            blanks = b""
    return pieces


def _phrase(tokens: list[_Token]) -> list[_Token]:
    """A display name: each run of words between comments, encoded when it is 8-bit."""
    out: list[_Token] = []
    run: list[_Token] = []
    for kind, token in [*tokens, ("end", b"")]:
        if kind not in ("comment", "end"):
            run.append((kind, token))
            continue
        out += _encode_run(run)
        run = []
        if kind == "comment":
            out += _comment(token)
    return out


def _encode_run(run: list[_Token]) -> list[_Token]:
    if not any(_has_8bit(token) for _, token in run):
        return run
    raw = b"".join(b" " if kind == "ws" else _unquote(token) if kind == "qs" else token
                   for kind, token in run).strip(b" ")
    words: list[_Token] = []
    for word in _encoded_words(raw):   # blanks on both sides: RFC 2047 §5 (3)
        words += [("ws", b" "), ("atom", word)]
    return [*words, ("ws", b" ")]


def _comment(token: bytes) -> list[_Token]:
    """A comment, its text as encoded-words when it is 8-bit (RFC 2047 §5 (2))."""
    if not _has_8bit(token):
        return [("comment", token)]
    inner = token[1:-1] if token.endswith(b")") else token[1:]
    words = _encoded_words(inner)
    words[0], words[-1] = b"(" + words[0], words[-1] + b")"
    out: list[_Token] = []
    for word in words:
        out += [("ws", b" "), ("comment", word)]
    return out[1:]


def _angle(token: bytes) -> bytes | None:
    if not _has_8bit(token):
        return token
    inner = token[1:-1] if token.endswith(b">") else token[1:]
    local, at, domain = inner.rpartition(b"@")
    ascii_domain = _idna(domain)
    if not at or _has_8bit(local) or ascii_domain is None:
        return None
    return b"<" + local + b"@" + ascii_domain + b">"


def _addr_spec(tokens: list[_Token]) -> list[_Token] | None:
    """A bare address (with blanks and comments): only an 8-bit domain can be helped."""
    at = next((i for i, (_, token) in enumerate(tokens) if token == b"@"), len(tokens))
    after = tokens[at + 1:]
    if any(_has_8bit(token) for kind, token in tokens[:at] if kind != "comment"):
        return None
    if not any(_has_8bit(token) for kind, token in after if kind != "comment"):
        return _comments(tokens)
    domain = _idna(b"".join(token for kind, token in after if kind in ("atom", "special")))
    if domain is None:
        return None
    comments = [token for token in after if token[0] == "comment"]
    return [*_comments(tokens[:at]), ("special", b"@"), ("atom", domain), *_comments(comments)]


def _comments(tokens: list[_Token]) -> list[_Token]:
    out: list[_Token] = []
    for kind, token in tokens:
        out += _comment(token) if kind == "comment" else [(kind, token)]
    return out


def _idna(domain: bytes) -> bytes | None:
    try:
        return to_ascii_domain(domain.decode("utf-8")).encode("ascii")
    except (UnicodeError, AddressError):
        return None


def _param_pieces(text: bytes) -> list[_Piece] | None:
    """Content-Type or -Disposition: 8-bit parameter values in RFC 2231 form (an 8-bit
    name has no escape: that item becomes encoded-words). None when the type is 8-bit."""
    items = _split_params(text)
    if _has_8bit(items[0]):
        return None
    params: list[list[bytes]] = []
    for item in items[1:]:
        if not _has_8bit(item):
            params.append([item])
        elif _has_8bit(item.partition(b"=")[0]):   # no escape exists for a name
            params.append(_encoded_words(item))
        else:
            params += [[segment] for segment in _rfc2231(item)]
    pieces: list[_Piece] = [(b" ", items[0])]
    for words in params:
        pieces[-1] = (pieces[-1][0], pieces[-1][1] + b";")
        pieces += _spaced(words)
    return pieces


def _rfc2231(item: bytes) -> list[bytes]:
    name, _, value = item.partition(b"=")
    name, raw = name.strip(), _unquote(value.strip())
    if b"*" in name:   # already RFC 2231 (or a numbered segment): escape its raw octets
        extended = name.endswith(b"*")
        pattern = _PCT_UNSAFE_RAW if extended else _PCT_UNSAFE
        return [name + (b"" if extended else b"*") + b"=" + _percent(raw, pattern)]
    encoded = _charset(raw) + b"''" + _percent(raw, _PCT_UNSAFE)
    if len(encoded) <= SEGMENT:
        return [name + b"*=" + encoded]
    segments = []
    start = 0
    while start < len(encoded):
        cut = min(start + SEGMENT, len(encoded))
        while cut < len(encoded) and b"%" in encoded[cut - 2:cut]:   # not inside %XX
            cut -= 1
        segments.append(encoded[start:cut])
        start = cut
    return [name + b"*%d*=" % i + segment for i, segment in enumerate(segments)]


def _percent(raw: bytes, pattern: re.Pattern[bytes]) -> bytes:
    return pattern.sub(lambda match: b"%%%02X" % match.group()[0], raw)
