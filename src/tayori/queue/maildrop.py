"""The maildrop: local submission (the ``sendmail`` command) handed to the daemon.

Takes: from a local program (:mod:`tayori.sendmail`, running as whichever user called
it), an envelope and the message bytes; in the daemon, the spool, config and rules.
Promises:
- :func:`ensure` (the daemon, at start) makes ``<spool>/maildrop/`` with mode 1733,
  owned by the spool's owner: every local user may create files there, nobody but the
  owner may list it, and the sticky bit keeps users from removing each other's files.
  Since users must reach it, the spool directory becomes searchable (``o+x``, never
  listable) and the other entries at its top level lose any permission for others.
- :func:`drop` writes one file: a first line of JSON (``version``, ``sender`` (None: the
  submitting user), ``recipients``, ``uid``, ``time``, ``full_name``, optionally
  ``helo``), then the message with CRLF line ends (bare LF or CR become CRLF; a line
  with a single dot is just data here) and no line over 998 octets (longer ones are
  broken: in the header section as folded continuation lines). The file is written
  under a temporary name ``T<id>`` (O_EXCL, mode 0644 whatever the umask: the daemon
  may run as another user; the directory is not listable, so other users cannot find
  it), fsync'd, renamed to ``D<id>``, the rename made durable, and the daemon poked.
  A ``D`` file is therefore always complete. ``<id>`` is a queue id and becomes the
  message's queue id. Over ``max_size``: :class:`MessageTooBig`, nothing left behind.
- :func:`pickup` (the daemon, in the one process running the queue manager) queues the
  complete drop files, oldest first: the envelope is checked (addresses parsed, names
  without a domain qualified with ``hostname``, the file's owner must match its
  ``uid``), recipients routed with :meth:`Rules.route_internal` (a local user may send
  anywhere the rules deliver); a ``Received:`` header is prepended and missing
  ``Date``, ``Message-ID`` and ``From`` are added at the end of the header section, the
  way an MTA completes a local submission; then the message is committed to the spool
  and only after that the drop file removed.
Failure policy:
- A drop file that cannot be used (unreadable, not JSON, bad address, forged uid, not
  a regular file, too big, no recipient that any rule routes) is moved to
  ``<spool>/corrupt/maildrop-<name>`` and logged, never deleted. A recipient that no
  rule routes is logged (``unroutable``) and left out; the others are queued (no DSN:
  ``sendmail`` already refuses such recipients when they are submitted, so this only
  happens when the rules changed in between).
- A commit that fails (disk full) leaves the drop file for the next pass.
- Crash safety: at-least-once, and in practice exactly once: the drop file is removed
  only after the commit returned; after a crash in between, the next pass finds the
  message already in the spool under the same queue id (the body file exists), so it
  only removes the drop file. Temporary ``T`` files older than :data:`STALE_TEMP`
  (abandoned submissions, never acknowledged) are removed.
- ``drop`` durability: the directory is not readable by the submitting user, so it
  cannot be fsync'd by them; the file is fsync'd again after the rename instead, which
  on Linux's journalling filesystems (ext4, xfs) commits the rename with it.
Config keys: ``spool``, ``hostname``, ``limits.max_message_size``,
``limits.max_recipients``, ``match``, ``tables``.
Standards: RFC 5322 §3.6 (Date, Message-ID, From), RFC 5321 §4.4 (Received),
§4.5.3.1.6 (line length), RFC 6532 (UTF-8 headers).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.utils
import errno
import json
import math
import os
import pwd
import re
import sqlite3
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from tayori import maillog
from tayori.address import AddressError, parse_mailbox
from tayori.auth.results import header_fields, strip_forged
from tayori.config import Config
from tayori.policy.relay import Rules
from tayori.queue import wakeup
from tayori.queue.spool import Draft, Envelope, RecipientRecord, Spool, new_queue_id
from tayori.receive.trace import HeaderScanner
from tayori.smtp.framing import MAX_LINE_TEXT

MAILDROP = "maildrop"
CORRUPT = "corrupt"
VERSION = 1
DIR_MODE = 0o1733
FILE_MODE = 0o644
STALE_TEMP = 86400.0            # an abandoned T file (a killed sendmail) is removed after
MAX_ENVELOPE_LINE = 1024 * 1024
CHUNK = 64 * 1024
MAX_PIECE = 64 * 1024           # a longer line is handled in pieces (memory stays bounded)
CRLF = b"\r\n"
_ID = re.compile(r"[0-9BCDFGHJKLMNPQRSTVWXYZ]{1,15}\Z")
_LINE_END = re.compile(rb"\r\n|\r|\n")
FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:")
# Drop files committed whose removal failed: never queued twice by this process.
_stuck: set[str] = set()


class DropError(Exception):
    """The message cannot be dropped (the reason is in the text)."""


class MessageTooBig(DropError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"message too big (the limit is {limit} bytes)")
        self.limit = limit


# --- the directory -------------------------------------------------------------------


def path_of(spool_dir: str) -> str:
    return os.path.join(spool_dir, MAILDROP)


def ensure(spool_dir: str) -> str:
    """Create (or repair) ``<spool>/maildrop`` for the daemon; returns its path.

    Call it as the spool's owner or as root (before or after dropping privileges: the
    directory is given to the spool directory's owner either way)."""
    os.makedirs(spool_dir, mode=0o750, exist_ok=True)
    directory = path_of(spool_dir)
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, 0o700)
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise OSError(errno.ENOTDIR, f"{directory} exists and is not a directory")
    owner = os.stat(spool_dir)
    if os.geteuid() == 0 and (info.st_uid, info.st_gid) != (owner.st_uid, owner.st_gid):
        os.chown(directory, owner.st_uid, owner.st_gid)
    os.chmod(directory, DIR_MODE)
    # Users must pass through the spool directory to reach the maildrop: searchable, not
    # listable; and nothing else in it readable by them (the index names senders).
    mode = stat.S_IMODE(owner.st_mode)
    if mode & 0o011 != 0o011:
        os.chmod(spool_dir, mode | 0o011)
    for name in os.listdir(spool_dir):
        if name == MAILDROP:
            continue
        path = os.path.join(spool_dir, name)
        with contextlib.suppress(FileNotFoundError):
            entry = os.lstat(path)
            if not stat.S_ISLNK(entry.st_mode) and entry.st_mode & 0o007:
                os.chmod(path, stat.S_IMODE(entry.st_mode) & ~0o007)
    return directory


