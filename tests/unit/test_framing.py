"""Unit and property tests for tayori.smtp.framing: DotReader (DATA) and LineChecker (BDAT)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tayori.smtp.framing import (
    MAX_LINE,
    MAX_LINE_TEXT,
    PARTIAL_LINE_KEEP,
    ContentState,
    DotReader,
    LineChecker,
    scan_lines,
)

PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None)
PAYLOADS = Path("/work/shared/testdata/smtp/payloads.json")
_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def has_bare_newline(data: bytes) -> bool:
    """Reference model: a CR not followed by LF, or an LF not preceded by CR."""
    return _BARE.search(data) is not None


def unstuffed(message: bytes) -> bytes:
    """Reference model: the content of a stuffed body that ends with CRLF (no terminator)."""
    lines = message.split(b"\r\n")
    assert lines[-1] == b""
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n"
                    for line in lines[:-1])


class Feed:
    """Drives one DotReader with pieces of input, as the engine does."""

    def __init__(self, max_size: int = 0) -> None:
        self.reader = DotReader(max_size)
        self.buffer = bytearray()
        self.output = bytearray()
        self.finished = 0

    def __call__(self, piece: bytes) -> bool:
        """Add ``piece``, read; True once the reader reports the end."""
        self.buffer += piece
        chunk, finished = self.reader.read(self.buffer)
        self.output += chunk
        if finished:
            self.finished += 1
        return finished

    @property
    def state(self) -> ContentState:
        return self.reader.state


def feed_all(pieces: Iterator[bytes] | list[bytes], max_size: int = 0) -> tuple[Feed, bytes]:
    """Feed pieces until the end; returns the feed and what was never offered to it."""
    feed = Feed(max_size)
    pieces = list(pieces)
    for index, piece in enumerate(pieces):
        if feed(piece):
            return feed, bytes(feed.buffer) + b"".join(pieces[index + 1 :])
    return feed, bytes(feed.buffer)


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


# --- scan_lines --------------------------------------------------------------------------


def test_scan_lines() -> None:
    assert scan_lines(b"") == (False, 0)
    assert scan_lines(b"abc\r\nde\r\n") == (False, 3)
    assert scan_lines(b"a\nb\r\n")[0]
    assert scan_lines(b"a\rb\r\n")[0]


# --- DotReader: normal content -----------------------------------------------------------


def test_simple_message() -> None:
    feed, rest = feed_all([b"Subject: hi\r\n\r\nhello\r\n.\r\n"])
    assert feed.finished == 1
    assert feed.output == b"Subject: hi\r\n\r\nhello\r\n"
    assert rest == b""
    assert feed.state == ContentState(size=len(feed.output))


def test_pipelined_bytes_after_the_terminator_are_left() -> None:
    feed, rest = feed_all([b"a\r\n.\r\nQUIT\r\nNOOP"])
    assert feed.output == b"a\r\n"
    assert rest == b"QUIT\r\nNOOP"


def test_dot_unstuffing() -> None:
    feed, _ = feed_all([b"..leading\r\nmid.dle\r\n...\r\n..\r\n. x\r\n.\r\n"])
    assert feed.output == b".leading\r\nmid.dle\r\n..\r\n.\r\n x\r\n"


def test_dot_as_the_very_first_line_ends_an_empty_message() -> None:
    feed, rest = feed_all([b".\r\nMAIL FROM:<a@b>\r\n"])
    assert feed.finished == 1
    assert feed.output == b""
    assert rest == b"MAIL FROM:<a@b>\r\n"
    assert not feed.state.bare_newline


def test_stuffed_first_line() -> None:
    feed, _ = feed_all([b"..\r\n.\r\n"])
    assert feed.output == b".\r\n"


def test_terminator_split_across_reads() -> None:
    feed, rest = feed_all([b"line\r", b"\n.", b"\r", b"\nNEXT"])
    assert feed.finished == 1
    assert feed.output == b"line\r\n"
    assert rest == b"NEXT"


def test_dot_at_line_start_after_a_read_boundary_is_the_terminator() -> None:
    feed, rest = feed_all([b"line\r\n", b".\r\n"])
    assert feed.finished == 1 and feed.output == b"line\r\n" and rest == b""


def test_nothing_is_returned_before_a_whole_line() -> None:
    feed = Feed()
    assert not feed(b"partial line without end")
    assert feed.output == b""
    assert not feed(b"\r\n")
    assert feed.output == b"partial line without end\r\n"


LINE = st.text(alphabet=st.sampled_from("a.b .\tZ\x00é"), max_size=30).map(
    lambda s: s.encode("utf-8"))


@PROPERTY
@given(st.lists(LINE, max_size=30), st.lists(st.integers(min_value=0), max_size=12),
       st.binary(max_size=20).filter(lambda b: b"\n" not in b and b"\r" not in b))
def test_random_splits_give_the_original(lines: list[bytes], cuts: list[int],
                                         trailing: bytes) -> None:
    original = b"".join(line + b"\r\n" for line in lines)
    stuffed = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n"
                       for line in lines)
    wire = stuffed + b".\r\n" + trailing
    points = sorted({c % (len(wire) + 1) for c in cuts})
    pieces = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True)]
    feed = Feed()
    leftover = bytearray()
    for piece in pieces:
        if feed.finished:
            leftover += piece
        else:
            feed(piece)
    assert feed.finished == 1
    assert bytes(feed.output) == original
    assert bytes(feed.buffer) + leftover == trailing
    assert feed.state == ContentState(size=len(original))


def reference_read(data: bytes) -> tuple[bool, bool, bytes]:
    """Reference model of reading all of ``data``: (finished, bare newline, content)."""
    if data.startswith(b".\r\n"):
        return True, False, b""
    end = data.find(b"\r\n.\r\n")
    body = data[: end + 2] if end >= 0 else data[: data.rfind(b"\n") + 1]
    if has_bare_newline(body):
        return True, True, b""
    return end >= 0, False, unstuffed(body) if end >= 0 else b""


DOTTY = st.lists(st.sampled_from([b".", b"..", b"\r\n", b"\r", b"\n", b"a", b"\x00", b" "]),
                 max_size=40).map(b"".join)


@PROPERTY
@given(st.one_of(st.binary(max_size=300), DOTTY), st.lists(st.integers(min_value=0), max_size=10))
def test_arbitrary_input_matches_the_reference(data: bytes, cuts: list[int]) -> None:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    finished, bare, content = reference_read(data)
    for feed, _ in (feed_all([data]), feed_all(pieces)):
        assert feed.finished == int(finished)
        assert feed.state.bare_newline == bare
        if finished and not bare:
            assert feed.output == content


# --- DotReader: smuggling ----------------------------------------------------------------


@pytest.mark.parametrize(
    "sequence",
    [b"\n", b"\r", b"\r\n.\n", b"\n.\r\n", b"\n.\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r", b"\r\r\n",
     b"\n\r\n.\r\n"],
)
@pytest.mark.parametrize("split", ["whole", "bytewise"])
def test_bare_newlines_never_terminate(sequence: bytes, split: str) -> None:
    check_smuggling(sequence, split)


def _payload_sequences() -> list[str]:
    if not PAYLOADS.exists():
        return []
    data = json.loads(PAYLOADS.read_text("utf-8"))["end_of_data_smuggling"]
    found: list[str] = []
    for source, value in data.items():
        if source.startswith("source_"):
            items = value.values() if isinstance(value, dict) else value
            found.extend(item for item in items if item not in found)
    return found


@pytest.mark.skipif(not PAYLOADS.exists(), reason=f"{PAYLOADS} is not present")
@pytest.mark.parametrize("sequence", _payload_sequences(), ids=repr)
@pytest.mark.parametrize("split", ["whole", "bytewise"])
def test_end_of_data_smuggling_payloads(sequence: str, split: str) -> None:
    check_smuggling(sequence.encode("latin-1"), split)


def test_payload_file_holds_sequences() -> None:
    if not PAYLOADS.exists():
        pytest.skip(f"{PAYLOADS} is not present")
    assert len(_payload_sequences()) >= 10


def check_smuggling(sequence: bytes, split: str) -> None:
    smuggled = b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@example.org>\r\n"
    wire = b"Subject: test\r\n\r\nbody" + sequence + smuggled + b".\r\n" + b"QUIT\r\n"
    bare = has_bare_newline(wire)
    feed, rest = feed_all(bytewise(wire) if split == "bytewise" else [wire])
    assert feed.finished == 1
    assert feed.state.bare_newline == bare
    if bare:
        # refused at once: nothing of the smuggled commands is handed on as content
        assert b"MAIL FROM" not in feed.output
        assert b"evil" not in feed.output
    else:
        # NUL variants and other odd-but-legal lines are data: the message goes on to
        # the real terminator and the smuggled text stays inside the message
        body = wire[: -len(b".\r\nQUIT\r\n")]
        assert bytes(feed.output) == unstuffed(body)
        assert rest == b"QUIT\r\n"


# --- DotReader: limits -------------------------------------------------------------------


@pytest.mark.parametrize(("length", "too_long"), [(MAX_LINE_TEXT, False),
                                                  (MAX_LINE_TEXT + 1, True)])
def test_line_length_limit(length: int, too_long: bool) -> None:
    feed, rest = feed_all([b"x" * length + b"\r\nnext\r\n.\r\nQUIT\r\n"])
    assert feed.finished == 1
    assert feed.state.line_too_long is too_long
    assert rest == b"QUIT\r\n"
    if too_long:
        assert feed.output == b""


def test_line_too_long_across_many_small_pieces() -> None:
    wire = b"y" * (MAX_LINE + 5) + b"\r\n.\r\n"
    feed, rest = feed_all([wire[i : i + 7] for i in range(0, len(wire), 7)])
    assert feed.finished == 1 and feed.state.line_too_long and rest == b""


def test_huge_line_is_bounded_and_the_terminator_still_found() -> None:
    feed = Feed()
    for _ in range(4):
        assert not feed(b"z" * (PARTIAL_LINE_KEEP // 2 + 1))
        assert len(feed.buffer) <= PARTIAL_LINE_KEEP + 1
    assert feed.state.line_too_long
    assert feed(b"\r\n.\r\n")
    assert not feed.state.bare_newline
    assert feed.output == b""


def test_huge_line_with_a_bare_cr_inside() -> None:
    feed = Feed()
    feed(b"z" * 100 + b"\r" + b"z" * PARTIAL_LINE_KEEP)
    assert feed.state.bare_newline


def test_size_limit_flagged_but_reading_continues_to_the_terminator() -> None:
    feed = Feed(max_size=100)
    assert not feed(b"a" * 60 + b"\r\n")
    assert feed.output == b"a" * 60 + b"\r\n"
    for _ in range(10):
        assert not feed(b"b" * 60 + b"\r\n")
    assert feed.state.too_big
    assert feed.output == b"a" * 60 + b"\r\n"  # nothing after the limit is handed on
    assert feed(b".\r\nQUIT\r\n")
    assert feed.buffer == b"QUIT\r\n"
    assert feed.state.size == 62 * 11


def test_size_limit_exact_is_fine() -> None:
    feed, _ = feed_all([b"12345678\r\n.\r\n"], max_size=10)
    assert not feed.state.too_big
    feed, _ = feed_all([b"123456789\r\n.\r\n"], max_size=10)
    assert feed.state.too_big


def test_size_counts_unstuffed_octets() -> None:
    feed, _ = feed_all([b"..\r\n.\r\n"], max_size=3)
    assert feed.state.size == 3 and not feed.state.too_big


# --- LineChecker -------------------------------------------------------------------------


def check(*chunks: bytes) -> ContentState:
    state = ContentState()
    checker = LineChecker(state)
    for chunk in chunks:
        checker.feed(chunk)
    checker.finish()
    return state


def test_line_checker_clean_text() -> None:
    state = check(b"Subject: x\r\n\r\nbody\r\n")
    assert not state.bare_newline and not state.line_too_long


def test_line_checker_crlf_split_between_chunks() -> None:
    assert not check(b"abc\r", b"\ndef\r", b"\n").bare_newline


def test_line_checker_unterminated_last_line_is_fine() -> None:
    assert not check(b"abc\r\ndef").bare_newline


def test_line_checker_bare_cr_at_the_end_is_flagged_by_finish() -> None:
    state = ContentState()
    checker = LineChecker(state)
    checker.feed(b"abc\r\ndef\r")
    assert not state.bare_newline  # the LF may still come in the next chunk
    checker.finish()
    assert state.bare_newline


@pytest.mark.parametrize(
    "chunks",
    [(b"abc\ndef\r\n",), (b"abc\r", b"x\r\n"), (b"a\r\n\n",), (b"abc", b"\n"), (b"a\rb",),
     (b"\r", b"\r\n")],
)
def test_line_checker_bare_newlines(chunks: tuple[bytes, ...]) -> None:
    assert check(*chunks).bare_newline


def test_line_checker_line_length_across_chunks() -> None:
    assert not check(b"x" * 500, b"x" * (MAX_LINE_TEXT - 500), b"\r\n").line_too_long
    assert check(b"x" * 500, b"x" * (MAX_LINE_TEXT - 499), b"\r\n").line_too_long
    assert check(b"x" * 700, b"x" * 700, b"\r\nshort\r\n").line_too_long


@PROPERTY
@given(st.binary(max_size=3000).map(lambda b: b.replace(b"\x00", b"x")),
       st.lists(st.integers(min_value=0), max_size=10))
def test_line_checker_split_does_not_matter(data: bytes, cuts: list[int]) -> None:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    whole, split = check(data), check(*pieces)
    assert split.bare_newline == whole.bare_newline == has_bare_newline(data)
    if not has_bare_newline(data) and data.endswith(b"\r\n"):
        longest = max(len(line) for line in data.split(b"\r\n"))
        assert split.line_too_long == whole.line_too_long == (longest > MAX_LINE_TEXT)


@PROPERTY
@given(st.lists(st.sampled_from([b"a", b"\r", b"\n", b"\r\n", b"x" * 300]), max_size=40),
       st.lists(st.integers(min_value=0), max_size=10))
def test_line_checker_newline_heavy(parts: list[bytes], cuts: list[int]) -> None:
    data = b"".join(parts)
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert check(*pieces).bare_newline == has_bare_newline(data)
