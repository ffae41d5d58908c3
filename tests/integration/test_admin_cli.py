"""``tayori user`` and ``tayori dkim keygen``: what an operator types."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

from tayori.auth.dkim_keys import load_signing_key
from tayori.policy.passwords import verify_password
from tayori.policy.userdb_file import list_users


def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tayori", *args], input=stdin,
                          capture_output=True, text=True, timeout=60, check=False)


def config(tmp_path: Path, extra: str = "") -> str:
    path = tmp_path / "tayori.toml"
    path.write_text(f'[[listen]]\naddress = "127.0.0.1:2599"\n[auth]\nusers = "users"\n{extra}')
    return str(path)


def test_user_add_passwd_senders_list_delete(tmp_path: Path) -> None:
    conf = config(tmp_path)
    users = tmp_path / "users"
    added = cli("user", "add", "-c", conf, "alice@example.org", "--sender", "@example.net",
                "--password-stdin", stdin="first secret\n")
    assert added.returncode == 0, added.stderr
    entry = list_users(str(users))[0]
    assert entry.login == "alice@example.org" and entry.senders == ("@example.net",)
    assert entry.password_hash.startswith("{ARGON2ID}$argon2id$")
    assert verify_password(entry.password_hash, "first secret")
    assert "first secret" not in users.read_text()
    again = cli("user", "add", "-c", conf, "alice@example.org", "--password-stdin", stdin="x\n")
    assert again.returncode == 1 and "already exists" in again.stderr
    assert cli("user", "passwd", "-c", conf, "alice@example.org", "--password-stdin",
               stdin="second\n").returncode == 0
    assert verify_password(list_users(str(users))[0].password_hash, "second")
    assert cli("user", "senders", "-c", conf, "alice@example.org").returncode == 0
    listed = cli("user", "list", "-c", conf)
    assert listed.stdout.strip() == "alice@example.org"
    assert cli("user", "delete", "-c", conf, "alice@example.org").returncode == 0
    missing = cli("user", "delete", "-c", conf, "alice@example.org")
    assert missing.returncode == 1 and "no user" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_empty_password_and_other_directories_are_refused(tmp_path: Path) -> None:
    empty = cli("user", "add", "-c", config(tmp_path), "bob", "--password-stdin", stdin="\n")
    assert empty.returncode == 1 and "empty" in empty.stderr
    other = tmp_path / "other"
    other.mkdir()
    ldap = cli("user", "list", "-c", config(other, 'ldap = "ldap://127.0.0.1"\n'))
    assert ldap.returncode == 1 and "auth.ldap" in ldap.stderr


def test_dkim_keygen_writes_a_private_key_and_prints_the_record(tmp_path: Path) -> None:
    key = tmp_path / "example.org.s1.pem"
    made = cli("dkim", "keygen", "example.org", "s1", "--out", str(key))
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith('s1._domainkey.example.org. IN TXT ( "v=DKIM1; k=rsa; p=')
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert load_signing_key(str(key), "example.org", "s1").algorithm == "rsa-sha256"
    again = cli("dkim", "keygen", "example.org", "s1", "--out", str(key))
    assert again.returncode == 1 and "exists" in again.stderr
