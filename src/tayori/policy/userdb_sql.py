"""SQL user directories: a password query and a senders query against a database.

Takes: a :class:`SqlSource` (:class:`SqliteSource`: an SQLite file opened read-only;
:class:`~.userdb_pg.PostgresSource`: a PostgreSQL server, read-only sessions) and two
queries with the named parameter ``:login`` (for SQLite a single ``?`` works too, as in
tayori's other SQLite tables)::

    password_query = "SELECT password FROM users WHERE login = :login"
    senders_query  = "SELECT address FROM senders WHERE login = :login"

The password query's first column is a stored hash (any scheme of
:mod:`tayori.policy.passwords`); the senders query's rows each hold an address, an
``@domain``, or several separated by commas.
Promises: :class:`SqlUsers` is a :class:`~tayori.policy.userdb.UserDirectory`. No row,
a NULL password or more than one row (logged as ``auth-user-ambiguous``) is a failed
login, with the same argon2 work as a wrong password.
The queries and the check run off the event loop. Without a senders query a login owns
only itself (when it is an address); with one, also what it returns.
Failure policy: a database error (missing file, locked, server down, bad query,
timeout) is a temporary failure: ``authenticate`` answers TEMPORARY,
``sender_addresses`` raises DirectoryUnavailable; the connection is opened again on the
next call. :meth:`SqlUsers.postgres` refuses (ValueError) a query without ``:login``
and a connection string libpq cannot parse.
PostgreSQL (:mod:`.userdb_pg`): psycopg binds ``%(login)s``, which :func:`pyformat`
makes of ``:login``.
Config keys: ``auth.sqlite`` (PATH) or ``auth.postgres`` (a libpq connection string,
proposed), with ``auth.password_query``, ``auth.senders_query`` (and ``auth.timeout``
for PostgreSQL).
"""

from __future__ import annotations

import re
import sqlite3
import threading
from typing import Protocol

from tayori import maillog
from tayori.policy.userdb import (
    AuthOutcome,
    DirectoryUnavailable,
    SenderMap,
    authenticate_off_loop,
    judge,
    off_loop,
    sender_set,
    split_list,
)

Row = tuple[object, ...]

_NAMED_LOGIN = re.compile(r"(?<!:):login\b")   # not a PostgreSQL cast (x::login)


class SqlSource(Protocol):
    def fetch(self, query: str, login: str) -> list[Row]:
        """Blocking: the rows of ``query`` with ``login`` bound to ``:login``. Raises
        :class:`DirectoryUnavailable` for any database error."""
        ...

    def close(self) -> None:
        """Close the connections held (a later ``fetch`` opens one again)."""
        ...


def pyformat(query: str) -> str:
    """``:login`` → ``%(login)s``: the query in the DB-API ``pyformat`` style that
    PostgreSQL drivers (psycopg) use; ``%`` is doubled first."""
    return _NAMED_LOGIN.sub("%(login)s", query.replace("%", "%%"))


class SqliteSource:
    """An SQLite database opened read-only (``file:PATH?mode=ro``), one connection
    shared by the worker threads under a lock, opened again after an error."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def fetch(self, query: str, login: str) -> list[Row]:
        parameters: dict[str, str] | tuple[str] = (
            {"login": login} if _NAMED_LOGIN.search(query) else (login,))
        with self._lock:
            try:
                if self._db is None:
                    self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True,
                                               check_same_thread=False, timeout=5)
                return [tuple(row) for row in self._db.execute(query, parameters)]
            except sqlite3.Error as exc:
                self._close()
                raise DirectoryUnavailable(f"sqlite {self.path}: {exc}") from exc

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def close(self) -> None:
        with self._lock:
            self._close()


class SqlUsers:
    """A user directory in an SQL database (see the module docstring)."""

    def __init__(self, source: SqlSource, password_query: str, senders_query: str = "",
                 senders: SenderMap | None = None) -> None:
        self.source = source
        self.password_query = password_query
        self.senders_query = senders_query
        self._senders = senders

    @classmethod
    def sqlite(cls, path: str, password_query: str, senders_query: str = "",
               senders: SenderMap | None = None) -> SqlUsers:
        return cls(SqliteSource(path), password_query, senders_query, senders)

    @classmethod
    def postgres(cls, conninfo: str, password_query: str, senders_query: str = "",
                 senders: SenderMap | None = None, timeout: float = 5.0) -> SqlUsers:
        """Users in PostgreSQL (:class:`~.userdb_pg.PostgresSource`): ``conninfo`` is a
        libpq connection string; ``timeout`` (seconds) bounds connecting and each query.
        Raises ValueError for a query without ``:login`` or an unparsable ``conninfo``."""
        from tayori.policy.userdb_pg import PostgresSource

        for name, query in (("password_query", password_query),
                            ("senders_query", senders_query)):
            if query and not _NAMED_LOGIN.search(query):
                raise ValueError(f"{name}: PostgreSQL queries name the login :login")
        return cls(PostgresSource(conninfo, timeout), password_query, senders_query, senders)

    def close(self) -> None:
        """Close the database connections (a later call opens them again)."""
        self.source.close()

    async def authenticate(self, login: str, password: str) -> AuthOutcome:
        return await authenticate_off_loop(self._authenticate, login, password)

    def _authenticate(self, login: str, password: str) -> AuthOutcome:
        try:
            rows = self.source.fetch(self.password_query, login)
        except DirectoryUnavailable as exc:
            return AuthOutcome.temporary(str(exc))
        if len(rows) > 1:
            maillog.warning("auth-user-ambiguous", login=login, rows=len(rows))
            judge(login, None, password)
            return AuthOutcome.bad("the password query gave more than one row")
        return judge(login, _hash(rows[0]) if rows else None, password)

    async def sender_addresses(self, login: str) -> frozenset[str]:
        if self._senders is not None:
            return await self._senders.senders(login)
        if not self.senders_query:
            return sender_set(login, ())
        rows = await off_loop(self.source.fetch, self.senders_query, login)
        listed = [entry for row in rows if row and isinstance(row[0], str)
                  for entry in split_list(row[0])]
        return sender_set(login, listed)


def _hash(row: Row) -> str | None:
    """The stored hash in a row's first column (None for NULL or an empty row)."""
    value = row[0] if row else None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None
