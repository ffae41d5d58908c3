"""The 8BITMIME downgrade against the MIME corpus (../shared/testdata/mime, see its README).

The corpus is all 7-bit: every file is ASCII, and only the UW torture test and msg_26 have
CRLF line ends. So each message is used three ways:

1. as the spool holds it (CRLF): already 7bit data, so returned unchanged (DESIGN §2.3);
2. as the file holds it: the LF line ends become CRLF, and nothing else changes;
3. made 8-bit, as an 8BITMIME/BINARYMIME sender could send it: every leaf decoded and
   labelled 8bit (text, with UTF-8 text appended) or binary (anything else), and a raw UTF-8
   Subject. Downgraded, it must be 7bit data that parses to the same tree (content types in
   walk order) with the same decoded leaves as that 8-bit message, and the 8-bit message
   must keep the content types of the corpus message it came from.

No file is excluded. In the 8-bit form, the header blocks inside message/delivery-status
(msg_16, msg_43) stay as they are: the ``email`` package reads each block as a header-only
message, and text appended to one would add blocks, changing the tree under test rather
than testing the downgrade (8-bit fields in such blocks are a unit test).
"""

from __future__ import annotations

import email.message
import email.policy
import io
from collections.abc import Iterator
from email.generator import BytesGenerator
from pathlib import Path

import pytest

from harness import SHARED, shared_data
from tayori.deliver.downgrade import downgrade, needs_downgrade
from unit.test_downgrade import assert_7bit, mime_tree, parse

MIME = SHARED / "mime"
FILES = sorted([*MIME.glob("*.eml"), *MIME.glob("cpython-email/*.txt")]) if MIME.exists() else []
CASES = FILES or [MIME]   # without the corpus: one case, which skips saying why
EXTRA = "\r\nGrüße aus Köln, 日本語 — naïve café\r\n".encode()
WRITE = email.policy.compat32.clone(linesep="\r\n", max_line_length=0)


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def raw_text(data: bytes) -> str:
    """Octets as the ``email`` package keeps raw 8-bit data in a str."""
    return data.decode("ascii", "surrogateescape")


def leaves(part: email.message.Message) -> Iterator[email.message.Message]:
    if part.get_content_type() == "message/delivery-status":
        return
    if part.is_multipart():
        for child in part.get_payload():
            yield from leaves(child)
    else:
        yield part


def subject(message: bytes) -> bytes:
    return str(parse(message)["Subject"] or "").encode("ascii", "replace") + " — Grüße".encode()


def eight_bit(message: bytes) -> bytes:
    """``message`` with 8-bit bodies and an 8-bit Subject (module doc, point 3)."""
    msg = parse(message)
    for part in list(leaves(msg)):
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        text = part.get_content_maintype() == "text"
        part.set_payload(raw_text(payload + EXTRA if text else payload))
        del part["Content-Transfer-Encoding"]
        part["Content-Transfer-Encoding"] = "8bit" if text else "binary"
    del msg["Subject"]
    msg["Subject"] = raw_text(subject(message))
    out = io.BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=WRITE).flatten(msg)
    return out.getvalue()


def test_corpus_present() -> None:
    shared_data("mime")
    assert len(FILES) >= 40


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.name)
def test_7bit_message_is_unchanged(path: Path) -> None:
    shared_data("mime")
    message = crlf(path.read_bytes())
    assert not needs_downgrade(message)
    assert downgrade(message) is message


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.name)
def test_lf_message_only_gets_crlf(path: Path) -> None:
    shared_data("mime")
    original = path.read_bytes()
    assert downgrade(original) == crlf(original)


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.name)
def test_8bit_message_downgrades_to_the_same_tree(path: Path) -> None:
    shared_data("mime")
    message = crlf(path.read_bytes())
    eight = eight_bit(message)
    assert needs_downgrade(eight)
    tree = mime_tree(eight)
    assert [ctype for ctype, _ in tree] == [ctype for ctype, _ in mime_tree(message)]
    out = downgrade(eight)
    assert_7bit(out)
    assert mime_tree(out) == tree
    decoded = email.header.make_header(email.header.decode_header(str(parse(out)["Subject"])))
    # decode_header collapses blanks beside encoded-words: compare words
    assert str(decoded).split() == subject(message).decode().split()
