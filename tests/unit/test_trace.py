"""Unit and property tests for tayori.receive.trace: Received header and HeaderScanner."""

from __future__ import annotations

import email.utils
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tayori.receive.tls import TlsInfo
from tayori.receive.trace import MAX_HEADER_SCAN, HeaderScanner, protocol_name, received_header

PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None)
TLS = TlsInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", 256)
WHEN = 1_700_000_000.0
DATE = "Tue, 14 Nov 2023 22:13:20 +0000"


def header(**changes: Any) -> bytes:
    options: dict[str, Any] = {
        "helo": "client.example", "client_ip": "192.0.2.1", "client_name": "mail.client.example",
        "hostname": "mx.example", "protocol": "ESMTPS", "queue_id": "8BCDF9XYZ",
        "recipient": "user@example.org", "tls": TLS, "when": WHEN}
    options.update(changes)
    return received_header(**options)


# --- received_header ---------------------------------------------------------------------


def test_received_header_full() -> None:
    assert header() == (
        b"Received: from client.example (mail.client.example [192.0.2.1])\r\n"
        b"\tby mx.example (tayori) with ESMTPS id 8BCDF9XYZ\r\n"
        b"\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256 bits))\r\n"
        b"\tfor <user@example.org>; " + DATE.encode() + b"\r\n")


def test_received_header_without_tls_name_or_single_recipient() -> None:
    assert header(tls=None, client_name=None, recipient=None, protocol="ESMTP") == (
        b"Received: from client.example ([192.0.2.1])\r\n"
        b"\tby mx.example (tayori) with ESMTP id 8BCDF9XYZ\r\n"
        b"\t; " + DATE.encode() + b"\r\n")


def test_received_header_is_folded_with_crlf_only() -> None:
    raw = header()
    assert raw.endswith(b"\r\n")
    lines = raw[:-2].split(b"\r\n")
    assert all(b"\n" not in line and b"\r" not in line for line in lines)
    assert lines[0].startswith(b"Received: ")
    assert all(line.startswith(b"\t") for line in lines[1:])
    assert all(len(line) <= 998 for line in lines)


def test_received_header_date_is_rfc5322() -> None:
    raw = header().decode()
    date = raw.rsplit("; ", 1)[1].strip()
    assert email.utils.parsedate_to_datetime(date).timestamp() == WHEN


@pytest.mark.parametrize(
    "helo", ["evil (comment) [1.2.3.4]", "a\\b", "x\x00y\x7f", "bad\r\nInjected: yes"]
)
def test_client_text_cannot_break_out(helo: str) -> None:
    raw = header(helo=helo, client_name=helo)
    first = raw.split(b"\r\n")[0].decode()
    inner = first.removeprefix("Received: from ")
    assert inner.count("(") == 1 and inner.count(")") == 1
    assert inner.count("[") == 1 and inner.count("]") == 1
    assert b"\r\nInjected" not in raw and b"\x00" not in raw


def test_recipient_is_sanitised() -> None:
    raw = header(recipient="u>@x (y)")
    assert b"for <u>@x ?y?>;" in raw


def test_client_text_is_bounded() -> None:
    raw = header(helo="h" * 2000)
    assert len(raw.split(b"\r\n")[0]) < 400


def test_utf8_helo_is_kept() -> None:
    assert "b\u00fccher.example".encode() in header(helo="b\u00fccher.example")


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((False, False, False), "SMTP"),
        ((True, False, False), "ESMTP"),
        ((True, True, False), "ESMTPS"),
        ((False, True, False), "SMTP"),
        ((True, False, True), "UTF8SMTP"),
        ((True, True, True), "UTF8SMTPS"),
    ],
)
def test_protocol_name(args: tuple[bool, ...], name: str) -> None:
    assert protocol_name(*args) == name


# --- HeaderScanner -----------------------------------------------------------------------

