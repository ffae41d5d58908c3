"""Sender authentication in a running tayori: SPF at MAIL, DKIM, DMARC and ARC at the end
of the data, the Authentication-Results written, checked against dkimpy and pyspf.

A DNS server on loopback holds the records (SPF, DKIM keys, DMARC policies with rua=);
the client address comes through the PROXY protocol, so one tayori sees mail from
several places. 198.51.100.0/24 is the trusted network; every other client is screened.
"""

from __future__ import annotations

import base64
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dkim as dkimpy
import pytest
import spf as pyspf
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from harness import Client, Tayori, queued_id, strip_received
from tayori import cli
from tayori.auth import arc
from tayori.auth.arc import ArcVerdict, ChainStatus
from tayori.auth.dkim_keys import SigningKey
from tayori.auth.results import (
    AuthResults,
    field_name,
    field_value,
    header_fields,
    parse,
    spf_result,
)
from tayori.receive.trace import MAX_HEADER_SCAN
from tayori.testing.dnsstub import DnsStub

AUTHSERV_ID = "mx.tayori.test"   # the harness's hostname, and so the authserv-id
GOOD = "192.0.2.10"              # sender.test's SPF lists it
STRANGER = "192.0.2.66"          # listed nowhere
TRUSTED = "198.51.100.7"
HELO = "client.example"
RECIPIENT = "u@tayori.test"


def rsa_pem(bits: int = 2048) -> tuple[bytes, str]:
    """A private key (PKCS#1 PEM, as dkimpy wants it) and its DKIM key record."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode()}"


SENDER_KEY, SENDER_RECORD = rsa_pem()
OTHER_KEY, _ = rsa_pem(1024)
_, OTHER_RECORD = rsa_pem(1024)             # other.test publishes a key that is not its own
FORWARDER_KEY, FORWARDER_RECORD = rsa_pem(1024)
ZONE: dict[str, dict[str, list[Any]]] = {
    "sender.test": {"TXT": ["v=spf1 ip4:192.0.2.10 ~all"]},
    "_dmarc.sender.test": {"TXT": ["v=DMARC1; p=reject; rua=mailto:dmarc@sender.test"]},
    "sel._domainkey.sender.test": {"TXT": [SENDER_RECORD]},
    "sel._domainkey.other.test": {"TXT": [OTHER_RECORD]},
    "arc._domainkey.forwarder.test": {"TXT": [FORWARDER_RECORD]},
    "fail.test": {"TXT": ["v=spf1 -all"]},
    "quarantine.test": {"TXT": ["v=spf1 ~ip4:192.0.2.66 ?all"]},
    "_dmarc.quarantine.test": {"TXT": ["v=DMARC1; p=quarantine"]},
}


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsStub]:
    with DnsStub(ZONE) as stub:
        yield stub


def start(root: Path, dns: DnsStub, sections: str = "") -> Tayori:
    host, port = dns.address
    return Tayori(root, trusted=["198.51.100.0/24"], listen={"proxy_protocol": True},
                  dns={"nameservers": [f"{host}:{port}"]}, extra=sections).start()


@pytest.fixture(scope="module")
def tayori(dns: DnsStub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tayori]:
    server = start(tmp_path_factory.mktemp("inbound"), dns, "[dmarc]\nreports = true\n")
    yield server
    server.stop()


def message(author: str, subject: str, *, head: bytes = b"", body: bytes = b"Hello.\r\n"
            ) -> bytes:
    return head + (f"From: Someone <someone@{author}>\r\nTo: <{RECIPIENT}>\r\n"
                   f"Subject: {subject}\r\nMessage-ID: <{subject}@{author}>\r\n\r\n"
                   ).encode() + body


def session(tayori: Tayori, client_ip: str) -> Client:
    client = tayori.client()
    client.line(f"PROXY TCP4 {client_ip} 127.0.0.1 4711 25")
    client.greeting_and_ehlo(HELO)
    return client


def send(tayori: Tayori, client_ip: str, sender: str, data: bytes) -> bytes:
    """The message as tayori stored it."""
    with session(tayori, client_ip) as client:
        reply = client.send_message(sender, [RECIPIENT], data)
    assert reply.code == 250, str(reply)
    return tayori.body(queued_id(reply))


def top_fields(stored: bytes) -> list[bytes]:
    """The names of the fields above tayori's Received field, top first."""
    fields, _ = header_fields(stored)
    names = [field_name(f) for f in fields]
    return names[: names.index(b"received")]


