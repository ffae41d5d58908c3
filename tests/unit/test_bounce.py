"""Unit and property tests for tayori.bounce: DSNs parsed back with the email package."""

from __future__ import annotations

import dataclasses
import email
import email.policy
import io
import re
from collections.abc import Iterator
from email.message import EmailMessage, Message
from email.utils import parsedate_to_datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tayori.bounce import RecipientReport, Report, compose, needs_8bitmime

PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None)

NOW = 1_700_000_200.0
ARRIVAL = 1_700_000_000.0
ATTEMPT = 1_700_000_100.0
RETRY_UNTIL = 1_700_400_000.0

ORIGINAL = (
    b"Received: from client.example ([192.0.2.1])\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: lunch\r\n"
    b"Message-ID: <orig-1@example.org>\r\n"
    b"\r\n"
    b"Shall we meet at noon?\r\n"
)

TOP_FIELDS = [
    "From", "To", "Subject", "Date", "Message-ID", "Auto-Submitted", "MIME-Version",
    "Content-Type",
]
BOB_DIAGNOSTIC = "550 5.1.1 <bob@example.net>: user unknown"


def failed(address: str = "bob@example.net", **extra: object) -> RecipientReport:
    fields: dict[str, object] = {
        "remote_mta": "mx1.example.net", "diagnostic": BOB_DIAGNOSTIC, "last_attempt": ATTEMPT,
    }
    fields.update(extra)
    return RecipientReport(address, "failed", "5.1.1", **fields)  # type: ignore[arg-type]


def delayed(address: str = "carol@example.net") -> RecipientReport:
    return RecipientReport(
        address, "delayed", "4.4.1", remote_mta="mx2.example.net",
        diagnostic="421 4.4.1 try later", last_attempt=ATTEMPT, will_retry_until=RETRY_UNTIL,
    )


def delivered(address: str = "dave@example.net") -> RecipientReport:
    return RecipientReport(
        address, "delivered", "2.0.0", remote_mta="mx3.example.net",
        diagnostic="250 2.0.0 Ok: queued as 1234", last_attempt=ATTEMPT,
    )


def report(*recipients: RecipientReport, **extra: object) -> Report:
    fields: dict[str, object] = {
        "reporting_mta": "mx.example.org", "queue_id": "Q1ABC", "sender": "alice@example.org",
        "arrival": ARRIVAL, "recipients": recipients or (failed(),), "envid": "QQ+2B314",
    }
    fields.update(extra)
    return Report(**fields)  # type: ignore[arg-type]


def check_lines(dsn: bytes) -> None:
    """Every line ends in CRLF, no bare CR or LF, none longer than 998 octets."""
    assert dsn.endswith(b"\r\n")
    lines = dsn.split(b"\r\n")
    assert all(b"\r" not in line and b"\n" not in line for line in lines)
    assert max(len(line) for line in lines) <= 998


def make(rep: Report | None = None, original: bytes = ORIGINAL, **options: int) -> bytes:
    dsn = compose(
        rep or report(), io.BytesIO(original), now=NOW, message_id="dsn-1@mx.example.org",
        **options,
    )
    check_lines(dsn)
    return dsn


