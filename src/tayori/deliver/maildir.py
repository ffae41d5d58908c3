"""Maildir delivery, compatible with Dovecot's (and Courier's) Maildir++.

Takes: a Maildir root (``mailbox``), the spool body file of a message (``message_path``,
CRLF line ends, as received), the envelope sender and recipient for the trace headers,
the host name for the file name, and optionally a Maildir++ ``folder``, the ``owner``
(uid, gid) of the mailbox and a :class:`Quota`.

Promises:
- :func:`deliver` returns the new file's name only when the message is durable in
  ``new/``: written to ``tmp/``, fsync'd, ``link()``ed (never renamed over anything)
  into ``new/``, ``new/`` fsync'd, then the ``tmp/`` name removed.
  :func:`deliver_copies` does the same for several mailboxes, each step for all of them
  before the next (so the file system commits its journal a few times per message, not
  twice per mailbox), and reads and converts a small message once for all copies; one
  mailbox's failure leaves the others' copies alone. A crash before the link
  leaves at most a file in ``tmp/`` (Dovecot deletes ``tmp/`` files older than 36 hours
  when it next syncs the folder); ``new/`` never holds a partial file. Delivery is
  at-least-once: a crash after the link but before the caller records the outcome
  delivers the message again on the retry.
- The stored file is ``Return-Path: <sender>`` (``<>`` for the null sender, RFC 5321
  §4.4), ``Delivered-To: recipient`` (RFC 9228; the bare addr-spec, as Postfix and
  Dovecot's LMTP write it), then the message bytes, with every CRLF stored as LF: the
  Unix convention that
  Postfix's local(8)/virtual(8) and Dovecot's own LDA/LMTP (``mail_save_crlf = no``)
  follow, so tools that read Maildirs directly see text files, and Dovecot turns LF back
  into CRLF for IMAP. A bare CR or a bare LF in the body (possible only with BINARYMIME)
  is stored as it is; a CR right before a CRLF is indistinguishable on disk from a CRLF
  and reads back as one line end. The body is streamed in :data:`CHUNK` pieces (messages
  of 50 MB and more in bounded memory).
- The name is unique without any check (cr.yp.to/proto/maildir.html; Dovecot's
  conventions): ``<secs>.M<usecs>P<pid>Q<n>R<random>.<host>,S=<size>,W=<vsize>``:
  seconds and microseconds of the delivery, the process id, this process's delivery
  counter, 64 random bits in hex, the host name with ``/``, ``:`` (as the spec says) and
  ``,`` (so that Dovecot's ``,S=`` field parsing stays unambiguous) written ``\\057``,
  ``\\072``, ``\\054``. ``S=`` is the file's size (Dovecot's quota and ours use it
  instead of a stat); ``W=`` its size with CRLF line ends (IMAP's RFC822.SIZE, which
  Dovecot then need not compute; it must be exact: Dovecot checks it when it reads the
  file, and a wrong one fails the FETCH and is renamed away). The ``tmp/`` name is the
  same without the sizes. A file in ``new/`` has no ``:2,`` info part: flags are the
  reader's business.
- The Maildir (``tmp/``, ``new/``, ``cur/``, mode 0700) is created when missing, with
  missing parents; a ``folder`` is the Maildir++ subfolder ``.<folder>`` (``.`` is the
  hierarchy separator: ``a.b`` is IMAP's ``a/b``) with its own ``tmp/new/cur`` and an
  empty ``maildirfolder`` file, as Dovecot and Courier make them. It is not subscribed
  (IMAP LIST shows it, LSUB does not). With ``owner``, everything created in the Maildir
  and the message file belong to ``owner``; parent directories created above the
  Maildir (e.g. ``/var/mail/example.org``) take the owner and group of the directory
  they are created in, mode 0711: a shared virtual-mail base owned by ``vmail`` stays
  ``vmail``'s all the way down (so Dovecot, running as ``vmail``, can make mailboxes
  there itself), and a root-owned base does not end up owned by the first user who got
  mail. Each directory is made and opened relative to the one above it, never through a
  symbolic link (:func:`make_root`). Every directory created is made durable (its
  parent fsync'd); a process's first delivery into a mailbox also fsyncs the Maildir
  and its parent (when it may read it), so a mailbox another process was just creating
  is durable before this process says "delivered".
- Directories inside the Maildir are opened with ``O_NOFOLLOW`` and the file made and
  linked relative to them: a symbolic link put in place of ``new/`` or ``tmp/`` by
  whoever owns the Maildir makes delivery fail (``451 4.2.0``) rather than write
  elsewhere. The root itself is opened through links (the operator's path may have
  some), so tayori never writes a Maildir that another account owns as root: the
  privileged helper writes it as that account (:mod:`tayori.deliver.privileged`,
  DESIGN's OpenSMTPD/Postfix lesson), and ``owner`` is for what root must create.
- Quota: with a :class:`Quota`, the mailbox's usage (:func:`usage`: the messages in
  ``new/`` and ``cur/`` of the root and of every ``.folder``, sized by the ``S=`` in their
  names, by ``stat`` otherwise) plus this message must stay within both limits, or the
  delivery fails with :data:`OVER_QUOTA` (checked before writing, with the usage alone,
  and after, with the exact size; ``452 4.2.2``, temporary: the queue retries,
  and the caller turns it into ``5.2.2`` in the bounce when the lifetime ends). The scan
  is the truth, whatever wrote the Maildir; the Maildir++ ``maildirsize`` file is not
  read (its limits may be another program's, its sums stale), but when it exists a
  ``<size> 1`` line is appended for each delivery, as Maildir++ delivery agents do, so
  Dovecot's and Courier's quota stay current. Concurrent deliveries may overrun the
  limit by the messages in flight (a soft limit, as with Dovecot and Courier).
- Safe in threads and processes: any number may deliver into one Maildir at once.

Failure policy: every failure raises :class:`MaildirError` with its :class:`Reply`:
``ENOSPC`` → ``452 4.3.1``; ``EDQUOT`` (the file system's quota) and :class:`Quota` →
``452 4.2.2``; permission and path problems (``EACCES``, ``EPERM``, ``ENOTDIR``,
``ELOOP``, ``EROFS``...) → ``451 4.2.0`` naming the path, for an operator to fix, never a
bounce; a missing or unreadable ``message_path`` and anything else from the OS →
``451 4.3.0``. Reply texts carry at most ``strerror``, never an exception's text.
Nothing is left in ``new/`` by a failed delivery, and its ``tmp/`` file is removed.
Bad arguments (a line break in an address, a folder :func:`valid_folder` refuses) are
the caller's bug: ValueError.
Config keys: none itself; the ``maildir`` action's ``path`` gives ``mailbox``.
Standards: the Maildir spec (cr.yp.to/proto/maildir.html), Maildir++ folders and quota
(Courier's README.maildirquota), Dovecot's Maildir conventions (``S=``/``W=``), RFC 5321
§4.4 (Return-Path), RFC 9228 (Delivered-To).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from tayori.errors import Reply

CHUNK = 256 * 1024
CACHE_LIMIT = 1024 * 1024   # messages read once for all the copies of a batch
PARENT_MODE = 0o711    # directories created above a Maildir
MAILDIR_MODE = 0o700
FILE_MODE = 0o600
NAME_TRIES = 20        # fresh names tried when one exists already (never happens)
_KNOWN_MAX = 10_000    # mailboxes this process remembers having made durable

OVER_QUOTA = Reply(452, "4.2.2", "Mailbox full")
NO_SPACE = Reply(452, "4.3.1", "Insufficient system storage")
DISK_QUOTA = Reply(452, "4.2.2", "Mailbox full (disk quota exceeded)")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH_ERRORS = frozenset({errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.ELOOP,
                          errno.EROFS, errno.EISDIR, errno.ENAMETOOLONG})
_SIZE_FIELD = re.compile(r",S=(\d+)")
_FOLDER = re.compile(r"[A-Za-z0-9_=+@-][A-Za-z0-9_=+@ -]*")


class MaildirError(Exception):
    """A delivery that did not happen; ``reply`` says why (4xx temporary, 5xx permanent)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Quota:
    """Limits for one mailbox; None: no limit of that kind."""

    bytes: int | None = None
    messages: int | None = None

    def allows(self, used: Usage, size: int) -> bool:
        """True when a message of ``size`` octets fits beside ``used``."""
        if self.bytes is not None and used.bytes + size > self.bytes:
            return False
        return self.messages is None or used.messages + 1 <= self.messages


