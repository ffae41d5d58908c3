"""Delivery status notifications: bounces, delay warnings and success reports.

Takes: a :class:`Report` (who we are, the original envelope's DSN parameters, one
:class:`RecipientReport` per recipient to report on) and the original message as a binary
file object (the spool body, CRLF), plus the time and a Message-ID for the notification.
Promises: :func:`compose` returns a complete message, CRLF line endings only, no line
longer than 998 octets, ready to be queued and sent with the null reverse-path to
``report.sender``: a ``multipart/report`` with (1) a ``text/plain`` explanation for a
person, (2) the machine-readable ``message/delivery-status`` and (3) the original
(``message/rfc822``) or only its header section (``text/rfc822-headers``). With
``smtputf8`` the RFC 6533 types are used instead: ``message/global-delivery-status``,
``message/global`` and ``message/global-headers``, and ``report-type`` names the second
part's subtype, ``global-delivery-status`` (RFC 6522 §3). :func:`needs_8bitmime` tells the
caller to send with ``BODY=8BITMIME``.
Decisions: ENVID and ORCPT are xtext (RFC 3461 §4); Original-Envelope-Id and
Original-Recipient carry their xtext-decoded values: RFC 3464 §2.2.1 and §2.3.1 define
them as text, xtext being only how the SMTP parameters transport them. Addresses
are typed ``rfc822`` when ASCII, else ``utf-8`` (RFC 6533 §3): raw UTF-8 in the global
types, ``\\x{HEX}``-escaped (utf-8-addr-xtext) in the ASCII ones. The queue id goes in
``X-Tayori-Queue-ID``, a private ``X-`` field (RFC 3464 §2.4). No header field needs RFC
2047: every text we write there is fixed ASCII, except the address in ``To``, which
an encoded-word cannot carry; a non-ASCII sender can only be reached with SMTPUTF8, so it
turns on the global form (RFC 6532 UTF-8 headers) like ``smtputf8`` does. The original is
returned with its line endings made CRLF (a bare CR or LF becomes CRLF): 7bit when ASCII,
8bit otherwise. ``message/rfc822`` admits no other encoding (RFC 2046 §5.2.1) and
``binary`` would need BINARYMIME, so an original with NUL octets or lines over 998 octets
is returned as headers only, quoted-printable when those need it (allowed for text/* and
for the RFC 6533 global types). The human part is quoted-printable when it holds UTF-8 in a
non-SMTPUTF8 notification, so that only an 8-bit original makes the DSN 8-bit.
Failure policy: pure apart from reading ``original`` (an OSError from it propagates);
never raises on odd data. Control characters (CR, LF, NUL, ...) in any text become spaces,
so no value can start a new header field or DSN field; unencodable code points become
``?``; non-ASCII text in the ASCII types becomes ``?``. An unknown action is reported as
``failed``, a malformed status as the action's generic one (``5.0.0``, ``4.0.0``,
``2.0.0``). Over-long words are split so that no line exceeds the limit.
Config keys: none (the caller passes ``hostname`` as ``reporting_mta``).
Standards: RFC 3461 (DSN extension, xtext), RFC 3464 (message/delivery-status), RFC 6522
(multipart/report), RFC 6533 (internationalised DSNs), RFC 6532 (UTF-8 headers), RFC 3463
(status codes), RFC 3834 (Auto-Submitted), RFC 5322 (dates, line lengths), RFC 2045/2046.
"""

from __future__ import annotations

import binascii
import re
import secrets
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import BinaryIO

from tayori.address import AddressError, to_ascii_domain, xtext_decode

ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded")

_SUCCESS = ("delivered", "relayed", "expanded")
_SUBJECTS = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "delivered": "Successful Mail Delivery Report",
}
_GENERIC_STATUS = {"failed": "5.0.0", "delayed": "4.0.0"}
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}\Z")
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_UNITEXT = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")
_HEADER_END = re.compile(rb"\n\r?\n")
_LINE_END = re.compile(rb"\r\n|\r|\n")
_WIDTH = 76  # folding and wrapping target, below RFC 5322's 78
_HARD = 240  # characters: at most 960 octets of UTF-8, below the 998 limit
_MAX_LINE = 998
_MAX_HEADERS = 256 * 1024  # the most of an original's header section ever returned


