"""Appending a message to an mbox file (an ``mbox`` action's mailbox, an alias's or a
``.forward``'s ``/path`` target).

Takes: the mbox path, an open descriptor of the spool body (CRLF line ends, read with
``pread`` from offset 0; the caller closes it), the envelope sender and the
``Delivered-To`` address.
Promises: one entry appended: a ``From `` line (``MAILER-DAEMON`` for ``<>``),
``Return-Path`` and ``Delivered-To``, the message with LF line ends and mboxrd quoting
(``>From `` lines get one more ``>``), a blank line. The sender and the ``Delivered-To``
address are written on one line whatever they hold: a control character (CR, LF, NUL,
any other below 0x20, DEL) becomes a space, so no envelope value (an ORCPT decoded from
xtext, say) can add a header line or a fake ``From `` line. Replaced, not refused: the
value is known only at delivery, and an error there would defer the message again and
again until it expired, while a space harms nothing (the session refuses such values at
RCPT already; this is the last line of defence, for mail queued before that).
The file is locked as mail readers expect: a ``.lock`` dot-lock file next to it (one
older than five minutes is a crashed writer's and is taken over) and an fcntl lock on
the file, as Dovecot and mutt do; it is created 0600 when missing (with
``make_parents``, its directory too, 0700), written with ``O_APPEND`` and fsync'd before
:func:`append` returns.
Failure policy: any file-system problem (permissions, a full disk, a lock held longer
than 30 s) raises OSError, and nothing is said delivered; a half-written entry can only
follow a crash, as in every mbox writer.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import time
from collections.abc import Iterator

_QUOTED = re.compile(rb"^(>*From )", re.MULTILINE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
LOCK_WAIT = 30.0
STALE_LOCK = 300.0


def append(path: str, source: int, *, sender: str, delivered_to: str,
           make_parents: bool = False) -> None:
    """Append the message to the mbox at ``path``; durable when this returns."""
    if make_parents:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    entry = _entry(_read_all(source), sender, delivered_to)
    with _dot_lock(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW |
                     os.O_CLOEXEC, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            view = memoryview(entry)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)


def _read_all(source: int) -> bytes:
    parts, offset = [], 0
    while chunk := os.pread(source, 1 << 20, offset):
        parts.append(chunk)
        offset += len(chunk)
    return b"".join(parts)


def _entry(message: bytes, sender: str, delivered_to: str) -> bytes:
    sender, delivered_to = _one_line(sender), _one_line(delivered_to)
    stamp = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime())
    head = (f"From {sender or 'MAILER-DAEMON'} {stamp}\n"
            f"Return-Path: <{sender}>\n"
            f"Delivered-To: {delivered_to}\n").encode()
    body = _QUOTED.sub(rb">\1", message.replace(b"\r\n", b"\n"))
    return head + body.rstrip(b"\n") + b"\n\n"


def _one_line(value: str) -> str:
    """``value`` with every control character (CR, LF, NUL...) turned into a space."""
    return _CONTROL.sub(" ", value)


@contextlib.contextmanager
def _dot_lock(path: str) -> Iterator[None]:
    """``path.lock``, created exclusively. Raises OSError (EAGAIN) after
    :data:`LOCK_WAIT` seconds."""
    lock = path + ".lock"
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            os.close(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
            break
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - os.stat(lock).st_mtime > STALE_LOCK:
                    os.unlink(lock)
                    continue
            if time.monotonic() > deadline:
                raise OSError(errno.EAGAIN, "the mailbox stays locked") from None
            time.sleep(0.05)   # on a worker thread: another writer holds the lock
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
