"""One client connection: the asyncio transport wrapped around the sans-IO engine.

Takes: an accepted connection from :mod:`tayori.receive.listener`, the running
:class:`~tayori.receive.listener.Receiver` (config, spool, rules, limits).
Promises: the engine's events are answered in order, one verb's rules in one handler
(dispatched by :meth:`Session._dispatch`); message content goes to a spool
:class:`Draft` chunk by chunk (reading pauses while more than :data:`HIGH_WATER` bytes
wait, so memory per session is bounded); ``250`` is sent only after ``Spool.commit``
returned (DESIGN §2.1); the queue id is in the 250 reply, the Received header and every
log line of the message. At RCPT a recipient needs a match rule (else ``554 5.7.1``),
must not have a local part that reads as a delivery instruction, ``|command``,
``/file`` or ``\\mailbox`` (else ``550 5.1.3``, whatever the action: these forms are
meaningful to local delivery only when an alias or ``.forward`` writes them, never
from a client), must exist when its action has local tables (else ``550 5.1.1``,
:mod:`tayori.route.local`) and must not have a full mailbox (else ``452 4.2.2``).
Screening (:mod:`tayori.policy.screening`): blocklists at connect, HELO syntax, rate
limits and reverse DNS at MAIL, rate limits and greylisting at RCPT; at most
``limits.max_messages_per_connection`` messages, then ``421``.
Sender authentication (:mod:`tayori.auth.inbound`), for screened clients: SPF at
MAIL (a refusal there, by ``[spf]`` policy), DKIM, ARC and DMARC at the end of the data
(``550 5.7.1`` for DMARC p=reject; the draft's header block rewritten with
Authentication-Results and Received-SPF before the commit; DMARC quarantine may queue
the message ``held``). For every client, screened or not, Authentication-Results fields
claiming our authserv-id are removed from the draft's header block at the end of the
data (for an unscreened client from the header section the scanner kept, the draft is
read only when that section was longer than :data:`~tayori.receive.trace.MAX_HEADER_SCAN`).
AUTH (where the listener offers it) is answered by
:class:`~tayori.policy.authentication.Authenticator`: a login makes the client
``authenticated`` for the match rules (and no longer screened; STARTTLS, which ends the
login, makes it screened again where it was before), its MAIL FROM and, at the end of
the data, its message's From addresses must be its own (``553 5.7.1``, by
``auth.sender_policy``), and its Received header says ``ESMTPSA``; a password is never
logged. PLAIN with an authorization identity other than the login is refused with
``535 5.7.8`` before any password check, and not counted as a failed login: tayori
offers no proxy authorization (RFC 4616 §2 lets the server refuse it), and a refusal
that never looks at the password tells a guesser nothing.
Failure policy: a disk error while receiving answers ``452 4.3.1`` and the session goes on;
an unexpected exception answers ``451 4.3.0`` (never its text) and closes; idle clients
get ``421 4.4.2`` after ``limits.command_timeout`` / ``limits.data_timeout``.
Config keys: ``hostname``, ``limits.*``, ``smtp.*``, ``listen.*``, ``match``, ``actions``.
Standards: RFC 5321 §4.5.3.2 (timeouts), RFC 3207 (STARTTLS), RFC 2920 (batched replies).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import ssl
import time
import traceback
from typing import TYPE_CHECKING, cast

from tayori import maillog
from tayori.address import AddressError, Mailbox, parse_mailbox
from tayori.auth.inbound import NOT_CHECKED, Action
from tayori.errors import INTERNAL_ERROR, Reply
from tayori.policy.relay import sender_routed
from tayori.policy.screening import Client
from tayori.queue.spool import Draft, Envelope, RecipientRecord, new_queue_id
from tayori.receive import proxy
from tayori.receive.tls import TlsInfo, info_of
from tayori.receive.trace import MAX_HEADER_SCAN, HeaderScanner, protocol_name, received_header
from tayori.smtp.server import (
    Authenticate,
    ChunkEnd,
    Event,
    Hello,
    MailFrom,
    MessageBegin,
    MessageData,
    MessageEnd,
    Mode,
    RcptTo,
    Refused,
    ServerEngine,
    StartTls,
    Verify,
)

if TYPE_CHECKING:
    from tayori.receive.listener import Listener, Receiver

HIGH_WATER = 256 * 1024
LINGER_SECONDS = 2.0
PROXY_TIMEOUT = 10.0
STORAGE_FULL = Reply(452, "4.3.1", "Insufficient system storage, try again later")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
ROUTING_DENIED = Reply(554, "5.7.1", "Relay access denied: sender-specified routing")
UNKNOWN_USER = Reply(550, "5.1.1", "No such user here")
MAILBOX_FULL = Reply(452, "4.2.2", "Mailbox full, try again later")
TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many Received headers: mail loop?")
TOO_MANY_MESSAGES = Reply(421, "4.7.0", "Too many messages in this session, reconnect")
BAD_RECIPIENT = Reply(550, "5.1.3", "Bad recipient address syntax")
PROXY_AUTH_REFUSED = Reply(535, "5.7.8", "Authentication credentials invalid: acting as "
                                         "another user is not supported")
INSTRUCTION_STARTS = ("|", "/", "\\")
"""What a local part delivery would take as a command, a file or an unexpanded mailbox."""
_DEBUG = logging.getLogger("tayori.debug.session")
_QUOTED_PAIR = re.compile(r"\\(.)")
_session_numbers = itertools.count(1)


class KeptHeader(HeaderScanner):
    """A :class:`HeaderScanner` that keeps the header section it read: ``header``, or
    None when the section was longer than the scanner reads."""

    header: bytes | None = None

    def _finish(self, head: bytes) -> None:
        super()._finish(head)
        self.header = head if len(head) < MAX_HEADER_SCAN else None


class Session(asyncio.Protocol):
    def __init__(self, receiver: Receiver, listener: Listener) -> None:
        self.receiver = receiver
        self.listener = listener
        self.config = receiver.config
        self.id = f"{receiver.session_prefix}{next(_session_numbers)}"
        self.engine = ServerEngine(receiver.engine_settings(listener))
        self.transport: asyncio.Transport | None = None
        self.client_ip = ""
        self.client_port = 0
        self.tls: TlsInfo | None = None
        self._readable = asyncio.Event()
        self._eof = False
        self._lost = False
        self._paused = False
        self._proxy_buffer: bytearray | None = bytearray() if listener.proxy_protocol else None
        self._admitted = False
        self._task: asyncio.Task[None] | None = None
        self._actions: list[str] = []
        self._draft: Draft | None = None
        self._headers: KeptHeader | None = None
        self._queue_id: str | None = None
        self._trace = b""
        self._spf = NOT_CHECKED
        self._held = False
        self._messages = 0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._waiting = False
        self._timed_out = False
        self.client = Client("", "", screened=False)

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = self.transport.get_extra_info("peername") or ("", 0)
        self.client_ip, self.client_port = str(peer[0]), int(peer[1])
        self.tls = info_of(self.transport.get_extra_info("ssl_object"))   # smtps
        self._task = asyncio.get_running_loop().create_task(self._run())
        self.receiver.track(self._task)

    def data_received(self, data: bytes) -> None:
        if self._proxy_buffer is not None:
            self._proxy_buffer += data
        else:
            self.engine.receive(data)
            if self.engine.buffered > HIGH_WATER and self.transport and not self._paused:
                self.transport.pause_reading()
                self._paused = True
        self._readable.set()

    def eof_received(self) -> bool:
        self._eof = True
        self._readable.set()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._readable.set()

    # --- the session's life -----------------------------------------------------------------

    async def _run(self) -> None:
        try:
            if await self._start():
                await self._converse()
        except asyncio.CancelledError:  # the drain time is over
            self._abort(Reply(421, "4.3.2", f"{self.config.hostname} Service shutting down, "
                                            "try again later"))
            raise
        except Exception:  # a bug must not take the server down, nor leak to the client
            maillog.error("error", session=self.id, reason="internal error",
                          detail=traceback.format_exc(limit=8))
            self.engine.close(INTERNAL_ERROR)
            self._flush()
        self._discard_draft()
        await self._close()

    def _abort(self, reply: Reply) -> None:
        self.engine.close(reply)
        self._flush()
        self._discard_draft()
        self.receiver.release(self, self._admitted)
        self._admitted = False
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if self.transport is not None:
            self.transport.close()
        maillog.event("disconnect", session=self.id, messages=self._messages)

    async def _start(self) -> bool:
        if self._proxy_buffer is not None and not await self._read_proxy_header():
            return False
        refusal = await self.receiver.admit(self)
        self._admitted = refusal is None
        maillog.event("connect", session=self.id, client=f"[{self.client_ip}]:{self.client_port}",
                      listener=self.listener.name)
        self.client = Client(self.id, self.client_ip, screened=self._screened())
        if refusal is None:
            refusal = await self.receiver.screening.connect(self.client)
        if self.tls is not None:
            maillog.event("tls", session=self.id, info=self.tls.describe())
        if refusal is not None:
            maillog.event("reject", session=self.id, client=self.client_ip,
                          reply=str(refusal))
        self.engine.greet(refusal)
        self._flush()
        return refusal is None

    async def _converse(self) -> None:
        engine = self.engine
        while not engine.closed:
            event = engine.next_event()
            if event is None:
                self._flush()
                if engine.closed or not await self._wait_for_input():
                    return
                continue
            await self._dispatch(event)
        self._flush()

    async def _wait_for_input(self) -> bool:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        if self._lost or self._eof:
            maillog.event("lost", session=self.id, reason="client closed the connection")
            self.engine.close()
            return False
        limits = self.config.limits
        data_phase = self.engine.mode in (Mode.DATA, Mode.BDAT)
        timeout = limits.data_timeout if data_phase else limits.command_timeout
        self._readable.clear()
        self._arm_idle_timer(timeout)
        self._waiting = True
        try:
            await self._readable.wait()
        finally:
            self._waiting = False
        if self._timed_out:
            maillog.event("timeout", session=self.id, phase="data" if data_phase else "command")
            self.engine.close(Reply(421, "4.4.2", f"{self.config.hostname} Timeout exceeded, "
                                                  "closing connection"))
            self._flush()
            return False
        return True

    def _arm_idle_timer(self, timeout: float) -> None:
        """One timer per session, moved only when it would fire too early: cheaper than
        a new timeout for every read (a message takes a dozen reads)."""
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + timeout
        timer = self._idle_timer
        if timer is None or timer.when() > self._deadline:
            if timer is not None:
                timer.cancel()
            self._idle_timer = loop.call_at(self._deadline, self._on_idle_timer)

    def _on_idle_timer(self) -> None:
        self._idle_timer = None
        if not self._waiting:
            return  # busy with the client's last input; the next wait arms it again
        loop = asyncio.get_running_loop()
        if loop.time() >= self._deadline:
            self._timed_out = True
            self._readable.set()
        else:
            self._idle_timer = loop.call_at(self._deadline, self._on_idle_timer)

    async def _read_proxy_header(self) -> bool:
        buffer = self._proxy_buffer
        assert buffer is not None
        deadline = asyncio.get_running_loop().time() + PROXY_TIMEOUT
        while True:
            try:
                header = proxy.parse(bytes(buffer))
            except proxy.ProxyError as exc:
                maillog.event("reject", session=self.id, client=self.client_ip,
                              reason=f"PROXY protocol: {exc}")
                return False
            if header is not None:
                break
            if self._lost or self._eof:
                return False
            self._readable.clear()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._readable.wait()
            except TimeoutError:
                return False
        if header.client is not None:
            self.client_ip, self.client_port = header.client
        rest = bytes(buffer[header.length :])
        self._proxy_buffer = None
        self.engine.receive(rest)
        return True

    def _flush(self) -> None:
        out = self.engine.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    async def _close(self) -> None:
        self.receiver.release(self, self._admitted)
        self._admitted = False
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        transport = self.transport
        if transport is None or transport.is_closing():
            maillog.event("disconnect", session=self.id, messages=self._messages)
            return
        if not (self._lost or self._eof or self.engine.quit) and transport.can_write_eof():
            # Let the client read our last reply before the socket goes: half-close, then
            # discard what it still sends, for a moment (a reset could destroy the reply).
            with contextlib.suppress(OSError, RuntimeError):
                transport.write_eof()
            self._readable.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LINGER_SECONDS):
                    while not (self._lost or self._eof):
                        self._readable.clear()
                        await self._readable.wait()
        transport.close()
        maillog.event("disconnect", session=self.id, messages=self._messages)

    # --- handlers, one per event --------------------------------------------------------

    async def _on_hello(self, event: Hello) -> None:
        maillog.event("helo", session=self.id, name=event.name,
                      verb="EHLO" if event.extended else "HELO")
        refusal = self.receiver.screening.helo(self.client, event.name)
        if refusal is not None:
            self._refused("HELO", refusal, name=event.name)
            self.engine.reply(refusal)
            return
        self.engine.accept()

    async def _on_mail(self, event: MailFrom) -> None:
        self._actions = []
        sender = str(event.sender) if event.sender else "<>"
        refusal = await self._sender_refusal(event)
        if refusal is None:   # SPF (tayori.auth.inbound), for screened clients
            self._spf = await self.receiver.inbound.at_mail(
                self.client, self.engine.helo or "", str(event.sender or ""))
            refusal = self._spf.refusal
        if refusal is not None:
            self._refused("MAIL", refusal, sender=sender, login=self.engine.authenticated)
            self.engine.reply(refusal)
            return
        maillog.event("mail", session=self.id, sender=sender,
                      size=event.params.size, body=event.params.body)
        self.engine.accept()

    async def _sender_refusal(self, event: MailFrom) -> Reply | None:
        """MAIL's checks: the messages of this session, the login's own addresses, the
        rate limits and reverse DNS (:mod:`tayori.policy.screening`)."""
        if self._messages >= self.config.limits.max_messages_per_connection:
            return TOO_MANY_MESSAGES
        address = str(event.sender) if event.sender else ""
        login = self.engine.authenticated
        if login is not None:
            refusal = await self.receiver.authenticator.sender_refusal(login, address)
            if refusal is not None:
                return refusal
        return await self.receiver.screening.mail(self.client, self._sender_key(event.sender))

    def _sender_key(self, sender: Mailbox | None) -> str:
        """Whose rate the sender buckets count: the login, else the MAIL FROM address."""
        return self.engine.authenticated or (str(sender).lower() if sender else "")

    async def _on_authenticate(self, event: Authenticate) -> None:
        if event.authzid and event.authzid.casefold() != event.login.casefold():
            self._refused("AUTH", PROXY_AUTH_REFUSED, login=event.login, authzid=event.authzid)
            self.engine.reply(PROXY_AUTH_REFUSED)   # not a password guess: not counted
            return
        reply = await self.receiver.authenticator.login(
            self.id, self.client_ip, event.mechanism, event.login, event.password)
        if reply.code == 235:
            self.client.screened = False   # a mail program of ours, not a stranger
            self.engine.accept()
        else:
            self.engine.reply(reply)

    async def _on_rcpt(self, event: RcptTo) -> None:
        recipient = event.recipient
        domain = recipient.ascii_domain or self.config.hostname  # <Postmaster>: this host
        action = self.receiver.rules.route(self.client_ip, self.engine.authenticated is not None,
                                           domain)
        address = f"{recipient.local}@{domain}"
        refusal = await self._recipient_refusal(action, recipient.local, address)
        if refusal is not None:
            self._refused("RCPT", refusal, recipient=str(recipient))
            self.engine.reply(refusal)
            return
        assert action is not None   # no rule took it: RELAY_DENIED above
        self._actions.append(action)
        maillog.event("rcpt", session=self.id, recipient=str(recipient), action=action,
                      notify=",".join(event.params.notify) if event.params.notify else None)
        self.engine.accept()

    async def _recipient_refusal(self, action: str | None, local: str, address: str
                                 ) -> Reply | None:
        """RCPT's checks: a match rule takes the recipient (``action``), its local part
        is no delivery instruction, it exists, its local part names no other
        destination, it has room, and screening agrees."""
        if action is None:
            return RELAY_DENIED
        if _delivery_instruction(local):   # |command, /file, \\mailbox: for aliases only
            return BAD_RECIPIENT
        if not self.receiver.local.known(action, address):
            return UNKNOWN_USER
        if sender_routed(local):   # user%host, host!user, "user@host": never passed on
            return ROUTING_DENIED
        if self.receiver.local.has_quota(action) and await asyncio.get_running_loop(
                ).run_in_executor(None, self.receiver.local.over_quota, action, address):
            return MAILBOX_FULL
        transaction = self.engine.transaction
        sender = transaction.sender if transaction else None
        return await self.receiver.screening.rcpt(
            self.client, self._sender_key(sender), str(sender) if sender else "", address)

    async def _on_message_begin(self, event: MessageBegin) -> None:
        self._queue_id = queue_id = new_queue_id()
        self._headers = KeptHeader()
        try:
            self._draft = draft = self.receiver.spool.new_draft(queue_id)
            self._trace = self._trace_header(queue_id)
            draft.write(self._trace)
        except OSError as exc:
            self._storage_failed(exc)
            self._discard_draft()
            self._refused("DATA", STORAGE_FULL)
            self.engine.reply(STORAGE_FULL)
            return
        self.engine.accept()

    async def _on_data(self, event: MessageData) -> None:
        if self._draft is not None:
            self._draft.write(event.data)
        if self._headers is not None:
            self._headers.feed(event.data)

    async def _on_chunk_end(self, event: ChunkEnd) -> None:
        draft = self._draft
        if draft is None or draft.error is not None:
            self._storage_failed(draft.error if draft else None)
            self._discard_draft()
            self.engine.reply(STORAGE_FULL)
            return
        self.engine.accept()

    async def _on_message_end(self, event: MessageEnd) -> None:
        reply = event.error or self._content_refusal() or await self._check_sender()
        if reply is not None:
            self._discard_draft()
            self._refused("DATA", reply, queue_id=self._queue_id)
            self.engine.reply(reply)
            return
        await self._commit()

    async def _on_starttls(self, event: StartTls) -> None:
        context = self.receiver.tls_context(self.listener)
        if context is None:
            self.engine.reply(Reply(454, "4.7.0", "TLS not available due to temporary reason"))
            return
        self.engine.accept()
        self._flush()
        await self._upgrade(context)

    async def _on_verify(self, event: Verify) -> None:
        reply = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt "
                                    "delivery")
        if self.config.smtp.vrfy:
            reply = self._verify(event.argument)
        self.engine.reply(reply)

    async def _on_refused(self, event: Refused) -> None:
        self._refused(event.command, event.reply)

    async def _dispatch(self, event: Event) -> None:
        match event:
            case MessageData():
                await self._on_data(event)
            case Hello():
                await self._on_hello(event)
            case MailFrom():
                await self._on_mail(event)
            case RcptTo():
                await self._on_rcpt(event)
            case MessageBegin():
                await self._on_message_begin(event)
            case ChunkEnd():
                await self._on_chunk_end(event)
            case MessageEnd():
                await self._on_message_end(event)
            case StartTls():
                await self._on_starttls(event)
            case Verify():
                await self._on_verify(event)
            case Authenticate():
                await self._on_authenticate(event)
            case Refused():
                await self._on_refused(event)

    # --- helpers ----------------------------------------------------------------------------

    def _refused(self, command: str, reply: Reply, **fields: object) -> None:
        maillog.event("reject", session=self.id, command=command, reply=str(reply),
                      client=self.client_ip, **fields)

    def _storage_failed(self, exc: BaseException | None) -> None:
        maillog.error("error", session=self.id, queue_id=self._queue_id,
                      reason=f"spool write failed: {exc}")

    def _content_refusal(self) -> Reply | None:
        draft, headers = self._draft, self._headers
        if draft is None or draft.error is not None:
            self._storage_failed(draft.error if draft else None)
            return STORAGE_FULL
        if headers is not None:
            headers.finish()
            if headers.received > self.config.limits.max_received_headers:
                return TOO_MANY_HOPS
        return None

    async def _check_sender(self) -> Reply | None:
        """The end of the data: a logged-in client's From addresses, then
        :mod:`tayori.auth.inbound` (SPF, DKIM, DMARC, ARC on a screened client's
        message; forged Authentication-Results on every message): a refusal, or the
        draft's header block rewritten and the message maybe held."""
        inbound, spool, draft = self.receiver.inbound, self.receiver.spool, self._draft
        transaction = self.engine.transaction
        if draft is None or transaction is None:
            return None
        try:
            message = await self._content(draft)
            refusal = await self._author_refusal(message)
            if refusal is not None:
                return refusal
            verdict = await inbound.at_end(
                self.client, self._spf, message, trace=self._trace, queue_id=draft.queue_id,
                recipients=[str(r.mailbox) for r in transaction.recipients])
            if verdict.rewrite is not None:
                await spool.rewrite_header(draft, *verdict.rewrite)
        except OSError as exc:
            self._storage_failed(exc)
            return STORAGE_FULL
        self._held = verdict.action is Action.HOLD
        return verdict.reply

    async def _content(self, draft: Draft) -> bytes:
        """What the end-of-data checks read: the whole content when the sender is checked
        (DKIM hashes the body), else the header section the scanner kept, or the whole
        content when that section was too long for it."""
        header = self._headers.header if self._headers is not None else None
        if header is not None and not self.receiver.inbound.checks(self.client):
            return header
        return await self.receiver.spool.read_draft(draft, len(self._trace))

    async def _author_refusal(self, message: bytes) -> Reply | None:
        """A logged-in client's message must be from its own addresses (From)."""
        login = self.engine.authenticated
        if login is None:
            return None
        return await self.receiver.authenticator.author_refusal(login, message)

    def _trace_header(self, queue_id: str) -> bytes:
        transaction = self.engine.transaction
        assert transaction is not None
        recipients = transaction.recipients
        return received_header(
            helo=self.engine.helo or "unknown", client_ip=self.client_ip, client_name=None,
            hostname=self.config.hostname, protocol=self._protocol(), queue_id=queue_id,
            recipient=str(recipients[0].mailbox) if len(recipients) == 1 else None,
            tls=self.tls, when=time.time())

    def _protocol(self) -> str:
        transaction = self.engine.transaction
        utf8 = bool(transaction and transaction.params.smtputf8)
        return protocol_name(self.engine.extended, self.tls is not None, utf8,
                             self.engine.authenticated is not None)

    async def _commit(self) -> None:
        draft, transaction = self._draft, self.engine.transaction
        assert draft is not None and transaction is not None
        self._draft = None
        headers = self._headers
        state, self._held = "held" if self._held else "queued", False
        envelope = Envelope(
            queue_id=draft.queue_id,
            sender=str(transaction.sender) if transaction.sender else "",
            recipients=tuple(
                RecipientRecord(str(r.mailbox), action, r.params.orcpt, r.params.notify, state)
                for r, action in zip(transaction.recipients, self._actions, strict=True)),
            size=draft.size, client_address=self.client_ip, client_name="",
            helo=self.engine.helo or "", protocol=self._protocol(), received_at=time.time(),
            body_type=transaction.params.body, smtputf8=transaction.params.smtputf8,
            ret=transaction.params.ret, envid=transaction.params.envid,
            message_id=headers.message_id if headers else None, state=state)
        self._flush()  # pipelined replies before the (short) wait for the disk
        try:
            await self.receiver.spool.commit(draft, envelope)
        except Exception as exc:
            self._storage_failed(exc)
            self.engine.reply(STORAGE_FULL)
            return
        self._messages += 1
        maillog.event("queued", session=self.id, queue_id=draft.queue_id,
                      sender=envelope.sender or "<>", size=envelope.size,
                      recipients=len(envelope.recipients), message_id=envelope.message_id,
                      held=state == "held" or None)
        self.engine.reply(Reply(250, "2.0.0", f"Ok: queued as {draft.queue_id}"))

    def _discard_draft(self) -> None:
        if self._draft is not None:
            self._draft.discard()
            self._draft = None

    async def _upgrade(self, context: ssl.SSLContext) -> None:
        transport = self.transport
        assert transport is not None
        loop = asyncio.get_running_loop()
        try:
            new_transport = await loop.start_tls(transport, self, context, server_side=True,
                                                 ssl_handshake_timeout=30)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            maillog.event("tls-failed", session=self.id, reason=str(exc) or type(exc).__name__)
            self.engine.close()
            self._lost = True
            return
        if new_transport is None:
            self.engine.close()
            return
        self.transport = new_transport
        self.tls = info_of(new_transport.get_extra_info("ssl_object"))
        self.engine.tls_started()   # which ends a login: screened again, where it was
        self.client.screened = self._screened()
        maillog.event("tls", session=self.id, **({"info": self.tls.describe()} if self.tls else {}))

    def _screened(self) -> bool:
        """Whether the client is a stranger (:mod:`tayori.policy.screening`): on an
        ``smtp`` listener, outside the trusted networks, not logged in."""
        return (self.listener.config.mode == "smtp" and self.engine.authenticated is None
                and not self.receiver.rules.trusts(self.client_ip))

    def _verify(self, argument: str) -> Reply:
        text = argument.strip("<>")
        try:
            mailbox: Mailbox = parse_mailbox(text, utf8=True)
        except AddressError:
            return Reply(501, "5.1.3", "Bad address syntax")
        action = self.receiver.rules.route(self.client_ip, False, mailbox.ascii_domain)
        if action is None or not self.receiver.local.known(action, str(mailbox)):
            return Reply(550, "5.1.1", "Recipient address rejected")
        return Reply(250, "2.1.5", f"<{mailbox}>")


def _delivery_instruction(local: str) -> bool:
    """Whether a local part (as written: quoted or not) reads, unquoted and without
    leading blanks, as ``|command``, ``/file`` or ``\\mailbox``."""
    if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
        local = _QUOTED_PAIR.sub(r"\1", local[1:-1])
    return local.lstrip(" \t").startswith(INSTRUCTION_STARTS)
