#!/usr/bin/env python3
"""Relaying mail end to end: smtp-source -> MTA -> smtp-sink, tayori and Postfix 3.7 side
by side, in one run (DESIGN §7).

Load comes from Postfix's smtp-source (20 parallel sessions, one connection per message,
1 or 5 recipients per message, all in a relayed domain); each MTA relays everything to
Postfix's smtp-sink on a loopback port, which accepts every message and counts it (``-c``)
without storing it. Each MTA runs fresh for each measurement, its queue on the same
filesystem, with its default durability (a message is on disk, fsync'd, before the 250):

- ``tayori``: ``python3 -m tayori serve`` with the configuration of tests/harness.py at log
  level info (bench/accept.py's ``QuietTayori``), delivery on, the ``remote`` action a
  ``relay`` to ``[127.0.0.1]:SINK`` without TLS; otherwise its defaults (a worker per core,
  ``queue.max_active`` 2000, 20 connections per destination, connections reused).
- ``postfix``: a private Postfix (tests/peers.py ``PostfixInstance``) with ``relayhost =
  [127.0.0.1]:SINK``; otherwise Postfix's defaults (the instance's own settings only
  shorten retry waits, which nothing here needs), so ``in_flow_delay`` (input flow
  control) stays on, as a relaying Postfix runs. Its smtp client offers no TLS to the
  sink either (smtp-sink offers no STARTTLS).

Figures:

- messages/s relayed: messages / seconds from the start of smtp-source until the sink has
  counted them all and the MTA's queue is empty (polled every 10 ms). smtp-source must
  have had all of them acknowledged (its ``-c`` counter, exit 0).
- CPU ms per message: user+system CPU of the MTA's whole process tree over that time
  (bench/accept.py's ``tree_cpu``: live processes' utime+stime+cutime+cstime, so
  Postfix's reaped daemons count too). Load generator and sink are not counted; they run
  on the same cores.
- sink transactions per message: 1.00 when every message went out in one transaction
  for all its recipients.

Run as root (Postfix needs it) on an idle machine: ``python3 bench/relay.py``. The table
goes to stdout and to bench/results/relay-<time>.md.
"""

from __future__ import annotations

import argparse
import datetime
import re
import shutil
import sqlite3
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
    MiB,
    PostfixTarget,
    QuietTayori,
    TayoriTarget,
    common_arguments,
    comparison,
    machine,
    publish,
    require,
    smtp_source,
    tree_cpu,
)

from peers import QUEUE_DIRS, PostfixInstance, SmtpSink

RELAYED_TO = "rcpt@relay.test"   # not a local domain of either MTA: relayed
POLL = 0.01


class RelayTarget(Protocol):
    name: str
    port: int
    sink_port: int

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def root_pid(self) -> int: ...
    def queued(self) -> int: ...


@dataclass
class TayoriRelay(TayoriTarget):
    """tayori as bench/accept.py runs it, with delivery on: a relay to the sink."""

    sink_port: int = 0

    def start(self) -> None:
        root = Path(tempfile.mkdtemp(prefix="tayori-", dir=self.base))
        self.server = QuietTayori(
            root, deliver=True,
            limits={"max_message_size": "50M", "max_connections_per_ip": 200},
            remote={"deliver": "relay", "host": f"[127.0.0.1]:{self.sink_port}",
                    "tls": "none"})
        self.server.start()
        self.port = self.server.port

    def queued(self) -> int:
        """Messages in the index (while delivery runs, body files and index rows part
        for a moment, so only the index is counted)."""
        assert self.server is not None
        path = self.server.spool / "index.sqlite3"
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            return int(db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
        finally:
            db.close()


@dataclass
class PostfixRelay(PostfixTarget):
    """A private Postfix relaying everything to the sink, otherwise with its defaults."""

    sink_port: int = 0

    def __post_init__(self) -> None:
        self.name = "postfix"

    def settings(self) -> dict[str, str]:
        return {"relayhost": f"[127.0.0.1]:{self.sink_port}",
                "message_size_limit": str(50 * MiB)}

    def start(self) -> None:
        self.instance = PostfixInstance(settings=self.settings(), parent=self.base)
        self.instance.start()
        self.port = self.instance.port

    def queued(self) -> int:
        assert self.instance is not None
        return self.instance.queue_size(QUEUE_DIRS)


class SinkCounter:
    """smtp-sink's ``-c`` counter, read incrementally from its output file."""

    def __init__(self, sink: SmtpSink) -> None:
        self.handle = open(sink.root / "stderr.log", "rb")  # noqa: SIM115
        self.value = 0

    def close(self) -> None:
        self.handle.close()

    def __call__(self) -> int:
        counts = re.findall(rb"mesg=(\d+)", self.handle.read())
        if counts:
            self.value = int(counts[-1])
        return self.value


@dataclass(frozen=True)
class Workload:
    label: str
    size: int
    messages: int
    recipients: int


@dataclass
class Relayed(Measured):
    transactions: int   # counted by the sink


def relay_run(target: RelayTarget, count: SinkCounter, load: Workload,
              sessions: int) -> tuple[float, float, int]:
    """One smtp-source run through the target; returns (seconds, CPU seconds, sink
    transactions), once the sink has counted every message and the queue is empty."""
    messages = load.messages
    base = count()
    cpu0 = tree_cpu(target.root_pid())
    outcome: list[object] = []

    def source() -> None:
        try:
            outcome.append(smtp_source(target.port, messages, load.size, sessions,
                                       to=RELAYED_TO, recipients=load.recipients))
        except BaseException as exc:
            outcome.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=source, name="smtp-source")
    thread.start()
    deadline = started + 3600
    while not (count() >= base + messages and target.queued() == 0):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{target.name}: the sink counted {count() - base} of "
                               f"{messages}, {target.queued()} still queued, after an hour")
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
    acknowledged = result[0]
    if acknowledged != messages:
        raise RuntimeError(f"{target.name}: smtp-source counted {acknowledged} of {messages}")
    return seconds, cpu, count() - base


