"""Unit and property tests for tayori.smtp.server.ServerEngine, driven with bytes."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tayori.errors import Reply
from tayori.smtp.sasl import MAX_RESPONSE
from tayori.smtp.server import (
    COMMAND_LINE_LIMIT,
    LINE_LIMITS,
    Authenticate,
    ChunkEnd,
    Event,
    Hello,
    MailFrom,
    MessageBegin,
    MessageData,
    MessageEnd,
    Mode,
    RcptTo,
    Refused,
    ServerEngine,
    Settings,
    StartTls,
    Verify,
)

PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None)
REPLY_LINE = re.compile(r"^[2-5]\d\d[ -]")

Answer = Callable[[Event], Reply | None]


class Client:
    """Feeds bytes to one engine and answers its events like a permissive application."""

    def __init__(self, **options: Any) -> None:
        self.engine = ServerEngine(Settings(hostname="mx.example", **options))
        self.engine.greet()
        self.greeting = self.engine.data_to_send()
        self.content = bytearray()

    def send(self, data: bytes, answer: Answer | None = None) -> list[Event]:
        """Feed ``data``; answer every event that waits (accept, or ``answer``'s reply;
        a MessageEnd with an error gets that error); return the events seen."""
        self.engine.receive(data)
        events: list[Event] = []
        while (event := self.engine.next_event()) is not None:
            events.append(event)
            if isinstance(event, MessageData):
                self.content += event.data
                continue
            if isinstance(event, Refused):
                continue
            reply = answer(event) if answer is not None else None
            if reply is None and isinstance(event, MessageEnd) and event.error is not None:
                reply = event.error
            if reply is None:
                self.engine.accept()
            else:
                self.engine.reply(reply)
        return events

    def replies(self) -> list[str]:
        """Replies sent since the last call, one string per reply (lines joined by |)."""
        return parse_replies(self.engine.data_to_send())

    def reply_to(self, data: bytes, answer: Answer | None = None) -> list[str]:
        self.send(data, answer)
        return self.replies()

    def ehlo(self, name: str = "client.example") -> None:
        self.send(f"EHLO {name}\r\n".encode())
        assert self.replies()[0].startswith("250-")

    def transaction(self, mail: str = "MAIL FROM:<a@x.example>",
                    rcpts: tuple[str, ...] = ("RCPT TO:<b@y.example>",)) -> None:
        self.ehlo()
        commands = [mail, *rcpts]
        out = self.reply_to("".join(c + "\r\n" for c in commands).encode())
        assert all(r.startswith("250 ") for r in out), out


def parse_replies(data: bytes) -> list[str]:
    text = data.decode("utf-8")
    assert text == "" or text.endswith("\r\n")
    replies: list[str] = []
    current: list[str] = []
    for line in text.split("\r\n")[:-1]:
        assert REPLY_LINE.match(line), line
        current.append(line)
        if line[3] == " ":
            replies.append("|".join(current))
            current = []
    assert current == []
    return replies


def kinds(events: list[Event]) -> list[str]:
    return [type(event).__name__ for event in events]


def refusals(events: list[Event]) -> list[tuple[str, int]]:
    return [(e.command, e.reply.code) for e in events if isinstance(e, Refused)]


# --- greeting and EHLO -------------------------------------------------------------------


def test_greeting() -> None:
    assert Client().greeting == b"220 mx.example ESMTP tayori\r\n"


def test_negative_greeting_closes() -> None:
    engine = ServerEngine(Settings(hostname="mx.example"))
    engine.greet(Reply(554, "5.3.2", "Not now"))
    assert engine.data_to_send() == b"554 5.3.2 Not now\r\n"
    assert engine.closed


EHLO_WITHOUT_TLS = ["250-mx.example greets client.example", "250-PIPELINING", "250-SIZE 1000",
                    "250-8BITMIME", "250-ENHANCEDSTATUSCODES", "250-SMTPUTF8", "250-CHUNKING",
                    "250-BINARYMIME", "250 DSN"]


def test_ehlo_keywords() -> None:
    client = Client(max_message_size=1000)
    events = client.send(b"EHLO client.example\r\n")
    assert events == [Hello("client.example", extended=True)]
    assert client.replies() == ["|".join(EHLO_WITHOUT_TLS)]
    assert "STARTTLS" not in client.engine.offered
    assert client.engine.helo == "client.example" and client.engine.extended


def test_ehlo_offers_starttls_only_when_available() -> None:
    client = Client(max_message_size=1000, tls_available=True)
    client.send(b"EHLO client.example\r\n")
    lines = client.replies()[0].split("|")
    assert lines[:-1] == [*EHLO_WITHOUT_TLS[:-1], "250-DSN"]
    assert lines[-1] == "250 STARTTLS"
    assert "STARTTLS" in client.engine.offered


def test_helo_offers_no_extensions() -> None:
    client = Client()
    assert client.reply_to(b"HELO client.example\r\n") == ["250 mx.example"]
    assert client.engine.offered == frozenset()
    assert client.reply_to(b"MAIL FROM:<a@x.example> SIZE=10\r\n")[0].startswith("555 5.5.4")


@pytest.mark.parametrize("line", [b"EHLO\r\n", b"EHLO   \r\n", b"HELO a b\r\n"])
def test_hello_syntax(line: bytes) -> None:
    client = Client()
    events = client.send(line)
    assert refusals(events)[0][1] == 501
    assert client.replies()[0].startswith("501 5.5.4")


def test_refused_hello_leaves_state_unchanged() -> None:
    client = Client()
    client.send(b"EHLO client.example\r\n", answer=lambda e: Reply(550, "5.7.1", "No"))
    assert client.replies() == ["550 5.7.1 No"]
    assert client.engine.helo is None


# --- command order -----------------------------------------------------------------------


def test_mail_before_ehlo() -> None:
    client = Client()
    events = client.send(b"MAIL FROM:<a@x.example>\r\n")
    assert refusals(events) == [("MAIL", 503)]
    assert client.replies() == ["503 5.5.1 Send HELO/EHLO first"]


def test_rcpt_before_mail() -> None:
    client = Client()
    client.ehlo()
    assert refusals(client.send(b"RCPT TO:<b@y.example>\r\n")) == [("RCPT", 503)]
    assert client.replies()[0].startswith("503 5.5.1")


@pytest.mark.parametrize("verb", [b"DATA", b"BDAT 0 LAST"])
def test_data_before_mail_and_before_rcpt(verb: bytes) -> None:
    client = Client()
    client.ehlo()
    assert client.reply_to(verb + b"\r\n")[0].startswith("503 5.5.1")
    client.send(b"MAIL FROM:<a@x.example>\r\n")
    client.replies()
    assert client.reply_to(verb + b"\r\n")[0].startswith("503 5.5.1")


def test_nested_mail() -> None:
    client = Client()
    client.transaction()
    events = client.send(b"MAIL FROM:<c@x.example>\r\n")
    assert refusals(events) == [("MAIL", 503)]
    assert client.replies() == ["503 5.5.1 Nested MAIL command"]


def test_rset_clears_the_transaction() -> None:
    client = Client()
    client.transaction()
    assert client.engine.transaction is not None
    assert client.reply_to(b"RSET\r\n") == ["250 2.0.0 Reset OK"]
    assert client.engine.transaction is None
    assert client.reply_to(b"RCPT TO:<b@y.example>\r\n")[0].startswith("503")
    assert client.reply_to(b"MAIL FROM:<a@x.example>\r\n")[0].startswith("250")


def test_ehlo_again_resets_the_transaction() -> None:
    client = Client()
    client.transaction()
    client.ehlo("again.example")
    assert client.engine.transaction is None


def test_noop_help_quit() -> None:
    client = Client()
    assert client.reply_to(b"NOOP\r\n") == ["250 2.0.0 OK"]
    assert client.reply_to(b"HELP\r\n")[0].startswith("214-2.0.0 Commands")
    assert client.reply_to(b"QUIT\r\nNOOP\r\n") == ["221 2.0.0 Bye"]
    assert client.engine.closed


def test_vrfy_and_expn() -> None:
    client = Client()
    assert client.send(b"VRFY someone\r\n") == [Verify("someone")]
    assert client.replies() == ["250 2.0.0 OK"]
    assert client.reply_to(b"VRFY\r\n")[0].startswith("501")
    assert client.reply_to(b"EXPN list\r\n")[0].startswith("502")


# --- bad commands ------------------------------------------------------------------------


def test_unknown_commands_then_421() -> None:
    client = Client(max_unknown_commands=3)
    for _ in range(3):
        events = client.send(b"XYZZY plugh\r\n")
        assert refusals(events) == [("XYZZY", 500)]
        assert client.replies() == ["500 5.5.1 Unknown command"]
        assert not client.engine.closed
    events = client.send(b"XYZZY\r\nNOOP\r\n")
    assert refusals(events) == [("XYZZY", 421)]
    assert client.replies() == ["421 4.7.0 Too many unknown commands, closing connection"]
    assert client.engine.closed
    assert client.send(b"NOOP\r\n") == []
    assert client.replies() == []


@pytest.mark.parametrize(
    "request_line",
    [b"GET / HTTP/1.1", b"POST /submit HTTP/1.0", b"CONNECT mx.example:25 HTTP/1.1",
     b"BREW /pot HTTP/1.1"],
)
def test_http_request_is_refused_and_closed(request_line: bytes) -> None:
    client = Client()
    events = client.send(request_line + b"\r\nHost: mx.example\r\n\r\n")
    assert refusals(events)[0][1] == 502
    assert client.replies() == ["502 5.7.0 This is an SMTP server, not HTTP; closing"]
    assert client.engine.closed


def test_command_line_limit() -> None:
    client = Client()
    exact = b"NOOP " + b"x" * (COMMAND_LINE_LIMIT - 7) + b"\r\n"
    assert len(exact) == COMMAND_LINE_LIMIT
    assert client.reply_to(exact) == ["250 2.0.0 OK"]
    events = client.send(b"NOOP " + b"x" * (COMMAND_LINE_LIMIT - 6) + b"\r\n")
    assert refusals(events) == [("NOOP", 500)]
    assert client.replies() == ["500 5.5.6 Line too long"]
    assert client.reply_to(b"NOOP\r\n") == ["250 2.0.0 OK"]  # the session goes on


def test_mail_may_be_longer_than_512() -> None:
    client = Client()
    client.ehlo()
    line = b"MAIL FROM:<a@x.example> X-PAD=" + b"p" * 600 + b"\r\n"
    assert COMMAND_LINE_LIMIT < len(line) <= LINE_LIMITS["MAIL"]
    assert client.reply_to(line)[0].startswith("555 5.5.4")  # judged by its parameters
    too_long = b"MAIL FROM:<a@x.example> X-PAD=" + b"p" * LINE_LIMITS["MAIL"] + b"\r\n"
    assert client.reply_to(too_long) == ["500 5.5.6 Line too long"]


def test_rcpt_allowance() -> None:
    client = Client()
    client.transaction()
    line = b"RCPT TO:<c@y.example> ORCPT=rfc822;" + b"o" * 480 + b"@y.example\r\n"
    assert COMMAND_LINE_LIMIT < len(line) <= LINE_LIMITS["RCPT"]
    assert client.reply_to(line)[0].startswith("250 2.1.5")
    too_long = b"RCPT TO:<d@y.example> X=" + b"p" * LINE_LIMITS["RCPT"] + b"\r\n"
    assert client.reply_to(too_long) == ["500 5.5.6 Line too long"]


def test_very_long_line_in_pieces_is_skipped() -> None:
    client = Client()
    for _ in range(10):
        assert client.send(b"y" * 1000) == []
    assert client.engine.buffered <= 4096 + 1000
    events = client.send(b"yyy\r\nNOOP\r\n")
    assert refusals(events) == [("?", 500)]
    assert client.replies() == ["500 5.5.6 Line too long", "250 2.0.0 OK"]


def test_nul_in_argument() -> None:
    client = Client()
    client.ehlo()
    events = client.send(b"MAIL FROM:<a\x00b@x.example>\r\n")
    assert refusals(events) == [("MAIL", 501)]
    assert client.replies() == ["501 5.5.2 NUL is not allowed in commands"]


def test_invalid_utf8_command() -> None:
    client = Client()
    assert client.reply_to(b"NOOP \xff\xfe\r\n") == ["500 5.5.2 Command is not valid UTF-8"]


@pytest.mark.parametrize("line", [b"EHLO client.example\n", b"NOOP\rx\r\n", b"NOOP\r\r\n",
                                  b"NOOP\n\r\n"])
def test_bare_newline_in_command_closes_with_521(line: bytes) -> None:
    client = Client()
    events = client.send(line + b"NOOP\r\n")
    assert refusals(events) == [("command", 521)]
    assert client.replies() == ["521 5.5.2 Bare CR or LF in command is not allowed, closing"]
    assert client.engine.closed


def test_too_many_errors_closes_with_421() -> None:
    client = Client(max_errors=3)
    client.send(b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\nNOOP\r\n")
    assert client.replies() == ["503 5.5.1 Send HELO/EHLO first",
                                "503 5.5.1 Need MAIL command first",
                                "503 5.5.1 Need MAIL command first",
                                "421 4.7.0 Too many errors, closing connection"]
    assert client.engine.closed


def test_answer_without_a_pending_event_is_an_error() -> None:
    with pytest.raises(RuntimeError):
        Client().engine.accept()


# --- MAIL and RCPT -----------------------------------------------------------------------


def test_mail_from_null_path_and_params() -> None:
    client = Client()
    client.ehlo()
    events = client.send(b"MAIL FROM:<> SIZE=100 BODY=8BITMIME RET=HDRS ENVID=x+2By\r\n")
    assert len(events) == 1 and isinstance(events[0], MailFrom)
    assert events[0].sender is None
    assert events[0].params.size == 100 and events[0].params.envid == "x+2By"
    assert client.replies() == ["250 2.1.0 Sender OK"]
    assert client.engine.transaction is not None


def test_mail_size_over_limit_is_552() -> None:
    client = Client(max_message_size=1000)
    client.ehlo()
    events = client.send(b"MAIL FROM:<a@x.example> SIZE=1001\r\n")
    assert refusals(events) == [("MAIL", 552)]
    assert client.replies()[0].startswith("552 5.3.4")
    assert client.engine.transaction is None


def test_mail_size_with_non_ascii_digits_is_a_syntax_error() -> None:
    """RFC 1870 size-value is 1*20DIGIT; a superscript digit must give 501, not crash."""
    client = Client()
    client.ehlo()
    events = client.send("MAIL FROM:<a@x.example> SIZE=\u00b2\r\n".encode())
    assert refusals(events) == [("MAIL", 501)]


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"MAIL FROM <a@x.example>", "501 5.5.4"),
        (b"MAIL FROM:", "501 5.5.4"),
        (b"MAIL FROM:<a@xn--->", "501 5.1.8"),
        (b"MAIL FROM:<a@@x.example>", "501 5.1.7"),
        ("MAIL FROM:<jos\u00e9@x.example>".encode(), "553 5.6.7"),
        (b"MAIL FROM:<a@x.example> FOO=BAR", "555 5.5.4"),
        (b"MAIL FROM:<a@x.example> BODY=BINARY", "501 5.5.4"),
    ],
)
def test_mail_refusals(line: bytes, reply: str) -> None:
    client = Client()
    client.ehlo()
    assert client.reply_to(line + b"\r\n")[0].startswith(reply)


def test_smtputf8_address() -> None:
    client = Client()
    client.ehlo()
    events = client.send("MAIL FROM:<jos\u00e9@b\u00fccher.example> SMTPUTF8\r\n".encode())
    assert isinstance(events[0], MailFrom) and events[0].sender is not None
    assert events[0].sender.ascii_domain == "xn--bcher-kva.example"
    events = client.send("RCPT TO:<\u7528\u6237@\u4f8b\u5b50.\u5e7f\u544a>\r\n".encode())
    assert isinstance(events[0], RcptTo)


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"RCPT TO:<>", "501 5.1.3"),
        (b"RCPT TO:", "501 5.5.4"),
        (b"RCPT <b@y.example>", "501 5.5.4"),
        (b"RCPT TO:<b@xn--->", "501 5.1.2"),
        ("RCPT TO:<\u7528\u6237@y.example>".encode(), "553 5.6.7"),
        (b"RCPT TO:<b@y.example> NOTIFY=NEVER,SUCCESS", "501 5.5.4"),
        (b"RCPT TO:<b@y.example> SIZE=1", "555 5.5.4"),
    ],
)
def test_rcpt_refusals(line: bytes, reply: str) -> None:
    client = Client()
    client.ehlo()
    client.send(b"MAIL FROM:<a@x.example>\r\n")
    client.replies()
    assert client.reply_to(line + b"\r\n")[0].startswith(reply)


def test_rcpt_source_route_and_params() -> None:
    client = Client()
    client.ehlo()
    client.send(b"MAIL FROM:<a@x.example>\r\n")
    events = client.send(b"RCPT TO:<@relay.example:u@c.example> NOTIFY=FAILURE,DELAY "
                         b"ORCPT=rfc822;u@c.example\r\n")
    assert isinstance(events[0], RcptTo)
    assert str(events[0].recipient) == "u@c.example"
    assert events[0].params.notify == ("FAILURE", "DELAY")
    assert client.engine.transaction is not None
    assert [str(r.mailbox) for r in client.engine.transaction.recipients] == ["u@c.example"]


def test_rcpt_postmaster_without_domain_is_accepted() -> None:
    """RFC 5321 §4.5.1: "RCPT TO:<Postmaster>" (no domain) MUST be supported."""
    client = Client()
    client.ehlo()
    client.send(b"MAIL FROM:<a@x.example>\r\n")
    client.replies()
    events = client.send(b"RCPT TO:<Postmaster>\r\n")
    assert kinds(events) == ["RcptTo"]


def test_too_many_recipients() -> None:
    client = Client(max_recipients=2, max_errors=1)
    client.transaction(rcpts=("RCPT TO:<b@y.example>", "RCPT TO:<c@y.example>"))
    events = client.send(b"RCPT TO:<d@y.example>\r\n")
    assert refusals(events) == [("RCPT", 452)]
    assert client.replies() == ["452 4.5.3 Too many recipients"]
    assert not client.engine.closed  # not counted as an error
    assert client.engine.transaction is not None
    assert len(client.engine.transaction.recipients) == 2


def test_refused_recipient_is_not_in_the_transaction() -> None:
    client = Client()
    client.ehlo()
    client.send(b"MAIL FROM:<a@x.example>\r\n")
    client.send(b"RCPT TO:<b@y.example>\r\n", answer=lambda e: Reply(550, "5.1.1", "No such"))
    assert client.engine.transaction is not None
    assert client.engine.transaction.recipients == []
    assert client.replies() == ["250 2.1.0 Sender OK", "550 5.1.1 No such"]


# --- pipelining --------------------------------------------------------------------------


def test_pipelined_batch_events_and_replies_in_order() -> None:
    client = Client()
    client.ehlo()
    engine = client.engine
    engine.receive(b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\n"
                   b"RCPT TO:<c@y.example>\r\nDATA\r\n")
    first = engine.next_event()
    assert isinstance(first, MailFrom)
    assert engine.next_event() is None  # waits for the answer
    assert engine.data_to_send() == b""
    engine.accept()
    second = engine.next_event()
    assert isinstance(second, RcptTo) and str(second.recipient) == "b@y.example"
    engine.accept()
    third = engine.next_event()
    assert isinstance(third, RcptTo) and str(third.recipient) == "c@y.example"
    engine.reply(Reply(550, "5.1.1", "Unknown user"))
    assert engine.next_event() == MessageBegin(bdat=False)
    engine.accept()
    assert engine.next_event() is None
    assert parse_replies(engine.data_to_send()) == [
        "250 2.1.0 Sender OK", "250 2.1.5 Recipient OK", "550 5.1.1 Unknown user",
        "354 End data with <CR><LF>.<CR><LF>"]
    assert engine.transaction is not None
    assert [str(r.mailbox) for r in engine.transaction.recipients] == ["b@y.example"]


def test_pipelined_data_with_no_valid_recipient_gets_503() -> None:
    client = Client()
    client.ehlo()
    out = client.reply_to(b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n",
                          answer=lambda e: Reply(550, "5.1.1", "No")
                          if isinstance(e, RcptTo) else None)
    assert out == ["250 2.1.0 Sender OK", "550 5.1.1 No",
                   "503 5.5.1 Need RCPT command first (no valid recipients)"]


def test_whole_session_in_one_write() -> None:
    client = Client()
    events = client.send(b"EHLO c.example\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\n"
                         b"DATA\r\nSubject: hi\r\n\r\n..body\r\n.\r\nQUIT\r\n")
    assert kinds(events) == ["Hello", "MailFrom", "RcptTo", "MessageBegin", "MessageData",
                             "MessageEnd"]
    assert client.content == b"Subject: hi\r\n\r\n.body\r\n"
    codes = [r[:3] for r in client.replies()]
    assert codes == ["250", "250", "250", "354", "250", "221"]
    assert client.engine.closed


# --- DATA --------------------------------------------------------------------------------


def test_data_streams_content() -> None:
    client = Client()
    client.transaction()
    assert client.send(b"DATA\r\n") == [MessageBegin(bdat=False)]
    assert client.replies() == ["354 End data with <CR><LF>.<CR><LF>"]
    for piece in (b"Subject: x\r\n", b"\r\nline one\r", b"\nline two\r\n"):
        client.send(piece)
    assert client.replies() == []
    events = client.send(b".\r\n")
    assert isinstance(events[-1], MessageEnd) and events[-1].error is None
    assert client.content == b"Subject: x\r\n\r\nline one\r\nline two\r\n"
    assert client.replies() == ["250 2.0.0 OK"]
    assert client.engine.transaction is None


def test_refused_data_ends_the_transaction() -> None:
    client = Client()
    client.transaction()
    client.send(b"DATA\r\n", answer=lambda e: Reply(554, "5.7.1", "No thanks"))
    assert client.replies() == ["554 5.7.1 No thanks"]
    assert client.engine.transaction is None


def test_data_too_big_reported_only_after_the_terminator() -> None:
    client = Client(max_message_size=100)
    client.transaction()
    client.send(b"DATA\r\n")
    client.replies()
    for _ in range(10):
        events = client.send(b"x" * 50 + b"\r\n")
        assert not any(isinstance(e, MessageEnd) for e in events)
    assert client.replies() == []
    events = client.send(b".\r\n")
    end = events[-1]
    assert isinstance(end, MessageEnd) and end.error is not None
    assert (end.error.code, end.error.status) == (552, "5.3.4")
    assert end.content.too_big
    assert client.replies() == ["552 5.3.4 Message too big"]
    assert not client.engine.closed
    assert client.reply_to(b"MAIL FROM:<a@x.example>\r\n") == ["250 2.1.0 Sender OK"]


def test_data_line_too_long() -> None:
    client = Client()
    client.transaction()
    events = client.send(b"DATA\r\n" + b"x" * 1200 + b"\r\n.\r\n")
    end = events[-1]
    assert isinstance(end, MessageEnd) and end.error is not None
    assert end.error.code == 500 and end.error.status == "5.5.6"


@pytest.mark.parametrize("smuggle", [b"\n.\r\n", b"\r\n.\n", b"\n.\n", b"\r.\r\n"])
def test_data_smuggling_attempt_closes_with_521(smuggle: bytes) -> None:
    client = Client()
    client.transaction()
    events = client.send(b"DATA\r\nSubject: x\r\n\r\nbody" + smuggle
                         + b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<v@y.example>\r\n"
                           b"DATA\r\nsmuggled\r\n.\r\n")
    assert kinds(events)[0] == "MessageBegin"
    assert set(kinds(events)[1:-1]) <= {"MessageData"}  # never a command
    end = events[-1]
    assert isinstance(end, MessageEnd) and end.error is not None and end.error.code == 521
    assert end.content.bare_newline
    assert client.replies()[-1].startswith("521 5.5.2")
    assert client.engine.closed
    assert b"evil" not in client.content


# --- BDAT --------------------------------------------------------------------------------


def test_bdat_chunks() -> None:
    client = Client()
    client.transaction()
    events = client.send(b"BDAT 5\r\nhelloBDAT 8 LAST\r\n world\r\n")
    assert kinds(events) == ["MessageBegin", "MessageData", "ChunkEnd", "MessageData",
                             "MessageEnd"]
    assert events[0] == MessageBegin(bdat=True)
    assert events[2] == ChunkEnd(5)
    end = events[-1]
    assert isinstance(end, MessageEnd) and end.error is None and end.content.size == 13
    assert client.content == b"hello world\r\n"
    assert client.replies() == ["250 2.0.0 5 octets received", "250 2.0.0 OK"]
    assert client.engine.transaction is None


def test_bdat_bytewise() -> None:
    client = Client()
    client.transaction()
    wire = b"BDAT 7\r\nA\r\nB\r\nCBDAT 0 LAST\r\n"
    seen: list[Event] = []
    for i in range(len(wire)):
        seen += client.send(wire[i : i + 1])
    assert client.content == b"A\r\nB\r\nC"
    assert kinds([e for e in seen if not isinstance(e, MessageData)]) == [
        "MessageBegin", "ChunkEnd", "MessageEnd"]


def test_bdat_content_is_not_read_as_commands() -> None:
    client = Client()
    client.transaction()
    events = client.send(b"BDAT 6 LAST\r\nQUIT\r\nNOOP\r\n")
    assert client.content == b"QUIT\r\n"
    assert kinds(events) == ["MessageBegin", "MessageData", "MessageEnd"]
    assert client.replies() == ["250 2.0.0 OK", "250 2.0.0 OK"]
    assert not client.engine.closed


def test_bdat_without_transaction_consumes_its_bytes_then_503() -> None:
    client = Client()
    client.ehlo()
    events = client.send(b"BDAT 6\r\nQUIT\r\nNOOP\r\n")
    assert refusals(events) == [("BDAT", 503)]
    assert client.replies() == ["503 5.5.1 Need MAIL and RCPT before BDAT", "250 2.0.0 OK"]
    assert not client.engine.closed
    assert client.content == b""


def test_bdat_after_helo_is_refused() -> None:
    client = Client()
    client.send(b"HELO c.example\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\n")
    client.replies()
    events = client.send(b"BDAT 3 LAST\r\nabcNOOP\r\n")
    assert refusals(events) == [("BDAT", 503)]
    assert client.replies() == ["503 5.5.1 BDAT needs EHLO with CHUNKING", "250 2.0.0 OK"]


def test_bdat_exceeding_the_size_limit() -> None:
    client = Client(max_message_size=10)
    client.transaction()
    events = client.send(b"BDAT 11 LAST\r\n" + b"x" * 11)
    assert not any(isinstance(e, MessageData) for e in events)
    end = events[-1]
    assert isinstance(end, MessageEnd) and end.error is not None
    assert (end.error.code, end.error.status) == (552, "5.3.4")
    assert client.replies() == ["552 5.3.4 Message too big"]


def test_bdat_size_limit_across_chunks() -> None:
    client = Client(max_message_size=10)
    client.transaction()
    events = client.send(b"BDAT 6\r\nabcdefBDAT 6 LAST\r\nghijkl")
    end = events[-1]
    assert isinstance(end, MessageEnd) and end.error is not None and end.error.code == 552
    assert client.content == b"abcdef"


def test_data_after_bdat_is_503() -> None:
    client = Client()
    client.transaction()
    client.send(b"BDAT 3\r\nabc")
    client.replies()
    events = client.send(b"DATA\r\n")
    assert refusals(events) == [("DATA", 503)]
    assert client.replies() == ["503 5.5.1 DATA cannot follow BDAT"]


def test_binarymime_requires_bdat() -> None:
    client = Client()
    client.transaction(mail="MAIL FROM:<a@x.example> BODY=BINARYMIME")
    events = client.send(b"DATA\r\n")
    assert refusals(events) == [("DATA", 503)]
    assert client.replies()[0].startswith("503 ")
    events = client.send(b"BDAT 6 LAST\r\na\nb\r\x00\xff")
    end = events[-1]
    assert isinstance(end, MessageEnd) and end.error is None  # binary: no line checks
    assert client.content == b"a\nb\r\x00\xff"


def test_bdat_text_with_bare_lf_is_refused_but_session_goes_on() -> None:
    client = Client()
    client.transaction()
    events = client.send(b"BDAT 7 LAST\r\nab\ncd\r\n")
    end = events[-1]
    assert isinstance(end, MessageEnd) and end.error is not None
    assert (end.error.code, end.error.status) == (550, "5.6.0")
    assert not client.engine.closed
    assert client.replies()[0].startswith("550 5.6.0")
    assert client.reply_to(b"NOOP\r\n") == ["250 2.0.0 OK"]


def test_bdat_refused_at_begin() -> None:
    client = Client()
    client.transaction()
    events = client.send(b"BDAT 3\r\nabc",
                         answer=lambda e: Reply(554, "5.7.1", "No")
                         if isinstance(e, MessageBegin) else None)
    assert kinds(events) == ["MessageBegin", "Refused"]
    assert client.replies() == ["554 5.7.1 No"]
    assert client.engine.transaction is None
    assert client.content == b""


@pytest.mark.parametrize("line", [b"BDAT", b"BDAT x", b"BDAT 5 FIRST", b"BDAT 1 LAST more",
                                  b"BDAT -1", b"BDAT 1234567890123456789"])
def test_bdat_syntax_error_closes(line: bytes) -> None:
    client = Client()
    client.transaction()
    events = client.send(line + b"\r\n")
    assert refusals(events) == [("BDAT", 501)]
    assert client.replies()[0].startswith("421 4.5.0")
    assert client.engine.closed


def test_bdat_with_non_ascii_digit_size_does_not_crash() -> None:
    """RFC 3030: chunk-size = 1*DIGIT (ASCII). "BDAT ²" must be a syntax error (the engine
    promises that no exception escapes for bad input)."""
    client = Client()
    client.transaction()
    events = client.send("BDAT \u00b2\r\n".encode())
    assert refusals(events) == [("BDAT", 501)]
    assert client.engine.closed


# --- STARTTLS ----------------------------------------------------------------------------


def test_starttls_discards_pipelined_plaintext() -> None:
    client = Client(tls_available=True)
    client.ehlo()
    events = client.send(b"STARTTLS\r\nMAIL FROM:<evil@attacker.example>\r\n")
    assert events == [StartTls()]
    assert client.replies() == ["220 2.0.0 Ready to start TLS"]
    assert client.engine.buffered == 0
    assert client.send(b"RCPT TO:<v@y.example>\r\n") == []  # during the handshake: ignored
    assert client.replies() == []
    client.engine.tls_started()
    assert client.engine.helo is None and client.engine.transaction is None
    assert client.reply_to(b"MAIL FROM:<a@x.example>\r\n") == ["503 5.5.1 Send HELO/EHLO first"]
    client.send(b"EHLO client.example\r\n")
    ehlo = client.replies()[0]
    assert "STARTTLS" not in ehlo and ehlo.endswith("250 DSN")
    assert "STARTTLS" not in client.engine.offered
    assert client.reply_to(b"STARTTLS\r\n") == ["503 5.5.1 TLS is already active"]


def test_starttls_plaintext_arriving_before_the_answer_is_discarded() -> None:
    client = Client(tls_available=True)
    client.ehlo()
    engine = client.engine
    engine.receive(b"STARTTLS\r\n")
    assert engine.next_event() == StartTls()
    engine.receive(b"MAIL FROM:<evil@attacker.example>\r\n")
    engine.accept()
    assert engine.next_event() is None
    engine.tls_started()
    assert engine.next_event() is None
    assert parse_replies(engine.data_to_send()) == ["220 2.0.0 Ready to start TLS"]


def test_starttls_refusals() -> None:
    client = Client()
    client.ehlo()
    assert client.reply_to(b"STARTTLS\r\n") == ["502 5.5.1 STARTTLS is not available"]
    client = Client(tls_available=True)
    client.ehlo()
    assert client.reply_to(b"STARTTLS now\r\n")[0].startswith("501")
    client.send(b"MAIL FROM:<a@x.example>\r\n")
    client.replies()
    assert client.reply_to(b"STARTTLS\r\n") == ["503 5.5.1 Mail transaction in progress"]


def test_starttls_refused_by_the_application() -> None:
    client = Client(tls_available=True)
    client.ehlo()
    client.send(b"STARTTLS\r\n", answer=lambda e: Reply(454, "4.7.0", "TLS not available"))
    assert client.replies() == ["454 4.7.0 TLS not available"]
    assert client.reply_to(b"NOOP\r\n") == ["250 2.0.0 OK"]


# --- AUTH (RFC 4954) ---------------------------------------------------------------------

AUTH = {"auth_mechanisms": ("PLAIN", "LOGIN"), "auth_without_tls": True}
OK_235 = "235 2.7.0 Authentication successful"
USERNAME, PASSWORD = "334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6"


def b64(text: str | bytes) -> str:
    data = text.encode() if isinstance(text, str) else text
    return base64.b64encode(data).decode()


def auth_line(text: str) -> bytes:
    return f"{text}\r\n".encode()


PLAIN_IR = auth_line("AUTH PLAIN " + b64("\0user\0secret"))


def password_check(event: Event) -> Reply | None:
    """Accept user/secret, refuse other credentials with 535."""
    if isinstance(event, Authenticate) and (event.login, event.password) != ("user", "secret"):
        return Reply(535, "5.7.8", "Authentication credentials invalid")
    return None


def auth_client(**options: Any) -> Client:
    client = Client(**{**AUTH, **options})
    client.ehlo()
    return client


def test_ehlo_advertises_auth_only_when_usable() -> None:
    def ehlo_last(**options: Any) -> str:
        client = Client(**options)
        client.send(b"EHLO client.example\r\n")
        return client.replies()[0].split("|")[-1]

    assert ehlo_last() == "250 DSN"
    assert ehlo_last(auth_mechanisms=("PLAIN",)) == "250 DSN"  # plaintext: not offered
    assert ehlo_last(auth_mechanisms=("PLAIN",), tls_available=True) == "250 STARTTLS"
    assert ehlo_last(**AUTH) == "250 AUTH PLAIN LOGIN"
    assert ehlo_last(auth_mechanisms=("LOGIN", "PLAIN"), tls_active=True) \
        == "250 AUTH LOGIN PLAIN"
    assert "AUTH" in auth_client().engine.offered
    assert "AUTH" not in Client(auth_mechanisms=("PLAIN",)).engine.offered


def test_unknown_mechanism_in_settings_is_an_error() -> None:
    with pytest.raises(ValueError, match="CRAM-MD5"):
        Settings(hostname="mx.example", auth_mechanisms=("PLAIN", "CRAM-MD5"))


def test_auth_plain_with_initial_response() -> None:
    client = auth_client()
    events = client.send(PLAIN_IR)
    assert events == [Authenticate("PLAIN", "user", "secret", "")]
    assert client.replies() == [OK_235]
    assert client.engine.authenticated == "user"


def test_auth_plain_without_initial_response() -> None:
    client = auth_client()
    assert client.reply_to(b"auth plain\r\n") == ["334 "]
    assert client.engine.mode.name == "AUTH"
    events = client.send(auth_line(b64("admin\0user\0secret")))
    assert events == [Authenticate("PLAIN", "user", "secret", "admin")]
    assert client.replies() == [OK_235]
    assert client.engine.mode is Mode.COMMAND


def test_auth_login() -> None:
    client = auth_client()
    assert client.reply_to(b"AUTH LOGIN\r\n") == [USERNAME]
    assert client.reply_to(auth_line(b64("user"))) == [PASSWORD]
    events = client.send(auth_line(b64("secret")))
    assert events == [Authenticate("LOGIN", "user", "secret", "")]
    assert client.replies() == [OK_235]


def test_auth_login_with_initial_response() -> None:
    client = auth_client()
    assert client.reply_to(auth_line("AUTH LOGIN " + b64("user"))) == [PASSWORD]
    assert client.reply_to(auth_line(b64("secret"))) == [OK_235]


def test_auth_login_pipelined_responses_are_read_in_order() -> None:
    client = auth_client()
    batch = f"AUTH LOGIN\r\n{b64('user')}\r\n{b64('secret')}\r\nNOOP\r\n".encode()
    assert client.reply_to(batch) == [USERNAME, PASSWORD, OK_235, "250 2.0.0 OK"]


def test_auth_empty_initial_response() -> None:
    """``=`` is an empty initial response; for PLAIN that is a malformed message."""
    client = auth_client()
    events = client.send(b"AUTH PLAIN =\r\n")
    assert refusals(events) == [("AUTH", 501)]
    assert client.replies() == ["501 5.5.2 Malformed PLAIN message"]


def test_auth_cancelled() -> None:
    client = auth_client()
    client.send(b"AUTH LOGIN\r\n")
    events = client.send(b"*\r\n")
    assert refusals(events) == [("AUTH", 501)]
    assert client.replies() == [USERNAME, "501 5.0.0 Authentication cancelled"]
    assert client.engine.authenticated is None and client.engine.mode is Mode.COMMAND
    assert client.reply_to(b"NOOP\r\n") == ["250 2.0.0 OK"]
    assert client.reply_to(PLAIN_IR) == [OK_235]  # may try again


@pytest.mark.parametrize("lines", [
    [b"AUTH PLAIN not-base64\r\n"],
    [b"AUTH PLAIN\r\n", b"AHVzZXIAc2VjcmV\r\n"],
    [b"AUTH LOGIN\r\n", b"dXNlcg = =\r\n"],
])
def test_auth_bad_base64(lines: list[bytes]) -> None:
    client = auth_client()
    for line in lines:
        client.send(line)
    assert client.replies()[-1] == "501 5.5.2 Invalid base64 data"
    assert client.engine.authenticated is None and client.engine.mode is Mode.COMMAND


@pytest.mark.parametrize("message", [b"user\0secret", b"\0user\0", b"\0\0secret",
                                     b"\0user\0secret\0x", b"\0us\xffer\0secret"])
def test_auth_malformed_plain_message(message: bytes) -> None:
    client = auth_client()
    events = client.send(auth_line("AUTH PLAIN " + b64(message)))
    assert refusals(events) == [("AUTH", 501)]
    assert client.replies()[0].startswith("501 5.5.2")


def test_auth_response_line_limit() -> None:
    client = auth_client()
    longest = auth_line(b64(b"\0user\0" + b"s" * (MAX_RESPONSE // 4 * 3 - 6)))
    assert len(longest) == MAX_RESPONSE + 2
    client.send(b"AUTH PLAIN\r\n")
    events = client.send(longest)
    assert len(events) == 1 and isinstance(events[0], Authenticate)
    client = auth_client()
    client.send(b"AUTH PLAIN\r\n")
    events = client.send(b"A" * (MAX_RESPONSE + 4) + b"\r\nNOOP\r\n")
    assert refusals(events) == [("AUTH", 500)]
    assert client.replies() == ["334 ", "500 5.5.6 Authentication line too long",
                                "250 2.0.0 OK"]


def test_auth_response_too_long_arriving_in_pieces() -> None:
    client = auth_client()
    client.send(b"AUTH LOGIN\r\n")
    for _ in range(4):
        client.send(b"A" * 4096)
    assert client.engine.mode is Mode.SKIP_LINE
    client.send(b"AAAA\r\nNOOP\r\n")
    assert client.replies() == [USERNAME, "500 5.5.6 Line too long", "250 2.0.0 OK"]
    assert client.engine.authenticated is None


def test_auth_refused_without_tls() -> None:
    client = Client(auth_mechanisms=("PLAIN",), tls_available=True)
    client.ehlo()
    events = client.send(PLAIN_IR)
    assert refusals(events) == [("AUTH", 538)]
    assert client.replies() == [
        "538 5.7.11 Encryption required for requested authentication mechanism"]
    assert client.engine.authenticated is None


def test_auth_after_starttls() -> None:
    client = Client(auth_mechanisms=("PLAIN", "LOGIN"), tls_available=True)
    client.ehlo()
    client.send(b"STARTTLS\r\n")
    client.engine.tls_started()
    client.replies()
    client.send(b"EHLO client.example\r\n")
    assert client.replies()[0].endswith("|250 AUTH PLAIN LOGIN")
    assert client.reply_to(PLAIN_IR) == [OK_235]


def test_tls_started_clears_authentication() -> None:
    client = auth_client(tls_available=True)
    client.send(PLAIN_IR)
    assert client.engine.authenticated == "user"
    client.engine.tls_started()
    assert client.engine.authenticated is None


def test_auth_not_configured() -> None:
    client = Client()
    client.ehlo()
    assert client.reply_to(PLAIN_IR) == ["502 5.5.1 AUTH is not available"]


@pytest.mark.parametrize("hello", [b"", b"HELO client.example\r\n"])
def test_auth_before_ehlo(hello: bytes) -> None:
    client = Client(**AUTH)
    client.send(hello)
    client.replies()
    events = client.send(PLAIN_IR)
    assert refusals(events) == [("AUTH", 503)]
    assert client.replies() == ["503 5.5.1 Send EHLO first"]


def test_auth_twice() -> None:
    client = auth_client()
    assert client.reply_to(PLAIN_IR) == [OK_235]
    assert client.reply_to(b"AUTH LOGIN\r\n") == ["503 5.5.1 Already authenticated"]
    client.ehlo("again.example")  # EHLO keeps the authentication
    assert client.engine.authenticated == "user"


def test_auth_during_a_transaction() -> None:
    client = auth_client()
    client.send(b"MAIL FROM:<a@x.example>\r\n")
    client.replies()
    assert client.reply_to(PLAIN_IR) == ["503 5.5.1 Mail transaction in progress"]


@pytest.mark.parametrize(("command", "reply"), [
    (b"AUTH", "501 5.5.4 Syntax: AUTH mechanism [initial-response]"),
    (b"AUTH PLAIN a b", "501 5.5.4 Syntax: AUTH mechanism [initial-response]"),
    (b"AUTH CRAM-MD5", "504 5.5.4 Unrecognized authentication type"),
    (b"AUTH LOGIN", "504 5.5.4 Unrecognized authentication type"),
])
def test_auth_syntax_and_mechanism(command: bytes, reply: str) -> None:
    client = auth_client(auth_mechanisms=("PLAIN",))
    events = client.send(command + b"\r\n")
    assert refusals(events) == [("AUTH", int(reply[:3]))]
    assert client.replies() == [reply]


@pytest.mark.parametrize("refusal", [Reply(535, "5.7.8", "Authentication credentials invalid"),
                                     Reply(454, "4.7.0", "Temporary authentication failure")])
def test_auth_refused_by_the_application(refusal: Reply) -> None:
    client = auth_client()
    client.send(PLAIN_IR, answer=lambda e: refusal)
    assert client.replies() == [str(refusal)]
    assert client.engine.authenticated is None and not client.engine.closed
    assert client.reply_to(auth_line("AUTH PLAIN " + b64("\0user\0wrong")),
                           password_check)[0].startswith("535 5.7.8")
    assert client.reply_to(PLAIN_IR, password_check) == [OK_235]


def test_auth_answered_421_closes() -> None:
    client = auth_client()
    events = client.send(PLAIN_IR + b"NOOP\r\n",
                         answer=lambda e: Reply(421, "4.7.0", "Too many failed logins"))
    assert kinds(events) == ["Authenticate"]
    assert client.replies() == ["421 4.7.0 Too many failed logins"]
    assert client.engine.closed and client.engine.authenticated is None


def test_auth_required_before_mail() -> None:
    client = auth_client(auth_required=True)
    events = client.send(b"MAIL FROM:<a@x.example>\r\n")
    assert refusals(events) == [("MAIL", 530)]
    assert client.replies() == ["530 5.7.0 Authentication required"]
    client.send(PLAIN_IR)
    client.replies()
    assert client.reply_to(b"MAIL FROM:<a@x.example>\r\nRSET\r\nMAIL FROM:<a@x.example>\r\n") \
        == ["250 2.1.0 Sender OK", "250 2.0.0 Reset OK", "250 2.1.0 Sender OK"]
    assert client.engine.authenticated == "user"  # RSET keeps it


def test_pipelined_auth_and_mail_waits_for_the_auth_answer() -> None:
    client = auth_client(auth_required=True)
    engine = client.engine
    engine.receive(PLAIN_IR + b"MAIL FROM:<a@x.example>\r\n")
    assert engine.next_event() == Authenticate("PLAIN", "user", "secret", "")
    assert engine.next_event() is None  # the MAIL waits for the answer
    engine.accept()
    event = engine.next_event()
    assert isinstance(event, MailFrom)
    engine.accept()
    assert parse_replies(engine.data_to_send()) == [OK_235, "250 2.1.0 Sender OK"]


def test_mail_auth_parameter() -> None:
    client = auth_client()
    events = client.send(b"MAIL FROM:<a@x.example> AUTH=<>\r\n")
    assert isinstance(events[0], MailFrom) and events[0].params.auth == "<>"
    client.send(b"RSET\r\n")
    events = client.send(b"MAIL FROM:<a@x.example> AUTH=e+2Bf@x.example\r\n")
    assert isinstance(events[0], MailFrom) and events[0].params.auth == "e+2Bf@x.example"
    client.send(b"RSET\r\n")
    client.replies()
    assert client.reply_to(b"MAIL FROM:<a@x.example> AUTH=a\x01b\r\n")[0].startswith("501 5.5.4")
    plain = Client()
    plain.ehlo()
    assert plain.reply_to(b"MAIL FROM:<a@x.example> AUTH=<>\r\n")[0].startswith("555 5.5.4")


def test_help_lists_auth_when_offered() -> None:
    assert "STARTTLS AUTH" in auth_client().reply_to(b"HELP\r\n")[0]
    assert "AUTH" not in Client(auth_mechanisms=("PLAIN",)).reply_to(b"HELP\r\n")[0]


def test_password_never_in_events_replies_or_repr() -> None:
    client = auth_client()
    events = client.send(PLAIN_IR)
    assert "secret" not in repr(events)
    # A refused AUTH whose pipelined responses are then read as commands: the stray
    # lines are reported as "?", never by their text.
    client = auth_client(auth_mechanisms=("PLAIN",))
    secret = b64("\0user\0hunter2hunter2")
    events = client.send(f"AUTH LOGIN\r\n{secret}\r\n{secret}x\r\n".encode())
    assert refusals(events) == [("AUTH", 504), ("?", 500), ("?", 500)]
    out = "".join(client.replies())
    assert secret[:8] not in out and secret[:8] not in repr(events)
    assert refusals(client.send(b"XYZZY\r\n")) == [("?", 500)]
    client.send(b"NOOP\r\n")
    assert refusals(client.send(b"XYZZY\r\n")) == [("XYZZY", 421)]


# --- properties --------------------------------------------------------------------------

SNIPPETS = [
    b"EHLO c.example\r\n", b"HELO c.example\r\n", b"MAIL FROM:<a@x.example>\r\n",
    b"MAIL FROM:<> SIZE=10 BODY=BINARYMIME\r\n", b"RCPT TO:<b@y.example> NOTIFY=NEVER\r\n",
    b"RCPT TO:<Postmaster@y.example>\r\n", b"DATA\r\n", b".\r\n", b"..x\r\n", b"BDAT 3\r\n",
    b"BDAT 0 LAST\r\n", b"BDAT 4 LAST\r\n", b"RSET\r\n", b"NOOP\r\n", b"STARTTLS\r\n",
    b"VRFY x\r\n", b"QUIT\r\n", b"GET / HTTP/1.1\r\n", b"\r\n", b"\n", b"\r", b"\x00",
    b"MAIL FROM:<\xff>\r\n", b"RCPT TO:<x@[IPv6:::1]>\r\n", b"HELP\r\n", b"abc",
]
STREAM = st.lists(st.one_of(st.sampled_from(SNIPPETS), st.binary(max_size=30)), max_size=25)


def _answer_everything(client: Client, data: bytes) -> None:
    def answer(event: Event) -> Reply | None:
        if isinstance(event, StartTls):
            return Reply(220, "2.0.0", "Go ahead")
        return None

    events = client.send(data, answer)
    if any(isinstance(e, StartTls) for e in events) and client.engine.mode.name == "TLS_PENDING":
        client.engine.tls_started()


@PROPERTY
@given(STREAM, st.lists(st.integers(min_value=0), max_size=10), st.booleans())
def test_arbitrary_input_never_raises_and_replies_are_well_formed(
        parts: list[bytes], cuts: list[int], tls: bool) -> None:
    client = Client(max_message_size=64, max_recipients=2, tls_available=tls)
    data = b"".join(parts)
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    for piece in pieces:
        _answer_everything(client, piece)
        out = client.engine.data_to_send()
        if out:
            parse_replies(out)  # asserts every line matches ^[2-5]\d\d[ -]
    if client.engine.closed:
        assert client.send(b"NOOP\r\n") == []


AUTH_SNIPPETS = [*SNIPPETS, PLAIN_IR, b"AUTH PLAIN\r\n", b"AUTH LOGIN\r\n", b"AUTH LOGIN =\r\n",
                 b"dXNlcg==\r\n", b"AHVzZXIAc2VjcmV0\r\n", b"*\r\n", b"AUTH\r\n",
                 b"MAIL FROM:<a@x.example> AUTH=<>\r\n"]


@PROPERTY
@given(st.lists(st.one_of(st.sampled_from(AUTH_SNIPPETS), st.binary(max_size=30)), max_size=25),
       st.booleans())
def test_arbitrary_input_with_auth_never_raises(parts: list[bytes], required: bool) -> None:
    client = Client(**AUTH, auth_required=required, max_message_size=64, tls_available=True)
    for part in parts:
        _answer_everything(client, part)
        parse_replies(client.engine.data_to_send())
        assert client.engine.mode is not Mode.AUTH or client.engine._sasl is not None