def parse(dsn: bytes) -> EmailMessage:
    message = email.message_from_bytes(dsn, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def subparts(message: Message) -> list[EmailMessage]:
    """The parsed payload of a multipart or message/* part: a list of messages."""
    payload = message.get_payload()
    assert isinstance(payload, list)
    messages = [item for item in payload if isinstance(item, EmailMessage)]
    assert len(messages) == len(payload)
    return messages


def parts(dsn: bytes) -> list[EmailMessage]:
    message = parse(dsn)
    assert message.get_content_type() == "multipart/report"
    return subparts(message)


def raw_blocks(dsn: bytes) -> list[Message]:
    """The field blocks of the second part, parsed from its raw text (any DSN type)."""
    boundary = parse(dsn).get_boundary()
    assert boundary
    second = dsn.split(f"\r\n--{boundary}\r\n".encode())[2]
    body = second.partition(b"\r\n\r\n")[2].rstrip(b"\r\n")
    return [
        email.message_from_bytes(block + b"\r\n", policy=email.policy.default)
        for block in body.split(b"\r\n\r\n")
    ]


def status_blocks(dsn: bytes) -> list[EmailMessage]:
    """The blocks as the email package parses message/delivery-status, checked raw too."""
    second = parts(dsn)[1]
    assert second.get_content_type() == "message/delivery-status"
    blocks = subparts(second)
    assert [list(b.items()) for b in blocks] == [list(b.items()) for b in raw_blocks(dsn)]
    return blocks


def human(dsn: bytes) -> str:
    """The text for a person, as written: lines and all."""
    first = parts(dsn)[0]
    assert first.get_content_type() == "text/plain"
    assert first.get_content_charset() == "utf-8"
    text = first.get_content()
    assert isinstance(text, str)
    return text


def prose(dsn: bytes) -> str:
    """The text for a person, its whitespace made single spaces (wrapping undone)."""
    return " ".join(human(dsn).split())


def date(value: str | None) -> float:
    assert value is not None
    return parsedate_to_datetime(value).timestamp()


# --- the message and its structure -------------------------------------------------------


def test_header_fields() -> None:
    message = parse(make())
    assert list(message.keys()) == TOP_FIELDS
    assert message["From"] == "Mail Delivery System <MAILER-DAEMON@mx.example.org>"
    assert message["To"] == "alice@example.org"
    assert "<alice@example.org>" in make().decode()
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert date(message["Date"]) == NOW
    assert message["Message-ID"] == "<dsn-1@mx.example.org>"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"


def test_multipart_report_structure() -> None:
    dsn = make()
    message = parse(dsn)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    types = [part.get_content_type() for part in parts(dsn)]
    assert types == ["text/plain", "message/delivery-status", "message/rfc822"]
    assert dsn.isascii()
    assert not needs_8bitmime(dsn)


def test_per_message_fields() -> None:
    per_message = status_blocks(make())[0]
    assert per_message["Reporting-MTA"] == "dns; mx.example.org"
    assert per_message["X-Tayori-Queue-ID"] == "Q1ABC"
    assert per_message["Original-Envelope-Id"] == "QQ+314"  # xtext-decoded
    assert date(per_message["Arrival-Date"]) == ARRIVAL


def test_no_envid_no_original_envelope_id() -> None:
    per_message = status_blocks(make(report(envid=None)))[0]
    assert "Original-Envelope-Id" not in per_message


def test_per_recipient_fields() -> None:
    rep = report(failed(orcpt="rfc822;bob+2Bx@example.org"))
    blocks = status_blocks(make(rep))
    assert len(blocks) == 2
    block = blocks[1]
    assert list(block.keys()) == [
        "Original-Recipient", "Final-Recipient", "Action", "Status", "Remote-MTA",
        "Diagnostic-Code", "Last-Attempt-Date",
    ]
    assert block["Original-Recipient"] == "rfc822; bob+x@example.org"
    assert block.get_params(header="original-recipient") == [
        ("rfc822", ""), ("bob+x@example.org", ""),
    ]
    assert block["Final-Recipient"] == "rfc822; bob@example.net"
    assert block["Action"] == "failed"
    assert block["Status"] == "5.1.1"
    assert block["Remote-MTA"] == "dns; mx1.example.net"
    assert block["Diagnostic-Code"] == f"smtp; {BOB_DIAGNOSTIC}"
    assert date(block["Last-Attempt-Date"]) == ATTEMPT


def test_optional_recipient_fields_left_out() -> None:
    block = status_blocks(make(report(RecipientReport("bob@example.net", "failed", "5.0.0"))))[1]
    assert list(block.keys()) == ["Final-Recipient", "Action", "Status"]


def test_multi_line_diagnostic_is_folded() -> None:
    reply = "550-5.1.1 The email account that you tried to reach does not exist.\n550 5.1.1 See"
    dsn = make(report(failed(diagnostic=reply)))
    assert (
        b"Diagnostic-Code: smtp; 550-5.1.1 The email account that you tried to reach\r\n"
        b" does not exist.\r\n 550 5.1.1 See\r\n"
    ) in dsn
    block = status_blocks(dsn)[1]
    assert block["Diagnostic-Code"] == "smtp; " + reply.replace("\n", " ")
    assert "        550 5.1.1 See" in human(dsn).splitlines()


def test_long_diagnostic_word_is_split_below_the_line_limit() -> None:
    dsn = make(report(failed(diagnostic="550 " + "x" * 3000)))
    value = status_blocks(dsn)[1]["Diagnostic-Code"]
    assert value.replace(" ", "") == "smtp;550" + "x" * 3000
    assert "x" * 200 in human(dsn)


def test_human_part_explains() -> None:
    dsn = make(report(failed(), received_from="client.example [192.0.2.1]"))
    assert all(len(line) < 78 for line in human(dsn).splitlines())
    text = prose(dsn)
    assert "bob@example.net" in text
    assert BOB_DIAGNOSTIC in text
    assert "mx1.example.net" in text
    assert "Q1ABC" in text
    assert "client.example [192.0.2.1]" in text
    assert "given up" in text
    assert "check the address" in text
    assert "Tue, 14 Nov 2023 22:15:00 +0000" in text  # the last attempt
    assert "attached below" in text


# --- the original -------------------------------------------------------------------------


def test_full_original_attached_unchanged() -> None:
    third = parts(make())[2]
    assert third.get_content_type() == "message/rfc822"
    assert third["Content-Transfer-Encoding"] == "7bit"
    inner = subparts(third)[0]
    assert inner["Message-ID"] == "<orig-1@example.org>"
    assert ORIGINAL in make()


def test_eight_bit_original_gets_8bit_and_needs_8bitmime() -> None:
    original = ORIGINAL.replace(b"Shall we meet", "Treffen wir uns \u00fcm".encode())
    dsn = make(original=original)
    third = parts(dsn)[2]
    assert third["Content-Transfer-Encoding"] == "8bit"
    assert original in dsn
    assert needs_8bitmime(dsn)


def test_ret_hdrs_returns_only_the_header_section() -> None:
    dsn = make(report(ret="HDRS"))
    third = parts(dsn)[2]
    assert third.get_content_type() == "text/rfc822-headers"
    content = third.get_content()
    assert "Message-ID: <orig-1@example.org>" in content
    assert "noon" not in content
    assert b"Shall we meet" not in dsn
    assert "only the headers" in prose(dsn)


def test_size_cap_returns_headers_and_says_so() -> None:
    big = ORIGINAL + b"x" * 70 + b"\r\n"
    dsn = make(original=big, max_original=len(big) - 1)
    assert parts(dsn)[2].get_content_type() == "text/rfc822-headers"
    assert b"xxxxxxxxxx" not in dsn
    text = prose(dsn)
    assert f"larger than {len(big) - 1} bytes" in text
    assert "headers are attached" in text
    assert parts(make(original=big, max_original=len(big)))[2].get_content_type() == (
        "message/rfc822"
    )


def test_header_section_longer_than_the_cap_is_read_to_its_end() -> None:
    headers = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"y" * 60) for i in range(50))
    dsn = make(original=headers + b"\r\nbody\r\n", max_original=100)
    assert headers in dsn
    assert b"body" not in dsn.partition(headers)[2]


