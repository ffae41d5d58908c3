#!/usr/bin/env python3
"""Local delivery into Maildir: smtp-source -> MTA -> Maildir ``new/``, tayori and Postfix
3.7's virtual(8) side by side, in one run (DESIGN §7, the local delivery issue).

Load comes from Postfix's smtp-source (20 parallel sessions, one connection per message,
4 KB, 1 or 5 recipients per message, all in the MTA's own domain ``tayori.test``); each
MTA delivers every recipient into a Maildir of its own (``u``; with 5 recipients,
smtp-source sends to ``u``, ``2u`` … ``5u``). Each MTA runs fresh for each measurement,
its queue and its mailboxes on the same filesystem, with its default durability (the
message fsync'd before the 250; each Maildir file fsync'd in ``tmp/`` before it is linked
into ``new/``):

- ``tayori``: ``python3 -m tayori serve`` with the configuration of tests/harness.py at log
  level info (bench/accept.py's ``QuietTayori``), delivery on; its ``local`` action is a
  ``maildir`` at ``mail/{domain}/{user}/`` (any local part accepted: no users table);
  otherwise its defaults (a worker per core, ``queue.max_active`` 2000). It runs as root
  and the files are root's (no virtual mail user yet).
- ``postfix``: a private Postfix (tests/peers.py ``PostfixInstance``) with
  ``virtual_mailbox_domains = tayori.test``, ``virtual_mailbox_base`` a directory of the
  instance owned by ``nobody``, ``virtual_mailbox_maps`` a ``texthash:`` table (``u`` and
  ``1u`` … ``Nu``, each ``NAME/``: a Maildir), ``virtual_uid_maps`` and
  ``virtual_gid_maps`` ``static:`` nobody's ids; otherwise Postfix's defaults (input flow
  control on; 20 virtual(8) deliveries at once per domain).

Figures:

- messages/s delivered: messages / seconds from the start of smtp-source until every
  recipient's file is in ``new/`` (messages x recipients new files, exactly) and the
  MTA's queue is empty (polled every 10 ms). smtp-source must have had all of them
  acknowledged (its ``-c`` counter, exit 0).
- CPU ms per message: user+system CPU of the MTA's whole process tree over that time
  (bench/accept.py's ``tree_cpu``: live processes' utime+stime+cutime+cstime, so
  Postfix's reaped daemons count too). The load generator is not counted; it runs on the
  same cores.

Run as root (Postfix needs it) on an idle machine: ``python3 bench/local.py``. The table
goes to stdout and to bench/results/local-<time>.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pwd
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accept import (
    Measured,
    PostfixTarget,
    QuietTayori,
    common_arguments,
    comparison,
    machine,
    publish,
    require,
    smtp_source,
    tree_cpu,
)
from relay import TayoriRelay, Workload

from peers import QUEUE_DIRS, PostfixInstance

DOMAIN = "tayori.test"       # a local domain of both MTAs (tests/harness.py's default)
USER = "u"                   # smtp-source's -t; with -r N it sends to u, 2u … Nu
POLL = 0.01
VIRTUAL = "/usr/lib/postfix/sbin/virtual"


class LocalTarget(Protocol):
    name: str
    port: int

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def root_pid(self) -> int: ...
    def queued(self) -> int: ...
    def mailboxes(self) -> Path: ...
    def log_tail(self) -> str: ...


def delivered(mailboxes: Path) -> int:
    """Files in the ``new/`` of every Maildir under ``mailboxes``."""
    total = 0
    try:
        boxes = os.listdir(mailboxes)
    except FileNotFoundError:
        return 0
    for box in boxes:
        try:
            total += len(os.listdir(mailboxes / box / "new"))
        except FileNotFoundError:
            continue
    return total


@dataclass
class TayoriLocal(TayoriRelay):
    """tayori as bench/relay.py runs it (the index counts as its queue), delivering to
    the harness's ``maildir`` action."""

    def start(self) -> None:
        root = Path(tempfile.mkdtemp(prefix="tayori-", dir=self.base))
        self.server = QuietTayori(root, deliver=True, limits={
            "max_message_size": "50M", "max_connections_per_ip": 200})
        self.server.start()
        self.port = self.server.port

    def mailboxes(self) -> Path:
        assert self.server is not None
        return self.server.root / "mail" / DOMAIN

    def log_tail(self) -> str:
        return self.server.log()[-3000:] if self.server is not None else ""


@dataclass
class PostfixLocal(PostfixTarget):
    """A private Postfix delivering ``tayori.test`` to virtual(8) Maildirs."""

    users: int = 5   # the table lists u and 1u … Nu

    def __post_init__(self) -> None:
        self.name = "postfix"

    def start(self) -> None:
        instance = PostfixInstance(parent=self.base)
        nobody = pwd.getpwnam("nobody")
        vmail = instance.root / "vmail"
        vmail.mkdir(mode=0o755)
        os.chown(vmail, nobody.pw_uid, nobody.pw_gid)
        table = instance.root / "vmailbox"
        names = [USER] + [f"{n}{USER}" for n in range(1, self.users + 1)]
        table.write_text("".join(f"{name}@{DOMAIN} {name}/\n" for name in names))
        instance.settings.update({
            "virtual_mailbox_domains": DOMAIN,
            "virtual_mailbox_base": str(vmail),
            "virtual_mailbox_maps": f"texthash:{table}",
            "virtual_uid_maps": f"static:{nobody.pw_uid}",
            "virtual_gid_maps": f"static:{nobody.pw_gid}",
        })
        self.instance = instance
        instance.start()
        self.port = instance.port

    def queued(self) -> int:
        assert self.instance is not None
        return self.instance.queue_size(QUEUE_DIRS)

    def mailboxes(self) -> Path:
        assert self.instance is not None
        return self.instance.root / "vmail"

    def log_tail(self) -> str:
        return self.instance.log()[-3000:] if self.instance is not None else ""


