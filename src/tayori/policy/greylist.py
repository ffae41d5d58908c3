"""Greylisting: defer the first delivery attempt of an unknown (client, sender, recipient).

Takes: at construction, the path of the store and plain policy values; per recipient,
the client's IP address, the envelope sender (``""`` for the null sender ``<>``), the
recipient, and ``now`` in wall-clock seconds (``time.time()``: entries outlive restarts,
so a monotonic clock would not do; tests pass a fake one).
Promises: :meth:`Greylist.check` keys a triplet by the client's network (IPv4 /24 and
IPv6 /64 by default), the sender lower-cased (and, with ``normalise_senders``, stripped
of BATV tags, SRS wrapping, a ``+`` subaddress and digit runs, see
:func:`normalise_sender`) and the recipient lower-cased, and answers a
:class:`GreylistVerdict`:

- a client in ``allow_networks`` passes (``allowlisted``), untouched by the store;
- a client network auto-allowed (below) passes (``auto-allowed``), and stays allowed
  for ``allow_time`` from this use;
- a triplet first seen now is stored and deferred for ``delay`` seconds (``new``):
  :meth:`GreylistVerdict.reply` is ``451 4.7.1 Greylisted, try again in N seconds``;
- a retry before ``delay`` has passed is deferred for the rest (``early``; the wait
  does not restart);
- a retry after ``delay`` and within ``retry_window`` of the first attempt passes
  (``passed``); the triplet is then known for ``allow_time`` from its last use
  (``known``), and the pass counts towards auto-allowing the client network: after
  ``auto_allow_after`` passes (at most one counted per hour, so one message to many
  recipients counts once) the whole network passes for ``allow_time`` (0 turns
  auto-allowing off);
- a triplet past its retry window or unused for ``allow_time`` starts again as new.

The null sender is greylisted like any other, as postgrey does it: the triplet's sender
is simply empty (``client//recipient``), so a DSN is deferred once per recipient and
passes when its MTA retries; there is no exemption (an exemption for ``<>`` would be an
open door, since anyone can send from it).
The store is SQLite in WAL mode, created if missing, versioned (``PRAGMA
user_version``), shared safely by the worker processes (each opens its own
:class:`Greylist` after the fork), and survives restarts. It uses ``synchronous=
NORMAL``: a power cut may forget the last few updates, which only greylists a client
again. A check is one small transaction on an indexed key (tens of microseconds), but
another process may hold the write lock for a moment, so the session should call
:meth:`Greylist.check_async`, which runs the check on the store's own thread and keeps
the event loop free. :meth:`Greylist.cleanup` deletes expired entries; call it now and
then (e.g. hourly) from a background task.
Failure policy: a store that cannot be opened, is not a greylist store or is of a newer
version raises :class:`GreylistError` at construction; a database error during a check
raises :class:`GreylistError`, which the session answers with a 4xx like any failing
hook (DESIGN §2.4: fail closed). A malformed client address raises ValueError.
Config keys (proposed): ``[greylist]`` ``enabled`` (false), ``path``
("<spool>/greylist.sqlite"), ``delay`` ("5m"), ``retry_window`` ("2d"), ``allow_time``
("35d"), ``auto_allow_after`` (1), ``ipv4_prefix`` (24), ``ipv6_prefix`` (64),
``allow_networks`` (a table of networks), ``normalise_senders`` (false).
Standards: RFC 6647 (greylisting: triplets, delays, auto-allowing), RFC 5321 §4.2.3
and §4.5.4.1 (4yz replies, retry), RFC 3463 (4.7.1); the address forms of BATV
(draft-levine-smtp-batv) and SRS (the Sender Rewriting Scheme) for normalisation.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

from tayori.errors import Reply
from tayori.policy.ratelimit import client_network

T = TypeVar("T")

SCHEMA_VERSION = 1
PASS_COUNT_INTERVAL = 3600.0
"""A client network's passes count at most once per this many seconds."""
DAY = 86400.0

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS triplets (
        network TEXT NOT NULL, sender TEXT NOT NULL, recipient TEXT NOT NULL,
        first_seen REAL NOT NULL, last_seen REAL NOT NULL, passed INTEGER NOT NULL,
        PRIMARY KEY (network, sender, recipient)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS clients (
        network TEXT PRIMARY KEY, passes INTEGER NOT NULL, last_pass REAL NOT NULL,
        allowed_until REAL NOT NULL) WITHOUT ROWID""",
)
_WHERE_TRIPLET = "WHERE network = ? AND sender = ? AND recipient = ?"

_BATV = re.compile(r"prvs=[0-9]{4}[0-9a-f]{6}=(.+)\Z")
_SRS0 = re.compile(r"srs0[=+-][^=]*=[^=]*=([^=]+)=(.+)\Z")
_SRS1 = re.compile(r"srs1[=+-][^=]*=[^=]*=[=+-]?[^=]*=[^=]*=([^=]+)=(.+)\Z")
_DIGITS = re.compile(r"\b[0-9]+\b")

Triplet = tuple[str, str, str]


class GreylistError(Exception):
    """The store could not be used (for logs only, never for the wire)."""


@dataclass(frozen=True, slots=True)
class GreylistVerdict:
    """``defer``: answer 451 now; ``retry_after``: seconds the client should wait."""

    defer: bool
    retry_after: int = 0
    reason: str = ""

    def reply(self) -> Reply | None:
        if not self.defer:
            return None
        return Reply(451, "4.7.1", f"Greylisted, try again in {self.retry_after} seconds")


def normalise_sender(sender: str) -> str:
    """The sender as greylisting keys it with ``normalise_senders``.

    Lower-cased; a BATV tag dropped (``prvs=1234abcdef=user@d`` → ``user@d``); an SRS
    address unwrapped to the original sender (``SRS0=h=tt=orig.example=user@fwd`` →
    ``user@orig.example``); a ``+subaddress`` dropped; digit runs that stand alone in
    the local part replaced by ``#`` (VERP: ``bounce-123-x@list`` → ``bounce-#-x@list``).
    """
    local, at, domain = sender.lower().rpartition("@")
    if not at:
        return sender.lower()
    batv = _BATV.match(local)
    if batv:
        local = batv.group(1)
    srs = _SRS0.match(local) or _SRS1.match(local)
    if srs:
        domain, local = srs.group(1), srs.group(2)
    base = local.split("+", 1)[0]
    return f"{_DIGITS.sub('#', base or local)}@{domain}"


class Greylist:
    """The greylisting policy over its SQLite store (see the module docstring)."""

    def __init__(self, path: str, *, delay: float = 300.0, retry_window: float = 2 * DAY,
                 allow_time: float = 35 * DAY, auto_allow_after: int = 1,
                 ipv4_prefix: int = 24, ipv6_prefix: int = 64,
                 allow_networks: Sequence[str] = (), normalise_senders: bool = False) -> None:
        if delay < 0 or retry_window <= delay or allow_time <= 0 or auto_allow_after < 0:
            raise ValueError("need 0 <= delay < retry_window, allow_time > 0, "
                             "auto_allow_after >= 0")
        self.delay = delay
        self.retry_window = retry_window
        self.allow_time = allow_time
        self.auto_allow_after = auto_allow_after
        self._prefixes = (ipv4_prefix, ipv6_prefix)
        self._allow = tuple(ipaddress.ip_network(n, strict=False) for n in allow_networks)
        self._normalise = normalise_senders
        self._lock = threading.Lock()
        self._thread: ThreadPoolExecutor | None = None
        self._db = _open(path)

    # --- life cycle ---------------------------------------------------------------------

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None
        with self._lock:
            self._db.close()

    def __enter__(self) -> Greylist:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    # --- the policy ---------------------------------------------------------------------

    def key(self, client_ip: str, sender: str, recipient: str) -> Triplet:
        """The triplet stored for this attempt."""
        network = client_network(client_ip, *self._prefixes)
        sender_key = normalise_sender(sender) if self._normalise else sender.lower()
        return network, sender_key, recipient.lower()

    def check(self, client_ip: str, sender: str, recipient: str,
              now: float) -> GreylistVerdict:
        """Decide for one recipient, and record the attempt (see the module docstring)."""
        if self._allowlisted(client_ip):
            return GreylistVerdict(False, 0, "allowlisted")
        triplet = self.key(client_ip, sender, recipient)
        return self._transaction(lambda: self._decide(triplet, now))

    async def check_async(self, client_ip: str, sender: str, recipient: str,
                          now: float) -> GreylistVerdict:
        """:meth:`check` on the store's thread, leaving the event loop free."""
        return await self._in_thread(self.check, client_ip, sender, recipient, now)

    def cleanup(self, now: float) -> int:
        """Delete the entries that have expired by ``now``; how many went."""
        return self._transaction(lambda: self._expire(now))

    async def cleanup_async(self, now: float) -> int:
        return await self._in_thread(self.cleanup, now)

    def counts(self) -> tuple[int, int]:
        """(triplets, client networks) in the store, for tests and operators."""
        def count() -> tuple[int, int]:
            triplets = self._db.execute("SELECT count(*) FROM triplets").fetchone()[0]
            clients = self._db.execute("SELECT count(*) FROM clients").fetchone()[0]
            return int(triplets), int(clients)
        return self._transaction(count)

    # --- inside a transaction -----------------------------------------------------------

    def _decide(self, triplet: Triplet, now: float) -> GreylistVerdict:
        if self._auto_allowed(triplet[0], now):
            return GreylistVerdict(False, 0, "auto-allowed")
        row = self._db.execute(f"SELECT first_seen, last_seen, passed FROM triplets "
                               f"{_WHERE_TRIPLET}", triplet).fetchone()
        if row is not None:
            first_seen, last_seen, passed = row
            if passed and now - last_seen <= self.allow_time:
                self._touch(triplet, now)
                return GreylistVerdict(False, 0, "known")
            if not passed and now - first_seen <= self.retry_window:
                return self._retried(triplet, first_seen, now)
        self._db.execute("INSERT OR REPLACE INTO triplets VALUES (?, ?, ?, ?, ?, 0)",
                         (*triplet, now, now))
        return GreylistVerdict(True, _seconds(self.delay), "new")

    def _retried(self, triplet: Triplet, first_seen: float, now: float) -> GreylistVerdict:
        waited = now - first_seen
        if waited < self.delay:
            return GreylistVerdict(True, _seconds(min(self.delay - waited, self.delay)),
                                   "early")
        self._touch(triplet, now)
        self._count_pass(triplet[0], now)
        return GreylistVerdict(False, 0, "passed")

    def _touch(self, triplet: Triplet, now: float) -> None:
        """Mark the triplet passed, and used ``now``."""
        self._db.execute(f"UPDATE triplets SET last_seen = ?, passed = 1 {_WHERE_TRIPLET}",
                         (now, *triplet))

    def _auto_allowed(self, network: str, now: float) -> bool:
        if not self.auto_allow_after:
            return False
        row = self._db.execute("SELECT allowed_until FROM clients WHERE network = ?",
                               (network,)).fetchone()
        if row is None or row[0] < now:
            return False
        self._db.execute("UPDATE clients SET allowed_until = ? WHERE network = ?",
                         (now + self.allow_time, network))
        return True

    def _count_pass(self, network: str, now: float) -> None:
        if not self.auto_allow_after:
            return
        row = self._db.execute("SELECT passes, last_pass FROM clients WHERE network = ?",
                               (network,)).fetchone()
        if row is not None and now - row[1] < PASS_COUNT_INTERVAL:
            return
        passes = 1 if row is None else row[0] + 1
        until = now + self.allow_time if passes >= self.auto_allow_after else 0.0
        self._db.execute("INSERT OR REPLACE INTO clients VALUES (?, ?, ?, ?)",
                         (network, passes, now, until))

    def _expire(self, now: float) -> int:
        gone = self._db.execute(
            "DELETE FROM triplets WHERE (passed = 0 AND first_seen < ?) "
            "OR (passed = 1 AND last_seen < ?)",
            (now - self.retry_window, now - self.allow_time)).rowcount
        gone += self._db.execute(
            "DELETE FROM clients WHERE allowed_until < ? AND last_pass < ?",
            (now, now - self.allow_time)).rowcount
        return int(gone)

    # --- plumbing -------------------------------------------------------------------------

    def _allowlisted(self, client_ip: str) -> bool:
        address = ipaddress.ip_address(client_ip)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self._allow)

    def _transaction(self, work: Callable[[], T]) -> T:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    result = work()
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise GreylistError(f"greylist store: {exc}") from exc
            return result

    async def _in_thread(self, call: Callable[..., T], *args: object) -> T:
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="greylist")
        return await asyncio.get_running_loop().run_in_executor(self._thread, call, *args)


def _seconds(wait: float) -> int:
    return max(1, math.ceil(wait))


def _open(path: str) -> sqlite3.Connection:
    """Open (creating it if missing) the store at ``path``, and check its version."""
    try:
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                             timeout=5.0)
    except (OSError, sqlite3.Error) as exc:
        raise GreylistError(f"cannot open the greylist store {path}: {exc}") from exc
    try:
        _prepare(db, path)
    except sqlite3.Error as exc:
        db.close()
        raise GreylistError(f"{path} is not a usable greylist store: {exc}") from exc
    except GreylistError:
        db.close()
        raise
    return db


def _prepare(db: sqlite3.Connection, path: str) -> None:
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("BEGIN IMMEDIATE")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise GreylistError(f"{path} has schema version {version}; this tayori "
                                f"knows {SCHEMA_VERSION}")
        for statement in _SCHEMA:
            db.execute(statement)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


__all__ = [
    "SCHEMA_VERSION",
    "Greylist",
    "GreylistError",
    "GreylistVerdict",
    "normalise_sender",
]
