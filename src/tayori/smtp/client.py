"""The client side of the protocol, sans-IO: replies in, commands and content out.

Takes: bytes from a server (replies), and what a transaction needs (sender, recipients,
parameters, message content).
Promises:
- :class:`ReplyReader` turns server output into :class:`~tayori.errors.Reply` values,
  multi-line replies joined, the enhanced status code (RFC 2034) separated from the text;
  anything that is not a reply raises :class:`ProtocolError`.
- :class:`Capabilities` reads an EHLO/LHLO reply (RFC 5321 §4.1.1.1, the extensions'
  RFCs) into typed fields.
- :func:`mail_command` / :func:`rcpt_command` build MAIL and RCPT with exactly the
  parameters the server offered (SIZE, BODY, SMTPUTF8, RET, ENVID, NOTIFY, ORCPT).
- :class:`ContentEncoder` puts message content on the wire: every line ends in CRLF, a
  bare CR or LF becomes CRLF (so tayori never sends what could smuggle a second message,
  whatever the source), dot-stuffing for DATA (RFC 5321 §4.5.2), the final ``.``.
Failure policy: pure; malformed server output raises ProtocolError, never returns junk.
Standards: RFC 5321, RFC 2920 (PIPELINING), RFC 1870 (SIZE), RFC 6152 (8BITMIME),
RFC 3030 (CHUNKING, BINARYMIME), RFC 3461 (DSN), RFC 6531 (SMTPUTF8), RFC 2033 (LMTP).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tayori.errors import Reply

MAX_REPLY_LINE = 4096     # generous: RFC 5321 §4.5.3.1.5 allows 512 octets
MAX_REPLY_LINES = 200
_STATUS = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")
_BARE_NEWLINE = re.compile(rb"\r\n|\r|\n")


class ProtocolError(Exception):
    """The server sent something that is not an SMTP reply."""


@dataclass(slots=True)
class ReplyReader:
    """Collects reply lines; :meth:`feed` returns the replies completed so far."""

    _buffer: bytearray = field(default_factory=bytearray)
    _lines: list[str] = field(default_factory=list)
    _code: int = 0

    @property
    def buffered(self) -> bool:
        """True while part of a reply waits for the rest."""
        return bool(self._buffer or self._lines)

    def feed(self, data: bytes) -> list[Reply]:
        self._buffer += data
        replies = []
        while (end := self._buffer.find(b"\n")) >= 0:
            if end > MAX_REPLY_LINE:
                raise ProtocolError("reply line too long")
            raw = bytes(self._buffer[:end]).rstrip(b"\r")
            del self._buffer[:end + 1]
            reply = self._line(raw)
            if reply is not None:
                replies.append(reply)
        if len(self._buffer) > MAX_REPLY_LINE:
            raise ProtocolError("reply line too long")
        return replies

    def _line(self, raw: bytes) -> Reply | None:
        if len(raw) < 3 or not raw[:3].isdigit() or raw[3:4] not in (b"", b" ", b"-"):
            raise ProtocolError(f"not an SMTP reply: {raw[:80]!r}")
        code = int(raw[:3])
        if not 200 <= code <= 599 or (self._lines and code != self._code):
            raise ProtocolError(f"bad reply code: {raw[:80]!r}")
        self._code = code
        self._lines.append(_printable(raw[4:].decode("utf-8", "replace")))
        if len(self._lines) > MAX_REPLY_LINES:
            raise ProtocolError("reply has too many lines")
        if raw[3:4] == b"-":
            return None
        lines, self._lines = self._lines, []
        return _reply(code, lines)


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else " " for c in text)


def _reply(code: int, lines: list[str]) -> Reply:
    """Separate the enhanced status code when every line carries the same one."""
    match = _STATUS.match(lines[0])
    if match and match.group(1) == str(code)[0]:
        status = lines[0][:match.end()].strip()
        if all(line == status or line.startswith(status + " ") for line in lines):
            return Reply(code, status, "\n".join(line[len(status):].lstrip() for line in lines))
    return Reply(code, None, "\n".join(lines))


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What an EHLO (or LHLO) reply offers. ``size`` 0: SIZE without a limit."""

    extended: bool = False
    pipelining: bool = False
    size: int | None = None
    eightbitmime: bool = False
    binarymime: bool = False
    chunking: bool = False
    smtputf8: bool = False
    dsn: bool = False
    starttls: bool = False
    enhanced_status: bool = False
    auth: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, reply: Reply) -> Capabilities:
        keywords: dict[str, str] = {}
        for line in reply.text.split("\n")[1:]:
            keyword, _, rest = line.strip().partition(" ")
            keywords[keyword.upper()] = rest.strip()
        size = None
        if "SIZE" in keywords:
            value = keywords["SIZE"]
            size = int(value) if value.isdigit() else 0
        return cls(
            extended=True,
            pipelining="PIPELINING" in keywords,
            size=size,
            eightbitmime="8BITMIME" in keywords,
            binarymime="BINARYMIME" in keywords,
            chunking="CHUNKING" in keywords,
            smtputf8="SMTPUTF8" in keywords,
            dsn="DSN" in keywords,
            starttls="STARTTLS" in keywords,
            enhanced_status="ENHANCEDSTATUSCODES" in keywords,
            auth=frozenset(keywords.get("AUTH", "").upper().split()),
        )


