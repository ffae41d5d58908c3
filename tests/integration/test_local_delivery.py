"""Local delivery through a running tayori: the ``maildir`` action of the test config
(``mail/{domain}/{user}/`` under the instance's directory) gets the mail for its domains.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from harness import Tayori, queued_id, wait_for

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
