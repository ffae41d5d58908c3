"""SMTP replies as values.

Takes: nothing; every stage imports it.
Promises: a :class:`Reply` renders to exactly the bytes that go on the wire (code,
RFC 3463 enhanced status, public text; multi-line with ``-`` continuation).
:data:`INTERNAL_ERROR` is the answer to anything unforeseen: temporary (``451 4.3.0``),
so it never turns into a permanent rejection, and never the text of an exception
(DESIGN §2.4).
Standards: RFC 5321 §4.2 (reply syntax), RFC 3463 and RFC 2034 (enhanced status codes).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: ``code`` (3 digits), optional enhanced ``status``, public ``text``.

    ``text`` may hold several lines separated by ``\\n``; each becomes one reply line.
    """

    code: int
    status: str | None
    text: str

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"reply code out of range: {self.code}")
        if "\r" in self.text:
            raise ValueError("reply text must not contain CR")

    @property
    def is_positive(self) -> bool:
        return self.code < 400

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def lines(self) -> list[str]:
        prefix = f"{self.status} " if self.status else ""
        return [prefix + line if line else prefix.rstrip() for line in self.text.split("\n")]

    def to_bytes(self) -> bytes:
        lines = self.lines()
        last = len(lines) - 1
        out = [
            f"{self.code}{' ' if i == last else '-'}{line}\r\n" for i, line in enumerate(lines)
        ]
        return "".join(out).encode("utf-8", "replace")

    def __str__(self) -> str:
        return " | ".join(f"{self.code} {line}" for line in self.lines())


INTERNAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
