"""``.forward`` files: which are used, what their targets become, and how local delivery
treats what they make (fan-out, owners that cannot be looked up)."""

from __future__ import annotations

import asyncio
import errno
import os
import pwd
from pathlib import Path

import pytest

from tayori.config.model import from_document
from tayori.deliver.dispatch import Delivery
from tayori.deliver.local import LocalDeliverer
from tayori.queue.store import Claim, QueuedMessage
from tayori.route.forward import MAX_TARGETS, ForwardUnavailable, forward_of, system_account

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="reads files as another account")
DAEMON = pwd.getpwnam("daemon")


def write(tmp_path: Path, text: str, *, mode: int = 0o644, owner: int = DAEMON.pw_uid) -> str:
    path = tmp_path / "daemon.forward"
    path.write_text(text)
    os.chown(path, owner, DAEMON.pw_gid)
    path.chmod(mode)
    return str(tmp_path / "{user}.forward")


def test_targets(tmp_path: Path) -> None:
    template = write(tmp_path, "# comment\n\\daemon, bin\n  far@example.net\n"
                     "\"|/bin/cmd a, b\", /var/tmp/file\n:include:/etc/passwd\n"
                     "DAEMON@tayori.test\n")
    forward = forward_of(template, "daemon+tag@tayori.test", "+")
    assert forward is not None and forward.user == "daemon"
    assert forward.targets == ("\\daemon@tayori.test", "bin@tayori.test", "far@example.net",
                               "|/bin/cmd a, b", "/var/tmp/file")


@pytest.mark.parametrize(("mode", "owner"), [(0o664, DAEMON.pw_uid), (0o646, DAEMON.pw_uid),
                                             (0o644, pwd.getpwnam("bin").pw_uid)])
def test_unsafe_files_are_ignored(tmp_path: Path, mode: int, owner: int) -> None:
    template = write(tmp_path, "far@example.net\n", mode=mode, owner=owner)
    assert forward_of(template, "daemon@tayori.test", "+") is None


def test_a_symbolic_link_is_not_followed(tmp_path: Path) -> None:
    write(tmp_path, "far@example.net\n")
    (tmp_path / "link.forward").symlink_to(tmp_path / "daemon.forward")
    template = str(tmp_path / "link.forward")
    assert forward_of(template, "daemon@tayori.test", "+") is None


def test_no_file_empty_file_root_and_unknown_accounts(tmp_path: Path) -> None:
    template = str(tmp_path / "{user}.forward")
    assert forward_of(template, "daemon@tayori.test", "+") is None
    write(tmp_path, "# nothing but a comment\n")
    assert forward_of(template, "daemon@tayori.test", "+") is None
    assert system_account("root@tayori.test", "+") is None
    assert system_account("no-such-account@tayori.test", "+") is None
    assert system_account("bin+x@tayori.test", "+") is not None


def test_the_accounts_own_address_in_any_form_is_its_mailbox(tmp_path: Path) -> None:
    """``x+a, x+b`` in x's .forward is x's own mailbox, once: not x's .forward again
    (which made 2^20 recipients through the tags)."""
    template = write(tmp_path, "daemon+a, daemon+b, \\Daemon+c, DAEMON@tayori.test\n"
                     "daemon@elsewhere.example, bin+x\n")
    forward = forward_of(template, "daemon@tayori.test", "+")
    assert forward is not None
    assert forward.targets == ("\\daemon@tayori.test", "daemon@elsewhere.example",
                               "bin+x@tayori.test")


def test_a_recipient_its_own_forward_made_is_not_expanded_by_it_again(
        tmp_path: Path) -> None:
    template = write(tmp_path, "bin\n")
    assert forward_of(template, "daemon+x@tayori.test", "+", expanded_by="daemon") is None
    assert forward_of(template, "daemon+x@tayori.test", "+", expanded_by="bin") is not None


