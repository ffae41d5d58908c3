"""The PostgreSQL source of the SQL user directory without a server: the placeholder
conversion, the connection parameters, the mapping of errors to a temporary failure
(never showing the password), and the connection reuse (fake connections).
The real server is in tests/integration/test_userdb_peers.py."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, TypeVar

import psycopg
import pytest

from harness import free_port
from tayori.policy.userdb import AuthStatus, DirectoryUnavailable
from tayori.policy.userdb_pg import PostgresSource, default_params, label_of
from tayori.policy.userdb_sql import SqlUsers, pyformat

T = TypeVar("T")
QUERY = "SELECT password FROM users WHERE login = :login"


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, 20))


# --- placeholders and parameters ----------------------------------------------------

@pytest.mark.parametrize(("query", "converted"), [
    (QUERY, "SELECT password FROM users WHERE login = %(login)s"),
    ("SELECT p FROM u WHERE l = :login OR alias = :login",
     "SELECT p FROM u WHERE l = %(login)s OR alias = %(login)s"),
    ("SELECT p FROM u WHERE l = :login::text AND p LIKE '{%'",
     "SELECT p FROM u WHERE l = %(login)s::text AND p LIKE '{%%'"),
    ("SELECT p FROM u WHERE l::login = x", "SELECT p FROM u WHERE l::login = x"),
    ("SELECT p FROM u WHERE l = :login_name", "SELECT p FROM u WHERE l = :login_name"),
    ("SELECT p FROM u WHERE l = %s", "SELECT p FROM u WHERE l = %%s"),
])
def test_login_becomes_psycopgs_named_placeholder(query: str, converted: str) -> None:
    assert pyformat(query) == converted


def test_queries_without_login_are_refused() -> None:
    with pytest.raises(ValueError, match="password_query"):
        SqlUsers.postgres("dbname=mail", "SELECT password FROM users WHERE login = ?")
    with pytest.raises(ValueError, match="senders_query"):
        SqlUsers.postgres("dbname=mail", QUERY, "SELECT address FROM senders WHERE x::login")
    assert SqlUsers.postgres("dbname=mail", QUERY).senders_query == ""


@pytest.mark.parametrize("conninfo", [
    "host=db secret-pw", "nonsense=1", "postgresql://u:secret-pw@[db/mail",
])
def test_an_unparsable_conninfo_is_refused_without_quoting_it(conninfo: str) -> None:
    with pytest.raises(ValueError, match="cannot be parsed") as caught:
        PostgresSource(conninfo)
    assert "secret-pw" not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


@pytest.mark.parametrize(("conninfo", "label"), [
    ("host=/run/postgresql dbname=mail user=tayori password=secret-pw",
     "postgresql host=/run/postgresql dbname=mail user=tayori"),
    ("postgresql://tayori:secret-pw@db.example:5433/mail",
     "postgresql host=db.example port=5433 dbname=mail user=tayori"),
    ("", "postgresql (libpq defaults)"),
])
def test_the_label_names_the_server_never_the_password(conninfo: str, label: str) -> None:
    assert PostgresSource(conninfo).label == label
    assert label_of({"password": "secret-pw"}) == "postgresql (libpq defaults)"


def test_timeouts_follow_the_timeout_unless_the_conninfo_sets_them() -> None:
    assert default_params(0.5)["connect_timeout"] == "2"          # libpq: 2 s at least
    assert default_params(7.2)["connect_timeout"] == "8"
    assert default_params(7.2)["tcp_user_timeout"] == "7200"
    source = PostgresSource("dbname=mail connect_timeout=30 application_name=mine", 3)
    assert source._params["connect_timeout"] == "30"
    assert source._params["application_name"] == "mine"
    assert source._params["keepalives_idle"] == "3"


# --- errors -------------------------------------------------------------------------

def test_nobody_listening_is_temporary_and_the_password_stays_out() -> None:
    port = free_port()
    users = SqlUsers.postgres(f"host=127.0.0.1 port={port} dbname=mail user=tayori "
                              "password=secret-pw", QUERY, QUERY.replace("password", "address"))
    try:
        outcome = run(users.authenticate("bob", "pw"))
        assert outcome.status is AuthStatus.TEMPORARY
        assert outcome.reason.startswith(f"postgresql host=127.0.0.1 port={port} dbname=mail")
        assert "secret-pw" not in outcome.reason and "\n" not in outcome.reason
        with pytest.raises(DirectoryUnavailable, match="refused"):
            run(users.sender_addresses("bob"))
    finally:
        users.close()


# --- connection reuse, with fake connections ----------------------------------------

IDLE = psycopg.pq.TransactionStatus.IDLE


@dataclass
class FakeConnection:
    """Answers ``execute`` with ``rows`` or raises ``error`` (``breaks``: and is broken)."""

    rows: list[tuple[Any, ...]] = field(default_factory=list)
    error: psycopg.Error | None = None
    breaks: bool = False
    broken: bool = False
    closed: bool = False
    executed: list[tuple[str, object]] = field(default_factory=list)
    info: Any = field(default_factory=lambda: SimpleNamespace(transaction_status=IDLE))

    def execute(self, statement: str, params: object) -> list[tuple[Any, ...]]:
        self.executed.append((statement, params))
        if self.error is not None:
            self.broken = self.breaks
            raise self.error
        return self.rows

    def close(self) -> None:
        self.closed = True


def faked(*connections: FakeConnection, max_idle: int = 4,
          conninfo: str = "host=db user=tayori password=secret-pw") -> PostgresSource:
    """A source whose new connections are ``connections``, in order."""
    source = PostgresSource(conninfo, max_idle=max_idle)
    waiting = list(connections)
    source._connect = lambda: waiting.pop(0)    # type: ignore[assignment,method-assign,return-value]
    return source


def test_a_connection_is_reused_and_the_login_is_a_parameter() -> None:
    connection = FakeConnection(rows=[("{X}y",)])
    source = faked(connection)
    assert source.fetch(QUERY, "bob") == [("{X}y",)]
    assert source.fetch(QUERY, "o'brien") == [("{X}y",)]
    assert connection.executed == [(pyformat(QUERY), {"login": "bob"}),
                                   (pyformat(QUERY), {"login": "o'brien"})]
    assert not connection.closed
    source.close()
    assert connection.closed


def test_a_broken_kept_connection_is_dropped_and_the_query_tried_again() -> None:
    stale = FakeConnection(rows=[("a",)])
    other = FakeConnection()
    fresh = FakeConnection(rows=[("b",)])
    source = faked(fresh)
    source._idle = [other, stale]               # two kept connections; stale is next
    stale.error, stale.breaks = psycopg.OperationalError("server closed the connection"), True
    assert source.fetch(QUERY, "bob") == [("b",)]
    assert stale.closed and other.closed        # the other kept one went too
    assert source._idle == [fresh]
    source.close()


def test_a_new_connection_failing_is_not_tried_again() -> None:
    first = FakeConnection(error=psycopg.OperationalError("gone"), breaks=True)
    source = faked(first, FakeConnection(rows=[("never",)]))
    with pytest.raises(DirectoryUnavailable, match="gone"):
        source.fetch(QUERY, "bob")
    assert first.closed and source._idle == []


def test_an_error_on_a_healthy_kept_connection_is_not_tried_again() -> None:
    kept = FakeConnection(rows=[("a",)])
    source = faked(kept, FakeConnection(rows=[("never",)]))
    source.fetch(QUERY, "bob")
    kept.error = psycopg.errors.UndefinedTable('relation "nowhere" does not exist')
    with pytest.raises(DirectoryUnavailable, match="nowhere"):
        source.fetch(QUERY, "bob")
    assert kept.closed and source._idle == []


def test_error_text_is_one_line_with_the_label_and_without_the_password() -> None:
    error = psycopg.OperationalError("FATAL:  no pg_hba.conf entry\n  for secret-pw\nHINT: x")
    source = faked(FakeConnection(error=error))
    with pytest.raises(DirectoryUnavailable) as caught:
        source.fetch(QUERY, "bob")
    assert str(caught.value) == (
        "postgresql host=db user=tayori: FATAL: no pg_hba.conf entry for *** HINT: x")


def test_idle_connections_are_bounded_and_none_kept_after_close() -> None:
    first, second = FakeConnection(rows=[]), FakeConnection(rows=[])
    source = faked(first, second, max_idle=1)
    a, _ = source._take()
    b, _ = source._take()
    source._give_back(a)
    source._give_back(b)
    assert source._idle == [first] and second.closed
    source.close()
    assert first.closed
    late = FakeConnection(rows=[("x",)])
    source._connect = lambda: late              # type: ignore[method-assign]
    assert source.fetch(QUERY, "bob") == [("x",)] and late.closed


def test_a_connection_left_in_a_transaction_is_not_kept() -> None:
    odd = FakeConnection(rows=[])
    odd.info.transaction_status = psycopg.pq.TransactionStatus.INTRANS
    source = faked(odd)
    source.fetch(QUERY, "bob")
    assert odd.closed and source._idle == []
