"""Rate limits over time (token buckets) and the login brute-force ban.

Takes: plain values at construction (counts, seconds) and, per call, a key (a sender
address, or a client network from :func:`client_network`), an amount, and ``now``:
seconds on any clock that only moves forward (``time.monotonic()`` in the server, a
float in tests). Nothing here reads the clock itself.
Promises:

- :class:`TokenBuckets` lets ``count`` units per ``per`` seconds through for each key,
  with bursts up to ``burst`` (default ``count``). :meth:`TokenBuckets.take` answers
  :class:`Allowed` (and takes the tokens) or :class:`Denied` with the seconds until the
  amount would be allowed (and takes nothing). A new or long-idle key starts full. An
  amount larger than the burst is let through only from a full bucket and leaves it in
  debt, so no request is refused forever. :func:`rate_limited` makes the reply
  (``450 4.7.1 Too many messages from ..., try again in N seconds``).
- :class:`LoginGuard` counts failed logins per client network in a sliding window;
  the ``max_failures``-th failure within ``window`` seconds bans the network for
  ``ban_time`` seconds (the session answers :func:`ban_reply`, ``421 4.7.0``, and
  closes). A success clears the failures counted so far, not a ban in force. Its
  methods block (an SQLite file another process may hold locked for up to
  :data:`LOGIN_BUSY_TIMEOUT`); :meth:`LoginGuard.in_thread` runs one on the guard's own
  thread (one per process, so its calls never overlap), which is how the event loop
  calls them.
- Memory is bounded: the buckets keep at most ``max_keys`` keys, dropping the least
  recently used first (a dropped bucket starts full again: under a flood of distinct
  keys a limit is forgiven, memory is not lost); the login guard's SQLite file deletes
  what has aged out. IPv6 clients are keyed by their /64 by default
  (:func:`client_network`), so one host cannot escape a limit by hopping addresses
  inside its own prefix.

Connections per IP, messages per connection and recipients per message are not here:
they are counts within a session or across workers (``limits.max_connections_per_ip``
in :mod:`tayori.receive.connections`, ``limits.max_recipients`` in the SMTP engine).
The buckets are per process: with several workers each keeps its own, so a client
spread over workers may get up to ``workers`` times a rate. The login guard is shared
by all workers through its file (``<spool>/logins.sqlite3``). The ban log lines below
let fail2ban also ban at the firewall.

Log lines for fail2ban. The lead logs these through :mod:`tayori.maillog` with the
fields from :func:`auth_failure_fields` / :func:`auth_ban_fields`, ``client`` first::

    2026-11-28T11:00:00.123Z warning auth-failure client=[192.0.2.1] login=bob
        mechanism=PLAIN failures=3                           (one line, folded here)
    2026-11-28T11:00:09.456Z warning auth-ban client=[192.0.2.1] failures=5 ban=3600

A fail2ban filter anchors the address right after the event name (a ``session=``
field, made by tayori, may come between), so a client-supplied ``login`` cannot forge
it (maillog also quotes any value with a space)::

    failregex = ^\\S+ \\S+ auth-(?:failure|ban) (?:session=\\S+ )?client=\\[<HOST>\\]

Failure policy: the buckets are pure in-memory operations; the login guard raises
sqlite3.Error when its file cannot be used (the caller fails closed); a malformed IP
address raises ValueError (a caller's bug: the listener hands over parsed addresses).
Config keys (proposed): ``limits.messages_per_sender``, ``limits.recipients_per_sender``,
``limits.messages_per_ip``, ``limits.recipients_per_ip`` (``"100/1h"``: count per
duration; burst = count), ``auth.max_failures`` (5), ``auth.failure_window`` ("10m"),
``auth.ban_time`` ("1h"), ``limits.ipv6_prefix`` (64).
Standards: RFC 5321 §4.2.3 / §4.5.3.1.10 (4xx for limits), RFC 3463 / RFC 7372
(``4.7.1``, ``4.7.0``), RFC 4954 §4 (failed AUTH).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import math
import os
import sqlite3
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from tayori.errors import Reply

V = TypeVar("V")

DEFAULT_MAX_KEYS = 100_000
"""Keys a store remembers at most before it forgets the least recently used."""
LOGIN_BUSY_TIMEOUT = 2.0
"""Seconds a login guard call waits for another process's lock on the file."""


