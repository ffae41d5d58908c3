"""Delivery to real peers from Debian: Postfix, smtp-sink/smtp-source, Dovecot LMTP, unbound.

- Postfix downstream: tayori's ``remote`` action relays (``deliver = "relay"``,
  ``host = "[127.0.0.1]:PORT"``) to a private Postfix, which relays on to a scriptable
  SmtpPeer (the end of the line, where bytes and parameters are compared) or to
  smtp-sink (where volume is counted).
- Dovecot LMTP: an ``lmtp`` action over TCP and over the unix socket, with a per-user
  quota; the sender's domain has an MX (a DNS stub) on 127.0.4.4:25, where the DSNs
  arrive.
- unbound: a real DNS server serves the MX records instead of the dnslib stub.
- smtp-sink as an MX host (a port other than 25, via the ``mx`` action's ``port``).

MX hosts on port 25 listen on 127.0.4.x, apart from test_delivery.py's 127.0.0.x, so the
two modules can run at the same time. Retries use a one-second schedule; nothing sleeps,
every wait has a deadline.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from test_postfix_relay import as_postfix_relays, big_body, with_date_and_id

from delivery_helpers import (
    CORPUS,
    MakeTayori,
    Outgoing,
    corpus_message,
    dsn_fields,
    dsn_recipients,
    dump_recipients,
    is_8bit,
    log_lines,
    needs_port_25,
    parse_dsn,
    shared_tmpdir,
    sink_sessions,
    split_received,
    submit,
    submit_all,
)
from harness import Tayori, shared_data, wait_for, which_peer
from peers import (
    DovecotLmtp,
    PostfixInstance,
    SmtpSink,
    Unbound,
    postfix_available,
    smtp_source,
)
from tayori.testing.dnsstub import DnsStub
from tayori.testing.peer import SmtpPeer

pytestmark = pytest.mark.peer

SENDER = "alice@sender.test"
MX_UP = "127.0.4.2"          # an SmtpPeer on port 25
MX_DOWN = "127.0.4.3"        # nothing listens
SENDER_MX = "127.0.4.4"      # the sender's domain: DSNs arrive here

ZONE: dict[str, Any] = {
    "sender.test": {"MX": [(10, "mx.sender.test")]},
    "mx.sender.test": {"A": [SENDER_MX]},
    "sink.test": {"MX": [(10, "mx.sink.test")]},
    "mx.sink.test": {"A": ["127.0.0.1"]},
}


def simple(name: str, subject: str, body: bytes, extra: bytes = b"") -> bytes:
    return (f"From: Alice <{SENDER}>\r\nTo: <{name}@dest.test>\r\nSubject: {subject}\r\n"
            f"Date: Mon, 04 Mar 2024 10:00:00 +0000\r\nMessage-ID: <{name}@sender.test>\r\n"
            ).encode() + extra + b"\r\n" + body


@pytest.fixture
def dns() -> Iterator[DnsStub]:
    with DnsStub(ZONE, ttl=1, negative_ttl=1) as stub:
        yield stub


@pytest.fixture
def peers() -> Iterator[Callable[..., SmtpPeer]]:
    with ExitStack() as stack:
        def make(host: str, port: int = 25, **options: Any) -> SmtpPeer:
            return stack.enter_context(SmtpPeer(host, port, **options))
        yield make


@pytest.fixture
def mta(make_tayori: MakeTayori, dns: DnsStub) -> MakeTayori:
    """A tayori delivering, its resolver the DNS stub, retrying every second."""
    host, port = dns.address

    def make(**options: Any) -> Tayori:
        options.setdefault("dns", {"nameservers": [f"{host}:{port}"], "timeout": "2s"})
        options["queue"] = {"retry": ["1s"], **options.get("queue", {})}
        options["remote"] = {"tls": "none", **options.get("remote", {})}
        return make_tayori(deliver=True, **options)
    return make


def relaying_to(postfix: PostfixInstance) -> dict[str, Any]:
    """[actions.remote] options: everything not local goes to Postfix, plain text."""
    return {"deliver": "relay", "host": f"[127.0.0.1]:{postfix.port}", "tls": "none"}


def queue_empty(tayori: Tayori) -> bool:
    return not tayori.envelopes()


# --- 1. Postfix downstream: bytes and DSN parameters ------------------------------------


@pytest.fixture(scope="module")
def chain() -> Iterator[tuple[PostfixInstance, SmtpPeer]]:
    """A Postfix relaying everything to an SmtpPeer on 127.0.0.1 (the end of the line);
    Postfix logs its SMTP dialogs with 127.0.0.1 (both tayori's and the peer's)."""
    postfix_available()
    with SmtpPeer("127.0.0.1", 0, hostname="final.test") as final:
        postfix = PostfixInstance(relayhost=f"[127.0.0.1]:{final.port}",
                                  settings={"debug_peer_list": "127.0.0.1",
                                            "debug_peer_level": "1"})
        with postfix:
            yield postfix, final


def corpus_items() -> list[tuple[str, bytes, str]]:
    """(name, message, BODY=) for the hand-made messages and the MIME corpus."""
    items = [
        ("plain", simple("plain", "plain", b"Hello.\r\n.\r\n..two dots\r\n.\r\n"), ""),
        ("eightbit", simple("eightbit", "8-bit", "Grüße, こんにちは\r\n".encode() + b"\xe9\r\n",
                            b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                            b"Content-Transfer-Encoding: 8bit\r\n"), "8BITMIME"),
        ("big", simple("big", "300 KB", big_body(300 * 1024)), ""),
        ("no-final-newline-in-body", simple("nonl", "x", b"last line\r\n"), ""),
    ]
    for path in CORPUS:
        name = "corpus-" + path.stem.replace("_", "-").lower()
        message = with_date_and_id(corpus_message(path), name)
        items.append((name, message, "8BITMIME" if is_8bit(message) else ""))
    return items


def test_relayed_through_postfix_byte_identical(
        chain: tuple[PostfixInstance, SmtpPeer], mta: MakeTayori) -> None:
    """What tayori received is what reaches the end of the line, but for the Received
    fields of tayori and Postfix on top and the documented changes of Postfix's cleanup
    (test_postfix_relay.as_postfix_relays)."""
    shared_data("mime")
    postfix, final = chain
    final.clear()
    items = corpus_items()
    tayori = mta(remote=relaying_to(postfix), limits={"max_message_size": "20M"})
    submit_all(tayori, [Outgoing((f"{name}@dest.test",), message,
                                 mail_params=f" BODY={body}" if body else "")
                        for name, message, body in items])
    received = final.wait_for_messages(len(items), timeout=60)
    wait_for(lambda: queue_empty(tayori), what="tayori's queue to empty")
    by_rcpt: dict[str, list[bytes]] = {}
    for got in received:
        assert got.sender == SENDER
        for rcpt in got.recipients:
            by_rcpt.setdefault(rcpt, []).append(got.data)
    assert sorted(by_rcpt) == sorted(f"{name}@dest.test" for name, _, _ in items)
    mismatched = []
    for name, message, _ in items:
        [data] = by_rcpt[f"{name}@dest.test"]
        (postfix_trace, tayori_trace), rest = split_received(data, 2)
        assert b"by postfix.test (Postfix)" in postfix_trace, postfix_trace
        assert b"by mx.tayori.test" in tayori_trace, tayori_trace
        # Postfix's cleanup sees tayori's Received on top, then the message.
        expected = as_postfix_relays(tayori_trace + message)
        assert expected.startswith(tayori_trace)
        if rest != expected[len(tayori_trace):]:
            mismatched.append(name)
    assert not mismatched, f"not byte-identical at the end of the line: {mismatched}"


def test_dsn_parameters_carried_through_postfix(
        chain: tuple[PostfixInstance, SmtpPeer], mta: MakeTayori) -> None:
    """RET, ENVID (MAIL) and NOTIFY, ORCPT (RCPT) go from the client through tayori and
    Postfix to the end of the line; nobody sends a DSN (every hop offered DSN)."""
    postfix, final = chain
    final.clear()
    tayori = mta(remote=relaying_to(postfix))
    message = simple("dsn", "dsn parameters", b"Hello.\r\n")
    queue_id = submit(tayori, ["bob@dest.test"], message,
                      mail_params=" RET=HDRS ENVID=env+2Bid-1",
                      rcpt_params=" NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;orig+2Bbob@dest.test")
    [got] = final.wait_for_messages(1, timeout=30)
    assert got.recipients == ("bob@dest.test",)
    assert "RET=HDRS" in got.mail_params.split()
    assert "ENVID=env+2Bid-1" in got.mail_params.split()
    params = got.rcpt_params[0].split()
    assert "NOTIFY=SUCCESS,FAILURE" in params
    assert "ORCPT=rfc822;orig+2Bbob@dest.test" in params
    # What tayori sent, as Postfix's smtpd logged it (debug_peer_list).
    smtpd = r"smtpd\[\d+\]: < [^:\n]*\[127\.0\.0\.1\]: "
    mail = postfix.wait_for(lambda: re.search(smtpd + r"MAIL FROM:<alice@sender\.test> [^\n]*"
                                              r"ENVID=env\+2Bid-1[^\n]*", postfix.log()),
                            what="smtpd's log of tayori's MAIL")
    assert isinstance(mail, re.Match) and "RET=HDRS" in mail.group(0).split()
    rcpt = re.search(smtpd + r"RCPT TO:<bob@dest\.test> [^\n]*", postfix.log()[mail.end():])
    assert rcpt, postfix.log()[mail.end():]
    assert "NOTIFY=SUCCESS,FAILURE" in rcpt.group(0).split()
    assert "ORCPT=rfc822;orig+2Bbob@dest.test" in rcpt.group(0).split()
    wait_for(lambda: queue_empty(tayori), what="tayori's queue to empty")
    postfix.wait_queue_empty()
    [line] = log_lines(tayori, "delivered", queue_id)
    assert "dsn=" not in line                 # passed on: no "relayed" notice from tayori
    assert [m for m in final.messages if m.sender == ""] == []


# --- 2. smtp-source -> tayori -> Postfix -> smtp-sink -----------------------------------


def test_smtp_source_to_postfix_to_smtp_sink(mta: MakeTayori) -> None:
    """200 messages in 20 sessions, 2 recipients each: every (message, recipient) pair
    reaches smtp-sink exactly once."""
    which_peer("smtp-source")
    postfix_available()
    messages, sessions = 200, 20
    with ExitStack() as stack:
        sink = stack.enter_context(SmtpSink(dump_dir=stack.enter_context(shared_tmpdir())))
        postfix = stack.enter_context(PostfixInstance(relayhost=f"[127.0.0.1]:{sink.port}"))
        tayori = mta(remote=relaying_to(postfix))
        run = smtp_source(tayori.port, "-s", str(sessions), "-m", str(messages), "-r", "2",
                    "-l", "1024", "-f", "a@x.test", "-t", "u@dest.test")
        assert run.returncode == 0, run.stderr
        assert run.counter == messages

        def arrived() -> int:
            return sum(len(dump_recipients(path)) for path in sink.dumped())

        wait_for(lambda: arrived() >= 2 * messages, timeout=40, interval=0.2,
                 what=f"{2 * messages} recipients at smtp-sink")
        wait_for(lambda: queue_empty(tayori), what="tayori's queue to empty")
        postfix.wait_queue_empty(timeout=20)
        recipients = [r for path in sink.dumped() for r in dump_recipients(path)]
        assert sorted(set(recipients)) == ["2u@dest.test", "u@dest.test"]
        assert recipients.count("u@dest.test") == messages
        assert recipients.count("2u@dest.test") == messages
        assert sink.counter() >= messages
        assert len(log_lines(tayori, "delivered")) == 2 * messages
        assert log_lines(tayori, "deferred") == [] and log_lines(tayori, "bounced") == []


# --- 3. Dovecot LMTP -------------------------------------------------------------------


@pytest.fixture
def dovecot() -> Iterator[DovecotLmtp]:
    with DovecotLmtp() as server:
        yield server


def lmtp_tayori(mta: MakeTayori, host: str) -> Tayori:
    """A tayori routing lmtp.test to an ``lmtp`` action (``host``); everything else, the
    sender's domain included (DSNs), by MX. The client (127.0.0.1) is not in the trusted
    networks, so the catch-all rule does not take lmtp.test first."""
    extra = (f'[actions.lmtp]\ndeliver = "lmtp"\nhost = "{host}"\n\n'
             '[[match]]\nfrom = "any"\nto = "lmtp.test"\naction = "lmtp"\n')
    return mta(trusted=["192.0.2.0/24"], extra=extra)


def quota_message(size: int) -> bytes:
    line = b"0123456789" * 7 + b"\r\n"
    return (f"From: Alice <{SENDER}>\r\nTo: u1@lmtp.test, u2@lmtp.test, u3@lmtp.test\r\n"
            "Subject: over quota for u3\r\nMessage-ID: <quota@sender.test>\r\n\r\n").encode() \
        + line * (size // len(line))


@needs_port_25(SENDER_MX)
@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_lmtp_one_recipient_over_quota(mta: MakeTayori, dovecot: DovecotLmtp,
                                       peers: Callable[..., SmtpPeer], transport: str) -> None:
    """One LMTP transaction for u1, u2, u3; u3 is over quota (552 after the data): only
    u3 fails, with a DSN to the sender; u1 and u2 have the message in their Maildirs."""
    sender_mx = peers(SENDER_MX)
    host = f"127.0.0.1:{dovecot.port}" if transport == "tcp" else str(dovecot.socket_path)
    tayori = lmtp_tayori(mta, host)
    message = quota_message(4096)
    queue_id = submit(tayori, ["u1@lmtp.test", "u2@lmtp.test", "u3@lmtp.test"], message)
    [dsn_message] = sender_mx.wait_for_messages(1, timeout=20)
    assert dsn_message.sender == "" and dsn_message.recipients == (SENDER,)
    dsn = parse_dsn(dsn_message.data)
    [u3] = dsn_recipients(dsn)
    assert u3["Final-Recipient"] == "rfc822; u3@lmtp.test"
    assert u3["Action"] == "failed"
    assert u3["Status"] == "5.2.2"
    assert "Quota exceeded" in u3["Diagnostic-Code"]
    if transport == "tcp":   # (the unix socket: test_lmtp_unix_socket_remote_mta)
        assert u3["Remote-MTA"] == "dns; 127.0.0.1"
    wait_for(lambda: queue_empty(tayori), what="tayori's queue to empty")
    [bounced] = log_lines(tayori, "bounced", queue_id)
    assert "to=u3@lmtp.test" in bounced
    delivered = log_lines(tayori, "delivered", queue_id)
    assert sorted(re.search(r" to=(\S+)", line).group(1)  # type: ignore[union-attr]
                  for line in delivered) == ["u1@lmtp.test", "u2@lmtp.test"]
    for user in ("u1@lmtp.test", "u2@lmtp.test"):
        [stored] = dovecot.messages(user)
        # Dovecot prepends Return-Path and its Received (Delivered-To only for a single
        # recipient) and stores LF line ends; under them, tayori's Received, then the
        # bytes the client sent.
        sent = message.replace(b"\r\n", b"\n")
        assert stored.endswith(sent), stored[:400]
        (dovecot_trace, tayori_trace), rest = split_received(
            stored.split(b"\n", 1)[1], 2)
        assert stored.startswith(b"Return-Path: <alice@sender.test>\n")
        assert b"by lmtp.test with LMTP" in dovecot_trace
        assert b"by mx.tayori.test" in tayori_trace
        assert rest == sent
    assert dovecot.messages("u3@lmtp.test") == []


@needs_port_25(SENDER_MX)
def test_lmtp_unix_socket_remote_mta(mta: MakeTayori, dovecot: DovecotLmtp,
                                     peers: Callable[..., SmtpPeer]) -> None:
    """A failure over the unix socket: the DSN's Remote-MTA, if any, is a host name."""
    sender_mx = peers(SENDER_MX)
    tayori = lmtp_tayori(mta, str(dovecot.socket_path))
    submit(tayori, ["u3@lmtp.test"], quota_message(4096))
    [dsn_message] = sender_mx.wait_for_messages(1, timeout=20)
    [u3] = dsn_recipients(parse_dsn(dsn_message.data))
    assert u3["Status"] == "5.2.2"
    remote = u3["Remote-MTA"]
    assert remote is None or remote == "dns; lmtp.test", remote


