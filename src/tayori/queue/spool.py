"""The durable spool: one body file per message plus an SQLite index of envelopes.

Takes: message content in pieces (a :class:`Draft` per message being received) and, at
the end, its :class:`Envelope`.
Promises (DESIGN §2.1, §2.2, §5):
- ``await spool.commit(draft, envelope)`` returns only when the body file is written,
  fsync'd and renamed from ``incoming/`` into ``messages/``, the directory fsync'd, and
  the envelope with one row per recipient committed in SQLite (WAL, synchronous=FULL).
  Only then may the caller say 250.
- A draft stays in memory up to 256 KiB and is streamed to ``incoming/`` beyond that, so
  a small message costs one hand-off to an I/O thread (create, write, fsync, rename) and
  memory per session stays bounded.
- Before commit, :meth:`Spool.read_draft` reads a draft back and
  :meth:`Spool.rewrite_header` replaces its first bytes (the receiving checks prepend
  Authentication-Results and drop forged fields): a splice in memory, or on disk a new
  file (the new header, the rest copied by the kernel) renamed over the old, on an I/O
  thread; on failure the draft is as it was.
- Commits from concurrent sessions are grouped: the body fsyncs run in parallel on the
  I/O threads, then one committer thread fsyncs the directory once for the batch and
  writes the batch in one SQLite transaction (group commit).
- Crash safety: the index row is the commit point. On :meth:`open`, files left in
  ``incoming/`` (never acknowledged) are removed, body files without an index row
  (crash between rename and commit; never acknowledged) are removed, and index rows
  whose body file is missing are marked ``corrupt`` and reported, never deleted.
  Recipients left ``inflight`` by a crash go back to ``queued`` (at-least-once).
- After each committed batch the queue manager is woken (:mod:`tayori.queue.wakeup`).
Failure policy: OSError / sqlite3.Error from the disk reach the caller, which answers
``452 4.3.1``; a failed batch leaves nothing visible (its files are unlinked).
Config keys: ``spool``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import io
import os
import queue
import random
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tayori.queue import wakeup

SCHEMA_VERSION = 3
SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    sender TEXT NOT NULL,
    size INTEGER NOT NULL,
    body_type TEXT NOT NULL,
    smtputf8 INTEGER NOT NULL,
    ret TEXT,
    envid TEXT,
    client_address TEXT NOT NULL,
    client_name TEXT NOT NULL,
    helo TEXT NOT NULL,
    protocol TEXT NOT NULL,
    message_id TEXT,
    received_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'queued'
);
CREATE TABLE IF NOT EXISTS recipients (
    message TEXT NOT NULL REFERENCES messages(id),
    idx INTEGER NOT NULL,
    address TEXT NOT NULL,
    orcpt TEXT,
    notify TEXT,
    action TEXT NOT NULL,
    -- queued | inflight | deferred | held | delivered | bounced | expired (DESIGN §2.2);
    -- cancelled: deleted by the operator, to be reported in a DSN
    state TEXT NOT NULL DEFAULT 'queued',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_reply TEXT,
    last_attempt REAL,
    status TEXT,             -- enhanced status of the last outcome, e.g. 4.4.1
    remote_mta TEXT,         -- the host that gave last_reply
    warned INTEGER NOT NULL DEFAULT 0,   -- a delay DSN was sent
    depth INTEGER NOT NULL DEFAULT 0,    -- alias expansions that led to this recipient
    -- the system user whose .forward made this recipient: a |command or /file runs as
    -- that user, and the user's own address is not expanded again ("\\user")
    owner TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (message, idx)
);
CREATE INDEX IF NOT EXISTS recipients_due ON recipients (state, next_attempt);
"""
_CROCKFORD = "0123456789BCDFGHJKLMNPQRSTVWXYZ"  # no vowels: ids never spell words
_random = random.Random()  # seeded from os.urandom; ids need uniqueness, not secrecy
os.register_at_fork(after_in_child=_random.seed)  # each worker its own sequence
MAX_BATCH = 256
IO_THREADS = 16
LOCK_WAIT = 5.0
SPILL_SIZE = 256 * 1024


