"""The ``sendmail`` command (also ``tayori sendmail``, ``mailq``, ``newaliases``).

Takes: the command line programs give sendmail (cron, PHP's mail(), git, mutt, ...) and
the message on standard input.
Promises:
- The message is handed to the daemon through the maildrop (:func:`tayori.queue.maildrop.
  drop`: complete, fsync'd, renamed) before exit status 0; the daemon queues it and adds
  a missing Date, Message-ID and From. ``-v`` prints the queue id it will have.
- Recipients: the arguments (comma-separated lists and ``Name <addr>`` forms allowed);
  with ``-t`` also those of the To, Cc and Bcc fields (Resent-To/Cc/Bcc instead when the
  message has them), as Postfix does. A name without a domain is a user of this host
  (``root`` is ``root@<hostname>``). Every recipient must be routed by a match rule:
  a local user may send wherever the rules deliver (:meth:`Rules.route_internal`).
- Bcc and Resent-Bcc fields are removed from every message submitted this way (with or
  without ``-t``), so no recipient learns of the blind copies.
- Without ``-i`` (``-oi``), a line holding a single dot ends the input, as with classic
  sendmail; with it, only the end of input does.
- The sender: ``-f`` / ``-r`` (``<>`` or an empty value: the null sender), otherwise
  the submitting user (the daemon names the uid's login at ``hostname``); ``-F`` gives
  the full name for an added From field (default: the user's GECOS name).
- ``-bs``: an SMTP session on standard input and output (the same protocol engine as
  the daemon's listeners; no STARTTLS, no AUTH: the local user is known), each accepted
  message dropped as above; bare LF line ends in the input are taken as CRLF.
- ``-bp`` = ``mailq`` = ``tayori queue list`` (and the count of messages waiting in the
  maildrop, when this user may see it); ``-q`` = ``tayori queue flush``; ``-bi`` =
  ``newaliases`` (nothing to do: tayori reloads alias tables when their file changes).
- Accepted and ignored: ``-oXXX`` (``-oem``, ``-odb``, ``-oQ...``), ``-O opt``, ``-B``,
  ``-N``, ``-R``, ``-V``, ``-X``, ``-L``, ``-h``, ``-A``, ``-d``, ``-p``, ``-G``, ``-n``,
  ``-U``, ``-m``.
- Configuration: ``-C FILE`` or ``-c FILE``, else ``$TAYORI_CONFIG``, else
  ``/etc/tayori/tayori.toml`` when it exists, else the embedded default. The user
  running sendmail must be able to read it (and the tables it names).
Failure policy: one line ``sendmail: ...`` on stderr, never a traceback, and an exit
status per sysexits(3): 64 EX_USAGE (bad options, no recipients), 65 EX_DATAERR (bad
address, message too big, too many recipients), 66 EX_NOINPUT (unreadable input),
67 EX_NOUSER (no match rule routes a recipient), 73 EX_CANTCREAT (the maildrop refuses
this user), 75 EX_TEMPFAIL (maildrop missing, disk full), 78 EX_CONFIG (bad config),
70 EX_SOFTWARE (a bug). Nothing is queued unless the exit status is 0.
Config keys: ``spool``, ``hostname``, ``limits.max_message_size``,
``limits.max_recipients``, ``match``, ``tables``.
Standards: sendmail(8)/Postfix sendmail(1) options, sysexits(3), RFC 5322 §3.6.3
(destination fields), RFC 5321 (``-bs``).
"""

from __future__ import annotations

import contextlib
import email.errors
import email.policy
import errno
import io
import itertools
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from tayori.address import AddressError, parse_mailbox
from tayori.config import Config, ConfigError, load
from tayori.errors import Reply
from tayori.policy.relay import Rules
from tayori.queue import maildrop
from tayori.route.local import LocalRecipients
from tayori.smtp.server import (
    ChunkEnd,
    Hello,
    MailFrom,
    MessageBegin,
    MessageData,
    MessageEnd,
    RcptTo,
    ServerEngine,
    Settings,
    Verify,
)

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_NOUSER = 67
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_CONFIG = 78

DEFAULT_CONFIG = "/etc/tayori/tayori.toml"
MEMORY = 1024 * 1024          # a message beyond this waits in a temporary file
BS_EXTENSIONS = ("PIPELINING", "SIZE", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8",
                 "CHUNKING")
NEWALIASES = ("tayori reads its alias tables itself and reloads them when their file "
              "changes: nothing to do.")