def test_lf_original_is_returned_with_crlf() -> None:
    dsn = make(original=ORIGINAL.replace(b"\r\n", b"\n"))
    assert ORIGINAL in dsn


def test_over_long_lines_return_headers_only() -> None:
    original = ORIGINAL + b"z" * 2000 + b"\r\n"
    dsn = make(original=original)
    assert parts(dsn)[2].get_content_type() == "text/rfc822-headers"
    assert "lines too long" in prose(dsn)


def test_over_long_header_line_is_quoted_printable() -> None:
    original = b"X-Long: " + b"w" * 2000 + b"\r\nSubject: s\r\n\r\n" + b"v" * 1200 + b"\r\n"
    third = parts(make(original=original))[2]
    assert third["Content-Transfer-Encoding"] == "quoted-printable"
    assert third.get_content().replace("\r\n", "\n") == (
        "X-Long: " + "w" * 2000 + "\nSubject: s\n"
    )


def test_empty_original() -> None:
    assert parts(make(original=b""))[2].get_content_type() == "message/rfc822"
    assert parts(make(report(ret="HDRS"), original=b""))[2].get_content() == ""


def test_boundary_avoids_the_content(monkeypatch: pytest.MonkeyPatch) -> None:
    tokens: Iterator[str] = iter(["aaaa", "bbbb"])
    monkeypatch.setattr("tayori.bounce.secrets.token_hex", lambda _n: next(tokens))
    dsn = make(original=ORIGINAL + b"--=_Q1ABC.aaaa\r\n")
    assert parse(dsn).get_boundary() == "=_Q1ABC.bbbb"
    assert len(parts(dsn)) == 3


