"""Local delivery through a running tayori: the ``maildir`` action of the test config
(``mail/{domain}/{user}/`` under the instance's directory) gets the mail for its domains.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from test_sendmail import run_sendmail

from harness import Tayori, free_port, queued_id, wait_for
from tayori.testing.peer import SmtpPeer

MESSAGE = (b"From: Alice <alice@example.net>\r\nTo: u@tayori.test\r\nSubject: local\r\n"
           b"Message-ID: <local1@example.net>\r\n\r\nHello.\r\n.dot line\r\n")


def send(tayori: Tayori, sender: str, recipients: list[str], message: bytes = MESSAGE) -> str:
    with tayori.client() as client:
        client.greeting_and_ehlo()
        reply = client.send_message(sender, recipients, message.replace(b"\r\n.", b"\r\n.."))
        assert reply.code == 250, str(reply)
        return queued_id(reply)


def new_files(mailbox: Path) -> list[Path]:
    new = mailbox / "new"
    return sorted(new.iterdir()) if new.is_dir() else []


def test_delivered_into_the_maildir_with_return_path_and_delivered_to(
        make_tayori: Callable[..., Tayori]) -> None:
    tayori = make_tayori(deliver=True)
    queue_id = send(tayori, "alice@example.net", ["u@tayori.test", "U+news@tayori.test"])
    mailbox = tayori.root / "mail" / "tayori.test" / "u"
    wait_for(lambda: len(new_files(mailbox)) == 2, what="two files in new/")
    wait_for(lambda: not tayori.envelopes(), what="the queue to empty")
    contents = [path.read_bytes().replace(b"\r\n", b"\n") for path in new_files(mailbox)]
    delivered_to = sorted(c.split(b"\n")[1] for c in contents)
    assert delivered_to == [b"Delivered-To: U+news@tayori.test", b"Delivered-To: u@tayori.test"]
    for content in contents:
        assert content.startswith(b"Return-Path: <alice@example.net>\n")
        assert content.endswith(MESSAGE.replace(b"\r\n", b"\n"))
        assert b"\nReceived: from " in content
    assert list((mailbox / "tmp").iterdir()) == []
    assert f"delivered queue_id={queue_id}" in tayori.log()


def test_a_local_part_that_would_leave_the_mail_directory_bounces(
        make_tayori: Callable[..., Tayori]) -> None:
    tayori = make_tayori(deliver=True)
    queue_id = send(tayori, "", ['"../../escape"@tayori.test'])
    wait_for(lambda: f"bounced queue_id={queue_id}" in tayori.log(), what="the bounce")
    assert "5.1.3" in tayori.log()
    assert not any(p.name == "escape" for p in tayori.root.rglob("escape"))


ALIASES = """\
# aliases(5)
team: u, v,
  w@tayori.test
