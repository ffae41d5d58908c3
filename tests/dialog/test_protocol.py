"""Scripted SMTP dialogs against a real ``tayori serve``: keywords, every error path, pipelining.

The module shares one server (``server`` fixture: 1 MiB size limit, 5 recipients, 3 unknown
commands) and opens a fresh connection per test.
"""

from __future__ import annotations

import socket

import pytest

from harness import Client, Tayori, envelopes_by_id, queued_id, strip_received

MESSAGE = b"From: a@example.net\r\nTo: u@tayori.test\r\nSubject: t\r\n\r\nhello\r\n"


def start(server: Tayori) -> Client:
    client = server.client()
    client.greeting_and_ehlo()
    return client


def test_greeting_and_ehlo_keywords(server: Tayori) -> None:
    with server.client() as client:
        greeting = client.expect(220)
        assert "mx.tayori.test" in greeting.text and "ESMTP" in greeting.text
        ehlo = client.expect_cmd("EHLO client.test", 250)
    keywords = {line.split()[0] for line in ehlo.lines[1:]}
    assert {"PIPELINING", "SIZE", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8", "CHUNKING",
            "BINARYMIME", "DSN", "STARTTLS"} <= keywords
    assert f"SIZE {1024 * 1024}" in ehlo.lines


def test_helo_offers_no_extensions(server: Tayori) -> None:
    with server.client() as client:
        client.expect(220)
        client.expect_cmd("HELO client.test", 250)
        reply = client.cmd("MAIL FROM:<a@example.net> SIZE=10")
        assert (reply.code, reply.status) == (555, "5.5.4")
        client.expect_cmd("MAIL FROM:<a@example.net>", 250)


@pytest.mark.parametrize(("command", "code", "status"), [
    ("MAIL FROM:<a@example.net>", 503, "5.5.1"),
    ("RCPT TO:<u@tayori.test>", 503, "5.5.1"),
    ("DATA", 503, "5.5.1"),
])
def test_commands_out_of_order_before_helo(server: Tayori, command: str, code: int,
                                           status: str) -> None:
    with server.client() as client:
        client.expect(220)
        reply = client.cmd(command)
        assert (reply.code, reply.status) == (code, status)
        client.expect_cmd("NOOP", 250)  # the session survives


def test_sequence_errors_in_a_transaction(server: Tayori) -> None:
    with start(server) as client:
        assert client.cmd("RCPT TO:<u@tayori.test>").code == 503
        assert client.cmd("DATA").code == 503
        client.expect_cmd("MAIL FROM:<a@example.net>", 250)
        assert client.cmd("MAIL FROM:<b@example.net>").code == 503
        assert client.cmd("DATA").code == 503  # no recipient yet
        client.expect_cmd("RSET", 250)
        assert client.cmd("RCPT TO:<u@tayori.test>").code == 503  # RSET ended it


def test_unknown_commands_end_the_session(server: Tayori) -> None:
    with start(server) as client:
        for _ in range(3):
            reply = client.cmd("FOO bar")
            assert (reply.code, reply.status) == (500, "5.5.1")
        reply = client.cmd("FOO bar")
        assert reply.code == 421
        assert client.closed()


def test_http_request_ends_the_session(server: Tayori) -> None:
    with server.client() as client:
        client.expect(220)
        client.send(b"GET / HTTP/1.1\r\nHost: mx\r\n\r\n")
        reply = client.reply()
        assert reply.code == 502
        assert client.closed()


def test_command_line_too_long(server: Tayori) -> None:
    with start(server) as client:
        reply = client.cmd("NOOP " + "x" * 600)
        assert (reply.code, reply.status) == (500, "5.5.6")
        client.send(b"NOOP " + b"x" * 10000 + b"\r\n")  # longer than any buffer
        assert client.reply().status == "5.5.6"
        client.expect_cmd("NOOP", 250)


