"""A scriptable SMTP/LMTP server for tests: :class:`SmtpPeer`.

Takes: an address to listen on (tests use ``127.0.0.2:25``, ``127.0.0.3:25``...: the
whole 127.0.0.0/8 answers on Linux, and root may bind port 25), the ESMTP extensions to
offer, a greeting, and verdict functions for each phase (``None`` = the standard
positive answer).
Promises: the peer runs its own asyncio loop in a background thread, so a synchronous
test and a separate tayori process can both talk to it; :meth:`SmtpPeer.start` returns
once it listens, and raises :class:`OSError` naming the address when it cannot (port in
use); :meth:`SmtpPeer.stop` closes every connection and the listener. Every transaction
that reaches the end of its data is recorded as a :class:`ReceivedMessage`, with the raw
command lines of the session, the raw MAIL/RCPT parameters, the content as received
(unstuffed), whether TLS was on and the replies given; :attr:`SmtpPeer.messages` (the
accepted ones) and :attr:`SmtpPeer.transactions` are snapshots safe to read from any
thread, :meth:`SmtpPeer.wait_for_messages` waits for them with a deadline.
The protocol is tayori's own sans-IO :class:`~tayori.smtp.server.ServerEngine` (so the
peer's syntax checks are tayori's). What the engine does not do is added here, in a
small subclass that sees each command line: recording the lines, LMTP's ``LHLO``
(rewritten to the engine's EHLO; HELO/EHLO are refused in LMTP mode), the RFC 5321 §3.1
``554`` greeting after which only QUIT is accepted (503 to everything else). LMTP's
per-recipient replies after the data (RFC 2033 §4.2) are written after the engine's first
reply. The engine's own replies keep their enhanced status codes even when
ENHANCEDSTATUSCODES is not offered.
Failure policy: a verdict function that raises answers ``451 4.3.0`` and the exception is
kept in :attr:`SmtpPeer.errors`; :meth:`SmtpPeer.stop` re-raises the first one (so a
broken test script does not pass silently). Verdict functions run on the peer's thread
and must not block; they may be replaced while the peer runs.
Standards: RFC 5321, RFC 2033 (LMTP), RFC 3207 (STARTTLS; a self-signed certificate made
by :func:`tayori.receive.tls.self_signed`), and what the engine follows.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

from tayori.address import AddressError, split_path
from tayori.errors import INTERNAL_ERROR, Reply
from tayori.receive.tls import self_signed, server_context
from tayori.smtp.server import (
    EXTENSIONS_ALL,
    ChunkEnd,
    Event,
    Hello,
    MailFrom,
    MessageBegin,
    MessageData,
    MessageEnd,
    RcptTo,
    ServerEngine,
    Settings,
    StartTls,
    Verify,
)

TIMEOUT = 10.0
DEFAULT_MAX_SIZE = 50 * 1024 * 1024
NO_SERVICE = Reply(503, "5.5.1", "No service here: only QUIT")
NOT_LMTP = Reply(500, "5.5.1", "This is an LMTP server: use LHLO")

HelloVerdict = Callable[[str], Reply | None]
AddressVerdict = Callable[[str], Reply | None]
DataVerdict = Callable[["ReceivedMessage"], Reply | None]
RecipientDataVerdict = Callable[[str, "ReceivedMessage"], Reply | None]


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """One transaction that reached the end of its data (accepted or not).

    ``sender`` is ``""`` for the null sender; ``mail_params`` and ``rcpt_params`` are the
    parameter text as the client sent it (``"SIZE=120 RET=HDRS ENVID=x"``); ``commands``
    are the raw command lines of the session up to this message's end (EHLO, STARTTLS,
    earlier transactions included); ``pipelined`` is True when a MAIL or RCPT line was
    read while more input already waited (the client did not wait for its reply: on
    loopback a good sign of RFC 2920 pipelining); ``replies`` are the final replies,
    one in SMTP, one per recipient in LMTP; ``session`` counts the peer's connections
    from 1 (equal numbers: the same connection was reused).
    """

    session: int
    helo: str
    sender: str
    mail_params: str
    recipients: tuple[str, ...]
    rcpt_params: tuple[str, ...]
    data: bytes
    tls: bool
    bdat: bool
    pipelined: bool
    commands: tuple[str, ...]
    replies: tuple[Reply, ...] = ()

    @property
    def accepted(self) -> bool:
        """True when some recipient got a positive final reply."""
        return any(reply.is_positive for reply in self.replies)

    @property
    def delivered_to(self) -> tuple[str, ...]:
        """The recipients whose final reply was positive (all of them, in SMTP)."""
        if len(self.replies) == 1:
            return self.recipients if self.replies[0].is_positive else ()
        return tuple(rcpt for rcpt, reply in zip(self.recipients, self.replies, strict=True)
                     if reply.is_positive)


class _Engine(ServerEngine):
    """The server engine, plus what a test peer needs: it sees every command line.

    It overrides the engine's private ``_command`` (and uses ``_refuse``): a public
    per-line hook in :class:`ServerEngine` would let it stop doing so.
    """

    def __init__(self, settings: Settings, *, lmtp: bool, refusing: bool) -> None:
        super().__init__(settings)
        self.lmtp = lmtp
        self.refusing = refusing  # after a 5xx greeting: only QUIT (RFC 5321 §3.1)
        self.lines: list[str] = []
        self.input_waiting: list[bool] = []

    def _command(self, line: bytes) -> None:
        self.lines.append(line.decode("utf-8", "replace"))
        self.input_waiting.append(self.buffered > 0)
        verb = line.split(b" ", 1)[0].upper()
        if self.refusing and verb != b"QUIT":
            self._refuse(verb.decode("ascii", "replace")[:16], NO_SERVICE)
            return
        if self.lmtp:
            if verb in (b"EHLO", b"HELO"):
                self._refuse(verb.decode(), NOT_LMTP)
                return
            if verb == b"LHLO":
                line = b"EHLO" + line[4:]
        super()._command(line)


class SmtpPeer:
    """A scriptable SMTP (or LMTP, ``lmtp=True``) server; see the module docstring.

    ``extensions`` are exactly the EHLO keywords offered, in order: ``"SIZE 1000"`` offers
    SIZE with that limit (and enforces it), plain ``"SIZE"`` the default 50 MiB, and
    ``"STARTTLS"`` (always listed last) makes a self-signed certificate for ``hostname``
    (:attr:`cert_path`). ``greeting``: ``421 ...`` is sent and the connection closed;
    any other 5xx is sent and then every command but QUIT gets 503. ``hello_reply(name)``,
    ``mail_reply(sender)``, ``rcpt_reply(address)``: a refusal, or None to accept.
    ``data_reply(message)``: the final reply (None: ``250 2.0.0 Ok: queued as ...``); in
    LMTP ``lmtp_reply(address, message)`` gives each recipient's reply, falling back to
    ``data_reply`` and then to ``250 2.0.0 <address> delivered``. ``starttls_reply``
    refuses STARTTLS (e.g. ``454 4.7.0``) after offering it.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        hostname: str = "peer.test",
        extensions: Iterable[str] = EXTENSIONS_ALL,
        lmtp: bool = False,
        greeting: Reply | None = None,
        hello_reply: HelloVerdict | None = None,
        mail_reply: AddressVerdict | None = None,
        rcpt_reply: AddressVerdict | None = None,
        data_reply: DataVerdict | None = None,
        lmtp_reply: RecipientDataVerdict | None = None,
        starttls_reply: Reply | None = None,
        tls_handshake_fails: bool = False,
        max_recipients: int = 1000,
    ) -> None:
        self.host = host
        self.port = port
        self.hostname = hostname
        self.lmtp = lmtp
        self.greeting = greeting
        self.hello_reply = hello_reply
        self.mail_reply = mail_reply
        self.rcpt_reply = rcpt_reply
        self.data_reply = data_reply
        self.lmtp_reply = lmtp_reply
        self.starttls_reply = starttls_reply
        self.tls_handshake_fails = tls_handshake_fails
        self.settings = _settings(hostname, extensions, max_recipients)
        self.cert_path: Path | None = None
        self.key_path: Path | None = None
        self._tls_dir: Path | None = None
        self._tls_context: ssl.SSLContext | None = None
        self._lock = threading.Condition()
        self._transactions: list[ReceivedMessage] = []
        self._errors: list[BaseException] = []
        self._connections = 0
        self._queued = 0
        self._sessions: set[_Session] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None

    # --- life ------------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> SmtpPeer:
        if self._loop is not None:
            raise RuntimeError("SmtpPeer is already started")
        if self.settings.tls_available and self._tls_context is None:
            self._tls_dir = Path(tempfile.mkdtemp(prefix="tayori-peer-tls-"))
            cert, key = self_signed(str(self._tls_dir), self.hostname)
            self.cert_path, self.key_path = Path(cert), Path(key)
            self._tls_context = server_context(cert, key)
            if self.tls_handshake_fails:   # no version left to agree on: 220, then failure
                self._tls_context.minimum_version = ssl.TLSVersion.TLSv1_3
                self._tls_context.maximum_version = ssl.TLSVersion.TLSv1_2
        loop = self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name=f"SmtpPeer {self.host}",
                                        daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._listen(), loop).result(TIMEOUT)
        except OSError as exc:
            self.stop(check=False)
            raise OSError(exc.errno, f"SmtpPeer cannot listen on {self.host}:{self.port}: "
                                     f"{exc.strerror or exc}") from exc
        return self

    def stop(self, *, check: bool = True) -> None:
        """Close every connection and the listener; with ``check``, re-raise the first
        exception a verdict function raised."""
        loop = self._loop
        if loop is not None:
            if loop.is_running():
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(TIMEOUT)
            self._end_loop()
        if self._tls_dir is not None:
            shutil.rmtree(self._tls_dir, ignore_errors=True)
            self._tls_dir = None
            self._tls_context = None
        with self._lock:
            errors = list(self._errors)
        if check and errors:
            raise RuntimeError("an SmtpPeer verdict function raised") from errors[0]

    def __enter__(self) -> SmtpPeer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.stop(check=exc_type is None)

    def _run_loop(self) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        loop.run_forever()

    def _end_loop(self) -> None:
        loop, thread = self._loop, self._thread
        assert loop is not None and thread is not None
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT)
        if thread.is_alive():
            raise RuntimeError("SmtpPeer's loop thread did not stop")
        loop.close()
        self._loop = self._thread = None

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Session(self), self.host, self.port,
                                          reuse_address=True, backlog=128)
        self.port = int(server.sockets[0].getsockname()[1])
        self._server = server

    async def _shutdown(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        sessions = list(self._sessions)
        upgrades = [s.upgrade for s in sessions if s.upgrade is not None]
        for session in sessions:
            session.abort()
        await asyncio.gather(*upgrades, return_exceptions=True)
        if sessions:
            waiters = [asyncio.ensure_future(s.lost.wait()) for s in sessions]
            _, pending = await asyncio.wait(waiters, timeout=TIMEOUT)
            for waiter in pending:
                waiter.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    # --- what it saw -----------------------------------------------------------------------

    @property
    def messages(self) -> list[ReceivedMessage]:
        """The accepted transactions, oldest first (a snapshot)."""
        with self._lock:
            return [m for m in self._transactions if m.accepted]

    @property
    def transactions(self) -> list[ReceivedMessage]:
        """Every transaction that reached the end of its data, accepted or refused."""
        with self._lock:
            return list(self._transactions)

    @property
    def connections(self) -> int:
        """How many connections the peer has accepted."""
        with self._lock:
            return self._connections

    @property
    def errors(self) -> list[BaseException]:
        with self._lock:
            return list(self._errors)

    def clear(self) -> None:
        """Forget the recorded transactions (and errors)."""
        with self._lock:
            self._transactions.clear()
            self._errors.clear()

    def wait_for_messages(self, count: int, timeout: float = TIMEOUT) -> list[ReceivedMessage]:
        """The accepted messages once there are at least ``count``; TimeoutError after
        ``timeout`` seconds."""
        with self._lock:
            if not self._lock.wait_for(lambda: len(self._accepted()) >= count, timeout):
                raise TimeoutError(f"SmtpPeer {self.host}:{self.port}: {count} message(s) "
                                   f"expected, {len(self._accepted())} accepted in {timeout}s "
                                   f"({len(self._transactions)} transactions)")
            return self._accepted()

    def _accepted(self) -> list[ReceivedMessage]:
        return [m for m in self._transactions if m.accepted]

    # --- called from the sessions (loop thread) --------------------------------------------

    def _opened(self, session: _Session) -> int:
        self._sessions.add(session)
        with self._lock:
            self._connections += 1
            return self._connections

    def _closed(self, session: _Session) -> None:
        self._sessions.discard(session)

    def _record(self, message: ReceivedMessage) -> None:
        with self._lock:
            self._transactions.append(message)
            self._lock.notify_all()

    def _queue_id(self) -> str:
        with self._lock:
            self._queued += 1
            return f"PEER{self._queued}"

    def _verdict(self, function: Callable[[], Reply | None]) -> Reply | None:
        try:
            return function()
        except Exception as exc:
            with self._lock:
                self._errors.append(exc)
            return INTERNAL_ERROR


def _settings(hostname: str, extensions: Iterable[str], max_recipients: int) -> Settings:
    keywords: list[str] = []
    max_size = DEFAULT_MAX_SIZE
    tls = False
    for item in extensions:
        keyword, _, value = item.strip().partition(" ")
        keyword = keyword.upper()
        if keyword == "STARTTLS":
            tls = True
            continue
        if keyword == "SIZE" and value.strip():
            max_size = int(value)
        keywords.append(keyword if keyword == "SIZE" else item.strip())
    return Settings(hostname=hostname, max_message_size=max_size,
                    max_recipients=max_recipients, tls_available=tls,
                    extensions=tuple(keywords))


def _raw_params(argument: str) -> str:
    """The parameter text after the path of ``FROM:<path> params`` / ``TO:<path> ...``."""
    _, _, rest = argument.partition(":")
    try:
        return split_path(rest)[1].strip()
    except AddressError:
        return ""


class _Session(asyncio.Protocol):
    """One connection to the peer, driving an :class:`_Engine`."""

    def __init__(self, peer: SmtpPeer) -> None:
        self.peer = peer
        greeting = peer.greeting
        refusing = greeting is not None and greeting.code >= 500
        self.engine = _Engine(peer.settings, lmtp=peer.lmtp, refusing=refusing)
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.Event()
        self.number = 0
        self.tls = False
        self._upgrading = False
        self._held = bytearray()  # input that arrived during the TLS handshake
        self.upgrade: asyncio.Task[None] | None = None
        self._sender = ""
        self._mail_params = ""
        self._mail_index = 0
        self._recipients: list[tuple[str, str]] = []
        self._data = bytearray()

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.number = self.peer._opened(self)
        greeting = self.peer.greeting
        kind = "LMTP" if self.peer.lmtp else "ESMTP"
        if greeting is None:
            self.engine.greet(Reply(220, None, f"{self.peer.hostname} {kind} tayori test peer"))
        elif self.engine.refusing:
            self._write(greeting.to_bytes())
        else:
            self.engine.greet(greeting)  # a 4xx greeting closes the connection
        self._process()

    def data_received(self, data: bytes) -> None:
        if self._upgrading:
            self._held += data
            return
        self.engine.receive(data)
        self._process()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.peer._closed(self)
        self.lost.set()

    def abort(self) -> None:
        if self.upgrade is not None:
            self.upgrade.cancel()
        if self.transport is not None:
            self.transport.abort()
        if self._upgrading or self.transport is None:
            # during a TLS handshake the transport no longer calls connection_lost here
            self.connection_lost(None)

    # --- the conversation ------------------------------------------------------------------

    def _process(self) -> None:
        engine = self.engine
        while not (engine.closed or self._upgrading):
            event = engine.next_event()
            if event is None:
                break
            self._dispatch(event)
        self._flush()
        if engine.closed and self.transport is not None:
            self.transport.close()

    def _flush(self) -> None:
        self._write(self.engine.data_to_send())

    def _write(self, data: bytes) -> None:
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _answer(self, reply: Reply | None) -> None:
        if reply is None:
            self.engine.accept()
        else:
            self.engine.reply(reply)

    def _dispatch(self, event: Event) -> None:
        peer, engine = self.peer, self.engine
        match event:
            case MessageData(data=data):
                self._data += data
            case Hello(name=name):
                hello = peer.hello_reply
                self._answer(peer._verdict(lambda: hello(name) if hello else None))
            case MailFrom(sender=sender):
                self._sender = str(sender) if sender else ""
                self._mail_params = _raw_params(engine.lines[-1][4:])
                self._mail_index = len(engine.lines) - 1
                self._recipients = []
                mail = peer.mail_reply
                self._answer(peer._verdict(lambda: mail(self._sender) if mail else None))
            case RcptTo(recipient=mailbox):
                address = str(mailbox)
                rcpt = peer.rcpt_reply
                reply = peer._verdict(lambda: rcpt(address) if rcpt else None)
                if reply is None or reply.is_positive:
                    self._recipients.append((address, _raw_params(engine.lines[-1][4:])))
                self._answer(reply)
            case MessageBegin():
                self._data = bytearray()
                engine.accept()
            case ChunkEnd():
                engine.accept()
            case MessageEnd(error=error):
                self._end_message(error)
            case StartTls():
                self._start_tls()
            case Verify():
                engine.reply(Reply(252, "2.5.0", "Cannot VRFY user"))
            case _:  # Refused: the engine has already answered
                pass

    def _end_message(self, error: Reply | None) -> None:
        peer, engine = self.peer, self.engine
        transaction = engine.transaction
        message = ReceivedMessage(
            session=self.number, helo=engine.helo or "", sender=self._sender,
            mail_params=self._mail_params,
            recipients=tuple(address for address, _ in self._recipients),
            rcpt_params=tuple(params for _, params in self._recipients),
            data=bytes(self._data), tls=self.tls,
            bdat=bool(transaction and transaction.bdat),
            pipelined=any(waiting for line, waiting in zip(
                engine.lines[self._mail_index:], engine.input_waiting[self._mail_index:],
                strict=True) if line[:4].upper() in ("MAIL", "RCPT")),
            commands=tuple(engine.lines))
        replies = self._final_replies(message, error)
        peer._record(replace(message, replies=tuple(replies)))
        engine.reply(replies[0])
        if len(replies) > 1:  # LMTP: one reply per recipient (RFC 2033 §4.2)
            self._flush()
            self._write(b"".join(reply.to_bytes() for reply in replies[1:]))
        self._data = bytearray()

    def _final_replies(self, message: ReceivedMessage, error: Reply | None) -> list[Reply]:
        peer = self.peer
        data_reply, lmtp_reply = peer.data_reply, peer.lmtp_reply
        if not peer.lmtp:
            if error is not None:
                return [error]
            reply = peer._verdict(lambda: data_reply(message) if data_reply else None)
            return [reply or Reply(250, "2.0.0", f"Ok: queued as {peer._queue_id()}")]
        replies: list[Reply] = []
        for address in message.recipients:
            def verdict(address: str = address) -> Reply | None:
                if lmtp_reply is not None:
                    return lmtp_reply(address, message)
                return data_reply(message) if data_reply else None
            reply = error or peer._verdict(verdict)
            replies.append(reply or Reply(250, "2.0.0", f"<{address}> delivered"))
        return replies

    def _start_tls(self) -> None:
        refusal = self.peer.starttls_reply
        context = self.peer._tls_context
        if refusal is not None or context is None:
            self.engine.reply(refusal or Reply(454, "4.7.0", "TLS not available"))
            return
        self.engine.accept()
        self._flush()
        self._upgrading = True
        self.upgrade = asyncio.get_running_loop().create_task(self._upgrade(context))

    async def _upgrade(self, context: ssl.SSLContext) -> None:
        transport = self.transport
        assert transport is not None
        loop = asyncio.get_running_loop()
        try:
            new_transport = await loop.start_tls(transport, self, context, server_side=True,
                                                 ssl_handshake_timeout=TIMEOUT)
        except (OSError, ssl.SSLError, TimeoutError):
            new_transport = None
        if new_transport is None:  # the handshake failed: asyncio has closed the socket
            transport.abort()
            self.connection_lost(None)
            return
        self.transport = new_transport
        self.tls = True
        self.engine.tls_started()
        self._upgrading = False
        held, self._held = bytes(self._held), bytearray()
        self.engine.receive(held)
        self._process()
