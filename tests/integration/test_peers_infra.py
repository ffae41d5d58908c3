"""The test peers themselves work: Dovecot LMTP, unbound, and tayori's SmtpPeer.

Each fixture gets a short proof that it does what the delivery tests will rely on:
:class:`peers.DovecotLmtp` delivers over TCP and its unix socket, one recipient over
quota failing after the data while the others are delivered; :class:`peers.Unbound`
answers MX/A/AAAA/TXT for its zone and nothing else; :class:`tayori.testing.peer.SmtpPeer`
offers exactly the configured extensions, refuses what it is told to, records what it
accepts, speaks LMTP, and greets with 421/554 when asked. SmtpPeer binds port 25 on
other loopback addresses (127.0.0.2), which needs root: those tests skip otherwise.
"""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import Callable, Iterator
from typing import Any

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import pytest

from harness import TIMEOUT, Client, free_port
from peers import DovecotLmtp, Unbound
from tayori.errors import Reply
from tayori.testing.peer import ReceivedMessage, SmtpPeer

MX_HOST = "127.0.0.2"
USERS = ["u1@lmtp.test", "u2@lmtp.test", "u3@lmtp.test"]  # u3: 1 KiB quota


def message(subject: str, size: int = 2000) -> bytes:
    """A message of about ``size`` octets (over u3's quota), CRLF line ends."""
    lines = [f"Subject: {subject}", "From: a@sender.test", ""]
    lines += ["x" * 70] * (size // 72)
    return ("\r\n".join(lines) + "\r\n").encode()


def lmtp_deliver(client: smtplib.LMTP, sender: str, recipients: list[str],
                 data: bytes) -> list[tuple[int, bytes]]:
    """One LMTP transaction; the per-recipient replies after the data (RFC 2033 §4.2).
    (smtplib reads only one reply after DATA, so the others are read here.)"""
    code, text = client.mail(sender)
    assert code == 250, text
    accepted = []
    for rcpt in recipients:
        code, text = client.rcpt(rcpt)
        assert code == 250, (rcpt, code, text)
        accepted.append(rcpt)
    replies = [client.data(data)]
    replies += [client.getreply() for _ in accepted[1:]]
    return replies


# --- Dovecot LMTP ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def dovecot() -> Iterator[DovecotLmtp]:
    with DovecotLmtp() as instance:
        yield instance


@pytest.mark.peer
@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_dovecot_lmtp_delivers_and_refuses_over_quota(dovecot: DovecotLmtp,
                                                      transport: str) -> None:
    if transport == "tcp":
        client = smtplib.LMTP(*dovecot.address, timeout=TIMEOUT)
    else:
        client = smtplib.LMTP(str(dovecot.socket_path), timeout=TIMEOUT)
    data = message(f"over {transport}")
    with client:
        code, _ = client.ehlo("client.test")  # LHLO
        assert code == 250
        replies = lmtp_deliver(client, "sender@sender.test", USERS, data)
    assert [code for code, _ in replies] == [250, 250, 552]
    assert replies[2][1] == (b"5.2.2 <u3@lmtp.test> Quota exceeded (mailbox for user is full)")
    for user in USERS[:2]:
        stored = [m for m in dovecot.messages(user) if f"over {transport}".encode() in m]
        assert len(stored) == 1, dovecot.log()
        assert stored[0].startswith(b"Return-Path: <sender@sender.test>\n")
        assert stored[0].endswith(data.replace(b"\r\n", b"\n"))
    assert not dovecot.messages("u3@lmtp.test")


@pytest.mark.peer
def test_dovecot_quota_tempfail_and_unknown_user(dovecot: DovecotLmtp) -> None:
    """A second instance beside the module's, with the over-quota reply made temporary."""
    with DovecotLmtp(quota_tempfail=True) as other, \
            smtplib.LMTP(*other.address, timeout=TIMEOUT) as client:
        assert other.port != dovecot.port
        client.ehlo("client.test")
        client.mail("sender@sender.test")
        code, text = client.rcpt("nobody@lmtp.test")
        assert (code, text.split()[0]) == (550, b"5.1.1")
        client.rset()
        replies = lmtp_deliver(client, "", ["u3@lmtp.test"], message("tempfail"))
    assert replies[0][0] == 452 and replies[0][1].startswith(b"4.2.2 <u3@lmtp.test> Quota")


# --- unbound ------------------------------------------------------------------------------

ZONE: dict[str, dict[str, list[Any]]] = {
    "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")],
                     "TXT": ["v=spf1 ip4:127.0.0.0/8 -all"]},
    "mx1.example.test": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
    "mx2.example.test": {"A": ["127.0.0.3"]},
    "nullmx.test": {"MX": [(0, ".")]},
}


