"""One outbound SMTP or LMTP connection: connect, greet, STARTTLS, AUTH, transactions.

Takes: a :class:`Target` (an IP address and port, or a unix socket for LMTP), the
:class:`ClientSettings` of the action that routes there, and per message a
:class:`Transaction` (sender, recipients, options, the spool file).
Promises:
- :meth:`Connection.open` returns a greeted connection, with TLS as the policy asks
  (``none``; ``may``: STARTTLS when offered; ``encrypt``: STARTTLS required;
  ``verify``: STARTTLS with a certificate valid for the host name), or raises
  :class:`HopError`: this hop cannot take mail now, another may (connection refused or
  timed out, a 4xx/5xx greeting, EHLO and HELO refused, TLS required but failed).
  Under ``may`` a failed handshake raises :class:`TlsFallback`: the caller reconnects
  without TLS, and the log says so.
- :meth:`Connection.send` runs one transaction and returns one final reply per
  recipient, in order: the RCPT refusal, or the DATA/BDAT outcome (LMTP: each
  recipient's own reply after DATA, RFC 2033 §4.2). It never raises for the server's
  answers; a timeout or a lost connection gives the recipients still open a temporary
  ``451 4.4.2`` and marks the connection broken. Limits are checked first: a message
  above the server's SIZE is refused ``552 5.3.4``, an SMTPUTF8 message to a server
  without SMTPUTF8 ``553 5.6.7`` (RFC 6531 §3.4), BINARYMIME without CHUNKING
  ``554 5.6.3``; an 8-bit message to a server without 8BITMIME is downgraded
  (RFC 6152, :mod:`tayori.deliver.downgrade`).
- MAIL and RCPT go in one write when the server offers PIPELINING (RFC 2920); content
  goes by BDAT when it offers CHUNKING (RFC 3030), otherwise DATA, dot-stuffed; every
  line ends in CRLF (:class:`tayori.smtp.client.ContentEncoder`).
- A transaction's :data:`Prefix` (DKIM signatures, an ARC set: :mod:`tayori.auth.outbound`)
  is asked for its header fields before MAIL, given the content exactly as it will go
  out (downgraded if need be, CRLF line ends, not dot-stuffed), and they go in front of
  it; ``SIZE=`` and the size check count them (and the downgrade's growth).
- Timeouts are RFC 5321 §4.5.3.2's: greeting 5 min, MAIL/RCPT 5 min, DATA 2 min, each
  data block 3 min, the final reply 10 min; connecting 30 s. All configurable.
Failure policy: no exception text reaches a reply: texts name the host and what failed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import ssl
import time
from collections.abc import Awaitable, Callable, Container, Iterable, Iterator
from dataclasses import dataclass, field, replace

from tayori.deliver import downgrade
from tayori.errors import Reply
from tayori.receive.tls import TlsInfo, info_of
from tayori.smtp.client import (
    Capabilities,
    ContentEncoder,
    MailOptions,
    ProtocolError,
    ReplyReader,
    mail_command,
    rcpt_command,
)

READ_SIZE = 64 * 1024
CHUNK_SIZE = 1024 * 1024   # BDAT chunk and file read size
TLS_POLICIES = ("none", "may", "encrypt", "verify")
Prefix = Callable[[bytes], Awaitable[bytes]]
"""Given a message's content as it goes out, the header fields (CRLF) to put before it,
``b""`` for none. It must not raise: it decides itself what a failure means."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 30.0
    greeting: float = 300.0
    command: float = 300.0
    data_start: float = 120.0
    data_block: float = 180.0
    data_end: float = 600.0


@dataclass(frozen=True, slots=True)
class ClientSettings:
    helo_name: str
    lmtp: bool = False
    tls: str = "may"
    tls_ca_file: str = ""
    source_address: str = ""
    auth_user: str = ""
    auth_password: str = ""
    timeouts: Timeouts = field(default_factory=Timeouts)


@dataclass(frozen=True, slots=True)
class Target:
    """Where to connect: ``host`` names it (logs, SNI, Remote-MTA); ``address`` is an IP
    address, or a unix socket path when ``port`` is 0."""

    host: str
    address: str
    port: int

    def describe(self) -> str:
        if self.port == 0:
            return f"unix:{self.address}"
        return f"{self.host}[{self.address}]:{self.port}"


