"""tayori.policy.userdb and its backends without outside servers: the outcome and its
replies, sender ownership, the file table (checks, reload on change, the ``tayori user``
edits), SQLite, LDAP filter escaping and an unreachable server, and the Dovecot auth
client against a scripted fake of the protocol on loopback. An unknown user and a wrong
password must give the same outcome and do the same hashing work (counted here, not
timed). (Real slapd and Dovecot: tests/integration/test_userdb_peers.py.)"""

from __future__ import annotations

import asyncio
import base64
import os
import sqlite3
import stat
import tempfile
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import argon2
import bcrypt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness import free_port
from tayori.policy import userdb
from tayori.policy.passwords import Verification, check_password, hash_password
from tayori.policy.userdb import (
    AuthOutcome,
    AuthStatus,
    DirectoryUnavailable,
    SenderMap,
    may_send_as,
    normalize_sender,
    owns_address,
)
from tayori.policy.userdb_dovecot import DovecotAuth, parse_reply, unescape
from tayori.policy.userdb_file import (
    FileUsers,
    InvalidEntry,
    NoSuchUser,
    UserEntry,
    UserExists,
    add_user,
    delete_user,
    list_users,
    set_password,
    set_senders,
)
from tayori.policy.userdb_ldap import (
    LdapSettings,
    LdapUsers,
    escape_filter_value,
    user_filter,
)
from tayori.policy.userdb_sql import SqlUsers, pyformat

T = TypeVar("T")
TEST_TIMEOUT = 20.0
FAST = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, TEST_TIMEOUT))


@dataclass
class Checks:
    """Every password check :func:`userdb.judge` made: (stored hash, thread name)."""

    calls: list[tuple[str, str]] = field(default_factory=list)

    def stored(self) -> list[str]:
        return [stored for stored, _ in self.calls]


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> Checks:
    record = Checks()

    def spy(stored: str, password: str) -> Verification:
        record.calls.append((stored, threading.current_thread().name))
        return check_password(stored, password)

    monkeypatch.setattr(userdb, "check_password", spy)
    return record


# --- outcome, replies, sender ownership -------------------------------------------

def test_outcomes_map_to_the_rfc_4954_replies() -> None:
    assert (AuthOutcome.success("a").reply.code, AuthOutcome.success("a").reply.status) == (
        235, "2.7.0")
    failed = AuthOutcome.bad("no such user").reply
    assert (failed.code, failed.status) == (535, "5.7.8")
    assert AuthOutcome.bad("wrong password").reply == failed   # the same words either way
    temporary = AuthOutcome.temporary("down").reply
    assert (temporary.code, temporary.status) == (454, "4.7.0")
    assert userdb.SENDER_NOT_OWNED.code == 553 and userdb.SENDER_NOT_OWNED.status == "5.7.1"


@pytest.mark.parametrize(("address", "owned"), [
    ("alice@example.org", True),
    ("Alice@Example.ORG", True),
    ("alice+lists@example.org", True),
    ("sales@example.net", True),          # @example.net
    ("anyone@EXAMPLE.net", True),
    ("info@bücher.example", True),        # listed as its A-label
    ("info@xn--bcher-kva.example", True),
    ("", True),                           # the null sender
    ("bob@example.org", False),
    ("alice@example.org.evil.test", False),
    ("alice@sub.example.net", False),
    ("alicex@example.org", False),
])
def test_owns_address(address: str, owned: bool) -> None:
    entries = frozenset(normalize_sender(e) for e in (
        "alice@example.org", "@example.net", "info@BÜCHER.example"))
    assert owns_address(entries, address) is owned


def test_owns_address_without_subaddressing() -> None:
    owned = frozenset({"alice@example.org"})
    assert not owns_address(owned, "alice+x@example.org", delimiter="")
    assert owns_address(owned, "alice-x@example.org", delimiter="-")


def test_normalize_sender() -> None:
    assert normalize_sender(" Alice@Example.ORG ") == "alice@example.org"
    assert normalize_sender("@BÜCHER.example") == "@xn--bcher-kva.example"
    assert normalize_sender("not an address") == "not an address"


# --- the file table -----------------------------------------------------------------

