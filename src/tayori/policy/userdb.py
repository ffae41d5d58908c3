"""User directories: who may log in (SMTP AUTH) and which sender addresses each owns.

Takes: a login and a password from the SASL layer (PLAIN or LOGIN, decoded); later the
MAIL FROM address of an authenticated session.
Promises:
- Every directory is a :class:`UserDirectory`: ``await authenticate(login, password)``
  gives an :class:`AuthOutcome`: OK (with the login as the directory spells it), bad
  credentials, or a temporary failure (the directory is unreachable or unreadable).
  :attr:`AuthOutcome.reply` is what the session answers: ``235 2.7.0``, ``535 5.7.8``
  for every failed login (an unknown user and a wrong password look the same, RFC 4954
  §6), ``454 4.7.0`` for a temporary failure. ``reason`` is for the operator's log only.
- The directories backed by hashes spend at least the same work on an unknown user as on
  a known one (:func:`judge`): an unknown user's password is checked against a dummy
  argon2id hash, and so is a known user's whenever the stored hash is anything but an
  argon2id hash with the current parameters (SHA-crypt, bcrypt, older argon2 settings,
  a locked account): its own check may be cheaper, and the time an AUTH takes must not
  tell which logins exist. (A stored hash dearer than argon2, bcrypt with a high cost,
  still takes longer than an unknown user: rehash such users to argon2id.)
- Password checks run off the event loop, in a small bounded pool of threads
  (:func:`off_loop`, :data:`VERIFY_THREADS` at once: argon2 takes 64 MiB each;
  :func:`authenticate_off_loop` is ``authenticate`` for the directories that block).
- ``await sender_addresses(login)`` gives the addresses (``user@domain``) and domains
  (``@domain``) the login may use in MAIL FROM: the login itself when it is an address,
  plus what the directory (or a :class:`SenderMap` given to it) lists. Entries are
  normalised (lower case, A-label domains). :func:`owns_address` /
  :func:`may_send_as` apply them: ``user+tag@domain`` is ``user@domain``, and the null
  sender ``<>`` is always allowed (it names nobody). A sender not owned gets
  :data:`SENDER_NOT_OWNED` (``553 5.7.1``).
- An empty password is refused before any directory is asked (an LDAP bind with an
  empty password would be an anonymous bind, which "succeeds").
Failure policy: ``authenticate`` never raises for a directory problem: it answers
TEMPORARY and says why in ``reason``. ``sender_addresses`` raises
:class:`DirectoryUnavailable` when the directory cannot answer; the session then answers
``451 4.3.0`` (fail closed, DESIGN §2.4). An unusable stored hash (unknown scheme,
locked account) is a failed login, logged as ``auth-hash-unusable``.
Backends: :class:`tayori.policy.userdb_file.FileUsers` (the embedded default, managed by
``tayori user``), :mod:`.userdb_sql` (SQLite, and PostgreSQL through :mod:`.userdb_pg`),
:mod:`.userdb_ldap` (search + bind), :mod:`.userdb_dovecot` (Dovecot's auth protocol).
Config keys: ``auth.users``, ``auth.sqlite``, ``auth.postgres``, ``auth.password_query``,
``auth.senders_query``, ``auth.ldap*``, ``auth.dovecot``, ``auth.senders`` (a
:class:`SenderMap` for any of them); chosen in :mod:`tayori.policy.authentication`.
Standards: RFC 4954 (SMTP AUTH replies), RFC 3463 (enhanced status codes).
"""

from __future__ import annotations

import asyncio
import enum
import functools
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from tayori import maillog
from tayori.address import AddressError, parse_mailbox, to_ascii_domain
from tayori.errors import Reply
from tayori.policy.passwords import check_password, hash_password, needs_rehash

T = TypeVar("T")
V = TypeVar("V")

#: Password checks running at once (each argon2 check holds 64 MiB while it runs).
VERIFY_THREADS = max(2, min(8, os.cpu_count() or 2))

AUTH_SUCCEEDED = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_TEMPFAIL = Reply(454, "4.7.0", "Temporary authentication failure")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address not owned by the authenticated user")


class AuthStatus(enum.Enum):
    OK = "ok"
    BAD_CREDENTIALS = "bad-credentials"
    TEMPORARY = "temporary"