@dataclass(frozen=True, slots=True)
class MailOptions:
    """What the envelope asks for; :func:`mail_command` keeps what the server offers."""

    size: int
    body: str = "7BIT"              # 7BIT | 8BITMIME | BINARYMIME
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None


def mail_command(sender: str, options: MailOptions, caps: Capabilities) -> bytes:
    params = []
    if caps.size is not None:
        params.append(f"SIZE={options.size}")
    if (options.body == "8BITMIME" and caps.eightbitmime) or \
            (options.body == "BINARYMIME" and caps.binarymime):
        params.append(f"BODY={options.body}")
    if options.smtputf8 and caps.smtputf8:
        params.append("SMTPUTF8")
    if caps.dsn:
        if options.ret:
            params.append(f"RET={options.ret}")
        if options.envid:
            params.append(f"ENVID={options.envid}")
    return _command(f"MAIL FROM:<{sender}>", params)


def rcpt_command(address: str, caps: Capabilities, notify: tuple[str, ...] | None = None,
                 orcpt: str | None = None) -> bytes:
    params = []
    if caps.dsn:
        if notify:
            params.append("NOTIFY=" + ",".join(notify))
        if orcpt:
            params.append(f"ORCPT={orcpt}")
    return _command(f"RCPT TO:<{address}>", params)


def _command(base: str, params: list[str]) -> bytes:
    line = " ".join([base, *params]) + "\r\n"
    if any(c in "\r\n" for c in line[:-2]):
        raise ValueError("a command must not contain CR or LF")
    return line.encode("utf-8")


class ContentEncoder:
    """Message content to wire bytes, piece by piece: CRLF line ends, dot-stuffed when
    ``dot_stuff`` (DATA), and :meth:`end` closes the content (``.`` for DATA)."""

    def __init__(self, *, dot_stuff: bool) -> None:
        self._dot_stuff = dot_stuff
        self._line_start = True
        self._pending_cr = False

    def feed(self, chunk: bytes) -> bytes:
        if self._pending_cr:
            chunk = b"\r" + chunk
            self._pending_cr = False
        if chunk.endswith(b"\r"):        # its LF may come with the next piece
            chunk = chunk[:-1]
            self._pending_cr = True
        if not chunk:
            return b""
        lf = chunk.count(b"\n")
        if lf != chunk.count(b"\r") or lf != chunk.count(b"\r\n"):
            chunk = _BARE_NEWLINE.sub(b"\r\n", chunk)
        if self._dot_stuff:
            chunk = chunk.replace(b"\r\n.", b"\r\n..")
            if self._line_start and chunk.startswith(b"."):
                chunk = b"." + chunk
        self._line_start = chunk.endswith(b"\n")
        return chunk

    def end(self) -> bytes:
        """What completes the content: a final CRLF when missing, and ``.`` for DATA."""
        tail = b"\r\n" if self._pending_cr or not self._line_start else b""
        self._pending_cr, self._line_start = False, True
        return tail + (b".\r\n" if self._dot_stuff else b"")