def client_network(ip: str, ipv4_prefix: int = 32, ipv6_prefix: int = 64) -> str:
    """The key for a client address: its network as text (``2001:db8::/64``).

    An IPv4-mapped IPv6 address counts as IPv4. With the default prefixes an IPv4
    client is keyed by its own address (written without ``/32``) and IPv6 by its /64.
    """
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    prefix = ipv4_prefix if address.version == 4 else ipv6_prefix
    network = ipaddress.ip_network((address, prefix), strict=False)
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


# --- token buckets ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Allowed:
    """The amount was taken; ``remaining`` tokens are left (negative: in debt)."""

    remaining: float


@dataclass(frozen=True, slots=True)
class Denied:
    """Not now: the amount would be allowed in ``retry_after`` seconds (nothing taken)."""

    retry_after: float


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    """One token bucket per key: ``count`` per ``per`` seconds, bursts up to ``burst``."""

    def __init__(self, count: float, per: float, burst: float | None = None, *,
                 max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if count <= 0 or per <= 0:
            raise ValueError("a rate needs a positive count and a positive period")
        if burst is not None and burst <= 0:
            raise ValueError("the burst must be positive")
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.burst = float(count if burst is None else burst)
        self._speed = count / per  # tokens per second
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, amount: float, now: float) -> Allowed | Denied:
        """Take ``amount`` tokens from ``key``'s bucket, or say how long to wait."""
        if amount < 0:
            raise ValueError("cannot take a negative amount")
        bucket = self._refilled(key, now)
        if bucket.tokens >= min(amount, self.burst):
            bucket.tokens -= amount
            return Allowed(bucket.tokens)
        missing = min(amount, self.burst) - bucket.tokens
        return Denied(missing / self._speed)

    def level(self, key: str, now: float) -> float:
        """The tokens ``key`` has now (a key never seen has a full bucket)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return self.burst
        elapsed = max(0.0, now - bucket.updated)  # a clock stepping back refills nothing
        return min(self.burst, bucket.tokens + elapsed * self._speed)

    def sweep(self, now: float) -> int:
        """Forget the keys whose buckets have filled up again; how many were dropped."""
        full = [key for key in self._buckets if self.level(key, now) >= self.burst]
        for key in full:
            del self._buckets[key]
        return len(full)

    def _refilled(self, key: str, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(self.burst, now)
            self._buckets[key] = bucket
            _trim(self._buckets, self._max_keys)
        else:
            self._buckets.move_to_end(key)
            bucket.tokens = self.level(key, now)
            bucket.updated = max(bucket.updated, now)
        return bucket


def rate_limited(what: str, denied: Denied) -> Reply:
    """The reply when a rate limit says no: ``what`` is e.g. ``"messages from <a@b>"``."""
    seconds = max(1, math.ceil(denied.retry_after))
    return Reply(450, "4.7.1", f"Too many {what}, try again in {seconds} seconds")


# --- the login guard --------------------------------------------------------------------


class LoginGuard:
    """Bans a client network after ``max_failures`` failed logins within ``window`` s.

    Clients are keyed with :func:`client_network` (IPv4 per address, IPv6 per
    ``ipv6_prefix``). A ban lasts ``ban_time`` seconds; during it, failures are not
    counted (the session should not even have asked: check :meth:`is_banned` first).
    The counts and bans live in an SQLite file (``path``) that every worker process
    opens, so they hold for the whole service and across restarts; ``":memory:"``
    keeps them in this process only. Old failures and ended bans are deleted as new
    ones are written, so the file stays small.
    """

    def __init__(self, max_failures: int = 5, window: float = 600.0,
                 ban_time: float = 3600.0, *, ipv6_prefix: int = 64,
                 path: str = ":memory:") -> None:
        if max_failures < 1 or window <= 0 or ban_time <= 0:
            raise ValueError("max_failures, window and ban_time must be positive")
        self.max_failures = max_failures
        self.window = window
        self.ban_time = ban_time
        self._ipv6_prefix = ipv6_prefix
        self._path = path
        self._db: sqlite3.Connection | None = None
        self._pid = 0
        self._thread: ThreadPoolExecutor | None = None
        self._thread_pid = 0

    def key(self, ip: str) -> str:
        """The network ``ip`` is counted under."""
        return client_network(ip, 32, self._ipv6_prefix)

    def is_banned(self, ip: str, now: float) -> bool:
        return self.ban_remaining(ip, now) > 0

    def ban_remaining(self, ip: str, now: float) -> float:
        """Seconds left of the ban on ``ip``'s network; 0 when it is not banned."""
        row = self._store().execute("SELECT until FROM bans WHERE key = ?",
                                    (self.key(ip),)).fetchone()
        return max(0.0, row[0] - now) if row else 0.0

    def failures(self, ip: str, now: float) -> int:
        """Failed logins from ``ip``'s network in the window ending ``now``."""
        row = self._store().execute("SELECT COUNT(*) FROM failures WHERE key = ? AND at > ?",
                                    (self.key(ip), now - self.window)).fetchone()
        return int(row[0])

    def record_failure(self, ip: str, now: float) -> bool:
        """Count a failed login; True when this failure starts a ban."""
        key = self.key(ip)
        db = self._store()
        with db:
            if self.is_banned(ip, now):
                return False
            db.execute("DELETE FROM failures WHERE at <= ?", (now - self.window,))
            db.execute("INSERT INTO failures (key, at) VALUES (?, ?)", (key, now))
            if self.failures(ip, now) < self.max_failures:
                return False
            db.execute("DELETE FROM bans WHERE until <= ?", (now,))
            db.execute("INSERT OR REPLACE INTO bans (key, until) VALUES (?, ?)",
                       (key, now + self.ban_time))
            db.execute("DELETE FROM failures WHERE key = ?", (key,))
        return True

    def record_success(self, ip: str) -> None:
        """A login succeeded: forget the failures counted (a ban in force stays)."""
        db = self._store()
        with db:
            db.execute("DELETE FROM failures WHERE key = ?", (self.key(ip),))

    async def in_thread(self, call: Callable[..., V], *args: object) -> V:
        """``call(*args)`` (one of this guard's methods) on the guard's own thread, so
        that the event loop never waits for the file."""
        if self._thread is None or self._thread_pid != os.getpid():   # none after a fork
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tayori-logins")
            self._thread_pid = os.getpid()
        return await asyncio.get_running_loop().run_in_executor(
            self._thread, functools.partial(call, *args))

    def _store(self) -> sqlite3.Connection:
        """The connection of this process (a forked worker opens its own)."""
        if self._db is None or self._pid != os.getpid():
            db = sqlite3.connect(self._path, timeout=LOGIN_BUSY_TIMEOUT,
                                 isolation_level="IMMEDIATE",
                                 check_same_thread=False)
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")   # a ban lost to a crash is no harm
            db.executescript(_LOGIN_SCHEMA)
            self._db, self._pid = db, os.getpid()
        return self._db


