"""Outbound authentication end to end: what tayori signs, seals and reports verifies at
the far end.

One tayori (for the module) relays to SmtpPeers on loopback, the MX hosts a DNS stub
names, all on one free port: 127.0.0.2 (``dest.test``) offers everything, so it gets
BDAT; 127.0.0.3 (``plain.test``) offers neither 8BITMIME nor CHUNKING, so it gets DATA,
dot-stuffed, and 8-bit mail downgraded (RFC 6152) before it is signed. tayori trusts only
127.0.0.9/32: the trusted client connects from there; a client from 127.0.0.1 is
untrusted, and logs in on a submission listener to relay. The keys are made by
:mod:`tayori.auth.dkim_keys` (an RSA-2048 and an Ed25519 key for every signing domain:
dual signatures; an RSA key for ``tayori.test`` to seal with). dkimpy verifies with a
``dnsfunc`` over the records the stub serves; Perl's Mail::DKIM asks the stub itself.
The DMARC report test runs a tayori of its own over a report store filled beforehand.
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.message
import email.policy
import gzip
import re
import socket
import time
import xml.etree.ElementTree as ET
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import dkim as dkimpy
import pytest
from test_dkim_interop import mail_dkim_has_ed25519, mail_dkim_missing, mail_dkim_verify

from delivery_helpers import CORPUS, corpus_message, dot_stuff, is_8bit
from harness import TIMEOUT, Client, Tayori, free_port, queued_id, running, wait_for
from tayori.auth.dkim import DkimResult, verify
from tayori.auth.dkim_keys import keygen, write_private_key
from tayori.auth.dmarc import author_domains, evaluate, from_field_values
from tayori.auth.dmarc_reports import DkimAuth, Reporter, ReportStore, SpfAuth
from tayori.auth.headers import parse_message
from tayori.policy.userdb_file import add_user
from tayori.smtp.server import EXTENSIONS_ALL
from tayori.testing.dnsstub import DnsStub, StaticResolver
from tayori.testing.peer import ReceivedMessage, SmtpPeer

TRUSTED = "127.0.0.9"
FULL, PLAIN, SENDER_MX, REPORTS_MX = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"
PASSWORD = "correct horse battery staple"
DAY = 86400
T = TypeVar("T")
MESSAGE = (b"From: Alice <alice@sender.test>\r\nTo: Bob <bob@dest.test>\r\n"
           b"Subject: signed by tayori\r\nDate: Mon, 04 Mar 2024 10:00:00 +0000\r\n"
           b"Message-ID: <signed@sender.test>\r\n\r\nHello Bob.\r\n.a dotted line\r\n")
EIGHT_BIT = [  # the corpus is all 7-bit: these exercise the downgrade
    ("8bit-text", "From: Jörg <joerg@sender.test>\r\nTo: bob@dest.test\r\n"
     "Subject: Grüße aus Köln\r\nMIME-Version: 1.0\r\n"
     "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
     "Grüße, こんにちは, Ωμέγα\r\n.dotted\r\n".encode()),
    ("8bit-multipart", b"From: alice@sender.test\r\nSubject: parts\r\nMIME-Version: 1.0\r\n"
     b"Content-Type: multipart/mixed; boundary=XX\r\n\r\npreamble\r\n--XX\r\n"
     b"Content-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n"
     b"\r\ncaf\xe9 cr\xe8me\r\n--XX\r\nContent-Type: text/plain\r\n\r\nascii\r\n--XX--\r\n"),
]


# --- keys, DNS, peers, the tayori --------------------------------------------------------------

@dataclass
class Keys:
    """Key files and the TXT records publishing them, by name."""

    rsa: Path
    ed: Path
    arc: Path
    values: dict[str, str]      # "rsa" / "ed" / "arc" -> the TXT value
    domains: tuple[str, ...]    # the signing domains (each gets rsa and ed)

    @property
    def records(self) -> dict[str, str]:
        out = {f"{selector}._domainkey.{domain}": self.values[selector]
               for domain in self.domains for selector in ("rsa", "ed")}
        out["arc._domainkey.tayori.test"] = self.values["arc"]
        return out

    def dnsfunc(self, name: bytes, timeout: float = 5) -> bytes | None:
        """dkimpy's DNS hook."""
        value = self.records.get(name.decode("ascii").rstrip(".").lower())
        return value.encode("ascii") if value is not None else None

    def config(self) -> str:
        entries = [(domain, selector, getattr(self, selector)) for domain in self.domains
                   for selector in ("rsa", "ed")] + [("tayori.test", "arc", self.arc)]
        return "".join(f'[[dkim_key]]\ndomain = "{d}"\nselector = "{s}"\nkey_file = "{f}"\n'
                       for d, s, f in entries)