def waiting(spool_dir: str) -> int | None:
    """How many complete drop files wait; None when this user may not list them."""
    try:
        return sum(1 for name in os.listdir(path_of(spool_dir)) if name.startswith("D"))
    except FileNotFoundError:
        return 0
    except OSError:
        return None


# --- content -----------------------------------------------------------------------------


def _raw_lines(stream: BinaryIO) -> Iterator[tuple[bytes, bool]]:
    """Lines without their ends (CRLF, LF or a lone CR all end one) as ``(text,
    continued)``: a line longer than :data:`MAX_PIECE` comes in pieces, every piece
    after the first with ``continued`` set."""
    buffer = bytearray()
    continued = False
    eof = False
    while not eof:
        data = stream.read(CHUNK)
        if data:
            buffer += data
        else:
            eof = True
        start = 0
        while True:
            match = _LINE_END.search(buffer, start)
            if match is None:
                break
            if match.group() == b"\r" and match.end() == len(buffer) and not eof:
                break   # perhaps the first half of a CRLF
            yield bytes(buffer[start:match.start()]), continued
            continued = False
            start = match.end()
        del buffer[:start]
        if len(buffer) > MAX_PIECE:
            cut = len(buffer) - (1 if buffer.endswith(b"\r") else 0)
            yield bytes(buffer[:cut]), continued
            continued = True
            del buffer[:cut]
    if buffer:
        yield bytes(buffer), continued