@needs_port_25(SENDER_MX)
def test_lmtp_notify_success_gives_delivered_dsn(mta: MakeTayori, dovecot: DovecotLmtp,
                                                 peers: Callable[..., SmtpPeer]) -> None:
    """NOTIFY=SUCCESS to an LMTP recipient: delivered into the mailbox store, so the
    DSN says ``delivered`` (Dovecot offers no DSN extension to pass the request on to)."""
    sender_mx = peers(SENDER_MX)
    tayori = lmtp_tayori(mta, f"127.0.0.1:{dovecot.port}")
    message = simple("u1", "notify success", b"Hello.\r\n")
    queue_id = submit(tayori, ["u1@lmtp.test"], message, rcpt_params=" NOTIFY=SUCCESS",
                      mail_params=" ENVID=success-1")
    [dsn_message] = sender_mx.wait_for_messages(1, timeout=20)
    assert dsn_message.sender == ""
    dsn = parse_dsn(dsn_message.data)
    [u1] = dsn_recipients(dsn)
    assert u1["Final-Recipient"] == "rfc822; u1@lmtp.test"
    assert u1["Action"] == "delivered"
    assert u1["Status"].startswith("2.")
    assert dsn_fields(dsn)[0]["Original-Envelope-Id"] == "success-1"
    assert len(dovecot.messages("u1@lmtp.test")) == 1
    wait_for(lambda: queue_empty(tayori), what="tayori's queue to empty")
    [line] = log_lines(tayori, "delivered", queue_id)
    assert "dsn=delivered:" in line


