"""SQL user directories: a password query and a senders query against a database.

Takes: a :class:`SqlSource` (today :class:`SqliteSource`: an SQLite file opened
read-only) and two queries with the named parameter ``:login`` (a single ``?`` works
too, as in tayori's other SQLite tables)::

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
Failure policy: a database error (missing file, locked, bad query) is a temporary
failure: ``authenticate`` answers TEMPORARY, ``sender_addresses`` raises
DirectoryUnavailable; the connection is opened again on the next call.
Adding PostgreSQL: a source whose ``fetch`` runs the query with a DB-API driver
(psycopg: ``:login`` becomes ``%(login)s``, see :func:`pyformat`) and raises
DirectoryUnavailable for the driver's errors; :class:`SqlUsers` stays as it is.
Config keys (proposed): ``[auth] directory = { sqlite = PATH, password_query = "...",
senders_query = "..." }`` (later ``{ postgresql = DSN, ... }``).
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
    judge,
    off_loop,
    refuse_early,
    sender_set,
    split_list,
)

Row = tuple[object, ...]

_NAMED_LOGIN = re.compile(r":login\b")


class SqlSource(Protocol):
    def fetch(self, query: str, login: str) -> list[Row]:
        """Blocking: the rows of ``query`` with ``login`` bound to ``:login``. Raises
        :class:`DirectoryUnavailable` for any database error."""
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

    async def authenticate(self, login: str, password: str) -> AuthOutcome:
        refused = refuse_early(login, password)
        if refused is not None:
            return refused
        return await off_loop(self._authenticate, login, password)

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
