"""The file user table: tayori's embedded user directory, managed with ``tayori user``.

Takes: the path of a text file with one user per line::

    # login : password hash : sender addresses (optional)
    alice@example.org:{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=4$...:alias@example.org, @example.net
    bob:{SHA512-CRYPT}$6$...:bob@example.org

Blank lines and lines starting with ``#`` are comments. A login is case-insensitive
(stored lower-case), has no ``:``, blank or control character. The hash is any scheme
:mod:`tayori.policy.passwords` verifies (``tayori user`` writes ``{ARGON2ID}``); ``!`` in
front locks the account. The third field lists, separated by commas or blanks, the
further addresses and ``@domain``s the user may send as (the login itself, when it is
an address, is always allowed).
Promises:
- :class:`FileUsers` is a :class:`~tayori.policy.userdb.UserDirectory`; the file is read
  again when it changes (mtime, size or inode), and every read and check runs off the
  event loop. A malformed line is skipped and logged (``user-table-line``); a login
  listed twice keeps its first line.
- :func:`add_user`, :func:`set_password`, :func:`set_senders`, :func:`delete_user`,
  :func:`list_users` are what the ``tayori user add | passwd | senders | delete |
  list`` commands call. An edit rewrites the file atomically (a temporary file in the
  same directory, fsync, rename, fsync of the directory) under an exclusive lock on
  ``PATH.lock``, keeping every other line (comments too) as it was and the file's owner
  and mode (a new file is mode 0640).
Failure policy: a table that was never readable makes ``authenticate`` answer TEMPORARY
(454) and ``sender_addresses`` raise DirectoryUnavailable; one that becomes unreadable
keeps the last good copy (logged). The edit functions raise :class:`UserExists`,
:class:`NoSuchUser` or :class:`InvalidEntry` (a :class:`UserTableError`, with a message
fit for the command line) and OSError for the file itself.
Config keys (proposed): ``[auth] directory = { file = PATH }``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import argon2

from tayori import maillog
from tayori.policy.passwords import hash_password
from tayori.policy.userdb import (
    AuthOutcome,
    DirectoryUnavailable,
    SenderMap,
    WatchedFile,
    authenticate_off_loop,
    judge,
    off_loop,
    sender_set,
    split_list,
)

NEW_FILE_MODE = 0o640


class UserTableError(Exception):
    """An edit of the user table that cannot be done (the message says why)."""


class UserExists(UserTableError):
    pass


class NoSuchUser(UserTableError):
    pass


class InvalidEntry(UserTableError):
    pass


@dataclass(frozen=True, slots=True)
class UserEntry:
    """One line of the table: the login, its stored hash, the extra sender entries."""

    login: str
    password_hash: str
    senders: tuple[str, ...] = ()

    def line(self) -> str:
        tail = ":" + ", ".join(self.senders) if self.senders else ""
        return f"{self.login}:{self.password_hash}{tail}"


def parse_line(line: str) -> UserEntry | None:
    """The entry on ``line``; None for a comment or blank line. Raises ValueError for a
    malformed one."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    login, colon, rest = text.partition(":")
    password_hash, _, senders = rest.partition(":")
    login = login.strip().lower()
    if not colon or not login or not password_hash.strip():
        raise ValueError("expected login:hash[:senders]")
    return UserEntry(login, password_hash.strip(), tuple(split_list(senders)))


def parse_table(text: str, path: str = "") -> dict[str, UserEntry]:
    """Every user in the table's ``text``: malformed lines and repeated logins are
    skipped and logged."""
    users: dict[str, UserEntry] = {}
    for number, line in enumerate(text.splitlines(), 1):
        try:
            entry = parse_line(line)
        except ValueError as exc:
            maillog.warning("user-table-line", file=path, line=number, problem=str(exc))
            continue
        if entry is None:
            continue
        if entry.login in users:
            maillog.warning("user-table-line", file=path, line=number,
                            problem=f"{entry.login} is listed again; the first line counts")
            continue
        users[entry.login] = entry
    return users


class FileUsers:
    """The user directory in a file table (see the module docstring for its format).
    ``senders``: a :class:`SenderMap` to use instead of the table's third field."""

    def __init__(self, path: str, senders: SenderMap | None = None) -> None:
        self.path = path
        self._table = WatchedFile(path, lambda text: parse_table(text, path))
        self._senders = senders

    async def authenticate(self, login: str, password: str) -> AuthOutcome:
        return await authenticate_off_loop(self._authenticate, login, password)

    def _authenticate(self, login: str, password: str) -> AuthOutcome:
        users = self._table.current()
        if users is None:
            return AuthOutcome.temporary(f"user table {self.path} is unreadable")
        entry = users.get(login.lower())
        outcome = judge(login, entry.password_hash if entry else None, password)
        return AuthOutcome.success(entry.login) if outcome.ok and entry else outcome

    async def sender_addresses(self, login: str) -> frozenset[str]:
        if self._senders is not None:
            return await self._senders.senders(login)
        return sender_set(login, await off_loop(self._listed, login))

    def _listed(self, login: str) -> tuple[str, ...]:
        users = self._table.current()
        if users is None:
            raise DirectoryUnavailable(f"user table {self.path} is unreadable")
        entry = users.get(login.lower())
        return entry.senders if entry else ()


