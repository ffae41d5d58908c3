"""Pipe delivery: a message handed to a program on its standard input.

Takes: a :class:`PipeRequest`: the command line (``|command`` in an alias, or a pipe
action), the spool body (``message_path``, CRLF line ends, as received), the envelope
sender and recipient (and the recipient before alias expansion), the host name, and
optionally the system ``user`` to run as, a time limit, the line ends the program wants
and whether to add the trace headers.

Promises:
- The command line is split like a shell would split words (:func:`shlex.split`), but no
  shell runs unless the operator writes one (``sh -c '...'``): addresses and other
  message data never reach a shell's parser. A program without ``/`` is looked up in the
  ``PATH`` below.
- The program runs in a new session (its own process group), with ``umask`` 077, in the
  user's home directory (``/`` when that is not a directory), with standard output and
  standard error on one pipe, and a clean environment: nothing of tayori's own
  environment is passed on (no inherited secrets), only
  ``PATH=/usr/bin:/bin``, ``SHELL=/bin/sh``, ``LANG=C``, ``TZ`` when tayori has it (as
  Postfix's default ``export_environment``), ``HOME``, ``USER`` and ``LOGNAME`` of the
  user the program runs as, and, as Postfix's local(8) and pipe(8) name them:
  ``SENDER`` (empty for ``<>``), ``RECIPIENT``, ``ORIGINAL_RECIPIENT``, ``LOCAL`` (the
  recipient's whole local part, ``+tag`` included, as Postfix sets it), ``DOMAIN`` (the
  recipient's domain, empty when it has none) and ``EXTENSION`` (the ``+tag`` without the
  delimiter; empty when there is none; the delimiter is any character of
  ``extension_delimiter``, the first one in the local part that is not its first
  character counts).
- With ``user``, the program runs as that system user: its uid, its primary gid and the
  groups it belongs to (``initgroups``), set in the child by the trampoline
  :mod:`tayori.deliver.runas`. Only root can do that; a tayori that dropped its
  privileges to ``user`` after starting as root has the trampoline ask the privileged
  helper (:mod:`tayori.deliver.privileged`), and one that never was root runs a program
  as ``user`` only when that is its own user. Without ``user`` the program runs as tayori
  does: which user a ``|command`` from whose alias file runs as (never root for a user's
  own aliases) is the caller's policy.
- Standard input is ``Return-Path: <sender>`` and ``Delivered-To: recipient`` (the
  Maildir delivery's header, :mod:`tayori.deliver.maildir`; not with ``add_headers``
  false), then the message, with LF line ends (``line_ends="lf"``, what Unix programs
  expect, as Postfix's local(8) and pipe(8) give them; a bare CR stays) or CRLF as
  stored (``"crlf"``). It is streamed in :data:`CHUNK` pieces with the pipe's flow
  control: messages of 50 MB and more go through in bounded memory, and the spool file
  is read on a worker thread, never blocking the event loop. A program may exit without
  reading all of it (a filter that needs only the headers): that is no error by itself,
  the exit status decides.
- The program's output (standard output and error, in the order written) is kept up to
  :data:`OUTPUT_KEEP` bytes, the rest read and dropped (a chatty program never blocks on
  a full pipe); a failure's reply quotes at most :data:`OUTPUT_LINES` non-empty lines and
  :data:`OUTPUT_CHARS` characters of it, control characters replaced: it reaches the
  DSN's Diagnostic-Code and its human-readable part.
- A time limit (``timeout`` seconds from the start) covers the whole run; when it
  passes, the whole process group is killed (``SIGKILL``), as Postfix does (a
  descendant that made itself a session of its own is out of reach). Once the
  program has exited, processes it left behind holding its pipes are given
  :data:`PIPES_GRACE` seconds, then the pipes are closed on them (they are not killed:
  they may be meant to run on). If :func:`run_pipe` is cancelled the process group is
  killed.

The reply (:class:`~tayori.errors.Reply`, the result for the recipient):

=====================================  ============================================
the program...                         reply
=====================================  ============================================
exits 0                                ``250 2.0.0`` delivered
exits non-zero, its output starting    that status (``4.X.X`` temporary, ``5.X.X``
with an enhanced status code (``D.S.N  permanent), the output as the text; Postfix's
text``)                                pipe(8) rule: it takes precedence over the
                                       exit status
exits 64 EX_USAGE                      ``554 5.3.0``
exits 65 EX_DATAERR                    ``554 5.6.0``
exits 66 EX_NOINPUT                    ``554 5.3.0``
exits 67 EX_NOUSER                     ``550 5.1.1``
exits 68 EX_NOHOST                     ``550 5.1.2``
exits 69 EX_UNAVAILABLE                ``554 5.3.0``
exits 70 EX_SOFTWARE                   ``554 5.3.0``
exits 71 EX_OSERR                      ``451 4.3.0`` (temporary)
exits 72 EX_OSFILE                     ``554 5.3.0``
exits 73 EX_CANTCREAT                  ``554 5.2.0``
exits 74 EX_IOERR                      ``451 4.3.0`` (temporary)
exits 75 EX_TEMPFAIL                   ``451 4.3.0`` (temporary)
exits 76 EX_PROTOCOL                   ``554 5.5.0``
exits 77 EX_NOPERM                     ``554 5.7.0``
exits 78 EX_CONFIG                     ``451 4.3.5`` (temporary)
exits with any other non-zero status   ``554 5.3.0``
is killed by a signal                  ``451 4.3.0`` (temporary, as Postfix)
runs past ``timeout``                  ``451 4.3.0`` "command timed out after Ns"
cannot be run (not found, not          ``451 4.3.5``
executable, a bad command line, an
unknown or impossible ``user``, no
privileged helper serving)
cannot be started (fork fails...)      ``451 4.3.0``
=====================================  ============================================

The enhanced status codes are Postfix's (sys_exits.c). Which codes are temporary
follows sendmail (EX_TEMPFAIL, EX_OSERR and EX_IOERR queue the message; Postfix bounces
on EX_IOERR), plus EX_CONFIG: a configuration problem, the program's or ours, is for
the operator to fix while the mail waits. For the same reason a command that cannot
run is temporary (Postfix bounces; the mail would be lost to a typo in a path). A
time limit is temporary too (Postfix and Exim bounce by default; Exim's
``timeout_defer`` makes it temporary): a program that is slow under load gets another
chance, and one that always hangs bounces when the queue lifetime ends.

Failure policy: every outcome is a :class:`Reply`; nothing is raised for what the
program or the system does. A missing or unreadable spool file is ``451 4.3.0`` (an
unreadable one mid-way kills the program before it sees the end of its input).
Arguments no caller should pass (a line break or NUL in an address or the host name,
an unknown ``line_ends``, a time limit that is not positive) raise ValueError.
Config keys: none itself; the pipe action or the alias gives the command, the user and
the time limit.
Standards: sysexits.h (the exit status contract), RFC 3463 (enhanced status codes),
RFC 5321 §4.4 (Return-Path), RFC 9228 (Delivered-To); Postfix's local(8)/pipe(8) for the
environment's names and the exit status semantics.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import pwd
import re
import shlex
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Protocol, cast

from tayori.deliver import maildir, privileged
from tayori.errors import Reply

CHUNK = maildir.CHUNK
OUTPUT_KEEP = 4096      # bytes of the program's output kept
OUTPUT_LINES = 5        # lines of it quoted in a reply
OUTPUT_CHARS = 1000     # characters of it quoted in a reply
PIPES_GRACE = 2.0       # seconds the pipes may stay open after the program exited
KILL_WAIT = 10.0        # seconds to wait for a killed program to be reaped
PATH = "/usr/bin:/bin"
UMASK = 0o077

DELIVERED = Reply(250, "2.0.0", "delivered to command")

# sysexits.h: the status's enhanced code (Postfix's) and its meaning.
SYSEXITS: dict[int, tuple[str, str]] = {
    64: ("5.3.0", "command line usage error"),        # EX_USAGE
    65: ("5.6.0", "data format error"),               # EX_DATAERR
    66: ("5.3.0", "cannot open input"),               # EX_NOINPUT
    67: ("5.1.1", "user unknown"),                    # EX_NOUSER
    68: ("5.1.2", "host name unknown"),               # EX_NOHOST
    69: ("5.3.0", "service unavailable"),             # EX_UNAVAILABLE
    70: ("5.3.0", "internal software error"),         # EX_SOFTWARE
    71: ("4.3.0", "system resource problem"),         # EX_OSERR
    72: ("5.3.0", "critical OS file missing"),        # EX_OSFILE
    73: ("5.2.0", "cannot create user output file"),  # EX_CANTCREAT
    74: ("4.3.0", "input/output error"),              # EX_IOERR
    75: ("4.3.0", "temporary failure"),               # EX_TEMPFAIL
    76: ("5.5.0", "remote error in protocol"),        # EX_PROTOCOL
    77: ("5.7.0", "permission denied"),               # EX_NOPERM
    78: ("4.3.5", "local configuration error"),       # EX_CONFIG
}

# errno values of a command that cannot run: the operator's to fix.
_CANNOT_RUN = frozenset({errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOEXEC,
                         errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.ENAMETOOLONG})
_DSN_TEXT = re.compile(r"([45])\.(\d{1,3})\.(\d{1,3})(?:\s+|\Z)")


@dataclass(frozen=True, slots=True)
class PipeRequest:
    command: str                 # split with shlex; no shell unless written: sh -c '...'
    message_path: str            # the spool body (CRLF line ends)
    sender: str                  # "" for <>
    recipient: str               # the envelope recipient (user+tag@example.org)
    original_recipient: str      # before alias expansion (may equal recipient)
    hostname: str
    user: str | None = None      # run as this system user (needs root); None: as tayori
    timeout: float = 600.0
    line_ends: str = "lf"        # "lf" or "crlf" on the program's standard input
    add_headers: bool = True     # prepend Return-Path and Delivered-To
    extension_delimiter: str = "+"   # each character is a delimiter; "": none


async def run_pipe(request: PipeRequest) -> Reply:
    """Run ``request.command`` with the message on its standard input; the outcome.

    Never raises for what the program or the system does (see the module's table);
    ValueError for arguments no caller should pass.
    """
    header = _check(request)
    try:
        argv = shlex.split(request.command)
    except ValueError:
        argv = []
    if not argv:
        return Reply(451, "4.3.5", "invalid command line for pipe delivery")
    loop = asyncio.get_running_loop()
    try:
        setup = await loop.run_in_executor(None, _prepare, request)
    except _Refused as exc:
        return exc.reply
    try:
        return await _Run(request, argv, header, setup).run()
    finally:
        os.close(setup.source)


# --- before the program starts ------------------------------------------------------------


class _Refused(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclass(frozen=True, slots=True)
class _Setup:
    source: int                  # the spool file, open
    env: dict[str, str]
    cwd: str
    uid: int | None = None       # switch to these in the child (None: as tayori runs)
    gid: int | None = None
    groups: list[int] | None = None


def _check(request: PipeRequest) -> bytes:
    """Refuse what no caller should pass; the trace header to send (maybe empty)."""
    if request.line_ends not in ("lf", "crlf"):
        raise ValueError(f"line_ends must be 'lf' or 'crlf': {request.line_ends!r}")
    if not request.timeout > 0:
        raise ValueError(f"timeout must be positive: {request.timeout!r}")
    for value in (request.sender, request.recipient, request.original_recipient,
                  request.hostname, request.user or ""):
        if any(c in value for c in "\r\n\0"):
            raise ValueError(f"line break or NUL in a pipe delivery argument: {value!r}")
    if not request.recipient:
        raise ValueError("empty recipient")
    if not request.add_headers:
        return b""
    header = maildir._trace_header(request.sender, request.recipient)
    return header.replace(b"\n", b"\r\n") if request.line_ends == "crlf" else header


def _prepare(request: PipeRequest) -> _Setup:
    """The identity, environment and open spool file for the run (on a worker thread:
    the user database may be a network service). Raises :class:`_Refused`."""
    uid = gid = groups = None
    euid = os.geteuid()
    if request.user is None:
        try:
            entry = pwd.getpwuid(euid)
            name, home = entry.pw_name, entry.pw_dir
        except KeyError:
            name, home = str(euid), "/"
    else:
        try:
            entry = pwd.getpwnam(request.user)
        except KeyError:
            raise _Refused(Reply(451, "4.3.5", "unknown user for pipe delivery: "
                                 f"{_printable(request.user)}")) from None
        name, home = entry.pw_name, entry.pw_dir
        if euid == 0:
            uid, gid = entry.pw_uid, entry.pw_gid
            groups = os.getgrouplist(name, gid)
        elif entry.pw_uid != euid:
            if privileged.available() is None:
                raise _Refused(Reply(451, "4.3.5", f"cannot run a command as {name}: "
                                     "tayori was not started as root"))
            uid, gid = entry.pw_uid, entry.pw_gid   # the trampoline asks the helper
    local, _, domain = request.recipient.rpartition("@")
    if not local:
        local, domain = request.recipient, ""
    env = {
        "PATH": PATH, "SHELL": "/bin/sh", "LANG": "C",
        "HOME": home, "USER": name, "LOGNAME": name,
        "SENDER": request.sender, "RECIPIENT": request.recipient,
        "ORIGINAL_RECIPIENT": request.original_recipient,
        "LOCAL": local, "DOMAIN": domain,
        "EXTENSION": _extension(local, request.extension_delimiter),
    }
    if "TZ" in os.environ:
        env["TZ"] = os.environ["TZ"]
    try:
        source = os.open(request.message_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise _Refused(Reply(451, "4.3.0", "Queued message file is missing")) from None
    except OSError as exc:
        raise _Refused(Reply(451, "4.3.0", "Cannot read the queued message: "
                             f"{_strerror(exc)}")) from None
    return _Setup(source, env, home if os.path.isdir(home) else "/", uid, gid, groups)


def _extension(local: str, delimiters: str) -> str:
    """The part of ``local`` after its first delimiter (not counting a leading one)."""
    for index, char in enumerate(local):
        if index and char in delimiters:
            return local[index + 1:]
    return ""


# --- the run ------------------------------------------------------------------------------


class _Protocol(asyncio.SubprocessProtocol):
    """Keeps the head of the output, flow control for standard input, and the events."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.output = bytearray()
        self.exited: asyncio.Future[None] = loop.create_future()   # the program exited
        self.closed: asyncio.Future[None] = loop.create_future()   # ... and its pipes closed
        self.writable = asyncio.Event()
        self.writable.set()
        self.stdin_lost = False

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        room = OUTPUT_KEEP - len(self.output)
        if room > 0:
            self.output += data[:room]

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd == 0:
            self.stdin_lost = True
            self.writable.set()

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class _SpoolError(Exception):
    pass


class _Process(Protocol):
    """What :class:`_Run` uses of the running program (a subprocess transport)."""

    def get_pid(self) -> int: ...

    def get_pipe_transport(self, fd: int) -> asyncio.BaseTransport | None: ...

    def get_returncode(self) -> int | None: ...

    def close(self) -> None: ...


class _HelperProcess:
    """A program the privileged helper runs as its user: our ends of its standard input
    and output pipes, and the connection that brings its wait status. Killing it is
    hanging up: the helper then kills the program's process group. :meth:`start` sends
    nothing unless root serves the helper's socket; it raises
    :class:`~tayori.deliver.privileged.HelperUnavailable` (the delivery answers
    ``451 4.3.5``) when the helper does not serve."""

    def __init__(self, conn: socket.socket, stdin: asyncio.BaseTransport,
                 output: asyncio.BaseTransport) -> None:
        self.conn, self.stdin, self.output = conn, stdin, output
        self.returncode: int | None = None
        self.waiter: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, address: str, protocol: _Protocol, request: bytes) -> _HelperProcess:
        loop = asyncio.get_running_loop()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        conn.setblocking(False)
        stdin_read, stdin_write = os.pipe()
        output_read, output_write = os.pipe()
        try:
            await loop.sock_connect(conn, address)
            privileged.check_server(conn)
            socket.send_fds(conn, [request], [stdin_read, output_write, output_write])
        except (OSError, privileged.HelperUnavailable) as exc:
            conn.close()
            os.close(stdin_write)
            os.close(output_read)
            if isinstance(exc, OSError):
                raise privileged.unavailable(f"the privileged helper did not answer: "
                                             f"{_strerror(exc)}") from None
            raise
        finally:
            os.close(stdin_read)
            os.close(output_write)
        stdin, _ = await loop.connect_write_pipe(lambda: _StdinSide(protocol),
                                                 os.fdopen(stdin_write, "wb", 0))
        output, _ = await loop.connect_read_pipe(lambda: _OutputSide(protocol),
                                                 os.fdopen(output_read, "rb", 0))
        process = cls(conn, stdin, output)
        process.waiter = asyncio.create_task(process._wait(protocol))
        return process

    async def _wait(self, protocol: _Protocol) -> None:
        with contextlib.suppress(OSError):
            answer = await asyncio.get_running_loop().sock_recv(self.conn, 4096)
            status = privileged.exec_status(answer)
            if status is not None:
                self.returncode = os.waitstatus_to_exitcode(status)
        protocol.process_exited()

    def get_pid(self) -> int:
        return 0

    def get_pipe_transport(self, fd: int) -> asyncio.BaseTransport | None:
        return self.stdin if fd == 0 else None

    def get_returncode(self) -> int | None:
        return self.returncode

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if self.waiter is not None:
            self.waiter.cancel()
        self.stdin.close()
        self.output.close()
        self.conn.close()


