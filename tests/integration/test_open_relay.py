"""No open relay (DESIGN §2.6, §4; issue 5): every trick to make a running tayori relay
mail for a stranger is refused.

The stranger connects from 127.0.0.1 (or ::1), which these tests keep out of the trusted
networks (``trusted=UNTRUSTED``); ``mx.tayori.test``, the name in tayori's greeting, is one
of its local domains, as an operator usually has it. Refused means: no recipient is
accepted for delivery to a domain that is not ours; the answer is ``554 5.7.1`` (``501
5.1.3`` when the address is not even valid). A recipient that ends at a local domain
(``user%other.example@tayori.test``) is accepted, if at all, only for local delivery to
the mailbox its whole local part names: the queue index then shows the local action and a
mailbox under the local domain. Clients on other networks are played through a PROXY
protocol listener, whose header sets the address tayori judges; everything stays on
loopback.

Routed local parts (``user%host@``, ``host!user@``, ``"user@host"@``) at our own domains
are refused at RCPT (``554 5.7.1``, after the users table has had its say), and a
success notice carries the headers only, so a stranger cannot have tayori mail his text
to anyone.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from harness import (
    Client,
    Reply,
    Tayori,
    envelopes_by_id,
    free_port,
    queued_id,
    shared_data,
    wait_for,
)
from tayori.policy.relay import sender_routed
from tayori.policy.userdb_file import add_user
from tayori.route.local import mailbox_path

MakeTayori = Callable[..., Tayori]
UNTRUSTED = ["192.0.2.0/24", "2001:db8::/32"]   # neither 127.0.0.1 nor ::1
SRV = "mx.tayori.test"        # tayori's hostname: its greeting names it, and it is local
LOCAL = "tayori.test"
LOCAL_DOMAINS = [LOCAL, SRV, "localhost"]
FOREIGN = "victim.example"
IP = "127.0.0.1"
TO, FROM = "relaytest", "antispam"
MAILBOX = "mail/{domain}/{user}/"   # the harness's [actions.local] path
PASSWORD = "correct horse battery staple"
MESSAGE = (b"From: <antispam@victim.example>\r\nTo: <relaytest@victim.example>\r\n"
           b"Subject: relay test\r\n\r\nWill this leave for victim.example?\r\n")

RELAY_DENIED = (554, "5.7.1")
BAD_ADDRESS = (501, "5.1.3")
UNKNOWN_USER = (550, "5.1.1")
ROUTED = "routed"   # ends at a local domain, through a local part that names another one

# nmap's smtp-open-relay recipients (../shared/testdata/smtp/payloads.json), and what
# tayori answers a stranger who sends them.
NMAP_ANSWERS: dict[str, tuple[int, str] | str] = {
    "{to}@{dom}": RELAY_DENIED,
    "{to}%{dom}@[{ip}]": RELAY_DENIED,        # [127.0.0.1] is not one of its domains
    "{to}%{dom}@{srv}": ROUTED,
    '"{to}@{dom}"': BAD_ADDRESS,              # no domain at all
    '"{to}%{dom}"': BAD_ADDRESS,
    "{to}@{dom}@[{ip}]": BAD_ADDRESS,          # an @ outside quotes
    '"{to}@{dom}"@[{ip}]': RELAY_DENIED,
    "{to}@{dom}@{srv}": BAD_ADDRESS,
    "@[{ip}]:{to}@{dom}": RELAY_DENIED,        # a source route is dropped: to@dom is left
    "@{srv}:{to}@{dom}": RELAY_DENIED,
    "{dom}!{to}": BAD_ADDRESS,
    "{dom}!{to}@[{ip}]": RELAY_DENIED,
    "{dom}!{to}@{srv}": ROUTED,
}

# More ways to name a foreign destination, each with tayori's answer.
FOREIGN_TRICKS: list[tuple[str, tuple[int, str]]] = [
    (f"{TO}@{FOREIGN.upper()}", RELAY_DENIED),
    (f"{TO}@[{IP}]", RELAY_DENIED),                        # our address, not listed
    (f"{TO}@[IPv6:::1]", RELAY_DENIED),
    (f"{TO}@[IPv6:::ffff:{IP}]", RELAY_DENIED),
    (f"{TO}@[192.0.2.1]", RELAY_DENIED),
    (f"{TO}@[IPv4:{IP}]", RELAY_DENIED),                   # a general literal, not listed
    (f"@{LOCAL},@{SRV}:{TO}@{FOREIGN}", RELAY_DENIED),     # a longer source route
    (f"@{FOREIGN}:{TO}%{FOREIGN}@[{IP}]", RELAY_DENIED),
    (f"{TO}@{FOREIGN}.{LOCAL}", RELAY_DENIED),             # a subdomain of ours is not ours
    (f"{TO}@{LOCAL}.{FOREIGN}", RELAY_DENIED),
    (f"{TO}@x{LOCAL}", RELAY_DENIED),
    (f"postmaster@{FOREIGN}", RELAY_DENIED),
    (f"{TO}@{FOREIGN}.", BAD_ADDRESS),                     # trailing dot
    (f"{TO}@{FOREIGN}%{LOCAL}", BAD_ADDRESS),
    (f"{TO}@{FOREIGN}!{LOCAL}", BAD_ADDRESS),
    (f'{TO}@"{FOREIGN}"', BAD_ADDRESS),
    (f"{TO}@{FOREIGN}:25", BAD_ADDRESS),
    (f"{TO}@[{IP}]:25", BAD_ADDRESS),
    (f"{TO}\\@{FOREIGN}@{LOCAL}", BAD_ADDRESS),
    (f"<{TO}@{FOREIGN}>", (501, "5.5.4")),                  # nested brackets
]

# Local parts at a local domain that name a foreign destination.
ROUTED_LOCAL = [
    f"{TO}%{FOREIGN}@{LOCAL}",
    f"{TO}%{FOREIGN}%{SRV}@{SRV}",
    f"{FOREIGN}!{TO}@{LOCAL}",
    f"{LOCAL}!{FOREIGN}!{TO}@{LOCAL}",
    f'"{TO}@{FOREIGN}"@{LOCAL}',
    f'"{TO}%{FOREIGN}"@{SRV}',
    f'"{TO}\\@{FOREIGN}"@{LOCAL}',
    f"{TO}%{FOREIGN}@{LOCAL.upper()}",
    f"@{FOREIGN}:{TO}%{FOREIGN}@{LOCAL}",
]


def fill(template: str) -> str:
    return template.format(to=TO, dom=FOREIGN, srv=SRV, ip=IP, **{"from": FROM})


def nmap_tests() -> list[tuple[str, str]]:
    """The (sender, recipient) templates nmap's smtp-open-relay script tries."""
    data = json.loads(shared_data("smtp", "payloads.json").read_text())
    tests = data["open_relay_rcpt_patterns_nmap_smtp_open_relay"]["tests"]
    assert len(tests) == 16
    return [(sender, recipient) for sender, recipient in tests]


