"""Dovecot as the user directory: a client of Dovecot's authentication protocol.

Takes: the address of a Dovecot ``auth`` service's client listener: a unix socket path
(``/run/dovecot/auth-client``, or a ``unix_listener`` of tayori's own) or ``HOST:PORT``
of an ``inet_listener`` (``[::1]:PORT`` for IPv6); the service name (``smtp``) and a
timeout for the whole exchange.
Promises: :class:`DovecotAuth` is a :class:`~tayori.policy.userdb.UserDirectory`. Each
``authenticate`` opens a connection (asyncio streams, never blocking the loop) and
speaks the auth-client protocol v1: ``VERSION 1 2`` and ``CPID`` from us; ``VERSION``,
``MECH``..., ``SPID``, ``CUID``, ``COOKIE``, ``DONE`` from Dovecot (a major version
other than 1, or no ``PLAIN`` mechanism, is a temporary failure), then
``AUTH <id> PLAIN service=smtp nologin secured resp=<base64(\\0login\\0password)>`` and
one answer: ``OK`` (the ``user=`` it gives is the login recorded), ``FAIL`` (a failed
login; with ``temp`` or ``code=temp_fail``: temporary). ``nologin``: only the password
is checked, no mail session follows. ``secured``: tayori itself decides where AUTH may
be offered (TLS or a trusted network), so Dovecot's ``disable_plaintext_auth`` does not
second-guess it. Dovecot does the rest: its passdbs, hash schemes, its
``auth_failure_delay`` (keep it in mind for the client's wait) and its own logging.
``sender_addresses``: Dovecot's protocol says nothing of senders, so a login owns
itself (when it is an address) and what a :class:`~tayori.policy.userdb.SenderMap`
given to it lists.
Failure policy: a connection refused, a timeout (``timeout`` for the whole exchange),
a malformed or unexpected line, or the connection closed early are temporary failures
(TEMPORARY, ``454 4.7.0``); ``authenticate`` never raises.
Config keys (proposed): ``[auth] directory = { dovecot = "/run/dovecot/auth-client",
service = "smtp", timeout = "10s" }``, ``senders = PATH``.
Standards: Dovecot's "Authentication Protocol" (design document, v1.2 as in Dovecot
2.3), RFC 4616 (PLAIN).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
from dataclasses import dataclass

from tayori.policy.userdb import AuthOutcome, SenderMap, refuse_early, sender_set

MAX_LINE = 16384
_ids = itertools.count(1)


class ProtocolError(Exception):
    """Dovecot said something this client does not expect."""


@dataclass(frozen=True, slots=True)
class AuthReply:
    """One answer line: the command (``OK``, ``FAIL``, ``CONT``...), its id and the
    optional parameters (``name=value``, or ``name`` → "")."""

    command: str
    request_id: str
    parameters: dict[str, str]


def unescape(value: str) -> str:
    """Undo Dovecot's tab-escaping (``\\x01`` then ``0`` NUL, ``1`` itself, ``t`` TAB,
    ``r`` CR, ``n`` LF; anything else stands for itself)."""
    if "\x01" not in value:
        return value
    out, chars = [], iter(value)
    for char in chars:
        if char == "\x01":
            code = next(chars, "")
            out.append({"0": "\x00", "1": "\x01", "t": "\t", "r": "\r", "n": "\n"}
                       .get(code, code))
        else:
            out.append(char)
    return "".join(out)


def parse_reply(line: str) -> AuthReply:
    fields = line.split("\t")
    if len(fields) < 2:
        raise ProtocolError(f"unexpected reply {line[:80]!r}")
    parameters = {}
    for field in fields[2:]:
        name, _, value = field.partition("=")
        parameters[name] = unescape(value)
    return AuthReply(fields[0], fields[1], parameters)


def auth_request(request_id: int, login: str, password: str, service: str) -> bytes:
    response = base64.b64encode(b"\0" + login.encode() + b"\0" + password.encode())
    return (f"AUTH\t{request_id}\tPLAIN\tservice={service}\tnologin\tsecured\tno-penalty\t"
            f"resp={response.decode('ascii')}\n").encode()


class DovecotAuth:
    """A user directory that asks a Dovecot auth service (see the module docstring)."""

    def __init__(self, address: str, service: str = "smtp", timeout: float = 10.0,
                 senders: SenderMap | None = None) -> None:
        self.address = address
        self.service = service
        self.timeout = timeout
        self._senders = senders

    async def authenticate(self, login: str, password: str) -> AuthOutcome:
        refused = refuse_early(login, password)
        if refused is not None:
            return refused
        try:
            async with asyncio.timeout(self.timeout):
                return await self._exchange(login, password)
        except TimeoutError:
            return AuthOutcome.temporary(f"dovecot auth {self.address}: timed out")
        except (OSError, EOFError, ValueError, asyncio.LimitOverrunError, ProtocolError) as exc:
            return AuthOutcome.temporary(f"dovecot auth {self.address}: {exc}")

    async def sender_addresses(self, login: str) -> frozenset[str]:
        if self._senders is not None:
            return await self._senders.senders(login)
        return sender_set(login, ())

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.address.startswith("/"):
            return await asyncio.open_unix_connection(self.address, limit=MAX_LINE)
        host, _, port = self.address.rpartition(":")
        return await asyncio.open_connection(host.strip("[]"), int(port), limit=MAX_LINE)

    async def _exchange(self, login: str, password: str) -> AuthOutcome:
        reader, writer = await self._open()
        try:
            writer.write(f"VERSION\t1\t2\nCPID\t{os.getpid()}\n".encode())
            await self._handshake(reader)
            request_id = next(_ids)
            writer.write(auth_request(request_id, login, password, self.service))
            await writer.drain()
            return _outcome(login, await _reply(reader, str(request_id)))
        finally:
            writer.close()

    async def _handshake(self, reader: asyncio.StreamReader) -> None:
        """Read the server's handshake up to DONE: version 1, PLAIN offered."""
        mechanisms: set[str] = set()
        version = ""
        while (line := await _line(reader)) != "DONE":
            name, _, rest = line.partition("\t")
            if name == "VERSION":
                version = rest.split("\t", 1)[0]
            elif name == "MECH":
                mechanisms.add(rest.split("\t", 1)[0].upper())
        if version != "1":
            raise ProtocolError(f"unsupported protocol version {version or 'none'}")
        if "PLAIN" not in mechanisms:
            raise ProtocolError("the PLAIN mechanism is not offered "
                                "(auth_mechanisms in dovecot.conf)")


async def _line(reader: asyncio.StreamReader) -> str:
    raw = await reader.readuntil(b"\n")
    return raw.rstrip(b"\n").decode("utf-8", "replace")


async def _reply(reader: asyncio.StreamReader, request_id: str) -> AuthReply:
    """The answer to our request (lines for other ids are skipped)."""
    while True:
        reply = parse_reply(await _line(reader))
        if reply.request_id == request_id:
            return reply


def _outcome(login: str, reply: AuthReply) -> AuthOutcome:
    if reply.command == "OK":
        return AuthOutcome.success(reply.parameters.get("user") or login)
    if reply.command == "FAIL":
        reason = reply.parameters.get("reason", "")
        if "temp" in reply.parameters or reply.parameters.get("code") == "temp_fail":
            return AuthOutcome.temporary(f"dovecot: temporary failure {reason}".strip())
        return AuthOutcome.bad(f"dovecot: failed {reason}".strip())
    raise ProtocolError(f"unexpected {reply.command} for a PLAIN request")
