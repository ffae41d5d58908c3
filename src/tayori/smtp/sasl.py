"""SASL mechanisms for SMTP AUTH, sans-IO: decoded client responses in, steps out.

Takes: a client's responses, already base64-decoded (:func:`decode_initial` and
:func:`decode_response` undo the RFC 4954 §4 encoding: ``=`` for an empty initial
response, ``*`` to cancel, strict base64, at most :data:`MAX_RESPONSE` octets a line).
Promises: a mechanism (one instance per exchange, from :data:`MECHANISMS`) answers
``start(initial)`` and each ``respond(data)`` with a :data:`Step`:
- :class:`Challenge`: send these bytes (the caller base64-encodes them in a 334 reply)
  and pass the client's answer to ``respond``;
- :class:`Credentials`: the exchange is over; check (authzid, login, password) against
  the user directory. The login and password are non-empty UTF-8;
- :class:`SaslError`: the exchange is over, failed; answer with its reply (501 for a
  malformed message, 500 for a line too long), which never quotes the client's data.
The password is kept only in the :class:`Credentials` it returns (LOGIN keeps the
username between its two steps, nothing else), and it is left out of ``repr``, so a
logged step or event never shows it.
Failure policy: no exception for bad input; everything malformed is a SaslError.
Mechanisms: PLAIN (RFC 4616) and LOGIN (draft-murchison-sasl-login). SCRAM-SHA-256
(RFC 7677) would need stored SCRAM keys, which the user directories do not keep.
Standards: RFC 4422 (SASL), RFC 4616 (PLAIN), RFC 4954 §4 (the SMTP profile),
draft-murchison-sasl-login-00 (LOGIN).
"""

from __future__ import annotations

import binascii
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from tayori.errors import Reply

MAX_RESPONSE = 12288  # RFC 4954 §4: a response line of at most 12288 octets (CRLF apart)

CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
BAD_BASE64 = Reply(501, "5.5.2", "Invalid base64 data")
TOO_LONG = Reply(500, "5.5.6", "Authentication line too long")


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send ``data`` to the client and wait for its response."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Credentials:
    """The client's claim: log in as ``login`` (acting as ``authzid``, empty for itself)."""

    authzid: str
    login: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class SaslError:
    """The exchange failed; answer with ``reply``."""

    reply: Reply


Step = Challenge | Credentials | SaslError


class Mechanism(Protocol):
    """One SASL exchange, server side."""

    def start(self, initial: bytes | None) -> Step:
        """Begin, with the client's initial response if it sent one."""
        ...

    def respond(self, data: bytes) -> Step:
        """The client's (decoded) response to the last challenge."""
        ...


class Plain:
    """RFC 4616: one message, ``authzid NUL authcid NUL passwd``."""

    __slots__ = ()

    def start(self, initial: bytes | None) -> Step:
        return Challenge(b"") if initial is None else self.respond(initial)

    def respond(self, data: bytes) -> Step:
        parts = data.split(b"\x00")
        if len(parts) != 3:
            return SaslError(Reply(501, "5.5.2", "Malformed PLAIN message"))
        return _credentials(*parts)


class Login:
    """draft-murchison-sasl-login: ask for the username, then for the password."""

    __slots__ = ("_username",)

    def __init__(self) -> None:
        self._username: bytes | None = None

    def start(self, initial: bytes | None) -> Step:
        return Challenge(b"Username:") if initial is None else self.respond(initial)

    def respond(self, data: bytes) -> Step:
        username = self._username
        if username is None:
            self._username = data
            return Challenge(b"Password:")
        self._username = None
        return _credentials(b"", username, data)


MECHANISMS: Mapping[str, Callable[[], Mechanism]] = {"PLAIN": Plain, "LOGIN": Login}


def decode_initial(text: str) -> bytes | SaslError:
    """The initial response of ``AUTH mechanism initial-response`` (``=``: empty)."""
    return b"" if text == "=" else _base64(text)


def decode_response(line: bytes) -> bytes | SaslError:
    """A client's response line (CRLF removed): ``*`` cancels, else base64."""
    if line == b"*":
        return SaslError(CANCELLED)
    if len(line) > MAX_RESPONSE:
        return SaslError(TOO_LONG)
    return _base64(line)


def _base64(data: str | bytes) -> bytes | SaslError:
    try:
        return binascii.a2b_base64(data, strict_mode=True)
    except ValueError:  # binascii.Error, or non-ASCII text
        return SaslError(BAD_BASE64)


def _credentials(authzid: bytes, login: bytes, password: bytes) -> Step:
    if not (login and password):
        return SaslError(Reply(501, "5.5.2", "Empty login or password"))
    try:
        return Credentials(authzid.decode("utf-8"), login.decode("utf-8"),
                           password.decode("utf-8"))
    except UnicodeDecodeError:
        return SaslError(Reply(501, "5.5.2", "Credentials are not valid UTF-8"))
