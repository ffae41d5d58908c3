"""Submission: mail programs (swaks, msmtp) log in and send through tayori on the
submission (STARTTLS, then AUTH) and smtps (TLS from the start) listeners.

The client connects from 127.0.0.1, which these tests keep out of the trusted networks:
only a login lets it relay.
"""

from __future__ import annotations

import base64
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from harness import Client, Tayori, queued_id, strip_received, wait_for, which_peer
from tayori.policy.userdb_file import add_user

MakeTayori = Callable[..., Tayori]
PASSWORD = "correct horse battery staple"
MESSAGE = (b"From: Alice <alice@example.org>\r\nTo: bob@far.test\r\nSubject: submitted\r\n"
           b"Message-ID: <sub1@example.org>\r\n\r\nHello from a mail program.\r\n")


@pytest.fixture
def users(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    add_user(str(path), "alice@example.org", PASSWORD, ["@example.net"])
    add_user(str(path), "carol", "another password")
    return path


def submission(make_tayori: MakeTayori, users: Path, *, mode: str = "submission",
               settings: str = "", **listen: object) -> Tayori:
    rules = ('[[match]]\nfrom = "authenticated"\nto = "any"\naction = "remote"\n'
             f'[auth]\nusers = "{users}"\nmax_failures = 3\n{settings}')
    return make_tayori(listen={"mode": mode, **listen}, trusted=["192.0.2.0/24"], extra=rules)


def plain(login: str, password: str) -> str:
    return base64.b64encode(f"\0{login}\0{password}".encode()).decode()


def logged_in_client(tayori: Tayori) -> Client:
    client = tayori.client()
    client.greeting_and_ehlo()
    client.expect_cmd("STARTTLS", 220)
    client.starttls()
    client.expect_cmd("EHLO client.test", 250)
    return client


def swaks(tayori: Tayori, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([which_peer("swaks"), "--server", f"127.0.0.1:{tayori.port}",
                           "--helo", "laptop.test", "--to", "bob@far.test", *args],
                          capture_output=True, text=True, timeout=60, check=False)


def test_swaks_submits_with_starttls_and_auth(make_tayori: MakeTayori, users: Path) -> None:
    tayori = submission(make_tayori, users)
    for mechanism in ("PLAIN", "LOGIN"):
        result = swaks(tayori, "--from", "alice@example.org", "-tls", "--auth", mechanism,
                       "--auth-user", "alice@example.org", "--auth-password", PASSWORD)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "235 2.7.0" in result.stdout
    envelopes = tayori.envelopes()
    assert [e.recipients[0].action for e in envelopes] == ["remote", "remote"]
    assert b" with ESMTPSA id " in tayori.body(envelopes[0].queue_id)
    assert PASSWORD not in tayori.log()


def test_swaks_submits_over_smtps(make_tayori: MakeTayori, users: Path) -> None:
    tayori = submission(make_tayori, users, mode="smtps")
    result = swaks(tayori, "--from", "me@example.net", "--tlsc", "--auth", "PLAIN",
                   "--auth-user", "alice@example.org", "--auth-password", PASSWORD)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(tayori.envelopes()) == 1


def test_msmtp_submits_like_a_mail_program(make_tayori: MakeTayori, users: Path,
                                          tmp_path: Path) -> None:
    program = which_peer("msmtp")
    tayori = submission(make_tayori, users)
    conf = tmp_path / "msmtprc"
    conf.write_text(f"account tayori\nhost 127.0.0.1\nport {tayori.port}\n"
                    "tls on\ntls_starttls on\ntls_certcheck off\nauth on\n"
                    f"user alice@example.org\npassword {PASSWORD}\nfrom alice@example.org\n"
                    "domain laptop.test\naccount default : tayori\n")
    conf.chmod(0o600)
    result = subprocess.run([program, "-C", str(conf), "bob@far.test"], input=MESSAGE,
                            capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    (envelope,) = tayori.envelopes()
    assert envelope.sender == "alice@example.org"
    assert [r.address for r in envelope.recipients] == ["bob@far.test"]


def test_no_auth_without_tls_and_no_mail_without_auth(make_tayori: MakeTayori,
                                                       users: Path) -> None:
    tayori = submission(make_tayori, users)
    with tayori.client() as client:
        ehlo = client.greeting_and_ehlo()
        assert "AUTH" not in ehlo.text
        assert client.cmd(f"AUTH PLAIN {plain('carol', 'another password')}").code == 538
        assert client.cmd("MAIL FROM:<carol@example.org>").code == 530
    with logged_in_client(tayori) as client:
        assert client.cmd("MAIL FROM:<carol@example.org>").code == 530


def test_failed_logins_look_alike_and_the_sender_must_be_owned(make_tayori: MakeTayori,
                                                                users: Path) -> None:
    tayori = submission(make_tayori, users)
    with logged_in_client(tayori) as client:
        wrong = client.cmd(f"AUTH PLAIN {plain('alice@example.org', 'wrong')}")
        unknown = client.cmd(f"AUTH PLAIN {plain('nobody@example.org', 'wrong')}")
        assert (wrong.code, wrong.status, wrong.text) == (535, "5.7.8", unknown.text)
        assert unknown.code == 535
        client.expect_cmd(f"AUTH PLAIN {plain('alice@example.org', PASSWORD)}", 235)
        refused = client.cmd("MAIL FROM:<mallory@example.org>")
        assert (refused.code, refused.status) == (553, "5.7.1")
        client.expect_cmd("MAIL FROM:<alice+list@example.org>", 250)   # a +tag is hers
        client.expect_cmd("RSET", 250)
        client.expect_cmd("MAIL FROM:<anyone@example.net>", 250)        # @example.net too
        client.expect_cmd("RCPT TO:<bob@far.test>", 250)
    log = tayori.log()
    assert "auth-failure session=" in log and "login=nobody@example.org" in log
    assert "wrong" not in log.replace("wrong password", "")


def test_password_guessing_gets_the_client_banned(make_tayori: MakeTayori,
                                                  users: Path) -> None:
    tayori = submission(make_tayori, users, settings='ban_time = "1h"\n')
    with logged_in_client(tayori) as client:
        for _ in range(2):
            assert client.cmd(f"AUTH PLAIN {plain('carol', 'guess')}").code == 535
        banned = client.cmd(f"AUTH PLAIN {plain('carol', 'guess')}")
        assert (banned.code, banned.status) == (421, "4.7.0")

    def refused_at_connect() -> bool:
        with tayori.client() as again:
            return again.reply().code == 421

    wait_for(refused_at_connect, what="a 421 greeting for the banned client")
    assert re.search(r"auth-ban session=\S+ client=\[127\.0\.0\.1\] failures=3", tayori.log())


def test_only_a_login_relays_from_an_untrusted_network(make_tayori: MakeTayori,
                                                       users: Path) -> None:
    tayori = submission(make_tayori, users, mode="smtp", auth_without_tls=True, auth=True)
    with tayori.client() as client:
        client.greeting_and_ehlo()
        client.expect_cmd("MAIL FROM:<alice@example.org>", 250)
        assert client.cmd("RCPT TO:<bob@far.test>").code == 554   # no relay for strangers
        client.expect_cmd("RCPT TO:<u@tayori.test>", 250)         # local mail is fine
        client.expect_cmd("RSET", 250)
        client.expect_cmd(f"AUTH PLAIN {plain('alice@example.org', PASSWORD)}", 235)
        client.expect_cmd("MAIL FROM:<alice@example.org>", 250)
        client.expect_cmd("RCPT TO:<bob@far.test>", 250)
        client.expect_cmd("DATA", 354)
        client.send(MESSAGE + b".\r\n")
        assert queued_id(client.reply())


def test_the_from_address_must_be_owned_too(make_tayori: MakeTayori, users: Path) -> None:
    """With ``sender_policy = "owned"`` (the default) a login's message must be from its
    own addresses, not only its MAIL FROM: tayori would sign it with the From domain's
    key, and DMARC passes by SPF alignment even without one."""
    tayori = submission(make_tayori, users)

    def data_reply(client: Client, author: bytes) -> tuple[int, str]:
        client.expect_cmd("MAIL FROM:<alice@example.org>", 250)
        client.expect_cmd("RCPT TO:<bob@far.test>", 250)
        client.expect_cmd("DATA", 354)
        client.send(MESSAGE.replace(b"Alice <alice@example.org>", author) + b".\r\n")
        reply = client.reply()
        return reply.code, reply.status

    with logged_in_client(tayori) as client:
        client.expect_cmd(f"AUTH PLAIN {plain('alice@example.org', PASSWORD)}", 235)
        for author in (b"Mallory <mallory@example.org>", b"alice@example.org, ceo@example.org",
                       b"alice@example.org <ceo@example.org>", b"<ALICE@example.org.evil>"):
            assert data_reply(client, author) == (553, "5.7.1"), author
        for author in (b"Alice <Alice+lists@Example.ORG>", b"Anyone <anyone@example.net>",
                       b"undisclosed-recipients:;"):
            assert data_reply(client, author) == (250, "2.0.0"), author
    assert len(tayori.envelopes()) == 3
    assert "From address not owned by the authenticated user" in tayori.log()


def test_a_login_cannot_bring_our_authentication_results(make_tayori: MakeTayori,
                                                         users: Path) -> None:
    tayori = submission(make_tayori, users)
    forged = b"Authentication-Results: mx.tayori.test; dkim=pass header.d=example.org\r\n"
    with logged_in_client(tayori) as client:
        client.expect_cmd(f"AUTH PLAIN {plain('alice@example.org', PASSWORD)}", 235)
        queue_id = queued_id(client.send_message("alice@example.org", ["bob@far.test"],
                                                 forged + MESSAGE))
    assert strip_received(tayori.body(queue_id)) == MESSAGE


def test_acting_as_another_user_is_refused_and_not_counted(make_tayori: MakeTayori,
                                                           users: Path) -> None:
    """PLAIN's authorization identity (RFC 4616 §2): tayori has no proxy authorization.
    Refused before the password is looked at, so no guess: three refusals do not ban
    (max_failures = 3)."""
    tayori = submission(make_tayori, users)
    as_carol = base64.b64encode(f"carol\0alice@example.org\0{PASSWORD}".encode()).decode()
    as_herself = base64.b64encode(
        f"Alice@example.org\0alice@example.org\0{PASSWORD}".encode()).decode()
    with logged_in_client(tayori) as client:
        for _ in range(3):
            refused = client.cmd(f"AUTH PLAIN {as_carol}")
            assert (refused.code, refused.status) == (535, "5.7.8")
        assert client.cmd("MAIL FROM:<carol@example.org>").code == 530
        client.expect_cmd(f"AUTH PLAIN {as_herself}", 235)
    assert "auth-failure" not in tayori.log() and "auth-ban" not in tayori.log()


def test_starttls_ends_the_login_and_screens_again(make_tayori: MakeTayori,
                                                   users: Path) -> None:
    """A login before STARTTLS is forgotten (RFC 3207 §4.2): the client is a stranger
    again, screened (here: a HELO name must be fully qualified) and relaying nowhere."""
    tayori = make_tayori(listen={"mode": "smtp", "auth": True, "auth_without_tls": True},
                         trusted=["192.0.2.0/24"], smtp={"helo_syntax": True},
                         extra='[[match]]\nfrom = "authenticated"\nto = "any"\n'
                               f'action = "remote"\n[auth]\nusers = "{users}"\n')
    with tayori.client() as client:
        client.greeting_and_ehlo("laptop.test")
        client.expect_cmd(f"AUTH PLAIN {plain('alice@example.org', PASSWORD)}", 235)
        client.expect_cmd("EHLO laptop", 250)      # a logged-in client is not screened
        client.expect_cmd("STARTTLS", 220)
        client.starttls()
        assert client.cmd("EHLO laptop").code == 501
        client.expect_cmd("EHLO laptop.test", 250)
        client.expect_cmd("MAIL FROM:<alice@example.org>", 250)
        assert client.cmd("RCPT TO:<bob@far.test>").code == 554