@pytest.mark.parametrize("argument", ["<a\x00b@example.net>", "<a@exa\x00mple.net>"])
def test_nul_in_address_is_501(server: Tayori, argument: str) -> None:
    with start(server) as client:
        reply = client.cmd(f"MAIL FROM:{argument}")
        assert (reply.code, reply.status) == (501, "5.5.2")


def test_bare_cr_inside_a_command_is_refused(server: Tayori) -> None:
    with start(server) as client:
        client.send(b"MAIL FROM:<a\r@example.net>\r\n")
        assert client.reply().code == 521
        assert client.closed()


def test_bare_lf_ending_a_command_closes(server: Tayori) -> None:
    with start(server) as client:
        client.send(b"NOOP\n")
        reply = client.reply()
        assert (reply.code, reply.status) == (521, "5.5.2")
        assert client.closed()


@pytest.mark.parametrize(("argument", "code", "status"), [
    ("<no-at-sign>", 501, "5.1.7"),
    ("<a@-bad-.example>", 501, "5.1.7"),
    ("<a@xn--->", 501, "5.1.8"),
    ("<\"quoted local\"@example.net>", 250, "2.1.0"),
    ("<a@[192.0.2.1]>", 250, "2.1.0"),
    ("<a@[IPv6:2001:db8::1]>", 250, "2.1.0"),
    ("<a@[300.0.0.1]>", 501, "5.1.7"),
    ("<@relay.example:a@example.net>", 250, "2.1.0"),
    ("<>", 250, "2.1.0"),
    ("<a@example.net> SIZE=999999999", 552, "5.3.4"),
    ("<a@example.net> BODY=9BIT", 501, "5.5.4"),
    ("<a@example.net> FOO=1", 555, "5.5.4"),
    ("<a@example.net> RET=FULL RET=HDRS", 501, "5.5.4"),
    ("<a@example.net> RET=FULL RET=FULL", 250, "2.1.0"),
    ("<a@example.net> ENVID=bad=value", 501, "5.5.4"),
    ("<a@example.net> ENVID=x+0D+0ABcc:+20victim@example.com", 501, "5.5.4"),   # RFC 3461 §4.2
    ("<ü@example.net>", 553, "5.6.7"),
    ("<ü@例え.jp> SMTPUTF8", 250, "2.1.0"),
])
def test_mail_from_syntax(server: Tayori, argument: str, code: int, status: str) -> None:
    with start(server) as client:
        reply = client.cmd(f"MAIL FROM:{argument}")
        assert (reply.code, reply.status) == (code, status), str(reply)


@pytest.mark.parametrize(("argument", "code", "status"), [
    ("<u@tayori.test> NOTIFY=NEVER", 250, "2.1.5"),
    ("<u@tayori.test> NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=rfc822;u+40tayori.test", 250, "2.1.5"),
    ("<u@tayori.test> NOTIFY=NEVER,SUCCESS", 501, "5.5.4"),
    ("<u@tayori.test> ORCPT=u@tayori.test", 501, "5.5.4"),
    ("<u@tayori.test> ORCPT=utf-8;u@tayori.test", 501, "5.5.4"),
    ("<u@tayori.test> ORCPT=rfc822;x+0D+0AAuthentication-Results:+20mx.tayori.test;+20dkim=pass",
     501, "5.5.4"),                                    # a decoded line break: header forgery
    ("<u@tayori.test> ORCPT=rfc822;u+00@tayori.test", 501, "5.5.4"),
    ("<u@tayori.test> ORCPT=rfc822;u+20x@tayori.test", 250, "2.1.5"),
    ('<"|/bin/sh"@tayori.test>', 550, "5.1.3"),         # a delivery instruction (test_open_relay)
    ("<>", 501, "5.1.3"),
    ("<u@TAYORI.test>", 250, "2.1.5"),
])
def test_rcpt_to_syntax(server: Tayori, argument: str, code: int, status: str) -> None:
    with start(server) as client:
        client.expect_cmd("MAIL FROM:<a@example.net>", 250)
        reply = client.cmd(f"RCPT TO:{argument}")
        assert (reply.code, reply.status) == (code, status), str(reply)


