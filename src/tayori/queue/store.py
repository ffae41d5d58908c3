"""The queue index as the queue manager and the operator's commands use it.

Takes: the spool directory (its ``index.sqlite3``, written by :mod:`tayori.queue.spool`).
Promises (DESIGN §2.2, §5):
- :meth:`QueueStore.claim` moves due recipients (``queued`` or ``deferred`` with
  ``next_attempt`` passed, and ``cancelled`` ones) to ``inflight`` and returns them with
  their message, oldest due first, at most ``limit``: the manager's active window is
  bounded whatever the queue size.
- :meth:`QueueStore.record` writes the outcomes of attempts in one transaction: each
  recipient leaves ``inflight`` for exactly one state (delivered, deferred with its next
  attempt, bounced, expired; ``held`` when the operator held the message meanwhile); an
  alias's targets become new recipients of the message in the same transaction.
- :meth:`QueueStore.remove_finished` deletes the rows of messages with no recipient
  left to deliver and returns their ids (the caller removes the body files);
  :meth:`QueueStore.settle` does both for many messages in one transaction.
- Operator commands (hold, release, flush, cancel, remove) are single transactions,
  safe while the daemon runs (SQLite WAL; the daemon's manager is the only other writer
  of these rows).
Failure policy: sqlite3.Error and OSError reach the caller.
Config keys: ``spool``.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tayori.queue.spool import RecipientRecord, connect, insert_recipients, transaction

DUE_STATES = ("queued", "deferred")
_CLAIM_SELECT = ("SELECT r.*, m.sender, m.size, m.body_type, m.smtputf8, m.ret, m.envid, "
                 "m.received_at, m.client_address, m.helo, m.protocol FROM recipients r "
                 "JOIN messages m ON m.id = r.message")
OPEN_STATES = ("queued", "deferred", "inflight", "held", "cancelled")


class InFlight(Exception):
    """The message is in a delivery attempt right now."""


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    queue_id: str
    sender: str
    size: int
    body_type: str
    smtputf8: bool
    ret: str | None
    envid: str | None
    received_at: float
    client_address: str
    helo: str
    protocol: str


@dataclass(frozen=True, slots=True)
class Claim:
    """A recipient taken for an attempt."""

    message: QueuedMessage
    index: int
    address: str
    orcpt: str | None
    notify: tuple[str, ...] | None
    action: str
    attempts: int           # before this one
    warned: bool
    cancelled: bool         # deleted by the operator: report, don't deliver
    last_reply: str | None
    last_status: str | None
    remote_mta: str | None
    depth: int = 0          # alias expansions that led to this recipient
    owner: str = ""         # the system user whose .forward made it (spool.SCHEMA)


@dataclass(frozen=True, slots=True)
class Outcome:
    queue_id: str
    index: int
    state: str              # delivered | deferred | bounced | expired | queued
    attempts: int
    next_attempt: float
    reply: str | None
    status: str | None
    remote_mta: str | None
    at: float
    warned: bool = False
    expanded: tuple[RecipientRecord, ...] = ()   # an alias: its targets, queued now


class QueueStore:
    def __init__(self, spool_dir: str) -> None:
        self.spool_dir = spool_dir
        self._db = connect(os.path.join(spool_dir, "index.sqlite3"))
        self._db.row_factory = sqlite3.Row

    def close(self) -> None:
        self._db.close()

    # --- the queue manager ------------------------------------------------------------

    def requeue_inflight(self) -> int:
        """At the manager's start: attempts that a dead manager left unfinished."""
        with transaction(self._db):
            return self._db.execute("UPDATE recipients SET state = 'queued' "
                                    "WHERE state = 'inflight'").rowcount

    def sweep(self) -> list[str]:
        """At the manager's start: messages with nothing left to do (an older tayori
        could leave such rows) leave the index; returns their ids."""
        marks = ",".join("?" * len(OPEN_STATES))
        with transaction(self._db):
            idle = [row[0] for row in self._db.execute(
                "SELECT id FROM messages m WHERE state != 'corrupt' AND NOT EXISTS "
                f"(SELECT 1 FROM recipients r WHERE r.message = m.id AND r.state IN ({marks}))",
                OPEN_STATES)]
            for queue_id in idle:
                self._delete(queue_id)
        return idle

    def claim(self, now: float, limit: int, waiting: Sequence[str] = ()) -> list[Claim]:
        """Due recipients, except those of the ``waiting`` actions (kinds of delivery this
        tayori does not run yet): a recipient of an unknown action is claimed, so that
        it fails, is retried and expires like any other."""
        if limit <= 0:
            return []
        marks = ",".join("?" * len(waiting))
        skip = f"AND r.action NOT IN ({marks}) " if waiting else ""
        # One index-ordered query per state (an IN over states would sort every due row:
        # 0.3 s with 100k due), read outside the write lock: the manager is the only
        # one that claims, and the UPDATE below checks the state again.
        rows = []
        for state in DUE_STATES:
            rows += self._db.execute(
                f"{_CLAIM_SELECT} WHERE r.state = ? AND r.next_attempt <= ? {skip}"
                "AND m.state = 'queued' ORDER BY r.next_attempt LIMIT ?",
                (state, now, *waiting, limit)).fetchall()
        rows += self._db.execute(f"{_CLAIM_SELECT} WHERE r.state = 'cancelled' LIMIT ?",
                                 (limit,)).fetchall()
        rows = sorted(rows, key=lambda row: float(row["next_attempt"]))[:limit]
        claimed = []
        with transaction(self._db):
            for row in rows:
                if self._db.execute(
                        "UPDATE recipients SET state = 'inflight' WHERE message = ? AND idx = ? "
                        "AND state = ?", (row["message"], row["idx"], row["state"])).rowcount:
                    claimed.append(row)
        messages: dict[str, QueuedMessage] = {}
        return [_claim(row, messages) for row in claimed]

    def record(self, outcomes: Iterable[Outcome]) -> None:
        with transaction(self._db):
            self._record(outcomes)

    def remove_finished(self, queue_ids: Iterable[str]) -> list[str]:
        """Delete the index rows of the given messages that have nothing left to do."""
        with transaction(self._db):
            return self._remove_finished(queue_ids)

    def settle(self, outcomes: Iterable[Outcome], queue_ids: Iterable[str]) -> list[str]:
        """:meth:`record` and :meth:`remove_finished` in one transaction (group commit)."""
        with transaction(self._db):
            self._record(outcomes)
            return self._remove_finished(queue_ids)

    def _record(self, outcomes: Iterable[Outcome]) -> None:
        outcomes = list(outcomes)
        for outcome in outcomes:
            if outcome.expanded:
                row = self._db.execute("SELECT MAX(idx) FROM recipients WHERE message = ?",
                                       (outcome.queue_id,)).fetchone()
                if row[0] is not None:   # the message is still there
                    insert_recipients(self._db, outcome.queue_id, row[0] + 1,
                                      outcome.expanded, outcome.at)
        self._db.executemany(
            "UPDATE recipients SET state = CASE WHEN :state = 'deferred' AND "
            "(SELECT state FROM messages WHERE id = :id) = 'held' THEN 'held' "
            "ELSE :state END, attempts = :attempts, next_attempt = :next, "
            "last_reply = :reply, status = :status, remote_mta = :mta, "
            "last_attempt = :at, warned = :warned "
            "WHERE message = :id AND idx = :idx AND state IN ('inflight', 'cancelled')",
            [{"id": o.queue_id, "idx": o.index, "state": o.state, "attempts": o.attempts,
              "next": o.next_attempt, "reply": o.reply, "status": o.status,
              "mta": o.remote_mta, "at": o.at, "warned": int(o.warned)} for o in outcomes])

    def _remove_finished(self, queue_ids: Iterable[str]) -> list[str]:
        marks = ",".join("?" * len(OPEN_STATES))
        done = []
        for queue_id in dict.fromkeys(queue_ids):
            if not self.exists(queue_id):
                continue
            busy = self._db.execute(
                f"SELECT 1 FROM recipients WHERE message = ? AND state IN ({marks}) LIMIT 1",
                (queue_id, *OPEN_STATES)).fetchone()
            if busy is None:
                self._delete(queue_id)
                done.append(queue_id)
        return done

    def next_due(self, waiting: Sequence[str] = ()) -> float | None:
        """When the next recipient falls due (None: nothing waits), ``waiting`` as in
        :meth:`claim`."""
        marks = ",".join("?" * len(waiting))
        skip = f"AND r.action NOT IN ({marks}) " if waiting else ""
        row = self._db.execute(
            "SELECT MIN(r.next_attempt) FROM recipients r JOIN messages m ON m.id = r.message "
            f"WHERE r.state IN ('queued', 'deferred') {skip}AND m.state = 'queued'",
            tuple(waiting)).fetchone()
        return None if row[0] is None else float(row[0])

    # --- the operator's commands ------------------------------------------------------

    def exists(self, queue_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM messages WHERE id = ?",
                                (queue_id,)).fetchone() is not None

    def hold(self, queue_id: str) -> int:
        with transaction(self._db):
            self._db.execute("UPDATE messages SET state = 'held' WHERE id = ? "
                             "AND state = 'queued'", (queue_id,))
            return self._db.execute("UPDATE recipients SET state = 'held' WHERE message = ? "
                                    "AND state IN ('queued', 'deferred')", (queue_id,)).rowcount

    def release(self, queue_id: str, now: float) -> int:
        with transaction(self._db):
            self._db.execute("UPDATE messages SET state = 'queued' WHERE id = ? "
                             "AND state = 'held'", (queue_id,))
            return self._db.execute("UPDATE recipients SET state = 'queued', next_attempt = ? "
                                    "WHERE message = ? AND state = 'held'",
                                    (now, queue_id)).rowcount

    def flush(self, queue_id: str | None, now: float) -> int:
        """Make waiting recipients due now (of one message, or all)."""
        where = " AND message = ?" if queue_id else ""
        with transaction(self._db):
            return self._db.execute(
                "UPDATE recipients SET next_attempt = ? WHERE state IN ('queued', 'deferred')"
                + where, (now, queue_id) if queue_id else (now,)).rowcount

    def cancel(self, queue_id: str) -> int:
        """Delete with a DSN: the manager reports the undelivered recipients as failed.
        Raises :class:`InFlight` (and changes nothing) while an attempt is under way."""
        with transaction(self._db):
            if self._db.execute("SELECT 1 FROM recipients WHERE message = ? AND "
                                "state = 'inflight' LIMIT 1", (queue_id,)).fetchone():
                raise InFlight(queue_id)
            self._db.execute("UPDATE messages SET state = 'queued' WHERE id = ?", (queue_id,))
            return self._db.execute(
                "UPDATE recipients SET state = 'cancelled' WHERE message = ? "
                "AND state IN ('queued', 'deferred', 'held')", (queue_id,)).rowcount

    def remove(self, queue_id: str) -> None:
        """Delete without a DSN (index rows now; the caller removes the body file)."""
        with transaction(self._db):
            self._delete(queue_id)

    def _delete(self, queue_id: str) -> None:
        self._db.execute("DELETE FROM recipients WHERE message = ?", (queue_id,))
        self._db.execute("DELETE FROM messages WHERE id = ?", (queue_id,))


def _claim(row: sqlite3.Row, messages: dict[str, QueuedMessage]) -> Claim:
    queue_id = row["message"]
    message = messages.get(queue_id)
    if message is None:
        message = messages[queue_id] = QueuedMessage(
            queue_id, row["sender"], row["size"], row["body_type"], bool(row["smtputf8"]),
            row["ret"], row["envid"], row["received_at"], row["client_address"], row["helo"],
            row["protocol"])
    return Claim(message, row["idx"], row["address"], row["orcpt"],
                 tuple(row["notify"].split(",")) if row["notify"] else None, row["action"],
                 row["attempts"], bool(row["warned"]), row["state"] == "cancelled",
                 row["last_reply"], row["status"], row["remote_mta"], row["depth"],
                 row["owner"])