# --- variants ------------------------------------------------------------------------------


def test_delayed() -> None:
    dsn = make(report(delayed()))
    assert parse(dsn)["Subject"] == "Delayed Mail (still being retried)"
    block = status_blocks(dsn)[1]
    assert block["Action"] == "delayed"
    assert block["Status"] == "4.4.1"
    assert date(block["Will-Retry-Until"]) == RETRY_UNTIL
    text = prose(dsn)
    assert "keeps trying" in text
    assert "nothing yet" in text
    assert "Sun, 19 Nov 2023 13:20:00 +0000" in text


def test_success() -> None:
    dsn = make(report(delivered()))
    assert parse(dsn)["Subject"] == "Successful Mail Delivery Report"
    block = status_blocks(dsn)[1]
    assert (block["Action"], block["Status"]) == ("delivered", "2.0.0")
    assert "Will-Retry-Until" not in block
    assert "Delivered" in human(dsn)


@pytest.mark.parametrize(
    ("action", "words"),
    [("relayed", "sends no delivery reports"), ("expanded", "list or alias")],
)
def test_other_successes(action: str, words: str) -> None:
    dsn = make(report(RecipientReport("list@example.net", action, "2.0.0")))
    assert parse(dsn)["Subject"] == "Successful Mail Delivery Report"
    assert status_blocks(dsn)[1]["Action"] == action
    assert words in prose(dsn)


def test_mixed_results_report_every_recipient_in_order() -> None:
    dsn = make(report(delivered(), delayed(), failed()))
    assert parse(dsn)["Subject"] == "Undelivered Mail Returned to Sender"
    blocks = status_blocks(dsn)[1:]
    assert [(b["Final-Recipient"], b["Action"]) for b in blocks] == [
        ("rfc822; dave@example.net", "delivered"),
        ("rfc822; carol@example.net", "delayed"),
        ("rfc822; bob@example.net", "failed"),
    ]
    text = prose(dsn)
    for address in ("dave@example.net", "carol@example.net", "bob@example.net"):
        assert address in text
    assert "421 4.4.1 try later" in text
    assert "check the address" in text and "nothing yet" in text
    assert make(report(delivered(), delayed())).count(b"Delayed Mail") == 1


def test_smtputf8_uses_the_global_types() -> None:
    orcpt = "utf-8;\\x{7528}\\x{6237}@\\x{4F8B}\\x{5B50}.\\x{6D4B}\\x{8BD5}"  # RFC 6533 xtext
    rep = report(failed("用户@例子.测试", orcpt=orcpt), sender="jürgen@example.org", smtputf8=True)
    original = "From: jürgen@example.org\r\nSubject: Grüße\r\n\r\nhallo\r\n".encode()
    dsn = make(rep, original=original)
    message = parse(dsn)
    assert message.get_param("report-type") == "global-delivery-status"
    assert message["To"] == "jürgen@example.org"
    types = [part.get_content_type() for part in parts(dsn)]
    assert types == ["text/plain", "message/global-delivery-status", "message/global"]
    block = raw_blocks(dsn)[1]
    assert block["Final-Recipient"] == "utf-8; 用户@例子.测试"
    assert block["Original-Recipient"] == "utf-8; 用户@例子.测试"
    assert "用户@例子.测试" in human(dsn)
    assert original in dsn
    assert needs_8bitmime(dsn)
    headers_only = make(dataclasses.replace(rep, ret="HDRS"), original=original)
    assert parts(headers_only)[2].get_content_type() == "message/global-headers"


