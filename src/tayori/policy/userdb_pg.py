"""PostgreSQL as the database of an SQL user directory (:class:`~.userdb_sql.SqlUsers`).

Takes: a libpq connection string, as keywords (``host=/run/postgresql dbname=mail
user=tayori``) or as a URI (``postgresql://tayori@db.example.org/mail``); a password may
be in it, in a ``passfile`` or in ``PGPASSWORD``, as libpq reads them. The queries are
those of :mod:`.userdb_sql`, with the login as ``:login`` (sent to the server as a bound
parameter, never spliced into the text: :func:`~.userdb_sql.pyformat`).
Promises: :class:`PostgresSource` is a :class:`~.userdb_sql.SqlSource` (psycopg 3).
Connections are kept for reuse, at most ``max_idle`` idle ones (by default one per
thread of the password-check pool, :data:`~.userdb.VERIFY_THREADS`, which bounds how many
run at once). Each is in autocommit mode with read-only transactions
(``default_transaction_read_only``, as the SQLite source opens its file read-only) and
``statement_timeout`` = ``timeout``; unless the connection string says otherwise,
``connect_timeout`` and TCP keepalives / ``tcp_user_timeout`` follow ``timeout`` too, so
a dead server costs a worker thread about that long, and ``application_name`` is
``tayori``.
Failure policy: every driver error (cannot connect, refused login, a bad query, a
timeout, the server shutting down) raises :class:`~.userdb.DirectoryUnavailable`, so
``authenticate`` answers TEMPORARY and ``sender_addresses`` raises; the connection is
closed. A reused connection found broken (the server restarted, an idle connection was
cut) takes the other idle ones with it and the query is tried once more on a new
connection. Messages name the server (:attr:`PostgresSource.label`: host, port, dbname,
user), never the password; a connection string libpq cannot parse is a ValueError at
construction that quotes none of it (libpq's message may hold the whole URI).
Config keys (proposed): ``auth.postgres`` = the connection string, with
``auth.password_query``, ``auth.senders_query`` and ``auth.timeout``.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from tayori.policy.userdb import VERIFY_THREADS, DirectoryUnavailable
from tayori.policy.userdb_sql import Row, pyformat

Connection = psycopg.Connection[tuple[Any, ...]]

#: What :attr:`PostgresSource.label` shows of the connection parameters.
LABEL_KEYS = ("host", "hostaddr", "port", "dbname", "user")


def label_of(params: dict[str, Any]) -> str:
    """``postgresql host=... port=... dbname=... user=...`` (what the string sets of
    those; never the password)."""
    shown = [f"{key}={params[key]}" for key in LABEL_KEYS if params.get(key)]
    return " ".join(["postgresql", *shown]) if shown else "postgresql (libpq defaults)"


def default_params(timeout: float) -> dict[str, str]:
    """The connection parameters derived from ``timeout`` (seconds), which a connection
    string overrides: libpq's ``connect_timeout`` is whole seconds, 2 at least."""
    seconds = str(max(2, math.ceil(timeout)))
    return {"connect_timeout": seconds, "application_name": "tayori",
            "keepalives": "1", "keepalives_idle": seconds, "keepalives_interval": "1",
            "keepalives_count": "3", "tcp_user_timeout": str(max(1, int(timeout * 1000)))}


class PostgresSource:
    """A PostgreSQL database reached by ``conninfo`` (see the module docstring)."""

    def __init__(self, conninfo: str, timeout: float = 5.0,
                 max_idle: int = VERIFY_THREADS) -> None:
        try:
            params: dict[str, Any] = conninfo_to_dict(conninfo)
        except psycopg.Error:
            raise ValueError("the PostgreSQL connection string cannot be parsed: it is "
                             '"key=value ..." or "postgresql://user@host/dbname"') from None
        self.label = label_of(params)
        self.timeout = timeout
        self.max_idle = max_idle
        self._password = str(params.get("password") or "")
        self._params = {**default_params(timeout), **params}
        self._idle: list[Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def fetch(self, query: str, login: str) -> list[Row]:
        # The query comes from the operator's config (trusted); the login is a parameter.
        statement = pyformat(query)
        for attempt in (1, 2):
            connection, reused = self._take()
            try:
                rows = [tuple(row) for row in connection.execute(statement, {"login": login})]
            except psycopg.Error as exc:
                broken = connection.broken
                connection.close()
                if reused and broken and attempt == 1:
                    self._drop_idle()
                    continue
                raise self._unavailable(exc) from exc
            except BaseException:
                connection.close()
                raise
            self._give_back(connection)
            return rows
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close the idle connections; those in use close when their query ends. A later
        :meth:`fetch` still works (on a connection of its own, not kept)."""
        with self._lock:
            self._closed = True
        self._drop_idle()

    def _take(self) -> tuple[Connection, bool]:
        """An idle connection (True: reused) or a new one."""
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self._connect(), False

    def _connect(self) -> Connection:
        milliseconds = str(max(1, int(self.timeout * 1000)))
        try:
            connection = psycopg.connect(autocommit=True, **self._params)
        except psycopg.Error as exc:
            raise self._unavailable(exc) from exc
        try:
            connection.execute(
                "SELECT set_config('statement_timeout', %s, false), "
                "set_config('default_transaction_read_only', 'on', false)", (milliseconds,))
        except psycopg.Error as exc:
            connection.close()
            raise self._unavailable(exc) from exc
        except BaseException:
            connection.close()
            raise
        return connection

    def _give_back(self, connection: Connection) -> None:
        idle = connection.info.transaction_status is psycopg.pq.TransactionStatus.IDLE
        with self._lock:
            if idle and not self._closed and len(self._idle) < self.max_idle:
                self._idle.append(connection)
                return
        connection.close()

    def _drop_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def _unavailable(self, exc: psycopg.Error) -> DirectoryUnavailable:
        """The error for the log: one line, the server's label, no password."""
        text = " ".join(str(exc).split()) or type(exc).__name__
        if self._password:
            text = text.replace(self._password, "***")
        return DirectoryUnavailable(f"{self.label}: {text}")
