"""The user directories against real servers, and tayori's hashes against other programs.

- LDAP: a private OpenLDAP slapd from Debian (:class:`peers_auth.Slapd`) with a few
  inetOrgPerson users: search (as a service account, or anonymously) + bind, filter
  escaping against real entries, an ambiguous filter, StartTLS with the server's own CA,
  and the server down.
- Dovecot: a private Dovecot auth service (:class:`peers_auth.DovecotAuthServer`) over
  its unix socket and TCP: good, wrong and unknown logins, a temporary passdb failure,
  the server down; Dovecot verifies an argon2id hash made by tayori.
- PostgreSQL: a private cluster (:class:`peers_auth.PostgresServer`) holding users with
  argon2id, bcrypt and SHA512-CRYPT hashes and their senders, reached over TCP with a
  password and over its unix socket: good, wrong and unknown logins, the login bound
  as a parameter, read-only sessions, the statement timeout, refused service logins
  (the password never in the reason), many at once, the server down and back.
- Hashes made by Dovecot's ``doveadm pw`` (SHA512-CRYPT, SHA256-CRYPT with rounds,
  BLF-CRYPT, ARGON2I/ID) and by ``openssl passwd`` verify with tayori's own code.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import string
import subprocess
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import bcrypt
import pytest

from harness import which_peer
from peers_auth import DovecotAuthServer, LdapUser, PostgresServer, Slapd, doveadm_pw
from tayori.policy import userdb
from tayori.policy.passwords import (
    Verification,
    check_password,
    hash_password,
    sha_crypt,
    verify_password,
)
from tayori.policy.userdb import (
    AuthOutcome,
    AuthStatus,
    DirectoryUnavailable,
    UserDirectory,
    may_send_as,
)
from tayori.policy.userdb_dovecot import DovecotAuth
from tayori.policy.userdb_ldap import LdapSettings, LdapUsers
from tayori.policy.userdb_pg import PostgresSource
from tayori.policy.userdb_sql import SqlUsers

pytestmark = pytest.mark.peer

T = TypeVar("T")
TEST_TIMEOUT = 30.0
LDAP_TIMEOUT = 5.0


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, TEST_TIMEOUT))


def assert_failures_alike(directory: UserDirectory, wrong: tuple[str, str],
                          unknown: tuple[str, str]) -> None:
    """A wrong password and an unknown user (login, password) fail alike (RFC 4954 §6)."""
    wrong_outcome = run(directory.authenticate(*wrong))
    unknown_outcome = run(directory.authenticate(*unknown))
    assert wrong_outcome.status is unknown_outcome.status is AuthStatus.BAD_CREDENTIALS
    assert wrong_outcome.reply == unknown_outcome.reply


def assert_senders(directory: UserDirectory, login: str, owned: set[str], *,
                   may: str, may_not: str) -> None:
    """``login`` owns exactly ``owned``, may send as ``may`` and not as ``may_not``; an
    unknown login owns nothing."""
    assert run(directory.sender_addresses(login)) == owned
    assert run(may_send_as(directory, login, may))
    assert not run(may_send_as(directory, login, may_not))
    assert run(directory.sender_addresses("mallory")) == frozenset()


def at_once(directory: UserDirectory, attempts: list[tuple[str, str]]) -> list[bool]:
    """Whether each (login, password) of ``attempts`` logs in, all asked at once."""
    async def main() -> list[AuthOutcome]:
        return await asyncio.gather(*(directory.authenticate(login, password)
                                      for login, password in attempts))

    return [outcome.ok for outcome in run(main())]


# --- LDAP ---------------------------------------------------------------------------

LDAP_USERS = {
    "alice": LdapUser("alice-pw", ("alice@example.test", "sales@example.test")),
    "bob": LdapUser("bob pw ü", ("bob@example.test",)),
    "a*b": LdapUser("star-pw"),
    "nopass": LdapUser(None, ("nopass@example.test",)),
    "twin": LdapUser("twin-pw"),
}
TWIN_IN_STAFF = """dn: uid=twin,ou=staff,dc=example,dc=test
objectClass: inetOrgPerson
uid: twin
cn: twin
sn: twin
userPassword: twin-pw
"""


@pytest.fixture(scope="module")
def slapd() -> Iterator[Slapd]:
    with Slapd(LDAP_USERS, extra_ldif=TWIN_IN_STAFF) as server:
        yield server


@pytest.fixture(scope="module")
def slapd_tls() -> Iterator[Slapd]:
    with Slapd({"carol": LdapUser("carol-pw", ("carol@example.test",))}, tls=True,
               anonymous_search=True) as server:
        yield server


def reader(slapd: Slapd, **changes: Any) -> LdapUsers:
    """The directory as the service account sees it, with ``changes`` to its settings."""
    settings = LdapSettings(slapd.url, slapd.suffix, bind_dn=slapd.reader_dn,
                            bind_password=slapd.reader_password, timeout=LDAP_TIMEOUT)
    return LdapUsers(dataclasses.replace(settings, **changes))


def test_ldap_search_and_bind(slapd: Slapd) -> None:
    users = reader(slapd)
    assert run(users.authenticate("alice", "alice-pw")) == AuthOutcome.success("alice")
    assert run(users.authenticate("bob", "bob pw ü")).ok
    assert run(users.authenticate("a*b", "star-pw")).ok


def test_ldap_unknown_user_and_wrong_password_look_the_same_and_both_bind(
        slapd: Slapd, monkeypatch: pytest.MonkeyPatch) -> None:
    users = reader(slapd)
    binds: list[str] = []
    real_bind = users._bind

    def spy(dn: str, password: str) -> bool:
        binds.append(dn)
        return real_bind(dn, password)

    monkeypatch.setattr(users, "_bind", spy)
    assert_failures_alike(users, ("alice", "alice-PW"), ("mallory", "alice-pw"))
    assert len(binds) == 2 and binds[0] == slapd.dn("alice")


@pytest.mark.parametrize("login", [
    "*", "a*", "alice)(uid=*", "*)(objectClass=*", "alice\\", "twin", "nopass",
])
def test_ldap_refuses_wildcards_injections_ambiguity_and_entries_without_a_password(
        slapd: Slapd, login: str) -> None:
    users = reader(slapd)
    for password in ("alice-pw", "twin-pw", "star-pw", "x"):
        outcome = run(users.authenticate(login, password))
        assert outcome.status is AuthStatus.BAD_CREDENTIALS, (login, password, outcome)


def test_ldap_an_empty_password_is_not_an_anonymous_bind(slapd: Slapd) -> None:
    assert run(reader(slapd).authenticate("alice", "")).status is AuthStatus.BAD_CREDENTIALS


def test_ldap_sender_addresses_from_the_mail_attribute(slapd: Slapd) -> None:
    assert_senders(reader(slapd), "alice", {"alice@example.test", "sales@example.test"},
                   may="Sales+x@EXAMPLE.test", may_not="bob@example.test")


def test_ldap_filter_with_user_and_domain(slapd: Slapd) -> None:
    users = reader(slapd, filter="(&(objectClass=inetOrgPerson)(uid={user}))")
    assert run(users.authenticate("alice@anything.test", "alice-pw")).ok


def test_ldap_anonymous_search_denied_or_service_bind_refused_is_temporary(
        slapd: Slapd) -> None:
    anonymous = reader(slapd, bind_dn="", bind_password="")
    outcome = run(anonymous.authenticate("alice", "alice-pw"))
    assert outcome.status is AuthStatus.TEMPORARY and "noSuchObject" in outcome.reason
    refused = reader(slapd, bind_password="wrong")
    outcome = run(refused.authenticate("alice", "alice-pw"))
    assert outcome.status is AuthStatus.TEMPORARY and "service bind" in outcome.reason
    with pytest.raises(DirectoryUnavailable):
        run(refused.sender_addresses("alice"))


def test_ldap_many_at_once(slapd: Slapd) -> None:
    attempts = [("alice", "alice-pw" if n % 2 else "x") for n in range(20)]
    assert at_once(reader(slapd), attempts) == [n % 2 == 1 for n in range(20)]


def test_ldap_starttls_with_the_servers_ca(slapd_tls: Slapd) -> None:
    settings = LdapSettings(slapd_tls.url, slapd_tls.suffix, start_tls=True,
                            ca_file=str(slapd_tls.ca_path), timeout=LDAP_TIMEOUT)
    users = LdapUsers(settings)
    assert run(users.authenticate("carol", "carol-pw")).ok
    assert run(users.authenticate("carol", "wrong")).status is AuthStatus.BAD_CREDENTIALS
    assert run(users.sender_addresses("carol")) == {"carol@example.test"}


def test_ldap_starttls_with_an_untrusted_certificate_is_temporary(slapd_tls: Slapd) -> None:
    settings = LdapSettings(slapd_tls.url, slapd_tls.suffix, start_tls=True,
                            timeout=LDAP_TIMEOUT)
    outcome = run(LdapUsers(settings).authenticate("carol", "carol-pw"))
    assert outcome.status is AuthStatus.TEMPORARY
    assert "CERTIFICATE_VERIFY_FAILED" in outcome.reason


def test_ldap_server_down_is_temporary() -> None:
    server = Slapd({"dora": LdapUser("dora-pw")}, anonymous_search=True).start()
    settings = LdapSettings(server.url, server.suffix, timeout=LDAP_TIMEOUT)
    users = LdapUsers(settings)
    try:
        assert run(users.authenticate("dora", "dora-pw")).ok
    finally:
        server.stop()
    outcome = run(users.authenticate("dora", "dora-pw"))
    assert outcome.status is AuthStatus.TEMPORARY
    with pytest.raises(DirectoryUnavailable):
        run(users.sender_addresses("dora"))


# --- Dovecot ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dovecot() -> Iterator[DovecotAuthServer]:
    users = {
        "carol@dove.test": doveadm_pw("SHA512-CRYPT", "carol-pw"),
        "dave@dove.test": hash_password("dave-pw"),
        "erin@dove.test": doveadm_pw("BLF-CRYPT", "erin pw ü"),
    }
    with DovecotAuthServer(users) as server:
        yield server


@pytest.mark.parametrize("over", ["unix", "tcp"])
def test_dovecot_auth(dovecot: DovecotAuthServer, over: str) -> None:
    address = str(dovecot.socket_path) if over == "unix" else dovecot.address
    directory = DovecotAuth(address, timeout=10)
    assert run(directory.authenticate("carol@dove.test", "carol-pw")) == AuthOutcome.success(
        "carol@dove.test")
    assert run(directory.authenticate("erin@dove.test", "erin pw ü")).ok
    assert_failures_alike(directory, ("carol@dove.test", "dave-pw"),
                          ("mallory@dove.test", "carol-pw"))


def test_dovecot_verifies_an_argon2id_hash_made_by_tayori(dovecot: DovecotAuthServer) -> None:
    directory = DovecotAuth(str(dovecot.socket_path), timeout=10)
    assert run(directory.authenticate("dave@dove.test", "dave-pw")).ok
    assert not run(directory.authenticate("dave@dove.test", "dave-PW")).ok


def test_dovecot_many_at_once(dovecot: DovecotAuthServer) -> None:
    directory = DovecotAuth(str(dovecot.socket_path), timeout=10)
    assert all(at_once(directory, [("carol@dove.test", "carol-pw")] * 20))


def test_dovecot_temporary_passdb_failure() -> None:
    with DovecotAuthServer({}, tempfail=True) as server:
        outcome = run(DovecotAuth(server.address, timeout=10).authenticate("x@dove.test", "pw"))
    assert outcome.status is AuthStatus.TEMPORARY


def test_dovecot_down_is_temporary() -> None:
    server = DovecotAuthServer({"f@dove.test": doveadm_pw("SHA512-CRYPT", "pw")}).start()
    address = str(server.socket_path)
    try:
        assert run(DovecotAuth(address, timeout=10).authenticate("f@dove.test", "pw")).ok
        # Keep the directory: the socket file stays, nobody listens behind it.
        server.keep = True
        server.stop()
        outcome = run(DovecotAuth(address, timeout=10).authenticate("f@dove.test", "pw"))
        assert outcome.status is AuthStatus.TEMPORARY
    finally:
        server.keep = False
        server.stop()


# --- PostgreSQL ---------------------------------------------------------------------

PG_PASSWORD = "pg service pw"
PG_QUERY = "SELECT password FROM users WHERE login = :login"
PG_SENDERS = "SELECT address FROM senders WHERE login = :login ORDER BY address"
SHA512_HELLO = ("{SHA512-CRYPT}$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBn"
                "IFNjnQJuesI68u4OTLiBFdcbYEdFCoEOfaS35inz1")   # "Hello world!" (Drepper)


def pg_user_rows() -> list[tuple[str, str | None]]:
    return [
        ("alice@pg.test", hash_password("alice-pw")),                        # argon2id
        ("bob", "{BLF-CRYPT}" + bcrypt.hashpw("bob pw ü".encode(), bcrypt.gensalt(4)).decode()),
        ("carol", SHA512_HELLO),
        ("o'brien", hash_password("quote-pw")),
        ("twice", hash_password("pw")), ("twice", hash_password("pw")),
        ("nopass", None),
    ]


PG_SENDER_ROWS = [("bob", "bob@pg.test"), ("bob", "b2@pg.test, @bob.pg.test"),
                  ("alice@pg.test", "Sales@PG.test")]


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """One cluster for the module: database ``mail``, role ``tayori`` (password
    :data:`PG_PASSWORD`) that may only read ``users`` and ``senders``."""
    with PostgresServer() as server:
        server.execute(f"CREATE ROLE tayori LOGIN PASSWORD '{PG_PASSWORD}'")
        server.execute("CREATE DATABASE mail")
        server.execute("CREATE TABLE users (login text NOT NULL, password text);"
                       "CREATE TABLE senders (login text NOT NULL, address text NOT NULL);"
                       "GRANT SELECT ON users, senders TO tayori", dbname="mail")
        server.execute("INSERT INTO users VALUES (%s, %s)", dbname="mail", many=pg_user_rows())
        server.execute("INSERT INTO senders VALUES (%s, %s)", dbname="mail",
                       many=PG_SENDER_ROWS)
        yield server


@contextlib.contextmanager
def pg_users(postgres: PostgresServer, query: str = PG_QUERY, *, senders: str = PG_SENDERS,
             over: str = "tcp", password: str = PG_PASSWORD, timeout: float = 5.0
             ) -> Iterator[SqlUsers]:
    users = SqlUsers.postgres(
        postgres.conninfo("tayori", password if over == "tcp" else "", "mail", over),
        query, senders, timeout=timeout)
    try:
        yield users
    finally:
        users.close()


@pytest.mark.parametrize("over", ["tcp", "unix"])
def test_postgres_users(postgres: PostgresServer, over: str,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    checked: list[str] = []

    def spy(stored: str, password: str) -> Verification:
        checked.append(stored)
        return check_password(stored, password)

    monkeypatch.setattr(userdb, "check_password", spy)
    with pg_users(postgres, over=over) as users:
        assert run(users.authenticate("alice@pg.test", "alice-pw")) == AuthOutcome.success(
            "alice@pg.test")
        assert run(users.authenticate("bob", "bob pw ü")).ok
        assert run(users.authenticate("carol", "Hello world!")).ok
        assert run(users.authenticate("o'brien", "quote-pw")).ok
        assert_failures_alike(users, ("carol", "hello world!"), ("mallory", "Hello world!"))
        assert checked[-1] == userdb.dummy_hash()
        for login in ("twice", "nopass", "Carol"):
            assert run(users.authenticate(login, "pw")).status is AuthStatus.BAD_CREDENTIALS
            assert checked[-1] == userdb.dummy_hash()
        assert run(users.sender_addresses("alice@pg.test")) == {"alice@pg.test",
                                                                "sales@pg.test"}
        assert_senders(users, "bob", {"bob@pg.test", "b2@pg.test", "@bob.pg.test"},
                       may="anyone@bob.pg.test", may_not="alice@pg.test")


def test_postgres_binds_the_login_as_a_parameter(postgres: PostgresServer) -> None:
    # ``%`` in the query and a ``::`` cast stay as they are; the login is never SQL.
    query = ("SELECT password FROM users WHERE login = :login::text "
             "AND coalesce(password, '') NOT LIKE '%plain%'")
    with pg_users(postgres, query) as users:
        assert run(users.authenticate("carol", "Hello world!")).ok
        for login in ("' OR '1'='1", "carol' --", "%", "carol'; DROP TABLE users; --"):
            outcome = run(users.authenticate(login, "Hello world!"))
            assert outcome.status is AuthStatus.BAD_CREDENTIALS, (login, outcome)
    assert postgres.execute("SELECT count(*) FROM users", dbname="mail") == [(7,)]


def test_postgres_sessions_are_read_only(postgres: PostgresServer) -> None:
    # Even a role allowed to write (here the superuser) cannot: the sessions are read-only.
    source = PostgresSource(postgres.conninfo(dbname="mail"))
    users = SqlUsers(source, "DELETE FROM users WHERE login = :login RETURNING password")
    try:
        outcome = run(users.authenticate("carol", "Hello world!"))
    finally:
        users.close()
    assert outcome.status is AuthStatus.TEMPORARY
    assert "read-only transaction" in outcome.reason
    assert postgres.execute("SELECT count(*) FROM users WHERE login = 'carol'",
                            dbname="mail") == [(1,)]


def test_postgres_failures_are_temporary_and_never_show_the_password(
        postgres: PostgresServer) -> None:
    with pg_users(postgres, password="not the pw ü") as refused:
        outcome = run(refused.authenticate("carol", "Hello world!"))
        assert outcome.status is AuthStatus.TEMPORARY
        assert "password authentication failed" in outcome.reason
        assert "not the pw" not in outcome.reason
        assert f"port={postgres.port}" in outcome.reason and "user=tayori" in outcome.reason
        with pytest.raises(DirectoryUnavailable) as caught:
            run(refused.sender_addresses("bob"))
        assert "not the pw" not in str(caught.value)
    with pg_users(postgres, "SELECT password FROM nowhere WHERE login = :login") as broken:
        outcome = run(broken.authenticate("carol", "Hello world!"))
        assert outcome.status is AuthStatus.TEMPORARY and "nowhere" in outcome.reason
    with pg_users(postgres, "SELECT secret FROM pg_authid WHERE rolname = :login") as nosy:
        assert run(nosy.authenticate("tayori", PG_PASSWORD)).status is AuthStatus.TEMPORARY


def test_postgres_statement_timeout(postgres: PostgresServer) -> None:
    query = "SELECT password FROM users, pg_sleep(3) WHERE login = :login"
    with pg_users(postgres, query, timeout=0.5) as users:
        outcome = run(users.authenticate("carol", "Hello world!"))
    assert outcome.status is AuthStatus.TEMPORARY and "statement timeout" in outcome.reason


def test_postgres_many_at_once_share_a_few_connections(postgres: PostgresServer) -> None:
    with pg_users(postgres) as users:
        attempts = [("carol", "Hello world!" if n % 2 else "x") for n in range(24)]
        assert at_once(users, attempts) == [n % 2 == 1 for n in range(24)]
        sessions = postgres.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'tayori'")[0][0]
        assert 1 <= sessions <= userdb.VERIFY_THREADS
    wait_closed = postgres.wait_for(lambda: postgres.execute(
        "SELECT count(*) = 0 FROM pg_stat_activity WHERE usename = 'tayori'")[0][0],
        what="tayori's sessions to close")
    assert wait_closed


def test_postgres_restarted_down_and_back(postgres: PostgresServer) -> None:
    with pg_users(postgres) as users:
        assert run(users.authenticate("carol", "Hello world!")).ok    # a kept connection
        postgres.halt()
        postgres.start()
        # The kept connection is dead: dropped, and the query tried on a new one.
        assert run(users.authenticate("carol", "Hello world!")).ok
        postgres.halt()
        try:
            outcome = run(users.authenticate("carol", "Hello world!"))
            assert outcome.status is AuthStatus.TEMPORARY
            with pytest.raises(DirectoryUnavailable):
                run(users.sender_addresses("bob"))
        finally:
            postgres.start()
        assert run(users.authenticate("bob", "bob pw ü")).ok


# --- hashes made by other programs --------------------------------------------------

@pytest.mark.parametrize(("scheme", "options"), [
    ("SHA512-CRYPT", ()), ("SHA256-CRYPT", ()), ("SHA512-CRYPT", ("-r", "7000")),
    ("SHA256-CRYPT", ("-r", "1000")), ("BLF-CRYPT", ()), ("BLF-CRYPT", ("-r", "5")),
    ("ARGON2ID", ()), ("ARGON2I", ()),
])
def test_hashes_made_by_doveadm_verify(scheme: str, options: tuple[str, ...]) -> None:
    for password in ("secret", "pässwörd with spaces", "x" * 80):
        result = subprocess.run([which_peer("doveadm"), "pw", "-s", scheme, *options,
                                 "-p", password], capture_output=True, text=True,
                                timeout=60, check=True)
        stored = result.stdout.strip()
        assert stored.startswith("{" + scheme + "}")
        if options and options[0] == "-r" and "CRYPT" in scheme and scheme != "BLF-CRYPT":
            assert f"rounds={options[1]}$" in stored
        assert verify_password(stored, password), stored
        if len(password.encode()) < 72 or scheme != "BLF-CRYPT":   # bcrypt reads 72
            assert not verify_password(stored, password + "!"), stored


def test_sha_crypt_agrees_with_openssl_passwd() -> None:
    openssl = which_peer("openssl")
    chooser = random.Random(5)
    alphabet = string.ascii_letters + string.digits + "./"
    for n in range(24):
        password = "".join(chooser.choice(string.printable[:94]) for _ in range(1 + n % 20))
        salt = "".join(chooser.choice(alphabet) for _ in range(1 + n % 16))
        flag = "-6" if n % 2 else "-5"
        variant = "SHA512-CRYPT" if n % 2 else "SHA256-CRYPT"
        setting = f"rounds={1000 + 37 * n}${salt}" if n % 3 == 0 else salt
        result = subprocess.run([openssl, "passwd", flag, "-salt", setting, "-stdin"],
                                input=password + "\n", capture_output=True, text=True,
                                timeout=30, check=True)
        expected = result.stdout.strip()
        head = f"${flag[1]}$"
        assert sha_crypt(password.encode(), (head + setting).encode(), variant).decode() \
            == expected, (password, setting)
        assert verify_password(expected, password)