def stranger(root: Path, *, users: bool, **options: Any) -> Tayori:
    """A tayori for which 127.0.0.1 and ::1 are strangers. ``users``: its local action
    knows its mailboxes (a users table); else it takes every local part (the embedded
    default's behaviour)."""
    if users:
        options.update(local={"users": "users"}, tables={"users": [TO, FROM]})
    options.setdefault("trusted", UNTRUSTED)
    options.setdefault("local_domains", LOCAL_DOMAINS)
    return Tayori(root, **options)


@pytest.fixture(scope="module", params=["every-local-part", "users"])
def guarded(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tayori]:
    """The stranger's tayori, with and without a users table."""
    instance = stranger(tmp_path_factory.mktemp("relay"), users=request.param == "users")
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def open_house(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tayori]:
    """The stranger's tayori whose local action takes every local part."""
    instance = stranger(tmp_path_factory.mktemp("open-house"), users=False)
    instance.start()
    yield instance
    instance.stop()


def has_users(tayori: Tayori) -> bool:
    return "users" in tayori.local


def attempt(tayori: Tayori | Client, sender: str, recipient: str, *, ehlo: str = SRV,
            params: str = "") -> tuple[Reply, str | None]:
    """A stranger's try in a session of its own (EHLO naming tayori itself): the RCPT
    reply, and the queue id when the recipient was accepted and the message sent."""
    with tayori if isinstance(tayori, Client) else tayori.client() as client:
        client.greeting_and_ehlo(ehlo)
        client.expect_cmd(f"MAIL FROM:<{'' if sender == '<>' else sender}>{params}", 250)
        reply = client.cmd(f"RCPT TO:<{recipient}>")
        if reply.code != 250:
            return reply, None
        client.expect_cmd("DATA", 354)
        client.send(MESSAGE + b".\r\n")
        return reply, queued_id(client.reply())


