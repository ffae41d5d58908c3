"""Message content framing: DATA (dot-stuffed, CRLF.CRLF-terminated) and BDAT chunks.

Takes: the session's input buffer (a bytearray that this module consumes from the front).
Promises: :class:`DotReader` removes dot-stuffing and ends a message only at
``<CRLF>.<CRLF>`` (or ``.<CRLF>`` as the very first line); :class:`LineChecker` watches
BDAT content. Both report, rather than repair, what RFC 5321 forbids in text: a bare CR
or bare LF (fatal: the framing can no longer be trusted, so no SMTP smuggling), a line
over 1000 octets including CRLF, and a message over the size limit (both: keep reading
to the real end, then refuse). All checks run on whole buffers with C-speed bytes
methods; memory is bounded by the caller's buffer plus one line.
Failure policy: never raises on input; problems are returned as flags.
Standards: RFC 5321 §4.1.1.4, §4.5.2 (transparency), §4.5.3.1.6 (line length);
RFC 3030 (BDAT); CVE-2023-51764 family (smuggling).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_LINE = 1000          # octets, including CRLF (RFC 5321 §4.5.3.1.6)
MAX_LINE_TEXT = MAX_LINE - 2
PARTIAL_LINE_KEEP = 64 * 1024


def scan_lines(complete: bytes) -> tuple[bool, int]:
    """For text made of whole CRLF lines: (has a bare CR or LF, longest line without CRLF)."""
    crlf = complete.count(b"\r\n")
    bare = complete.count(b"\n") != crlf or complete.count(b"\r") != crlf
    longest = max(map(len, complete.split(b"\r\n"))) if complete else 0
    return bare, longest


@dataclass(slots=True)
class ContentState:
    """What a reader has found so far in one message."""

    size: int = 0
    too_big: bool = False
    line_too_long: bool = False
    bare_newline: bool = False


class DotReader:
    """Reads one DATA body out of the front of ``buffer``.

    ``read(buffer)`` returns (unstuffed chunk or b"", finished). Once ``state.too_big`` or
    ``state.line_too_long`` is set, no more data is returned, but the reader keeps
    consuming until the terminator. ``state.bare_newline`` ends reading at once.
    """

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.state = ContentState()
        self._mid_line = False

    def read(self, buffer: bytearray) -> tuple[bytes, bool]:
        last_lf = buffer.rfind(b"\n")
        if last_lf < 0:
            self._bound_partial_line(buffer)
            return b"", self.state.bare_newline
        region = bytes(buffer[: last_lf + 1])
        if not self._mid_line and region.startswith(b".\r\n"):
            end = 0
        else:
            found = region.find(b"\r\n.\r\n")
            end = found + 2 if found >= 0 else -1
        body = region if end < 0 else region[:end]
        was_mid_line, self._mid_line = self._mid_line, False
        bare, longest = scan_lines(body)
        if bare:
            self.state.bare_newline = True
            buffer.clear()
            return b"", True
        if longest > MAX_LINE_TEXT:
            self.state.line_too_long = True
        del buffer[: (end + 3) if end >= 0 else (last_lf + 1)]
        chunk = self._unstuff(body, was_mid_line)
        return chunk, end >= 0

    def _unstuff(self, body: bytes, was_mid_line: bool) -> bytes:
        if b"\n." in body:
            body = body.replace(b"\r\n.", b"\r\n")
        if body.startswith(b".") and not was_mid_line:
            body = body[1:]
        state = self.state
        state.size += len(body)
        if self.max_size and state.size > self.max_size:
            state.too_big = True
        if state.too_big or state.line_too_long:
            return b""
        return body

    def _bound_partial_line(self, buffer: bytearray) -> None:
        """A line without LF: once it is over the limit, keep only its last octet."""
        if len(buffer) <= PARTIAL_LINE_KEEP:
            if len(buffer) > MAX_LINE:
                self.state.line_too_long = True
            return
        self.state.line_too_long = True
        if b"\r" in buffer[:-1]:
            self.state.bare_newline = True
            buffer.clear()
            return
        keep = buffer[-1:] if buffer.endswith(b"\r") else b""
        buffer[:] = keep
        self._mid_line = True


class LineChecker:
    """Bare CR/LF and line-length checks across BDAT chunks of a text (non-binary) body."""

    def __init__(self, state: ContentState) -> None:
        self.state = state
        self._carry = b""

    def feed(self, data: bytes) -> None:
        text = self._carry + data if self._carry else data
        last_lf = text.rfind(b"\n")
        complete, self._carry = (text[: last_lf + 1], text[last_lf + 1 :]) if last_lf >= 0 \
            else (b"", text)
        if complete:
            bare, longest = scan_lines(complete)
            self.state.bare_newline |= bare
            self.state.line_too_long |= longest > MAX_LINE_TEXT
        if len(self._carry) > MAX_LINE:
            self.state.line_too_long = True
            self.state.bare_newline |= b"\r" in self._carry[:-1]
            self._carry = self._carry[-1:]

    def finish(self) -> None:
        """At the end of the message: a CR in the unterminated last line is a bare CR."""
        self.state.bare_newline |= b"\r" in self._carry
        self._carry = b""