@dataclass(frozen=True, slots=True)
class Usage:
    bytes: int
    messages: int


def valid_folder(name: str) -> bool:
    """True for a folder name :func:`deliver` takes: ASCII letters, digits, ``_=+@-``
    and spaces, in parts joined by ``.`` (the Maildir++ hierarchy separator), none empty,
    and not INBOX. (A +tag is the sender's choice: check it, and deliver to INBOX when
    this says no.)"""
    if not name or name.upper() == "INBOX" or len(name) > 200:
        return False
    return all(_FOLDER.fullmatch(part) and part == part.strip() for part in name.split("."))


def usage(mailbox: str) -> Usage:
    """What the messages in ``mailbox`` (root and Maildir++ folders, ``new/`` and
    ``cur/``) hold. A missing mailbox holds nothing. Raises OSError."""
    total = count = 0
    try:
        folders = [entry.path for entry in os.scandir(mailbox)
                   if entry.name.startswith(".") and entry.name not in (".", "..")
                   and entry.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return Usage(0, 0)
    for box in (mailbox, *folders):
        for sub in ("new", "cur"):
            try:
                entries = list(os.scandir(os.path.join(box, sub)))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                size = _size_in_name(entry.name)
                if size is None:
                    try:
                        size = entry.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:   # moved to cur/ or expunged meanwhile
                        continue
                total += size
                count += 1
    return Usage(total, count)


@dataclass(frozen=True, slots=True)
class Copy:
    """One mailbox's copy of a message (:func:`deliver_copies`): the Maildir root, the
    ``Delivered-To`` address, and optionally a folder, an owner and a quota."""

    mailbox: str
    delivered_to: str
    folder: str = ""
    owner: tuple[int, int] | None = None
    quota: Quota | None = None


def deliver(mailbox: str, message_path: str, *, return_path: str, delivered_to: str,
            hostname: str, folder: str = "", owner: tuple[int, int] | None = None,
            quota: Quota | None = None) -> str:
    """Store the message in ``mailbox`` (or its ``folder``); the name it got in ``new/``.

    Returns only once the file is durable in ``new/``. Raises :class:`MaildirError`
    (nothing delivered), ValueError for arguments no caller should pass (a line break in
    an address or the host name, a folder name :func:`valid_folder` refuses).
    """
    return _one(deliver_copies([Copy(mailbox, delivered_to, folder, owner, quota)],
                               message_path, return_path=return_path, hostname=hostname))


def deliver_from(mailbox: str, source: int, *, return_path: str, delivered_to: str,
                 hostname: str, folder: str = "", owner: tuple[int, int] | None = None,
                 quota: Quota | None = None) -> str:
    """:func:`deliver` from an open descriptor of the message (read with ``pread``, from
    offset 0; the caller closes it): what the privileged helper is handed."""
    return _one(_deliver_all([Copy(mailbox, delivered_to, folder, owner, quota)], source,
                             return_path, hostname))


def deliver_copies(copies: Sequence[Copy], message_path: str, *, return_path: str,
                   hostname: str) -> list[str | MaildirError]:
    """:func:`deliver` into several mailboxes at once: for each copy the name it got, or
    the error that kept it out (the others go on). Every file is written first, then all
    are fsync'd, then linked into ``new/``, then the ``new/`` directories fsync'd: the
    file system commits its journal a few times per message instead of twice per
    mailbox. A small message is read and converted once for all copies."""
    try:
        source = os.open(message_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        reply = Reply(451, "4.3.0", "Queued message file is missing"
                      if isinstance(exc, FileNotFoundError)
                      else f"Cannot read the queued message: {_strerror(exc)}")
        return [MaildirError(reply) for _ in copies]
    try:
        return _deliver_all(copies, source, return_path, hostname)
    finally:
        os.close(source)


def _one(results: list[str | MaildirError]) -> str:
    (result,) = results
    if isinstance(result, MaildirError):
        raise result
    return result


def _deliver_all(copies: Sequence[Copy], source: int, return_path: str,
                 hostname: str) -> list[str | MaildirError]:
    host = _escape_host(hostname)
    headers = [_trace_header(return_path, copy.delivered_to) for copy in copies]
    for copy in copies:
        if copy.folder and not valid_folder(copy.folder):
            raise ValueError(f"invalid Maildir folder name: {copy.folder!r}")
    body = _Body(source, len(copies))
    with contextlib.ExitStack() as stack:
        steps: list[_Staged | MaildirError] = [
            _stage(stack, copy, header, body, host) for copy, header in zip(
                copies, headers, strict=True)]
        for action in (_Staged.sync, _Staged.link):
            steps = [_attempt(step, action) for step in steps]
        synced: set[int] = set()
        steps = [_attempt(step, lambda s: s.sync_new(synced)) for step in steps]
        for step in steps:
            if isinstance(step, _Staged):
                step.target.note_size(step.size)
    return [step.name if isinstance(step, _Staged) else step for step in steps]


def _stage(stack: contextlib.ExitStack, copy: Copy, header: bytes, body: _Body,
           host: str) -> _Staged | MaildirError:
    root = os.path.abspath(copy.mailbox)
    try:
        target = stack.enter_context(_Target.open(root, copy.folder, copy.owner))
        staged = target.write(header, body, host, copy.owner, copy.quota)
    except OSError as exc:
        return MaildirError(reply_for(exc, root))
    except MaildirError as exc:
        return exc
    stack.callback(staged.discard)
    return staged


def _attempt(step: _Staged | MaildirError,
             action: Callable[[_Staged], None]) -> _Staged | MaildirError:
    if isinstance(step, MaildirError):
        return step
    try:
        action(step)
    except OSError as exc:
        step.discard()
        return MaildirError(reply_for(exc, step.target.root_path))
    except MaildirError as exc:
        step.discard()
        return exc
    return step


# --- the mailbox's directories ------------------------------------------------------------


_known: set[tuple[str, str]] = set()   # (root, folder) made durable by this process
_known_lock = threading.Lock()


class _Target:
    """Open descriptors of the Maildir root, of the box delivered into (the root or a
    folder) and of its ``tmp/`` and ``new/``; creates what is missing."""

    def __init__(self, root: str, folder: str) -> None:
        self.root_path = root
        self.box_path = os.path.join(root, "." + folder) if folder else root
        self.fds: list[int] = []
        self.root = self.box = self.tmp = self.new = -1
        self.dirty: set[int] = set()   # directories whose entries this delivery added

    @classmethod
    @contextlib.contextmanager
    def open(cls, root: str, folder: str, owner: tuple[int, int] | None
             ) -> Iterator[_Target]:
        target = cls(root, folder)
        try:
            target._open(folder, owner)
            yield target
        finally:
            for fd in target.fds:
                os.close(fd)

    def _keep(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def _open(self, folder: str, owner: tuple[int, int] | None) -> None:
        root = self.root_path
        # The root's own path may hold symbolic links (the operator's); inside the
        # Maildir, which its owner controls, none is followed.
        try:
            self.root = self._keep(os.open(root, _DIR_FLAGS & ~os.O_NOFOLLOW))
        except FileNotFoundError:
            make_root(root, owner)
            self.root = self._keep(os.open(root, _DIR_FLAGS & ~os.O_NOFOLLOW))
        key = (root, folder)
        first = key not in _known   # this process's first delivery into this box
        self.box = self.root
        if folder:
            if first:   # the root is a Maildir too (INBOX), whatever is delivered first
                for name in ("tmp", "new", "cur"):
                    os.close(self._subdir(self.root, root, name, owner, keep=False))
            self.box = self._subdir(self.root, root, "." + folder, owner)
        self.tmp = self._subdir(self.box, self.box_path, "tmp", owner)
        self.new = self._subdir(self.box, self.box_path, "new", owner)
        if first:
            os.close(self._subdir(self.box, self.box_path, "cur", owner, keep=False))
            if folder:
                with _naming(self.box_path, "maildirfolder"):
                    self._mark_folder(owner)
            # Another process may have just made these and not yet fsync'd them. A parent
            # this process may not read (0711, root's) is the privileged helper's to sync.
            with contextlib.suppress(PermissionError):
                _fsync_path(os.path.dirname(root))
            self.dirty.update((self.root, self.box))
        for fd in self.dirty:
            os.fsync(fd)
        if first:
            with _known_lock:
                if len(_known) >= _KNOWN_MAX:
                    _known.clear()
                _known.add(key)

    def _subdir(self, parent: int, parent_path: str, name: str,
                owner: tuple[int, int] | None, keep: bool = True) -> int:
        with _naming(parent_path, name):
            created = False
            try:   # it exists, nearly always: one system call
                fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
            except FileNotFoundError:
                with contextlib.suppress(FileExistsError):   # or a concurrent delivery made it
                    os.mkdir(name, MAILDIR_MODE, dir_fd=parent)
                    created = True
                fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
            if keep:
                self._keep(fd)
            if created:
                self.dirty.add(parent)
                os.fchmod(fd, MAILDIR_MODE)
                if owner is not None:
                    os.fchown(fd, *owner)
            return fd

    def _mark_folder(self, owner: tuple[int, int] | None) -> None:
        """The empty ``maildirfolder`` file that marks a Maildir++ folder."""
        try:
            fd = os.open("maildirfolder", os.O_WRONLY | os.O_CREAT | os.O_EXCL |
                         os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE, dir_fd=self.box)
        except FileExistsError:
            return
        try:
            if owner is not None:
                os.fchown(fd, *owner)
        finally:
            os.close(fd)
        self.dirty.add(self.box)

    # --- storing ----------------------------------------------------------------------

    def write(self, header: bytes, body: _Body, host: str, owner: tuple[int, int] | None,
              quota: Quota | None) -> _Staged:
        """The message in a new ``tmp/`` file, not yet fsync'd (:class:`_Staged` goes
        on)."""
        used = usage(self.root_path) if quota is not None else Usage(0, 0)
        if quota is not None and not quota.allows(used, 0):   # full before a byte is written
            raise MaildirError(OVER_QUOTA)
        with _naming(self.box_path, "tmp"):
            base, fd = self._create_tmp(host)
        staged = _Staged(self, base, fd, host)
        try:
            with _naming(self.box_path, "tmp"):
                if owner is not None:
                    os.fchown(fd, *owner)
                staged.size, staged.vsize = body.write(fd, header)
            if quota is not None and not quota.allows(used, staged.size):
                raise MaildirError(OVER_QUOTA)
        except BaseException:
            staged.discard()
            raise
        return staged

    def _create_tmp(self, host: str) -> tuple[str, int]:
        for _ in range(NAME_TRIES):
            base = _unique_base(host)
            try:
                fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW |
                             os.O_CLOEXEC, FILE_MODE, dir_fd=self.tmp)
            except FileExistsError:
                continue
            return base, fd
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST))

    def note_size(self, size: int) -> None:
        """Append to Maildir++ ``maildirsize`` when there is one (best effort: Dovecot
        and Courier recalculate it when it looks wrong)."""
        try:
            fd = os.open("maildirsize", os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW |
                         os.O_CLOEXEC, dir_fd=self.root)
        except OSError:
            return
        with contextlib.suppress(OSError):
            os.write(fd, f"{size} 1\n".encode())
        os.close(fd)


