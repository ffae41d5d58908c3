"""``.forward`` files: which are used, and what their targets become."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from tayori.route.forward import forward_of, system_account

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
