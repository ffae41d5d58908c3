"""The server side of the SMTP protocol, sans-IO: bytes in, events out, replies back.

Takes: bytes received from a client (:meth:`ServerEngine.receive`) and the application's
answers to the events it raises (:meth:`ServerEngine.accept`, :meth:`ServerEngine.reply`).
Promises: framing, syntax and sequence are settled here, once, for every transport:
- commands are parsed and checked (line length, bare CR/LF, NUL, UTF-8, order of
  verbs, ESMTP parameters) and answered by the engine when the answer needs no policy;
- an event (:class:`Hello`, :class:`MailFrom`, :class:`RcptTo`, :class:`MessageBegin`,
  :class:`MessageData`, :class:`ChunkEnd`, :class:`MessageEnd`, :class:`StartTls`,
  :class:`Verify`, :class:`Authenticate`) is raised where the application decides, and
  the engine waits for its answer before it reads further (replies keep the order of
  commands);
- the envelope (:attr:`ServerEngine.transaction`) is what the engine saw accepted;
- DATA and BDAT content is streamed out in chunks, never collected whole;
- replies are buffered and handed out by :meth:`data_to_send`, so a pipelined batch
  gets its replies in one write (RFC 2920);
- SMTP AUTH (``Settings.auth_mechanisms``; mechanisms from :mod:`tayori.smtp.sasl`) is
  offered in EHLO only when usable: on TLS, or anywhere with ``auth_without_tls``. The
  engine refuses AUTH itself when it is not configured (502), before EHLO, after a
  successful AUTH or in a transaction (503), without TLS (538 5.7.11), for a mechanism
  not offered (504). During the exchange lines are responses, not commands (pipelined
  lines after AUTH are the responses, in order); ``*`` cancels (501 5.0.0), bad base64
  or a malformed message is 501 5.5.2, a line over 12288 octets 500 5.5.6. Once a
  mechanism has the credentials the engine raises :class:`Authenticate`: accept() sends
  ``235 2.7.0`` and sets :attr:`ServerEngine.authenticated`; any other reply (535 5.7.8,
  454 4.7.0) leaves the session unauthenticated, and 421 closes it. The engine drops
  its references to the password once the event is taken, and the password is in no
  reply, no :class:`Refused` event and no repr (unknown commands right after AUTH are
  reported as ``?``, in case they are stray responses). With ``auth_required`` (a
  submission listener) MAIL before AUTH is refused ``530 5.7.0``. STARTTLS clears the
  authentication, RSET does not. MAIL's ``AUTH=`` parameter is parsed into
  ``MailParams.auth`` (xtext, as sent); whether to trust it is the application's choice
  (tayori ignores it from unauthenticated clients, RFC 4954 §5).
Engine-made refusals are reported as :class:`Refused` events (for the operator log)
with the reply already queued. After STARTTLS is accepted every byte still buffered is
discarded (RFC 3207 §4.2, the command-injection defence). A bare CR or LF anywhere ends
the session with 521 (as Postfix's smtpd_forbid_bare_newline), so no SMTP smuggling.
Failure policy: no exception escapes for bad input; :attr:`closed` tells the transport
to close once :meth:`data_to_send` is written.
Standards: RFC 5321, RFC 1869/1870/2034/2920/3030/3207/3461/6152/6531; RFC 4954 (AUTH)
with RFC 4616 (PLAIN) and draft-murchison-sasl-login (LOGIN) via :mod:`tayori.smtp.sasl`.
"""

from __future__ import annotations

from base64 import b64encode
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum, auto

from tayori.address import AddressError, Mailbox, parse_path, split_path
from tayori.errors import Reply
from tayori.smtp.commands import (
    MailParams,
    ParamError,
    RcptParams,
    parse_command,
    parse_mail_params,
    parse_rcpt_params,
)
from tayori.smtp.framing import MAX_LINE, ContentState, DotReader, LineChecker
from tayori.smtp.sasl import (
    MAX_RESPONSE,
    MECHANISMS,
    Challenge,
    Credentials,
    Mechanism,
    SaslError,
    Step,
    decode_initial,
    decode_response,
)

