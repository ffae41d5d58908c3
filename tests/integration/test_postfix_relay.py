"""Postfix as the upstream relay: mail submitted to a private Postfix reaches tayori intact.

Messages go over SMTP to Postfix's smtpd (and one through Postfix's own ``sendmail``);
Postfix relays everything to tayori (``relayhost = [127.0.0.1]:PORT``). Every message
carries a Date and a Message-ID, and Postfix treats the loopback client as remote
(``local_header_rewrite_clients`` empty), so it adds no headers but its own ``Received:``
on top. What tayori stores, minus its own Received header and Postfix's, must be exactly
what Postfix relayed: the bytes submitted, except for three documented changes Postfix's
cleanup(8) makes to some corpus messages, modelled exactly by :func:`as_postfix_relays`
(any other difference fails).

The relay runs twice: tayori offering CHUNKING (the default) and ``smtp.chunking =
false``. Postfix's SMTP client logs its dialog (``debug_peer_list``), which shows what it
was offered and whether it sent BDAT or DATA, without capturing packets. (Postfix 3.7's
SMTP client never sends BDAT, even when CHUNKING is offered: its ``smtp`` binary has no
BDAT command at all; the log shows ``DATA`` in both runs.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import SHARED, Tayori, shared_data, strip_received
from peers import PostfixInstance, postfix_available, postfix_relay

pytestmark = pytest.mark.peer

SENDER = "sender@example.net"
DATE = "Date: Mon, 04 Mar 2024 10:00:00 +0000"
MIME = SHARED / "mime"
CORPUS = sorted([*MIME.glob("*.eml"), *MIME.glob("cpython-email/*.txt")]) if MIME.exists() \
    else []


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def dot_stuff(data: bytes) -> bytes:
    stuffed = data.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


def with_date_and_id(message: bytes, name: str) -> bytes:
    """The message with a Date and a Message-ID header prepended when it has none."""
    end = message.find(b"\r\n\r\n")
    head = b"\r\n" + message[: end if end >= 0 else len(message)].lower()
    extra = b""
    if b"\r\ndate:" not in head:
        extra += DATE.encode() + b"\r\n"
    if b"\r\nmessage-id:" not in head:
        extra += f"Message-ID: <{name}@test.tayori>\r\n".encode()
    return extra + message


HEADER_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")


def as_postfix_relays(message: bytes) -> bytes:
    """The message as Postfix's cleanup(8) passes it on, from what was submitted:

    - a leading mbox ``From `` line becomes an ``X-Mailbox-Line:`` header;
    - ``Return-Path:`` fields are removed from the header section;
    - an empty line is inserted before the first line of the header section that is not
      a header field (a message without the blank line between header and body).
    """
    lines = message.split(b"\r\n")
    if lines[0].startswith(b"From "):
        lines[0] = b"X-Mailbox-Line: " + lines[0]
    out: list[bytes] = []
    dropping = False
    for index, line in enumerate(lines):
        if line == b"" or index == len(lines) - 1:
            return b"\r\n".join(out + lines[index:])
        if line[:1] in (b" ", b"\t") and index > 0:
            if not dropping:
                out.append(line)
            continue
        if not HEADER_FIELD.match(line):
            return b"\r\n".join([*out, b"", *lines[index:]])
        dropping = line.lower().startswith(b"return-path:")
        if not dropping:
            out.append(line)
    return b"\r\n".join(out)


def simple(name: str, subject: str, body: bytes, extra: bytes = b"") -> bytes:
    return (f"From: Sender <{SENDER}>\r\nTo: <{name}@tayori.test>\r\nSubject: {subject}\r\n"
            f"{DATE}\r\nMessage-ID: <{name}@test.tayori>\r\n").encode() + extra + b"\r\n" + body


def big_body(size: int) -> bytes:
    """~size bytes of varied lines up to 998 characters, some starting with dots."""
    lines = []
    total, n = 0, 0
    while total < size:
        n += 1
        width = (n * 37) % 990 + 1
        line = (f"{n:06d} " + "abcdefghij" * 100)[:width].encode()
        if n % 13 == 0:
            line = b"." + line[1:]
        if n % 29 == 0:
            line = b""
        lines.append(line)
        total += len(line) + 2
    return b"\r\n".join(lines) + b"\r\n"


@dataclass(frozen=True)
class Submission:
    name: str               # also the recipient's local part: how the copy is found
    message: bytes          # CRLF, not dot-stuffed
    body: str = ""          # BODY= parameter
    smtputf8: bool = False
    recipient: str = ""
    via_sendmail: bool = False

    @property
    def rcpt(self) -> str:
        return self.recipient or f"{self.name}@tayori.test"


def submissions() -> list[Submission]:
    out = [
        Submission("plain", simple("plain", "plain ASCII", b"Hello.\r\n.\r\n..two dots\r\n")),
        Submission("eightbit", simple(
            "eightbit", "8-bit body",
            "Grüße aus Köln, こんにちは, Ωμέγα\r\n".encode() + b"a latin-1 byte: \xe9\r\n",
            b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n"), body="8BITMIME"),
        Submission("utf8", simple("utf8", "=?utf-8?q?SMTPUTF8?=", "Ünïcödé\r\n".encode()),
                   body="8BITMIME", smtputf8=True, recipient="ユーザー@tayori.test"),
        Submission("big", simple("big", "200 KB", big_body(200 * 1024))),
        Submission("sendmail", simple("sendmail", "via sendmail -C", b"local submission\r\n"),
                   via_sendmail=True),
    ]
    for path in CORPUS:
        name = "corpus-" + path.stem.replace("_", "-")
        message = crlf(path.read_bytes())
        if not message.endswith(b"\r\n"):
            message += b"\r\n"
        eight = any(byte > 127 for byte in message)
        out.append(Submission(name, with_date_and_id(message, name),
                              body="8BITMIME" if eight else ""))
    return out


SUBMISSIONS = submissions()


@dataclass
class RelayRun:
    chunking: bool
    tayori: Tayori
    stored: dict[str, bytes]        # by submission name: the body tayori stored
    body_types: dict[str, str]
    smtputf8: dict[str, bool]
    postfix_log: str


def submit(postfix: PostfixInstance, items: list[Submission]) -> None:
    with postfix.client(timeout=60) as client:
        client.greeting_and_ehlo()
        for item in items:
            if item.via_sendmail:
                continue
            params = (f" BODY={item.body}" if item.body else "") + \
                (" SMTPUTF8" if item.smtputf8 else "")
            client.expect_cmd(f"MAIL FROM:<{SENDER}>{params}", 250)
            client.expect_cmd(f"RCPT TO:<{item.rcpt}>", 250)
            client.expect_cmd("DATA", 354)
            client.send(dot_stuff(item.message) + b".\r\n")
            client.expect(250)
        client.expect_cmd("QUIT", 221)
    for item in items:
        if item.via_sendmail:
            postfix.sendmail(item.message, SENDER, [item.rcpt])


def relay(root: Path, chunking: bool) -> RelayRun:
    server = Tayori(root, smtp={"chunking": chunking},
                    limits={"max_message_size": "20M"}).start()
    try:
        # debug_peer_*: Postfix logs the SMTP dialog with tayori (the commands it sent).
        with postfix_relay(server.port, settings={"debug_peer_list": "127.0.0.1",
                                                  "debug_peer_level": "2"}) as postfix:
            submit(postfix, SUBMISSIONS)
            postfix.wait_for(lambda: len(server.envelopes()) >= len(SUBMISSIONS), timeout=90,
                             interval=0.1, what="all messages in tayori's queue")
            postfix.wait_queue_empty()
            log = postfix.log()
    finally:
        server.stop()
    stored: dict[str, bytes] = {}
    body_types: dict[str, str] = {}
    smtputf8: dict[str, bool] = {}
    by_rcpt = {item.rcpt: item.name for item in SUBMISSIONS}
    for envelope in server.envelopes():
        assert len(envelope.recipients) == 1, envelope
        name = by_rcpt[envelope.recipients[0].address]
        assert name not in stored, f"{name} arrived twice"
        stored[name] = server.body(envelope.queue_id)
        body_types[name] = envelope.body_type
        smtputf8[name] = envelope.smtputf8
    return RelayRun(chunking, server, stored, body_types, smtputf8, log)


Runs = dict[bool, RelayRun | Exception]


@pytest.fixture(scope="module")
def runs() -> Runs:
    """The relay runs of this module, made on first use (a failed run fails fast after)."""
    postfix_available()
    shared_data("mime")
    return {}


def get_run(runs: Runs, tmp_path_factory: pytest.TempPathFactory, chunking: bool) -> RelayRun:
    if chunking not in runs:
        try:
            runs[chunking] = relay(tmp_path_factory.mktemp(f"relay-chunking-{chunking}"),
                                   chunking)
        except Exception as exc:
            runs[chunking] = exc
    run = runs[chunking]
    if isinstance(run, Exception):
        raise AssertionError(f"the relay run (chunking={chunking}) failed: {run}") from run
    return run


def strip_postfix_received(body: bytes) -> bytes:
    """Remove Postfix's Received header (the first field left after tayori's)."""
    match = re.match(rb"Received: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", body)
    assert match, body[:200]
    assert b"by postfix.test (Postfix" in match.group(0), match.group(0)
    return body[match.end():]


CHUNKING = [pytest.param(True, id="chunking"), pytest.param(False, id="no-chunking")]


@pytest.mark.parametrize("chunking", CHUNKING)
@pytest.mark.parametrize("item", SUBMISSIONS, ids=[s.name for s in SUBMISSIONS])
def test_relayed_byte_identical(runs: Runs,
                                tmp_path_factory: pytest.TempPathFactory,
                                chunking: bool, item: Submission) -> None:
    run = get_run(runs, tmp_path_factory, chunking)
    assert item.name in run.stored, f"{item.name} did not reach tayori"
    relayed = strip_postfix_received(strip_received(run.stored[item.name]))
    assert relayed == as_postfix_relays(item.message)
    if item.body == "8BITMIME":
        assert run.body_types[item.name] == "8BITMIME"
    assert run.smtputf8[item.name] == item.smtputf8


def postfix_dialog(log: str, port: int) -> list[str]:
    """What Postfix's SMTP client sent to tayori and read from it, in order."""
    pattern = re.compile(rf"postfix/smtp\[\d+\]: ([<>]) 127\.0\.0\.1\[127\.0\.0\.1\]:{port}: "
                         r"(.*)$", re.MULTILINE)
    return [f"{direction} {text}" for direction, text in pattern.findall(log)]


