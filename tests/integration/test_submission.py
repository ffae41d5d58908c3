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

from harness import Client, Tayori, queued_id, wait_for, which_peer
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