def _split(text: bytes, first: bytes, rest: bytes) -> Iterator[bytes]:
    """``text`` as lines of at most 998 octets, the first prefixed with ``first``, the
    others with ``rest``; never in the middle of a UTF-8 sequence when avoidable."""
    prefix = first
    while True:
        room = MAX_LINE_TEXT - len(prefix)
        if len(prefix) + len(text) <= MAX_LINE_TEXT:
            yield prefix + text + CRLF
            return
        cut = room
        while cut > room - 3 and 0x80 <= text[cut] < 0xC0:
            cut -= 1
        yield prefix + text[:cut] + CRLF
        text, prefix = text[cut:], rest


def normalised(stream: BinaryIO,
               complete: Callable[[set[str]], list[bytes]] | None = None) -> Iterator[bytes]:
    """The message as lines ending in CRLF, none over 998 octets (idempotent).

    With ``complete``: it is called with the (lower-case) field names of the header
    section when that ends and returns header lines to add there; a header section
    ended by a line that is no header field gets its empty separator line."""
    in_header = True
    names: set[str] = set()
    have_field = False

    def end_of_header(separator: bool) -> Iterator[bytes]:
        if complete is not None:
            yield from complete(names)
            if separator:
                yield CRLF

    for text, continued in _raw_lines(stream):
        if in_header:
            if continued:
                yield from _split(text, b" ", b" ")
                continue
            if text == b"":
                yield from end_of_header(False)
                in_header = False
                yield CRLF
                continue
            field = FIELD.match(text)
            if field is not None or (have_field and text[:1] in (b" ", b"\t")):
                if field is not None:
                    names.add(field.group(1).decode("ascii").lower())
                    have_field = True
                yield from _split(text, b"", b" ")
                continue
            yield from end_of_header(True)
            in_header = False
        yield from _split(text, b"", b"")
    if in_header:
        yield from end_of_header(False)


# --- submitting (any user) ---------------------------------------------------------------


def drop(spool_dir: str, sender: str | None, recipients: Iterable[str], message: BinaryIO,
         *, uid: int, full_name: str | None, max_size: int = 0, helo: str | None = None,
         now: float | None = None) -> str:
    """Write the message into the maildrop; returns its id (its future queue id).

    ``sender``: None for the submitting user (the daemon names the uid's login), ""
    for the null sender. Raises :class:`MessageTooBig` (content over ``max_size``, when
    non-zero) or OSError (maildrop missing, permission, disk full); nothing is left
    behind then."""
    directory = path_of(spool_dir)
    record: dict[str, Any] = {
        "version": VERSION, "sender": sender, "recipients": list(recipients), "uid": uid,
        "time": time.time() if now is None else now, "full_name": full_name}
    if helo is not None:
        record["helo"] = helo
    first_line = json.dumps(record, ensure_ascii=True).encode("ascii") + b"\n"
    while True:
        drop_id = new_queue_id()
        temporary = os.path.join(directory, "T" + drop_id)
        final = os.path.join(directory, "D" + drop_id)
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                         | os.O_NOFOLLOW, FILE_MODE)
        except FileExistsError:
            continue
        if not os.path.lexists(final):
            break
        os.close(fd)
        os.unlink(temporary)
    renamed = False
    try:
        os.fchmod(fd, FILE_MODE)   # whatever the umask: the daemon must read it
        with open(fd, "wb", buffering=CHUNK, closefd=False) as out:
            out.write(first_line)
            size = 0
            for line in normalised(message):
                size += len(line)
                if max_size and size > max_size:
                    raise MessageTooBig(max_size)
                out.write(line)
        os.fsync(fd)
        os.rename(temporary, final)
        renamed = True
        _sync_rename(directory, fd)
    except BaseException:
        if not renamed:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        raise
    finally:
        os.close(fd)
    wakeup.poke(spool_dir)
    return drop_id


def _sync_rename(directory: str, fd: int) -> None:
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except PermissionError:   # not listable by this user (mode 1733): see the docstring
        os.fsync(fd)
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# --- picking up (the daemon) ------------------------------------------------------------


class _Unusable(Exception):
    """The drop file cannot become a message; it is set aside."""


@dataclass(slots=True)
class _Prepared:
    name: str
    draft: Draft
    envelope: Envelope
    uid: int