outside: far@dest.test
loop1: loop2@tayori.test
loop2: loop1@tayori.test
listed: :include:{include}
archive: /{root}/archive.mbox
"""


def with_aliases(make_tayori: Callable[..., Tayori], tmp_path: Path, **options: object
                 ) -> Tayori:
    (tmp_path / "members").write_text("x\ny@tayori.test\n")
    (tmp_path / "aliases").write_text(ALIASES.format(include=tmp_path / "members",
                                                     root=str(tmp_path).lstrip("/")))
    (tmp_path / "users").write_text("u\nv\nw\nx\ny\n")
    return make_tayori(deliver=True, local={"users": "users", "aliases": "aliases"},
                       tables={"users": {"file": str(tmp_path / "users")},
                               "aliases": {"file": str(tmp_path / "aliases"),
                                           "format": "aliases"}}, **options)


def mailbox(tayori: Tayori, user: str) -> Path:
    return tayori.root / "mail" / "tayori.test" / user


def test_unknown_local_user_is_refused_at_rcpt_postmaster_always_accepted(
        make_tayori: Callable[..., Tayori], tmp_path: Path) -> None:
    tayori = with_aliases(make_tayori, tmp_path)
    with tayori.client() as client:
        client.greeting_and_ehlo()
        client.expect_cmd("MAIL FROM:<a@example.net>", 250)
        assert client.cmd("RCPT TO:<nobody@tayori.test>").text.startswith("5.1.1")
        client.expect_cmd("RCPT TO:<nobody@tayori.test>", 550)
        client.expect_cmd("RCPT TO:<U+tag@tayori.test>", 250)     # subaddress, any case
        client.expect_cmd("RCPT TO:<team@tayori.test>", 250)      # an alias
        client.expect_cmd("RCPT TO:<postmaster@tayori.test>", 250)
        client.expect_cmd("RCPT TO:<Postmaster>", 250)


def test_alias_fan_out_and_include(make_tayori: Callable[..., Tayori],
                                   tmp_path: Path) -> None:
    tayori = with_aliases(make_tayori, tmp_path)
    queue_id = send(tayori, "alice@example.net", ["team@tayori.test", "listed@tayori.test"])
    for user in ("u", "v", "w", "x", "y"):
        wait_for(lambda user=user: len(new_files(mailbox(tayori, user))) == 1,
                 what=f"the message in {user}'s mailbox")
    wait_for(lambda: not tayori.envelopes(), what="the queue to empty")
    body = new_files(mailbox(tayori, "w"))[0].read_bytes()
    assert body.startswith(b"Return-Path: <alice@example.net>\nDelivered-To: w@tayori.test\n")
    assert f"delivered queue_id={queue_id} to=team@tayori.test" in tayori.log()


def test_alias_loop_bounces_instead_of_looping(make_tayori: Callable[..., Tayori],
                                              tmp_path: Path) -> None:
    tayori = with_aliases(make_tayori, tmp_path)
    queue_id = send(tayori, "", ["loop1@tayori.test"])
    wait_for(lambda: f"bounced queue_id={queue_id}" in tayori.log(), what="the loop to end")
    assert "5.4.6" in tayori.log()
    wait_for(lambda: not tayori.envelopes(), what="the queue to empty")


def test_alias_to_a_file(make_tayori: Callable[..., Tayori], tmp_path: Path) -> None:
    tayori = with_aliases(make_tayori, tmp_path)
    send(tayori, "alice@example.net", ["archive@tayori.test"],
         MESSAGE + b"From the start of a line\r\n")
    archive = tmp_path / "archive.mbox"
    wait_for(lambda: archive.exists() and archive.stat().st_size > 0, what="the mbox")
    text = archive.read_bytes()
    assert text.startswith(b"From alice@example.net ")
    assert b"\n>From the start of a line\n" in text and b"Delivered-To: archive@tayori.test" \
        in text


def test_alias_to_a_remote_address_goes_out(make_tayori: Callable[..., Tayori],
                                            tmp_path: Path) -> None:
    with SmtpPeer("127.0.0.1", free_port()) as sink:
        tayori = with_aliases(make_tayori, tmp_path, remote={
            "deliver": "relay", "host": f"[127.0.0.1]:{sink.port}", "tls": "none"})
        send(tayori, "alice@example.net", ["outside@tayori.test"],)
        [got] = sink.wait_for_messages(1)
    assert got.recipients == ("far@dest.test",) and got.sender == "alice@example.net"
    assert "ORCPT=rfc822;outside@tayori.test" in got.rcpt_params[0]


def test_quota_full_mailbox_452_at_rcpt_then_deferral_and_5_2_2(
        make_tayori: Callable[..., Tayori]) -> None:
    """Two messages fit; the third is refused at RCPT (452 4.2.2). A message that only
    the data makes too big is deferred, and bounces 5.2.2 when its lifetime ends."""
    tayori = make_tayori(deliver=True, local={"quota_messages": 2, "quota_bytes": "3K"},
                         queue={"retry": ["1s"], "lifetime": "4s"})
    for _ in range(2):
        send(tayori, "alice@example.net", ["u@tayori.test"])
    box = tayori.root / "mail" / "tayori.test" / "u"
    wait_for(lambda: len(new_files(box)) == 2, what="two messages in the mailbox")
    with tayori.client() as client:
        client.greeting_and_ehlo()
        client.expect_cmd("MAIL FROM:<alice@example.net>", 250)
        reply = client.cmd("RCPT TO:<u@tayori.test>")
        assert reply.code == 452 and reply.text.startswith("4.2.2")
    big = MESSAGE + (b"x" * 78 + b"\r\n") * 50
    queue_id = send(tayori, "", ["v@tayori.test"], big)
    wait_for(lambda: f"expired queue_id={queue_id}" in tayori.log(), what="the expiry")
    assert 'reply="452 4.2.2' in tayori.log()
    assert new_files(tayori.root / "mail" / "tayori.test" / "v") == []


def test_catch_all_and_tag_folders(make_tayori: Callable[..., Tayori],
                                   tmp_path: Path) -> None:
    (tmp_path / "users").write_text("u\ncatch\n")
    tayori = make_tayori(deliver=True, local={"users": "users", "catch_all": "catch",
                                              "tag_folder": True},
                         tables={"users": {"file": str(tmp_path / "users")}})
    send(tayori, "alice@example.net", ["whoever@tayori.test", "u+Lists@tayori.test",
                                       "u+INBOX@tayori.test"])
    wait_for(lambda: len(new_files(mailbox(tayori, "catch"))) == 1, what="the catch-all")
    wait_for(lambda: len(new_files(mailbox(tayori, "u") / ".Lists")) == 1, what="the folder")
    wait_for(lambda: len(new_files(mailbox(tayori, "u"))) == 1, what="INBOX for a bad tag")
    assert b"Delivered-To: catch@tayori.test" in new_files(mailbox(tayori, "catch"))[0] \
        .read_bytes()


def test_pipe_action(make_tayori: Callable[..., Tayori], tmp_path: Path) -> None:
    """deliver = "pipe": the command gets each recipient's copy; exit 75 defers."""
    script = tmp_path / "deliver.sh"
    script.write_text('#!/bin/sh\n[ -e "$0.fail" ] && { rm "$0.fail"; exit 75; }\n'
                      'cat > "$0.$LOCAL.out"\n')
    script.chmod(0o755)
    (tmp_path / "deliver.sh.fail").write_text("")
    tayori = make_tayori(deliver=True, queue={"retry": ["1s"]}, trusted=["192.0.2.0/24"],
                         extra=f'[actions.program]\ndeliver = "pipe"\ncommand = "{script}"\n'
                               '[[match]]\nto = "pipe.test"\naction = "program"\n')
    queue_id = send(tayori, "alice@example.net", ["p@pipe.test"])
    output = tmp_path / "deliver.sh.p.out"
    wait_for(lambda: f"delivered queue_id={queue_id}" in tayori.log(),
             what="the delivery after the retry")
    assert f"deferred queue_id={queue_id}" in tayori.log()
    assert output.read_bytes().endswith(MESSAGE.replace(b"\r\n", b"\n"))