@dataclass(frozen=True, slots=True)
class AuthOutcome:
    """What a directory says of one login attempt. ``login``: the name to record as
    authenticated (the directory's spelling; only set when OK). ``reason``: for the
    operator's log, never for the client."""

    status: AuthStatus
    login: str = ""
    reason: str = ""

    @classmethod
    def success(cls, login: str) -> AuthOutcome:
        return cls(AuthStatus.OK, login)

    @classmethod
    def bad(cls, reason: str) -> AuthOutcome:
        return cls(AuthStatus.BAD_CREDENTIALS, reason=reason)

    @classmethod
    def temporary(cls, reason: str) -> AuthOutcome:
        return cls(AuthStatus.TEMPORARY, reason=reason)

    @property
    def ok(self) -> bool:
        return self.status is AuthStatus.OK

    @property
    def reply(self) -> Reply:
        return {AuthStatus.OK: AUTH_SUCCEEDED, AuthStatus.BAD_CREDENTIALS: AUTH_FAILED,
                AuthStatus.TEMPORARY: AUTH_TEMPFAIL}[self.status]


class DirectoryUnavailable(Exception):
    """The directory cannot answer now (down, unreadable, timed out): temporary."""


class UserDirectory(Protocol):
    async def authenticate(self, login: str, password: str) -> AuthOutcome:
        """Check a login's password; never raises for a directory problem."""
        ...

    async def sender_addresses(self, login: str) -> frozenset[str]:
        """The normalised addresses and ``@domain`` entries ``login`` may send as.
        Raises :class:`DirectoryUnavailable`."""
        ...


# --- sender ownership ---------------------------------------------------------------

def normalize_sender(entry: str) -> str:
    """``local@domain`` with the local part lower-cased and the domain in A-label form;
    ``@domain`` for a whole domain; an unparsable entry lower-cased as it is."""
    text = entry.strip()
    if text.startswith("@"):
        try:
            return "@" + to_ascii_domain(text[1:]).lower()
        except AddressError:
            return text.lower()
    try:
        mailbox = parse_mailbox(text, utf8=True)
    except AddressError:
        return text.lower()
    return f"{mailbox.local.lower()}@{mailbox.ascii_domain.lower()}"


def default_senders(login: str) -> frozenset[str]:
    """The login itself when it is an address (``alice@example.org``), else nothing."""
    try:
        parse_mailbox(login, utf8=True)
    except AddressError:
        return frozenset()
    return frozenset({normalize_sender(login)})


def sender_set(login: str, listed: Iterable[str]) -> frozenset[str]:
    """What ``login`` owns: itself (when an address) and the ``listed`` entries."""
    return default_senders(login) | {normalize_sender(e) for e in listed if e.strip()}


def owns_address(owned: frozenset[str], address: str, delimiter: str = "+") -> bool:
    """True when ``address`` (a MAIL FROM mailbox, without ``<>``) is in ``owned``: the
    address itself, the address without its ``+tag`` (``delimiter``; empty: none), or
    its ``@domain``. The null sender (``""``) is always allowed."""
    if address in ("", "<>"):
        return True
    normal = normalize_sender(address)
    local, at, domain = normal.rpartition("@")
    if not at or not local:
        return normal in owned
    candidates = {normal, "@" + domain}
    if delimiter and delimiter in local:
        candidates.add(f"{local.split(delimiter, 1)[0]}@{domain}")
    return not candidates.isdisjoint(owned)


async def may_send_as(directory: UserDirectory, login: str, address: str,
                      delimiter: str = "+") -> bool:
    """True when the authenticated ``login`` may use ``address`` in MAIL FROM (else the
    session answers :data:`SENDER_NOT_OWNED`). Raises :class:`DirectoryUnavailable`."""
    if address in ("", "<>"):
        return True
    return owns_address(await directory.sender_addresses(login), address, delimiter)


# --- checking passwords off the event loop ------------------------------------------

_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(VERIFY_THREADS, thread_name_prefix="tayori-auth")
        return _executor