def measure(target: RelayTarget, load: Workload, sessions: int, warmup: int) -> Relayed:
    with SmtpSink(count=True) as sink:
        count = SinkCounter(sink)
        target.sink_port = sink.port
        target.start()
        try:
            relay_run(target, count, replace(load, messages=warmup), sessions)
            seconds, cpu, transactions = relay_run(target, count, load, sessions)
            return Relayed(load.messages, seconds, cpu, transactions)
        finally:
            target.stop()
            count.close()


def run(args: argparse.Namespace) -> str:
    base = Path(tempfile.mkdtemp(prefix="tayori-bench-"))
    base.chmod(0o755)
    names = ["tayori", "postfix"]

    def targets() -> list[RelayTarget]:
        return [TayoriRelay(base), PostfixRelay("relay", base)]

    workloads = [Workload(f"{label} × {recipients} rcpt", size, count, recipients)
                 for label, size, count in (("4 KB", 4096, args.small),
                                            ("100 KB", 100 * 1024, args.large))
                 for recipients in args.recipients]
    results: dict[tuple[str, str], list[Relayed]] = {}
    try:
        for repeat in range(args.repeats):
            for load in workloads:
                for target in targets():  # interleaved: drift hits both alike
                    result = measure(target, load, args.sessions, args.warmup)
                    results.setdefault((load.label, target.name), []).append(result)
                    print(f"[{repeat + 1}/{args.repeats}] {load.label:>16} {target.name:<8} "
                          f"{result.rate:7.0f} msg/s  {result.cpu_per_message * 1000:6.2f} "
                          f"ms CPU/msg  {result.transactions / result.messages:.2f} "
                          "transactions/msg", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    every = "; ".join(
        f"{load.label} {name}: " + ", ".join(
            f"{r.rate:.0f}/s {r.cpu_per_message * 1000:.2f} ms "
            f"{r.transactions / r.messages:.2f} tx/msg" for r in results[(load.label, name)])
        for load in workloads for name in names)
    lines = [
        f"# Relaying mail: tayori beside Postfix ({datetime.datetime.now():%Y-%m-%d %H:%M})",
        "",
        f"Machine: {machine()}.",
        "",
        f"Command: `python3 bench/relay.py {' '.join(sys.argv[1:])}`".rstrip() + " — "
        f"smtp-source → MTA → smtp-sink, {args.sessions} sessions, one connection per "
        f"message, {args.warmup} warm-up messages first; median of {args.repeats} run(s).",
        "",
        *comparison(workloads, results, names),
        "",
        f"Every run (rate, CPU per message, sink transactions per message): {every}.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Measure tayori and Postfix relaying mail from smtp-source to "
                    "smtp-sink, side by side: messages/s relayed end to end and CPU per "
                    "message. Needs root, Postfix 3.x, smtp-source and smtp-sink.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--small", type=int, default=2000, help="4 KB messages per run")
    parser.add_argument("--large", type=int, default=500, help="100 KB messages per run")
    parser.add_argument("--recipients", type=int, nargs="+", default=[1, 5],
                        help="recipients per message (one workload each)")
    common_arguments(parser, warmup=100, warmup_help="messages relayed before each measured run",
                     repeats=1)
    args = parser.parse_args()
    require(parser, "/usr/sbin/smtp-source", "/usr/sbin/smtp-sink", "/usr/sbin/postfix")
    return publish(run(args), args.output, "relay")


if __name__ == "__main__":
    sys.exit(main())