def test_non_ascii_address_without_smtputf8_stays_ascii() -> None:
    dsn = make(report(failed("jörg@example.net", diagnostic="550 Empfänger unbekannt")))
    assert dsn.isascii()
    assert not needs_8bitmime(dsn)
    block = status_blocks(dsn)[1]
    assert block["Final-Recipient"] == "utf-8; j\\x{F6}rg@example.net"
    assert block["Diagnostic-Code"] == "smtp; 550 Empf?nger unbekannt"
    text = prose(dsn)
    assert "jörg@example.net" in text
    assert "550 Empfänger unbekannt" in text


def test_non_ascii_reporting_mta_becomes_a_label() -> None:
    dsn = make(Report("mx.bücher.example", "Q1", "a@example.org", ARRIVAL, (failed(),)))
    assert parse(dsn)["From"] == "Mail Delivery System <MAILER-DAEMON@mx.xn--bcher-kva.example>"
    assert status_blocks(dsn)[0]["Reporting-MTA"] == "dns; mx.xn--bcher-kva.example"


# --- odd input ------------------------------------------------------------------------------


def test_header_injection_in_a_diagnostic_adds_no_field() -> None:
    evil = "550 no\r\nBcc: victim@example.com\r\n\r\nX-Evil: 1\rSubject: pwned\x00\x85\u2028end"
    dsn = make(report(failed(diagnostic=evil, remote_mta="mx\r\nX-Evil: 2")))
    assert list(parse(dsn).keys()) == TOP_FIELDS
    blocks = status_blocks(dsn)
    assert len(blocks) == 2
    assert list(blocks[1].keys()) == [
        "Final-Recipient", "Action", "Status", "Remote-MTA", "Diagnostic-Code",
        "Last-Attempt-Date",
    ]
    assert not re.search(rb"\r\n(Bcc|X-Evil|Subject: pwned)", dsn)


def test_odd_values_never_raise() -> None:
    odd = RecipientReport(
        "bob\udcff@example.net", "bounced", "five", orcpt="rfc822;+ZZbad", remote_mta="",
        diagnostic="", last_attempt=float("nan"), will_retry_until=1e300,
    )
    rep = Report(
        "mx\x00.example.org", "Q\r\n1", "alice@example.org\r\nBcc: x@y", float("inf"),
        (odd,), envid="id+0D+0AX-Evil:+201", ret="hdrs",
    )
    dsn = make(rep, original=b"\x00\xff\r\n\r\n")
    assert list(parse(dsn).keys()) == TOP_FIELDS
    per_message, block = status_blocks(dsn)
    assert per_message["Original-Envelope-Id"] == "id  X-Evil: 1"
    assert block["Action"] == "failed"
    assert block["Status"] == "5.0.0"
    assert block["Original-Recipient"] == "rfc822; +ZZbad"
    assert date(block["Last-Attempt-Date"]) == 0.0
    assert "Remote-MTA" not in block and "Diagnostic-Code" not in block


@PROPERTY
@given(st.text(st.characters(exclude_categories=())))  # surrogates too
def test_any_diagnostic_gives_a_parseable_dsn(diagnostic: str) -> None:
    dsn = make(report(failed(diagnostic=diagnostic)))
    assert list(parse(dsn).keys()) == TOP_FIELDS
    assert len(parts(dsn)) == 3
    blocks = status_blocks(dsn)
    assert len(blocks) == 2
    keys = set(blocks[1].keys())
    assert {"Final-Recipient", "Action", "Status", "Remote-MTA"} <= keys
    assert keys <= {
        "Final-Recipient", "Action", "Status", "Remote-MTA", "Diagnostic-Code",
        "Last-Attempt-Date",
    }
    if "Diagnostic-Code" in keys:
        assert blocks[1]["Diagnostic-Code"].startswith("smtp; ")
