#!/usr/bin/env python3
"""A large queue: what the queue manager's index operations cost with 100k+ recipients.

Builds an index of N messages with one recipient each (all deferred, half of them due),
then times, on that index, what the queue manager does at every turn: ``claim`` (take up
to 100 due recipients into the active window), ``next_due`` (when to wake up next),
``settle`` (record 100 outcomes and remove the finished messages in one transaction), and
``queue list``-style reading is left out (it is the operator's, not the hot path).
The figures show that the cost of a turn does not grow with the queue: the manager keeps
a bounded window and every query walks the (state, next_attempt) index.

    .venv/bin/python bench/large_queue.py                 # 200000 messages
    .venv/bin/python bench/large_queue.py --messages 1000000
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable

from tayori.queue.spool import Spool, connect, transaction
from tayori.queue.store import Outcome, QueueStore

WINDOW = 100
ACTIONS = ("remote",)


def build(directory: str, count: int, now: float) -> None:
    spool = Spool(directory)
    spool.prepare()
    spool.close()
    db = connect(os.path.join(directory, "index.sqlite3"))
    with transaction(db):
        db.executemany(
            "INSERT INTO messages (id, sender, size, body_type, smtputf8, client_address, "
            "client_name, helo, protocol, received_at) VALUES (?, 'a@example.net', 4096, "
            "'7BIT', 0, '192.0.2.1', '', 'client.example', 'ESMTP', ?)",
            [(f"M{i:08d}", now) for i in range(count)])
        db.executemany(
            "INSERT INTO recipients (message, idx, address, action, state, next_attempt) "
            "VALUES (?, 0, 'u@example.org', 'remote', 'deferred', ?)",
            [(f"M{i:08d}", now - (i % 1000) if i % 2 else now + 3600 + i)
             for i in range(count)])
    db.close()


def timed(call: Callable[[], object], repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="tayori-queue-bench-")
    try:
        now = time.time()
        started = time.perf_counter()
        build(directory, args.messages, now)
        built = time.perf_counter() - started
        store = QueueStore(directory)
        claimed: list[Outcome] = []

        def claim() -> None:
            for c in store.claim(now, WINDOW, ACTIONS):
                claimed.append(Outcome(c.message.queue_id, c.index, "delivered", 1, now,
                                       "250 2.0.0 ok", "2.0.0", "mx.example.org", now))

        def settle() -> None:
            batch = [claimed.pop() for _ in range(min(WINDOW, len(claimed)))]
            store.settle(batch, [o.queue_id for o in batch])

        claim_ms = timed(claim, args.repeats)
        next_due_ms = timed(lambda: store.next_due(ACTIONS), args.repeats)
        settle_ms = timed(settle, args.repeats)
        store.close()
        size = os.path.getsize(os.path.join(directory, "index.sqlite3")) / 2**20
        print(f"index: {args.messages} messages, {args.messages // 2} due "
              f"({size:.0f} MiB, built in {built:.1f} s)")
        print(f"claim {WINDOW}: {claim_ms:.2f} ms; next_due: {next_due_ms:.3f} ms; "
              f"settle {WINDOW} (record + remove): {settle_ms:.2f} ms")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