def ours(stored: bytes) -> AuthResults:
    fields, _ = header_fields(stored)
    found = [parse(field_value(f)) for f in fields if field_name(f) == b"authentication-results"]
    mine = [results for results in found if results.authserv_id == AUTHSERV_ID]
    assert len(mine) == 1, found
    return mine[0]


def result_of(results: AuthResults, method: str) -> str:
    return results.find(method)[0].result


# --- the second verifiers ---------------------------------------------------------------


def dkimpy_dns(name: bytes, timeout: float = 5) -> bytes | None:
    records = ZONE.get(name.decode().rstrip("."), {}).get("TXT", [])
    return records[0].encode() if records else None


def pyspf_dns(name: str, qtype: str, *args: Any, **kwargs: Any) -> Iterator[Any]:
    for value in ZONE.get(name.lower().rstrip("."), {}).get(qtype, []):
        yield ((name, qtype), (value.encode(),) if qtype == "TXT" else value)


def dkim_signed(data: bytes, selector: bytes, domain: bytes, key: bytes) -> bytes:
    return dkimpy.sign(data, selector, domain, key,
                       include_headers=[b"from", b"to", b"subject", b"message-id"]) + data


@pytest.mark.parametrize(("client_ip", "spf_result"), [(GOOD, "pass"), (STRANGER, "softfail")])
def test_authentication_results_agree_with_pyspf_and_dkimpy(
        tayori: Tayori, monkeypatch: pytest.MonkeyPatch, client_ip: str,
        spf_result: str) -> None:
    monkeypatch.setattr(pyspf, "DNSLookup", pyspf_dns)
    data = dkim_signed(message("sender.test", f"agree-{spf_result}"), b"sel", b"other.test",
                       OTHER_KEY)
    data = dkim_signed(data, b"sel", b"sender.test", SENDER_KEY)
    stored = send(tayori, client_ip, "bounces@sender.test", data)
    results = ours(stored)
    oracle, _, _ = pyspf.query(i=client_ip, s="bounces@sender.test", h=HELO).check()
    assert result_of(results, "spf") == oracle == spf_result
    signatures = results.find("dkim")
    assert [(s.result, s.get("header.d")) for s in signatures] == [
        ("pass", "sender.test"), ("fail", "other.test")]
    for index, signature in enumerate(signatures):
        verified = dkimpy.DKIM(stored).verify(idx=index, dnsfunc=dkimpy_dns)
        assert verified == (signature.result == "pass"), signature
    assert result_of(results, "dmarc") == "pass"       # aligned DKIM, whatever SPF says
    assert result_of(results, "arc") == "none"
    assert top_fields(stored) == [b"authentication-results", b"received-spf"]
    assert stored.endswith(data)   # bytes in are bytes out, below the fields we add


@pytest.mark.parametrize(("tampered", "cv"), [(False, "pass"), (True, "fail")])
def test_an_arc_chain_is_judged_as_dkimpy_judges_it(tayori: Tayori, tampered: bool,
                                                    cv: str) -> None:
    original = message("forwarder.test", f"forwarded-{cv}")
    key = SigningKey("forwarder.test", "arc",
                     serialization.load_pem_private_key(FORWARDER_KEY, password=None))
    arc_set = arc.seal(original, key, authserv_id="forwarder.test",
                       results=[spf_result("pass", mailfrom="sender.test")],
                       chain=ArcVerdict(ChainStatus.NONE), now=time.time())
    data = arc_set + original + (b"a line added on the way\r\n" if tampered else b"")
    stored = send(tayori, STRANGER, "list@forwarder.test", data)
    oracle, _, reason = dkimpy.arc_verify(stored, dnsfunc=dkimpy_dns)
    found = ours(stored).find("arc")[0]
    assert (found.result, oracle.decode().lower()) == (cv, cv), reason
    assert found.get("smtp.remote-ip") == STRANGER


