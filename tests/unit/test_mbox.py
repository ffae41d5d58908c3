"""tayori.deliver.mbox: the entry's envelope lines can never become more lines."""

from __future__ import annotations

import os
from pathlib import Path

from tayori.deliver import mbox

MESSAGE = b"Subject: hi\r\n\r\nFrom the start\r\nbody\r\n"


def append(tmp_path: Path, sender: str, delivered_to: str) -> bytes:
    source = tmp_path / "body"
    source.write_bytes(MESSAGE)
    fd = os.open(source, os.O_RDONLY)
    try:
        mbox.append(str(tmp_path / "mbox"), fd, sender=sender, delivered_to=delivered_to)
    finally:
        os.close(fd)
    return (tmp_path / "mbox").read_bytes()


def test_an_entry_is_written_as_mail_readers_expect(tmp_path: Path) -> None:
    entry = append(tmp_path, "a@example.net", "u@tayori.test")
    lines = entry.split(b"\n")
    assert lines[0].startswith(b"From a@example.net ")
    assert lines[1:4] == [b"Return-Path: <a@example.net>", b"Delivered-To: u@tayori.test",
                          b"Subject: hi"]
    assert b"\n>From the start\n" in entry and entry.endswith(b"body\n\n")


def test_line_breaks_in_the_envelope_forge_no_header_or_message(tmp_path: Path) -> None:
    """An ORCPT decoded from ``x+0D+0A...`` (or a sender with a NUL) is written on its
    one line, control characters as spaces: no forged Authentication-Results, no second
    mbox message."""
    forged = ("x@tayori.test\r\nAuthentication-Results: mx.tayori.test; dkim=pass\r\n\r\n"
              "From evil@example.net Mon Jan  1 00:00:00 2024\nSubject: fake")
    entry = append(tmp_path, "a\x00b@example.net\x7f", forged)
    lines = entry.split(b"\n")
    assert lines[1] == b"Return-Path: <a b@example.net >"
    assert lines[2] == (b"Delivered-To: x@tayori.test  Authentication-Results: mx.tayori.test;"
                        b" dkim=pass    From evil@example.net Mon Jan  1 00:00:00 2024 "
                        b"Subject: fake")
    assert lines[3] == b"Subject: hi"
    assert [line for line in lines if line.startswith(b"From ")] == [lines[0]]
    assert b"\r" not in entry and b"\x00" not in entry
