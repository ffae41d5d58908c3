"""Waking the queue manager: a datagram to an abstract unix socket named after the spool.

Takes: the spool directory.
Promises: :func:`poke` (any process: a worker after a commit, ``tayori queue flush``)
costs a socket and one non-blocking ``sendto`` and never fails; the :class:`Listener` in the process
running the queue manager calls its callback on the event loop for each batch of pokes.
The socket lives in the abstract namespace (Linux), so nothing is left on disk and
the spool path's length does not matter.
Failure policy: a poke that cannot be sent (no manager running, buffer full) is
dropped: the manager also looks at the index on its own at least once a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
from collections.abc import Callable


def address(spool_dir: str) -> str:
    digest = hashlib.sha256(os.path.realpath(spool_dir).encode()).hexdigest()[:24]
    return f"\0tayori-wakeup-{digest}"


def poke(spool_dir: str) -> None:
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        sender.setblocking(False)
        sender.sendto(b"!", address(spool_dir))


class Listener:
    def __init__(self, spool_dir: str, callback: Callable[[], None]) -> None:
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        self._socket.bind(address(spool_dir))
        self._callback = callback
        asyncio.get_running_loop().add_reader(self._socket.fileno(), self._readable)

    def _readable(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while True:
                self._socket.recv(64)
        self._callback()

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().remove_reader(self._socket.fileno())
        self._socket.close()