def answer(reply: Reply) -> tuple[int, str]:
    return reply.code, reply.status


def assert_kept_local(tayori: Tayori, queue_id: str, domain: str) -> None:
    """The queued recipient goes to the local action, into a mailbox of ``domain``."""
    (record,) = envelopes_by_id(tayori)[queue_id].recipients
    assert record.action == "local", record
    path = PurePosixPath(mailbox_path(MAILBOX, record.address))
    assert path.parts[:2] == ("mail", domain.lower()), path


def assert_refused_or_kept_local(tayori: Tayori, recipient: str, reply: Reply,
                                 queue_id: str | None) -> None:
    domain = recipient.rsplit("@", 1)[1].lower()
    if has_users(tayori):   # no such mailbox (or, once the session refuses routing, 554)
        assert answer(reply) in (UNKNOWN_USER, RELAY_DENIED), (recipient, str(reply))
    elif queue_id is None:
        assert reply.code in (550, 553, 554), (recipient, str(reply))
    else:
        assert_kept_local(tayori, queue_id, domain)


# --- the routing predicate ------------------------------------------------------------------


@pytest.mark.parametrize("local", [
    f"{TO}%{FOREIGN}", f"{FOREIGN}!{TO}", f'"{TO}@{FOREIGN}"', f'"{TO}%{FOREIGN}"',
    f'"{TO}\\@{FOREIGN}"', f'"{FOREIGN}!{TO}"', f"a%b%{FOREIGN}"])
def test_sender_routed_names_every_routing_form(local: str) -> None:
    assert sender_routed(local)


@pytest.mark.parametrize("local", [TO, "first.last", "user+tag", '"john doe"', "o'brien",
                                   "Postmaster", "a=b", "用户"])
def test_sender_routed_leaves_plain_local_parts(local: str) -> None:
    assert not sender_routed(local)


# --- the relay battery ----------------------------------------------------------------------


def test_nmap_recipients_are_refused(guarded: Tayori) -> None:
    tests = nmap_tests()
    assert {recipient for _, recipient in tests} == set(NMAP_ANSWERS)
    for sender_template, recipient_template in tests:
        sender, recipient = fill(sender_template), fill(recipient_template)
        reply, queue_id = attempt(guarded, sender, recipient)
        expected = NMAP_ANSWERS[recipient_template]
        if expected == ROUTED:
            assert_refused_or_kept_local(guarded, recipient, reply, queue_id)
        else:
            assert answer(reply) == expected, (sender, recipient, str(reply))


def test_more_tricks_for_a_foreign_domain_are_refused(guarded: Tayori) -> None:
    answers = {recipient: answer(attempt(guarded, f"{FROM}@{LOCAL}", recipient)[0])
               for recipient, _ in FOREIGN_TRICKS}
    assert answers == dict(FOREIGN_TRICKS)
    for command in (f"RCPT TO:{TO}@{FOREIGN}", f"RCPT TO: <{TO}@{FOREIGN}>",
                    f"rcpt to:<{TO.upper()}@{FOREIGN}> NOTIFY=NEVER"):
        with guarded.client() as client:
            client.greeting_and_ehlo(SRV)
            client.expect_cmd(f"MAIL FROM:<{FROM}@{SRV}>", 250)
            assert answer(client.cmd(command)) == RELAY_DENIED, command


