"""Mailboxes, commands and ``.forward`` files of system accounts while tayori runs as an
unprivileged ``user`` (or as root): the privileged helper does the work as each account,
root writes nothing a user controls, and the helper survives, or is replaced, or is
refused when a user took its socket.

Uses the accounts every Debian system has (``daemon``, ``bin``, ``nobody``); tayori's
directories live under a temporary directory ``nobody`` can traverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_local_delivery import MESSAGE, new_files, send

from harness import Tayori, wait_for
from tayori.deliver import pipe, privileged

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="mailbox owners and a privilege drop need root")
DAEMON = pwd.getpwnam("daemon")
BIN = pwd.getpwnam("bin")
NOBODY = pwd.getpwnam("nobody")
FORWARD_PATH = "{root}/forward/{{user}}.forward"   # the helper reads only *.forward


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


def start(root: Path, tables: dict[str, object] | None = None, user: str = "nobody",
          **local: object) -> Tayori:
    tayori = Tayori(root / "t", user=user, deliver=True, tables=tables or {},
                    local={"owner": "recipient", **local})
    _started.append(tayori)
    return tayori.start()


def mailbox(tayori: Tayori, user: str) -> Path:
    return tayori.root / "mail" / "tayori.test" / user


def write_forward(root: Path, account: pwd.struct_passwd, text: str, mode: int = 0o644
                  ) -> None:
    path = root / "forward" / f"{account.pw_name}.forward"
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
    tayori = start(root, forward=True, forward_path=FORWARD_PATH.format(root=root))
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
    tayori = start(root, forward=True, forward_path=FORWARD_PATH.format(root=root))
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


def test_a_forward_to_the_accounts_own_tagged_addresses_is_one_copy(root: Path) -> None:
    """``daemon+a, daemon+b`` in daemon's .forward: daemon's mailbox, once (it used to read
    the .forward again for each tag: 2^20 recipients)."""
    write_forward(root, DAEMON, "daemon+a, daemon+b\n")
    tayori = start(root, forward=True, forward_path=FORWARD_PATH.format(root=root))
    send(tayori, "alice@example.net", ["daemon@tayori.test"])
    wait_for(lambda: not tayori.envelopes(), what="the queue to empty")
    assert len(new_files(mailbox(tayori, "daemon"))) == 1


# --- root writes nothing a user controls --------------------------------------------------


@pytest.mark.parametrize("user", ["nobody", ""])
def test_a_maildir_replaced_by_a_link_to_a_root_directory_gets_nothing(
        root: Path, user: str) -> None:
    """daemon replaced its Maildir with a link to a directory of root's: the delivery,
    as daemon, may not write there (451, the mail waits), whether tayori dropped its
    privileges or runs as root."""
    target = root / "root-only"
    target.mkdir(mode=0o755)
    tayori = start(root, user=user)
    box = mailbox(tayori, "daemon")
    box.parent.mkdir(parents=True)
    box.symlink_to(target)
    os.lchown(box, DAEMON.pw_uid, DAEMON.pw_gid)
    queue_id = send(tayori, "alice@example.net", ["daemon@tayori.test"])
    wait_for(lambda: f"deferred queue_id={queue_id}" in tayori.log(), what="the deferral")
    assert 'reply="451 4.2.0 Cannot deliver to mailbox' in tayori.log()
    assert list(target.iterdir()) == []


def test_root_makes_no_maildir_through_a_users_link(root: Path) -> None:
    """A missing Maildir whose path goes through a link of a user's is not made by root
    (the link's target is a directory of root's)."""
    target = root / "root-only"
    target.mkdir(mode=0o755)
    tayori = start(root)
    domain = mailbox(tayori, "bin").parent
    domain.parent.mkdir()
    domain.symlink_to(target)
    os.lchown(domain, DAEMON.pw_uid, DAEMON.pw_gid)
    queue_id = send(tayori, "alice@example.net", ["bin@tayori.test"])
    wait_for(lambda: f"deferred queue_id={queue_id}" in tayori.log(), what="the deferral")
    assert f"the symbolic link {domain} on its path is not root's" in tayori.log()
    assert list(target.iterdir()) == []


# --- the helper's own life ----------------------------------------------------------------


def test_a_failed_fork_drops_one_request_and_the_helper_goes_on(
        root: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """fork() refused (EAGAIN): that request fails (the client's HelperUnavailable, a
    451), the failure is logged, and the next request is served."""
    write_forward(root, DAEMON, "far@example.net\n")
    path = str(root / "forward" / "daemon.forward")
    address = f"\0tayori-test-{os.getpid()}-{root.name}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listener:
        listener.bind(address)
        listener.listen(4)

        def fork() -> int:
            raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))

        with monkeypatch.context() as patch:
            patch.setattr(os, "fork", fork)
            with caplog.at_level(logging.ERROR, "tayori"), \
                    pytest.raises(privileged.HelperUnavailable):
                _served(listener, lambda: privileged.read_file(DAEMON.pw_uid, path), address)
        assert "privileged-helper-error" in caplog.text
        text = _served(listener, lambda: privileged.read_file(DAEMON.pw_uid, path), address)
    assert text == "far@example.net\n"


def _served(listener: socket.socket, ask: Callable[[], object], address: str) -> object:
    """``ask()`` in a thread (against ``address``) while one turn of the helper's server
    serves ``listener``; what it returned, or what it raised, raised again."""
    outcome: list[object] = []

    def client() -> None:
        with _helper_at(address):
            try:
                outcome.append(ask())
            except Exception as exc:   # handed to the test's thread
                outcome.append(exc)

    thread = threading.Thread(target=client)
    thread.start()
    privileged._serve_once(listener, os.geteuid())
    thread.join(timeout=30)
    privileged._reap()
    (result,) = outcome
    if isinstance(result, Exception):
        raise result
    return result


@contextlib.contextmanager
def _helper_at(address: str) -> Iterator[None]:
    saved, privileged._address = privileged._address, address
    try:
        yield
    finally:
        privileged._address = saved


def keeper_of(tayori: Tayori) -> int:
    match = re.search(r"privileged-helper-started pid=(\d+)", tayori.log())
    assert match, tayori.log()
    return int(match.group(1))


def children(pid: int) -> list[int]:
    """The live child processes of ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):
            state, parent = (entry / "stat").read_text().rpartition(")")[2].split()[:2]
            if int(parent) == pid and state != "Z":
                found.append(int(entry.name))
    return found