async def pickup(spool: Spool, config: Config, rules: Rules, *, limit: int = 100) -> list[str]:
    """Queue up to ``limit`` complete drop files, oldest first; returns the queue ids
    committed. Run it in one process only (the queue manager's). When more files wait
    than ``limit``, the queue manager is poked to come back for them."""
    directory = path_of(spool.directory)
    loop = asyncio.get_running_loop()
    names = await loop.run_in_executor(None, _scan, directory, time.time())
    committed: list[str] = []
    for name in names[:limit]:
        prepared = await loop.run_in_executor(None, _prepare, spool, config, rules, name)
        if prepared is None:
            continue
        queue_id = prepared.envelope.queue_id
        try:
            await spool.commit(prepared.draft, prepared.envelope)
        except FileExistsError:
            body = os.path.join(spool.messages, queue_id)
            if not await loop.run_in_executor(None, os.path.exists, body):
                maillog.error("pickup-failed", drop=name, reason="queue id in use; retried")
                break
            maillog.event("pickup-duplicate", drop=name, queue_id=queue_id,
                          reason="already queued (before a restart); drop file removed")
        except (OSError, sqlite3.Error) as exc:
            maillog.error("pickup-failed", drop=name, reason=f"spool write failed: {exc}",
                          note="the drop file stays; retried at the next pass")
            break
        else:
            env = prepared.envelope
            committed.append(queue_id)
            maillog.event("queued", queue_id=queue_id, client="local", uid=prepared.uid,
                          sender=env.sender or "<>", size=env.size,
                          recipients=len(env.recipients), message_id=env.message_id)
        await loop.run_in_executor(None, _remove, directory, name)
    if len(names) > limit:
        wakeup.poke(spool.directory)
    return committed