def test_routed_local_parts_are_refused_or_stay_local(guarded: Tayori) -> None:
    for recipient in ROUTED_LOCAL:
        reply, queue_id = attempt(guarded, f"{FROM}@{FOREIGN}", recipient)
        assert_refused_or_kept_local(guarded, recipient, reply, queue_id)


def test_routed_local_parts_are_refused_at_rcpt(open_house: Tayori) -> None:
    routed = [fill(r) for r, answer_ in NMAP_ANSWERS.items() if answer_ == ROUTED]
    answers = {r: attempt(open_house, f"{FROM}@{FOREIGN}", r)[0].code
               for r in routed + ROUTED_LOCAL}
    assert all(code >= 500 for code in answers.values()), answers


def test_an_accepted_recipient_opens_no_door(open_house: Tayori) -> None:
    with open_house.client() as client:
        client.greeting_and_ehlo(SRV)
        client.expect_cmd(f"MAIL FROM:<{FROM}@{FOREIGN}>", 250)
        client.expect_cmd(f"RCPT TO:<{TO}@{LOCAL}>", 250)
        assert answer(client.cmd(f"RCPT TO:<{TO}@{FOREIGN}>")) == RELAY_DENIED
        assert answer(client.cmd(f"RCPT TO:<@{LOCAL}:{TO}@{FOREIGN}>")) == RELAY_DENIED
        client.expect_cmd(f"RCPT TO:<@{FOREIGN}:{FROM}@{SRV}>", 250)   # route dropped
        client.expect_cmd("DATA", 354)
        client.send(MESSAGE + b".\r\n")
        queue_id = queued_id(client.reply())
    records = envelopes_by_id(open_house)[queue_id].recipients
    assert [(r.address, r.action) for r in records] == [
        (f"{TO}@{LOCAL}", "local"), (f"{FROM}@{SRV}", "local")]


def test_tls_helo_and_our_own_names_grant_nothing(open_house: Tayori) -> None:
    for ehlo in (SRV, "localhost", f"[{IP}]", FOREIGN):
        with open_house.client() as client:
            client.greeting_and_ehlo(ehlo)
            client.expect_cmd("STARTTLS", 220)
            client.starttls()
            client.expect_cmd(f"EHLO {ehlo}", 250)
            for sender in ("", f"postmaster@{SRV}", f"{TO}@[{IP}]", f"{FROM}@localhost"):
                client.expect_cmd("RSET", 250)
                client.expect_cmd(f"MAIL FROM:<{sender}>", 250)
                assert answer(client.cmd(f"RCPT TO:<{TO}@{FOREIGN}>")) == RELAY_DENIED


