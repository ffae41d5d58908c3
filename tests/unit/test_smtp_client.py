"""Unit and property tests for tayori.smtp.client: replies, capabilities, MAIL/RCPT, content."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tayori.errors import Reply
from tayori.smtp.client import (
    MAX_REPLY_LINE,
    MAX_REPLY_LINES,
    Capabilities,
    ContentEncoder,
    MailOptions,
    ProtocolError,
    ReplyReader,
    mail_command,
    rcpt_command,
)

PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None)
_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_NEWLINE = re.compile(rb"\r\n|\r|\n")


def read(data: bytes) -> list[Reply]:
    return ReplyReader().feed(data)


def read_one(data: bytes) -> Reply:
    replies = read(data)
    assert len(replies) == 1
    return replies[0]


# --- ReplyReader -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "reply"),
    [
        (b"250 OK\r\n", Reply(250, None, "OK")),
        (b"250 OK\n", Reply(250, None, "OK")),                      # bare LF tolerated
        (b"250\r\n", Reply(250, None, "")),
        (b"250 \r\n", Reply(250, None, "")),
        (b"220 mx.example ESMTP ready\r\n", Reply(220, None, "mx.example ESMTP ready")),
        (b"250 2.1.0 Sender ok\r\n", Reply(250, "2.1.0", "Sender ok")),
        (b"250 2.0.0\r\n", Reply(250, "2.0.0", "")),
        (b"452 4.5.3 Too many recipients\r\n", Reply(452, "4.5.3", "Too many recipients")),
        (b"550 5.7.1 Relaying denied\r\n", Reply(550, "5.7.1", "Relaying denied")),
        (b"550 5.100.999 odd but valid\r\n", Reply(550, "5.100.999", "odd but valid")),
        # not an enhanced status: the class differs from the reply's, or the syntax is off
        (b"250 5.1.1 mismatched class\r\n", Reply(250, None, "5.1.1 mismatched class")),
        (b"550 5.1 short\r\n", Reply(550, None, "5.1 short")),
        (b"550 5.1.1234 long\r\n", Reply(550, None, "5.1.1234 long")),
        (b"550 5.1.1x glued\r\n", Reply(550, None, "5.1.1x glued")),
        (b"550 3.1.1 not a status class\r\n", Reply(550, None, "3.1.1 not a status class")),
    ],
)
def test_single_line_replies(wire: bytes, reply: Reply) -> None:
    assert read(wire) == [reply]


def test_multi_line_reply_is_joined() -> None:
    wire = b"250-mx.example greets you\r\n250-PIPELINING\r\n250 SIZE 1000\r\n"
    assert read(wire) == [Reply(250, None, "mx.example greets you\nPIPELINING\nSIZE 1000")]


def test_multi_line_enhanced_status_on_every_line_is_separated() -> None:
    wire = b"550-5.1.1 No such user here\r\n550-5.1.1 \r\n550 5.1.1 see the docs\r\n"
    assert read(wire) == [Reply(550, "5.1.1", "No such user here\n\nsee the docs")]


@pytest.mark.parametrize(
    ("wire", "text"),
    [
        (b"550-5.1.1 No such user\r\n550 see the docs\r\n",      # missing on the last line
         "5.1.1 No such user\nsee the docs"),
        (b"550-No such user\r\n550 5.1.1 see the docs\r\n",       # missing on the first
         "No such user\n5.1.1 see the docs"),
        (b"550-5.1.1 No such user\r\n550 5.1.2 see the docs\r\n",  # two different codes
         "5.1.1 No such user\n5.1.2 see the docs"),
    ],
)
def test_enhanced_status_kept_in_text_unless_on_every_line(wire: bytes, text: str) -> None:
    assert read(wire) == [Reply(550, None, text)]


def test_longer_enhanced_status_on_a_later_line_is_not_the_same_status() -> None:
    reply = read_one(b"250-2.1.0 first\r\n250 2.1.05 second\r\n")
    assert reply == Reply(250, None, "2.1.0 first\n2.1.05 second")


def test_pipelined_replies_in_one_feed() -> None:
    reader = ReplyReader()
    replies = reader.feed(b"250 2.1.0 ok\r\n250-2.1.5 a\r\n250 2.1.5 b\r\n550 5.1.1 no\r\n354 go")
    assert replies == [Reply(250, "2.1.0", "ok"), Reply(250, "2.1.5", "a\nb"),
                       Reply(550, "5.1.1", "no")]
    assert reader.feed(b" ahead\r\n") == [Reply(354, None, "go ahead")]
    assert reader.feed(b"") == []


def test_partial_input_returns_nothing_until_the_line_ends() -> None:
    reader = ReplyReader()
    assert reader.feed(b"250-first\r\n") == []
    assert reader.feed(b"250 sec") == []
    assert reader.feed(b"ond\r") == []
    assert reader.feed(b"\n") == [Reply(250, None, "first\nsecond")]


WIRES = [
    b"220 mx.example ESMTP\r\n",
    b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 DSN\r\n",
    b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550-5.1.1 no\r\n550 5.1.1 such user\r\n354 go ahead\r\n",
    "250 caf\u00e9 \u2603\r\n".encode(),
]


@pytest.mark.parametrize("wire", WIRES)
def test_split_at_every_byte_boundary(wire: bytes) -> None:
    whole = read(wire)
    for cut in range(len(wire) + 1):
        reader = ReplyReader()
        assert reader.feed(wire[:cut]) + reader.feed(wire[cut:]) == whole, cut
    reader = ReplyReader()
    assert [reply for byte in wire for reply in reader.feed(bytes([byte]))] == whole


def test_non_utf8_and_control_characters_are_made_printable() -> None:
    reply = read_one(b"550 5.1.1 caf\xe9\tis\x00 gone\x1b[0m\rreally\r\n")
    assert reply.status == "5.1.1"
    assert reply.text == "caf\ufffd is  gone [0m really"
    assert all(c.isprintable() for c in reply.text)


@pytest.mark.parametrize(
    "wire",
    [
        b"hello\r\n",
        b"\r\n",
        b"25\r\n",
        b"25 OK\r\n",
        b"2500 OK\r\n",
        b"250xOK\r\n",
        b"250_OK\r\n",
        b" 250 OK\r\n",
        b"+OK POP3 ready\r\n",
        b"* OK IMAP4rev1\r\n",
        b"HTTP/1.1 400 Bad Request\r\n",
        b"099 too small\r\n",
        b"199 informational\r\n",
        b"600 too big\r\n",
        b"999 too big\r\n",
        b"\xd9\xa2\xd9\xa5\xd9\xa0 arabic digits\r\n",
    ],
)
def test_garbage_is_a_protocol_error(wire: bytes) -> None:
    with pytest.raises(ProtocolError):
        read(wire)


@pytest.mark.parametrize(
    "wire",
    [
        b"250-first\r\n251 second\r\n",
        b"250-first\r\n550 second\r\n",
        b"550-first\r\n550-second\r\n450 third\r\n",
    ],
)
def test_code_changing_mid_reply_is_a_protocol_error(wire: bytes) -> None:
    with pytest.raises(ProtocolError, match="bad reply code"):
        read(wire)


def test_over_long_partial_line_is_a_protocol_error() -> None:
    reader = ReplyReader()
    assert reader.feed(b"250 " + b"x" * (MAX_REPLY_LINE - 4)) == []   # at the limit: waits
    with pytest.raises(ProtocolError, match="too long"):
        reader.feed(b"x")


def test_over_long_line_fed_byte_by_byte_is_a_protocol_error() -> None:
    reader = ReplyReader()
    with pytest.raises(ProtocolError, match="too long"):
        for byte in b"250 " + b"x" * MAX_REPLY_LINE:
            reader.feed(bytes([byte]))


def test_over_long_complete_line_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="too long"):
        read(b"250 " + b"x" * (2 * MAX_REPLY_LINE) + b"\r\n")


def test_reply_with_the_most_lines_allowed() -> None:
    wire = b"250-x\r\n" * (MAX_REPLY_LINES - 1) + b"250 end\r\n"
    reply = read_one(wire)
    assert len(reply.text.split("\n")) == MAX_REPLY_LINES


def test_too_many_lines_is_a_protocol_error() -> None:
    reader = ReplyReader()
    reader.feed(b"250-x\r\n" * MAX_REPLY_LINES)
    with pytest.raises(ProtocolError, match="too many lines"):
        reader.feed(b"250-x\r\n")


def test_line_count_starts_again_for_each_reply() -> None:
    wire = (b"250-x\r\n" * (MAX_REPLY_LINES - 1) + b"250 end\r\n") * 3
    assert len(read(wire)) == 3


@PROPERTY
@given(st.lists(st.binary(max_size=40) | st.sampled_from(
    [b"250", b"-", b" ", b"\r\n", b"\n", b"\r", b"2.0.0", b"550-", b"250 "]), max_size=30))
def test_reader_raises_only_protocol_error(pieces: list[bytes]) -> None:
    reader = ReplyReader()
    try:
        for piece in pieces:
            for reply in reader.feed(piece):
                assert 200 <= reply.code <= 599
                assert "\r" not in reply.text
    except ProtocolError:
        pass


TEXT_LINE = st.from_regex(r"([A-Za-z][A-Za-z0-9 .,:<>@-]{0,30})?", fullmatch=True)


@st.composite
def replies(draw: st.DrawFn) -> Reply:
    code = draw(st.integers(200, 599))
    status = draw(st.none() | st.builds(
        "{}.{}.{}".format, st.just(code // 100), st.integers(0, 999), st.integers(0, 999)))
    if code // 100 == 3:            # RFC 3463 has no class 3
        status = None
    lines = draw(st.lists(TEXT_LINE, min_size=1, max_size=5))
    return Reply(code, status, "\n".join(lines))


@PROPERTY
@given(st.lists(replies(), min_size=1, max_size=4), st.data())
def test_reply_round_trip(sent: list[Reply], data: st.DataObject) -> None:
    wire = b"".join(reply.to_bytes() for reply in sent)
    cut = data.draw(st.integers(0, len(wire)))
    reader = ReplyReader()
    assert reader.feed(wire[:cut]) + reader.feed(wire[cut:]) == sent


# --- Capabilities ------------------------------------------------------------------------


def test_capabilities_of_a_full_ehlo_reply() -> None:
    reply = read_one(
        b"250-mx.example Hello client.example [192.0.2.1]\r\n250-PIPELINING\r\n"
        b"250-SIZE 35882577\r\n250-8BITMIME\r\n250-BINARYMIME\r\n250-CHUNKING\r\n"
        b"250-SMTPUTF8\r\n250-DSN\r\n250-STARTTLS\r\n250-ENHANCEDSTATUSCODES\r\n"
        b"250-AUTH PLAIN LOGIN CRAM-MD5\r\n250 VRFY\r\n")
    assert Capabilities.parse(reply) == Capabilities(
        extended=True, pipelining=True, size=35882577, eightbitmime=True, binarymime=True,
        chunking=True, smtputf8=True, dsn=True, starttls=True, enhanced_status=True,
        auth=frozenset({"PLAIN", "LOGIN", "CRAM-MD5"}))


def test_capabilities_of_a_one_line_ehlo_reply() -> None:
    assert Capabilities.parse(read_one(b"250 mx.example\r\n")) == Capabilities(extended=True)


def test_the_greeting_line_is_not_a_keyword() -> None:
    caps = Capabilities.parse(read_one(b"250-PIPELINING\r\n250 DSN\r\n"))
    assert caps.dsn and not caps.pipelining


def test_helo_capabilities_offer_nothing() -> None:
    caps = Capabilities()
    assert not caps.extended and caps.size is None and caps.auth == frozenset()


@pytest.mark.parametrize(
    ("line", "size"),
    [(b"SIZE 10240000", 10240000), (b"SIZE", 0), (b"SIZE 0", 0), (b"SIZE   52428800  ",
     52428800), (b"SIZE unlimited", 0), (b"size 1000", 1000)],
)
def test_capabilities_size(line: bytes, size: int) -> None:
    caps = Capabilities.parse(read_one(b"250-mx.example\r\n250 " + line + b"\r\n"))
    assert caps.size == size


def test_capabilities_without_size() -> None:
    assert Capabilities.parse(read_one(b"250-mx.example\r\n250 8BITMIME\r\n")).size is None


def test_capabilities_are_case_insensitive() -> None:
    reply = read_one(b"250-mx.example\r\n250-pipelining\r\n250-8bitmime\r\n250-Dsn\r\n"
                     b"250-auth plain Login\r\n250-starttls\r\n250-smtpUTF8\r\n250 chunking\r\n")
    assert Capabilities.parse(reply) == Capabilities(
        extended=True, pipelining=True, eightbitmime=True, dsn=True, starttls=True,
        smtputf8=True, chunking=True, auth=frozenset({"PLAIN", "LOGIN"}))


def test_capabilities_auth_without_mechanisms_and_unknown_keywords() -> None:
    caps = Capabilities.parse(read_one(b"250-mx.example\r\n250-AUTH\r\n250-X-EXPS GSSAPI\r\n"
                                       b"250-AUTH=LOGIN\r\n250 XFORWARD NAME ADDR\r\n"))
    assert caps == Capabilities(extended=True)


def test_capabilities_of_an_ehlo_reply_with_enhanced_status() -> None:
    caps = Capabilities.parse(read_one(b"250-2.0.0 mx.example\r\n250 2.0.0 PIPELINING\r\n"))
    assert caps.pipelining


# --- mail_command / rcpt_command ---------------------------------------------------------

EVERYTHING = Capabilities(extended=True, pipelining=True, size=0, eightbitmime=True,
                          binarymime=True, chunking=True, smtputf8=True, dsn=True)
ASKING = MailOptions(size=1234, body="8BITMIME", smtputf8=True, ret="HDRS", envid="QQ+2B1")


def test_mail_command_offered_everything() -> None:
    assert mail_command("a@b.example", ASKING, EVERYTHING) == (
        b"MAIL FROM:<a@b.example> SIZE=1234 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=QQ+2B1\r\n")


def test_mail_command_offered_nothing() -> None:
    assert mail_command("a@b.example", ASKING, Capabilities()) == b"MAIL FROM:<a@b.example>\r\n"
    assert mail_command("a@b.example", ASKING, Capabilities(extended=True)) == (
        b"MAIL FROM:<a@b.example>\r\n")


@pytest.mark.parametrize(
    ("caps", "params"),
    [
        (Capabilities(extended=True, size=0), b" SIZE=1234"),
        (Capabilities(extended=True, size=100), b" SIZE=1234"),
        (Capabilities(extended=True, eightbitmime=True), b" BODY=8BITMIME"),
        (Capabilities(extended=True, smtputf8=True), b" SMTPUTF8"),
        (Capabilities(extended=True, dsn=True), b" RET=HDRS ENVID=QQ+2B1"),
    ],
)
def test_mail_command_each_parameter_only_when_offered(caps: Capabilities, params: bytes) -> None:
    assert mail_command("a@b.example", ASKING, caps) == b"MAIL FROM:<a@b.example>" + params + \
        b"\r\n"


def test_mail_command_null_sender_and_defaults() -> None:
    assert mail_command("", MailOptions(size=10), EVERYTHING) == b"MAIL FROM:<> SIZE=10\r\n"


def test_mail_command_dsn_parameters_each_optional() -> None:
    caps = Capabilities(extended=True, dsn=True)
    assert mail_command("", MailOptions(size=1, ret="FULL"), caps) == b"MAIL FROM:<> RET=FULL\r\n"
    assert mail_command("", MailOptions(size=1, envid="x"), caps) == b"MAIL FROM:<> ENVID=x\r\n"


def test_mail_command_binarymime() -> None:
    caps = Capabilities(extended=True, binarymime=True, chunking=True)
    assert mail_command("a@b.example", MailOptions(size=1, body="BINARYMIME"), caps) == (
        b"MAIL FROM:<a@b.example> BODY=BINARYMIME\r\n")


def test_mail_command_binarymime_only_when_offered() -> None:
    caps = Capabilities(extended=True, eightbitmime=True)
    assert b"BINARYMIME" not in mail_command("a@b.example",
                                             MailOptions(size=1, body="BINARYMIME"), caps)


def test_mail_command_utf8_sender() -> None:
    assert mail_command("用户@例子.广告", MailOptions(size=1, smtputf8=True), EVERYTHING) == (
        "MAIL FROM:<用户@例子.广告> SIZE=1 SMTPUTF8\r\n".encode())


def test_rcpt_command() -> None:
    dsn = Capabilities(extended=True, dsn=True)
    assert rcpt_command("b@c.example", Capabilities()) == b"RCPT TO:<b@c.example>\r\n"
    assert rcpt_command("b@c.example", Capabilities(extended=True), ("NEVER",),
                        "rfc822;b@c.example") == b"RCPT TO:<b@c.example>\r\n"
    assert rcpt_command("b@c.example", dsn, ("SUCCESS", "FAILURE", "DELAY"),
                        "rfc822;b+2Bx@c.example") == (
        b"RCPT TO:<b@c.example> NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=rfc822;b+2Bx@c.example\r\n")
    assert rcpt_command("b@c.example", dsn, ("NEVER",)) == b"RCPT TO:<b@c.example> NOTIFY=NEVER\r\n"
    assert rcpt_command("b@c.example", dsn, None, "rfc822;b@c.example") == (
        b"RCPT TO:<b@c.example> ORCPT=rfc822;b@c.example\r\n")
    assert rcpt_command("b@c.example", dsn, ()) == b"RCPT TO:<b@c.example>\r\n"


@pytest.mark.parametrize("bad", ["a\r\n@b.example", "a@b.example\n", "a\r@b", "\r\nRSET"])
def test_cr_or_lf_in_an_address_raises(bad: str) -> None:
    with pytest.raises(ValueError, match="CR or LF"):
        mail_command(bad, MailOptions(size=1), EVERYTHING)
    with pytest.raises(ValueError, match="CR or LF"):
        rcpt_command(bad, EVERYTHING)


def test_cr_or_lf_in_a_parameter_raises() -> None:
    with pytest.raises(ValueError, match="CR or LF"):
        mail_command("a@b", MailOptions(size=1, envid="x\r\nDATA"), EVERYTHING)
    with pytest.raises(ValueError, match="CR or LF"):
        rcpt_command("a@b", EVERYTHING, orcpt="rfc822;a@b\r\nDATA")
    with pytest.raises(ValueError, match="CR or LF"):
        rcpt_command("a@b", EVERYTHING, notify=("NEVER\n",))


# --- ContentEncoder ----------------------------------------------------------------------


def encode(chunks: list[bytes], *, dot_stuff: bool = True) -> bytes:
    encoder = ContentEncoder(dot_stuff=dot_stuff)
    return b"".join(encoder.feed(chunk) for chunk in chunks) + encoder.end()


def normalised(data: bytes) -> bytes:
    """Reference model: every line end CRLF, and a final CRLF unless empty."""
    data = _NEWLINE.sub(b"\r\n", data)
    return data if not data or data.endswith(b"\r\n") else data + b"\r\n"


def unstuffed(wire: bytes) -> bytes:
    """Reference model: the content a DATA receiver takes from ``wire``."""
    assert wire.endswith(b".\r\n")
    lines = wire[:-3].split(b"\r\n")
    assert lines[-1] == b""
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n"
                    for line in lines[:-1])


def check_data(chunks: list[bytes]) -> None:
    data = b"".join(chunks)
    wire = encode(chunks)
    assert _BARE.search(wire) is None
    # the receiver is at the start of a line after 354: the only end of data is the last
    assert (b"\r\n" + wire).find(b"\r\n.\r\n") == len(wire) - 3
    if data:
        assert wire.endswith(b"\r\n.\r\n")
    assert unstuffed(wire) == normalised(data)


def check_bdat(chunks: list[bytes]) -> None:
    data = b"".join(chunks)
    wire = encode(chunks, dot_stuff=False)
    assert _BARE.search(wire) is None
    assert wire == normalised(data)


@pytest.mark.parametrize(
    ("chunks", "wire"),
    [
        ([], b".\r\n"),
        ([b""], b".\r\n"),
        ([b"a"], b"a\r\n.\r\n"),
        ([b"a\r\n"], b"a\r\n.\r\n"),
        ([b"a\n"], b"a\r\n.\r\n"),
        ([b"a\r"], b"a\r\n.\r\n"),
        ([b"\r", b"\n"], b"\r\n.\r\n"),
        ([b"a\r", b"\nb"], b"a\r\nb\r\n.\r\n"),
        ([b"a\r", b"", b"\n"], b"a\r\n.\r\n"),
        ([b"a\r", b"\r", b"\n"], b"a\r\n\r\n.\r\n"),
        ([b"a\r", b"b"], b"a\r\nb\r\n.\r\n"),
        ([b"a\r\n", b".x"], b"a\r\n..x\r\n.\r\n"),
        ([b"a\r\n.", b"x"], b"a\r\n..x\r\n.\r\n"),
        ([b"a\r", b"\n.x"], b"a\r\n..x\r\n.\r\n"),
        ([b"a\r", b".x"], b"a\r\n..x\r\n.\r\n"),
        ([b"a\n", b".x"], b"a\r\n..x\r\n.\r\n"),
        ([b"."], b"..\r\n.\r\n"),
        ([b".", b"\r\n"], b"..\r\n.\r\n"),
        ([b".x"], b"..x\r\n.\r\n"),
        ([b"", b".x"], b"..x\r\n.\r\n"),
        ([b".\r\n"], b"..\r\n.\r\n"),
        ([b"x.\r\n.."], b"x.\r\n...\r\n.\r\n"),
        ([b"a\n.\nb"], b"a\r\n..\r\nb\r\n.\r\n"),
        ([b"a\r.\rb"], b"a\r\n..\r\nb\r\n.\r\n"),
        ([b"a\n\r.\r\n"], b"a\r\n\r\n..\r\n.\r\n"),
        ([b"a", b".", b"b"], b"a.b\r\n.\r\n"),
        ([b"\r\n\r\n"], b"\r\n\r\n.\r\n"),
    ],
)
def test_encoder_for_data(chunks: list[bytes], wire: bytes) -> None:
    assert encode(chunks) == wire
    check_data(chunks)


@pytest.mark.parametrize(
    ("chunks", "wire"),
    [
        ([], b""),
        ([b"a"], b"a\r\n"),
        ([b"a\r", b"\n", b".x"], b"a\r\n.x\r\n"),
        ([b".\n.\r"], b".\r\n.\r\n"),
        ([b"a\r\n"], b"a\r\n"),
    ],
)
def test_encoder_for_bdat(chunks: list[bytes], wire: bytes) -> None:
    assert encode(chunks, dot_stuff=False) == wire
    check_bdat(chunks)


def test_encoder_keeps_binary_and_long_lines() -> None:
    data = bytes(range(256)) + b"x" * 5000
    assert encode([data], dot_stuff=False) == normalised(data)
    check_data([data[:100], data[100:]])


def test_encoder_is_reusable_after_end() -> None:
    encoder = ContentEncoder(dot_stuff=True)
    assert encoder.feed(b"a\r") + encoder.end() == b"a\r\n.\r\n"
    assert encoder.feed(b".b") + encoder.end() == b"..b\r\n.\r\n"


TOKENS = st.sampled_from([b"\r", b"\n", b".", b"\r\n", b"a", b"\x00", b"\xff", b" "])


@st.composite
def chunked(draw: st.DrawFn) -> list[bytes]:
    """Content made mostly of line ends and dots, cut at arbitrary points."""
    data = b"".join(draw(st.lists(TOKENS, max_size=40)))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=10)))
    bounds = [0, *cuts, len(data)]
    return [data[start:end] for start, end in itertools.pairwise(bounds)]


@PROPERTY
@given(chunked())
def test_encoder_data_property(chunks: list[bytes]) -> None:
    check_data(chunks)


@PROPERTY
@given(chunked())
def test_encoder_bdat_property(chunks: list[bytes]) -> None:
    check_bdat(chunks)


@PROPERTY
@given(st.lists(st.binary(max_size=30), max_size=10))
def test_encoder_data_property_any_bytes(chunks: list[bytes]) -> None:
    check_data(chunks)
    check_bdat(chunks)


@PROPERTY
@given(chunked())
def test_encoder_output_does_not_depend_on_chunking(chunks: list[bytes]) -> None:
    data = b"".join(chunks)
    assert encode(chunks) == encode([data])
    assert encode(chunks, dot_stuff=False) == encode([data], dot_stuff=False)