async def off_loop(function: Callable[..., T], *args: object) -> T:
    """Run ``function(*args)`` in the bounded password-check pool."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_pool(), functools.partial(function, *args))


@functools.cache
def dummy_hash() -> str:
    """An argon2id hash of a random password, made once: what an unknown user's
    password is checked against, so that the check costs the same. Made on first use;
    calling it at start keeps the first unknown login from costing one hash more."""
    return hash_password(os.urandom(16).hex())


def judge(login: str, stored: str | None, password: str) -> AuthOutcome:
    """Blocking: check ``password`` against ``stored`` and give the outcome. None (no
    such user) is checked against :func:`dummy_hash` instead; any stored value but an
    argon2id hash with the current parameters is checked against it as well, so that
    no login costs less than an unknown one."""
    if stored is None:
        check_password(dummy_hash(), password)
        return AuthOutcome.bad("no such user")
    result = check_password(stored, password)
    if needs_rehash(stored):   # maybe cheaper than the dummy: pay for the dummy too
        check_password(dummy_hash(), password)
    if result.problem:
        maillog.warning("auth-hash-unusable", login=login, problem=result.problem)
        return AuthOutcome.bad(result.problem)
    return AuthOutcome.success(login) if result.ok else AuthOutcome.bad("wrong password")


def refuse_early(login: str, password: str) -> AuthOutcome | None:
    """A failed outcome for credentials no directory should be asked about: an empty
    password, or NUL / line breaks in either (they cannot come from a SASL client
    honestly and would break line-based protocols)."""
    if not password:
        return AuthOutcome.bad("empty password")
    if not login or any(c in login or c in password for c in "\x00\r\n"):
        return AuthOutcome.bad("malformed login or password")
    return None


async def authenticate_off_loop(check: Callable[[str, str], AuthOutcome], login: str,
                                password: str) -> AuthOutcome:
    """``authenticate`` for a directory whose check blocks (reading its table, checking
    the hash): :func:`refuse_early`, then ``check(login, password)`` :func:`off_loop`."""
    refused = refuse_early(login, password)
    if refused is not None:
        return refused
    return await off_loop(check, login, password)


# --- file tables, read again when they change ----------------------------------------

@dataclass(slots=True)
class WatchedFile(Generic[V]):
    """A file parsed by ``parse`` and parsed again when its (mtime, size, inode)
    changes; thread-safe. An unreadable file keeps the last good copy (logged once per
    new error); :meth:`current` is None when no copy could ever be read."""

    path: str
    parse: Callable[[str], V]
    _stamp: tuple[int, int, int] | None = None
    _value: V | None = None
    _error: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def current(self) -> V | None:
        with self._lock:
            try:
                info = os.stat(self.path)
                stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
                if stamp != self._stamp:
                    with open(self.path, encoding="utf-8") as handle:
                        self._value = self.parse(handle.read())
                    self._stamp, self._error = stamp, ""
            except (OSError, UnicodeDecodeError) as exc:
                if str(exc) != self._error:
                    self._error = str(exc)
                    maillog.error("table-unreadable", file=self.path, reason=str(exc),
                                  kept="the last good copy" if self._value is not None
                                  else "nothing")
            return self._value


def split_list(text: str) -> list[str]:
    """``a@x, b@y  @z`` → ``["a@x", "b@y", "@z"]`` (commas and/or blanks)."""
    return [part for part in text.replace(",", " ").split() if part]


def parse_sender_map(text: str) -> dict[str, frozenset[str]]:
    """``login: address, address, @domain`` lines (``#`` comments; a login listed twice
    owns the union)."""
    owned: dict[str, set[str]] = {}
    for raw in text.splitlines():
        login, colon, rest = raw.split("#", 1)[0].strip().partition(":")
        if not colon or not login.strip():
            continue
        owned.setdefault(login.strip().lower(), set()).update(split_list(rest))
    return {login: frozenset(entries) for login, entries in owned.items()}


class SenderMap:
    """A login-to-sender table file (``login: address, address, @domain`` per line,
    ``#`` comments), read again when it changes; what a directory without its own
    sender data (Dovecot), or one whose data should be overridden, uses. Logins compare
    case-insensitively."""

    def __init__(self, path: str) -> None:
        self._file = WatchedFile(path, parse_sender_map)

    def listed(self, login: str) -> frozenset[str]:
        """Blocking: the entries listed for ``login``. Raises
        :class:`DirectoryUnavailable` when the file was never readable."""
        table = self._file.current()
        if table is None:
            raise DirectoryUnavailable(f"sender table {self._file.path} is unreadable")
        return table.get(login.lower(), frozenset())

    async def senders(self, login: str) -> frozenset[str]:
        """What ``login`` owns by this table: itself (when an address) and its entries."""
        listed = await asyncio.to_thread(self.listed, login)
        return sender_set(login, listed)