def test_spf_fail_is_refused_at_mail_with_the_explanation(tayori: Tayori) -> None:
    with session(tayori, STRANGER) as client:
        reply = client.cmd("MAIL FROM:<someone@fail.test>")
    assert (reply.code, reply.status) == (550, "5.7.23")
    assert "fail.test does not designate 192.0.2.66 as a permitted sender" in reply.text


def test_dmarc_reject_is_refused_at_the_end_of_data(tayori: Tayori) -> None:
    before = len(tayori.envelopes())
    with session(tayori, STRANGER) as client:
        client.expect_cmd("MAIL FROM:<someone@sender.test>", 250)   # softfail: tagged
        client.expect_cmd(f"RCPT TO:<{RECIPIENT}>", 250)
        client.expect_cmd("DATA", 354)
        client.send(message("sender.test", "spoofed") + b".\r\n")
        refused = client.reply()
        assert (refused.code, refused.status) == (550, "5.7.1")
        assert "DMARC" in refused.text
        client.expect_cmd("RSET", 250)   # the session goes on
    assert len(tayori.envelopes()) == before
    assert "action=refuse" in tayori.log()


def test_dmarc_quarantine_adds_the_header(tayori: Tayori) -> None:
    stored = send(tayori, STRANGER, "someone@quarantine.test",
                  message("quarantine.test", "quarantined"))
    assert top_fields(stored) == [b"x-tayori-quarantine", b"authentication-results",
                                  b"received-spf"]
    assert result_of(ours(stored), "dmarc") == "fail"
    assert result_of(ours(stored), "spf") == "softfail"


def test_forged_results_claiming_our_id_are_removed_others_kept(tayori: Tayori) -> None:
    forged = (b"Authentication-Results: MX.tayori.test.; dkim=pass header.d=sender.test\r\n"
              b"Authentication-Results: elsewhere.example; spf=pass\r\n"
              b"X-Before: 1\r\n"
              b"Authentication-Results: mx.tayori.test;\r\n\tdmarc=pass\r\n")
    stored = send(tayori, GOOD, "bounces@sender.test",
                  message("sender.test", "forged", head=forged))
    assert stored.count(b"Authentication-Results:") == 2
    assert b"Authentication-Results: elsewhere.example; spf=pass\r\nX-Before: 1\r\nFrom:" \
        in stored
    assert result_of(ours(stored), "dkim") == "none"
    assert "forged=2" in tayori.log()


def test_a_message_kept_on_disk_is_rewritten_there(tayori: Tayori) -> None:
    big = b"".join(b"line %06d of a message too big for the draft's memory\r\n" % n
                   for n in range(6000))
    data = dkim_signed(message("sender.test", "big", body=big), b"sel", b"sender.test",
                       SENDER_KEY)
    forged = b"Authentication-Results: mx.tayori.test; spf=pass\r\n"
    stored = send(tayori, GOOD, "bounces@sender.test", forged + data)
    assert len(data) > 300_000 and stored.endswith(data)
    assert forged not in stored
    results = ours(stored)
    assert [result_of(results, m) for m in ("spf", "dkim", "dmarc")] == ["pass"] * 3
    envelope = next(e for e in tayori.envelopes() if e.message_id == "<big@sender.test>")
    assert envelope.size == len(stored)


def test_dmarc_report_data_is_recorded(tayori: Tayori) -> None:
    send(tayori, GOOD, "bounces@sender.test", message("sender.test", "counted"))
    database = tayori.spool / "dmarc-reports.sqlite3"
    with sqlite3.connect(database) as db:
        rows = db.execute("SELECT domain, row, count FROM rows").fetchall()
    assert rows and {domain for domain, _, _ in rows} == {"sender.test"}
    assert any('"source_ip":"192.0.2.10"' in row for _, row, _ in rows)


FORGED = b"Authentication-Results: mx.tayori.test; dkim=pass header.d=sender.test\r\n"
ELSEWHERE = b"Authentication-Results: elsewhere.example; spf=pass\r\n"