def corpus_domains() -> set[str]:
    return {domain for path in CORPUS
            for domain in author_domains(from_field_values(corpus_message(path))).domains}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    directory = tmp_path_factory.mktemp("keys")
    values = {}
    for name, algorithm in (("rsa", "rsa"), ("ed", "ed25519"), ("arc", "rsa")):
        pem, values[name] = keygen(algorithm)  # type: ignore[arg-type]
        write_private_key(directory / f"{name}.pem", pem)
    return Keys(directory / "rsa.pem", directory / "ed.pem", directory / "arc.pem", values,
                tuple(sorted({"sender.test", "partner.test", *corpus_domains()})))


def host_zone(domain: str, address: str) -> dict[str, Any]:
    return {domain: {"MX": [(10, f"mx.{domain}")]}, f"mx.{domain}": {"A": [address]}}


DMARC_ZONE: dict[str, Any] = {
    "_dmarc.sender.test": {"TXT": ["v=DMARC1; p=reject; rua=mailto:dmarc@sender.test"]},
    "_dmarc.partner.test": {"TXT": ["v=DMARC1; p=none; rua=mailto:agg@reports.test"]},
    "partner.test._report._dmarc.reports.test": {"TXT": ["v=DMARC1"]},
    "_dmarc.stranger.test": {"TXT": ["v=DMARC1; p=none; rua=mailto:agg@reports.test"]},
}


@pytest.fixture(scope="module")
def dns(keys: Keys) -> Iterator[DnsStub]:
    zone = {**host_zone("dest.test", FULL), **host_zone("plain.test", PLAIN),
            **host_zone("sender.test", SENDER_MX), **host_zone("reports.test", REPORTS_MX),
            **DMARC_ZONE, **{name: {"TXT": [value]} for name, value in keys.records.items()}}
    with DnsStub(zone) as stub:
        yield stub


def common_port(hosts: tuple[str, ...]) -> int:
    """A port free on every one of ``hosts`` (the MX action has one port for all)."""
    for _ in range(50):
        port = free_port(hosts[0])
        try:
            for host in hosts[1:]:
                with socket.socket() as probe:
                    probe.bind((host, port))
        except OSError:
            continue
        return port
    raise AssertionError("no common free port")


@dataclass
class Peers:
    port: int
    full: SmtpPeer
    plain: SmtpPeer
    sender: SmtpPeer
    reports: SmtpPeer


@pytest.fixture(scope="module")
def peers() -> Iterator[Peers]:
    port = common_port((FULL, PLAIN, SENDER_MX, REPORTS_MX))
    legacy = tuple(e for e in EXTENSIONS_ALL if e not in ("8BITMIME", "BINARYMIME", "CHUNKING"))
    with SmtpPeer(FULL, port) as full, SmtpPeer(PLAIN, port, extensions=legacy) as plain, \
            SmtpPeer(SENDER_MX, port) as sender, SmtpPeer(REPORTS_MX, port) as reports:
        yield Peers(port, full, plain, sender, reports)


def new_tayori(root: Path, dns: DnsStub, peers: Peers, extra: str, **options: Any) -> Tayori:
    host, port = dns.address
    return Tayori(root, deliver=True, dns={"nameservers": [f"{host}:{port}"], "timeout": "2s"},
                  queue={"retry": ["1s"]}, remote={"port": peers.port, "tls": "none"},
                  extra=extra, **options)


@dataclass
class Relay:
    tayori: Tayori
    submission_port: int


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory, keys: Keys, dns: DnsStub,
          peers: Peers) -> Iterator[Relay]:
    root = tmp_path_factory.mktemp("relay")
    (root / "aliases").write_text("fwd: carol@dest.test\n")
    add_user(str(root / "logins"), "alice@sender.test", PASSWORD)
    submission_port = free_port()
    extra = (f'[[listen]]\naddress = "127.0.0.1:{submission_port}"\nmode = "submission"\n'
             'auth_without_tls = true\n'
             '[[match]]\nfrom = "authenticated"\nto = "any"\naction = "remote"\n'
             f'[auth]\nusers = "{root / "logins"}"\n'
             '[arc]\nseal = true\nseal_domain = "tayori.test"\nseal_selector = "arc"\n'
             + keys.config())
    tayori = new_tayori(root / "tayori", dns, peers, extra, trusted=[f"{TRUSTED}/32"],
                         local={"aliases": "aliases"},
                         tables={"aliases": {"file": str(root / "aliases"),
                                             "format": "aliases"}})
    with running(tayori):
        yield Relay(tayori, submission_port)


