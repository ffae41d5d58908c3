"""Counting sessions per client address, across the worker processes of one tayori.

Takes: the number of workers (fixed at start) and, from each worker, +1/-1 per session.
Promises: :meth:`ConnectionTable.counts` gives the sessions open right now in all
workers, in total and from one address, so ``limits.max_connections`` and
``limits.max_connections_per_ip`` hold for the whole server, not per process. The table
lives in anonymous shared memory made before the workers are forked: one row per
worker, written only by that worker (no locks), read by all. Addresses are hashed into
65536 slots, so two addresses rarely share a count (if they do, the limit is only
reached sooner, never later). When a worker dies its row is cleared.
Failure policy: pure memory operations; cannot fail after construction.
"""

from __future__ import annotations

import mmap
import zlib

SLOTS = 65536


class ConnectionTable:
    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.worker = 0
        self._width = SLOTS + 1  # slot 0 holds the worker's total
        self._memory = mmap.mmap(-1, 4 * workers * self._width)
        self._cells = memoryview(self._memory).cast("i")

    def counts(self, address: str) -> tuple[int, int]:
        """(sessions in total, sessions from ``address``) over all workers."""
        slot = self._slot(address)
        cells, width = self._cells, self._width
        total = sum(cells[row * width] for row in range(self.workers))
        mine = sum(cells[row * width + slot] for row in range(self.workers))
        return total, mine

    def add(self, address: str, delta: int) -> None:
        base = self.worker * self._width
        self._cells[base] += delta
        self._cells[base + self._slot(address)] += delta

    def clear(self, worker: int) -> None:
        start = worker * self._width
        self._cells[start : start + self._width] = memoryview(bytes(4 * self._width)).cast("i")

    @staticmethod
    def _slot(address: str) -> int:
        return 1 + zlib.crc32(address.encode()) % SLOTS