@pytest.fixture
def table(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    add_user(str(path), "alice@example.org", "alice-pw", ["alias@example.org", "@example.net"],
             hasher=FAST)
    add_user(str(path), "bob", "bob-pw", ["bob@example.org"], hasher=FAST)
    return path


def test_file_users_check_passwords(table: Path) -> None:
    users = FileUsers(str(table))
    assert run(users.authenticate("alice@example.org", "alice-pw")) == AuthOutcome.success(
        "alice@example.org")
    assert run(users.authenticate("bob", "bob-pw")).ok
    assert run(users.authenticate("bob", "alice-pw")).status is AuthStatus.BAD_CREDENTIALS


def test_logins_are_case_insensitive_and_come_back_as_stored(table: Path) -> None:
    outcome = run(FileUsers(str(table)).authenticate("ALICE@Example.org", "alice-pw"))
    assert outcome == AuthOutcome.success("alice@example.org")


def test_an_unknown_user_looks_like_a_wrong_password_and_costs_a_check(
        table: Path, checks: Checks) -> None:
    users = FileUsers(str(table))
    wrong = run(users.authenticate("bob", "guess"))
    unknown = run(users.authenticate("mallory", "guess"))
    assert wrong.status is unknown.status is AuthStatus.BAD_CREDENTIALS
    assert wrong.reply == unknown.reply and wrong.login == unknown.login == ""
    # bob's hash has cheaper parameters than the dummy's: his check pays for the dummy too
    assert len(checks.calls) == 3
    assert checks.stored()[1:] == [userdb.dummy_hash()] * 2
    assert checks.stored()[1].startswith("{ARGON2ID}$argon2id$v=19$m=65536")


SHA_CRYPT = ("{SHA512-CRYPT}$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJu"
             "esI68u4OTLiBFdcbYEdFCoEOfaS35inz1")   # Hello world!


@pytest.mark.parametrize("stored", [
    SHA_CRYPT,
    bcrypt.hashpw(b"Hello world!", bcrypt.gensalt(4)).decode(),
    hash_password("Hello world!", FAST),                     # argon2id, older parameters
    "!" + hash_password("Hello world!", FAST),               # a locked account
], ids=["sha512-crypt", "bcrypt", "argon2id-cheap", "locked"])
@pytest.mark.parametrize("password", ["Hello world!", "guess"])
def test_every_check_costs_at_least_the_dummy_argon2id_check(
        checks: Checks, stored: str, password: str) -> None:
    """AUTH timing must not tell which logins exist: a known user whose hash may be
    cheaper than the dummy an unknown user costs pays for the dummy too (counted)."""
    userdb.judge("bob", stored, password)
    assert checks.stored() == [stored, userdb.dummy_hash()]
    checks.calls.clear()
    userdb.judge("mallory", None, password)
    assert checks.stored() == [userdb.dummy_hash()]


def test_a_current_argon2id_hash_is_checked_once(checks: Checks) -> None:
    stored = hash_password("pw")   # the dummy's own parameters: as dear as it
    assert userdb.judge("bob", stored, "pw").ok
    assert userdb.judge("bob", stored, "guess").status is AuthStatus.BAD_CREDENTIALS
    assert checks.stored() == [stored, stored]


def test_password_checks_run_off_the_event_loop(table: Path, checks: Checks) -> None:
    async def main() -> str:
        await FileUsers(str(table)).authenticate("bob", "bob-pw")
        return threading.current_thread().name

    loop_thread = run(main())
    assert checks.calls and all(thread != loop_thread and thread.startswith("tayori-auth")
                                for _, thread in checks.calls)


@pytest.mark.parametrize(("login", "password"), [
    ("bob", ""), ("", "pw"), ("bob\x00admin", "bob-pw"), ("bob", "bob-pw\r\n"),
])
def test_empty_or_malformed_credentials_fail_without_asking(
        table: Path, checks: Checks, login: str, password: str) -> None:
    outcome = run(FileUsers(str(table)).authenticate(login, password))
    assert outcome.status is AuthStatus.BAD_CREDENTIALS
    assert checks.calls == []


def test_a_locked_account_fails_is_logged_and_costs_the_same(
        tmp_path: Path, checks: Checks, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "users"
    path.write_text(f"carol:!{hash_password('pw', FAST)}\n")
    outcome = run(FileUsers(str(path)).authenticate("carol", "pw"))
    assert outcome.status is AuthStatus.BAD_CREDENTIALS
    assert userdb.dummy_hash() in checks.stored()
    assert any(r.getMessage() == "auth-hash-unusable" for r in caplog.records)


def test_a_missing_table_is_a_temporary_failure(tmp_path: Path) -> None:
    users = FileUsers(str(tmp_path / "absent"))
    assert run(users.authenticate("bob", "pw")).status is AuthStatus.TEMPORARY
    with pytest.raises(DirectoryUnavailable):
        run(users.sender_addresses("bob"))


def test_the_table_is_read_again_when_it_changes(table: Path) -> None:
    users = FileUsers(str(table))
    assert run(users.authenticate("bob", "bob-pw")).ok
    set_password(str(table), "bob", "new-pw", hasher=FAST)      # rename: a new inode
    assert run(users.authenticate("bob", "new-pw")).ok
    assert not run(users.authenticate("bob", "bob-pw")).ok
    # Edited in place, same size, by hand: the mtime says so.
    text = table.read_text()
    table.write_text(text.replace("bob:", "bbb:"))
    stamp = table.stat().st_mtime_ns + 1_000_000_000
    os.utime(table, ns=(stamp, stamp))
    assert not run(users.authenticate("bob", "new-pw")).ok
    assert run(users.authenticate("bbb", "new-pw")).ok


def test_an_unreadable_table_keeps_the_last_good_copy(
        table: Path, caplog: pytest.LogCaptureFixture) -> None:
    users = FileUsers(str(table))
    assert run(users.authenticate("bob", "bob-pw")).ok
    table.unlink()
    assert run(users.authenticate("bob", "bob-pw")).ok
    assert any(r.getMessage() == "table-unreadable" for r in caplog.records)


def test_malformed_lines_are_skipped_and_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "users"
    good = hash_password("pw", FAST)
    path.write_text(f"# comment\n\nno-colon-here\n:{good}\nbob:{good}\nBOB:{good}x\n")
    users = FileUsers(str(path))
    assert run(users.authenticate("bob", "pw")).ok          # the first bob line counts
    lines = [r for r in caplog.records if r.getMessage() == "user-table-line"]
    assert len(lines) == 3


def test_sender_addresses_from_the_table(table: Path) -> None:
    users = FileUsers(str(table))
    assert run(users.sender_addresses("alice@example.org")) == {
        "alice@example.org", "alias@example.org", "@example.net"}
    assert run(users.sender_addresses("bob")) == {"bob@example.org"}
    assert run(users.sender_addresses("nobody")) == frozenset()
    assert run(may_send_as(users, "alice@example.org", "x@example.net"))
    assert run(may_send_as(users, "alice@example.org", "alice+tag@example.org"))
    assert not run(may_send_as(users, "bob", "alice@example.org"))
    assert run(may_send_as(users, "bob", ""))


def test_a_sender_map_replaces_the_tables_senders(table: Path, tmp_path: Path) -> None:
    senders = tmp_path / "senders"
    senders.write_text("# login: addresses\nBob: bob@example.org, @bob.example\n"
                       "bob: postmaster@example.org\n")
    users = FileUsers(str(table), senders=SenderMap(str(senders)))
    assert run(users.sender_addresses("bob")) == {
        "bob@example.org", "@bob.example", "postmaster@example.org"}
    assert run(users.sender_addresses("alice@example.org")) == {"alice@example.org"}
    senders.write_text("bob: other@example.org\n")
    stamp = senders.stat().st_mtime_ns + 1_000_000_000
    os.utime(senders, ns=(stamp, stamp))
    assert run(users.sender_addresses("bob")) == {"other@example.org"}


def test_an_unreadable_sender_map_is_unavailable(table: Path, tmp_path: Path) -> None:
    users = FileUsers(str(table), senders=SenderMap(str(tmp_path / "absent")))
    with pytest.raises(DirectoryUnavailable):
        run(may_send_as(users, "bob", "bob@example.org"))


# --- editing the table --------------------------------------------------------------

def test_add_writes_a_new_table_mode_0640(tmp_path: Path) -> None:
    path = tmp_path / "users"
    entry = add_user(str(path), "Carol@Example.org", "pw", ["c@example.org"])
    assert entry.login == "carol@example.org"
    assert entry.password_hash.startswith("{ARGON2ID}$argon2id$")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert path.read_text() == f"carol@example.org:{entry.password_hash}:c@example.org\n"
    assert list_users(str(path)) == [entry]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users", "users.lock"]


def test_edits_keep_comments_other_lines_and_the_files_mode(table: Path) -> None:
    table.write_text("# users of example.org\n" + table.read_text() + "garbage line\n")
    table.chmod(0o600)
    before = {e.login: e for e in list_users(str(table))}
    set_senders(str(table), "bob", ["b1@example.org", "@b.example"])
    set_password(str(table), "alice@example.org", "changed", hasher=FAST)
    lines = table.read_text().splitlines()
    assert lines[0] == "# users of example.org" and lines[-1] == "garbage line"
    after = {e.login: e for e in list_users(str(table))}
    assert after["bob"] == UserEntry("bob", before["bob"].password_hash,
                                     ("b1@example.org", "@b.example"))
    assert after["alice@example.org"].senders == before["alice@example.org"].senders
    assert after["alice@example.org"].password_hash != before["alice@example.org"].password_hash
    assert stat.S_IMODE(table.stat().st_mode) == 0o600
    delete_user(str(table), "BOB")
    assert [e.login for e in list_users(str(table))] == ["alice@example.org"]


def test_edit_errors_are_clear(table: Path, tmp_path: Path) -> None:
    with pytest.raises(UserExists, match="already exists"):
        add_user(str(table), "Bob", "pw", hasher=FAST)
    with pytest.raises(NoSuchUser, match="no user carol"):
        set_password(str(table), "carol", "pw", hasher=FAST)
    with pytest.raises(NoSuchUser):
        delete_user(str(table), "carol")
    with pytest.raises(NoSuchUser):
        delete_user(str(tmp_path / "absent"), "carol")
    for login in ("", "a:b", "a b", "#a", "a\x00", " a"):
        with pytest.raises(InvalidEntry):
            add_user(str(table), login, "pw", hasher=FAST)
    with pytest.raises(InvalidEntry):
        add_user(str(table), "dave", "", hasher=FAST)
    with pytest.raises(InvalidEntry):
        add_user(str(table), "dave", "pw", ["a@b,c@d"], hasher=FAST)
    assert list_users(str(tmp_path / "absent")) == []


def test_concurrent_adds_are_all_kept(tmp_path: Path) -> None:
    path = tmp_path / "users"
    threads = [threading.Thread(target=add_user, args=(str(path), f"user{n}", "pw"),
                                kwargs={"hasher": FAST}) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TEST_TIMEOUT)
    assert sorted(e.login for e in list_users(str(path))) == sorted(
        f"user{n}" for n in range(12))


# --- SQLite -------------------------------------------------------------------------

@pytest.fixture
def database(tmp_path: Path) -> Path:
    path = tmp_path / "users.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE users (login TEXT, password TEXT)")
        db.execute("CREATE TABLE senders (login TEXT, address TEXT)")
        db.executemany("INSERT INTO users VALUES (?, ?)", [
            ("alice@example.org", hash_password("alice-pw", FAST)),
            ("bob", "{SHA512-CRYPT}$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBn"
                    "IFNjnQJuesI68u4OTLiBFdcbYEdFCoEOfaS35inz1"),    # Hello world!
            ("twice", hash_password("pw", FAST)), ("twice", hash_password("pw", FAST)),
            ("nopass", None)])
        db.executemany("INSERT INTO senders VALUES (?, ?)", [
            ("bob", "bob@example.org"), ("bob", "b2@example.org, @bob.example")])
    db.close()
    return path


QUERY = "SELECT password FROM users WHERE login = :login"
SENDERS = "SELECT address FROM senders WHERE login = :login"


def test_sqlite_users(database: Path, checks: Checks) -> None:
    users = SqlUsers.sqlite(str(database), QUERY, SENDERS)
    assert run(users.authenticate("alice@example.org", "alice-pw")).ok
    assert run(users.authenticate("bob", "Hello world!")) == AuthOutcome.success("bob")
    wrong = run(users.authenticate("bob", "hello world!"))
    unknown = run(users.authenticate("mallory", "Hello world!"))
    assert wrong.status is unknown.status is AuthStatus.BAD_CREDENTIALS
    assert checks.stored()[-1] == userdb.dummy_hash()
    for login in ("twice", "nopass"):
        assert run(users.authenticate(login, "pw")).status is AuthStatus.BAD_CREDENTIALS
        assert checks.stored()[-1] == userdb.dummy_hash()
    assert run(users.sender_addresses("bob")) == {
        "bob@example.org", "b2@example.org", "@bob.example"}


def test_sqlite_with_a_question_mark_and_without_a_senders_query(database: Path) -> None:
    users = SqlUsers.sqlite(str(database), "SELECT password FROM users WHERE login = ?")
    assert run(users.authenticate("bob", "Hello world!")).ok
    assert run(users.sender_addresses("alice@example.org")) == {"alice@example.org"}
    assert run(users.sender_addresses("bob")) == frozenset()


def test_sqlite_failures_are_temporary(database: Path, tmp_path: Path) -> None:
    missing = SqlUsers.sqlite(str(tmp_path / "absent.db"), QUERY, SENDERS)
    assert run(missing.authenticate("bob", "pw")).status is AuthStatus.TEMPORARY
    with pytest.raises(DirectoryUnavailable):
        run(missing.sender_addresses("bob"))
    broken = SqlUsers.sqlite(str(database), "SELECT password FROM nowhere WHERE x = :login")
    outcome = run(broken.authenticate("bob", "pw"))
    assert outcome.status is AuthStatus.TEMPORARY and "nowhere" in outcome.reason


def test_sqlite_is_read_only(database: Path) -> None:
    users = SqlUsers.sqlite(str(database), "DELETE FROM users WHERE login = :login")
    assert run(users.authenticate("bob", "pw")).status is AuthStatus.TEMPORARY
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT count(*) FROM users WHERE login = 'bob'").fetchone() == (1,)
    db.close()


def test_pyformat_for_postgresql_drivers() -> None:
    assert pyformat("SELECT p FROM u WHERE l = :login AND x LIKE 'a%'") == (
        "SELECT p FROM u WHERE l = %(login)s AND x LIKE 'a%%'")


# --- LDAP without a server ----------------------------------------------------------

@pytest.mark.parametrize(("value", "escaped"), [
    ("alice", "alice"),
    ("*", "\\2a"),
    ("a)(uid=*", "a\\29\\28uid=\\2a"),
    ("back\\slash", "back\\5cslash"),
    ("nul\x00", "nul\\00"),
    ("tab\t", "tab\\09"),
    ("jörg@bücher.example", "jörg@bücher.example"),
])
def test_ldap_filter_values_are_escaped(value: str, escaped: str) -> None:
    assert escape_filter_value(value) == escaped


@given(st.text(max_size=40))
def test_escaped_values_hold_no_filter_syntax(value: str) -> None:
    escaped = escape_filter_value(value)
    assert not any(c in escaped for c in "*()\x00")
    assert escaped.replace("\\5c", "").count("\\") == sum(
        c in "*()" or ord(c) < 0x20 or c == "\x7f" for c in value)


def test_user_filter_templates() -> None:
    template = "(&(objectClass=inetOrgPerson)(|(uid={login})(&(uid={user})(dc={domain}))))"
    assert user_filter(template, "a*b@x.test") == (
        "(&(objectClass=inetOrgPerson)(|(uid=a\\2ab@x.test)(&(uid=a\\2ab)(dc=x.test))))")
    assert user_filter("(uid={user})", "{login}") == "(uid={login})"   # no second round


def test_ldap_down_is_temporary_and_an_empty_password_never_binds() -> None:
    settings = LdapSettings(f"ldap://127.0.0.1:{free_port()}", "dc=example,dc=test",
                            timeout=2)
    users = LdapUsers(settings)
    outcome = run(users.authenticate("alice", "pw"))
    assert outcome.status is AuthStatus.TEMPORARY and "refused" in outcome.reason
    assert run(users.authenticate("alice", "")).status is AuthStatus.BAD_CREDENTIALS
    with pytest.raises(DirectoryUnavailable):
        run(users.sender_addresses("alice"))


# --- Dovecot's protocol against a scripted fake -------------------------------------

HANDSHAKE = ("VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\n"
             "SPID\t4242\nCUID\t7\nCOOKIE\t0123456789abcdef\nDONE\n")


@dataclass
class FakeDovecot:
    """Answers one AUTH per connection with ``answer`` (``{id}`` filled in) after
    sending ``handshake``; records what the client sent."""

    answer: str = "OK\t{id}\tuser=canonical@example.org\n"
    handshake: str = HANDSHAKE
    silent: bool = False
    hang_up: bool = False
    received: list[str] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(self.handshake.encode())
        try:
            while line := (await reader.readline()).decode():
                self.received.append(line.rstrip("\n"))
                if self.hang_up and line.startswith("CPID\t"):
                    break
                if line.startswith("AUTH\t") and not self.silent:
                    writer.write(self.answer.format(id=line.split("\t")[1]).encode())
                    await writer.drain()
        finally:
            writer.close()


def with_fake(fake: FakeDovecot, test: Callable[[str], Coroutine[Any, Any, T]],
              unix: bool = False) -> T:
    async def main(directory: str) -> T:
        if unix:
            address = os.path.join(directory, "auth-client")
            server = await asyncio.start_unix_server(fake.handle, address)
        else:
            server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
            address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with server:
            return await test(address)

    with tempfile.TemporaryDirectory(prefix="tayori-fake-") as directory:
        return run(main(directory))


def authenticate(login: str, password: str, timeout: float = 5.0
                 ) -> Callable[[str], Coroutine[Any, Any, AuthOutcome]]:
    async def test(address: str) -> AuthOutcome:
        return await DovecotAuth(address, timeout=timeout).authenticate(login, password)
    return test


@pytest.mark.parametrize("unix", [False, True])
def test_dovecot_ok_gives_dovecots_user_name(unix: bool) -> None:
    fake = FakeDovecot()
    outcome = with_fake(fake, authenticate("Canonical@Example.org", "pä ss"), unix=unix)
    assert outcome == AuthOutcome.success("canonical@example.org")
    assert fake.received[0] == "VERSION\t1\t2"
    assert fake.received[1].startswith("CPID\t")
    command, request_id, mechanism, *parameters = fake.received[2].split("\t")
    assert (command, mechanism) == ("AUTH", "PLAIN") and request_id.isdigit()
    assert {"service=smtp", "nologin", "secured", "no-penalty"} <= set(parameters)
    response = next(p for p in parameters if p.startswith("resp="))[5:]
    assert base64.b64decode(response) == "\0Canonical@Example.org\0pä ss".encode()


@pytest.mark.parametrize(("answer", "status"), [
    ("FAIL\t{id}\tuser=x@example.org\n", AuthStatus.BAD_CREDENTIALS),
    ("FAIL\t{id}\n", AuthStatus.BAD_CREDENTIALS),
    ("FAIL\t{id}\tuser=x\tcode=temp_fail\n", AuthStatus.TEMPORARY),
    ("FAIL\t{id}\ttemp\treason=backend down\n", AuthStatus.TEMPORARY),
    ("FAIL\t999\nOK\t{id}\n", AuthStatus.OK),               # another request's line
    ("CONT\t{id}\t\n", AuthStatus.TEMPORARY),
    ("nonsense\n", AuthStatus.TEMPORARY),
])
def test_dovecot_answers(answer: str, status: AuthStatus) -> None:
    outcome = with_fake(FakeDovecot(answer=answer), authenticate("x@example.org", "pw"))
    assert outcome.status is status
    if status is AuthStatus.OK:
        assert outcome.login == "x@example.org"


@pytest.mark.parametrize(("handshake", "words"), [
    (HANDSHAKE.replace("VERSION\t1\t2", "VERSION\t2\t0"), "version 2"),
    (HANDSHAKE.replace("MECH\tPLAIN\tplaintext\n", ""), "PLAIN"),
    ("VERSION\t1\t2\n", "0 bytes read"),                     # closed before DONE
])
def test_dovecot_handshake_problems_are_temporary(handshake: str, words: str) -> None:
    fake = FakeDovecot(handshake=handshake, hang_up="DONE" not in handshake)
    outcome = with_fake(fake, authenticate("x", "pw"))
    assert outcome.status is AuthStatus.TEMPORARY
    assert words in outcome.reason


def test_dovecot_silence_times_out_as_temporary() -> None:
    outcome = with_fake(FakeDovecot(silent=True), authenticate("x", "pw", timeout=0.3))
    assert outcome.status is AuthStatus.TEMPORARY and "timed out" in outcome.reason


def test_dovecot_down_is_temporary_and_senders_need_no_server() -> None:
    directory = DovecotAuth(f"127.0.0.1:{free_port()}", timeout=2)
    assert run(directory.authenticate("x", "pw")).status is AuthStatus.TEMPORARY
    assert run(directory.sender_addresses("x@example.org")) == {"x@example.org"}
    assert run(directory.authenticate("x", "")).status is AuthStatus.BAD_CREDENTIALS


def test_dovecot_tab_escaping() -> None:
    assert unescape("a\x01tb\x01nc\x011\x010") == "a\tb\nc\x01\x00"
    assert parse_reply("OK\t3\tuser=a\x01tb\tflag").parameters == {"user": "a\tb", "flag": ""}


def test_ldap_tls_with_a_missing_ca_file_fails_at_start() -> None:
    settings = LdapSettings("ldap://127.0.0.1:1", "dc=x", start_tls=True,
                            ca_file="/nonexistent/ca.pem")
    with pytest.raises(OSError):
        LdapUsers(settings)