# --- 4. a real DNS server ---------------------------------------------------------------


@needs_port_25(MX_UP)
def test_mx_from_unbound_primary_down_secondary_up(mta: MakeTayori,
                                                   peers: Callable[..., SmtpPeer]) -> None:
    """unbound serves the MX records: direct.test's only MX is up and gets its mail;
    backup.test's primary MX is down (connection refused), its secondary gets it."""
    mx = peers(MX_UP)
    records: dict[str, Any] = {
        "direct.test": {"MX": [(10, "mx.direct.test")]},
        "mx.direct.test": {"A": [MX_UP]},
        "backup.test": {"MX": [(10, "mx1.backup.test"), (20, "mx2.backup.test")]},
        "mx1.backup.test": {"A": [MX_DOWN]},
        "mx2.backup.test": {"A": [MX_UP]},
    }
    with Unbound(records) as unbound:
        tayori = mta(dns={"nameservers": [unbound.nameserver], "timeout": "2s"})
        direct = submit(tayori, ["bob@direct.test"], simple("bob", "direct", b"one\r\n"))
        backup = submit(tayori, ["carol@backup.test"], simple("carol", "backup", b"two\r\n"))
        got = mx.wait_for_messages(2, timeout=20)
        wait_for(lambda: queue_empty(tayori), what="tayori's queue to empty")
    assert sorted(r for m in got for r in m.recipients) == ["bob@direct.test",
                                                             "carol@backup.test"]
    [failed] = [line for line in log_lines(tayori, "connect-failed")
                if f"queue_id={backup}" in line]
    assert f"mx1.backup.test[{MX_DOWN}]:25" in failed
    [line] = log_lines(tayori, "delivered", backup)
    assert f"mx2.backup.test[{MX_UP}]:25" in line
    [line] = log_lines(tayori, "delivered", direct)
    assert f"mx.direct.test[{MX_UP}]:25" in line