def _scan(directory: str, now: float) -> list[str]:
    """The names to pick up, oldest first; abandoned temporary files are removed."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        path = os.path.join(directory, name)
        if path in _stuck:
            continue
        if name.startswith("T"):
            with contextlib.suppress(OSError):
                if now - os.lstat(path).st_mtime > STALE_TEMP:
                    os.unlink(path)
                    maillog.warning("maildrop-stale", file=name,
                                    reason="an abandoned submission, never completed")
            continue
        found.append(name)
    return sorted(found, key=lambda name: (len(name), name))


def _remove(directory: str, name: str) -> None:
    path = os.path.join(directory, name)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        _stuck.add(path)
        maillog.error("maildrop-stuck", drop=name, reason=f"cannot remove it: {exc.strerror}",
                      note="queued once; ignored until the next start")


def _prepare(spool: Spool, config: Config, rules: Rules, name: str) -> _Prepared | None:
    directory = path_of(spool.directory)
    path = os.path.join(directory, name)
    try:
        if not name.startswith("D") or not _ID.match(name[1:]):
            raise _Unusable("not a maildrop file name")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _Unusable(f"cannot open it: {exc.strerror}") from None
        with open(fd, "rb") as handle:
            return _read(spool, config, rules, name, handle)
    except _Unusable as exc:
        _set_aside(spool.directory, name, str(exc))
        return None
    except OSError as exc:
        _set_aside(spool.directory, name, f"cannot read it: {exc.strerror or exc}")
        return None
    except Exception as exc:   # a bug must not stop the pickup of the other files
        _set_aside(spool.directory, name, f"internal error: {exc!r}")
        return None


@dataclass(frozen=True, slots=True)
class _Meta:
    """The envelope line of a drop file, checked."""

    sender: str | None
    recipients: tuple[str, ...]
    uid: int
    time: float
    full_name: str | None
    helo: str | None


def _read(spool: Spool, config: Config, rules: Rules, name: str,
          handle: BinaryIO) -> _Prepared | None:
    meta = _checked_meta(handle, config)
    hostname = config.hostname
    login, gecos = _user(meta.uid)
    sender = f"{login}@{hostname}" if meta.sender is None else \
        _mailbox(meta.sender, hostname, "sender") if meta.sender else ""
    recipients = _routed(meta, hostname, rules, name)
    queue_id = name[1:]
    now = time.time()
    full_name = _printable(meta.full_name if meta.full_name is not None else gecos)
    header_from = _from_value(full_name, sender or f"{login}@{hostname}")

    def complete(names: set[str]) -> list[bytes]:
        added = []
        if "date" not in names:
            added.append(f"Date: {email.utils.formatdate(meta.time, localtime=True)}")
        if "message-id" not in names:
            added.append(f"Message-ID: <{queue_id}@{hostname}>")
        if "from" not in names:
            added.append(f"From: {header_from}")
        return [line.encode("utf-8") + CRLF for line in added]

    draft = spool.new_draft(queue_id)
    scanner = HeaderScanner()
    eight_bit = False
    trace = _received(hostname, meta.uid, queue_id,
                      recipients[0].address if len(recipients) == 1 else None, now)
    try:
        draft.write(trace)
        results_field = False   # an Authentication-Results field in the header
        for line in normalised(handle, complete):
            draft.write(line)
            if not scanner.done:
                scanner.feed(line)
                results_field = results_field or line[:23].lower() == RESULTS_FIELD
            eight_bit = eight_bit or not line.isascii()
        scanner.finish()
        if results_field:
            _strip_forged_results(draft, trace, config.authserv_id)
    except BaseException:
        draft.discard()
        raise
    addresses = [sender, *(r.address for r in recipients)]
    envelope = Envelope(
        queue_id=queue_id, sender=sender, recipients=recipients, size=draft.size,
        client_address="127.0.0.1", client_name="localhost",
        helo=_printable(meta.helo) or "localhost", protocol="local", received_at=now,
        body_type="8BITMIME" if eight_bit else "7BIT",
        smtputf8=not all(a.isascii() for a in addresses), message_id=scanner.message_id)
    return _Prepared(name, draft, envelope, meta.uid)


RESULTS_FIELD = b"authentication-results:"


def _strip_forged_results(draft: Draft, trace: bytes, authserv_id: str) -> None:
    """A local user's message cannot bring Authentication-Results in tayori's name
    either (RFC 8601 §5): such fields are removed from its header (below ``trace``,
    tayori's Received, which starts the draft)."""
    content = draft.read(len(trace))
    _, rest = header_fields(content)
    header = content[:len(content) - len(rest)]
    kept = strip_forged(header, authserv_id)
    if len(kept) != len(header):
        draft.rewrite_header(trace + kept, len(trace) + len(header))


def _checked_meta(handle: BinaryIO, config: Config) -> _Meta:
    """The envelope line, once the file itself has been checked."""
    info = os.fstat(handle.fileno())
    if not stat.S_ISREG(info.st_mode):
        raise _Unusable("not a regular file")
    if info.st_nlink != 1:
        raise _Unusable("has other hard links")
    first = handle.readline(MAX_ENVELOPE_LINE)
    meta = _envelope_line(first)
    if info.st_uid not in (0, os.geteuid()) and info.st_uid != meta.uid:
        raise _Unusable(f"owned by uid {info.st_uid} but claims uid {meta.uid}")
    limits = config.limits
    if limits.max_message_size and info.st_size - len(first) > limits.max_message_size:
        raise _Unusable(f"larger than limits.max_message_size ({limits.max_message_size} "
                        "bytes)")
    if len(meta.recipients) > limits.max_recipients:
        raise _Unusable(f"more than limits.max_recipients ({limits.max_recipients}) "
                        "recipients")
    return meta


def _routed(meta: _Meta, hostname: str, rules: Rules,
            name: str) -> tuple[RecipientRecord, ...]:
    recipients: dict[str, RecipientRecord] = {}
    for text in meta.recipients:
        address = _mailbox(text, hostname, "recipient")
        if address in recipients:
            continue
        action = rules.route_internal(parse_mailbox(address, utf8=True).ascii_domain)
        if action is None:
            maillog.error("unroutable", drop=name, to=address, uid=meta.uid,
                          reason="no match rule routes this domain; recipient left out")
            continue
        recipients[address] = RecipientRecord(address, action)
    if not recipients:
        raise _Unusable("no recipient that a match rule routes")
    return tuple(recipients.values())


def _envelope_line(line: bytes) -> _Meta:
    if not line.endswith(b"\n"):
        raise _Unusable("no envelope line")
    try:
        raw = json.loads(line)
    except ValueError:
        raise _Unusable("the envelope line is not JSON") from None
    if not isinstance(raw, dict) or raw.get("version") != VERSION:
        raise _Unusable(f"not a version {VERSION} maildrop file")
    sender, recipients, uid = raw.get("sender"), raw.get("recipients"), raw.get("uid")
    when, full_name, helo = raw.get("time"), raw.get("full_name"), raw.get("helo")
    problems = [
        ("sender", sender is not None and not isinstance(sender, str)),
        ("recipients", not isinstance(recipients, list) or not recipients
         or not all(isinstance(r, str) for r in recipients)),
        ("uid", not isinstance(uid, int) or isinstance(uid, bool) or uid < 0),
        ("time", not isinstance(when, (int, float)) or isinstance(when, bool)
         or not math.isfinite(when) or when < 0),
        ("full_name", full_name is not None and not isinstance(full_name, str)),
        ("helo", helo is not None and not isinstance(helo, str)),
    ]
    for key, bad in problems:
        if bad:
            raise _Unusable(f"bad or missing {key!r} in the envelope line")
    assert isinstance(recipients, list) and isinstance(uid, int)
    assert isinstance(when, (int, float))
    return _Meta(sender, tuple(recipients), uid, float(when), full_name, helo)


def qualify(address: str, hostname: str) -> str:
    """A name without a domain (``root``) is a user here: ``root@hostname``."""
    return address if "@" in address else f"{address}@{hostname}"


def _mailbox(text: str, hostname: str, what: str) -> str:
    address = qualify(text, hostname)
    try:
        parse_mailbox(address, utf8=True)
    except AddressError as exc:
        raise _Unusable(f"bad {what} address {text!r}: {exc.reason}") from None
    return address


def _user(uid: int) -> tuple[str, str | None]:
    """The login name and the full name (GECOS) of ``uid``."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return f"uid{uid}", None
    return entry.pw_name, entry.pw_gecos.split(",")[0].strip() or None


def _printable(text: str | None) -> str | None:
    """No line breaks or controls from the user in a header field or log line."""
    if text is None:
        return None
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())[:200] or None


def _from_value(name: str | None, address: str) -> str:
    if not name:
        return address
    if address.isascii():
        return email.utils.formataddr((name, address), charset="utf-8")
    # An internationalised address: the message is SMTPUTF8 anyway (RFC 6532), the name
    # may stay UTF-8; quoted when it holds specials.
    if any(c in name for c in '()<>[]:;@\\,."'):
        name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{name} <{address}>"


def _received(hostname: str, uid: int, queue_id: str, recipient: str | None,
              when: float) -> bytes:
    date = email.utils.format_datetime(datetime.datetime.fromtimestamp(when, datetime.UTC))
    lines = [f"Received: by {hostname} (tayori, from userid {uid})", f"\tid {queue_id}"]
    lines.append(f"\tfor <{recipient}>; {date}" if recipient else f"\t; {date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def _set_aside(spool_dir: str, name: str, reason: str) -> None:
    """Move an unusable drop file to ``corrupt/`` (never delete it) and say so."""
    source = os.path.join(path_of(spool_dir), name)
    target_dir = os.path.join(spool_dir, CORRUPT)
    try:
        os.makedirs(target_dir, mode=0o750, exist_ok=True)
        target = os.path.join(target_dir, f"maildrop-{name}")
        number = 1
        while os.path.lexists(target):
            target = os.path.join(target_dir, f"maildrop-{name}.{number}")
            number += 1
        os.rename(source, target)
    except FileNotFoundError:
        return
    except OSError as exc:
        _stuck.add(source)
        maillog.error("corrupt", drop=name, reason=reason,
                      note=f"cannot move it aside ({exc.strerror}); ignored until restart")
        return
    maillog.error("corrupt", drop=name, reason=reason, moved_to=target)