# --- sending and looking -----------------------------------------------------------------------

def connect(port: int, source: str) -> Client:
    """A harness client whose connection comes from ``source``."""
    client = Client.__new__(Client)
    client.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT,
                                           source_address=(source, 0))
    client.file = client.sock.makefile("rb")
    return client


def send(client: Client, recipients: list[str], message: bytes, params: str = "",
         sender: str = "alice@sender.test") -> str:
    client.expect_cmd(f"MAIL FROM:<{sender}>{params}", 250)
    for recipient in recipients:
        client.expect_cmd(f"RCPT TO:<{recipient}>", 250)
    client.expect_cmd("DATA", 354)
    client.send(dot_stuff(message) + b".\r\n")
    return queued_id(client.expect(250))


def submit(relay: Relay, recipients: list[str], message: bytes = MESSAGE, *,
           source: str = TRUSTED, sender: str = "alice@sender.test") -> str:
    with connect(relay.tayori.port, source) as client:
        client.greeting_and_ehlo()
        return send(client, recipients, message, sender=sender)


def arrival(peer: SmtpPeer, recipient: str, timeout: float = TIMEOUT) -> ReceivedMessage:
    found: list[ReceivedMessage] = wait_for(
        lambda: [m for m in peer.messages if recipient in m.recipients], timeout,
        what=f"a message for {recipient} at {peer.address}")
    return found[0]


def fields(data: bytes, name: str) -> list[str]:
    return [f.value.decode() for f in parse_message(data).fields if f.key == name]


def tag(field: str, name: str) -> str:
    match = re.search(rf"(?:^|;)\s*{name}=([^;]*)", field)
    assert match, (name, field)
    return re.sub(r"\s+", "", match.group(1))


def signatures(data: bytes) -> list[tuple[str, str, str]]:
    """(d=, s=, a=) of each DKIM-Signature, in order."""
    return [(tag(f, "d"), tag(f, "s"), tag(f, "a")) for f in fields(data, "dkim-signature")]


def dkimpy_verifies(data: bytes, keys: Keys) -> list[bool]:
    count = len(fields(data, "dkim-signature"))
    return [dkimpy.DKIM(data).verify(idx=i, dnsfunc=keys.dnsfunc) for i in range(count)]


def dual(domain: str) -> list[tuple[str, str, str]]:
    return [(domain, "rsa", "rsa-sha256"), (domain, "ed", "ed25519-sha256")]


def size_param(got: ReceivedMessage) -> int:
    match = re.search(r"\bSIZE=(\d+)", got.mail_params)
    assert match, got.mail_params
    return int(match.group(1))


# --- DKIM ----------------------------------------------------------------------------------------

def test_trusted_network_mail_is_dual_signed_and_verifies(relay: Relay, peers: Peers,
                                                          keys: Keys) -> None:
    submit(relay, ["bob@dest.test"])
    got = arrival(peers.full, "bob@dest.test")
    assert signatures(got.data) == dual("sender.test")
    assert dkimpy_verifies(got.data, keys) == [True, True]
    assert got.bdat and size_param(got) == len(got.data)   # SIZE= counts the signatures
    header_list = tag(fields(got.data, "dkim-signature")[0], "h").lower().split(":")
    assert header_list.count("from") == 2 and header_list.count("subject") == 2  # oversigned
    assert got.data.endswith(MESSAGE)   # bytes in are bytes out, behind the new fields


@pytest.mark.peer
def test_mail_dkim_verifies_what_tayori_sent(relay: Relay, peers: Peers, dns: DnsStub,
                                             tmp_path: Path) -> None:
    missing = mail_dkim_missing()
    if missing:
        pytest.skip(missing)
    submit(relay, ["perl@dest.test"])
    got = arrival(peers.full, "perl@dest.test")
    rsa, ed = mail_dkim_verify(got.data, dns, tmp_path)
    assert rsa == ["sender.test", "rsa", "rsa-sha256", "pass"]
    if mail_dkim_has_ed25519():
        assert ed == ["sender.test", "ed", "ed25519-sha256", "pass"]