def test_targets_are_capped(tmp_path: Path) -> None:
    template = write(tmp_path, "".join(f"u{n}@example.net\n" for n in range(MAX_TARGETS + 5)))
    forward = forward_of(template, "daemon@tayori.test", "+")
    assert forward is not None and len(forward.targets) == MAX_TARGETS


def test_a_failing_password_database_defers(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    template = write(tmp_path, "far@example.net\n")

    def broken(name: str) -> pwd.struct_passwd:
        raise OSError(errno.EIO, "NSS backend down")

    monkeypatch.setattr(pwd, "getpwnam", broken)
    with pytest.raises(ForwardUnavailable):
        forward_of(template, "daemon@tayori.test", "+")


def test_a_forward_file_must_be_named_forward(tmp_path: Path) -> None:
    write(tmp_path, "far@example.net\n")
    (tmp_path / "daemon.forward").rename(tmp_path / "daemon")
    assert forward_of(str(tmp_path / "{user}"), "daemon@tayori.test", "+") is None


def local_job(tmp_path: Path, *claims: tuple[str, int, str], **action: object
              ) -> tuple[LocalDeliverer, Delivery]:
    """A delivery of (address, row index, owner) recipients to a maildir action with
    ``.forward`` files (``<tmp_path>/<user>.forward``) and ``action`` options."""
    config = from_document({
        "hostname": "mx.tayori.test", "listen": [{"address": "127.0.0.1:2525"}],
        "tables": {"local_domains": ["tayori.test"]},
        "actions": {"local": {"deliver": "maildir", "path": f"{tmp_path}/{{user}}/",
                              "forward": True,
                              "forward_path": f"{tmp_path}/{{user}}.forward", **action}},
        "match": [{"to": "local_domains", "action": "local"}]}, "t.toml", "/")
    body = tmp_path / "body"
    body.write_bytes(b"Subject: x\r\n\r\nx\r\n")
    message = QueuedMessage("Q1", "a@example.net", 16, "7BIT", False, None, None, 0.0,
                            "127.0.0.1", "client", "ESMTP")
    recipients = tuple(Claim(message, index, address, None, None, "local", 0, False, False,
                             None, None, None, depth=1, owner=owner)
                       for address, index, owner in claims)
    return LocalDeliverer(config), Delivery(message, str(body), "local",
                                            config.actions["local"], "", recipients)


def test_fan_out_per_message_is_bounded(tmp_path: Path) -> None:
    """A recipient whose expansion would take the message past limits.max_recipients
    plus MAX_TARGETS rows is not expanded (554 5.4.6); one the account's own .forward
    made goes to the mailbox."""
    write(tmp_path, "bin, far@tayori.test\n")
    limit = 1000 + MAX_TARGETS   # limits.max_recipients's default
    deliverer, job = local_job(tmp_path, ("daemon@tayori.test", limit - 2, ""),
                               ("daemon@tayori.test", limit - 1, ""),
                               ("daemon+x@tayori.test", 3, "daemon"))
    fits, too_many, own = asyncio.run(deliverer.deliver(job))
    assert [r.address for r in fits.expanded] == ["bin@tayori.test", "far@tayori.test"]
    assert (too_many.reply.code, too_many.reply.status) == (554, "5.4.6")
    assert not too_many.expanded
    assert own.reply.code == 250 and own.target == f"maildir:{tmp_path}/daemon/"


def test_an_owner_the_password_database_does_not_know_now_defers(tmp_path: Path) -> None:
    """A file target of a .forward whose account is gone, and a mailbox of an
    ``owner = "recipient"`` action without an account: 451 4.3.5 (the queue's lifetime
    ends it), never written as tayori."""
    deliverer, job = local_job(tmp_path, (f"{tmp_path}/archive", 1, "no-such-account"),
                               ("no-such-account@tayori.test", 2, ""), owner="recipient")
    results = asyncio.run(deliverer.deliver(job))
    assert [(r.reply.code, r.reply.status) for r in results] == [(451, "4.3.5")] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["body"]
