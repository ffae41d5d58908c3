"""Real clients deliver into tayori's queue: swaks (plain, pipelined, STARTTLS) and Python's
smtplib (send_message, STARTTLS, a large message over DATA, SMTPUTF8).

Each test checks the envelope in the index and the stored body: tayori's Received header
(with the protocol and, after STARTTLS, the TLS parameters) on top of exactly the bytes
the client sent.
"""

from __future__ import annotations

import re
import smtplib
import ssl
import subprocess
from collections.abc import Callable
from email.message import EmailMessage
from email.policy import SMTP, SMTPUTF8
from pathlib import Path

import pytest

from harness import Tayori, envelopes_by_id, strip_received, which_peer

SENDER = "sender@example.net"
MakeTayori = Callable[..., Tayori]


def received_header(body: bytes) -> bytes:
    return body[: len(body) - len(strip_received(body))]


# --- swaks --------------------------------------------------------------------------------


def swaks(server: Tayori, *args: str) -> str:
    program = which_peer("swaks")
    result = subprocess.run([program, "--server", f"127.0.0.1:{server.port}",
                             "--from", SENDER, "--helo", "swaks.test", *args],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def swaks_queue_id(output: str) -> str:
    ids = re.findall(r"<[-~] +250 2\.0\.0 Ok: queued as (\w+)", output)
    assert len(ids) == 1, output
    return str(ids[0])


SWAKS_MESSAGE = (b"From: <sender@example.net>\r\nTo: <u@tayori.test>\r\n"
                 b"Subject: swaks\r\nMessage-ID: <swaks@example.net>\r\n\r\n"
                 b".a line with a leading dot\r\n..two\r\nlast line")


@pytest.fixture
def swaks_data(tmp_path: Path) -> Path:
    path = tmp_path / "message.eml"
    path.write_bytes(SWAKS_MESSAGE)  # swaks adds the final CRLF before "."
    return path


@pytest.mark.peer
@pytest.mark.parametrize("mode", [
    pytest.param([], id="plain"),
    pytest.param(["--pipeline"], id="pipeline"),
    pytest.param(["--tls"], id="starttls"),
    pytest.param(["--tls", "--pipeline"], id="starttls-pipeline"),
])
def test_swaks(tayori: Tayori, swaks_data: Path, mode: list[str]) -> None:
    output = swaks(tayori, "--to", "u@tayori.test,v@tayori.test", "--data", f"@{swaks_data}",
                   *mode)
    if "--pipeline" in mode:  # MAIL, RCPT, RCPT, DATA sent before the first reply
        assert output.index("> DATA\n") < output.index(" 250 2.1.0 Sender OK"), output
    queue_id = swaks_queue_id(output)
    envelope = envelopes_by_id(tayori)[queue_id]
    assert envelope.sender == SENDER
    assert [r.address for r in envelope.recipients] == ["u@tayori.test", "v@tayori.test"]
    assert envelope.helo == "swaks.test"
    assert envelope.message_id == "<swaks@example.net>"
    body = tayori.body(queue_id)
    assert strip_received(body) == SWAKS_MESSAGE + b"\r\n"
    tls = "--tls" in mode
    assert envelope.protocol == ("ESMTPS" if tls else "ESMTP")
    header = received_header(body)
    assert (b" with ESMTPS id " in header) == tls
    assert (b"(using TLSv1." in header) == tls
    assert len(tayori.envelopes()) == 1


@pytest.mark.peer
def test_swaks_generated_message(tayori: Tayori) -> None:
    """swaks writes its own headers and body: they arrive as sent."""
    output = swaks(tayori, "--to", "u@tayori.test", "--header", "Subject: generated",
                   "--body", "hello from swaks")
    queue_id = swaks_queue_id(output)
    content = strip_received(tayori.body(queue_id))
    sent = [line[4:] for line in output.splitlines()
            if line.startswith(" -> ") and line != " -> DATA"]
    start = next(i for i, line in enumerate(sent) if line.startswith("Date: "))
    end = sent.index(".", start)
    assert content == "".join(line + "\r\n" for line in sent[start:end]).encode()
    assert b"Subject: generated\r\n" in content and b"hello from swaks" in content


# --- smtplib ------------------------------------------------------------------------------


def unverified_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def connect(server: Tayori) -> smtplib.SMTP:
    return smtplib.SMTP(server.host, server.port, local_hostname="smtplib.test", timeout=30)


def only_message(server: Tayori) -> tuple[str, bytes]:
    envelopes = server.envelopes()
    assert len(envelopes) == 1, envelopes
    return envelopes[0].queue_id, server.body(envelopes[0].queue_id)


def test_smtplib_send_message(tayori: Tayori) -> None:
    msg = EmailMessage()
    msg["From"] = "Sender <sender@example.net>"
    msg["To"] = "u@tayori.test, v@tayori.test"
    msg["Cc"] = "w@tayori.test"
    msg["Bcc"] = "hidden@tayori.test"
    msg["Subject"] = "smtplib send_message"
    msg["Message-ID"] = "<smtplib@example.net>"
    msg.set_content("Hello.\n.leading dot\nGrüße\n")  # non-ASCII: 8bit or QP, as email decides
    with connect(tayori) as client:
        refused = client.send_message(msg)
    assert refused == {}
    queue_id, body = only_message(tayori)
    envelope = envelopes_by_id(tayori)[queue_id]
    assert envelope.sender == "sender@example.net"
    assert sorted(r.address for r in envelope.recipients) == [
        "hidden@tayori.test", "u@tayori.test", "v@tayori.test", "w@tayori.test"]
    assert envelope.helo == "smtplib.test"
    del msg["Bcc"]  # send_message leaves Bcc out of what it transmits
    assert strip_received(body) == msg.as_bytes(policy=SMTP)


def test_smtplib_starttls_unverified(tayori: Tayori) -> None:
    data = (b"From: <sender@example.net>\r\nTo: <u@tayori.test>\r\nSubject: over TLS\r\n"
            b"\r\nsecret\r\n")
    with connect(tayori) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        code, _ = client.starttls(context=unverified_context())
        assert code == 220
        client.ehlo()
        assert not client.has_extn("starttls")  # not offered twice
        client.sendmail(SENDER, ["u@tayori.test"], data)
    queue_id, body = only_message(tayori)
    assert strip_received(body) == data
    assert re.search(rb" with ESMTPS id " + queue_id.encode() + rb"\r\n"
                     rb"\t\(using TLSv1\.[23] with cipher \S+ \(\d+ bits\)\)\r\n",
                     received_header(body)), body[:400]
    assert envelopes_by_id(tayori)[queue_id].protocol == "ESMTPS"


def test_smtplib_big_message_over_data(make_tayori: MakeTayori) -> None:
    """smtplib never uses BDAT: a 12 MB message goes over DATA, dot-stuffed, and is
    stored streamed to disk, byte for byte."""
    server = make_tayori(limits={"max_message_size": "20M"})
    lines = [(f"{n:07d} " + "x" * (n % 900)).encode() for n in range(40000)]
    lines[100::97] = [b"." + line for line in lines[100::97]]  # dot-stuffing on the wire
    data = b"Subject: big\r\nMessage-ID: <big@example.net>\r\n\r\n" + b"\r\n".join(lines) \
        + b"\r\n"
    assert len(data) > 12 * 1024 * 1024
    with connect(server) as client:
        client.ehlo()
        assert client.has_extn("chunking")  # offered, and smtplib ignores it
        client.sendmail(SENDER, ["u@tayori.test"], data)
    queue_id, body = only_message(server)
    assert strip_received(body) == data
    assert envelopes_by_id(server)[queue_id].size == len(body)


def test_smtplib_8bitmime(tayori: Tayori) -> None:
    data = "Subject: 8bit\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nÄpfel\r\n".encode()
    data += b"\xff\xfe not even UTF-8\r\n"
    with connect(tayori) as client:
        client.sendmail(SENDER, ["u@tayori.test"], data, mail_options=["BODY=8BITMIME"])
    queue_id, body = only_message(tayori)
    assert strip_received(body) == data
    assert envelopes_by_id(tayori)[queue_id].body_type == "8BITMIME"


def utf8_message() -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Ünïcödé <ünïcödé@example.net>"
    msg["To"] = "ユーザー@tayori.test"
    msg["Subject"] = "Grüße, こんにちは"
    msg["Message-ID"] = "<utf8@example.net>"
    msg.set_content("本文\n", cte="8bit")
    return msg


def check_utf8_message(tayori: Tayori, msg: EmailMessage) -> None:
    queue_id, body = only_message(tayori)
    envelope = envelopes_by_id(tayori)[queue_id]
    assert envelope.smtputf8
    assert envelope.sender == "ünïcödé@example.net"
    assert [r.address for r in envelope.recipients] == ["ユーザー@tayori.test"]
    assert strip_received(body) == msg.as_bytes(policy=SMTPUTF8)
    assert b" with UTF8SMTP id " in received_header(body)
    assert "Subject: Grüße, こんにちは\r\n".encode() in body


def test_smtplib_smtputf8(tayori: Tayori) -> None:
    """sendmail with mail_options=["SMTPUTF8", "BODY=8BITMIME"]."""
    msg = utf8_message()
    with connect(tayori) as client:
        client.sendmail("ünïcödé@example.net", ["ユーザー@tayori.test"],
                        msg.as_bytes(policy=SMTPUTF8), mail_options=["SMTPUTF8", "BODY=8BITMIME"])
    check_utf8_message(tayori, msg)


def test_smtplib_send_message_smtputf8(tayori: Tayori) -> None:
    """send_message(msg, mail_options=["SMTPUTF8"]) to a non-ASCII address. smtplib then
    adds SMTPUTF8 (and BODY=8BITMIME) itself as well: ``MAIL FROM:<ünïcödé@example.net>
    size=N SMTPUTF8 SMTPUTF8 BODY=8BITMIME``. Postfix 3.7 accepts the repeated keyword."""
    msg = utf8_message()
    with connect(tayori) as client:
        client.send_message(msg, mail_options=["SMTPUTF8"])
    check_utf8_message(tayori, msg)