_FLAGS = set("GIimntUv")
_WITH_ARGUMENT = set("ABbCcdFfhLNOopRrVX")
_DESTINATIONS = ("to", "cc", "bcc")
_RESENT = ("resent-to", "resent-cc", "resent-bcc")
_HIDDEN = ("bcc", "resent-bcc")
_BARE_LF = re.compile(rb"(?<!\r)\n")


class Failure(Exception):
    """A problem to report in one line, with its exit status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class Options:
    # m: send (-bm), s: SMTP on stdin/stdout (-bs), p: list (-bp), q: flush, i: newaliases
    mode: str = "m"
    extract: bool = False
    ignore_dots: bool = False
    sender: str | None = None
    full_name: str | None = None
    config: str | None = None
    verbose: bool = False
    recipients: list[str] = field(default_factory=list)


# --- entry points -------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``sendmail [options] [recipient ...]``; returns the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        return _run(parse(arguments))
    except Failure as exc:
        _complain(exc.message)
        return exc.status
    except KeyboardInterrupt:
        _complain("interrupted; nothing was queued")
        return EX_TEMPFAIL
    except Exception as exc:   # never a traceback for the programs that call us
        _complain(f"internal error: {type(exc).__name__}: {exc}")
        return EX_SOFTWARE


def mailq_main() -> int:
    """The ``mailq`` command: ``sendmail -bp``."""
    return main(["-bp", *sys.argv[1:]])


def newaliases_main() -> int:
    """The ``newaliases`` command: ``sendmail -bi``."""
    return main(["-bi", *sys.argv[1:]])


def _complain(message: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(f"sendmail: {message}", file=sys.stderr, flush=True)


# --- options ------------------------------------------------------------------------------


def parse(arguments: Sequence[str]) -> Options:
    """Sendmail's options, getopt style (``-ti``, ``-fsender``, ``-f sender``), anywhere
    on the line (GNU style); ``--`` ends them."""
    options = Options()
    index = 0
    while index < len(arguments):
        argument = arguments[index]
        index += 1
        if argument == "--":
            options.recipients += arguments[index:]
            break
        if not argument.startswith("-") or argument == "-":
            options.recipients.append(argument)
            continue
        position = 1
        while position < len(argument):
            flag = argument[position]
            position += 1
            if flag == "q":      # -q, -q30m, -qRsite...: flush the queue once
                options.mode = "q"
                break
            if flag in _FLAGS:
                _flag(options, flag)
                continue
            if flag not in _WITH_ARGUMENT:
                raise Failure(EX_USAGE, f"unknown option -{flag}")
            value = argument[position:]
            if not value:
                if index >= len(arguments):
                    raise Failure(EX_USAGE, f"option -{flag} needs a value")
                value = arguments[index]
                index += 1
            _option(options, flag, value)
            break
    return options


def _flag(options: Options, flag: str) -> None:
    if flag == "t":
        options.extract = True
    elif flag == "i":
        options.ignore_dots = True
    elif flag == "v":
        options.verbose = True
    elif flag == "I":
        options.mode = "i"
    # -G (gateway), -n (no aliasing), -U (initial submission), -m (me too): ignored


def _option(options: Options, flag: str, value: str) -> None:
    if flag == "b":
        mode = value[:1]
        if value in ("d", "D"):
            raise Failure(EX_USAGE, f"-b{value}: the daemon is started with `tayori serve`")
        if len(value) != 1 or mode not in "mspi":
            raise Failure(EX_USAGE, f"-b{value} is not supported (use -bm, -bs, -bp or -bi)")
        options.mode = mode
    elif flag in "Cc":
        options.config = value
    elif flag in "fr":
        options.sender = value
    elif flag == "F":
        options.full_name = value
    elif flag == "o" and value == "i":
        options.ignore_dots = True
    # -A -B -d -h -L -N -O -p -R -V -X: accepted for compatibility, ignored


# --- the modes --------------------------------------------------------------------------


def _run(options: Options) -> int:
    if options.mode == "i":
        print(NEWALIASES)
        return EX_OK
    path = config_path(options)
    try:
        config = load(path)
    except ConfigError as exc:
        raise Failure(EX_CONFIG, f"configuration error: {exc}") from None
    if options.mode == "p":
        return _list(config, path)
    if options.mode == "q":
        return _flush(path)
    if options.mode == "s":
        return SmtpOnStdio(config, options).run()
    return _send(config, options)


def config_path(options: Options) -> str | None:
    if options.config:
        return options.config
    if os.environ.get("TAYORI_CONFIG"):
        return os.environ["TAYORI_CONFIG"]
    return DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None


def _cli(arguments: list[str], path: str | None) -> int:
    from tayori import cli

    sys.stdout.flush()
    return cli.main([*arguments, *(["-c", path] if path else [])])


def _list(config: Config, path: str | None) -> int:
    status = _cli(["queue", "list"], path)
    count = maildrop.waiting(config.spool)
    if count:
        print(f"-- {count} message(s) in the maildrop, not yet picked up by the daemon.")
    return EX_OK if status == 0 else EX_TEMPFAIL


def _flush(path: str | None) -> int:
    return EX_OK if _cli(["queue", "flush"], path) == 0 else EX_TEMPFAIL


# --- sending (-bm) ----------------------------------------------------------------------


def _send(config: Config, options: Options) -> int:
    hostname = config.hostname
    if not options.extract and not options.recipients:
        raise Failure(EX_USAGE, "no recipients: name them as arguments, or use -t to take "
                                "them from the message's To, Cc and Bcc fields")
    sender = None if options.sender is None else checked_sender(options.sender, hostname)
    recipients = [a for text in options.recipients for a in addresses(text, hostname)]
    message = read_message(_stdin(), options.ignore_dots, config.limits.max_message_size)
    with message:
        fields, rest = split_header(maildrop.normalised(message))
        if options.extract:
            recipients += extracted_recipients(fields, hostname)
        recipients = list(dict.fromkeys(recipients))
        if not recipients:
            raise Failure(EX_USAGE, "no recipients: none in To, Cc or Bcc and none given")
        check_recipients(recipients, config)
        content = itertools.chain(without_hidden(fields), rest)
        drop_id = _drop(config, sender, recipients, IteratorReader.of(content), options)
    if options.verbose:
        _complain(f"queued as {drop_id} for the tayori daemon to pick up "
                  f"({len(recipients)} recipient(s))")
    return EX_OK


def _stdin() -> BinaryIO:
    if sys.stdin is None:
        raise Failure(EX_NOINPUT, "no standard input to read the message from")
    return sys.stdin.buffer


def read_message(stream: BinaryIO, ignore_dots: bool, limit: int) -> BinaryIO:
    """The input, up to the end (or, without ``ignore_dots``, a line with a single dot),
    in memory or a temporary file. Raises Failure 66 (unreadable) or 65 (too big: the
    input can only grow when line ends become CRLF)."""
    spooled = tempfile.SpooledTemporaryFile(max_size=MEMORY)   # noqa: SIM115
    size = 0
    try:
        while True:
            try:
                line = stream.readline(maildrop.CHUNK)
            except OSError as exc:
                raise Failure(EX_NOINPUT, f"cannot read the message from standard input: "
                                          f"{exc.strerror or exc}") from None
            if not line:
                break
            if not ignore_dots and line in (b".\n", b".\r\n"):
                break
            size += len(line)
            if limit and size > limit:
                raise Failure(EX_DATAERR, f"message too big (the limit is {limit} bytes)")
            spooled.write(line)
    except BaseException:
        spooled.close()
        raise
    spooled.seek(0)
    return spooled   # type: ignore[return-value]  # SpooledTemporaryFile is binary here


def _drop(config: Config, sender: str | None, recipients: list[str], content: BinaryIO,
          options: Options, *, helo: str | None = None) -> str:
    try:
        return maildrop.drop(config.spool, sender, recipients, content, uid=os.getuid(),
                             full_name=options.full_name,
                             max_size=config.limits.max_message_size, helo=helo)
    except maildrop.MessageTooBig as exc:
        raise Failure(EX_DATAERR, str(exc)) from None
    except OSError as exc:
        raise Failure(*_drop_failure(exc, config.spool)) from None


def _drop_failure(exc: OSError, spool: str) -> tuple[int, str]:
    where = maildrop.path_of(spool)
    if exc.errno == errno.ENOENT:
        return EX_TEMPFAIL, (f"the maildrop {where} does not exist (the tayori daemon "
                             "creates it when it starts); nothing was queued")
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return EX_CANTCREAT, f"cannot write to the maildrop {where}: {reason}"
    return EX_TEMPFAIL, f"cannot write to the maildrop {where}: {reason}; nothing was queued"


# --- addresses --------------------------------------------------------------------------


def checked_sender(text: str, hostname: str) -> str:
    """The ``-f`` value as an envelope sender ("" is the null sender)."""
    value = text.strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1].strip()
    if not value:
        return ""
    return _checked(value, hostname, "sender")


def addresses(text: str, hostname: str) -> list[str]:
    """The mailboxes of an address list (``a@x, Name <b@y>, group: c@z;``), each
    checked; names without a domain qualified with ``hostname``."""
    if not text.strip():
        return []
    try:
        header = email.policy.SMTPUTF8.header_factory("To", text)
        found = header.addresses
    except Exception:   # the email package's parser has no single error type
        raise Failure(EX_DATAERR, f"bad address list {text!r}") from None
    problems = [str(d) for d in header.defects
                if isinstance(d, email.errors.InvalidHeaderDefect)
                and not str(d).startswith("addr-spec local part with no domain")]
    if problems:
        raise Failure(EX_DATAERR, f"bad address {text.strip()!r}: {problems[0]}")
    out = []
    for mailbox in found:
        if not mailbox.username:
            raise Failure(EX_DATAERR, f"bad address {text.strip()!r}")
        spec = mailbox.addr_spec if mailbox.domain else f"{mailbox.addr_spec}@{hostname}"
        out.append(_checked(spec, hostname, "recipient"))
    return out


def _checked(address: str, hostname: str, what: str) -> str:
    qualified = maildrop.qualify(address, hostname)
    if "\ufffd" in qualified:
        raise Failure(EX_DATAERR, f"bad {what} address {address!r}: not UTF-8")
    try:
        parse_mailbox(qualified, utf8=True)
    except AddressError as exc:
        raise Failure(EX_DATAERR, f"bad {what} address {address!r}: {exc.reason}") from None
    return qualified


def check_recipients(recipients: list[str], config: Config) -> None:
    if len(recipients) > config.limits.max_recipients:
        raise Failure(EX_DATAERR, f"too many recipients ({len(recipients)}; the limit, "
                                  f"limits.max_recipients, is {config.limits.max_recipients})")
    rules, local = Rules(config), LocalRecipients(config)
    for address in recipients:
        domain = parse_mailbox(address, utf8=True).ascii_domain
        action = rules.route_internal(domain)
        if action is None:
            raise Failure(EX_NOUSER, f"{address}: no match rule routes mail for {domain}; "
                                     "nothing was queued")
        if not local.known(action, address):
            raise Failure(EX_NOUSER, f"{address}: no such local user; nothing was queued")


# --- the header section ---------------------------------------------------------------


def split_header(lines: Iterator[bytes]) -> tuple[list[list[bytes]], Iterator[bytes]]:
    """The header fields (each a list of its CRLF lines) and the rest of the message
    (beginning with the empty separator line, or the first line that is no field)."""
    fields: list[list[bytes]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        elif line != b"\r\n" and maildrop.FIELD.match(line):
            fields.append([line])
        else:
            return fields, itertools.chain([line], lines)
    return fields, iter(())


def field_name(field_lines: list[bytes]) -> str:
    return field_lines[0].split(b":", 1)[0].strip().decode("ascii", "replace").lower()


def field_value(field_lines: list[bytes]) -> str:
    raw = b"".join(field_lines).split(b":", 1)[1]
    return raw.replace(b"\r\n", b"").decode("utf-8", "replace").strip()


def extracted_recipients(fields: list[list[bytes]], hostname: str) -> list[str]:
    """``-t``: the addresses of To, Cc and Bcc, or of Resent-To/Cc/Bcc when present."""
    resent = [f for f in fields if field_name(f) in _RESENT]
    chosen = resent or [f for f in fields if field_name(f) in _DESTINATIONS]
    return [a for f in chosen for a in addresses(field_value(f), hostname)]


def without_hidden(fields: list[list[bytes]]) -> Iterator[bytes]:
    """The header lines, Bcc and Resent-Bcc fields left out."""
    for field_lines in fields:
        if field_name(field_lines) not in _HIDDEN:
            yield from field_lines


class IteratorReader(io.RawIOBase):
    """A readable binary stream over an iterator of byte strings."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = b""

    @classmethod
    def of(cls, chunks: Iterator[bytes]) -> BinaryIO:
        return io.BufferedReader(cls(chunks), buffer_size=maildrop.CHUNK)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:   # type: ignore[override]
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = chunk
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


