"""The outbound SMTP client end to end: what a running tayori puts on the wire.

tayori delivers (``deliver=True``) through its ``remote`` mx action to scriptable
:class:`~tayori.testing.peer.SmtpPeer` MX hosts on 127.0.77.x:25 (an address range of its
own, apart from the other delivery tests), its resolver pointed at a
:class:`~tayori.testing.dnsstub.DnsStub`. Each test offers the peer a set of ESMTP
extensions or a scripted refusal and checks what arrived (commands, parameters, bytes,
TLS) and what tayori made of the answers (log lines, DSNs to the sender's MX, retries
on a one-second schedule). Every wait has a deadline; nothing sleeps to wait.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import io
import re
import threading
import time
from collections.abc import Callable, Iterator
from email.generator import BytesGenerator
from pathlib import Path
from typing import Any

import pytest
import test_delivery

from delivery_helpers import (
    Outgoing,
    crlf,
    needs_port_25,
    split_received,
    submit,
    submit_all,
)
from harness import Tayori, queued_id, shared_data, wait_for
from tayori.errors import Reply
from tayori.smtp.server import EXTENSIONS_ALL
from tayori.testing.dnsstub import DnsStub
from tayori.testing.peer import ReceivedMessage, SmtpPeer

peers = test_delivery.peers   # the fixture: SmtpPeers, stopped at the end of the test

MX = "127.0.77.2"          # mx1.dest.test
SENDER_MX = "127.0.77.4"   # mx.sender.test: receives the DSNs

pytestmark = needs_port_25(MX)

ZONE: dict[str, Any] = {
    "dest.test": {"MX": [(10, "mx1.dest.test")]},
    "mx1.dest.test": {"A": [MX]},
    "sender.test": {"MX": [(10, "mx.sender.test")]},
    "mx.sender.test": {"A": [SENDER_MX]},
}

MESSAGE = (b"From: Alice <alice@sender.test>\r\nTo: bob@dest.test\r\nSubject: client\r\n"
           b"Message-ID: <client@sender.test>\r\n\r\nHello Bob.\r\n.a dotted line\r\n"
           b"..two dots\r\n.\r\nabove: a line of one dot\r\nlast line\r\n")

Peers = Callable[..., SmtpPeer]
Mta = Callable[..., Tayori]


@pytest.fixture
def dns() -> Iterator[DnsStub]:
    with DnsStub(ZONE, ttl=1, negative_ttl=1) as stub:
        yield stub


@pytest.fixture
def mta(make_tayori: Callable[..., Tayori], dns: DnsStub) -> Mta:
    """``mta(remote={...}, queue={...}, ...)``: a delivering tayori using the stub; the
    remote action's TLS policy is ``none`` unless ``remote`` says otherwise."""
    host, port = dns.address

    def make(*, remote: dict[str, Any] | None = None, queue: dict[str, Any] | None = None,
             **options: Any) -> Tayori:
        return make_tayori(deliver=True, dns={"nameservers": [f"{host}:{port}"],
                                              "timeout": "2s"},
                           queue={"retry": ["1s"], **(queue or {})},
                           remote={"tls": "none", **(remote or {})}, **options)
    return make