class _StdinSide(asyncio.Protocol):
    def __init__(self, protocol: _Protocol) -> None:
        self.protocol = protocol

    def pause_writing(self) -> None:
        self.protocol.pause_writing()

    def resume_writing(self) -> None:
        self.protocol.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.protocol.pipe_connection_lost(0, exc)


class _OutputSide(asyncio.Protocol):
    def __init__(self, protocol: _Protocol) -> None:
        self.protocol = protocol

    def data_received(self, data: bytes) -> None:
        self.protocol.pipe_data_received(1, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.protocol.connection_lost(exc)


class _Run:
    def __init__(self, request: PipeRequest, argv: list[str], header: bytes,
                 setup: _Setup) -> None:
        self.request = request
        self.argv = argv
        self.header = header
        self.setup = setup
        self.pid = 0
        self.process: _Process | None = None

    def _trampoline(self) -> list[str]:
        """The command behind :mod:`tayori.deliver.runas`, which sets the user and the
        umask in the child (uvloop takes no ``user=``/``umask=`` arguments)."""
        setup = self.setup
        return [sys.executable, "-m", "tayori.deliver.runas",
                "" if setup.uid is None else str(setup.uid),
                "" if setup.gid is None else str(setup.gid),
                ",".join(str(g) for g in setup.groups or ()), f"{UMASK:o}", "--", *self.argv]

    async def _start(self, protocol: _Protocol) -> _Process:
        """The program started: by the trampoline, as our child; or, for another user
        when tayori dropped its privileges, by the privileged helper."""
        helper = privileged.available()
        uid = self.setup.uid
        if helper is not None and uid is not None and os.geteuid() != 0:
            return await _HelperProcess.start(helper, protocol, privileged.exec_request(
                uid, self.argv, env=self.setup.env, cwd=self.setup.cwd, umask=UMASK))
        transport, _ = await asyncio.get_running_loop().subprocess_exec(
            lambda: protocol, *self._trampoline(), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**self.setup.env, "PYTHONCOERCECLOCALE": "0"},   # see deliver.runas
            cwd=self.setup.cwd, start_new_session=True)
        return transport

    async def run(self) -> Reply:
        loop = asyncio.get_running_loop()
        protocol = _Protocol(loop)
        try:
            transport = self.process = await self._start(protocol)
        except OSError as exc:
            return self._not_started(exc)
        except privileged.HelperUnavailable as exc:
            return Reply(451, "4.3.5", f"cannot run the command {_printable(self.argv[0])} "
                         f"as its user: {exc}")
        self.pid = transport.get_pid()
        feeder = asyncio.create_task(self._feed(transport, protocol))
        try:
            done, _ = await asyncio.wait({protocol.exited}, timeout=self.request.timeout)
            timed_out = not done
            if timed_out:
                await self._stop(protocol)
            await asyncio.wait({protocol.closed, feeder}, timeout=PIPES_GRACE)
        finally:
            if not protocol.exited.done():   # cancelled: the program must not outlive us
                await self._stop(protocol)
            if not feeder.done():
                feeder.cancel()
                await asyncio.wait({feeder})
            transport.close()
        problem = None if feeder.cancelled() else feeder.exception()
        if isinstance(problem, _SpoolError):
            return Reply(451, "4.3.0", "Cannot read the queued message")
        if problem is not None:
            raise problem
        output = _output_lines(bytes(protocol.output))
        if timed_out:
            return _reply("4.3.0", f"command timed out after {self.request.timeout:g}s",
                          output)
        status = transport.get_returncode()
        if status is None:   # exited, but not reaped yet (never seen)
            return _reply("4.3.0", "command outcome unknown", output)
        return _judge(status, output)

    async def _feed(self, transport: _Process, protocol: _Protocol) -> None:
        """Write the header and the message to standard input, then close it. Returns
        early when the program closes it; raises :class:`_SpoolError` (the process
        group killed) when the spool file cannot be read."""
        pipe = transport.get_pipe_transport(0)
        if pipe is None:   # no standard input: nothing to feed
            return
        stdin = cast(asyncio.WriteTransport, pipe)   # uvloop's is one, not a subclass
        loop = asyncio.get_running_loop()
        to_lf = self.request.line_ends == "lf"
        pending = b""   # a CR at the end of a read: maybe half a CRLF

        async def put(data: bytes) -> bool:
            if protocol.stdin_lost:
                return False
            if data:
                stdin.write(data)
                await protocol.writable.wait()
            return not protocol.stdin_lost

        if not await put(self.header):
            return
        offset = 0
        while True:
            # pread: a read still running on a worker thread when this task is
            # cancelled (and the descriptor closed and its number reused) changes nothing.
            try:
                chunk = await loop.run_in_executor(None, os.pread, self.setup.source,
                                                   CHUNK, offset)
            except OSError:
                self._kill_group()
                raise _SpoolError from None
            if not chunk:
                break
            offset += len(chunk)
            if to_lf:
                data = pending + chunk if pending else chunk
                pending = b"\r" if data.endswith(b"\r") else b""
                chunk = data[:-1].replace(b"\r\n", b"\n") if pending else \
                    data.replace(b"\r\n", b"\n")
            if not await put(chunk):
                return
        if pending and not await put(pending):
            return
        stdin.close()   # after what is buffered has been written

    async def _stop(self, protocol: _Protocol) -> None:
        """Kill the process group and wait (boundedly) until the program is reaped."""
        self._kill_group()
        await asyncio.wait({protocol.exited}, timeout=KILL_WAIT)

    def _kill_group(self) -> None:
        if isinstance(self.process, _HelperProcess):
            self.process.kill()
        elif self.pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)

    def _not_started(self, exc: OSError) -> Reply:
        program = _printable(self.argv[0])
        if exc.errno in _CANNOT_RUN:
            return Reply(451, "4.3.5", f"cannot run the command {program}: "
                         f"{_strerror(exc)}")
        return Reply(451, "4.3.0", f"cannot start the command {program}: "
                     f"{_strerror(exc)}")