MESSAGE = (
    b"Received: from a by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"received : from c\r\n\tby d; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"Subject: Received: not a header start\r\n"
    b"X-Received: not counted\r\n"
    b"Message-ID: <unique.1@client.example>\r\n"
    b"RECEIVED: from e\r\n"
    b"\r\n"
    b"Received: in the body, not counted\r\n"
    b"Message-ID: <body@not.header>\r\n"
)


def scan(*chunks: bytes, finish: bool = True) -> HeaderScanner:
    scanner = HeaderScanner()
    for chunk in chunks:
        scanner.feed(chunk)
    if finish:
        scanner.finish()
    return scanner


def test_header_scanner_whole() -> None:
    scanner = scan(MESSAGE, finish=False)
    assert scanner.done
    assert scanner.received == 3
    assert scanner.message_id == "<unique.1@client.example>"


def test_header_scanner_stops_at_the_blank_line() -> None:
    scanner = scan(b"Subject: x\r\n\r\n", finish=False)
    assert scanner.done and scanner.received == 0 and scanner.message_id is None
    scanner.feed(b"Received: late\r\nMessage-ID: <late@x>\r\n")
    assert scanner.received == 0 and scanner.message_id is None


def test_header_scanner_blank_line_split_across_chunks() -> None:
    scanner = scan(b"Received: x\r\n\r", b"\nReceived: body\r\n", finish=False)
    assert scanner.done and scanner.received == 1


def test_header_scanner_empty_header_section() -> None:
    scanner = scan(b"\r\nReceived: body\r\n", finish=False)
    assert scanner.done and scanner.received == 0


def test_header_scanner_finish_without_blank_line() -> None:
    scanner = scan(b"Received: a\r\nReceived: b\r\nMessage-ID: <m@x>\r\n", finish=False)
    assert not scanner.done
    scanner.finish()
    assert scanner.done and scanner.received == 2 and scanner.message_id == "<m@x>"


def test_header_scanner_bounded() -> None:
    scanner = HeaderScanner()
    line = b"Received: x\r\n"
    for _ in range(MAX_HEADER_SCAN // len(line) + 10):
        scanner.feed(line)
        if scanner.done:
            break
    assert scanner.done
    assert scanner.received <= MAX_HEADER_SCAN // len(line) + 1


@pytest.mark.parametrize(
    "head",
    [b"Message-ID:\r\n <unique.1@client.example>\r\n\r\n",
     b"Message-ID: <unique.1@\r\n client.example>\r\nSubject: x\r\n\r\n",
     b"Message-ID:\r\n\t<unique.1@client.example>\r\nSubject: x\r\n\r\n"],
)
def test_folded_message_id(head: bytes) -> None:
    """RFC 5322 §2.2.3: a field body may be folded; the unfolded Message-ID is wanted."""
    scanner = scan(head)
    assert scanner.message_id is not None
    assert scanner.message_id.replace(" ", "") == "<unique.1@client.example>"


def test_message_id_unfolded_with_trailing_space() -> None:
    assert scan(b"Message-ID:   <a@b>  \r\n\r\n").message_id == "<a@b>"


def test_message_id_missing_or_empty() -> None:
    assert scan(b"Subject: x\r\n\r\n").message_id is None
    assert scan(b"Message-ID:   \r\n\r\n").message_id is None


@PROPERTY
@given(st.lists(st.integers(min_value=0, max_value=len(MESSAGE)), max_size=12))
def test_header_scanner_split_anywhere(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    chunks = [MESSAGE[a:b] for a, b in zip([0, *points], [*points, len(MESSAGE)], strict=True)]
    scanner = scan(*chunks)
    assert scanner.received == 3
    assert scanner.message_id == "<unique.1@client.example>"


@PROPERTY
@given(st.integers(min_value=0, max_value=30), st.lists(st.integers(min_value=0), max_size=8))
def test_header_scanner_counts_received(count: int, cuts: list[int]) -> None:
    head = b"From: a@b\r\n" + b"Received: from x by y; date\r\n" * count + b"Subject: s\r\n"
    data = head + b"\r\nReceived: body\r\n" * 3
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert scan(*chunks).received == count