def new_queue_id(now: float | None = None) -> str:
    """A unique, time-sortable id: 13 characters (milliseconds, then 30 random bits)."""
    stamp = int((time.time() if now is None else now) * 1000)
    number = (stamp << 30) | _random.getrandbits(30)
    out = []
    for _ in range(15):
        number, digit = divmod(number, 31)
        out.append(_CROCKFORD[digit])
    return "".join(reversed(out)).lstrip("0") or "0"


@dataclass(frozen=True, slots=True)
class RecipientRecord:
    address: str
    action: str
    orcpt: str | None = None
    notify: tuple[str, ...] | None = None
    state: str = "queued"
    depth: int = 0            # alias expansions that led here (0: as received)
    owner: str = ""           # the system user whose .forward led here
    # delivery progress, as the index has it (not part of what was received)
    attempts: int = field(default=0, compare=False)
    next_attempt: float | None = field(default=None, compare=False)
    last_reply: str | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Envelope:
    queue_id: str
    sender: str                      # "" is the null reverse-path <>
    recipients: tuple[RecipientRecord, ...]
    size: int
    client_address: str
    client_name: str
    helo: str
    protocol: str
    received_at: float
    body_type: str = "7BIT"
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None
    message_id: str | None = None
    state: str = "queued"


@dataclass(slots=True)
class Draft:
    """A message being received. Held in memory up to :data:`SPILL_SIZE`, then streamed
    to ``incoming/<id>``; not visible in the queue until committed."""

    queue_id: str
    path: str
    final_path: str
    size: int = 0
    error: OSError | None = None
    _linked: bool = False
    _memory: bytearray = field(default_factory=bytearray, repr=False)
    _file: io.BufferedWriter[io.FileIO] | None = field(default=None, repr=False)

    def write(self, data: bytes) -> None:
        """Append; a disk error is kept in ``error`` (the caller keeps reading input)."""
        if self.error is not None:
            return
        try:
            if self._file is not None:
                self._file.write(data)
            else:
                self._memory += data
                if len(self._memory) > SPILL_SIZE:
                    self._spill()
        except OSError as exc:
            self.error = exc
            return
        self.size += len(data)

    def _spill(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        self._file = io.BufferedWriter(io.FileIO(fd, "wb"), buffer_size=SPILL_SIZE)
        self._file.write(self._memory)
        self._memory = bytearray()

    @property
    def spilled(self) -> bool:
        """True once the content lives in ``incoming/`` (reading or rewriting it is disk
        I/O, for an executor thread); False while it is all in memory."""
        return self._file is not None

    def read(self, offset: int = 0) -> bytes:
        """The content written so far, from ``offset``. Raises OSError."""
        if self._file is None:
            return bytes(memoryview(self._memory)[offset:])
        self._file.flush()
        with open(self.path, "rb") as stream:
            stream.seek(offset)
            return stream.read()

    def rewrite_header(self, header: bytes, old_length: int) -> None:
        """Replace the first ``old_length`` bytes of the content with ``header``.

        In memory, a splice. On disk, a new file: ``header``, then the rest copied by the
        kernel (copy_file_range), renamed over the draft's file; the draft writes on into
        the new file and :meth:`persist` fsyncs it (the rename needs no fsync of its own:
        nothing in ``incoming/`` outlives a crash). Raises OSError with the draft's
        content unchanged (the caller then discards it and answers ``452``).
        """
        if self.error is not None:
            raise self.error
        if self._file is None:
            self._memory[:old_length] = header
        else:
            self._file = _rewritten(self._file, self.path, header, old_length)
        self.size += len(header) - old_length

    def persist(self) -> None:
        """Write out, fsync, close and rename into ``messages/`` (on an executor thread:
        one hand-off per message, and the fsyncs of concurrent sessions overlap)."""
        if self._file is None:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                _write_all(fd, self._memory)
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        # link, not rename: an existing message with the same id must never be replaced
        os.link(self.path, self.final_path)
        self._linked = True
        os.unlink(self.path)

    def discard(self) -> None:
        """Forget the message: close and remove whatever was written."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        self._memory = bytearray()
        for path in (self.path, self.final_path) if self._linked else (self.path,):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _rewritten(old: io.BufferedWriter[io.FileIO], path: str, header: bytes,
               skip: int) -> io.BufferedWriter[io.FileIO]:
    """``path`` replaced by ``header`` + its content after ``skip`` bytes; the new file,
    open for writing at its end. The old one is closed only once the new one is in place."""
    old.flush()
    temporary = path + ".rewrite"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        _write_all(fd, header)
        source = os.open(path, os.O_RDONLY)
        try:
            _copy_rest(source, fd, skip)
        finally:
            os.close(source)
        os.replace(temporary, path)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    with contextlib.suppress(OSError):
        old.close()
    return io.BufferedWriter(io.FileIO(fd, "wb"), buffer_size=SPILL_SIZE)


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _copy_rest(source: int, target: int, offset: int) -> None:
    """Append ``source`` from ``offset`` to its end to ``target`` (at its file position),
    in the kernel: copy_file_range, or sendfile where the filesystem refuses that."""
    size = os.fstat(source).st_size
    try:
        while offset < size:
            copied = os.copy_file_range(source, target, size - offset, offset)
            if copied == 0:
                return
            offset += copied
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
        while offset < size:
            sent = os.sendfile(target, source, offset, size - offset)
            if sent == 0:
                return
            offset += sent


class SpoolBusy(OSError):
    """Another process holds the spool's lock."""


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    removed_incoming: int
    removed_orphans: int
    corrupt: tuple[str, ...]
    requeued: int


class Spool:
    """The queue directory. ``open()`` before use, ``close()`` at the end."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.incoming = os.path.join(directory, "incoming")
        self.messages = os.path.join(directory, "messages")
        self.index_path = os.path.join(directory, "index.sqlite3")
        self._committer: _Committer | None = None
        self._lock_fd: int | None = None
        # File creation and fsync wait on the disk, not the CPU: enough threads that the
        # sessions' fsyncs overlap and the filesystem can commit them together.
        self._io = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="spool-io")

    # --- lifecycle ------------------------------------------------------------------

    def open(self) -> RecoveryReport:
        """:meth:`prepare` then :meth:`start`: the single-process way."""
        report = self.prepare()
        self.start()
        return report

    def prepare(self) -> RecoveryReport:
        """Lock the spool for this tayori and recover it after a crash. Starts no thread,
        so worker processes may be forked afterwards (they share the lock).

        Raises SpoolBusy when another tayori holds the spool, OSError for disk problems.
        """
        for path in (self.directory, self.incoming, self.messages):
            os.makedirs(path, mode=0o750, exist_ok=True)
        self._lock()
        db = connect(self.index_path)
        try:
            db.executescript(SCHEMA)
            _migrate(db)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            return self._recover(db)
        finally:
            db.close()

    def start(self) -> None:
        """Start accepting commits in this process (its own index connection)."""
        self._committer = _Committer(connect(self.index_path), self.messages)

    def close(self) -> None:
        if self._committer is not None:
            self._committer.stop()
            self._committer = None
        self._io.shutdown(wait=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _lock(self) -> None:
        """Take the spool lock, waiting a moment for a previous tayori's processes to go
        (a killed supervisor's workers die with it, but not in the same instant)."""
        fd = os.open(os.path.join(self.directory, "lock"), os.O_RDWR | os.O_CREAT, 0o640)
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise SpoolBusy(f"the spool {self.directory} is in use by another tayori "
                                f"(pid {holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _recover(self, db: sqlite3.Connection) -> RecoveryReport:
        removed_incoming = 0
        for name in os.listdir(self.incoming):
            os.unlink(os.path.join(self.incoming, name))
            removed_incoming += 1
        on_disk = set(os.listdir(self.messages))
        states = dict(db.execute("SELECT id, state FROM messages").fetchall())
        orphans = on_disk - states.keys()
        for name in orphans:
            os.unlink(os.path.join(self.messages, name))
        missing = tuple(sorted(q for q in states.keys() - on_disk if states[q] != "corrupt"))
        with transaction(db):
            db.executemany("UPDATE messages SET state = 'corrupt' WHERE id = ?",
                           [(q,) for q in missing])
            requeued = db.execute("UPDATE recipients SET state = 'queued' "
                                  "WHERE state = 'inflight'").rowcount
        if orphans or removed_incoming:
            _fsync_dir(self.messages)
        return RecoveryReport(removed_incoming, len(orphans), missing, requeued)

    # --- receiving ------------------------------------------------------------------

    def new_draft(self, queue_id: str) -> Draft:
        """A draft for a new message. The file is created when the content outgrows
        memory (``incoming/<id>``, exclusively) or at commit; OSError shows there."""
        return Draft(queue_id, os.path.join(self.incoming, queue_id),
                     os.path.join(self.messages, queue_id))

    async def read_draft(self, draft: Draft, offset: int = 0) -> bytes:
        """:meth:`Draft.read`, on an I/O thread when the draft is on disk."""
        if not draft.spilled:
            return draft.read(offset)
        return await asyncio.get_running_loop().run_in_executor(self._io, draft.read, offset)

    async def rewrite_header(self, draft: Draft, header: bytes, old_length: int) -> None:
        """:meth:`Draft.rewrite_header`, on an I/O thread when the draft is on disk."""
        if not draft.spilled:
            draft.rewrite_header(header, old_length)
            return
        await asyncio.get_running_loop().run_in_executor(
            self._io, draft.rewrite_header, header, old_length)

    async def commit(self, draft: Draft, envelope: Envelope) -> None:
        """Make the message durable; returns only when it is. Raises OSError/sqlite3.Error
        (the draft is then discarded: nothing of it stays visible)."""
        if draft.error is not None:
            draft.discard()
            raise draft.error
        committer = self._committer
        if committer is None:
            raise RuntimeError("spool is not open")
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._io, draft.persist)
        except OSError:
            draft.discard()
            raise
        future: asyncio.Future[None] = loop.create_future()
        committer.submit(_Commit(draft, envelope, future, loop))
        await future



_ADDED_COLUMNS = {  # version 2: delivery results per recipient, alias depth; 3: owner
    "last_attempt": "REAL", "status": "TEXT", "remote_mta": "TEXT",
    "warned": "INTEGER NOT NULL DEFAULT 0", "depth": "INTEGER NOT NULL DEFAULT 0",
    "owner": "TEXT NOT NULL DEFAULT ''"}


def _migrate(db: sqlite3.Connection) -> None:
    """Bring an index written by an older tayori to this schema."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(recipients)")}
    for name, declaration in _ADDED_COLUMNS.items():
        if name not in columns:
            db.execute(f"ALTER TABLE recipients ADD COLUMN {name} {declaration}")


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One SQLite transaction. The connections are in autocommit mode
    (``isolation_level=None``), where ``with db:`` opens no transaction at all: every
    statement would commit (and fsync the WAL) on its own.

    Writers (each worker's committer, the queue manager, the operator's commands) first
    queue on a lock file: the kernel wakes the next one as soon as the lock is free,
    where SQLite's own busy handler would sleep 1, 2, 5 ... 100 ms between tries."""
    lock = db.writer_lock if isinstance(db, IndexConnection) else -1
    if lock >= 0:
        fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
    finally:
        if lock >= 0:
            fcntl.flock(lock, fcntl.LOCK_UN)


class IndexConnection(sqlite3.Connection):
    """A connection to the index with its own descriptor of the writers' lock file (an
    flock is held per open file, so each writing thread needs its own)."""

    writer_lock: int = -1

    def close(self) -> None:
        if self.writer_lock >= 0:
            os.close(self.writer_lock)
            self.writer_lock = -1
        super().close()


def connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30,
                         factory=IndexConnection)
    db.writer_lock = os.open(path + ".writers", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.execute("PRAGMA foreign_keys = ON")
    return db


@dataclass(slots=True)
class _Commit:
    draft: Draft
    envelope: Envelope
    future: asyncio.Future[None]
    loop: asyncio.AbstractEventLoop


class _Committer:
    """The single writer: one directory fsync and one transaction per batch."""

    def __init__(self, db: sqlite3.Connection, messages_dir: str) -> None:
        self._db = db
        self._messages_dir = messages_dir
        self._spool_dir = os.path.dirname(messages_dir)
        self._queue: queue.SimpleQueue[_Commit | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="spool-committer", daemon=True)
        self._thread.start()

    def submit(self, item: _Commit) -> None:
        self._queue.put(item)

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._db.close()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[_Commit]) -> None:
        try:
            _fsync_dir(self._messages_dir)  # the renames of the whole batch, at once
            with transaction(self._db):
                for item in batch:
                    _insert(self._db, item.envelope)
        except Exception as exc:   # whatever it is, the sessions hear of it; the thread lives
            for item in batch:
                item.draft.discard()
                _resolve(item, exc)
            return
        for item in batch:
            _resolve(item, None)
        wakeup.poke(self._spool_dir)


def _resolve(item: _Commit, error: BaseException | None) -> None:
    def settle() -> None:
        if item.future.done():
            return
        if error is None:
            item.future.set_result(None)
        else:
            item.future.set_exception(error)

    with contextlib.suppress(RuntimeError):  # loop already closed at shutdown
        item.loop.call_soon_threadsafe(settle)


def insert_recipients(db: sqlite3.Connection, queue_id: str, first: int,
                      recipients: Iterable[RecipientRecord], due: float) -> None:
    db.executemany(
        "INSERT INTO recipients (message, idx, address, orcpt, notify, action, state, "
        "next_attempt, depth, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(queue_id, first + i, r.address, r.orcpt, ",".join(r.notify) if r.notify else None,
          r.action, r.state, due, r.depth, r.owner) for i, r in enumerate(recipients)])