@pytest.mark.peer
def test_unbound_serves_its_zone_only() -> None:
    with Unbound(ZONE) as server:
        host, port = server.address

        def ask(name: str, rtype: str, tcp: bool = False) -> dns.message.Message:
            query = dns.message.make_query(name, rtype)
            send = dns.query.tcp if tcp else dns.query.udp
            return send(query, host, port=port, timeout=TIMEOUT)

        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers, resolver.port, resolver.lifetime = [host], port, TIMEOUT
        mx = sorted((r.preference, r.exchange.to_text()) for r in resolver.resolve(
            "example.test", "MX"))
        assert mx == [(10, "mx1.example.test."), (20, "mx2.example.test.")]
        assert [r.to_text() for r in resolver.resolve("mx1.example.test", "A")] == ["127.0.0.2"]
        assert [r.to_text() for r in resolver.resolve("mx1.example.test", "AAAA")] == ["::1"]
        assert [r.to_text() for r in resolver.resolve("example.test", "TXT")] == [
            '"v=spf1 ip4:127.0.0.0/8 -all"']
        assert [r.to_text() for r in resolver.resolve("nullmx.test", "MX")] == ["0 ."]
        answer = ask("mx2.example.test", "A", tcp=True)
        assert answer.answer[0].to_text() == "mx2.example.test. 300 IN A 127.0.0.3"
        nodata = ask("mx2.example.test", "AAAA")
        assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
        assert ask("nope.example.test", "A").rcode() == dns.rcode.NXDOMAIN
        assert ask("example.com", "MX").rcode() == dns.rcode.REFUSED
        # .test is one of unbound's built-in special-use zones (RFC 6761): NXDOMAIN
        assert ask("other.test", "MX").rcode() == dns.rcode.NXDOMAIN
    assert " 0 recursions" in server.log(), server.log()


# --- SmtpPeer -------------------------------------------------------------------------------


@pytest.fixture
def make_peer() -> Iterator[Callable[..., SmtpPeer]]:
    """Start SmtpPeers (default: on 127.0.0.2:25); all stopped (and checked) at the end."""
    started: list[SmtpPeer] = []

    def make(host: str = MX_HOST, port: int = 25, **options: Any) -> SmtpPeer:
        peer = SmtpPeer(host, port, **options)
        try:
            peer.start()
        except PermissionError:
            pytest.skip(f"binding {host}:{port} needs root")
        started.append(peer)
        return peer

    yield make
    for peer in started:
        peer.stop()


def refuse_bad(address: str) -> Reply | None:
    return Reply(550, "5.1.1", "No such user") if address.startswith("bad") else None


def test_peer_offers_exactly_the_configured_extensions(
        make_peer: Callable[..., SmtpPeer]) -> None:
    make_peer(extensions=["PIPELINING", "SIZE 1000", "8BITMIME"], hostname="mx1.example.test")
    with smtplib.SMTP(MX_HOST, 25, "client.test", TIMEOUT) as client:
        code, text = client.ehlo("client.test")
        assert code == 250
        assert text.decode().split("\n")[1:] == ["PIPELINING", "SIZE 1000", "8BITMIME"]
        code, text = client.mail("a@sender.test", ["SIZE=2000"])
        assert code == 552, text  # the SIZE offered is enforced