def test_postmaster_goes_to_the_configured_address_and_users_reload(
        make_tayori: Callable[..., Tayori], tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("u\nboss\n")
    tayori = make_tayori(deliver=True, local={"users": "users"},
                         queue={"postmaster": "boss@tayori.test"},
                         tables={"users": {"file": str(users)}})
    send(tayori, "alice@example.net", ["postmaster@tayori.test"])
    wait_for(lambda: len(new_files(mailbox(tayori, "boss"))) == 1, what="the postmaster mail")
    with tayori.client() as client:
        client.greeting_and_ehlo()
        client.expect_cmd("MAIL FROM:<a@example.net>", 250)
        client.expect_cmd("RCPT TO:<newcomer@tayori.test>", 550)
        users.write_text("u\nboss\nnewcomer\n")
        os.utime(users, (time.time() + 5, time.time() + 5))
        client.expect_cmd("RCPT TO:<newcomer@tayori.test>", 250)


def test_virtual_aliases_per_domain(make_tayori: Callable[..., Tayori],
                                    tmp_path: Path) -> None:
    """Whole-address names are virtual aliases of one domain; @domain is its catch-all."""
    (tmp_path / "aliases").write_text("info@tayori.test: u\n@other.test: v@tayori.test\n")
    (tmp_path / "users").write_text("u\nv\n")
    tayori = make_tayori(deliver=True, local_domains=["tayori.test", "other.test"],
                         local={"users": "users", "aliases": "aliases"},
                         tables={"users": {"file": str(tmp_path / "users")},
                                 "aliases": {"file": str(tmp_path / "aliases"),
                                             "format": "aliases"}})
    with tayori.client() as client:
        client.greeting_and_ehlo()
        client.expect_cmd("MAIL FROM:<a@example.net>", 250)
        client.expect_cmd("RCPT TO:<info@other.test>", 250)       # the catch-all
        client.expect_cmd("RCPT TO:<nobody@tayori.test>", 550)    # no catch-all here
    send(tayori, "alice@example.net", ["info@tayori.test", "anything@other.test"])
    wait_for(lambda: len(new_files(mailbox(tayori, "u"))) == 1, what="info@ in u's box")
    wait_for(lambda: len(new_files(mailbox(tayori, "v"))) == 1, what="@other.test in v's")


def test_sqlite_users_and_aliases(make_tayori: Callable[..., Tayori], tmp_path: Path) -> None:
    """Users and aliases from an SQLite database, looked up per recipient."""
    database = tmp_path / "mail.sqlite3"
    db = sqlite3.connect(database)
    with db:
        db.execute("CREATE TABLE mailbox (address TEXT PRIMARY KEY)")
        db.execute("CREATE TABLE alias (source TEXT, destination TEXT)")
        db.executemany("INSERT INTO mailbox VALUES (?)", [("u@tayori.test",), ("v@tayori.test",)])
        db.executemany("INSERT INTO alias VALUES (?, ?)",
                       [("sales@tayori.test", "u"), ("sales@tayori.test", "v@tayori.test")])
    db.close()
    tayori = make_tayori(deliver=True, local={"users": "boxes", "aliases": "forwards"},
                         tables={
                             "boxes": {"sqlite": str(database),
                                       "query": "SELECT 1 FROM mailbox WHERE address = ?"},
                             "forwards": {"sqlite": str(database), "format": "aliases",
                                          "query": "SELECT destination FROM alias "
                                                   "WHERE source = ?"}})
    with tayori.client() as client:
        client.greeting_and_ehlo()
        client.expect_cmd("MAIL FROM:<a@example.net>", 250)
        client.expect_cmd("RCPT TO:<nobody@tayori.test>", 550)
    send(tayori, "alice@example.net", ["sales@tayori.test"])
    for user in ("u", "v"):
        wait_for(lambda user=user: len(new_files(mailbox(tayori, user))) == 1,
                 what=f"the message in {user}'s mailbox")


def test_mbox_action(make_tayori: Callable[..., Tayori]) -> None:
    """deliver = "mbox": appended under a dot-lock and an fcntl lock, mboxrd-quoted."""
    tayori = make_tayori(deliver=True, local={"deliver": "mbox", "path": "mail/{user}.mbox"})
    for _ in range(3):
        send(tayori, "alice@example.net", ["u@tayori.test"],
             MESSAGE + b"From here on\r\n")
    box = tayori.root / "mail" / "u.mbox"
    wait_for(lambda: box.exists() and box.read_bytes().count(b"\nFrom alice") == 2,
             what="three messages in the mbox")
    wait_for(lambda: not tayori.envelopes(), what="the queue to empty")
    text = box.read_bytes()
    assert text.startswith(b"From alice@example.net ") and text.count(b">From here on\n") == 3
    assert b"Delivered-To: u@tayori.test\n" in text
    assert not (tayori.root / "mail" / "u.mbox.lock").exists()


def test_a_received_local_part_is_never_a_command_or_a_file(
        make_tayori: Callable[..., Tayori]) -> None:
    """``|command``, ``/file`` and ``\\user`` exist only in what an alias or a .forward
    made: a local part as received, from a client or a local user's sendmail, is an
    address (its ``/`` refused 550 5.1.3), and nothing runs or is written."""
    with tempfile.TemporaryDirectory(prefix="t") as name:   # short: local parts are <= 64
        where = Path(name)
        program = where / "prog@tayori.test"
        program.write_text(f"#!/bin/sh\ntouch {where}/ran\n")
        program.chmod(0o755)
        recipients = [f"|{where}/prog@tayori.test", f"{where}/file@tayori.test"]
        tayori = make_tayori(deliver=True)
        bounces = _send_as_client(tayori, recipients) + 2   # + the sendmail copies
        result = run_sendmail("-C", str(tayori.config_path), "-i", *recipients,
                              data=MESSAGE)
        assert result.returncode == 0, result.stderr
        wait_for(lambda: tayori.log().count("bounced queue_id=") >= bounces,
                 what="every recipient to bounce")
        assert tayori.log().count('reply="550 5.1.3') >= bounces
        assert sorted(path.name for path in where.iterdir()) == ["prog@tayori.test"]


def _send_as_client(tayori: Tayori, recipients: list[str]) -> int:
    """Send to those of ``recipients`` that RCPT accepts (the session may refuse them
    already); how many it accepted."""
    with tayori.client() as client:
        client.greeting_and_ehlo()
        client.expect_cmd("MAIL FROM:<>", 250)
        accepted = [rcpt for rcpt in recipients
                    if client.cmd(f"RCPT TO:<{rcpt}>").code == 250]
        if accepted:
            client.expect_cmd("DATA", 354)
            client.send(MESSAGE + b".\r\n")
            client.expect(250)
    return len(accepted)
