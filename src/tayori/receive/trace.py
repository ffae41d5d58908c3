"""Trace information added to received mail, and what is read back from its header.

Takes: the session's facts (client, HELO, protocol, TLS, queue id, recipients) and the
first bytes of the message content.
Promises: :func:`received_header` renders the RFC 5321 §4.4 ``Received:`` field (folded,
CRLF line ends, the TLS parameters as a comment) that tayori prepends to every message;
:class:`HeaderScanner` counts ``Received:`` fields (mail-loop detection) and picks up
the ``Message-ID`` for the log, reading at most the header section and never holding more
than :data:`MAX_HEADER_SCAN` bytes.
Failure policy: pure; malformed headers are simply not counted.
Standards: RFC 5321 §4.4, RFC 3848 (with-protocol names), RFC 6531 §3.7.3 (UTF8SMTP),
RFC 5322 §3.6.7.
"""

from __future__ import annotations

import datetime
import email.utils
import re

from tayori.receive.tls import TlsInfo

MAX_HEADER_SCAN = 256 * 1024
_RECEIVED = re.compile(rb"^received[ \t]*:", re.IGNORECASE | re.MULTILINE)
_MESSAGE_ID = re.compile(rb"^message-id[ \t]*:[ \t]*([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)",
                         re.IGNORECASE | re.MULTILINE)


def protocol_name(extended: bool, tls: bool, utf8: bool, authenticated: bool = False) -> str:
    """The ``with`` keyword: SMTP, ESMTP, ESMTPS, ESMTPSA, UTF8SMTPS... (RFC 3848, 6531)."""
    base = "UTF8SMTP" if utf8 else "ESMTP" if extended else "SMTP"
    if not (extended or utf8):
        return base
    return base + ("S" if tls else "") + ("A" if authenticated else "")


def received_header(*, helo: str, client_ip: str, client_name: str | None, hostname: str,
                    protocol: str, queue_id: str, recipient: str | None,
                    tls: TlsInfo | None, when: float) -> bytes:
    from_part = f"from {_safe(helo)} ({_safe(client_name) + ' ' if client_name else ''}" \
                f"[{client_ip}])"
    lines = [f"Received: {from_part}", f"\tby {hostname} (tayori) with {protocol} id {queue_id}"]
    if tls is not None:
        lines.append(f"\t(using {tls.version} with cipher {tls.cipher} ({tls.bits} bits))")
    date = email.utils.format_datetime(datetime.datetime.fromtimestamp(when, datetime.UTC))
    lines.append(f"\tfor <{_safe(recipient)}>; {date}" if recipient else f"\t; {date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def _safe(text: str) -> str:
    """No parentheses, brackets or controls from the client inside our comment syntax."""
    return "".join(c if c.isprintable() and c not in "()[]\\" else "?" for c in text)[:255]


class HeaderScanner:
    """Reads the header section out of streamed content."""

    def __init__(self) -> None:
        self._head = bytearray()
        self.done = False
        self.received = 0
        self.message_id: str | None = None

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        start = max(0, len(self._head) - 3)
        self._head += data[:MAX_HEADER_SCAN]
        end = self._head.find(b"\r\n\r\n", start)
        if self._head.startswith(b"\r\n"):
            end = 0
        if end >= 0 or len(self._head) >= MAX_HEADER_SCAN:
            self._finish(bytes(self._head[: end + 2] if end >= 0 else self._head))

    def finish(self) -> None:
        if not self.done:
            self._finish(bytes(self._head))

    def _finish(self, head: bytes) -> None:
        self.done = True
        self._head = bytearray()
        self.received = len(_RECEIVED.findall(head))
        match = _MESSAGE_ID.search(head)
        if match:
            value = match.group(1).decode("utf-8", "replace")
            self.message_id = " ".join(value.split())[:998] or None