def local_run(target: LocalTarget, load: Workload, sessions: int) -> tuple[float, float]:
    """One smtp-source run into the target; returns (seconds, CPU seconds) once every
    recipient's file is in ``new/`` and the queue is empty."""
    messages = load.messages
    files = messages * load.recipients
    base = delivered(target.mailboxes())
    cpu0 = tree_cpu(target.root_pid())
    outcome: list[object] = []

    def source() -> None:
        try:
            outcome.append(smtp_source(target.port, messages, load.size, sessions,
                                       to=f"{USER}@{DOMAIN}", recipients=load.recipients))
        except BaseException as exc:
            outcome.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=source, name="smtp-source")
    thread.start()
    deadline = started + 600
    now = 0
    while True:
        # Cheap checks first: listing thousands of files every 10 ms would take CPU
        # from the MTA on a small machine.
        if outcome and target.queued() == 0:
            now = delivered(target.mailboxes()) - base
            if now >= files:
                break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{target.name}: {delivered(target.mailboxes()) - base} of "
                               f"{files} files in new/, {target.queued()} still queued, "
                               f"after 10 minutes; its log ends:\n{target.log_tail()}")
        if outcome and isinstance(outcome[0], BaseException):
            raise RuntimeError(f"{target.name}: smtp-source failed") from outcome[0]
        time.sleep(POLL)
    seconds = time.monotonic() - started
    cpu = tree_cpu(target.root_pid()) - cpu0
    thread.join()
    result = outcome[0]
    if isinstance(result, BaseException):
        raise RuntimeError(f"{target.name}: smtp-source failed") from result
    assert isinstance(result, tuple)
    if result[0] != messages:
        raise RuntimeError(f"{target.name}: smtp-source counted {result[0]} of {messages}")
    if now != files:
        raise RuntimeError(f"{target.name}: {now} files in new/ for {files} deliveries")
    return seconds, cpu


def measure(target: LocalTarget, load: Workload, sessions: int, warmup: int) -> Measured:
    target.start()
    try:
        local_run(target, replace(load, messages=warmup), sessions)
        seconds, cpu = local_run(target, load, sessions)
        return Measured(load.messages, seconds, cpu)
    finally:
        target.stop()


def run(args: argparse.Namespace) -> str:
    base = Path(tempfile.mkdtemp(prefix="tayori-bench-"))
    base.chmod(0o755)
    names = ["tayori", "postfix"]
    users = max(args.recipients)

    def targets() -> list[LocalTarget]:
        return [TayoriLocal(base), PostfixLocal("virtual", base, users=users)]

    workloads = [Workload(f"4 KB × {recipients} rcpt", 4096, args.messages, recipients)
                 for recipients in args.recipients]
    results: dict[tuple[str, str], list[Measured]] = {}
    try:
        for repeat in range(args.repeats):
            for load in workloads:
                for target in targets():  # interleaved: drift hits both alike
                    result = measure(target, load, args.sessions, args.warmup)
                    results.setdefault((load.label, target.name), []).append(result)
                    print(f"[{repeat + 1}/{args.repeats}] {load.label:>14} {target.name:<8} "
                          f"{result.rate:7.0f} msg/s  {result.cpu_per_message * 1000:6.2f} "
                          "ms CPU/msg", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    every = "; ".join(
        f"{load.label} {name}: " + ", ".join(
            f"{r.rate:.0f}/s {r.cpu_per_message * 1000:.2f} ms"
            for r in results[(load.label, name)])
        for load in workloads for name in names)
    lines = [
        f"# Local delivery into Maildir: tayori beside Postfix "
        f"({datetime.datetime.now():%Y-%m-%d %H:%M})",
        "",
        f"Machine: {machine()}.",
        "",
        f"Command: `python3 bench/local.py {' '.join(sys.argv[1:])}`".rstrip() + " — "
        f"smtp-source → MTA → Maildir new/ (Postfix: virtual(8)), {args.sessions} sessions, "
        f"one connection per message, {args.warmup} warm-up messages first; median of "
        f"{args.repeats} run(s).",
        "",
        *comparison(workloads, results, names),
        "",
        f"Every run (rate, CPU per message): {every}.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Measure tayori and Postfix (virtual(8)) delivering mail from "
                    "smtp-source into Maildirs, side by side: messages/s delivered end to "
                    "end and CPU per message. Needs root, Postfix 3.x and smtp-source.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000, help="4 KB messages per run")
    parser.add_argument("--recipients", type=int, nargs="+", default=[1, 5],
                        help="recipients (mailboxes) per message (one workload each)")
    common_arguments(parser, warmup=100, warmup_help="messages delivered before each measured run",
                     repeats=3)
    args = parser.parse_args()
    require(parser, "/usr/sbin/smtp-source", "/usr/sbin/postfix", VIRTUAL)
    return publish(run(args), args.output, "local")


if __name__ == "__main__":
    sys.exit(main())