def test_dsn_parameters_are_stored_per_recipient(server: Tayori) -> None:
    with start(server) as client:
        client.expect_cmd("MAIL FROM:<a@example.net> RET=HDRS ENVID=QQ+2B1", 250)
        client.expect_cmd("RCPT TO:<u@tayori.test> NOTIFY=SUCCESS,DELAY "
                          "ORCPT=rfc822;orig+40example.net", 250)
        client.expect_cmd("RCPT TO:<v@tayori.test> NOTIFY=NEVER", 250)
        client.expect_cmd("RCPT TO:<w@tayori.test>", 250)
        client.expect_cmd("DATA", 354)
        client.send(MESSAGE + b".\r\n")
        queue_id = queued_id(client.expect(250))
    envelope = envelopes_by_id(server)[queue_id]
    assert (envelope.ret, envelope.envid) == ("HDRS", "QQ+2B1")
    notify = [(r.address, r.notify, r.orcpt) for r in envelope.recipients]
    assert notify == [("u@tayori.test", ("SUCCESS", "DELAY"), "rfc822;orig+40example.net"),
                      ("v@tayori.test", ("NEVER",), None), ("w@tayori.test", None, None)]


def test_too_many_recipients(server: Tayori) -> None:
    with start(server) as client:
        client.expect_cmd("MAIL FROM:<a@example.net>", 250)
        for i in range(5):
            client.expect_cmd(f"RCPT TO:<u{i}@tayori.test>", 250)
        reply = client.cmd("RCPT TO:<u9@tayori.test>")
        assert (reply.code, reply.status) == (452, "4.5.3")
        client.expect_cmd("DATA", 354)  # the five accepted still go through
        client.send(MESSAGE + b".\r\n")
        queue_id = queued_id(client.expect(250))
    assert len(envelopes_by_id(server)[queue_id].recipients) == 5


def test_relay_denied_for_foreign_domain_from_untrusted(make_tayori: object) -> None:
    strict = make_tayori(trusted=["192.0.2.0/24"])  # type: ignore[operator]
    with start(strict) as client:
        client.expect_cmd("MAIL FROM:<a@example.net>", 250)
        reply = client.cmd("RCPT TO:<victim@example.com>")
        assert (reply.code, reply.status) == (554, "5.7.1")
        client.expect_cmd("RCPT TO:<u@tayori.test>", 250)  # local still accepted
    assert "Relay access denied" in strict.log() or "reject" in strict.log()


def test_message_too_big_during_data(server: Tayori) -> None:
    with start(server) as client:
        client.expect_cmd("MAIL FROM:<a@example.net>", 250)
        client.expect_cmd("RCPT TO:<u@tayori.test>", 250)
        client.expect_cmd("DATA", 354)
        client.send((b"x" * 998 + b"\r\n") * 1100 + b".\r\n")
        reply = client.reply()
        assert (reply.code, reply.status) == (552, "5.3.4")
        client.expect_cmd("NOOP", 250)  # the session survives


def test_text_line_too_long_in_data(server: Tayori) -> None:
    with start(server) as client:
        client.expect_cmd("MAIL FROM:<a@example.net>", 250)
        client.expect_cmd("RCPT TO:<u@tayori.test>", 250)
        client.expect_cmd("DATA", 354)
        client.send(b"Subject: x\r\n\r\n" + b"y" * 1001 + b"\r\n.\r\n")
        reply = client.reply()
        assert (reply.code, reply.status) == (500, "5.5.6")
        client.expect_cmd("NOOP", 250)


