"""The queue manager with a fake dispatcher: outcomes, DSN routing, index failures.

Each test runs a QueueManager on a real spool in tmp_path and polls the index (with a
deadline) until the recipients reach the state the test is about."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tayori.config import Config
from tayori.config.model import from_document
from tayori.deliver.dispatch import Delivery, Result
from tayori.errors import Reply
from tayori.queue.manager import QueueManager
from tayori.queue.spool import Envelope, RecipientRecord, Spool


def config(actions: dict[str, Any] | None = None, **queue: Any) -> Config:
    actions = actions or {"remote": {"deliver": "mx"}}
    queue.setdefault("retry", ["1s"])
    return from_document({
        "hostname": "mx.example", "listen": [{"address": "127.0.0.1:2525"}], "queue": queue,
        "actions": actions,
        "match": [{"to": "any", "from": "authenticated", "action": next(iter(actions))}]},
        "t.toml", "/")


class FakeDispatcher:
    def __init__(self, reply: Reply) -> None:
        self.reply, self.jobs = reply, []

    def update(self, config: Config) -> None:
        pass

    def saturated(self, job: Delivery) -> bool:
        return False

    async def close(self) -> None:
        pass

    async def deliver(self, job: Delivery) -> list[Result]:
        self.jobs.append(job)
        return [Result(self.reply)] * len(job.recipients)


def states(spool_dir: str) -> list[tuple[str, str]]:
    db = sqlite3.connect(os.path.join(spool_dir, "index.sqlite3"))
    try:
        return db.execute("SELECT address, state FROM recipients ORDER BY message, idx").fetchall()
    finally:
        db.close()


async def run_manager(spool_dir: str, cfg: Config, dispatcher: FakeDispatcher,
                      envelopes: list[Envelope], until: Callable[[list[tuple[str, str]]], bool],
                      *, patch: Any = None, within: float = 20) -> list[tuple[str, str]]:
    """Run a manager until ``until(states)`` holds (or the deadline passes)."""
    spool = Spool(spool_dir)
    spool.open()
    try:
        for env in envelopes:
            draft = spool.new_draft(env.queue_id)
            draft.write(b"Subject: x\r\n\r\nhi\r\n")
            await spool.commit(draft, env)
        manager = QueueManager(cfg, spool, dispatcher)  # type: ignore[arg-type]
        if patch is not None:
            patch(manager)
        await manager.start()
        deadline = time.monotonic() + within
        while not until(states(spool_dir)) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)   # polling the index (another thread writes it)
        await manager.stop(1)
        return states(spool_dir)
    finally:
        spool.close()


def envelope(queue_id: str, sender: str, *recipients: RecipientRecord,
             received_at: float | None = None) -> Envelope:
    return Envelope(queue_id, sender, recipients, 20, "127.0.0.1", "localhost", "h", "ESMTP",
                    time.time() if received_at is None else received_at)


def test_recipient_of_a_removed_action_expires(tmp_path: Path) -> None:
    """An action renamed on reload: its recipients are attempted (451 4.3.5), so they
    expire with a DSN instead of waiting forever unseen."""
    env = envelope("Q1", "a@x.example", RecipientRecord("b@y.example", "oldname"),
                   received_at=time.time() - 10 * 86400)
    dispatcher = FakeDispatcher(Reply(250, "2.0.0", "ok"))
    got = asyncio.run(run_manager(str(tmp_path), config(lifetime="1s"), dispatcher, [env],
                                  lambda rows: not rows))
    assert got == []
    [dsn] = dispatcher.jobs                      # the DSN to the sender, nothing else
    assert dsn.message.sender == "" and dsn.recipients[0].address == "a@x.example"


def test_no_success_notice_to_the_postmaster(tmp_path: Path) -> None:
    """NOTIFY=SUCCESS on a message from <>: nobody is told (only failures of bounces go
    to the postmaster)."""
    dispatcher = FakeDispatcher(Reply(250, "2.0.0", "ok"))
    env = envelope("Q2", "", RecipientRecord("b@y.example", "remote", notify=("SUCCESS",)))
    got = asyncio.run(run_manager(str(tmp_path), config(postmaster="postmaster@example.org"),
                                  dispatcher, [env], lambda rows: not rows))
    assert got == []
    assert [c.address for job in dispatcher.jobs for c in job.recipients] == ["b@y.example"]


def test_recipients_do_not_stay_inflight_after_a_failed_settle(tmp_path: Path) -> None:
    """One failed index write: the outcome is written again, the recipient moves on."""
    calls: list[int] = []

    def flaky(manager: QueueManager) -> None:
        original = manager._settle_now

        def settle(*args: Any) -> None:
            calls.append(1)
            if len(calls) == 1:
                raise sqlite3.OperationalError("database or disk is full")
            original(*args)
        manager._settle_now = settle  # type: ignore[method-assign]

    env = envelope("Q3", "a@x.example", RecipientRecord("b@y.example", "remote"))
    dispatcher = FakeDispatcher(Reply(451, "4.0.0", "later"))
    got = asyncio.run(run_manager(str(tmp_path), config(), dispatcher, [env],
                                  lambda rows: len(calls) >= 2 and
                                  rows != [("b@y.example", "inflight")], patch=flaky))
    assert got == [("b@y.example", "deferred")]
    assert len(calls) >= 2


class SlowDestination(FakeDispatcher):
    """Attempts to slow.test never end (until released); one slot there."""

    def __init__(self) -> None:
        super().__init__(Reply(250, "2.0.0", "ok"))
        self.release = asyncio.Event()
        self.slow = 0

    def saturated(self, job: Delivery) -> bool:
        return job.destination == "slow.test" and self.slow >= 2

    async def deliver(self, job: Delivery) -> list[Result]:
        if job.destination == "slow.test":
            self.slow += 1
            await self.release.wait()
        return await super().deliver(job)


def test_a_slow_destination_does_not_starve_the_others(tmp_path: Path) -> None:
    """Six messages due first to a destination that hangs, a window of four: the message
    to another domain still goes out (the busy destination's surplus is postponed)."""
    now = time.time()
    envelopes = [envelope(f"S{i}", "a@x.example", RecipientRecord(f"u{i}@slow.test", "remote"),
                          received_at=now - 100 + i) for i in range(6)]
    envelopes.append(envelope("F1", "a@x.example", RecipientRecord("v@fast.test", "remote"),
                              received_at=now))
    dispatcher = SlowDestination()
    got = asyncio.run(run_manager(str(tmp_path), config(max_active=4), dispatcher, envelopes,
                                  lambda rows: ("v@fast.test", "queued") not in rows and
                                  ("v@fast.test", "inflight") not in rows))
    assert ("v@fast.test", "queued") not in got and ("v@fast.test", "inflight") not in got
    assert [c.address for job in dispatcher.jobs for c in job.recipients] == ["v@fast.test"]
    assert dispatcher.slow == 2