def test_logged_in_client_mail_is_signed(relay: Relay, peers: Peers, keys: Keys) -> None:
    login = base64.b64encode(f"\0alice@sender.test\0{PASSWORD}".encode()).decode()
    with Client("127.0.0.1", relay.submission_port) as client:
        client.greeting_and_ehlo()
        client.expect_cmd(f"AUTH PLAIN {login}", 235)
        queue_id = send(client, ["dan@plain.test"], MESSAGE)
    got = arrival(peers.plain, "dan@plain.test")
    assert not got.bdat and size_param(got) == len(got.data)   # DATA: dot-stuffed and back
    assert got.data.endswith(MESSAGE)
    assert signatures(got.data) == dual("sender.test")
    assert dkimpy_verifies(got.data, keys) == [True, True]
    assert f"dkim-signed queue_id={queue_id}" in relay.tayori.log()


def test_a_login_gets_no_signature_for_a_domain_it_does_not_own(relay: Relay) -> None:
    """alice@sender.test may not write From: partner.test (which tayori holds keys for):
    refused at the end of the data, so nothing is queued, nothing signed."""
    login = base64.b64encode(f"\0alice@sender.test\0{PASSWORD}".encode()).decode()
    message = MESSAGE.replace(b"alice@sender.test", b"ceo@partner.test")
    with Client("127.0.0.1", relay.submission_port) as client:
        client.greeting_and_ehlo()
        client.expect_cmd(f"AUTH PLAIN {login}", 235)
        client.expect_cmd("MAIL FROM:<alice@sender.test>", 250)
        client.expect_cmd("RCPT TO:<eve@dest.test>", 250)
        client.expect_cmd("DATA", 354)
        client.send(dot_stuff(message) + b".\r\n")
        refused = client.reply()
    assert (refused.code, refused.status) == (553, "5.7.1"), str(refused)


# --- ARC -----------------------------------------------------------------------------------------

def test_untrusted_mail_to_an_alias_is_sealed_not_signed(relay: Relay, peers: Peers,
                                                         keys: Keys) -> None:
    """The client at 127.0.0.1 is neither trusted nor logged in: it may only send to
    tayori's own domains; the alias takes the message to carol@dest.test. Its From
    domain has keys (and DMARC p=none, so the unsigned message is accepted)."""
    message = MESSAGE.replace(b"alice@sender.test", b"p@partner.test")
    submit(relay, ["fwd@tayori.test"], message, source="127.0.0.1", sender="p@partner.test")
    got = arrival(peers.full, "carol@dest.test")
    assert got.data.endswith(message)
    assert fields(got.data, "dkim-signature") == []
    [seal] = fields(got.data, "arc-seal")
    assert (tag(seal, "i"), tag(seal, "cv"), tag(seal, "d")) == ("1", "none", "tayori.test")
    cv, _results, reason = dkimpy.arc_verify(got.data, dnsfunc=keys.dnsfunc)
    assert cv == dkimpy.CV_Pass, reason
    [aar] = fields(got.data, "arc-authentication-results")   # what tayori found on receipt
    assert aar.strip().startswith("i=1; mx.tayori.test;")
    assert "spf=none smtp.mailfrom=partner.test" in aar and "dmarc=fail" in aar


def test_trusted_mail_to_an_alias_is_signed_then_sealed(relay: Relay, peers: Peers,
                                                        keys: Keys) -> None:
    message = MESSAGE.replace(b"<signed@", b"<both@").replace(b"Hello", b"Hi")
    submit(relay, ["fwd@tayori.test"], message)
    got = wait_for(lambda: [m for m in peers.full.messages if m.data.endswith(message)],
                   what="the forwarded message")[0]
    names = [f.key for f in parse_message(got.data).fields][:5]
    assert names == ["arc-seal", "arc-message-signature", "arc-authentication-results",
                     "dkim-signature", "dkim-signature"]
    assert dkimpy_verifies(got.data, keys) == [True, True]
    assert "dkim-signature" in tag(fields(got.data, "arc-message-signature")[0], "h").lower()
    cv, _results, reason = dkimpy.arc_verify(got.data, dnsfunc=keys.dnsfunc)
    assert cv == dkimpy.CV_Pass, reason


# --- the MIME corpus, relayed ------------------------------------------------------------------

@dataclass(frozen=True)
class Item:
    name: str
    message: bytes


ITEMS = [Item(path.name, corpus_message(path)) for path in CORPUS] + \
    [Item(name, message) for name, message in EIGHT_BIT]


@pytest.fixture(scope="module")
def corpus_run(relay: Relay, peers: Peers) -> dict[str, tuple[bytes, bytes]]:
    """Every item relayed to both peers (one session; recipients c<N>@ tell them apart):
    by name, what the full peer and what the legacy peer received."""
    with connect(relay.tayori.port, TRUSTED) as client:
        client.greeting_and_ehlo()
        for index, item in enumerate(ITEMS):
            params = " BODY=8BITMIME" if is_8bit(item.message) else ""
            send(client, [f"c{index}@dest.test", f"c{index}@plain.test"], item.message, params)
    return {item.name: (arrival(peers.full, f"c{index}@dest.test", 30).data,
                        arrival(peers.plain, f"c{index}@plain.test", 30).data)
            for index, item in enumerate(ITEMS)}