def test_pipelined_transaction_gets_replies_in_order(server: Tayori) -> None:
    with start(server) as client:
        client.send(b"MAIL FROM:<a@example.net>\r\nRCPT TO:<u@tayori.test>\r\n"
                    b"RCPT TO:<nobody@example.com>\r\nRCPT TO:<v@tayori.test>\r\nDATA\r\n")
        codes = [client.reply().code for _ in range(5)]
        assert codes == [250, 250, 250, 250, 354]  # 127.0.0.1 is trusted: may relay
        client.send(MESSAGE + b".\r\nRSET\r\nNOOP\r\nQUIT\r\n")
        assert [client.reply().code for _ in range(4)] == [250, 250, 250, 221]


def test_several_messages_on_one_connection(server: Tayori) -> None:
    with start(server) as client:
        ids = {queued_id(client.send_message("a@example.net", ["u@tayori.test"], MESSAGE))
               for _ in range(5)}
    assert len(ids) == 5
    assert ids <= set(envelopes_by_id(server))


def test_dot_stuffing_is_undone(server: Tayori) -> None:
    with start(server) as client:
        reply = client.send_message("a@example.net", ["u@tayori.test"],
                                    b"Subject: dots\r\n\r\n..leading\r\n...\r\n.x\r\n")
        queue_id = queued_id(reply)
    assert strip_received(server.body(queue_id)) == b"Subject: dots\r\n\r\n.leading\r\n..\r\nx\r\n"


def test_received_header_and_queue_id(server: Tayori) -> None:
    with start(server) as client:
        queue_id = queued_id(client.send_message("a@example.net", ["u@tayori.test"], MESSAGE))
    body = server.body(queue_id)
    header = body.split(b"\r\n\r\n")[0].decode()
    assert header.startswith("Received: from client.test ([127.0.0.1])")
    assert f"by mx.tayori.test (tayori) with ESMTP id {queue_id}" in header
    assert "for <u@tayori.test>;" in header
    assert f"queue_id={queue_id}" in server.log()


def test_mail_loop_is_refused(server: Tayori) -> None:
    hops = b"".join(b"Received: from hop%d by somewhere; Sat, 1 Jan 2000 00:00:00 +0000\r\n" % i
                    for i in range(101))
    with start(server) as client:
        reply = client.send_message("a@example.net", ["u@tayori.test"], hops + MESSAGE)
        assert (reply.code, reply.status) == (554, "5.4.6")
        hundred = b"".join(hops.split(b"\r\n")[i] + b"\r\n" for i in range(100))
        reply = client.send_message("a@example.net", ["u@tayori.test"], hundred + MESSAGE)
        assert reply.code == 250


def test_vrfy_is_off_by_default(server: Tayori) -> None:
    with start(server) as client:
        reply = client.cmd("VRFY postmaster")
        assert (reply.code, reply.status) == (252, "2.5.0")
        assert client.cmd("EXPN staff").code == 502
        help_reply = client.cmd("HELP")
        assert help_reply.code == 214


def test_bdat_message(server: Tayori) -> None:
    body = b"Subject: chunks\r\n\r\nline one\r\n.line two starts with a dot\r\n"
    with start(server) as client:
        client.expect_cmd("MAIL FROM:<a@example.net> BODY=8BITMIME", 250)
        client.expect_cmd("RCPT TO:<u@tayori.test>", 250)
        client.send(b"BDAT 20\r\n" + body[:20])
        assert client.reply().text.startswith("2.0.0 20 octets")
        client.send(b"BDAT %d LAST\r\n" % (len(body) - 20) + body[20:])
        queue_id = queued_id(client.expect(250))
    assert strip_received(server.body(queue_id)) == body  # no dot-unstuffing in BDAT


