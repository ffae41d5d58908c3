"""SMTP AUTH for a session: the configured user directory, the login ban, the sender rule.

Takes: the ``[auth]`` config; from a session, the client address, the login and the
password the SASL exchange collected, and later the MAIL FROM address.
Promises:
- :func:`directory_of` builds the one user directory the config names (a file, SQLite,
  PostgreSQL, LDAP or Dovecot; :mod:`tayori.policy.userdb`).
- :meth:`Authenticator.login` answers what the session sends: ``235 2.7.0`` on success;
  ``535 5.7.8`` for every failed login (an unknown user and a wrong password look the
  same); ``454 4.7.0`` when the directory cannot answer (in ``auth.timeout``);
  ``421 4.7.0`` when the client's address (IPv6: its /64) is banned, or this failure
  is its ``auth.max_failures``-th within ``auth.failure_window``: then it is banned for
  ``auth.ban_time``. Failures and bans are counted for all worker processes together,
  in ``<spool>/logins.sqlite3``, and survive a restart. Every failure and ban is logged
  (``auth-failure``, ``auth-ban`` with ``client=[IP]`` first, for fail2ban); a password
  never is.
- :meth:`Authenticator.sender_refusal` applies ``auth.sender_policy``: with ``owned``,
  an authenticated login may use only its own sender addresses (``553 5.7.1``).
  :meth:`Authenticator.author_refusal` applies it to the message's From field(s) at the
  end of the data: every From address must be the login's as well (``553 5.7.1 From
  address not owned by the authenticated user``), whether or not tayori holds a
  ``[[dkim_key]]`` for its domain. Why every domain: the key is what makes tayori sign
  (:mod:`tayori.auth.outbound` picks it by the From domain), but DMARC passes without a
  signature too, by SPF alignment, for a From domain whose MAIL FROM domain is the
  same; so a login owning one address of a hosted domain could otherwise send as any
  other user of it. A From address without a domain claims nothing (DMARC and the
  signer ignore it) and passes; any domain the DMARC parser finds in From that none of
  the checked addresses has (two parsers disagreeing) is refused.
- :meth:`Authenticator.ban` lets the session refuse a banned client at connect.
- The login guard's SQLite file (:class:`~tayori.policy.ratelimit.LoginGuard`) is used
  on its own thread, never on the event loop: at connect (:meth:`Authenticator.ban`)
  and at AUTH.
Failure policy: a directory that cannot say which senders a login owns gives
``451 4.3.0`` (fail closed); nothing here raises into the session. The ban list: at
AUTH, a file that cannot be used answers ``454 4.7.0`` (fail closed: without it password
guessing is unbounded); at connect, a file that cannot be used or that does not answer
within :data:`BAN_CHECK_TIMEOUT` lets the client in (fail open: its AUTH is checked
again, closed).
Config keys: ``auth.*``.
Standards: RFC 4954 §6 (reply codes), RFC 6409 §6.1 (submission sender checks).
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import sqlite3
import time
from collections.abc import Sequence

from tayori import maillog
from tayori.auth.dmarc import author_domains, from_field_values
from tayori.config.model import AuthConfig
from tayori.errors import Reply
from tayori.policy import userdb
from tayori.policy.ratelimit import LoginGuard, auth_ban_fields, auth_failure_fields, ban_reply
from tayori.policy.userdb import AuthOutcome, DirectoryUnavailable, UserDirectory
from tayori.policy.userdb_dovecot import DovecotAuth
from tayori.policy.userdb_file import FileUsers
from tayori.policy.userdb_ldap import LdapSettings, LdapUsers
from tayori.policy.userdb_sql import SqlUsers

LOGINS_FILE = "logins.sqlite3"
DIRECTORY_TROUBLE = Reply(451, "4.3.0", "Cannot check the sender address now, try again later")
AUTHOR_NOT_OWNED = Reply(553, "5.7.1", "From address not owned by the authenticated user")
BAN_CHECK_TIMEOUT = 0.1
"""Seconds the ban check at connect may take; then the client is let in."""


def directory_of(config: AuthConfig) -> UserDirectory:
    senders = userdb.SenderMap(config.senders) if config.senders else None
    match config.backend:
        case "dovecot":
            return DovecotAuth(config.dovecot, timeout=config.timeout, senders=senders)
        case "ldap":
            return LdapUsers(LdapSettings(
                config.ldap, config.ldap_base, config.ldap_filter, config.ldap_bind_dn,
                config.ldap_bind_password, config.ldap_start_tls, config.ldap_ca_file,
                config.ldap_sender_attributes, config.timeout), senders)
        case "postgres":
            return SqlUsers.postgres(config.postgres, config.password_query,
                                     config.senders_query, senders=senders,
                                     timeout=config.timeout)
        case "sqlite":
            return SqlUsers.sqlite(config.sqlite, config.password_query,
                                   config.senders_query, senders=senders)
        case _:
            return FileUsers(config.users, senders)


class Authenticator:
    """One per worker process: the directory its sessions share, and the ban list all
    workers share (``<spool>/logins.sqlite3``)."""

    def __init__(self, config: AuthConfig, spool: str) -> None:
        self.config = config
        self.directory = directory_of(config)
        self.guard = LoginGuard(config.max_failures, config.failure_window, config.ban_time,
                                path=os.path.join(spool, LOGINS_FILE))

    def update(self, config: AuthConfig) -> None:
        """A reloaded config: a new directory; the failures and bans counted stay."""
        self.config = config
        old, self.directory = self.directory, directory_of(config)
        close = getattr(old, "close", None)   # SQL directories keep connections
        if close is not None:
            close()
        self.guard.max_failures = config.max_failures
        self.guard.window, self.guard.ban_time = config.failure_window, config.ban_time

    async def ban(self, client_ip: str) -> Reply | None:
        """``421`` for a banned client (at connect); None otherwise, and when the ban list
        cannot be read in :data:`BAN_CHECK_TIMEOUT` (logged; AUTH then fails closed)."""
        try:
            async with asyncio.timeout(BAN_CHECK_TIMEOUT):
                remaining = await self.guard.in_thread(self.guard.ban_remaining, client_ip,
                                                       time.time())
        except (sqlite3.Error, TimeoutError) as exc:
            maillog.error("auth-bans-unavailable", reason=str(exc) or "no answer in time")
            return None
        return ban_reply(remaining) if remaining else None

    async def login(self, session: str, client_ip: str, mechanism: str, login: str,
                    password: str) -> Reply:
        try:
            return await self._login(session, client_ip, mechanism, login, password)
        except sqlite3.Error as exc:   # no ban list, no login: password guessing unbounded
            maillog.error("auth-bans-unavailable", session=session, reason=str(exc))
            return AuthOutcome.temporary("the ban list is unavailable").reply

    async def _login(self, session: str, client_ip: str, mechanism: str, login: str,
                     password: str) -> Reply:
        guard = self.guard
        remaining = await guard.in_thread(guard.ban_remaining, client_ip, time.time())
        if remaining:
            return ban_reply(remaining)
        outcome = await self._ask(login, password)
        if outcome.ok:
            await guard.in_thread(guard.record_success, client_ip)
            maillog.event("auth", session=session, client=f"[{client_ip}]",
                          login=outcome.login, mechanism=mechanism)
            return outcome.reply
        if outcome.status is userdb.AuthStatus.TEMPORARY:
            maillog.warning("auth-unavailable", session=session, client=f"[{client_ip}]",
                            login=login, reason=outcome.reason)
            return outcome.reply
        return await self._failed(session, client_ip, mechanism, login, outcome)

    async def _ask(self, login: str, password: str) -> AuthOutcome:
        try:
            async with asyncio.timeout(self.config.timeout):
                return await self.directory.authenticate(login, password)
        except TimeoutError:
            return AuthOutcome.temporary("the user directory did not answer in time")

    async def _failed(self, session: str, client_ip: str, mechanism: str, login: str,
                      outcome: AuthOutcome) -> Reply:
        banned_now, failures = await self.guard.in_thread(self._count_failure, client_ip,
                                                          time.time())
        maillog.event("auth-failure", session=session, reason=outcome.reason,
                      **auth_failure_fields(client_ip, login, mechanism, failures))
        if not banned_now:
            return outcome.reply
        maillog.warning("auth-ban", session=session, **auth_ban_fields(
            client_ip, self.config.max_failures, self.config.ban_time))
        return ban_reply(self.config.ban_time)

    def _count_failure(self, client_ip: str, now: float) -> tuple[bool, int]:
        """Blocking (the guard's thread): record a failure; (a ban starts, failures)."""
        return self.guard.record_failure(client_ip, now), self.guard.failures(client_ip, now)

    async def sender_refusal(self, login: str, sender: str, delimiter: str = "+"
                             ) -> Reply | None:
        """Why ``login`` may not use ``sender`` in MAIL FROM; None when it may."""
        if self.config.sender_policy == "any":
            return None
        try:
            async with asyncio.timeout(self.config.timeout):
                allowed = await userdb.may_send_as(self.directory, login, sender, delimiter)
        except (DirectoryUnavailable, TimeoutError):
            return DIRECTORY_TROUBLE
        return None if allowed else userdb.SENDER_NOT_OWNED

    async def author_refusal(self, login: str, header: bytes, delimiter: str = "+"
                             ) -> Reply | None:
        """Why ``login`` may not send a message with this header block (its From
        field(s)); None when it may. See the module docstring."""
        if self.config.sender_policy == "any":
            return None
        values = from_field_values(header)
        addresses = _author_addresses(values)
        if not addresses and not author_domains(values).domains:
            return None
        try:
            async with asyncio.timeout(self.config.timeout):
                owned = await self.directory.sender_addresses(login)
        except (DirectoryUnavailable, TimeoutError):
            return DIRECTORY_TROUBLE
        checked = {userdb.normalize_sender(a).rpartition("@")[2] for a in addresses}
        if all(userdb.owns_address(owned, a, delimiter) for a in addresses) and \
                checked.issuperset(author_domains(values).domains):
            return None
        return AUTHOR_NOT_OWNED


def _author_addresses(values: Sequence[bytes]) -> list[str]:
    """The addresses with a domain in the From field values (RFC 5322 address lists)."""
    texts = [" ".join(v.decode("utf-8", "replace").split()) for v in values]
    return [address for _, address in email.utils.getaddresses(texts) if "@" in address]