def asyncio_run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, 10))


def verified(data: bytes, keys: Keys) -> list[bool]:
    """dkimpy's verdicts, or tayori's own where dkimpy cannot read the message (msg_35: a
    header line without a colon, which tayori keeps as a malformed field nothing signs)."""
    try:
        return dkimpy_verifies(data, keys)
    except dkimpy.MessageFormatError:
        results = asyncio_run(verify(data, StaticResolver(
            {name: {"TXT": [value]} for name, value in keys.records.items()})))
        return [r.result is DkimResult.PASS for r in results]


@pytest.mark.parametrize("item", ITEMS, ids=[item.name for item in ITEMS])
def test_relayed_corpus_verifies_at_the_far_end(corpus_run: dict[str, tuple[bytes, bytes]],
                                                keys: Keys, item: Item) -> None:
    full, legacy = corpus_run[item.name]
    domains = author_domains(from_field_values(item.message)).domains
    if not domains:   # DKIM must sign From (RFC 6376 §5.4): tayori cannot, sends unsigned
        assert fields(full, "dkim-signature") == fields(legacy, "dkim-signature") == []
        pytest.skip("no From address with a domain: not signed (RFC 6376 §5.4), delivered")
    for data in (full, legacy):
        assert signatures(data) == dual(domains[0])
        assert verified(data, keys) == [True, True]
    assert full.endswith(item.message)
    assert legacy.endswith(item.message) != is_8bit(item.message)   # 8-bit: downgraded


# --- DMARC aggregate reports -------------------------------------------------------------------

def record_verdicts(path: Path, received: float) -> None:
    """Two messages from sender.test, one each from partner.test and stranger.test."""
    store = ReportStore(path, Reporter("mx.tayori.test", "Tayori Test", "x@tayori.test"))
    try:
        for author in ("alice@sender.test", "bob@sender.test", "p@partner.test",
                       "s@stranger.test"):
            domain = author.split("@")[1]
            verdict = asyncio_run(evaluate(
                [author], spf=("pass", domain), dkim=[("pass", domain)],
                resolver=StaticResolver(DMARC_ZONE), sample=lambda: 0.0))
            assert store.record(verdict, source_ip="192.0.2.7", received=received,
                                dkim=[DkimAuth("pass", domain, "rsa")],
                                spf=[SpfAuth("pass", domain)], envelope_to="tayori.test")
    finally:
        store.close()


def report_of(got: ReceivedMessage) -> tuple[str, ET.Element]:
    parsed = email.message_from_bytes(got.data, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    [attachment] = list(parsed.iter_attachments())
    assert attachment.get_content_type() == "application/gzip"
    payload = attachment.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return str(attachment.get_filename()), ET.fromstring(gzip.decompress(payload))


def test_dmarc_reports_go_to_authorized_rua_only(tmp_path: Path, dns: DnsStub,
                                                 peers: Peers) -> None:
    received = time.time() - 2 * DAY
    (tmp_path / "tayori" / "spool").mkdir(parents=True)
    record_verdicts(tmp_path / "tayori" / "spool" / "dmarc-reports.sqlite3", received)
    tayori = new_tayori(tmp_path / "tayori", dns, peers,
                         '[dmarc]\nreports = true\nreport_org = "Tayori Test"\n')
    with running(tayori):
        got = arrival(peers.sender, "dmarc@sender.test")
        partner = arrival(peers.reports, "agg@reports.test")
        wait_for(lambda: "dmarc-report-dropped domain=stranger.test" in tayori.log(),
                 what="the unauthorized report dropped")
    begin = int(received) // DAY * DAY
    name, feedback = report_of(got)
    assert name == f"mx.tayori.test!sender.test!{begin}!{begin + DAY - 1}.xml.gz"
    assert got.sender == "postmaster@mx.tayori.test"
    assert feedback.findtext("report_metadata/org_name") == "Tayori Test"
    assert feedback.findtext("policy_published/domain") == "sender.test"
    assert feedback.findtext("record/row/count") == "2"
    assert report_of(partner)[0].startswith("mx.tayori.test!partner.test!")
    assert [m for m in peers.reports.messages if b"stranger.test" in m.data] == []