def test_trusted_clients_are_not_checked_but_lose_forgeries(tayori: Tayori,
                                                             dns: DnsStub) -> None:
    """A trusted host's mail is not checked and gets no results of ours, but a field
    claiming our authserv-id is removed all the same (RFC 8601 §5): local users would
    read it as our verdict, and an ARC seal would carry it on."""
    asked = dns.count("fail.test", "TXT")
    clean = message("sender.test", "trusted", head=ELSEWHERE)
    stored = send(tayori, TRUSTED, "someone@fail.test", FORGED + clean)
    assert top_fields(stored) == []
    assert strip_received(stored) == clean
    assert dns.count("fail.test", "TXT") == asked
    assert "forged=1" in tayori.log()
    untouched = message("sender.test", "trusted-clean", head=ELSEWHERE)
    assert strip_received(send(tayori, TRUSTED, "someone@fail.test", untouched)) == untouched


def test_forgeries_go_from_a_header_longer_than_the_scanner_keeps(tayori: Tayori) -> None:
    """Beyond MAX_HEADER_SCAN the session reads the draft itself for the header."""
    padding = b"".join(b"X-Pad-%05d: %s\r\n" % (n, b"p" * 200) for n in range(1500))
    assert len(padding) > MAX_HEADER_SCAN
    clean = padding + message("sender.test", "long-header")
    stored = send(tayori, TRUSTED, "someone@sender.test", padding + FORGED + clean[len(padding):])
    assert strip_received(stored) == clean


def test_quarantine_can_hold_the_message(dns: DnsStub, tmp_path: Path) -> None:
    tayori = start(tmp_path, dns, '[dmarc]\non_quarantine = "hold"\n')
    try:
        stored = send(tayori, STRANGER, "someone@quarantine.test",
                      message("quarantine.test", "held"))
        [envelope] = tayori.envelopes()
    finally:
        tayori.stop()
    assert envelope.state == "held"
    assert {r.state for r in envelope.recipients} == {"held"}
    assert top_fields(stored) == [b"authentication-results", b"received-spf"]


# --- tayori check-auth ---------------------------------------------------------------------


def test_check_auth_prints_every_result_with_its_reason(
        tayori: Tayori, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = dkim_signed(message("sender.test", "offline"), b"sel", b"other.test", OTHER_KEY)
    path = tmp_path / "message.eml"
    path.write_bytes(b"From MAILER-DAEMON Thu Jan  1 00:00:00 2026\n"
                     + data.replace(b"\r\n", b"\n"))   # as an mbox or an editor keeps it
    status = cli.main(["check-auth", str(path), "--ip", STRANGER, "--helo", HELO,
                       "--mail-from", "<someone@sender.test>", "--now", "2026-01-01T00:00:00",
                       "-c", str(tayori.config_path)])
    printed = capsys.readouterr().out.splitlines()
    assert status == 0
    assert printed[0] == ("SPF     softfail for mailfrom someone@sender.test from 192.0.2.66: "
                          "matched ~all")
    assert printed[1].startswith("DKIM    fail d=other.test s=sel a=rsa-sha256, 1024-bit key: ")
    assert printed[2] == ("DMARC   fail for From sender.test (policy reject of sender.test, "
                          "disposition reject): no aligned SPF or DKIM pass")
    assert printed[3] == "ARC     none: no ARC header fields"
    assert printed[4:6] == ["At MAIL FROM: accept", "At the end of the data: refuse, 550 5.7.1 "
                            "Message rejected: unauthenticated mail from sender.test is refused "
                            "by its domain's DMARC policy"]


@pytest.mark.parametrize(("arguments", "problem"), [
    (["/nonexistent/message", "--ip", GOOD], "cannot read /nonexistent/message"),
    (["{message}", "--ip", "192.0.2"], "is not an IP address"),
    (["{message}", "--ip", GOOD, "--now", "yesterday"], "neither Unix seconds nor ISO 8601"),
])
def test_check_auth_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 arguments: list[str], problem: str) -> None:
    path = tmp_path / "message.eml"
    path.write_bytes(message("sender.test", "x"))
    arguments = [a.format(message=path) for a in arguments]
    assert cli.main(["check-auth", *arguments, "--helo", HELO]) == 1
    error = capsys.readouterr().err
    assert problem in error and len(error.splitlines()) == 1