@pytest.mark.parametrize("chunking", CHUNKING)
def test_postfix_framing_follows_the_offer(runs: Runs,
                                           tmp_path_factory: pytest.TempPathFactory,
                                           chunking: bool) -> None:
    run = get_run(runs, tmp_path_factory, chunking)
    dialog = postfix_dialog(run.postfix_log, run.tayori.port)
    assert dialog, "Postfix logged no SMTP dialog with tayori"
    offered = any(re.fullmatch(r"< 250[ -]CHUNKING", line) for line in dialog)
    assert offered == chunking
    sent_bdat = [line for line in dialog if line.startswith("> BDAT")]
    sent_data = [line for line in dialog if line == "> DATA"]
    if not chunking:
        assert not sent_bdat
    # Every message went in one transaction, over DATA or BDAT ... LAST.
    last_chunks = [line for line in sent_bdat if line.endswith(" LAST")]
    assert len(sent_data) + len(last_chunks) == len(SUBMISSIONS)
    # tayori's log agrees: one queued line per message, each from Postfix's session.
    assert run.tayori.log().count(" queued ") == len(SUBMISSIONS)


def test_both_paths_store_the_same_bytes(runs: Runs,
                                         tmp_path_factory: pytest.TempPathFactory) -> None:
    with_chunking = get_run(runs, tmp_path_factory, True)
    without = get_run(runs, tmp_path_factory, False)
    for item in SUBMISSIONS:
        one = strip_postfix_received(strip_received(with_chunking.stored[item.name]))
        other = strip_postfix_received(strip_received(without.stored[item.name]))
        assert one == other, item.name
