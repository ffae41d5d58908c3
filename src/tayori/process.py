"""Process lifetime helpers shared by the service's children (workers, the privileged
delivery helper).

Promises: :func:`die_with_parent` makes the calling process get SIGKILL when its parent
dies, whatever kills the parent (Linux ``PR_SET_PDEATHSIG``), so a killed tayori leaves
nothing behind; elsewhere it only checks that the parent is still there.
Failure policy: never raises; a parent that died before the call ends the caller.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies, whatever kills it."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