# --- the outcome --------------------------------------------------------------------------


def _judge(returncode: int, output: list[str]) -> Reply:
    """The reply for a program that ended with ``returncode`` (negative: the signal)."""
    if returncode == 0:
        return DELIVERED
    if returncode < 0:
        number = -returncode
        try:
            name = f" ({signal.Signals(number).name})"
        except ValueError:
            name = ""
        return _reply("4.3.0", f"command killed by signal {number}{name}", output)
    if output:
        match = _DSN_TEXT.match(output[0])
        if match:
            rest = output[0][match.end():]
            return _reply(".".join(match.groups()), f"command failed (exit status "
                          f"{returncode})", [rest, *output[1:]] if rest else output[1:])
    known = SYSEXITS.get(returncode)
    if known:
        status, meaning = known
        return _reply(status, f"command failed: {meaning} (exit status {returncode})",
                      output)
    return _reply("5.3.0", f"command failed with exit status {returncode}", output)


def _reply(status: str, summary: str, output: list[str]) -> Reply:
    return Reply(_code_for(status), status, "\n".join([summary, *output]))


def _code_for(status: str) -> int:
    """The SMTP reply code that goes with an enhanced status code."""
    if status.startswith("4"):
        return 452 if status in ("4.2.2", "4.3.1") else 451
    if status.startswith("5.1."):
        return 550
    return 552 if status == "5.2.2" else 554


def _output_lines(raw: bytes) -> list[str]:
    """The non-empty lines of the program's output, quotable in a reply: at most
    :data:`OUTPUT_LINES` lines and :data:`OUTPUT_CHARS` characters, tabs as spaces,
    other control characters as ``?``, ``...`` where something was cut."""
    text = raw.decode("utf-8", "replace")
    lines = []
    for line in text.splitlines():
        clean = "".join(c if c.isprintable() else " " if c == "\t" else "?"
                        for c in line).strip()
        if clean:
            lines.append(clean)
    kept: list[str] = []
    room = OUTPUT_CHARS
    for line in lines[:OUTPUT_LINES]:
        if len(line) > room:
            kept.append(line[:room] + "...")
            return kept
        kept.append(line)
        room -= len(line)
    if len(lines) > OUTPUT_LINES or len(raw) >= OUTPUT_KEEP:
        kept.append("...")
    return kept


def _strerror(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else "system error"


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)