# --- 5. smtp-sink as an MX host ---------------------------------------------------------


def established_to(port: int) -> int:
    """TCP connections in state ESTABLISHED with local port ``port`` (IPv4)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
            count += 1
    return count


def test_smtp_sink_as_mx_reuses_connections(mta: MakeTayori) -> None:
    """100 messages to one MX host (smtp-sink): all arrive, over fewer connections than
    messages (a connection that finished a transaction carries the next)."""
    count = 100
    with SmtpSink() as sink:
        tayori = mta(remote={"port": sink.port})
        submit_all(tayori, [Outgoing((f"u{n}@sink.test",), simple(f"u{n}", f"n{n}", b"x\r\n"))
                            for n in range(count)])
        wait_for(lambda: sink.counter() >= count, timeout=30, what=f"{count} at smtp-sink")
        wait_for(lambda: queue_empty(tayori), what="tayori's queue to empty")
        assert len(log_lines(tayori, "delivered")) == count
        assert all("mx.sink.test[127.0.0.1]" in line for line in log_lines(tayori, "delivered"))
        tayori.stop()     # closes (QUITs) the idle connections
        wait_for(lambda: established_to(sink.port) == 0, what="the connections to close")
        assert sink.counter() == count
        connections = sink_sessions(sink.text())
    assert 0 < connections < count, f"{connections} connections for {count} messages"