def test_bdat_pipelined_and_binarymime(server: Tayori) -> None:
    body = b"Content-Type: application/octet-stream\r\n\r\n" + bytes(range(256)) * 4
    with start(server) as client:
        client.send(b"MAIL FROM:<a@example.net> BODY=BINARYMIME\r\nRCPT TO:<u@tayori.test>\r\n"
                    b"BDAT 100\r\n" + body[:100] + b"BDAT %d LAST\r\n" % (len(body) - 100)
                    + body[100:])
        codes = [client.reply() for _ in range(4)]
        assert [r.code for r in codes] == [250, 250, 250, 250]
        queue_id = queued_id(codes[-1])
        assert client.cmd("DATA").code == 503  # transaction is over
    assert strip_received(server.body(queue_id)) == body


def test_bdat_errors(server: Tayori) -> None:
    with start(server) as client:
        client.send(b"BDAT 5\r\nxxxxx")  # no transaction: the chunk is read, then 503
        assert client.reply().code == 503
        client.expect_cmd("MAIL FROM:<a@example.net>", 250)
        client.expect_cmd("RCPT TO:<u@tayori.test>", 250)
        client.send(b"BDAT 2000000 LAST\r\n" + b"z" * 2000000)
        assert (client.reply().status) == "5.3.4"
        client.expect_cmd("MAIL FROM:<a@example.net> BODY=BINARYMIME", 250)
        client.expect_cmd("RCPT TO:<u@tayori.test>", 250)
        assert client.cmd("DATA").status == "5.6.1"
        client.expect_cmd("RSET", 250)
        client.expect_cmd("MAIL FROM:<a@example.net>", 250)
        client.expect_cmd("RCPT TO:<u@tayori.test>", 250)
        client.send(b"BDAT 6 LAST\r\nbare\nx")  # bare LF in a text body: refused, session goes on
        assert client.reply().status == "5.6.0"
        client.expect_cmd("NOOP", 250)
        client.send(b"BDAT nonsense\r\n")
        assert client.reply().code == 421
        assert client.closed()


def test_starttls_then_ehlo_again(server: Tayori) -> None:
    with start(server) as client:
        client.expect_cmd("STARTTLS", 220)
        client.starttls()
        assert client.cmd("MAIL FROM:<a@example.net>").code == 503  # EHLO is needed again
        ehlo = client.expect_cmd("EHLO client.test", 250)
        assert "STARTTLS" not in ehlo.text
        assert client.cmd("STARTTLS").status == "5.5.1"
        queue_id = queued_id(client.send_message("a@example.net", ["u@tayori.test"], MESSAGE))
    header = server.body(queue_id).split(b"\r\n\r\n")[0]
    assert b"with ESMTPS id" in header and b"(using TLSv1." in header


def test_starttls_command_injection_is_not_answered(server: Tayori) -> None:
    """RFC 3207 §4.2: bytes pipelined after STARTTLS are discarded, never obeyed."""
    with start(server) as client:
        client.send(b"STARTTLS\r\nRSET\r\n")
        assert client.reply().code == 220
        client.starttls()
        first = client.cmd("NOOP")
        assert (first.code, first.text) == (250, "2.0.0 OK")  # the NOOP's, not an RSET's
        assert client.cmd("QUIT").code == 221
        assert client.closed()


def test_starttls_with_arguments_or_inside_transaction(server: Tayori) -> None:
    with start(server) as client:
        assert client.cmd("STARTTLS now").code == 501
        client.expect_cmd("MAIL FROM:<a@example.net>", 250)
        assert client.cmd("STARTTLS").code == 503


def test_client_closing_mid_data_queues_nothing(server: Tayori) -> None:
    before = set(envelopes_by_id(server))
    client = start(server)
    client.expect_cmd("MAIL FROM:<a@example.net>", 250)
    client.expect_cmd("RCPT TO:<u@tayori.test>", 250)
    client.expect_cmd("DATA", 354)
    client.send(b"Subject: cut\r\n\r\nhalf a message")
    client.sock.shutdown(socket.SHUT_WR)
    assert client.closed()
    client.close()
    assert set(envelopes_by_id(server)) == before
    incoming = server.spool / "incoming"
    from harness import wait_for

    wait_for(lambda: not any(incoming.iterdir()), what="the draft to be removed")