@dataclass(frozen=True, slots=True)
class RecipientReport:
    """What happened to one recipient (RFC 3464 §2.3)."""

    address: str  # the envelope recipient as received (may contain UTF-8)
    action: str  # one of ACTIONS
    status: str  # RFC 3463 code, e.g. "5.1.1"
    orcpt: str | None = None  # ORCPT as received: "rfc822;" + xtext
    remote_mta: str | None = None  # host name or IP of the server that answered
    diagnostic: str | None = None  # the remote reply, lines joined by "\n"
    last_attempt: float | None = None  # unix time
    will_retry_until: float | None = None  # unix time, for "delayed"


@dataclass(frozen=True, slots=True)
class Report:
    """One notification: the original message's envelope and its recipients' outcomes."""

    reporting_mta: str  # our host name
    queue_id: str  # the original message's queue id
    sender: str  # the original envelope sender, never "" (the caller guarantees it)
    arrival: float  # unix time the original was received
    recipients: tuple[RecipientReport, ...]
    envid: str | None = None  # ENVID as received (xtext)
    ret: str | None = None  # "FULL" | "HDRS" | None (FULL unless too big)
    smtputf8: bool = False  # the original was SMTPUTF8: RFC 6533 types
    received_from: str | None = None  # "client name [ip]", for the human part


@dataclass(frozen=True, slots=True)
class _Returned:
    """What is returned of the original: all of it, or its header section and why."""

    body: bytes
    whole: bool
    why: str = ""  # "hdrs" (RET=HDRS), "size" (too big), "lines" (not sendable as is)


@dataclass(frozen=True, slots=True)
class _Part:
    content_type: str
    description: str
    body: bytes
    encoding: str


def compose(
    report: Report,
    original: BinaryIO,
    *,
    now: float,
    message_id: str,
    max_original: int = 100 * 1024,
) -> bytes:
    """The complete notification for ``report``, CRLF line endings, ready to queue."""
    utf8 = report.smtputf8 or not report.sender.isascii()
    returned = _read_original(original, (report.ret or "").strip().upper(), max_original)
    parts = (
        _human_part(report, returned, max_original, utf8),
        _status_part(report, utf8),
        _original_part(returned, utf8),
    )
    boundary = _boundary(report.queue_id, [part.body for part in parts])
    head = _message_header(report, now, message_id, boundary, utf8)
    return _assemble(head, parts, boundary)


def needs_8bitmime(dsn: bytes) -> bool:
    """Whether ``dsn`` holds 8-bit octets, so must be sent with ``BODY=8BITMIME``."""
    return not dsn.isascii()


# --- text hygiene -------------------------------------------------------------------------


def _clean(text: str) -> str:
    """``text`` without control characters (they become spaces) or unencodable code points."""
    text = text.encode("utf-8", "replace").decode("utf-8")
    return _CONTROLS.sub(" ", text).strip()


def _value(text: str, utf8: bool) -> str:
    """A field value: cleaned, and ASCII (``?`` for the rest) unless ``utf8``."""
    text = _clean(text)
    return text if utf8 else text.encode("ascii", "replace").decode("ascii")


def _host(name: str, utf8: bool) -> str:
    """A host name for a field: its A-label form when it must be ASCII and has U-labels."""
    name = _clean(name)
    if utf8 or name.isascii():
        return name
    try:
        return to_ascii_domain(name)
    except AddressError:
        return _value(name, utf8)


def _xtext_text(value: str) -> str:
    """The text xtext ``value`` stands for (UTF-8 octets decoded); ``value`` if not xtext."""
    try:
        raw = xtext_decode(value)
    except ValueError:
        return value
    return raw.encode("latin-1").decode("utf-8", "replace")


def _unitext_escape(address: str) -> str:
    """RFC 6533 utf-8-addr-xtext: ASCII, with ``\\x{HEX}`` for what QCHAR excludes."""
    return "".join(
        char if "!" <= char <= "~" and char not in "+=\\" else f"\\x{{{ord(char):X}}}"
        for char in address
    )


def _unitext_unescape(text: str) -> str:
    def one(match: re.Match[str]) -> str:
        point = int(match.group(1), 16)
        valid = point <= 0x10FFFF and not 0xD800 <= point <= 0xDFFF
        return chr(point) if valid else match.group(0)

    return _UNITEXT.sub(one, text)


def _typed_address(address: str, utf8: bool) -> str:
    """``rfc822; addr`` for ASCII, else ``utf-8; addr`` (escaped unless ``utf8``)."""
    address = _clean(address)
    if address.isascii():
        return f"rfc822; {address}"
    return f"utf-8; {address if utf8 else _unitext_escape(address)}"