class _Staged:
    """A copy written to ``tmp/``: :meth:`sync` (fsync the file), :meth:`link` (into
    ``new/``), :meth:`sync_new` (fsync ``new/``), in that order; :meth:`discard` removes
    the ``tmp/`` name (always, in the end: after the link, the file lives on in ``new/``)."""

    def __init__(self, target: _Target, base: str, fd: int, host: str) -> None:
        self.target, self.base, self.fd, self.host = target, base, fd, host
        self.size = self.vsize = 0
        self.name = ""
        self._discarded = False

    def sync(self) -> None:
        with _naming(self.target.box_path, "tmp"):
            os.fsync(self.fd)
        self._close()

    def link(self) -> None:
        target = self.target
        name = f"{self.base},S={self.size},W={self.vsize}"
        with _naming(target.box_path, "new"):
            for _ in range(NAME_TRIES):
                try:
                    os.link(self.base, name, src_dir_fd=target.tmp, dst_dir_fd=target.new,
                            follow_symlinks=False)
                    break
                except FileExistsError:
                    name = f"{_unique_base(self.host)},S={self.size},W={self.vsize}"
            else:
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST))
        self.name = name

    def sync_new(self, synced: set[int]) -> None:
        """fsync ``new/`` unless this batch did already (``synced``: its descriptors)."""
        target = self.target
        if target.new not in synced:
            with _naming(target.box_path, "new"):
                os.fsync(target.new)
            synced.add(target.new)

    def discard(self) -> None:
        self._close()
        if not self._discarded:
            self._discarded = True
            with contextlib.suppress(OSError):
                os.unlink(self.base, dir_fd=self.target.tmp)

    def _close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Body:
    """The message to store, from the spool file: read and converted to LF line ends
    once when it is small (:data:`CACHE_LIMIT`) and several copies are written, else
    streamed for each copy."""

    def __init__(self, source: int, copies: int) -> None:
        self.source = source
        self.cached: tuple[bytes, int] | None = None   # the LF text, its CRLF size
        self.shared = copies > 1

    def write(self, fd: int, header: bytes) -> tuple[int, int]:
        """``header`` and the message into ``fd``; its size and its CRLF size."""
        if self.shared and self.cached is None and os.fstat(self.source).st_size <= \
                CACHE_LIMIT:
            self.cached = _converted(self.source)
        if self.cached is None:
            return _copy(fd, header, self.source)
        text, text_vsize = self.cached
        _write_all(fd, [header, text])
        return len(header) + len(text), len(header) + header.count(b"\n") + text_vsize


