"""The child side of a pipe delivery: become the right user, then run the command.

Takes: ``python -m tayori.deliver.runas UID GID GROUPS UMASK -- COMMAND...`` (UID, GID
empty: keep them; GROUPS comma-separated, or empty; UMASK octal).
Promises: supplementary groups, gid, uid (in that order: the uid last) and umask are set,
then COMMAND replaces this process (its environment and directory are the parent's
choice). Done here rather than through ``subprocess``' ``user=``/``umask=`` arguments,
which the uvloop event loop tayori runs on does not take.
Failure policy: a command that cannot be run exits 78 (EX_CONFIG: the pipe delivery
defers with ``451 4.3.5``) with one line on stderr; never a traceback.
"""

from __future__ import annotations

import os
import sys

EX_CONFIG = 78
NO_COERCION = "PYTHONCOERCECLOCALE"   # set by the parent: LANG=C must stay as it is


def main(argv: list[str]) -> int:
    try:
        uid, gid, groups, umask, separator, *command = argv
    except ValueError:
        command, separator = [], ""
    if separator != "--" or not command:
        print("runas: usage: UID GID GROUPS UMASK -- COMMAND...", file=sys.stderr)
        return EX_CONFIG
    try:
        if groups or gid:
            os.setgroups([int(g) for g in groups.split(",") if g])
        if gid:
            os.setgid(int(gid))
        if uid:
            os.setuid(int(uid))
        os.umask(int(umask, 8))
        os.environ.pop(NO_COERCION, None)   # the parent's marker, not the command's
        os.execvp(command[0], command)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(f"cannot run {command[0]}: {reason}", file=sys.stderr)
    return EX_CONFIG


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