def test_a_helper_server_that_dies_is_started_again(root: Path) -> None:
    tayori = start(root)
    keeper = keeper_of(tayori)
    (server,) = wait_for(lambda: children(keeper), what="the helper's server")
    os.kill(server, signal.SIGKILL)
    wait_for(lambda: "privileged-helper-died" in tayori.log(), what="the keeper to notice")
    wait_for(lambda: children(keeper) not in ([], [server]), what="a new server")
    send(tayori, "alice@example.net", ["daemon@tayori.test"])
    wait_for(lambda: len(new_files(mailbox(tayori, "daemon"))) == 1, what="the delivery")


FAKE_HELPER = """
import os, socket, sys, time
os.setgroups([])
os.setgid(int(sys.argv[3]))
os.setuid(int(sys.argv[2]))
sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
deadline = time.monotonic() + 10
while True:
    try:
        sock.bind("\\0" + sys.argv[1])
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
sock.listen(16)
print("listening", flush=True)
while True:
    conn, _ = sock.accept()
    data, fds, _, _ = socket.recv_fds(conn, 65536, 3)
    print(f"request bytes={len(data)} fds={len(fds)}", flush=True)
    try:
        conn.send(b'{"name": "fake", "done": true, "status": 0, "text": "x@evil.test"}')
    except OSError:
        pass
    conn.close()
"""


@contextlib.contextmanager
def fake_helper(address: str) -> Iterator[list[str]]:
    """A local user (nobody) serving the helper's socket address once it is free; what it
    says as it goes: ``listening``, then a line per request it got."""
    lines: list[str] = []
    with subprocess.Popen(
            [sys.executable, "-c", FAKE_HELPER, address.lstrip("\0"), str(NOBODY.pw_uid),
             str(NOBODY.pw_gid)], stdout=subprocess.PIPE, text=True) as process:
        reader = threading.Thread(target=lambda: lines.extend(
            line.strip() for line in process.stdout or ()))
        reader.start()
        try:
            wait_for(lambda: lines or process.poll() is not None, what="the fake to listen")
            assert lines[:1] == ["listening"], lines
            yield lines
        finally:
            process.kill()
            reader.join(timeout=10)


def test_clients_send_nothing_to_a_socket_root_does_not_serve(tmp_path: Path) -> None:
    address = f"\0tayori-test-{os.getpid()}-{tmp_path.name}"
    with fake_helper(address) as requests:
        with pytest.raises(privileged.HelperUnavailable, match="not by root"):
            privileged._ask({"op": "read", "uid": DAEMON.pw_uid, "path": "/.forward"}, [],
                            address=address)

        async def exec_through_it() -> None:
            protocol = pipe._Protocol(asyncio.get_running_loop())
            await pipe._HelperProcess.start(address, protocol, privileged.exec_request(
                DAEMON.pw_uid, ["/bin/true"], env={}, cwd="/", umask=0o077))

        with pytest.raises(privileged.HelperUnavailable, match="not by root"):
            asyncio.run(exec_through_it())
        wait_for(lambda: len(requests) == 3, what="the fake to see both connections")
    assert requests == ["listening"] + ["request bytes=0 fds=0"] * 2


def test_with_the_helper_gone_a_user_who_takes_its_socket_gets_nothing(root: Path) -> None:
    """Both helper processes killed; nobody binds the socket's name: mailbox writes and
    commands for other accounts are deferred 451 4.3.5, nothing is sent to it."""
    (root / "aliases").write_text(f'runner: "|/bin/sh -c \'touch {root}/shared/ran\'"\n')
    tayori = start(root, {"aliases": {"file": str(root / "aliases"), "format": "aliases"}},
                   run_as="daemon", aliases="aliases")
    os.kill(keeper_of(tayori), signal.SIGKILL)
    with fake_helper(privileged.socket_address(str(tayori.spool))) as requests:
        queue_id = send(tayori, "alice@example.net", ["daemon@tayori.test",
                                                      "runner@tayori.test"])
        wait_for(lambda: tayori.log().count(f"deferred queue_id={queue_id}") >= 2,
                 what="both deliveries to be deferred")
        wait_for(lambda: len(requests) > 1, what="the fake to see the connections")
    log = tayori.log()
    assert log.count('reply="451 4.3.5') >= 2 and "privileged-helper-unavailable" in log
    assert "privileged-helper-died" in log   # the supervisor says so, once
    assert new_files(mailbox(tayori, "daemon")) == []
    assert not (root / "shared" / "ran").exists()
    assert set(requests[1:]) == {"request bytes=0 fds=0"}