# --- delivery instructions as recipients ------------------------------------------------------


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A new directory with a path short enough for a local part (64 octets at most)."""
    path = Path(tempfile.mkdtemp(prefix="ty"))
    yield path
    shutil.rmtree(path)


def test_delivery_instructions_are_refused_at_rcpt(make_tayori: MakeTayori,
                                                   short_dir: Path) -> None:
    """``|command``, ``/file`` and ``\\mailbox`` mean something to local delivery only
    when an alias or a ``.forward`` writes them. From a client, quoted or not, to a
    local domain or relayed by a trusted one (127.0.0.1 is trusted here), they are bad
    recipient syntax; nothing is queued for them and nothing is run or written."""
    tayori = make_tayori(deliver=True)
    recipients = ["/tmp/x@tayori.test", "|/bin/sh@tayori.test", '"\\\\root"@tayori.test',
                  f"{short_dir}/file@tayori.test", f'"{short_dir}/quoted"@tayori.test',
                  f'"|touch {short_dir}/piped"@tayori.test', f'"\\{short_dir}/pair"@tayori.test',
                  f'" {short_dir}/blank"@tayori.test', "|cmd@far.test", "/x@far.test"]
    with tayori.client() as client:
        client.greeting_and_ehlo()
        client.expect_cmd("MAIL FROM:</x@localhost>", 250)   # an ordinary sender address
        for recipient in recipients:
            assert answer(client.cmd(f"RCPT TO:<{recipient}>")) == (550, "5.1.3"), recipient
        client.expect_cmd("RCPT TO:<u@tayori.test>", 250)
        client.expect_cmd("DATA", 354)
        client.send(MESSAGE + b".\r\n")
        queue_id = queued_id(client.expect(250))
    wait_for(lambda: f"delivered queue_id={queue_id}" in tayori.log(), what="the delivery")
    wait_for(lambda: not tayori.envelopes(), what="the queue to empty")
    assert list(short_dir.iterdir()) == []
    assert not any(p.name in ("x@tayori.test", "root") for p in tayori.root.rglob("*"))


# --- local domains: their spellings, address literals -----------------------------------------


def test_spellings_of_a_local_domain_stay_local(make_tayori: MakeTayori) -> None:
    idn, ace = "bücher.test", "xn--bcher-kva.test"
    tayori = make_tayori(trusted=UNTRUSTED, local_domains=[*LOCAL_DOMAINS, idn])
    local = [(f"{TO}@{LOCAL.upper()}", LOCAL, False), (f"{TO}@Mx.Tayori.Test", SRV, False),
             (f"{TO}@{ace}", ace, False), (f"{TO}@XN--BCHER-KVA.test", ace, False),
             (f"{TO}@{idn}", ace, True), (f"{TO}@BÜCHER.TEST", ace, True),
             (f"{TO}@tayori\u3002test", LOCAL, True)]       # IDEOGRAPHIC FULL STOP
    for recipient, domain, utf8 in local:
        reply, queue_id = attempt(tayori, f"{FROM}@{FOREIGN}", recipient,
                                  params=" SMTPUTF8" if utf8 else "")
        assert reply.code == 250 and queue_id, (recipient, str(reply))
        assert_kept_local(tayori, queue_id, domain)
    refused = {
        f"{TO}@{LOCAL}.": BAD_ADDRESS,                        # no trailing dot in SMTP
        f"{TO}@{SRV}..": BAD_ADDRESS,
        f"{TO}@{idn}": (553, "5.6.7"),                        # without SMTPUTF8
        f"{TO}@bücher.example": (553, "5.6.7"),
    }
    assert {r: answer(attempt(tayori, f"{FROM}@{FOREIGN}", r)[0]) for r in refused} == refused
    foreign = {f"{TO}@bücher.example": RELAY_DENIED, f"{TO}@victim\u3002example": RELAY_DENIED,
               f"{TO}@ｔａｙｏｒｉ.example": RELAY_DENIED}     # FULLWIDTH letters
    assert {r: answer(attempt(tayori, f"{FROM}@{FOREIGN}", r, params=" SMTPUTF8")[0])
            for r in foreign} == foreign


def test_address_literals_are_local_only_when_listed(make_tayori: MakeTayori) -> None:
    tayori = make_tayori(trusted=UNTRUSTED,
                         local_domains=[*LOCAL_DOMAINS, f"[{IP}]", "[IPv6:::1]"])
    for recipient, domain in ((f"{TO}@[{IP}]", f"[{IP}]"), (f"{TO}@[IPv6:::1]", "[IPv6:::1]"),
                              (f"{TO}@[IPv6:0:0:0:0:0:0:0:1]", "[IPv6:::1]"),
                              (f"{TO}@[ipv6:0::1]", "[IPv6:::1]")):
        reply, queue_id = attempt(tayori, f"{FROM}@{FOREIGN}", recipient)
        assert reply.code == 250 and queue_id, (recipient, str(reply))
        assert_kept_local(tayori, queue_id, domain)
    refused = {f"{TO}@[127.0.0.2]": RELAY_DENIED, f"{TO}@[IPv6:::2]": RELAY_DENIED,
               f"{TO}@[IPv6:::ffff:{IP}]": RELAY_DENIED, f"{TO}@[IPv4:{IP}]": RELAY_DENIED,
               f"{TO}@[127.0.0.01]": BAD_ADDRESS, f"{TO}@[127.1]": BAD_ADDRESS}
    assert {r: answer(attempt(tayori, f"{FROM}@{FOREIGN}", r)[0]) for r in refused} == refused
    reply, queue_id = attempt(tayori, f"{FROM}@{FOREIGN}", f"{TO}%{FOREIGN}@[{IP}]")
    if queue_id is not None:
        assert_kept_local(tayori, queue_id, f"[{IP}]")
    else:
        assert reply.code in (550, 553, 554), str(reply)


# --- who may relay: networks, logins, listeners -----------------------------------------------


def test_ipv6_client_relays_only_from_a_trusted_network(make_tayori: MakeTayori) -> None:
    for trusted, relays in ((UNTRUSTED, False), (["127.0.0.0/8"], False),
                            (["::1/128"], True), (["::/0"], True)):
        tayori = make_tayori(host="::1", trusted=trusted, local_domains=LOCAL_DOMAINS)
        reply, queue_id = attempt(tayori, f"{FROM}@{FOREIGN}", f"{TO}@{FOREIGN}")
        if relays:
            assert reply.code == 250 and queue_id, (trusted, str(reply))
            (record,) = envelopes_by_id(tayori)[queue_id].recipients
            assert record.action == "remote"
        else:
            assert answer(reply) == RELAY_DENIED, (trusted, str(reply))
            reply, queue_id = attempt(tayori, f"{FROM}@{FOREIGN}", f"{TO}@{LOCAL}")
            assert queue_id, str(reply)
            assert_kept_local(tayori, queue_id, LOCAL)
        tayori.stop()


def proxied(tayori: Tayori, client_address: str) -> Client:
    """A connection that tayori sees as coming from ``client_address`` (PROXY v1)."""
    family = "TCP6" if ":" in client_address else "TCP4"
    server = "::1" if family == "TCP6" else IP
    client = tayori.client()
    client.send(f"PROXY {family} {client_address} {server} 40000 25\r\n")
    return client


@pytest.mark.parametrize(("trusted", "clients"), [
    (UNTRUSTED, {"192.0.2.0": True, "192.0.2.77": True, "192.0.2.255": True,
                 "192.0.1.255": False, "192.0.3.0": False, IP: False, "10.0.0.1": False,
                 "2001:db8::": True, "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff": True,
                 "2001:db7:ffff:ffff:ffff:ffff:ffff:ffff": False, "2001:db9::": False,
                 "::1": False, "::ffff:192.0.2.9": True, "::ffff:198.51.100.7": False}),
    (["::/0"], {"2001:db8::1": True, "::1": True, "::ffff:198.51.100.7": False,
                "198.51.100.7": False}),
    (["198.51.100.7/32"], {"198.51.100.7": True, "198.51.100.8": False,
                           "::ffff:198.51.100.7": True}),
], ids=["ipv4-and-ipv6-ranges", "all-of-ipv6", "one-host"])
def test_trusted_networks_are_cidr_ranges(make_tayori: MakeTayori, trusted: list[str],
                                          clients: dict[str, bool]) -> None:
    tayori = make_tayori(listen={"proxy_protocol": True}, trusted=trusted,
                         local_domains=LOCAL_DOMAINS)
    relayed = {address: attempt(proxied(tayori, address), f"{FROM}@{LOCAL}",
                                f"{TO}@{FOREIGN}")[0].code for address in clients}
    assert relayed == {address: 250 if ok else 554 for address, ok in clients.items()}
    actions = {r.action for e in tayori.envelopes() for r in e.recipients}
    assert actions <= {"remote"}


def plain(login: str, password: str) -> str:
    return base64.b64encode(f"\0{login}\0{password}".encode()).decode()


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    add_user(str(path), f"alice@{LOCAL}", PASSWORD)
    return path


def test_authenticated_rule_relays_only_after_a_login(make_tayori: MakeTayori,
                                                      users_file: Path) -> None:
    rules = ('[[match]]\nfrom = "authenticated"\nto = "any"\naction = "remote"\n'
             f'[auth]\nusers = "{users_file}"\n')
    tayori = make_tayori(trusted=UNTRUSTED, local_domains=LOCAL_DOMAINS, extra=rules,
                         listen={"auth": True, "auth_without_tls": True})
    with tayori.client() as client:
        client.greeting_and_ehlo()
        client.expect_cmd(f"MAIL FROM:<alice@{LOCAL}>", 250)
        assert answer(client.cmd(f"RCPT TO:<{TO}@{FOREIGN}>")) == RELAY_DENIED
        client.expect_cmd("RSET", 250)
        assert client.cmd(f"AUTH PLAIN {plain(f'alice@{LOCAL}', 'wrong')}").code == 535
        client.expect_cmd(f"MAIL FROM:<alice@{LOCAL}>", 250)
        assert answer(client.cmd(f"RCPT TO:<{TO}@{FOREIGN}>")) == RELAY_DENIED
        client.expect_cmd("RSET", 250)
        client.expect_cmd(f"AUTH PLAIN {plain(f'alice@{LOCAL}', PASSWORD)}", 235)
        client.expect_cmd(f"MAIL FROM:<alice@{LOCAL}>", 250)
        client.expect_cmd(f"RCPT TO:<{TO}@{FOREIGN}>", 250)
        client.expect_cmd("DATA", 354)   # her own From (auth.sender_policy = "owned")
        client.send(MESSAGE.replace(b"antispam@victim.example", f"alice@{LOCAL}".encode())
                    + b".\r\n")
        queue_id = queued_id(client.reply())
    (record,) = envelopes_by_id(tayori)[queue_id].recipients
    assert (record.address, record.action) == (f"{TO}@{FOREIGN}", "remote")


def test_each_listener_has_its_own_rules(make_tayori: MakeTayori, users_file: Path) -> None:
    """The same trusted client relays on the smtp listener, and must log in on the
    submission one before MAIL, however trusted its network."""
    port = free_port()
    extra = (f'[[listen]]\naddress = "{IP}:{port}"\nmode = "submission"\n'
             '[[match]]\nfrom = "authenticated"\nto = "any"\naction = "remote"\n'
             f'[auth]\nusers = "{users_file}"\n')
    tayori = make_tayori(trusted=["127.0.0.0/8"], local_domains=LOCAL_DOMAINS, extra=extra)
    reply, queue_id = attempt(tayori, f"{FROM}@{LOCAL}", f"{TO}@{FOREIGN}")
    assert reply.code == 250 and queue_id, str(reply)
    with Client(IP, port) as client:
        ehlo = client.greeting_and_ehlo()
        assert "AUTH" not in ehlo.text                           # not before TLS
        assert answer(client.cmd(f"MAIL FROM:<alice@{LOCAL}>")) == (530, "5.7.0")
        client.expect_cmd("STARTTLS", 220)
        client.starttls()
        client.expect_cmd("EHLO client.test", 250)
        assert answer(client.cmd(f"MAIL FROM:<alice@{LOCAL}>")) == (530, "5.7.0")
        assert client.cmd(f"RCPT TO:<{TO}@{FOREIGN}>").code == 503
        client.expect_cmd(f"AUTH PLAIN {plain(f'alice@{LOCAL}', PASSWORD)}", 235)
        client.expect_cmd(f"MAIL FROM:<alice@{LOCAL}>", 250)
        client.expect_cmd(f"RCPT TO:<{TO}@{FOREIGN}>", 250)


# --- sender routing through a domain we relay for ---------------------------------------------


def gateway(make_tayori: MakeTayori) -> Tayori:
    """A tayori that takes mail for internal.test from anyone and passes it to an inner
    host (the queue is suspended: nothing is sent)."""
    extra = (f'[actions.gateway]\ndeliver = "relay"\nhost = "[{IP}]:{free_port()}"\n'
             '[[match]]\nto = "internal.test"\naction = "gateway"\n')
    return make_tayori(trusted=UNTRUSTED, local_domains=LOCAL_DOMAINS, extra=extra)


def test_a_relay_domain_takes_its_own_recipients(make_tayori: MakeTayori) -> None:
    tayori = gateway(make_tayori)
    reply, queue_id = attempt(tayori, f"{FROM}@{FOREIGN}", f"{TO}@internal.test")
    assert reply.code == 250 and queue_id, str(reply)
    (record,) = envelopes_by_id(tayori)[queue_id].recipients
    assert record.action == "gateway"
    assert answer(attempt(tayori, f"{FROM}@{FOREIGN}", f"{TO}@{FOREIGN}")[0]) == RELAY_DENIED


def test_sender_routing_through_a_relay_domain_is_refused(make_tayori: MakeTayori) -> None:
    tayori = gateway(make_tayori)
    for recipient in (f"{TO}%{FOREIGN}@internal.test", f"{FOREIGN}!{TO}@internal.test",
                      f'"{TO}@{FOREIGN}"@internal.test'):
        reply, _ = attempt(tayori, f"{FROM}@{FOREIGN}", recipient)
        assert reply.code >= 500, (recipient, str(reply))


# --- delivery status notices ------------------------------------------------------------------


def test_a_success_notice_carries_no_strangers_message(make_tayori: MakeTayori) -> None:
    tayori = make_tayori(trusted=UNTRUSTED, local_domains=LOCAL_DOMAINS, deliver=True,
                         remote={"deliver": "relay", "host": f"[{IP}]:{free_port()}"})

    def notices() -> list[str]:
        return [e.queue_id for e in tayori.envelopes()
                if e.sender == "" and any(FOREIGN in r.address for r in e.recipients)]

    with tayori.client() as client:
        client.greeting_and_ehlo(SRV)
        client.expect_cmd(f"MAIL FROM:<{FROM}@{FOREIGN}> RET=FULL", 250)
        client.expect_cmd(f"RCPT TO:<{TO}@{LOCAL}> NOTIFY=SUCCESS", 250)
        client.expect_cmd("DATA", 354)
        client.send(MESSAGE + b".\r\n")
        queued_id(client.reply())
    (notice,) = wait_for(notices, what="the success notice")
    body = tayori.body(notice)
    assert b"Will this leave for victim.example?" not in body
    assert b"text/rfc822-headers" in body


# --- nmap -----------------------------------------------------------------------------------


def nmap_program() -> str:
    program = shutil.which("nmap")
    script = Path("/usr/share/nmap/scripts/smtp-open-relay.nse")
    if program is None or not script.exists():
        pytest.skip("nmap with its smtp-open-relay script is not installed "
                    "(Debian: apt-get install nmap)")
    return program


@pytest.mark.peer
def test_nmap_finds_no_open_relay(tmp_path: Path) -> None:
    program = nmap_program()
    tayori = stranger(tmp_path / "nmap", users=True).start()
    try:
        result = subprocess.run(
            [program, "-n", "-Pn", "-sT", "-sV", "-p", str(tayori.port), "--host-timeout",
             "90s", "--script", "smtp-open-relay", "--script-args",
             f"smtp-open-relay.domain={FOREIGN},smtp-open-relay.ip={IP}", "-vv", IP],
            capture_output=True, text=True, timeout=150, check=False)
    finally:
        tayori.stop()
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(rf"^{tayori.port}/tcp\s+open\s+smtp\b", output, re.MULTILINE), output
    assert "smtp-open-relay: Server doesn't seem to be an open relay, all tests failed" \
        in output, output
    assert "is an open relay" not in output
    assert f"name={FOREIGN}" in tayori.log()     # the script's EHLO reached tayori