def test_peer_records_accepted_message_and_refuses_recipient(
        make_peer: Callable[..., SmtpPeer]) -> None:
    peer = make_peer(rcpt_reply=refuse_bad)
    data = b"Subject: test\r\n\r\n.leading dot\r\n"
    with smtplib.SMTP(MX_HOST, 25, "client.test", TIMEOUT) as client:
        refused = client.sendmail(
            "a@sender.test", ["u@example.test", "bad@example.test"], data,
            mail_options=["RET=HDRS", "ENVID=env1"],
            rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;u@example.test"])
    assert refused == {"bad@example.test": (550, b"5.1.1 No such user")}
    [received] = peer.wait_for_messages(1)
    assert (received.sender, received.recipients) == ("a@sender.test", ("u@example.test",))
    assert received.mail_params.endswith("RET=HDRS ENVID=env1")
    assert received.rcpt_params == ("NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;u@example.test",)
    assert received.data == data  # unstuffed: smtplib sent "..leading dot"
    assert received.commands[0] == "ehlo client.test"
    assert [c.split()[0].upper() for c in received.commands[1:]] == [
        "MAIL", "RCPT", "RCPT", "DATA"]
    assert not received.tls and not received.bdat and received.session == 1
    assert received.replies[0].code == 250
    with pytest.raises(TimeoutError, match="2 message"):
        peer.wait_for_messages(2, timeout=0.1)


def test_peer_greeting_421(make_peer: Callable[..., SmtpPeer]) -> None:
    make_peer(greeting=Reply(421, "4.3.2", "busy, try later"))
    with pytest.raises(smtplib.SMTPConnectError) as failure:
        smtplib.SMTP(MX_HOST, 25, "client.test", TIMEOUT)
    assert failure.value.smtp_code == 421
    with Client(MX_HOST, 25) as client:
        client.expect(421, "busy")
        assert client.closed()


def test_peer_greeting_554_then_only_quit(make_peer: Callable[..., SmtpPeer]) -> None:
    make_peer(greeting=Reply(554, "5.7.1", "go away"))
    with Client(MX_HOST, 25) as client:
        client.expect(554, "go away")
        client.expect_cmd("EHLO client.test", 503)
        client.expect_cmd("MAIL FROM:<a@sender.test>", 503)
        client.expect_cmd("QUIT", 221)
        assert client.closed()


def test_peer_starttls(make_peer: Callable[..., SmtpPeer]) -> None:
    peer = make_peer(extensions=["PIPELINING", "STARTTLS"])
    context = ssl.create_default_context(cafile=str(peer.cert_path))
    context.check_hostname = False  # the certificate names peer.test, not 127.0.0.2
    with smtplib.SMTP(MX_HOST, 25, "client.test", TIMEOUT) as client:
        client.ehlo("client.test")
        assert client.has_extn("starttls")
        client.starttls(context=context)
        code, text = client.ehlo("client.test")
        assert code == 250 and text.decode().split("\n")[1:] == ["PIPELINING"]  # no STARTTLS
        client.sendmail("a@sender.test", ["u@example.test"], b"Subject: tls\r\n\r\nhi\r\n")
    [received] = peer.wait_for_messages(1)
    assert received.tls
    assert [c.split()[0].upper() for c in received.commands[:3]] == [
        "EHLO", "STARTTLS", "EHLO"]


def test_peer_pipelining_bdat_and_data_refusal(make_peer: Callable[..., SmtpPeer]) -> None:
    def refuse_spam(received: ReceivedMessage) -> Reply | None:
        return Reply(554, "5.7.1", "spam") if b"spam" in received.data else None

    peer = make_peer("127.0.0.1", free_port(), data_reply=refuse_spam)
    with Client(*peer.address) as client:
        client.greeting_and_ehlo()
        client.send(b"MAIL FROM:<a@sender.test> BODY=8BITMIME\r\nRCPT TO:<u@example.test>\r\n"
                    b"BDAT 5\r\nhelloBDAT 6 LAST\r\n world")
        for code in (250, 250, 250, 250):
            client.expect(code)
        client.send_message("a@sender.test", ["u@example.test"], b"spam\r\n")
        client.expect_cmd("QUIT", 221)
    [accepted] = peer.messages
    assert accepted.bdat and accepted.pipelined and accepted.data == b"hello world"
    assert accepted.mail_params == "BODY=8BITMIME"
    assert "BDAT 6 LAST" in accepted.commands
    refused = peer.transactions[1]
    assert not refused.accepted and refused.replies == (Reply(554, "5.7.1", "spam"),)
    assert not refused.pipelined


def test_peer_lmtp_per_recipient_replies(make_peer: Callable[..., SmtpPeer]) -> None:
    def quota(address: str, received: ReceivedMessage) -> Reply | None:
        return Reply(452, "4.2.2", f"<{address}> Mailbox full") if address == "u3@l.test" \
            else None

    peer = make_peer("127.0.0.1", free_port(), lmtp=True, lmtp_reply=quota)
    with smtplib.LMTP(*peer.address, timeout=TIMEOUT) as client:
        client.ehlo("client.test")
        assert client.docmd("EHLO client.test")[0] == 500  # LMTP: LHLO only
        replies = lmtp_deliver(client, "a@sender.test", ["u1@l.test", "u2@l.test", "u3@l.test"],
                               b"Subject: lmtp\r\n\r\nhi\r\n")
    assert [code for code, _ in replies] == [250, 250, 452]
    [received] = peer.messages
    assert received.commands[0] == "lhlo client.test"
    assert received.delivered_to == ("u1@l.test", "u2@l.test")


def test_peer_port_in_use_and_stop_closes_connections(
        make_peer: Callable[..., SmtpPeer]) -> None:
    peer = make_peer("127.0.0.1", free_port())
    with pytest.raises(OSError, match=f"127.0.0.1:{peer.port}"):
        SmtpPeer(*peer.address).start()
    with Client(*peer.address) as client:
        client.greeting_and_ehlo()
        peer.stop()
        assert client.closed()
    assert peer.connections == 1
    peer.start()  # the same address again, at once
    with Client(*peer.address) as client:
        client.greeting_and_ehlo()
