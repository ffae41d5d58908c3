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
- :meth:`Authenticator.ban` lets the session refuse a banned client at connect.
Failure policy: a directory that cannot say which senders a login owns gives
``451 4.3.0`` (fail closed); nothing here raises into the session.
Config keys: ``auth.*``.
Standards: RFC 4954 §6 (reply codes), RFC 6409 §6.1 (submission sender checks).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time

from tayori import maillog
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

    def ban(self, client_ip: str) -> Reply | None:
        """``421`` for a banned client (at connect); None otherwise, and when the ban list
        cannot be read (logged; the AUTH command then fails closed)."""
        try:
            remaining = self.guard.ban_remaining(client_ip, time.time())
        except sqlite3.Error as exc:
            maillog.error("auth-bans-unavailable", reason=str(exc))
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
        remaining = self.guard.ban_remaining(client_ip, time.time())
        if remaining:
            return ban_reply(remaining)
        outcome = await self._ask(login, password)
        if outcome.ok:
            self.guard.record_success(client_ip)
            maillog.event("auth", session=session, client=f"[{client_ip}]",
                          login=outcome.login, mechanism=mechanism)
            return outcome.reply
        if outcome.status is userdb.AuthStatus.TEMPORARY:
            maillog.warning("auth-unavailable", session=session, client=f"[{client_ip}]",
                            login=login, reason=outcome.reason)
            return outcome.reply
        return self._failed(session, client_ip, mechanism, login, outcome)

    async def _ask(self, login: str, password: str) -> AuthOutcome:
        try:
            async with asyncio.timeout(self.config.timeout):
                return await self.directory.authenticate(login, password)
        except TimeoutError:
            return AuthOutcome.temporary("the user directory did not answer in time")

    def _failed(self, session: str, client_ip: str, mechanism: str, login: str,
                outcome: AuthOutcome) -> Reply:
        now = time.time()
        banned_now = self.guard.record_failure(client_ip, now)
        failures = self.guard.failures(client_ip, now)
        maillog.event("auth-failure", session=session, reason=outcome.reason,
                      **auth_failure_fields(client_ip, login, mechanism, failures))
        if not banned_now:
            return outcome.reply
        maillog.warning("auth-ban", session=session, **auth_ban_fields(
            client_ip, self.config.max_failures, self.config.ban_time))
        return ban_reply(self.config.ban_time)

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