COMMAND_LINE_LIMIT = 512
# RFC 1870 (+26), RFC 3461 (+100 MAIL, +500 RCPT), RFC 4954 (+500 MAIL AUTH=), BODY, SMTPUTF8
LINE_LIMITS = {"MAIL": COMMAND_LINE_LIMIT + 26 + 100 + 500 + 32, "RCPT": COMMAND_LINE_LIMIT + 500}
MAX_BUFFERED_LINE = 4096
HTTP_VERBS = frozenset({"GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "CONNECT", "PATCH"})

EXTENSIONS_ALL = ("PIPELINING", "SIZE", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8",
                  "CHUNKING", "BINARYMIME", "DSN")

BYE = Reply(221, "2.0.0", "Bye")
OK = Reply(250, "2.0.0", "OK")


@dataclass(frozen=True, slots=True)
class Settings:
    """What the engine needs to know about the listener it serves."""

    hostname: str
    max_message_size: int = 50 * 1024 * 1024
    max_recipients: int = 1000
    max_errors: int = 20
    max_unknown_commands: int = 3
    tls_available: bool = False
    tls_active: bool = False
    extensions: tuple[str, ...] = EXTENSIONS_ALL
    auth_mechanisms: tuple[str, ...] = ()  # in EHLO order; empty: no AUTH at all
    auth_without_tls: bool = False  # offer AUTH on a plaintext connection too
    auth_required: bool = False  # a submission listener: no MAIL before AUTH

    def __post_init__(self) -> None:
        unknown = set(self.auth_mechanisms) - set(MECHANISMS)
        if unknown:
            raise ValueError(f"unknown SASL mechanisms: {', '.join(sorted(unknown))}")


# --- events ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    name: str
    extended: bool


@dataclass(frozen=True, slots=True)
class MailFrom:
    sender: Mailbox | None
    params: MailParams


@dataclass(frozen=True, slots=True)
class RcptTo:
    recipient: Mailbox
    params: RcptParams


@dataclass(frozen=True, slots=True)
class MessageBegin:
    """The first DATA or BDAT of a transaction. DATA: answer 354 (accept) or refuse.

    BDAT: accept silently, or refuse; a refusal is sent once the chunk has been read.
    """

    bdat: bool


@dataclass(frozen=True, slots=True)
class MessageData:
    """A piece of message content (unstuffed). Needs no answer."""

    data: bytes


@dataclass(frozen=True, slots=True)
class ChunkEnd:
    """A BDAT chunk without LAST was read whole. Accept (250) or refuse."""

    size: int


@dataclass(frozen=True, slots=True)
class MessageEnd:
    """The message is complete (DATA dot or BDAT LAST). ``error``: the engine found the
    content unacceptable; the application discards it and answers with that reply."""

    error: Reply | None
    content: ContentState


@dataclass(frozen=True, slots=True)
class StartTls:
    pass


@dataclass(frozen=True, slots=True)
class Verify:
    argument: str


@dataclass(frozen=True, slots=True)
class Authenticate:
    """A SASL exchange gave credentials. Accept (235, :attr:`ServerEngine.authenticated`
    becomes ``login``) or refuse (535 5.7.8 bad credentials, 454 4.7.0 try later, 421 to
    close). ``authzid`` is empty unless the client asked to act as someone else."""

    mechanism: str
    login: str
    password: str = field(repr=False)
    authzid: str


@dataclass(frozen=True, slots=True)
class Refused:
    """Informational: the engine refused ``command`` with ``reply`` (already queued)."""

    command: str
    reply: Reply


Event = (Hello | MailFrom | RcptTo | MessageBegin | MessageData | ChunkEnd | MessageEnd
         | StartTls | Verify | Authenticate | Refused)


@dataclass(frozen=True, slots=True)
class Recipient:
    mailbox: Mailbox
    params: RcptParams


@dataclass(slots=True)
class Transaction:
    """The envelope as accepted so far."""

    sender: Mailbox | None
    params: MailParams
    recipients: list[Recipient] = field(default_factory=list)
    bdat: bool | None = None


class Mode(Enum):
    COMMAND = auto()
    SKIP_LINE = auto()
    DATA = auto()
    BDAT = auto()
    TLS_PENDING = auto()
    AUTH = auto()
    CLOSED = auto()


class ServerEngine:
    """One SMTP server session's protocol state. See the module docstring."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.helo: str | None = None
        self.extended = False
        self.transaction: Transaction | None = None
        self.mode = Mode.COMMAND
        self.closed = False
        self.quit = False  # the client said QUIT: a normal end
        self.authenticated: str | None = None  # the login, after a successful AUTH
        self._buffer = bytearray()
        self._out: list[bytes] = []
        self._events: deque[Event] = deque()
        self._awaiting: Event | None = None
        self._errors = 0
        self._unknown = 0
        self._dot: DotReader | None = None
        self._bdat_left = 0
        self._bdat_last = False
        self._bdat_checker: LineChecker | None = None
        self._bdat_failure: Reply | None = None
        self._bdat_state = ContentState()
        self._sasl: Mechanism | None = None  # during an AUTH exchange
        self._sasl_name = ""
        self._after_auth = False  # the last known command was AUTH

    # --- the application's side -------------------------------------------------------

    def greet(self, reply: Reply | None = None) -> None:
        self._send(reply or Reply(220, None, f"{self.settings.hostname} ESMTP tayori"))
        if reply is not None and not reply.is_positive:
            self.close()

    def receive(self, data: bytes) -> None:
        if self.mode not in (Mode.TLS_PENDING, Mode.CLOSED):
            self._buffer += data

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def next_event(self) -> Event | None:
        """The next event, or None when more input (or an answer) is needed."""
        while not self._events:
            if self._awaiting is not None or self.closed or not self._step():
                return None
        event = self._events.popleft()
        if not isinstance(event, (MessageData, Refused)):
            self._awaiting = event
        return event

    def accept(self) -> None:
        """Answer the pending event positively, with the standard reply."""
        event = self._take_pending()
        self._answer(event, self._positive(event))

    def reply(self, reply: Reply) -> None:
        """Answer the pending event with ``reply`` (positive or not)."""
        self._answer(self._take_pending(), reply)

    def tls_started(self) -> None:
        """The transport is now TLS: back to the initial state (RFC 3207 §4.2)."""
        self.settings = replace(self.settings, tls_active=True)
        self.helo, self.extended, self.transaction = None, False, None
        self.authenticated, self._sasl, self._after_auth = None, None, False
        self._buffer.clear()
        self.mode = Mode.COMMAND

    def close(self, reply: Reply | None = None) -> None:
        if reply is not None:
            self._send(reply)
        self.closed = True
        self.mode = Mode.CLOSED
        self._buffer.clear()
        self._sasl = None

    @property
    def offered(self) -> frozenset[str]:
        """The ESMTP extensions in force: none after HELO, the EHLO list after EHLO."""
        return self._extensions() if self.extended else frozenset()

    def _extensions(self) -> frozenset[str]:
        settings = self.settings
        starttls = settings.tls_available and not settings.tls_active
        auth = bool(settings.auth_mechanisms) and (settings.tls_active or settings.auth_without_tls)
        return frozenset(settings.extensions) | ({"STARTTLS"} if starttls else set()) \
            | ({"AUTH"} if auth else set())

    def ehlo_lines(self, client_name: str) -> list[str]:
        lines = [f"{self.settings.hostname} greets {client_name}"]
        for keyword in self.settings.extensions:
            lines.append(f"SIZE {self.settings.max_message_size}" if keyword == "SIZE" else keyword)
        extensions = self._extensions()
        if "STARTTLS" in extensions:
            lines.append("STARTTLS")
        if "AUTH" in extensions:
            lines.append(" ".join(("AUTH", *self.settings.auth_mechanisms)))
        return lines

    # --- answers ------------------------------------------------------------------------

    def _take_pending(self) -> Event:
        event = self._awaiting
        if event is None:
            raise RuntimeError("no event is waiting for an answer")
        self._awaiting = None
        return event

    def _positive(self, event: Event) -> Reply:
        match event:
            case Hello(name=name, extended=True):
                return Reply(250, None, "\n".join(self.ehlo_lines(name)))
            case Hello():
                return Reply(250, None, f"{self.settings.hostname}")
            case MailFrom():
                return Reply(250, "2.1.0", "Sender OK")
            case RcptTo():
                return Reply(250, "2.1.5", "Recipient OK")
            case MessageBegin(bdat=False):
                return Reply(354, None, "End data with <CR><LF>.<CR><LF>")
            case ChunkEnd(size=size):
                return Reply(250, "2.0.0", f"{size} octets received")
            case StartTls():
                return Reply(220, "2.0.0", "Ready to start TLS")
            case Authenticate():
                return Reply(235, "2.7.0", "Authentication successful")
            case _:
                return OK

    def _answer(self, event: Event, reply: Reply) -> None:
        positive = reply.is_positive
        match event:
            case Hello(name=name, extended=extended):
                if positive:
                    self.helo, self.extended, self.transaction = name, extended, None
            case MailFrom(sender=sender, params=params):
                if positive:
                    self.transaction = Transaction(sender, params)
            case RcptTo(recipient=mailbox, params=params):
                if positive and self.transaction is not None:
                    self.transaction.recipients.append(Recipient(mailbox, params))
            case MessageBegin(bdat=True):
                if positive:
                    return
                self._bdat_failure = reply
                return
            case MessageBegin(bdat=False):
                if positive:
                    self._start_data()
                else:
                    self.transaction = None
            case ChunkEnd():
                if not positive:
                    self.transaction = None
            case MessageEnd():
                self.transaction = None
            case StartTls():
                if positive:
                    self._send(reply)
                    self.mode = Mode.TLS_PENDING
                    self._buffer.clear()
                    return
            case Authenticate(login=login):
                if positive:
                    self.authenticated = login
        self._send(reply)
        if reply.code in (421, 521):
            self.close()

    def _send(self, reply: Reply) -> None:
        self._out.append(reply.to_bytes())

    def _refuse(self, command: str, reply: Reply, *, error: bool = True) -> None:
        self._send(reply)
        self._events.append(Refused(command, reply))
        if error:
            self._errors += 1
            if self._errors >= self.settings.max_errors:
                self.close(Reply(421, "4.7.0", "Too many errors, closing connection"))

    # --- reading ------------------------------------------------------------------------

    def _step(self) -> bool:
        """Consume input; False when nothing more can be done without new input."""
        if self.mode is Mode.COMMAND:
            return self._read_command()
        if self.mode is Mode.SKIP_LINE:
            return self._skip_line()
        if self.mode is Mode.DATA:
            return self._read_data()
        if self.mode is Mode.BDAT:
            return self._read_bdat()
        if self.mode is Mode.AUTH:
            return self._read_line(MAX_RESPONSE + 2, self._auth_response)
        return False

    def _read_command(self) -> bool:
        return self._read_line(MAX_BUFFERED_LINE, self._command)

    def _read_line(self, limit: int, handle: Callable[[bytes], None]) -> bool:
        """Hand the next whole line (CRLF removed) to ``handle``; skip one too long."""
        buffer = self._buffer
        end = buffer.find(b"\n")
        if end < 0:
            if len(buffer) > limit:
                self.mode = Mode.SKIP_LINE
                self._sasl = None  # a skipped AUTH response ends the exchange
                buffer.clear()
                return True
            return False
        line = bytes(buffer[: end + 1])
        del buffer[: end + 1]
        if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
            self._fatal_bare_newline("command")
            return True
        handle(line[:-2])
        return True

    def _skip_line(self) -> bool:
        end = self._buffer.find(b"\n")
        if end < 0:
            self._buffer.clear()
            return False
        del self._buffer[: end + 1]
        self.mode = Mode.COMMAND
        self._refuse("?", Reply(500, "5.5.6", "Line too long"))
        return True

    def _fatal_bare_newline(self, where: str) -> None:
        reply = Reply(521, "5.5.2", f"Bare CR or LF in {where} is not allowed, closing")
        self._events.append(Refused(where, reply))
        self.close(reply)

    def _command(self, line: bytes) -> None:
        try:
            verb, argument = parse_command(line)
        except UnicodeDecodeError:
            self._refuse("?", Reply(500, "5.5.2", "Command is not valid UTF-8"))
            return
        handler = _HANDLERS.get(verb)
        # A stray AUTH response read as a command must not reach the log: report it as ?.
        name = verb if handler else "?" if self._after_auth else verb[:16]
        if len(line) + 2 > LINE_LIMITS.get(verb, COMMAND_LINE_LIMIT):
            self._refuse(name, Reply(500, "5.5.6", "Line too long"))
            return
        if "\x00" in argument:
            self._refuse(name, Reply(501, "5.5.2", "NUL is not allowed in commands"))
            return
        if handler is None:
            self._unknown_command(name, verb, argument)
            return
        self._after_auth = verb == "AUTH"
        handler(self, argument)

    def _unknown_command(self, name: str, verb: str, argument: str) -> None:
        if verb in HTTP_VERBS or argument.rstrip().upper().startswith("HTTP/") \
                or " HTTP/1." in argument:
            reply = Reply(502, "5.7.0", "This is an SMTP server, not HTTP; closing")
            self._events.append(Refused(name, reply))
            self.close(reply)
            return
        self._unknown += 1
        if self._unknown > self.settings.max_unknown_commands:
            reply = Reply(421, "4.7.0", "Too many unknown commands, closing connection")
            self._events.append(Refused(name, reply))
            self.close(reply)
            return
        self._refuse(name, Reply(500, "5.5.1", "Unknown command"))

    def _raise(self, event: Event) -> None:
        self._events.append(event)

    # --- verbs --------------------------------------------------------------------------

    def _do_hello(self, argument: str, extended: bool) -> None:
        verb = "EHLO" if extended else "HELO"
        name = argument.strip()
        if not name or " " in name:
            self._refuse(verb, Reply(501, "5.5.4", f"Syntax: {verb} hostname"))
            return
        self._raise(Hello(name, extended))

    def _do_ehlo(self, argument: str) -> None:
        self._do_hello(argument, True)

    def _do_helo(self, argument: str) -> None:
        self._do_hello(argument, False)

    def _do_mail(self, argument: str) -> None:
        if self.helo is None:
            self._refuse("MAIL", Reply(503, "5.5.1", "Send HELO/EHLO first"))
            return
        if self.settings.auth_required and self.authenticated is None:
            self._refuse("MAIL", Reply(530, "5.7.0", "Authentication required"))
            return
        if self.transaction is not None:
            self._refuse("MAIL", Reply(503, "5.5.1", "Nested MAIL command"))
            return
        if argument[:5].upper() != "FROM:":
            self._refuse("MAIL", Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>"))
            return
        try:
            path, rest = split_path(argument[5:])
            params = parse_mail_params(rest, self.offered, self.settings.max_message_size)
            sender = parse_path(path, utf8=params.smtputf8, allow_null=True)
        except ParamError as exc:
            self._refuse("MAIL", exc.reply)
            return
        except AddressError as exc:
            self._refuse("MAIL", _address_reply(exc, sender=True, empty=not argument[5:].strip()))
            return
        self._raise(MailFrom(sender, params))

    def _do_rcpt(self, argument: str) -> None:
        transaction = self.transaction
        if transaction is None:
            self._refuse("RCPT", Reply(503, "5.5.1", "Need MAIL command first"))
            return
        if argument[:3].upper() != "TO:":
            self._refuse("RCPT", Reply(501, "5.5.4", "Syntax: RCPT TO:<address>"))
            return
        if transaction.bdat is not None:
            self._refuse("RCPT", Reply(503, "5.5.1", "RCPT after message data"))
            return
        if len(transaction.recipients) >= self.settings.max_recipients:
            self._refuse("RCPT", Reply(452, "4.5.3", "Too many recipients"), error=False)
            return
        utf8 = transaction.params.smtputf8
        try:
            path, rest = split_path(argument[3:])
            params = parse_rcpt_params(rest, self.offered, utf8)
            recipient = parse_path(path, utf8=utf8, allow_null=False)
        except ParamError as exc:
            self._refuse("RCPT", exc.reply)
            return
        except AddressError as exc:
            self._refuse("RCPT", _address_reply(exc, sender=False, empty=not argument[3:].strip()))
            return
        if recipient is None:  # pragma: no cover - allow_null=False
            return
        self._raise(RcptTo(recipient, params))

    def _transaction_ready(self, verb: str) -> bool:
        transaction = self.transaction
        if transaction is None:
            self._refuse(verb, Reply(503, "5.5.1", "Need MAIL command first"))
        elif not transaction.recipients:
            self._refuse(verb, Reply(503, "5.5.1", "Need RCPT command first (no valid recipients)"))
        else:
            return True
        return False

    def _do_data(self, argument: str) -> None:
        if argument.strip():
            self._refuse("DATA", Reply(501, "5.5.4", "Syntax: DATA (no arguments)"))
            return
        if not self._transaction_ready("DATA"):
            return
        assert self.transaction is not None
        if self.transaction.bdat is not None:
            self._refuse("DATA", Reply(503, "5.5.1", "DATA cannot follow BDAT"))
            return
        if self.transaction.params.body == "BINARYMIME":
            self._refuse("DATA", Reply(503, "5.6.1", "BODY=BINARYMIME requires BDAT"))
            return
        self._raise(MessageBegin(bdat=False))

    def _start_data(self) -> None:
        assert self.transaction is not None
        self.transaction.bdat = False
        self._dot = DotReader(self.settings.max_message_size)
        self.mode = Mode.DATA

    def _read_data(self) -> bool:
        reader = self._dot
        assert reader is not None
        chunk, finished = reader.read(self._buffer)
        if chunk:
            self._events.append(MessageData(chunk))
        if not finished:
            return bool(chunk)
        self.mode = Mode.COMMAND
        self._dot = None
        self._events.append(MessageEnd(_content_error(reader.state), reader.state))
        if reader.state.bare_newline:
            self.mode = Mode.CLOSED
            self._buffer.clear()
        return True

    def _do_bdat(self, argument: str) -> None:
        words = argument.split()
        size = words[0] if words else ""
        if not 1 <= len(words) <= 2 or not (size.isascii() and size.isdigit()) or len(size) > 18 \
                or (len(words) == 2 and words[1].upper() != "LAST"):
            # The chunk size is unknown, so its data cannot be skipped: end the session.
            self._events.append(Refused("BDAT", Reply(501, "5.5.4", "Syntax: BDAT size [LAST]")))
            self.close(Reply(421, "4.5.0", "Syntax: BDAT size [LAST]; cannot find the "
                                           "chunk boundary, closing"))
            return
        self._bdat_left = int(words[0])
        self._bdat_last = len(words) == 2
        self.mode = Mode.BDAT
        transaction = self.transaction
        if "CHUNKING" not in self.offered:
            self._bdat_failure = Reply(503, "5.5.1", "BDAT needs EHLO with CHUNKING")
        elif not (transaction and transaction.recipients) or transaction.bdat is False:
            self._bdat_failure = Reply(503, "5.5.1", "Need MAIL and RCPT before BDAT")
        elif transaction.bdat is None:
            transaction.bdat = True
            self._bdat_state = ContentState()
            binary = transaction.params.body == "BINARYMIME"
            self._bdat_checker = None if binary else LineChecker(self._bdat_state)
            self._raise(MessageBegin(bdat=True))
        limit = self.settings.max_message_size
        if self._bdat_failure is None and limit \
                and self._bdat_state.size + self._bdat_left > limit:
            self._bdat_state.too_big = True

    def _read_bdat(self) -> bool:
        if self._bdat_left and not self._buffer:
            return False
        take = min(self._bdat_left, len(self._buffer))
        if take:
            data = bytes(self._buffer[:take])
            del self._buffer[:take]
            self._bdat_left -= take
            if self._bdat_failure is None:
                self._take_chunk_data(data)
        if self._bdat_left:
            return True
        self.mode = Mode.COMMAND
        failure, self._bdat_failure = self._bdat_failure, None
        if failure is not None:
            self._refuse("BDAT", failure)
            if self.transaction is not None and self.transaction.bdat:
                self.transaction = None
        elif not self._bdat_last:
            self._events.append(ChunkEnd(self._bdat_state.size))
        else:
            self._end_chunked_message()
        return True

    def _take_chunk_data(self, data: bytes) -> None:
        state = self._bdat_state
        if self._bdat_checker is not None:
            self._bdat_checker.feed(data)
        state.size += len(data)
        if not (state.too_big or state.line_too_long or state.bare_newline):
            self._events.append(MessageData(data))

    def _end_chunked_message(self) -> None:
        if self._bdat_checker is not None:
            self._bdat_checker.finish()
        state = self._bdat_state
        error = _content_error(state)
        if state.bare_newline:  # the chunk framing still holds, so the session goes on
            error = Reply(550, "5.6.0", "Bare CR or LF in message text is not allowed")
        self._events.append(MessageEnd(error, state))

    def _do_rset(self, argument: str) -> None:
        self.transaction = None
        self._send(Reply(250, "2.0.0", "Reset OK"))

    def _do_noop(self, argument: str) -> None:
        self._send(OK)

    def _do_quit(self, argument: str) -> None:
        self.quit = True
        self.close(BYE)

    def _do_help(self, argument: str) -> None:
        auth = " AUTH" if "AUTH" in self._extensions() else ""
        self._send(Reply(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP "
                                       f"QUIT VRFY HELP STARTTLS{auth}\nSee RFC 5321"))

    def _do_vrfy(self, argument: str) -> None:
        if not argument.strip():
            self._refuse("VRFY", Reply(501, "5.5.4", "Syntax: VRFY address"))
            return
        self._raise(Verify(argument.strip()))

    def _do_expn(self, argument: str) -> None:
        self._refuse("EXPN", Reply(502, "5.5.1", "EXPN is not available"), error=False)

    def _do_starttls(self, argument: str) -> None:
        if argument.strip():
            self._refuse("STARTTLS", Reply(501, "5.5.4", "Syntax: STARTTLS (no arguments)"))
        elif self.settings.tls_active:
            self._refuse("STARTTLS", Reply(503, "5.5.1", "TLS is already active"))
        elif not self.settings.tls_available:
            self._refuse("STARTTLS", Reply(502, "5.5.1", "STARTTLS is not available"))
        elif self.transaction is not None:
            self._refuse("STARTTLS", Reply(503, "5.5.1", "Mail transaction in progress"))
        else:
            self._buffer.clear()  # pipelined plaintext after STARTTLS is never obeyed
            self._raise(StartTls())

    def _do_auth(self, argument: str) -> None:
        words = argument.split()
        refusal = self._auth_refusal(words)
        if refusal is not None:
            self._refuse("AUTH", refusal)
            return
        initial = decode_initial(words[1]) if len(words) == 2 else None
        if isinstance(initial, SaslError):
            self._refuse("AUTH", initial.reply)
            return
        self._sasl_name = words[0].upper()
        self._sasl = MECHANISMS[self._sasl_name]()
        self._auth_step(self._sasl.start(initial))

    def _auth_refusal(self, words: list[str]) -> Reply | None:
        settings = self.settings
        if not settings.auth_mechanisms:
            return Reply(502, "5.5.1", "AUTH is not available")
        if not self.extended:
            return Reply(503, "5.5.1", "Send EHLO first")
        if self.authenticated is not None:
            return Reply(503, "5.5.1", "Already authenticated")
        if self.transaction is not None:
            return Reply(503, "5.5.1", "Mail transaction in progress")
        if not (settings.tls_active or settings.auth_without_tls):
            return Reply(538, "5.7.11", "Encryption required for requested authentication "
                                        "mechanism")
        if not 1 <= len(words) <= 2:
            return Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
        if words[0].upper() not in settings.auth_mechanisms:
            return Reply(504, "5.5.4", "Unrecognized authentication type")
        return None

    def _auth_response(self, line: bytes) -> None:
        assert self._sasl is not None
        data = decode_response(line)
        self._auth_step(data if isinstance(data, SaslError) else self._sasl.respond(data))

    def _auth_step(self, step: Step) -> None:
        """Send a challenge and wait in AUTH mode, or end the exchange."""
        if isinstance(step, Challenge):
            self.mode = Mode.AUTH
            self._send(Reply(334, None, b64encode(step.data).decode("ascii")))
            return
        self.mode, self._sasl = Mode.COMMAND, None
        if isinstance(step, Credentials):
            self._raise(Authenticate(self._sasl_name, step.login, step.password, step.authzid))
        else:
            self._refuse("AUTH", step.reply)


def _content_error(state: ContentState) -> Reply | None:
    if state.bare_newline:
        return Reply(521, "5.5.2", "Bare CR or LF in message text is not allowed, closing")
    if state.too_big:
        return Reply(552, "5.3.4", "Message too big")
    if state.line_too_long:
        return Reply(500, "5.5.6", f"Message line too long (the limit is {MAX_LINE} octets)")
    return None


def _address_reply(exc: AddressError, *, sender: bool, empty: bool) -> Reply:
    if empty:
        return Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>" if sender
                     else "Syntax: RCPT TO:<address>")
    if exc.needs_utf8:
        return Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
    who = "sender" if sender else "recipient"
    if exc.idna_failure:
        return Reply(501, "5.1.8" if sender else "5.1.2",
                     f"Malformed {who} domain (IDNA conversion failed)")
    return Reply(501, "5.1.7" if sender else "5.1.3", f"Bad {who} address: {exc.reason}")


_HANDLERS = {
    "EHLO": ServerEngine._do_ehlo,
    "HELO": ServerEngine._do_helo,
    "MAIL": ServerEngine._do_mail,
    "RCPT": ServerEngine._do_rcpt,
    "DATA": ServerEngine._do_data,
    "BDAT": ServerEngine._do_bdat,
    "RSET": ServerEngine._do_rset,
    "NOOP": ServerEngine._do_noop,
    "QUIT": ServerEngine._do_quit,
    "HELP": ServerEngine._do_help,
    "VRFY": ServerEngine._do_vrfy,
    "EXPN": ServerEngine._do_expn,
    "STARTTLS": ServerEngine._do_starttls,
    "AUTH": ServerEngine._do_auth,
}