def _converted(source: int) -> tuple[bytes, int]:
    """The whole spool file with LF line ends, and its size with CRLF line ends."""
    parts, offset = [], 0
    while chunk := _pread(source, offset):
        parts.append(chunk)
        offset += len(chunk)
    text = b"".join(parts).replace(b"\r\n", b"\n")
    return text, len(text) + text.count(b"\n") - text.count(b"\r\n")


def _write_all(fd: int, parts: list[bytes]) -> None:
    view = memoryview(b"".join(parts))
    while view:
        view = view[os.write(fd, view):]


@contextlib.contextmanager
def _naming(directory: str, name: str) -> Iterator[None]:
    """Give an OSError from a call relative to a directory descriptor the full path
    (the reply names it for the operator)."""
    try:
        yield
    except OSError as exc:
        exc.filename = os.path.join(directory, name)
        raise


def make_root(root: str, owner: tuple[int, int] | None = None) -> None:
    """Create the Maildir root ``root`` (an absolute path) and its missing parents, each
    made durable; nothing when it exists. Each directory is made and opened relative to
    the one above it, never through a symbolic link: one put in the place of a directory
    being made fails the call (``ELOOP``, ``ENOTDIR``). With ``owner`` the root is
    ``owner``'s and the parents take the owner and group of the nearest existing
    ancestor (see the module's contract). Raises OSError (``filename``: the full path)."""
    missing: list[str] = []
    path = root
    while not os.path.lexists(path):
        path, name = os.path.split(path)
        missing.append(name)
    if not missing:
        return
    fd = os.open(path, _DIR_FLAGS & ~os.O_NOFOLLOW)   # ENOTDIR when it is a file
    above = os.fstat(fd)
    parents = None if owner is None else (above.st_uid, above.st_gid)
    names = missing[::-1]
    for index, name in enumerate(names):
        is_root = index == len(names) - 1
        fd = _make_dir(fd, path, name, MAILDIR_MODE if is_root else PARENT_MODE,
                       owner if is_root else parents)
        path = os.path.join(path, name)
    os.close(fd)