_LOGIN_SCHEMA = """
CREATE TABLE IF NOT EXISTS failures (key TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS failures_key ON failures (key, at);
CREATE TABLE IF NOT EXISTS bans (key TEXT PRIMARY KEY, until REAL NOT NULL);
"""


def ban_reply(seconds: float) -> Reply:
    """The reply before closing a banned client's session (or refusing its AUTH)."""
    wait = max(1, math.ceil(seconds))
    return Reply(421, "4.7.0", f"Too many failed logins, try again in {wait} seconds")


def auth_failure_fields(client_ip: str, login: str, mechanism: str,
                        failures: int) -> dict[str, object]:
    """maillog fields of an ``auth-failure`` event, ``client`` first (see above)."""
    return {"client": f"[{client_ip}]", "login": login, "mechanism": mechanism,
            "failures": failures}


def auth_ban_fields(client_ip: str, failures: int, ban_time: float) -> dict[str, object]:
    """maillog fields of an ``auth-ban`` event, ``client`` first (see above)."""
    return {"client": f"[{client_ip}]", "failures": failures, "ban": math.ceil(ban_time)}


def _trim(entries: OrderedDict[str, V], size: int) -> None:
    """Drop the least recently used entries beyond ``size``."""
    while len(entries) > size:
        entries.popitem(last=False)


__all__ = [
    "DEFAULT_MAX_KEYS",
    "LOGIN_BUSY_TIMEOUT",
    "Allowed",
    "Denied",
    "LoginGuard",
    "TokenBuckets",
    "auth_ban_fields",
    "auth_failure_fields",
    "ban_reply",
    "client_network",
    "rate_limited",
]