@dataclass(frozen=True, slots=True)
class Recipient:
    address: str
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None


@dataclass(frozen=True, slots=True)
class Transaction:
    sender: str
    recipients: tuple[Recipient, ...]
    options: MailOptions
    path: str                     # the spool's body file
    prefix: Prefix | None = None  # header fields to send before the content


@dataclass(frozen=True, slots=True)
class _Content:
    """What goes out after the data command: pieces (not yet CRLF-checked nor stuffed)
    and their total size (for ``SIZE=``)."""

    pieces: Iterable[bytes]
    size: int


class HopError(Exception):
    """This hop cannot take mail now; ``reply`` says why (recorded as the last error)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class TlsFallback(HopError):
    """STARTTLS failed under ``tls = may``: try again without TLS."""


class _Broken(Exception):
    """Timeout, lost connection or garbage from the server during a transaction."""


class Connection:
    def __init__(self, target: Target, settings: ClientSettings,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.target, self.settings = target, settings
        self._reader, self._writer = reader, writer
        self._replies = ReplyReader()
        self._pending: list[Reply] = []
        self.caps = Capabilities()
        self.tls: TlsInfo | None = None
        self.broken = False
        self.transactions = 0
        self.server_name = ""

    # --- opening ----------------------------------------------------------------------

    @classmethod
    async def open(cls, target: Target, settings: ClientSettings,
                   use_tls: bool = True) -> Connection:
        timeouts = settings.timeouts
        try:
            if target.port == 0:
                opening = asyncio.open_unix_connection(target.address, limit=READ_SIZE)
            else:
                local = (settings.source_address, 0) if settings.source_address else None
                opening = asyncio.open_connection(target.address, target.port,
                                                  local_addr=local, limit=READ_SIZE)
            reader, writer = await asyncio.wait_for(opening, timeouts.connect)
        except TimeoutError:
            raise HopError(Reply(451, "4.4.1", f"connect to {target.describe()}: "
                                 "timed out")) from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise HopError(Reply(451, "4.4.1", f"connect to {target.describe()}: "
                                 f"{reason}")) from None
        connection = cls(target, settings, reader, writer)
        try:
            await connection._greet(use_tls)
        except BaseException:
            connection.close()
            raise
        return connection

    async def _greet(self, use_tls: bool) -> None:
        greeting = await self._expect_hop("greeting", self.settings.timeouts.greeting)
        if greeting.code != 220:
            raise HopError(_remote(greeting))
        words = greeting.text.split()
        self.server_name = words[0] if words else ""   # RFC 5321 §4.2: the server's domain
        await self._hello()
        policy = self.settings.tls if use_tls and not self.settings.lmtp else "none"
        if policy in ("encrypt", "verify") and not self.caps.starttls:
            raise HopError(Reply(451, "4.7.4", f"TLS is required, but {self.target.describe()}"
                                 " does not offer STARTTLS"))
        if policy != "none" and self.caps.starttls:
            await self._starttls(policy)
        if self.settings.auth_user:
            if self.tls is None and self.settings.tls != "none":   # STARTTLS stripped?
                raise HopError(Reply(451, "4.7.0", f"no TLS with {self.target.describe()}: "
                                     "the password is not sent in plain text"))
            await self._authenticate()

    async def _hello(self) -> None:
        name = self.settings.helo_name
        verb = "LHLO" if self.settings.lmtp else "EHLO"
        reply = await self._command_hop(f"{verb} {name}\r\n".encode(), verb)
        if reply.code == 250:
            self.caps = Capabilities.parse(reply)
            return
        if self.settings.lmtp or reply.code == 421:
            raise HopError(_remote(reply))
        reply = await self._command_hop(f"HELO {name}\r\n".encode(), "HELO")
        if reply.code != 250:
            raise HopError(_remote(reply))
        self.caps = Capabilities()

    async def _starttls(self, policy: str) -> None:
        failure = TlsFallback if policy == "may" else HopError
        reply = await self._command_hop(b"STARTTLS\r\n", "STARTTLS")
        if reply.code != 220:
            raise failure(_remote(reply))
        if self._pending or self._replies.buffered or _unread(self._reader):
            # plaintext after the 220 would be read as if it came over TLS (the
            # STARTTLS injection of CVE-2011-0411): no TLS on this connection
            raise failure(Reply(451, "4.7.5", f"{self.target.describe()} sent data after its "
                                "STARTTLS reply"))
        try:
            await asyncio.wait_for(
                self._writer.start_tls(self._tls_context(policy),
                                       server_hostname=self._tls_name(policy)),
                self.settings.timeouts.command)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            reason = exc.reason if isinstance(exc, ssl.SSLError) and exc.reason else \
                "handshake failed"
            raise failure(Reply(451, "4.7.5", f"TLS with {self.target.describe()} failed: "
                                f"{reason}")) from None
        self.tls = info_of(self._writer.get_extra_info("ssl_object"))
        await self._hello()

    def _tls_name(self, policy: str) -> str | None:
        """The name sent in SNI and checked in the certificate. For an address literal
        no SNI is sent, but under ``verify`` the address itself is checked (IP SAN):
        without a name, only the chain would be."""
        name = _server_name(self.target.host)
        if name is None and policy == "verify":
            return self.target.address
        return name

    def _tls_context(self, policy: str) -> ssl.SSLContext:
        if policy == "verify":
            context = ssl.create_default_context(cafile=self.settings.tls_ca_file or None)
        else:  # opportunistic or encrypt-only: no authentication (RFC 7435)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    async def _authenticate(self) -> None:
        user, password = self.settings.auth_user, self.settings.auth_password
        if "PLAIN" in self.caps.auth:
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            reply = await self._command_hop(f"AUTH PLAIN {token}\r\n".encode(), "AUTH")
        elif "LOGIN" in self.caps.auth:
            reply = await self._command_hop(b"AUTH LOGIN\r\n", "AUTH")
            for secret in (user, password):
                if reply.code != 334:
                    break
                reply = await self._command_hop(
                    base64.b64encode(secret.encode()) + b"\r\n", "AUTH")
        else:
            raise HopError(Reply(451, "4.7.0", f"{self.target.describe()} offers no AUTH "
                                 "mechanism we can use (PLAIN, LOGIN)"))
        if reply.code != 235:
            raise HopError(_remote(reply))

    # --- transactions -----------------------------------------------------------------

    async def send(self, transaction: Transaction) -> list[Reply]:
        """One final reply per recipient (see the module docstring)."""
        count = len(transaction.recipients)
        refusal = self._refusal(transaction.options)
        if refusal is not None:
            return [refusal] * count
        self.transactions += 1
        results: list[Reply | None] = [None] * count
        try:
            content = await self._prepare(transaction)
            options = replace(transaction.options, size=content.size)
            refusal = self._refusal(options)   # the prefix counts too
            if refusal is not None:
                return [refusal] * count
            await self._transaction(replace(transaction, options=options), content, results)
        except (_Broken, OSError, TimeoutError, ProtocolError) as exc:
            self.broken = True
            lost = Reply(451, "4.4.2", f"lost connection with {self.target.describe()} "
                         f"while {exc.args[0] if isinstance(exc, _Broken) else 'talking'}")
            return [lost if result is None else result for result in results]
        return [result or Reply(451, "4.3.0", "no reply") for result in results]

    async def _prepare(self, tx: Transaction) -> _Content:
        """The content to send: the spool file read as it is sent, unless it must be
        downgraded or prefixed (then whole, off the event loop: CPU work)."""
        downgrading = tx.options.body == "8BITMIME" and not (
            self.caps.eightbitmime or self.caps.binarymime)
        if not downgrading and tx.prefix is None:
            return _Content(_read_chunks(tx.path), tx.options.size)
        data = await asyncio.get_running_loop().run_in_executor(
            None, _outgoing, tx.path, downgrading, tx.options.body == "BINARYMIME")
        prefix = await tx.prefix(data) if tx.prefix is not None else b""
        return _Content(_pieces(prefix, data), len(prefix) + len(data))

    def _refusal(self, options: MailOptions) -> Reply | None:
        caps, who = self.caps, self.target.describe()
        if caps.size and options.size > caps.size:
            return Reply(552, "5.3.4", f"message size {options.size} exceeds the limit of "
                         f"{caps.size} bytes of {who}")
        if options.smtputf8 and not caps.smtputf8:
            return Reply(553, "5.6.7", f"the message needs SMTPUTF8, which {who} does not "
                         "support")
        if options.body == "BINARYMIME" and (self.settings.lmtp or not (
                caps.chunking and caps.binarymime)):
            return Reply(554, "5.6.3", f"the message is binary (BINARYMIME), which {who} "
                         "cannot take")
        return None

    async def _transaction(self, tx: Transaction, content: _Content,
                           results: list[Reply | None]) -> None:
        timeouts = self.settings.timeouts
        commands = [mail_command(tx.sender, tx.options, self.caps)]
        commands += [rcpt_command(r.address, self.caps, r.notify, r.orcpt)
                     for r in tx.recipients]
        if self.caps.pipelining:
            self._write(b"".join(commands))
            replies = [await self._read("MAIL/RCPT", timeouts.command) for _ in commands]
        else:
            replies = []
            for command in commands:
                self._write(command)
                replies.append(await self._read("MAIL/RCPT", timeouts.command))
                if replies[0].code != 250:
                    break
        mail = _expect(replies[0], (250,), "MAIL")
        if mail.code != 250:
            results[:] = [_remote(mail)] * len(results)
            await self.reset()
            return
        accepted = []
        for index, raw in enumerate(replies[1:]):
            reply = _expect(raw, (250, 251), "RCPT")
            if reply.code in (250, 251):
                accepted.append(index)
            else:
                results[index] = _remote(reply)
        if not accepted:
            await self.reset()
            return
        replies = await self._content(content.pieces, tx.options.body, len(accepted))
        for index, reply in zip(accepted, replies, strict=True):
            results[index] = _remote(_expect(reply, range(200, 300), "the data"))

    async def _content(self, chunks: Iterable[bytes], body: str, accepted: int) -> list[Reply]:
        timeouts = self.settings.timeouts
        if self.caps.chunking and not self.settings.lmtp:
            return [await self._bdat(chunks, binary=body == "BINARYMIME")] * accepted
        self._write(b"DATA\r\n")
        reply = await self._read("DATA", timeouts.data_start)
        if reply.code != 354:
            return [_expect(reply, (354,), "DATA")] * accepted
        encoder = ContentEncoder(dot_stuff=True)
        for chunk in chunks:
            self._write(encoder.feed(chunk))
            await self._drain()
        self._write(encoder.end())
        if not self.settings.lmtp:   # SMTP: one reply for every accepted recipient
            return [await self._read("the end of data", timeouts.data_end)] * accepted
        return [await self._read("the end of data", timeouts.data_end)
                for _ in range(accepted)]

    async def _bdat(self, chunks: Iterable[bytes], *, binary: bool) -> Reply:
        """Chunks as BDAT commands, sent back to back (RFC 3030 §4.2 allows it);
        the reply to the last is the outcome unless an earlier one refused. A binary
        body (BINARYMIME) goes as it is; text gets CRLF line ends."""
        encoder = ContentEncoder(dot_stuff=False)
        sent = 0
        previous = b""
        for chunk in chunks:
            data = previous
            previous = chunk if binary else encoder.feed(chunk)
            if data:
                self._write(b"BDAT %d\r\n" % len(data) + data)
                sent += 1
                await self._drain()
        data = previous + (b"" if binary else encoder.end())
        self._write(b"BDAT %d LAST\r\n" % len(data) + data)
        replies = [await self._read("BDAT", self.settings.timeouts.data_end)
                   for _ in range(sent + 1)]
        return next((r for r in replies if r.code != 250), replies[-1])

    async def reset(self) -> bool:
        """RSET, so that the connection can carry another message; False if it cannot."""
        if self.broken:
            return False
        try:
            self._write(b"RSET\r\n")
            reply = await self._read("RSET", self.settings.timeouts.command)
        except (_Broken, OSError, TimeoutError, ProtocolError):
            self.broken = True
            return False
        self.broken = reply.code != 250
        return not self.broken

    async def quit(self) -> None:
        """QUIT politely (a short wait for the reply), then close."""
        if not self.broken:
            with contextlib.suppress(Exception):
                self._write(b"QUIT\r\n")
                await self._read("QUIT", 5.0)
        self.close()

    def close(self) -> None:
        self.broken = True
        self._writer.close()

    # --- I/O --------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        self._writer.write(data)

    async def _drain(self) -> None:
        try:
            await asyncio.wait_for(self._writer.drain(), self.settings.timeouts.data_block)
        except TimeoutError:
            raise _Broken("sending the message") from None

    async def _read(self, stage: str, seconds: float) -> Reply:
        deadline = time.monotonic() + seconds
        while not self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Broken(f"waiting for the reply to {stage} (timeout)")
            try:
                data = await asyncio.wait_for(self._reader.read(READ_SIZE), remaining)
            except TimeoutError:
                raise _Broken(f"waiting for the reply to {stage} (timeout)") from None
            if not data:
                raise _Broken(f"waiting for the reply to {stage}")
            self._pending += self._replies.feed(data)
        return self._pending.pop(0)

    async def _expect_hop(self, stage: str, seconds: float) -> Reply:
        try:
            return await self._read(stage, seconds)
        except (_Broken, OSError, ProtocolError) as exc:
            what = exc.args[0] if isinstance(exc, _Broken) else f"waiting for {stage}"
            raise HopError(Reply(451, "4.4.2", f"lost connection with "
                                 f"{self.target.describe()} while {what}")) from None

    async def _command_hop(self, command: bytes, stage: str) -> Reply:
        self._write(command)
        return await self._expect_hop(stage, self.settings.timeouts.command)



def _read_chunks(path: str) -> Iterator[bytes]:
    """The body file in pieces, read as they are sent (bounded memory)."""
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_SIZE):
            yield chunk


def _unread(reader: asyncio.StreamReader) -> int:
    """Bytes received but not yet read (asyncio has no public way to ask)."""
    return len(getattr(reader, "_buffer", b""))


def is_ip(text: str) -> bool:
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(text)
        return True
    return False


def _server_name(host: str) -> str | None:
    """The name for SNI and certificate checks; none for an address or address literal."""
    return None if host.startswith("[") or is_ip(host) else host


def _outgoing(path: str, downgrading: bool, binary: bool) -> bytes:
    """The whole message as it goes out, before any dot-stuffing: downgraded (RFC 6152)
    when asked, with CRLF line ends as :class:`ContentEncoder` makes them (binary
    content goes as it is)."""
    with open(path, "rb") as handle:
        data = handle.read()
    if downgrading:
        data = downgrade.downgrade(data)
    if binary:
        return data
    encoder = ContentEncoder(dot_stuff=False)
    return encoder.feed(data) + encoder.end()


def _pieces(prefix: bytes, data: bytes) -> Iterator[bytes]:
    """``prefix`` and ``data`` in pieces of about :data:`CHUNK_SIZE` (the prefix goes
    with the first: no BDAT chunk of its own)."""
    yield prefix + data[:CHUNK_SIZE]
    for start in range(CHUNK_SIZE, len(data), CHUNK_SIZE):
        yield data[start:start + CHUNK_SIZE]


def _expect(reply: Reply, good: Container[int], stage: str) -> Reply:
    """A failure stays as the server said it; a positive reply that this stage does not
    allow (RFC 5321 §4.3.2) is a temporary error: nothing may count as delivered then."""
    if reply.code >= 400 or reply.code in good:
        return reply
    return Reply(451, "4.5.0", f"unexpected reply to {stage}: {reply}")


def _remote(reply: Reply) -> Reply:
    """The server's reply as kept for the log and the DSN, with a status code always."""
    return reply if reply.status else Reply(reply.code, f"{reply.code // 100}.0.0", reply.text)
