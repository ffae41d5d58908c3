"""The aliases(5) file format: ``name: target, target, ...``.

Takes: the text of an aliases file. Continuation lines start with white space; ``#``
starts a comment line; a target in double quotes may hold commas (``"|cmd a, b"``).
Promises: :func:`parse_aliases` returns lower-cased names mapped to their targets, as
written (local names, addresses, ``|command``, ``/path/file``, ``:include:/path``);
malformed input raises :class:`AliasError` naming the line, so a bad file is refused at
start (config check) rather than half-used.
Failure policy: pure.
"""

from __future__ import annotations

from collections.abc import Iterator


class AliasError(ValueError):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line


def parse_aliases(text: str) -> dict[str, tuple[str, ...]]:
    aliases: dict[str, tuple[str, ...]] = {}
    for number, entry in _logical_lines(text):
        name, sep, rest = entry.partition(":")
        name = name.strip().strip('"').lower()
        if not sep or not name or any(c.isspace() for c in name):
            raise AliasError(number, f"expected 'name: target, ...', got {entry[:60]!r}")
        targets = tuple(t for t in (target_text(part) for part in split_targets(rest)) if t)
        if not targets:
            raise AliasError(number, f"alias {name!r} has no target")
        aliases[name] = targets
    return aliases


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """Lines joined with their continuations (lines starting with white space)."""
    current, start = "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] in " \t" and current:
            current += " " + line.strip()
            continue
        if current:
            yield start, current
        current, start = line.strip(), number
    if current:
        yield start, current


def split_targets(text: str) -> Iterator[str]:
    """Targets separated by commas; a quoted "|command, with commas" stays whole."""
    part, quoted = "", False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            yield part
            part = ""
        else:
            part += char
    yield part


def target_text(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1].strip()
    return text
