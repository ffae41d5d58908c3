"""Mailboxes, commands and ``.forward`` files of system accounts while tayori runs as an
unprivileged ``user``: the privileged helper does the work as each account.

Uses the accounts every Debian system has (``daemon``, ``bin``, ``nobody``); tayori's
directories live under a temporary directory ``nobody`` can traverse.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_local_delivery import MESSAGE, new_files, send

from harness import Tayori, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="mailbox owners and a privilege drop need root")
DAEMON = pwd.getpwnam("daemon")
BIN = pwd.getpwnam("bin")


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tayori-priv-"))   # traversable by nobody
    path.chmod(0o755)
    (path / "shared").mkdir(mode=0o777)
    (path / "shared").chmod(0o777)   # where the accounts' commands and files write
    (path / "forward").mkdir()
    yield path
    for server in _started:
        server.stop()
    _started.clear()
    shutil.rmtree(path, ignore_errors=True)


_started: list[Tayori] = []


def start(root: Path, tables: dict[str, object] | None = None, **local: object) -> Tayori:
    tayori = Tayori(root / "t", user="nobody", deliver=True, tables=tables or {},
                    local={"owner": "recipient", **local})
    _started.append(tayori)
    return tayori.start()


def mailbox(tayori: Tayori, user: str) -> Path:
    return tayori.root / "mail" / "tayori.test" / user


def write_forward(root: Path, account: pwd.struct_passwd, text: str, mode: int = 0o644
                  ) -> None:
    path = root / "forward" / account.pw_name
    path.write_text(text)
    os.chown(path, account.pw_uid, account.pw_gid)
    path.chmod(mode)


def test_each_mailbox_belongs_to_its_account_and_unknown_accounts_are_refused(
        root: Path) -> None:
    tayori = start(root)
    with tayori.client() as client:
        client.greeting_and_ehlo()
        client.expect_cmd("MAIL FROM:<alice@example.net>", 250)
        client.expect_cmd("RCPT TO:<daemon@tayori.test>", 250)
        client.expect_cmd("RCPT TO:<bin+tag@tayori.test>", 250)
        assert client.cmd("RCPT TO:<no-such-account@tayori.test>").code == 550
        assert client.cmd("RCPT TO:<root@tayori.test>").code == 550   # never as root
    send(tayori, "alice@example.net", ["daemon@tayori.test", "bin+tag@tayori.test"])
    for account in (DAEMON, BIN):
        box = mailbox(tayori, account.pw_name)
        wait_for(lambda box=box: len(new_files(box)) == 1, what=f"{box} to get the message")
        for path in (box, box / "new", new_files(box)[0]):
            assert path.stat().st_uid == account.pw_uid, path
        assert stat.S_IMODE(box.stat().st_mode) == 0o700
        assert new_files(box)[0].read_bytes().endswith(MESSAGE.replace(b"\r\n", b"\n"))
    assert "privileges-dropped user=nobody" in tayori.log()


def test_a_pipe_runs_as_its_run_as_user_after_the_privilege_drop(root: Path) -> None:
    (root / "aliases").write_text(
        f"runner: \"|/bin/sh -c 'id -u > {root}/shared/uid; cat > {root}/shared/body'\"\n")
    tayori = start(root, {"aliases": {"file": str(root / "aliases"), "format": "aliases"}},
                   owner="", run_as="daemon", aliases="aliases")
    send(tayori, "alice@example.net", ["runner@tayori.test"])
    wait_for(lambda: not tayori.envelopes(), what="the pipe delivery")
    assert (root / "shared" / "uid").read_text() == f"{DAEMON.pw_uid}\n"
    assert (root / "shared" / "body").read_bytes().endswith(b"Hello.\n.dot line\n")


def test_forward_files_run_as_their_owner_and_unsafe_ones_are_ignored(root: Path) -> None:
    shared = root / "shared"
    write_forward(root, DAEMON, f"# keep a copy, tell bin, log it\n\\daemon, bin\n"
                  f"\"|/bin/sh -c 'id -u > {shared}/pipe-uid'\", {shared}/daemon.mbox\n")
    write_forward(root, BIN, "daemon\n", mode=0o664)   # group-writable: not used
    tayori = start(root, forward=True, forward_path=f"{root}/forward/{{user}}")
    queue_id = send(tayori, "alice@example.net", ["daemon@tayori.test"])
    wait_for(lambda: not tayori.envelopes(), what="the forwarded deliveries")
    assert len(new_files(mailbox(tayori, "daemon"))) == 1
    assert len(new_files(mailbox(tayori, "bin"))) == 1   # its .forward was ignored
    assert new_files(mailbox(tayori, "daemon"))[0].stat().st_uid == DAEMON.pw_uid
    assert (shared / "pipe-uid").read_text() == f"{DAEMON.pw_uid}\n"
    archive = shared / "daemon.mbox"
    assert archive.stat().st_uid == DAEMON.pw_uid
    assert archive.read_bytes().startswith(b"From alice@example.net ")
    log = tayori.log()
    assert "forward-ignored" in log and "others may write it" in log
    assert f"bounced queue_id={queue_id}" not in log


def test_a_forwarding_loop_bounces_with_5_4_6(root: Path) -> None:
    write_forward(root, DAEMON, "bin\n")
    write_forward(root, BIN, "daemon@tayori.test\n")
    tayori = start(root, forward=True, forward_path=f"{root}/forward/{{user}}")
    queue_id = send(tayori, "alice@example.net", ["daemon@tayori.test"])
    wait_for(lambda: f"bounced queue_id={queue_id}" in tayori.log(), what="the loop to end")
    assert "5.4.6" in tayori.log()
    assert new_files(mailbox(tayori, "daemon")) == []


def test_a_pipe_past_its_timeout_is_killed_through_the_helper(root: Path) -> None:
    (root / "aliases").write_text(
        f"sleeper: \"|/bin/sh -c 'echo $$ > {root}/shared/pid; exec sleep 60'\"\n")
    tayori = start(root, {"aliases": {"file": str(root / "aliases"), "format": "aliases"}},
                   owner="", run_as="daemon", aliases="aliases", timeout="1s")
    queue_id = send(tayori, "alice@example.net", ["sleeper@tayori.test"])
    wait_for(lambda: f"deferred queue_id={queue_id}" in tayori.log(), what="the deferral")
    assert "timed out after 1s" in tayori.log()
    pid = int((root / "shared" / "pid").read_text())
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or
             Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z",
             what="the command to be killed")