# --- editing the table (the ``tayori user`` commands) --------------------------------

def check_login(login: str) -> str:
    """The login as stored (lower case); InvalidEntry when it cannot be stored."""
    if not login or login != login.strip() or ":" in login or "#" in login[:1] or any(
            c.isspace() or not c.isprintable() for c in login):
        raise InvalidEntry(f"invalid login {login!r}: it must be non-empty, without "
                           "':', blanks or control characters, and not start with '#'")
    return login.lower()


def check_senders(senders: Iterable[str]) -> tuple[str, ...]:
    entries = tuple(senders)
    for entry in entries:
        if not entry or any(c in entry for c in ":,#") or any(
                c.isspace() or not c.isprintable() for c in entry):
            raise InvalidEntry(f"invalid sender address {entry!r}")
    return entries


def list_users(path: str) -> list[UserEntry]:
    """Every user in the table, in file order (an absent file: none)."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        return []
    return list(parse_table(text, path).values())


def add_user(path: str, login: str, password: str, senders: Iterable[str] = (),
             hasher: argon2.PasswordHasher | None = None) -> UserEntry:
    """Add a user with a new argon2id hash of ``password``; UserExists if listed."""
    entry = UserEntry(check_login(login), _new_hash(password, hasher),
                      check_senders(senders))

    def edit(lines: list[str]) -> list[str]:
        if _find(lines, entry.login) is not None:
            raise UserExists(f"user {entry.login} already exists in {path}")
        return [*lines, entry.line()]

    _rewrite(path, edit)
    return entry


def set_password(path: str, login: str, password: str,
                 hasher: argon2.PasswordHasher | None = None) -> None:
    """Give an existing user a new hash of ``password``; NoSuchUser if not listed."""
    new_hash = _new_hash(password, hasher)
    _replace(path, login, lambda old: UserEntry(old.login, new_hash, old.senders))


def set_senders(path: str, login: str, senders: Iterable[str]) -> None:
    """Replace an existing user's extra sender addresses."""
    entries = check_senders(senders)
    _replace(path, login, lambda old: UserEntry(old.login, old.password_hash, entries))


def delete_user(path: str, login: str) -> None:
    """Remove a user's line; NoSuchUser if not listed."""
    key = login.lower()

    def edit(lines: list[str]) -> list[str]:
        index = _find(lines, key)
        if index is None:
            raise NoSuchUser(f"no user {key} in {path}")
        return lines[:index] + lines[index + 1:]

    _rewrite(path, edit)


def _new_hash(password: str, hasher: argon2.PasswordHasher | None) -> str:
    if not password:
        raise InvalidEntry("the password must not be empty")
    return hash_password(password, hasher)


def _replace(path: str, login: str, change: Callable[[UserEntry], UserEntry]) -> None:
    key = login.lower()

    def edit(lines: list[str]) -> list[str]:
        index = _find(lines, key)
        if index is None:
            raise NoSuchUser(f"no user {key} in {path}")
        old = parse_line(lines[index])
        assert old is not None
        return [*lines[:index], change(old).line(), *lines[index + 1:]]

    _rewrite(path, edit)


def _find(lines: list[str], login: str) -> int | None:
    """The index of ``login``'s first well-formed line."""
    for index, line in enumerate(lines):
        try:
            entry = parse_line(line)
        except ValueError:
            continue
        if entry is not None and entry.login == login:
            return index
    return None


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, NEW_FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _rewrite(path: str, edit: Callable[[list[str]], list[str]]) -> None:
    """Replace the file by ``edit(its lines)``, atomically and durably."""
    directory = os.path.dirname(os.path.abspath(path))
    with _locked(path):
        try:
            with open(path, encoding="utf-8") as handle:
                lines, info = handle.read().splitlines(), os.fstat(handle.fileno())
        except FileNotFoundError:
            lines, info = [], None
        text = "".join(line + "\n" for line in edit(lines))
        fd, temporary = tempfile.mkstemp(prefix=".users.", dir=directory)
        try:
            _write(fd, text, info)
            os.rename(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        _sync_directory(directory)


def _write(fd: int, text: str, info: os.stat_result | None) -> None:
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        if info is None:
            os.fchmod(fd, NEW_FILE_MODE)
        else:
            os.fchmod(fd, stat.S_IMODE(info.st_mode))
            if (info.st_uid, info.st_gid) != (os.geteuid(), os.getegid()):
                with contextlib.suppress(PermissionError):
                    os.fchown(fd, info.st_uid, info.st_gid)
        handle.write(text)
        handle.flush()
        os.fsync(fd)


def _sync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