def _make_dir(parent: int, parent_path: str, name: str, mode: int,
              owner: tuple[int, int] | None) -> int:
    """The directory ``name`` in ``parent``, made when missing (``mode``, ``owner``) and
    opened without following a link; ``parent`` is closed."""
    try:
        with _naming(parent_path, name):
            try:
                os.mkdir(name, mode, dir_fd=parent)
                created = True
            except FileExistsError:   # made meanwhile by a concurrent delivery
                created = False
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
            if created:
                try:
                    os.fchmod(fd, mode)   # whatever the umask
                    if owner is not None:
                        os.fchown(fd, *owner)
                    os.fsync(parent)
                except OSError:
                    os.close(fd)
                    raise
            return fd
    finally:
        os.close(parent)


def _fsync_path(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the file -----------------------------------------------------------------------------


def _copy(fd: int, header: bytes, source: int) -> tuple[int, int]:
    """Write ``header`` and the CRLF message from ``source`` with LF line ends; the
    file's size and its size with CRLF line ends (Dovecot's virtual size)."""
    size = vsize = 0
    pending = b""
    after_cr = False   # the last octet written was a CR

    def put(data: bytes) -> None:
        nonlocal size, vsize, after_cr
        if not data:
            return
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        size += len(data)
        # A LF without a CR before it counts twice (IMAP sends it as CRLF).
        bare = data.count(b"\n") - data.count(b"\r\n")
        if after_cr and data.startswith(b"\n"):
            bare -= 1
        vsize += len(data) + bare
        after_cr = data.endswith(b"\r")

    put(header)
    offset = 0
    while True:
        chunk = _pread(source, offset)
        if not chunk:
            break
        offset += len(chunk)
        data = pending + chunk if pending else chunk
        # A CR at the end may be the first half of a CRLF split between two reads.
        pending = b"\r" if data.endswith(b"\r") else b""
        if pending:
            data = data[:-1]
        put(data.replace(b"\r\n", b"\n"))
    if pending:
        put(pending)
    return size, vsize


def _pread(source: int, offset: int) -> bytes:
    try:
        return os.pread(source, CHUNK, offset)
    except OSError as exc:
        raise MaildirError(Reply(451, "4.3.0", "Cannot read the queued message: "
                                 f"{_strerror(exc)}")) from None


def _trace_header(return_path: str, delivered_to: str) -> bytes:
    for value in (return_path, delivered_to):
        if any(c in value for c in "\r\n\0"):
            raise ValueError(f"line break or NUL in an address: {value!r}")
    if not delivered_to:
        raise ValueError("empty Delivered-To address")
    return f"Return-Path: <{return_path}>\nDelivered-To: {delivered_to}\n".encode()


_counter = 0
_counter_lock = threading.Lock()


def _unique_base(host: str) -> str:
    global _counter
    with _counter_lock:
        _counter += 1
        number = _counter
    now = time.time_ns()
    seconds, micros = divmod(now // 1000, 1_000_000)
    return f"{seconds}.M{micros}P{os.getpid()}Q{number}R{secrets.token_hex(8)}.{host}"


def _escape_host(hostname: str) -> str:
    if not hostname or any(c in hostname for c in "\r\n\0"):
        raise ValueError(f"invalid host name for a Maildir file name: {hostname!r}")
    return hostname.replace("/", "\\057").replace(":", "\\072").replace(",", "\\054")


def _size_in_name(name: str) -> int | None:
    match = _SIZE_FIELD.search(name.partition(":")[0])
    return int(match.group(1)) if match else None


# --- errors -------------------------------------------------------------------------------


def _strerror(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else "I/O error"


def _printable(path: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in path)


def reply_for(exc: OSError, root: str) -> Reply:
    if exc.errno == errno.ENOSPC:
        return NO_SPACE
    if exc.errno == errno.EDQUOT:
        return DISK_QUOTA
    path = _printable(exc.filename if isinstance(exc.filename, str) else root)
    if exc.errno in _PATH_ERRORS:
        return Reply(451, "4.2.0", f"Cannot deliver to mailbox {path}: {_strerror(exc)}")
    return Reply(451, "4.3.0", f"Mailbox {path} unavailable: {_strerror(exc)}")