def without(*names: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """EXTENSIONS_ALL minus ``names`` (keywords), plus ``extra``."""
    return tuple(e for e in EXTENSIONS_ALL if e.split()[0] not in names) + extra


WITH_TLS = (*EXTENSIONS_ALL, "STARTTLS")


def content_of(got: ReceivedMessage) -> bytes:
    """What arrived, without tayori's Received field."""
    return split_received(got.data, 1)[1]


def no_bare_newline(data: bytes) -> bool:
    return data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n")


def log_has(tayori: Tayori, pattern: str) -> bool:
    return re.search(pattern, tayori.log(), re.MULTILINE) is not None


def wait_log(tayori: Tayori, pattern: str, what: str | None = None) -> None:
    wait_for(lambda: log_has(tayori, pattern), what=what or f"log line /{pattern}/")


def problems(tayori: Tayori) -> list[str]:
    """Warning and error lines of tayori's log (but the notice, at start, that the
    local maildir action is not built yet)."""
    return [line for line in tayori.log().splitlines()
            if re.match(r"\S+ (warning|error) ", line) and " not-delivering " not in line]


def dsns(peer: SmtpPeer, count: int = 1) -> list[ReceivedMessage]:
    """The DSNs (null sender) at the sender's MX, once there are ``count``."""
    wait_for(lambda: len([m for m in peer.messages if m.sender == ""]) >= count,
             what=f"{count} DSN(s)")
    return [m for m in peer.messages if m.sender == ""]


def dsn_status(got: ReceivedMessage) -> dict[str, str]:
    """Final-Recipient -> Status of a DSN (delivery-status or global-delivery-status)."""
    parsed = email.message_from_bytes(got.data, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
    assert got.recipients == ("alice@sender.test",)
    status = parsed.get_payload()[1]
    assert status.get_content_type() in ("message/delivery-status",
                                         "message/global-delivery-status")
    text = status.as_bytes().decode("utf-8", "replace")
    pairs = re.findall(r"^Final-Recipient: *(?:rfc822|utf-8); *(\S+)\r?\n"
                       r"(?:[^\r\n]+\r?\n)*?Status: *(\S+)", text, re.MULTILINE | re.IGNORECASE)
    assert pairs, text
    return dict(pairs)


def submit_bdat(tayori: Tayori, recipients: list[str], content: bytes,
                mail_params: str = "", sender: str = "alice@sender.test") -> str:
    """Submit ``content`` as one ``BDAT n LAST`` chunk, exactly as given."""
    with tayori.client() as client:
        client.greeting_and_ehlo()
        client.expect_cmd(f"MAIL FROM:<{sender}>{mail_params}", 250)
        for rcpt in recipients:
            client.expect_cmd(f"RCPT TO:<{rcpt}>", 250)
        client.send(b"BDAT %d LAST\r\n" % len(content) + content)
        return queued_id(client.expect(250))


# --- PIPELINING ----------------------------------------------------------------------------


@pytest.mark.parametrize("offered", [True, False], ids=["offered", "absent"])
def test_pipelining_only_when_offered(mta: Mta, peers: Peers, offered: bool) -> None:
    mx = peers(MX, extensions=EXTENSIONS_ALL if offered else without("PIPELINING"))
    tayori = mta()
    submit(tayori, ["bob@dest.test", "carol@dest.test", "dave@dest.test"], MESSAGE)
    [got] = mx.wait_for_messages(1)
    assert got.recipients == ("bob@dest.test", "carol@dest.test", "dave@dest.test")
    assert got.pipelined is offered   # MAIL and RCPTs in one write, or one per reply
    verbs = [c.split()[0].upper() for c in got.commands]
    assert verbs[-5:-1] == ["MAIL", "RCPT", "RCPT", "RCPT"]
    assert content_of(got) == MESSAGE


# --- SIZE ----------------------------------------------------------------------------------


def test_size_above_peer_limit_bounces_534_never_sent(mta: Mta, peers: Peers) -> None:
    mx = peers(MX, extensions=without("SIZE", extra=("SIZE 1000",)))
    sender_mx = peers(SENDER_MX)
    tayori = mta()
    small = submit(tayori, ["bob@dest.test"], MESSAGE)
    [got] = mx.wait_for_messages(1)
    assert re.search(r"\bSIZE=\d+\b", got.mail_params), got.mail_params
    big = MESSAGE + (b"y" * 76 + b"\r\n") * 40
    queue_id = submit(tayori, ["carol@dest.test"], big)
    [dsn] = dsns(sender_mx)
    assert dsn_status(dsn) == {"carol@dest.test": "5.3.4"}
    wait_log(tayori, f"bounced queue_id={queue_id} ")
    assert f"delivered queue_id={small} " in tayori.log()
    assert len(mx.transactions) == 1          # the big one was never sent


# --- CHUNKING ------------------------------------------------------------------------------


@pytest.mark.parametrize("chunking", [True, False], ids=["BDAT", "DATA"])
def test_content_byte_identical_by_bdat_or_data(mta: Mta, peers: Peers,
                                                chunking: bool) -> None:
    mx = peers(MX, extensions=EXTENSIONS_ALL if chunking
               else without("CHUNKING", "BINARYMIME"))
    tayori = mta()
    submit(tayori, ["bob@dest.test"], MESSAGE)
    [got] = mx.wait_for_messages(1)
    assert got.bdat is chunking
    verbs = {c.split()[0].upper() for c in got.commands}
    assert ("BDAT" in verbs, "DATA" in verbs) == (chunking, not chunking)
    assert content_of(got) == MESSAGE
    assert no_bare_newline(got.data)


@pytest.mark.parametrize("chunking", [True, False], ids=["BDAT", "DATA"])
def test_message_without_final_crlf_gets_one(mta: Mta, peers: Peers, chunking: bool) -> None:
    """Received by BDAT without a final CRLF, it goes out with one, whatever the verb."""
    mx = peers(MX, extensions=EXTENSIONS_ALL if chunking
               else without("CHUNKING", "BINARYMIME"))
    tayori = mta()
    content = MESSAGE + b"no line end here"
    submit_bdat(tayori, ["bob@dest.test"], content)
    [got] = mx.wait_for_messages(1)
    assert got.bdat is chunking
    assert content_of(got) == content + b"\r\n"
    assert no_bare_newline(got.data)


# --- SMTPUTF8 ------------------------------------------------------------------------------


def test_smtputf8_to_peer_without_it_bounces_567(mta: Mta, peers: Peers) -> None:
    mx = peers(MX, extensions=without("SMTPUTF8"))
    sender_mx = peers(SENDER_MX)
    tayori = mta()
    queue_id = submit(tayori, ["jörg@dest.test"], MESSAGE, mail_params=" SMTPUTF8")
    [dsn] = dsns(sender_mx)
    assert dsn_status(dsn) == {"jörg@dest.test": "5.6.7"}
    wait_log(tayori, f"bounced queue_id={queue_id} ")
    assert mx.transactions == []


def test_smtputf8_delivered_with_smtputf8(mta: Mta, peers: Peers) -> None:
    mx = peers(MX)
    tayori = mta()
    submit(tayori, ["jörg@dest.test"], MESSAGE, mail_params=" SMTPUTF8")
    [got] = mx.wait_for_messages(1)
    assert "SMTPUTF8" in got.mail_params.split()
    assert got.recipients == ("jörg@dest.test",)
    assert content_of(got) == MESSAGE


# --- 8BITMIME downgrade --------------------------------------------------------------------

SAMPLE = "Grüße naïve café ÀÉÎÕÜ ąęłńśźż ĉĝĥĵŝŭ Привет ЖЯ"


def _encodable(word: str, charset: str) -> bool:
    try:
        word.encode(charset)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def eight_bit_variant(raw: bytes) -> bytes:
    """A corpus message made 8-bit: each text part with a non-ASCII charset gets its
    decoded content plus a line of 8-bit text in that charset, sent as
    ``Content-Transfer-Encoding: 8bit`` (the corpus itself holds no 8-bit bytes)."""
    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    for part in message.walk():
        charset = part.get_content_charset()
        if part.is_multipart() or part.get_content_maintype() != "text" \
                or charset in (None, "us-ascii"):
            continue
        words = " ".join(w for w in SAMPLE.split() if _encodable(w, charset))
        data = (part.get_payload(decode=True) or b"").replace(b"\r\n", b"\n").rstrip(b"\n")
        data += b"\n" + words.encode(charset) + b"\n"
        del part["Content-Transfer-Encoding"]
        part["Content-Transfer-Encoding"] = "8bit"
        part.set_payload(data.decode("ascii", "surrogateescape"))
    out = io.BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=email.policy.compat32).flatten(message)
    result = crlf(out.getvalue())
    return result if result.endswith(b"\r\n") else result + b"\r\n"


def mime_tree(data: bytes) -> list[tuple[str, str | None, str | None, bytes]]:
    """Each part in order: type, charset, file name, decoded payload (text: LF line ends,
    as a quoted-printable decoder gives them)."""
    message = email.message_from_bytes(data, policy=email.policy.compat32)
    tree = []
    for part in message.walk():
        payload = b""
        if not part.is_multipart():
            payload = part.get_payload(decode=True) or b""
            if part.get_content_maintype() == "text":
                payload = payload.replace(b"\r\n", b"\n")
        tree.append((part.get_content_type(), part.get_content_charset(),
                     part.get_filename(), payload))
    return tree


EIGHT_BIT_SOURCES = ["msg_10.txt", "msg_12a.txt", "msg_46.txt"]


@pytest.mark.parametrize("name", EIGHT_BIT_SOURCES)
def test_8bitmime_downgraded_for_peer_without_it(mta: Mta, peers: Peers, name: str) -> None:
    source = shared_data("mime", "cpython-email", name)
    message = eight_bit_variant(source.read_bytes())
    assert any(byte > 127 for byte in message)
    mx = peers(MX, extensions=without("8BITMIME", "BINARYMIME"))
    tayori = mta()
    submit(tayori, ["bob@dest.test"], message, mail_params=" BODY=8BITMIME")
    [got] = mx.wait_for_messages(1)
    assert "BODY=" not in got.mail_params
    assert all(byte < 128 for byte in got.data), "8-bit bytes reached a 7-bit peer"
    assert no_bare_newline(got.data)
    assert mime_tree(content_of(got)) == mime_tree(message)


def test_8bitmime_passed_on_untouched(mta: Mta, peers: Peers) -> None:
    message = eight_bit_variant(shared_data("mime", "cpython-email", "msg_10.txt").read_bytes())
    mx = peers(MX)
    tayori = mta()
    submit(tayori, ["bob@dest.test"], message, mail_params=" BODY=8BITMIME")
    [got] = mx.wait_for_messages(1)
    assert "BODY=8BITMIME" in got.mail_params.split()
    assert content_of(got) == message


# --- BINARYMIME ----------------------------------------------------------------------------

BINARY = (b"From: alice@sender.test\r\nTo: bob@dest.test\r\nSubject: binary\r\n"
          b"MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
          b"Content-Transfer-Encoding: binary\r\n\r\n"
          b"\x00\x01bare LF\nbare CR\rCRLF\r\n.\n.\r\n\xff\xfe no final line end")


def test_binarymime_sent_byte_identical_by_bdat(mta: Mta, peers: Peers) -> None:
    mx = peers(MX)
    tayori = mta()
    submit_bdat(tayori, ["bob@dest.test"], BINARY, mail_params=" BODY=BINARYMIME")
    [got] = mx.wait_for_messages(1)
    assert "BODY=BINARYMIME" in got.mail_params.split() and got.bdat
    assert content_of(got) == BINARY


def test_binarymime_to_peer_without_it_bounces_563(mta: Mta, peers: Peers) -> None:
    mx = peers(MX, extensions=without("BINARYMIME"))
    sender_mx = peers(SENDER_MX)
    tayori = mta()
    submit_bdat(tayori, ["bob@dest.test"], BINARY, mail_params=" BODY=BINARYMIME")
    [dsn] = dsns(sender_mx)
    assert dsn_status(dsn) == {"bob@dest.test": "5.6.3"}
    assert mx.transactions == []


# --- STARTTLS ------------------------------------------------------------------------------

TLS_FIELD = r'tls="TLSv1\.[23] [A-Z0-9_-]+"'


def test_tls_may_uses_starttls(mta: Mta, peers: Peers) -> None:
    mx = peers(MX, extensions=WITH_TLS)
    tayori = mta(remote={"tls": "may"})
    queue_id = submit(tayori, ["bob@dest.test"], MESSAGE)
    [got] = mx.wait_for_messages(1)
    assert got.tls
    assert "STARTTLS" in [c.upper() for c in got.commands]
    assert content_of(got) == MESSAGE
    wait_log(tayori, f"delivered queue_id={queue_id} .*{TLS_FIELD}")


@pytest.mark.parametrize("failure", ["handshake", "454"])
def test_tls_may_falls_back_to_plain_text(mta: Mta, peers: Peers, failure: str) -> None:
    if failure == "454":
        mx = peers(MX, extensions=WITH_TLS, starttls_reply=Reply(454, "4.7.0", "no TLS now"))
    else:
        mx = peers(MX, extensions=WITH_TLS, tls_handshake_fails=True)
    tayori = mta(remote={"tls": "may"})
    queue_id = submit(tayori, ["bob@dest.test"], MESSAGE)
    [got] = mx.wait_for_messages(1)
    assert not got.tls
    assert got.session >= 2                         # a new connection, without STARTTLS
    assert "STARTTLS" not in [c.upper() for c in got.commands]
    assert content_of(got) == MESSAGE
    wait_log(tayori, f"delivered queue_id={queue_id} ")
    assert log_has(tayori, f"tls-fallback queue_id={queue_id} ")
    assert not log_has(tayori, f"delivered queue_id={queue_id} .*tls=")


def _deferred_never_sent(tayori: Tayori, mx: SmtpPeer, sender_mx: SmtpPeer, queue_id: str,
                         status: str) -> None:
    wait_log(tayori, f"deferred queue_id={queue_id} .*reply=\"451 {re.escape(status)} ")
    wait_log(tayori, f"deferred queue_id={queue_id} .*attempts=2 ", "a second deferral")
    assert mx.transactions == []
    assert sender_mx.transactions == []
    assert not log_has(tayori, f"(bounced|delivered) queue_id={queue_id} ")
    [envelope] = tayori.envelopes()
    assert envelope.queue_id == queue_id


def test_tls_encrypt_without_starttls_defers_474(mta: Mta, peers: Peers) -> None:
    mx = peers(MX)
    sender_mx = peers(SENDER_MX)
    tayori = mta(remote={"tls": "encrypt"})
    queue_id = submit(tayori, ["bob@dest.test"], MESSAGE)
    _deferred_never_sent(tayori, mx, sender_mx, queue_id, "4.7.4")


def test_tls_verify_self_signed_defers(mta: Mta, peers: Peers) -> None:
    mx = peers(MX, extensions=WITH_TLS, hostname="mx1.dest.test")
    sender_mx = peers(SENDER_MX)
    tayori = mta(remote={"tls": "verify"})
    queue_id = submit(tayori, ["bob@dest.test"], MESSAGE)
    _deferred_never_sent(tayori, mx, sender_mx, queue_id, "4.7.5")
    assert "certificate" in tayori.log().lower()


def test_tls_verify_trusted_certificate_delivers(mta: Mta, peers: Peers) -> None:
    # SmtpPeer's self-signed certificate names its ``hostname`` (CN and subjectAltName):
    # the MX host's name here, so trusting that certificate makes it valid.
    mx = peers(MX, extensions=WITH_TLS, hostname="mx1.dest.test")
    assert mx.cert_path is not None
    tayori = mta(remote={"tls": "verify", "tls_ca_file": str(mx.cert_path)})
    queue_id = submit(tayori, ["bob@dest.test"], MESSAGE)
    [got] = mx.wait_for_messages(1)
    assert got.tls
    assert content_of(got) == MESSAGE
    wait_log(tayori, f"delivered queue_id={queue_id} .*{TLS_FIELD}")


def test_tls_verify_wrong_name_defers(mta: Mta, peers: Peers) -> None:
    mx = peers(MX, extensions=WITH_TLS, hostname="someone-else.test")
    sender_mx = peers(SENDER_MX)
    assert mx.cert_path is not None
    tayori = mta(remote={"tls": "verify", "tls_ca_file": str(mx.cert_path)})
    queue_id = submit(tayori, ["bob@dest.test"], MESSAGE)
    _deferred_never_sent(tayori, mx, sender_mx, queue_id, "4.7.5")


# --- per-recipient and whole-message outcomes ----------------------------------------------


def test_per_recipient_results(mta: Mta, peers: Peers) -> None:
    soft_once = [Reply(451, "4.2.0", "mailbox busy")]

    def rcpt(address: str) -> Reply | None:
        if address.startswith("hard@"):
            return Reply(550, "5.1.1", "no such user")
        if address.startswith("soft@") and soft_once:
            return soft_once.pop()
        return None

    mx = peers(MX, rcpt_reply=rcpt)
    sender_mx = peers(SENDER_MX)
    tayori = mta()
    queue_id = submit(tayori, ["ok@dest.test", "hard@dest.test", "soft@dest.test"], MESSAGE)
    first, second = mx.wait_for_messages(2)
    assert first.recipients == ("ok@dest.test",)
    assert second.recipients == ("soft@dest.test",)          # the retry, alone
    [dsn] = dsns(sender_mx)
    assert dsn_status(dsn) == {"hard@dest.test": "5.1.1"}
    wait_for(lambda: not tayori.envelopes(), what="the queue to empty")
    log = tayori.log()
    for pattern in (f"delivered queue_id={queue_id} to=ok@dest.test .*attempts=1 ",
                    f"bounced queue_id={queue_id} to=hard@dest.test .*attempts=1 ",
                    f"deferred queue_id={queue_id} to=soft@dest.test .*attempts=1 "
                    r".*reply=\"451 4\.2\.0 mailbox busy\"",
                    f"delivered queue_id={queue_id} to=soft@dest.test .*attempts=2 "):
        assert re.search(pattern, log), pattern
    assert not re.search(f"(delivered|bounced|deferred) queue_id={queue_id} "
                         "to=(ok|hard)@dest.test .*attempts=2 ", log)


@pytest.mark.parametrize("chunking", [True, False], ids=["BDAT", "DATA"])
def test_recipients_sharing_a_transaction_delivered_once(mta: Mta, peers: Peers,
                                                        chunking: bool) -> None:
    mx = peers(MX, extensions=EXTENSIONS_ALL if chunking
               else without("CHUNKING", "BINARYMIME"))
    tayori = mta()
    queue_id = submit(tayori, ["bob@dest.test", "carol@dest.test"], MESSAGE)
    [got] = mx.wait_for_messages(1)
    assert got.recipients == ("bob@dest.test", "carol@dest.test")
    wait_log(tayori, f"(delivered|deferred|bounced) queue_id={queue_id} to=carol@dest.test ")
    assert f"delivered queue_id={queue_id} to=bob@dest.test " in tayori.log()
    assert f"delivered queue_id={queue_id} to=carol@dest.test " in tayori.log()
    wait_for(lambda: not tayori.envelopes(), what="the queue to empty")
    assert len(mx.transactions) == 1
    assert problems(tayori) == []


def test_content_refused_554_bounces_everyone(mta: Mta, peers: Peers) -> None:
    mx = peers(MX, data_reply=lambda message: Reply(554, "5.6.0", "content refused"))
    sender_mx = peers(SENDER_MX)
    tayori = mta()
    queue_id = submit(tayori, ["bob@dest.test", "carol@dest.test"], MESSAGE)
    [dsn] = dsns(sender_mx)
    assert dsn_status(dsn) == {"bob@dest.test": "5.6.0", "carol@dest.test": "5.6.0"}
    wait_for(lambda: not tayori.envelopes(), what="the queue to empty")
    assert len(re.findall(f"bounced queue_id={queue_id} .*attempts=1 ", tayori.log())) == 2
    [refused] = mx.transactions
    assert refused.recipients == ("bob@dest.test", "carol@dest.test")


def test_content_refused_451_deferred_then_delivered(mta: Mta, peers: Peers) -> None:
    answers = [Reply(451, "4.3.0", "try again later")]
    mx = peers(MX, data_reply=lambda message: answers.pop() if answers else None)
    sender_mx = peers(SENDER_MX)
    tayori = mta()
    queue_id = submit(tayori, ["bob@dest.test"], MESSAGE)
    [got] = mx.wait_for_messages(1)
    assert content_of(got) == MESSAGE
    refused, accepted = mx.transactions
    assert refused.data == accepted.data and not refused.accepted
    wait_for(lambda: not tayori.envelopes(), what="the queue to empty")
    log = tayori.log()
    assert re.search(f"deferred queue_id={queue_id} .*attempts=1 "
                     r'.*reply="451 4\.3\.0 try again later"', log)
    assert re.search(f"delivered queue_id={queue_id} .*attempts=2 ", log)
    assert sender_mx.transactions == []


def test_recipients_deferred_together_are_retried_together(mta: Mta, peers: Peers) -> None:
    answers = [Reply(451, "4.3.0", "try again later")]
    mx = peers(MX, data_reply=lambda message: answers.pop() if answers else None)
    tayori = mta()
    recipients = ("bob@dest.test", "carol@dest.test", "dave@dest.test")
    queue_id = submit(tayori, list(recipients), MESSAGE)
    [got] = mx.wait_for_messages(1)
    assert got.recipients == recipients                   # one retry, for all three
    wait_log(tayori, f"(delivered|deferred) queue_id={queue_id} to=dave@dest.test "
             ".*attempts=2 ")
    log = tayori.log()
    assert all(f"delivered queue_id={queue_id} to={r} " in log for r in recipients)


# --- connections ---------------------------------------------------------------------------


def test_connection_reused_for_the_next_message(mta: Mta, peers: Peers) -> None:
    """Each message submitted once the previous one is delivered: one connection."""
    mx = peers(MX)
    tayori = mta()
    for count in range(1, 4):
        queue_id = submit(tayori, [f"user{count}@dest.test"], MESSAGE)
        wait_log(tayori, f"delivered queue_id={queue_id} ")
        mx.wait_for_messages(count)
    assert [m.session for m in mx.messages] == [1, 1, 1]
    assert [c.split()[0].upper() for c in mx.messages[-1].commands].count("EHLO") == 1
    assert mx.connections == 1
    assert problems(tayori) == []


def test_burst_travels_over_fewer_connections(mta: Mta, peers: Peers) -> None:
    mx = peers(MX)
    tayori = mta(remote={"max_connections": 1})
    ids = submit_all(tayori, [Outgoing((f"user{i}@dest.test",), MESSAGE) for i in range(5)])
    got = mx.wait_for_messages(5)
    assert {m.session for m in got} == {1}
    for queue_id in ids:
        wait_log(tayori, f"delivered queue_id={queue_id} ")
    assert problems(tayori) == []


def _established_to(host: str, port: int) -> int:
    """Open (ESTABLISHED) TCP connections whose far end is host:port (Linux)."""
    far_end = f"{bytes(reversed([int(p) for p in host.split('.')])).hex().upper()}:{port:04X}"
    with open("/proc/net/tcp") as table:
        return sum(1 for line in list(table)[1:]
                   if line.split()[2] == far_end and line.split()[3] == "01")


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="counts sockets in /proc/net/tcp")
def test_max_connections_per_destination(mta: Mta, peers: Peers) -> None:
    """With ``max_connections = 2``, 10 messages to a slow peer never hold more than two
    connections to it at once (counted from the kernel's socket table)."""
    def slow(message: ReceivedMessage) -> None:
        # Stalls the peer's loop on purpose (verdicts should not block): while it answers
        # one message, tayori's other connections wait, and would pile up past the limit.
        time.sleep(0.1)

    mx = peers(MX, data_reply=slow)
    tayori = mta(remote={"max_connections": 2})
    stop = threading.Event()
    samples: list[int] = []

    def sample() -> None:
        while not stop.is_set():
            samples.append(_established_to(MX, 25))
            stop.wait(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        submit_all(tayori, [Outgoing((f"user{i}@dest.test",), MESSAGE) for i in range(10)])
        mx.wait_for_messages(10, timeout=20)
    finally:
        stop.set()
        sampler.join(5)
    assert max(samples) >= 1
    assert max(samples) <= 2, f"up to {max(samples)} connections at once"


# --- dot-stuffing, line ends ---------------------------------------------------------------

TRICKY = (b"From: alice@sender.test\r\nTo: bob@dest.test\r\nSubject: dots\r\n\r\n"
          b".\r\n"                                 # a lone dot, first body line
          b"..\r\n"
          b". \r\n"
          b".QUIT\r\n"
          b"text with <CRLF>.<CRLF> written out: \\r\\n.\\r\\n\r\n"
          b"MAIL FROM:<evil@example.net>\r\n"
          b"RCPT TO:<victim@dest.test>\r\n"
          b"DATA\r\n"
          b"smuggled?\r\n"
          b".\r\n"
          b"a line . with dots . inside.\r\n"
          b"...\r\n"
          b"." + b"x" * 900 + b"\r\n"
          b".\r\n")                                # ends with a lone dot line too


@pytest.mark.parametrize("chunking", [True, False], ids=["BDAT", "DATA"])
def test_dot_lines_arrive_intact_no_smuggling(mta: Mta, peers: Peers, chunking: bool) -> None:
    mx = peers(MX, extensions=EXTENSIONS_ALL if chunking
               else without("CHUNKING", "BINARYMIME"))
    tayori = mta()
    submit(tayori, ["bob@dest.test"], TRICKY)
    [got] = mx.wait_for_messages(1)
    assert got.bdat is chunking
    assert content_of(got) == TRICKY
    assert no_bare_newline(got.data)
    assert got.recipients == ("bob@dest.test",)
    wait_for(lambda: not tayori.envelopes(), what="the queue to empty")
    assert len(mx.transactions) == 1
    assert not any("evil" in command or "victim" in command
                   for command in mx.transactions[0].commands)