# --- -bs: SMTP on standard input and output -----------------------------------------


class SmtpOnStdio:
    """One SMTP session with the local program on the other end of stdin/stdout."""

    def __init__(self, config: Config, options: Options,
                 stdin: int = 0, stdout: BinaryIO | None = None) -> None:
        self.config, self.options = config, options
        self.rules = Rules(config)
        self.local = LocalRecipients(config)
        limits = config.limits
        self.engine = ServerEngine(Settings(
            hostname=config.hostname, max_message_size=limits.max_message_size,
            max_recipients=limits.max_recipients, max_errors=limits.max_errors,
            max_unknown_commands=limits.max_unknown_commands, extensions=BS_EXTENSIONS))
        self.stdin = stdin
        self.stdout = stdout if stdout is not None else sys.stdout.buffer
        self.message: BinaryIO | None = None
        self._carry_cr = False

    def run(self) -> int:
        engine = self.engine
        engine.greet()
        try:
            while True:
                event = engine.next_event()
                if event is not None:
                    self._dispatch(event)
                    continue
                self._flush()   # what the engine answered by itself too (NOOP, RSET...)
                if engine.closed:
                    break
                data = self._read()
                if not data:
                    break
                engine.receive(data)
            self._flush()
        except BrokenPipeError:
            pass
        finally:
            self._discard()
        return EX_OK

    def _read(self) -> bytes:
        try:
            data = os.read(self.stdin, 65536)
        except OSError as exc:
            raise Failure(EX_NOINPUT, f"cannot read standard input: {exc.strerror}") from None
        return self._crlf(data)

    def _crlf(self, data: bytes) -> bytes:
        """Bare LF taken as CRLF (a local program typing SMTP by hand)."""
        if not data:
            return data
        after_cr, self._carry_cr = self._carry_cr, data.endswith(b"\r")
        out = _BARE_LF.sub(b"\r\n", data)
        if after_cr and data.startswith(b"\n"):
            out = out[1:]   # its CR came at the end of the previous read
        return out

    def _flush(self) -> None:
        out = self.engine.data_to_send()
        if out:
            self.stdout.write(out)
            self.stdout.flush()

    def _discard(self) -> None:
        if self.message is not None:
            self.message.close()
            self.message = None

    def _dispatch(self, event: object) -> None:
        engine = self.engine
        match event:
            case MessageData(data=data):
                if self.message is not None:
                    self.message.write(data)
            case Hello() | MailFrom() | ChunkEnd():
                engine.accept()
            case RcptTo(recipient=recipient):
                domain = recipient.ascii_domain or _ascii(self.config.hostname)
                action = self.rules.route_internal(domain)
                if action is None:
                    engine.reply(Reply(550, "5.1.2", "No match rule routes mail for this "
                                                     "domain"))
                elif not self.local.known(action, f"{recipient.local}@{domain}"):
                    engine.reply(Reply(550, "5.1.1", "No such user here"))
                else:
                    engine.accept()
            case MessageBegin():
                self._discard()
                self.message = tempfile.SpooledTemporaryFile(   # type: ignore[assignment]  # noqa: SIM115
                    max_size=MEMORY)
                engine.accept()
            case MessageEnd(error=error):
                engine.reply(error if error is not None else self._queue())
                self._discard()
            case Verify():
                engine.reply(Reply(252, "2.5.0", "Cannot VRFY user, but will accept message "
                                                 "and attempt delivery"))
            case _:
                pass   # Refused: the engine has answered already

    def _queue(self) -> Reply:
        transaction, message = self.engine.transaction, self.message
        assert transaction is not None and message is not None
        hostname = self.config.hostname
        sender = str(transaction.sender) if transaction.sender else ""
        recipients = [maildrop.qualify(str(r.mailbox), hostname)
                      for r in transaction.recipients]
        message.seek(0)
        try:
            drop_id = _drop(self.config, sender, recipients, message, self.options,
                            helo=self.engine.helo)
        except Failure as exc:
            if exc.status == EX_DATAERR:
                return Reply(552, "5.3.4", "Message too big")
            return Reply(451, "4.3.0", exc.message.replace("\r", " ").replace("\n", " "))
        if self.options.verbose:
            _complain(f"queued as {drop_id} for the tayori daemon to pick up")
        return Reply(250, "2.0.0", f"Ok: queued as {drop_id}")


def _ascii(domain: str) -> str:
    from tayori.address import to_ascii_domain

    try:
        return to_ascii_domain(domain)
    except AddressError:
        return domain.lower()
