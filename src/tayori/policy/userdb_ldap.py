"""LDAP user directory: find the user's entry, then bind as it with the password.

Takes: :class:`LdapSettings`: the server URL (``ldap://host:port`` or ``ldaps://``),
StartTLS and the CA file to verify the server with, an optional service DN and password
to search with (anonymous otherwise), the search base and a filter template, the
attributes that hold the user's sender addresses, and a timeout.
Promises: :class:`LdapUsers` is a :class:`~tayori.policy.userdb.UserDirectory`.
``authenticate`` searches ``base`` (subtree) with the filter, the login put in with every
special character escaped (RFC 4515 §3: ``*`` ``(`` ``)`` ``\\`` NUL, and other control
characters), then binds as the one entry found with the password (RFC 4513 §5.1.3,
simple bind; a fresh connection, so the service identity is never replaced). No entry,
or more than one, is a failed login, and costs a bind all the same (to a DN that does
not exist), so an unknown user cannot be told by timing. An empty password never
reaches the server (it would be an unauthenticated bind, RFC 4513 §5.1.2, which
"succeeds"). ``sender_addresses`` reads the entry's sender attributes (default ``mail``).
All LDAP traffic runs in a worker thread (ldap3 is blocking), never on the event loop.
Failure policy: the server unreachable, TLS failing, a timeout, the service bind refused,
or any result other than success / invalid credentials is a temporary failure
(TEMPORARY, ``454 4.7.0``; DirectoryUnavailable from ``sender_addresses``). A user bind
refused with invalidCredentials (49), inappropriateAuthentication (48),
insufficientAccessRights (50) or unwillingToPerform (53) is a failed login.
Config keys (proposed): ``[auth] directory = { ldap = URL, base = DN, filter =
"(&(objectClass=inetOrgPerson)(uid={login}))", bind_dn = DN, bind_password = "...",
start_tls = false, ca_file = PATH, sender_attributes = ["mail"], timeout = "10s" }``;
the filter's ``{login}`` is the whole login, ``{user}`` and ``{domain}`` its parts
around the last ``@``.
Standards: RFC 4511 (LDAP), RFC 4513 (bind), RFC 4515 (filters), RFC 4516 (URLs).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import ssl
import struct
import urllib.parse
import warnings
from dataclasses import dataclass
from typing import Any

with warnings.catch_warnings():
    # ldap3 2.9.1 imports names that pyasn1 0.5+ deprecates (tagMap, typeMap); harmless,
    # but a DeprecationWarning at import (an error under the test suite's filters).
    warnings.simplefilter("ignore", DeprecationWarning)
    import ldap3
    from ldap3.core.exceptions import LDAPException

from tayori import maillog
from tayori.policy.userdb import (
    AuthOutcome,
    DirectoryUnavailable,
    SenderMap,
    refuse_early,
    sender_set,
)

#: User bind results that mean "these credentials are not good" (RFC 4511 §A.1).
REFUSED_BIND = frozenset({48, 49, 50, 53})

#: What ldap3 raises: its own errors, socket and TLS errors, and (seen with bad
#: arguments deep in its socket code) others; all mean "the directory failed".
_LDAP_ERRORS = (LDAPException, OSError, ValueError, TypeError, struct.error)

_PLACEHOLDER = re.compile(r"\{(login|user|domain)\}")
_NO_SUCH_ENTRY = "cn=tayori-no-such-user"


@dataclass(frozen=True, slots=True)
class LdapSettings:
    url: str
    base: str
    filter: str = "(&(objectClass=inetOrgPerson)(uid={login}))"
    bind_dn: str = ""
    bind_password: str = ""
    start_tls: bool = False
    ca_file: str = ""
    sender_attributes: tuple[str, ...] = ("mail",)
    timeout: float = 10.0


def escape_filter_value(value: str) -> str:
    """``value`` safe inside an LDAP filter (RFC 4515 §3): ``*``, ``(``, ``)``, ``\\``,
    NUL and the other control characters as ``\\XX``; everything else as it is."""
    return "".join(f"\\{ord(c):02x}" if c in "*()\\" or ord(c) < 0x20 or c == "\x7f"
                   else c for c in value)


def user_filter(template: str, login: str) -> str:
    """The search filter for ``login``: ``{login}``, ``{user}``, ``{domain}`` in
    ``template`` replaced by the escaped login and its parts."""
    user, _, domain = login.rpartition("@") if "@" in login else (login, "", "")
    values = {"login": login, "user": user, "domain": domain}
    return _PLACEHOLDER.sub(lambda m: escape_filter_value(values[m.group(1)]), template)


class _VerifiedTls(ldap3.Tls):  # type: ignore[misc]
    """TLS for ldap3 with the standard library's checks: the certificate chain against
    ``ca_file`` (empty: the system's CAs) and the host name (or IP address) of the URL.
    ldap3 2.9's own host name check calls ``ssl.match_hostname``, deprecated since
    Python 3.7 and gone in 3.12; this replaces it."""

    def __init__(self, ca_file: str, host: str) -> None:
        super().__init__(validate=ssl.CERT_REQUIRED)
        self._context = ssl.create_default_context(cafile=ca_file or None)
        self._host = host

    def wrap_socket(self, connection: Any, do_handshake: bool = False) -> None:
        connection.socket = self._context.wrap_socket(
            connection.socket, server_side=False, do_handshake_on_connect=do_handshake,
            server_hostname=self._host)


class _Unavailable(Exception):
    """The directory failed in a way that says nothing of the credentials."""


class LdapUsers:
    """A user directory in LDAP (search + bind; see the module docstring)."""

    def __init__(self, settings: LdapSettings, senders: SenderMap | None = None) -> None:
        """Raises OSError / ssl.SSLError when TLS is asked for and ``ca_file`` cannot be
        loaded (a configuration error, found at start)."""
        self.settings = settings
        self._senders = senders
        self._tls: _VerifiedTls | None = None
        if settings.start_tls or settings.url.lower().startswith("ldaps:"):
            host = urllib.parse.urlsplit(settings.url).hostname or ""
            self._tls = _VerifiedTls(settings.ca_file, host)

    async def authenticate(self, login: str, password: str) -> AuthOutcome:
        refused = refuse_early(login, password)
        if refused is not None:
            return refused
        return await asyncio.to_thread(self._authenticate, login, password)

    async def sender_addresses(self, login: str) -> frozenset[str]:
        if self._senders is not None:
            return await self._senders.senders(login)
        if not self.settings.sender_attributes:
            return sender_set(login, ())
        try:
            entries = await asyncio.to_thread(self._search, login)
        except _Unavailable as exc:
            raise DirectoryUnavailable(str(exc)) from exc
        listed = [str(value) for entry in entries[:1] for name in self.settings.sender_attributes
                  for value in _values(entry, name)]
        return sender_set(login, listed)

    # --- blocking parts, run in a worker thread ---------------------------------------

    def _authenticate(self, login: str, password: str) -> AuthOutcome:
        try:
            entries = self._search(login)
            if len(entries) != 1:
                self._bind(f"{_NO_SUCH_ENTRY},{self.settings.base}", password)
                return AuthOutcome.bad("no such user" if not entries else
                                       f"the filter matched {len(entries)} entries")
            if self._bind(str(entries[0]["dn"]), password):
                return AuthOutcome.success(login)
            return AuthOutcome.bad("wrong password")
        except _Unavailable as exc:
            return AuthOutcome.temporary(str(exc))
        except Exception as exc:   # ldap3 failing in a way not foreseen: fail closed
            maillog.error("auth-directory-error", directory=self.settings.url,
                          error=f"{type(exc).__name__}: {exc}")
            return AuthOutcome.temporary(f"LDAP client error {type(exc).__name__}")

    def _server(self) -> ldap3.Server:
        return ldap3.Server(self.settings.url, connect_timeout=self.settings.timeout,
                            tls=self._tls, get_info=ldap3.NONE)

    def _connect(self, user: str | None, password: str | None) -> ldap3.Connection:
        """An open connection (StartTLS done when configured), not yet bound."""
        connection = ldap3.Connection(
            self._server(), user=user, password=password, read_only=True,
            # ldap3 packs it into SO_RCVTIMEO as an integer
            receive_timeout=max(1, math.ceil(self.settings.timeout)),
            raise_exceptions=False, auto_bind=ldap3.AUTO_BIND_NONE)
        try:
            connection.open()
            if self.settings.start_tls and not connection.start_tls():
                raise _Unavailable(f"StartTLS failed: {_result(connection)}")
        except _LDAP_ERRORS as exc:
            _close(connection)
            raise _Unavailable(f"LDAP {self.settings.url}: {exc}") from exc
        return connection

    def _search(self, login: str) -> list[Any]:
        """The entries the filter finds for ``login`` (at most 2 asked for)."""
        settings = self.settings
        connection = self._connect(settings.bind_dn or None, settings.bind_password or None)
        try:
            if settings.bind_dn and not connection.bind():
                raise _Unavailable(f"service bind as {settings.bind_dn} refused: "
                                   f"{_result(connection)}")
            connection.search(settings.base, user_filter(settings.filter, login),
                              search_scope=ldap3.SUBTREE, size_limit=2,
                              attributes=list(settings.sender_attributes))
            code = connection.result.get("result") if connection.result else None
            if code not in (0, 4):   # success, sizeLimitExceeded
                raise _Unavailable(f"LDAP search failed: {_result(connection)}")
            return [e for e in connection.response or () if e.get("type") == "searchResEntry"]
        except _LDAP_ERRORS as exc:
            raise _Unavailable(f"LDAP {settings.url}: {exc}") from exc
        finally:
            _close(connection)

    def _bind(self, dn: str, password: str) -> bool:
        """True when ``dn`` binds with ``password``; False when refused as bad
        credentials; _Unavailable for anything else."""
        connection = self._connect(dn, password)
        try:
            if connection.bind():
                return True
            code = connection.result.get("result") if connection.result else None
            if code in REFUSED_BIND:
                return False
            raise _Unavailable(f"LDAP bind failed: {_result(connection)}")
        except _LDAP_ERRORS as exc:
            raise _Unavailable(f"LDAP {self.settings.url}: {exc}") from exc
        finally:
            _close(connection)


def _close(connection: ldap3.Connection) -> None:
    """Unbind and close; also the socket ldap3 leaves open when its connect fails."""
    with contextlib.suppress(LDAPException, OSError):
        connection.unbind()
    sock = getattr(connection, "socket", None)
    if sock is not None:
        sock.close()


def _values(entry: Any, attribute: str) -> list[object]:
    """An attribute's values in a search response entry (case-insensitive name)."""
    attributes = entry.get("attributes") or {}
    for name, value in attributes.items():
        if name.lower() == attribute.lower():
            return list(value) if isinstance(value, list | tuple) else [value]
    return []


def _result(connection: ldap3.Connection) -> str:
    result = connection.result or {}
    return f"{result.get('result')} {result.get('description', '')} " \
           f"{result.get('message', '')}".strip()