def _original_recipient(orcpt: str, utf8: bool) -> str:
    """The Original-Recipient value for an ORCPT parameter as received."""
    kind, _, value = orcpt.partition(";") if ";" in orcpt else ("rfc822", "", orcpt)
    kind = re.sub(r"[^A-Za-z0-9-]", "", kind).lower() or "unknown"
    address = _xtext_text(value.strip())
    if kind in ("rfc822", "utf-8"):
        return _typed_address(_unitext_unescape(address) if kind == "utf-8" else address, utf8)
    return f"{kind}; {_value(address, utf8)}"


def _date(when: float) -> str:
    """RFC 5322 date-time in UTC; the epoch for a time that cannot be represented."""
    try:
        moment = datetime.fromtimestamp(when, UTC)
    except (OverflowError, OSError, ValueError):
        moment = datetime.fromtimestamp(0, UTC)
    return format_datetime(moment)


def _chunks(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _field(name: str, *lines: str) -> str:
    """``name: value`` folded at spaces near :data:`_WIDTH`, each of ``lines`` on its own
    line; a word longer than :data:`_HARD` is split (which adds a space when unfolded)."""
    out: list[str] = []
    current, has_word = f"{name}:", False
    for index, text in enumerate(line for line in lines if line.strip()):
        if index:
            out.append(current)
            current, has_word = "", False
        for word in text.split(" "):
            for piece in _chunks(word, _HARD):
                if has_word and piece and len(current) + 1 + len(piece) > _WIDTH:
                    out.append(current)
                    current, has_word = "", False
                current += " " + piece
                has_word = has_word or bool(piece)
    out.append(current)
    return "\r\n".join(out) + "\r\n"


def _wrap(text: str, indent: str = "") -> list[str]:
    """``text`` wrapped for the human part; words are kept whole up to :data:`_HARD`."""
    words = " ".join(piece for word in text.split(" ") for piece in _chunks(word, _HARD))
    return textwrap.wrap(
        words, _WIDTH - 4, initial_indent=indent, subsequent_indent=indent,
        break_long_words=False, break_on_hyphens=False,
    )


# --- the original -------------------------------------------------------------------------


def _read_up_to(stream: BinaryIO, size: int) -> bytes:
    chunks: list[bytes] = []
    while size > 0:
        chunk = stream.read(size)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _crlf(data: bytes) -> bytes:
    """``data`` with every line ending CRLF, ending with one unless empty."""
    data = _LINE_END.sub(b"\r\n", data)
    return data if not data or data.endswith(b"\r\n") else data + b"\r\n"


def _sendable(data: bytes) -> bool:
    """Whether ``data`` (CRLF) may go as 7bit/8bit: no NUL, no line over 998 octets."""
    return b"\0" not in data and all(len(line) <= _MAX_LINE for line in data.split(b"\r\n"))


def _header_section(data: bytes, stream: BinaryIO) -> bytes:
    """The header section of the original (CRLF, without the empty line after it)."""
    if data.startswith((b"\r\n", b"\n")):
        return b""
    end = _HEADER_END.search(data)
    if end is None and len(data) < _MAX_HEADERS:
        data += _read_up_to(stream, _MAX_HEADERS - len(data))
        end = _HEADER_END.search(data)
    if end is not None:
        return _crlf(data[: end.start() + 1])
    if len(data) >= _MAX_HEADERS:  # cut off: keep complete lines only
        data = data[: data.rfind(b"\n") + 1]
    return _crlf(data)


def _read_original(stream: BinaryIO, ret: str, limit: int) -> _Returned:
    data = _read_up_to(stream, max(limit, 0) + 1)
    if ret == "HDRS":
        why = "hdrs"
    elif len(data) > limit:
        why = "size"
    else:
        body = _crlf(data)
        if _sendable(body):
            return _Returned(body, whole=True)
        why = "lines"
    return _Returned(_header_section(data, stream), whole=False, why=why)


def _original_part(returned: _Returned, utf8: bool) -> _Part:
    if returned.whole:
        kind = "message/global" if utf8 else "message/rfc822"
        return _Part(kind, "Undelivered Message", returned.body, _plain_encoding(returned.body))
    kind = "message/global-headers" if utf8 else "text/rfc822-headers"
    if _sendable(returned.body):
        return _Part(kind, "Message Headers", returned.body, _plain_encoding(returned.body))
    return _Part(kind, "Message Headers", _quoted_printable(returned.body), "quoted-printable")


def _plain_encoding(body: bytes) -> str:
    return "7bit" if body.isascii() else "8bit"


def _quoted_printable(body: bytes) -> bytes:
    return _crlf(binascii.b2a_qp(body, istext=True))


# --- part 1: for a person -----------------------------------------------------------------

_INTRO = {
    "failed": "Your message could not be delivered to one or more of its recipients. "
    "The mail system has given up on them; the details are below.",
    "delayed": "Your message has not yet been delivered to one or more of its recipients. "
    "The mail system is still trying. This is only a warning: the details are below.",
    "delivered": "This is the delivery report you asked for: your message reached the "
    "recipients below.",
}
_OUTCOME = {
    "failed": "Not delivered: the mail system has given up",
    "delayed": "Not delivered yet: the mail system keeps trying",
    "delivered": "Delivered",
    "relayed": "Passed on to a system that sends no delivery reports",
    "expanded": "Delivered to a list or alias, which passed it on to its members",
}
_ADVICE = {
    "failed": "What to do: check the address for typing mistakes. If it is right, the "
    "answer quoted above says why the message was refused; reach the recipient another "
    "way, or show this report to your mail administrator. To try again, send the "
    "message anew.",
    "delayed": "What to do: nothing yet. You will hear again if the mail system gives up. "
    "If the message is urgent, you may want to reach the recipient another way.",
    "delivered": "Nothing needs to be done.",
}
_RETURNED = {
    "": "Your message is attached below.",
    "hdrs": "As you asked, only the headers of your message are attached below.",
    "size": "Your message was larger than {limit} bytes, so only its headers are "
    "attached below.",
    "lines": "Your message has lines too long (or octets not allowed) to be returned as "
    "it is, so only its headers are attached below.",
}


def _action(recipient: RecipientReport) -> str:
    action = recipient.action.strip().lower()
    return action if action in ACTIONS else "failed"


def _kind(action: str) -> str:
    """``failed``, ``delayed``, or ``delivered`` for every kind of success."""
    return "delivered" if action in _SUCCESS else action


def _worst(report: Report) -> str:
    kinds = {_kind(_action(recipient)) for recipient in report.recipients}
    return next((kind for kind in ("failed", "delayed") if kind in kinds), "delivered")


def _human_part(report: Report, returned: _Returned, limit: int, utf8: bool) -> _Part:
    text = "\r\n".join(_human_lines(report, returned, limit)) + "\r\n"
    body = text.encode("utf-8")
    if body.isascii() or utf8:
        return _Part("text/plain; charset=utf-8", "Notification", body, _plain_encoding(body))
    return _Part("text/plain; charset=utf-8", "Notification", _quoted_printable(body),
                 "quoted-printable")


def _human_lines(report: Report, returned: _Returned, limit: int) -> list[str]:
    mta = _clean(report.reporting_mta)
    lines = [f"This is the mail system at {mta}.", "", *_wrap(_INTRO[_worst(report)]), ""]
    for recipient in report.recipients:
        lines += [*_recipient_lines(recipient), ""]
    kinds = {_kind(_action(recipient)) for recipient in report.recipients}
    for kind in ("failed", "delayed", "delivered"):
        if kind in kinds:
            lines += [*_wrap(_ADVICE[kind]), ""]
    lines += _wrap(_about_original(report, returned, limit))
    return lines


def _recipient_lines(recipient: RecipientReport) -> list[str]:
    action = _action(recipient)
    lines = [f"<{_clean(recipient.address)}>"]
    lines += _wrap(f"{_OUTCOME[action]} (status {_status(recipient, action)}).", "    ")
    lines += _answer_lines(recipient)
    if recipient.last_attempt is not None:
        lines.append(f"    Last attempt: {_date(recipient.last_attempt)}")
    if action == "delayed" and recipient.will_retry_until is not None:
        lines.append(f"    Still trying until: {_date(recipient.will_retry_until)}")
    return lines


def _answer_lines(recipient: RecipientReport) -> list[str]:
    host = _clean(recipient.remote_mta or "")
    quoted = _diagnostic_lines(recipient.diagnostic or "", utf8=True)
    if not quoted:
        return [f"    Server: {host}"] if host else []
    intro = f"    The server {host} answered:" if host else "    The reason given was:"
    return [intro, *(wrapped for line in quoted for wrapped in _wrap(line, " " * 8))]


def _about_original(report: Report, returned: _Returned, limit: int) -> str:
    received = f"Your message was received on {_date(report.arrival)}"
    if report.received_from:
        received += f" from {_clean(report.received_from)}"
    queue = f" and queued as {_clean(report.queue_id)} (quote this to your mail administrator)."
    return received + queue + " " + _RETURNED[returned.why].format(limit=limit)


# --- part 2: for a program ----------------------------------------------------------------


def _status(recipient: RecipientReport, action: str) -> str:
    status = recipient.status.strip()
    return status if _STATUS.match(status) else _GENERIC_STATUS.get(action, "2.0.0")


def _diagnostic_lines(diagnostic: str, utf8: bool) -> list[str]:
    lines = (_value(line, utf8) for line in diagnostic.splitlines())
    return [line for line in lines if line]


def _status_part(report: Report, utf8: bool) -> _Part:
    blocks = [_message_fields(report, utf8)]
    blocks += [_recipient_fields(recipient, utf8) for recipient in report.recipients]
    body = "\r\n".join(blocks).encode("utf-8")
    kind = "message/global-delivery-status" if utf8 else "message/delivery-status"
    return _Part(kind, "Delivery report", body, _plain_encoding(body))


def _message_fields(report: Report, utf8: bool) -> str:
    fields = [
        _field("Reporting-MTA", f"dns; {_host(report.reporting_mta, utf8)}"),
        _field("X-Tayori-Queue-ID", _value(report.queue_id, utf8)),
    ]
    if report.envid is not None:
        fields.append(_field("Original-Envelope-Id", _value(_xtext_text(report.envid), utf8)))
    fields.append(_field("Arrival-Date", _date(report.arrival)))
    return "".join(fields)


def _recipient_fields(recipient: RecipientReport, utf8: bool) -> str:
    action = _action(recipient)
    fields: list[str] = []
    if recipient.orcpt is not None:
        fields.append(_field("Original-Recipient", _original_recipient(recipient.orcpt, utf8)))
    fields += [
        _field("Final-Recipient", _typed_address(recipient.address, utf8)),
        _field("Action", action),
        _field("Status", _status(recipient, action)),
    ]
    if recipient.remote_mta:
        fields.append(_field("Remote-MTA", f"dns; {_host(recipient.remote_mta, utf8)}"))
    diagnostic = _diagnostic_lines(recipient.diagnostic or "", utf8)
    if diagnostic:
        fields.append(_field("Diagnostic-Code", f"smtp; {diagnostic[0]}", *diagnostic[1:]))
    fields += _dates(recipient, action)
    return "".join(fields)


def _dates(recipient: RecipientReport, action: str) -> list[str]:
    fields: list[str] = []
    if recipient.last_attempt is not None:
        fields.append(_field("Last-Attempt-Date", _date(recipient.last_attempt)))
    if action == "delayed" and recipient.will_retry_until is not None:
        fields.append(_field("Will-Retry-Until", _date(recipient.will_retry_until)))
    return fields


# --- the whole message --------------------------------------------------------------------


def _boundary(queue_id: str, bodies: Sequence[bytes]) -> str:
    """A boundary from the queue id and randomness that occurs in none of ``bodies``."""
    stem = re.sub(r"[^A-Za-z0-9]", "", queue_id)[:30]
    while True:
        boundary = f"=_{stem}.{secrets.token_hex(8)}"
        marker = f"--{boundary}".encode("ascii")
        if not any(marker in body for body in bodies):
            return boundary


def _message_header(
    report: Report, now: float, message_id: str, boundary: str, utf8: bool
) -> str:
    report_type = "global-delivery-status" if utf8 else "delivery-status"
    msgid = re.sub(r"[<>\s]", "", _value(message_id, utf8=False))
    return "".join([
        _field("From", f"Mail Delivery System <MAILER-DAEMON@{_host(report.reporting_mta, utf8)}>"),
        _field("To", f"<{_clean(report.sender)}>"),
        _field("Subject", _SUBJECTS[_worst(report)]),
        _field("Date", _date(now)),
        _field("Message-ID", f"<{msgid}>"),
        _field("Auto-Submitted", "auto-replied"),
        _field("MIME-Version", "1.0"),
        _field("Content-Type", f"multipart/report; report-type={report_type};",
               f'boundary="{boundary}"'),
    ])


def _part_header(part: _Part) -> str:
    return "".join([
        _field("Content-Type", part.content_type),
        _field("Content-Description", part.description),
        _field("Content-Transfer-Encoding", part.encoding),
    ])


def _assemble(head: str, parts: Iterable[_Part], boundary: str) -> bytes:
    delimiter = f"\r\n--{boundary}\r\n".encode("ascii")
    out = [head.encode("utf-8"), b"\r\nThis is a MIME-encapsulated message.\r\n"]
    for part in parts:
        out += [delimiter, _part_header(part).encode("ascii"), b"\r\n", part.body]
    out.append(f"\r\n--{boundary}--\r\n".encode("ascii"))
    return b"".join(out)