def _insert(db: sqlite3.Connection, env: Envelope) -> None:
    db.execute(
        "INSERT INTO messages (id, sender, size, body_type, smtputf8, ret, envid, "
        "client_address, client_name, helo, protocol, message_id, received_at, state) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (env.queue_id, env.sender, env.size, env.body_type, int(env.smtputf8), env.ret,
         env.envid, env.client_address, env.client_name, env.helo, env.protocol,
         env.message_id, env.received_at, env.state))
    insert_recipients(db, env.queue_id, 0, env.recipients, env.received_at)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- reading the index (queue tools; a separate connection, WAL allows it) --------------


def read_envelopes(spool_dir: str, queue_id: str | None = None) -> Iterator[Envelope]:
    """Every message in the index (or one), oldest first, with its recipients."""
    path = os.path.join(spool_dir, "index.sqlite3")
    if not os.path.exists(path):
        return
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        query = "SELECT * FROM messages" + (" WHERE id = ?" if queue_id else "") + \
            " ORDER BY received_at, id"
        for row in db.execute(query, (queue_id,) if queue_id else ()).fetchall():
            recipients = tuple(
                RecipientRecord(r["address"], r["action"], r["orcpt"],
                                tuple(r["notify"].split(",")) if r["notify"] else None,
                                r["state"], depth=r["depth"], owner=r["owner"],
                                attempts=r["attempts"],
                                next_attempt=r["next_attempt"], last_reply=r["last_reply"])
                for r in db.execute("SELECT * FROM recipients WHERE message = ? ORDER BY idx",
                                    (row["id"],)))
            yield Envelope(
                queue_id=row["id"], sender=row["sender"], recipients=recipients,
                size=row["size"], client_address=row["client_address"],
                client_name=row["client_name"], helo=row["helo"], protocol=row["protocol"],
                received_at=row["received_at"], body_type=row["body_type"],
                smtputf8=bool(row["smtputf8"]), ret=row["ret"], envid=row["envid"],
                message_id=row["message_id"], state=row["state"])
    finally:
        db.close()
