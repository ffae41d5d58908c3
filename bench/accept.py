#!/usr/bin/env python3
"""Accepting mail into the queue: tayori and Postfix 3.7 side by side, in one run.

Load comes from Postfix's smtp-source (20 parallel sessions, one connection per message).
Each MTA runs fresh for each measurement, its queue on the same filesystem, with the
same durability promise: a message is on disk (fsync'd) before the 250 reply. Postfix
does not deliver anything during the run, so accepted mail stays queued:

- ``postfix-hold``: ``smtpd_recipient_restrictions = check_client_access static:HOLD``
  makes cleanup(8) write every message to the hold queue; the queue manager never sees
  it. Acceptance only, as tayori (which has no delivery yet).
- ``postfix-defer``: ``defer_transports = smtp relay local virtual`` (and a relayhost on
  a closed port): the queue manager takes each message from incoming/ into active/ and
  defers it to deferred/ (the defer daemon writes a log file per message). That work is
  counted too, as it runs while mail is arriving.

Postfix's input flow control (``in_flow_delay``) is off in both: it makes smtpd wait up
to 1 s per message for a token from the queue manager, which is designed for a queue
manager that delivers; with nothing delivered, it would only measure the delay.

Figures:

- messages/s accepted: messages acknowledged by smtp-source (its ``-c`` counter, exit 0)
  divided by smtp-source's wall time; the MTA's queue must then hold exactly that many.
- CPU seconds per message: user+system CPU of the MTA's whole process tree, read from
  /proc/PID/stat before and after the run (until the queue has settled): for every live
  process of the tree utime+stime+cutime+cstime. A child that exited was reaped by its
  parent (Postfix's master reaps its daemons), so its CPU is in the parent's
  cutime/cstime; a live process's cutime holds only reaped children: nothing is counted
  twice, nothing that ran is missed. The load generator is not counted.
- memory with 20 concurrent 10 MB messages: for both MTAs, the sum of PSS
  (/proc/PID/smaps_rollup) over all their processes (tayori's supervisor and workers,
  polled every 5 ms; Postfix's, every 20 ms), peak minus the idle sum after a warm-up:
  PSS shares each shared page among the processes that map it, so a sum of PSS is
  the memory the MTA uses, where a sum of RSS would count shared libraries many times.

Run as root (Postfix needs it) on an idle machine: ``python3 bench/accept.py``. The table
goes to stdout and to bench/results/accept-<time>.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from harness import Tayori, wait_for
from peers import QUEUE_DIRS, PostfixInstance

ROOT = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
SMTP_SOURCE = "/usr/sbin/smtp-source"
MiB = 1024 * 1024


# --- /proc ------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # fields from the 3rd (state) on


def process_tree(root: int) -> list[int]:
    """root and all its descendants, from the parent ids of every process."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                parents.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(parents.get(pid, []))
    return tree


def tree_cpu(root: int) -> float:
    """CPU seconds (user+system) used by root's tree so far, reaped children included."""
    total = 0
    for pid in process_tree(root):
        fields = _stat_fields(pid)
        if fields is not None:
            total += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    return total / CLK_TCK


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def tree_pss_kib(root: int) -> int:
    total = 0
    for pid in process_tree(root):
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1])
                break
    return total


class Poller:
    """Samples a value every few milliseconds on a thread; keeps the maximum."""

    def __init__(self, sample: Callable[[], int], interval: float = 0.005) -> None:
        self.sample, self.interval = sample, interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, KeyError):  # a process just exited
                self.peak = max(self.peak, self.sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --- the MTAs ---------------------------------------------------------------------------


class Target(Protocol):
    name: str
    port: int

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def root_pid(self) -> int: ...
    def queued(self) -> int: ...
    def settle(self) -> None: ...
    def memory_kib(self) -> int: ...


class QuietTayori(Tayori):
    """tayori as the harness runs it, logging at info (one line per event) like Postfix."""

    def config_text(self) -> str:
        return super().config_text().replace('level = "debug"', 'level = "info"')


@dataclass
class TayoriTarget:
    base: Path
    name: str = "tayori"
    port: int = 0
    server: Tayori | None = None

    def start(self) -> None:
        root = Path(tempfile.mkdtemp(prefix="tayori-", dir=self.base))
        self.server = QuietTayori(root, limits={"max_message_size": "50M",
                                                "max_connections_per_ip": 200})
        self.server.start()
        self.port = self.server.port

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            shutil.rmtree(self.server.root, ignore_errors=True)
            self.server = None

    def root_pid(self) -> int:
        assert self.server is not None and self.server.process is not None
        return self.server.process.pid

    def queued(self) -> int:
        assert self.server is not None
        db = sqlite3.connect(f"file:{self.server.spool / 'index.sqlite3'}?mode=ro", uri=True)
        try:
            rows = int(db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
        finally:
            db.close()
        files = len(os.listdir(self.server.spool / "messages"))
        assert rows == files, f"{rows} index rows, {files} body files"
        return rows

    def settle(self) -> None:
        """Nothing runs after the 250: no delivery yet."""

    def memory_kib(self) -> int:
        return tree_pss_kib(self.root_pid())  # supervisor + workers, like Postfix's tree


@dataclass
class PostfixTarget:
    mode: str  # "hold" or "defer"
    base: Path
    port: int = 0
    instance: PostfixInstance | None = None
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = f"postfix-{self.mode}"

    def settings(self) -> dict[str, str]:
        settings = {
            "in_flow_delay": "0",
            "message_size_limit": str(50 * MiB),
            "mydestination": "",
            "relayhost": "[127.0.0.1]:9",  # discard port: closed here
            "queue_run_delay": "1h",
            "minimal_backoff_time": "1h",
            "maximal_backoff_time": "2h",
        }
        if self.mode == "hold":
            settings["smtpd_recipient_restrictions"] = "check_client_access static:HOLD"
        else:
            settings["defer_transports"] = "smtp relay local virtual"
        return settings

    def start(self) -> None:
        self.instance = PostfixInstance(settings=self.settings(), parent=self.base)
        self.instance.start()
        self.port = self.instance.port

    def stop(self) -> None:
        if self.instance is not None:
            self.instance.stop()
            self.instance = None

    def root_pid(self) -> int:
        assert self.instance is not None
        pid = self.instance.master_pid()
        assert pid is not None
        return pid

    def queued(self) -> int:
        assert self.instance is not None
        return self.instance.queue_size(QUEUE_DIRS)

    def settle(self) -> None:
        """Until the queue manager has moved everything out of incoming/ and active/."""
        instance = self.instance
        assert instance is not None
        wait_for(lambda: instance.queue_size(("incoming", "active")) == 0, timeout=600,
                 interval=0.05, what="postfix queue to settle")

    def memory_kib(self) -> int:
        return tree_pss_kib(self.root_pid())


# --- measurements -------------------------------------------------------------------------


@dataclass
class Measured:
    """One measured run: messages handled, wall seconds, CPU seconds of the MTA."""

    messages: int
    seconds: float
    cpu: float

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    @property
    def cpu_per_message(self) -> float:
        return self.cpu / self.messages


def smtp_source(port: int, count: int, size: int, sessions: int, *,
                to: str = "u@tayori.test", recipients: int = 1) -> tuple[int, float]:
    """Run smtp-source; returns (messages acknowledged, wall seconds). With
    ``recipients`` above 1, smtp-source numbers them: 1u@..., 2u@..."""
    started = time.monotonic()
    result = subprocess.run(
        [SMTP_SOURCE, "-c", "-s", str(sessions), "-m", str(count), "-l", str(size),
         "-r", str(recipients), "-f", "bench@source.test", "-t", to, f"127.0.0.1:{port}"],
        capture_output=True, timeout=3600, check=False)
    seconds = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(f"smtp-source failed: {result.stderr.decode(errors='replace')}")
    numbers = [p for p in result.stdout.decode().replace("\r", "\n").split() if p.isdigit()]
    return (int(numbers[-1]) if numbers else 0), seconds


def measure_accept(target: Target, count: int, size: int, sessions: int,
                   warmup: int) -> Measured:
    target.start()
    try:
        done, _ = smtp_source(target.port, warmup, size, sessions)
        assert done == warmup
        target.settle()
        before = target.queued()
        cpu0 = tree_cpu(target.root_pid())
        done, seconds = smtp_source(target.port, count, size, sessions)
        target.settle()
        cpu = tree_cpu(target.root_pid()) - cpu0
        assert done == count, f"{target.name}: smtp-source counted {done} of {count}"
        queued = target.queued() - before
        assert queued == done, f"{target.name}: {queued} queued, {done} acknowledged"
        return Measured(done, seconds, cpu)
    finally:
        target.stop()


@dataclass
class Memory:
    idle_kib: int
    peak_kib: int
    hwm_kib: int | None  # tayori only: VmHWM summed over its processes

    @property
    def growth_mib(self) -> float:
        return (self.peak_kib - self.idle_kib) / 1024


def measure_memory(target: Target, size: int, count: int) -> Memory:
    target.start()
    try:
        smtp_source(target.port, 40, 4096, 20)  # warm-up: every code path loaded once
        target.settle()
        idle = min(target.memory_kib() for _ in range(5))
        interval = 0.005 if target.name == "tayori" else 0.02  # Postfix: ~40 processes
        with Poller(target.memory_kib, interval) as poller:
            done, _ = smtp_source(target.port, count, size, count)
        assert done == count
        hwm = sum(status_kib(pid, "VmHWM") for pid in process_tree(target.root_pid())) \
            if target.name == "tayori" else None
        return Memory(idle, max(poller.peak, idle), hwm)
    finally:
        target.stop()


# --- report -----------------------------------------------------------------------------


def machine() -> str:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    postfix = subprocess.run(["postconf", "-d", "-h", "mail_version"], capture_output=True,
                             text=True, check=False).stdout.strip()
    fs = subprocess.run(["df", "--output=fstype", tempfile.gettempdir()],
                        capture_output=True, text=True, check=False).stdout.split()[-1:]
    try:
        import uvloop  # noqa: F401
        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    return (f"{os.cpu_count()} cores ({model}), {os.sysconf('SC_PHYS_PAGES') * PAGE // MiB} MiB "
            f"RAM, Linux {platform.release()}, queues on {''.join(fs) or '?'} "
            f"({tempfile.gettempdir()}); Python {platform.python_version()} ({loop}), "
            f"Postfix {postfix}")


def fmt(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def run(args: argparse.Namespace) -> str:
    base = Path(tempfile.mkdtemp(prefix="tayori-bench-"))
    base.chmod(0o755)
    names = ["tayori"] + [f"postfix-{m}" for m in args.postfix_modes]

    def targets() -> list[Target]:
        return [TayoriTarget(base)] + [PostfixTarget(m, base) for m in args.postfix_modes]

    workloads = [("4 KB", 4096, args.small), ("100 KB", 100 * 1024, args.large)]
    accepted: dict[tuple[str, str], list[Measured]] = {}
    try:
        for repeat in range(args.repeats):
            for label, size, count in workloads:
                for target in targets():  # interleaved: drift hits every MTA alike
                    result = measure_accept(target, count, size, args.sessions, args.warmup)
                    accepted.setdefault((label, target.name), []).append(result)
                    print(f"[{repeat + 1}/{args.repeats}] {label:>6} {target.name:<14} "
                          f"{result.rate:8.0f} msg/s  {result.cpu_per_message * 1000:6.2f} "
                          f"ms CPU/msg", file=sys.stderr, flush=True)
        memory: dict[str, Memory] = {}
        for target in targets():
            memory[target.name] = measure_memory(target, args.big_size * MiB, args.big_count)
            print(f"memory {target.name:<14} +{memory[target.name].growth_mib:.1f} MiB",
                  file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    def median(label: str, name: str, attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in accepted[(label, name)]))

    head = ["figure", *names] + [f"tayori / {n}" for n in names[1:]]
    rows = []
    for label, _size, count in workloads:
        for attr, title, scale, digits in (
                ("rate", f"{label} × {count}: messages/s accepted", 1, 0),
                ("cpu_per_message", f"{label} × {count}: CPU ms per message", 1000, 2)):
            values = [median(label, n, attr) * scale for n in names]
            rows.append([title, *(fmt(v, digits) for v in values),
                         *(ratio(values[0], v) for v in values[1:])])
    growth = [memory[n].growth_mib for n in names]
    rows.append([f"{args.big_count} × {args.big_size} MB at once: memory growth MiB "
                 "(sum of PSS over the MTA's processes)", *(fmt(g, 1) for g in growth),
                 *(ratio(growth[0], g) for g in growth[1:])])
    tayori_memory = memory["tayori"]
    lines = [
        f"# Accepting mail: tayori beside Postfix ({datetime.datetime.now():%Y-%m-%d %H:%M})",
        "",
        f"Machine: {machine()}.",
        "",
        f"Command: `python3 bench/accept.py {' '.join(sys.argv[1:])}`".rstrip() + " — "
        f"smtp-source, {args.sessions} sessions, one connection per message, "
        f"{args.warmup} warm-up messages first; median of {args.repeats} run(s).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        f"tayori (supervisor and workers) idle PSS {tayori_memory.idle_kib / 1024:.1f} MiB, "
        f"peak PSS {tayori_memory.peak_kib / 1024:.1f} MiB, VmHWM summed "
        f"{(tayori_memory.hwm_kib or 0) / 1024:.1f} MiB.",
        "",
        "Every run, per MTA: " + "; ".join(
            f"{label} {name}: " + ", ".join(f"{r.rate:.0f}/s {r.cpu_per_message * 1000:.2f} ms"
                                            for r in accepted[(label, name)])
            for label, _s, _c in workloads for name in names) + ".",
        "",
    ]
    return "\n".join(lines)


def comparison(workloads: list[Any], results: dict[tuple[str, str], list[Any]],
               names: list[str]) -> list[str]:
    """The side-by-side table (medians of the runs; the first name over the second) of the
    relay and local benchmarks; ``workloads`` have a ``label`` and ``messages``."""
    def median(label: str, name: str, attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in results[(label, name)]))

    head = ["workload", "tayori msg/s", "postfix msg/s", "tayori / postfix",
            "tayori CPU ms/msg", "postfix CPU ms/msg", "tayori / postfix"]
    rows = []
    for load in workloads:
        rates = [median(load.label, n, "rate") for n in names]
        cpus = [median(load.label, n, "cpu_per_message") * 1000 for n in names]
        rows.append([f"{load.label}, {load.messages} messages", *(fmt(r) for r in rates),
                     ratio(rates[0], rates[1]), *(fmt(c, 2) for c in cpus),
                     ratio(cpus[0], cpus[1])])
    return table(head, rows)


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(row) + " |" for row in rows)]


def common_arguments(parser: argparse.ArgumentParser, *, warmup: int, warmup_help: str,
                     repeats: int) -> None:
    """The options every benchmark here takes."""
    parser.add_argument("--sessions", type=int, default=20, help="parallel SMTP sessions")
    parser.add_argument("--warmup", type=int, default=warmup, help=warmup_help)
    parser.add_argument("--repeats", type=int, default=repeats,
                        help="runs per workload and MTA (the median is reported)")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results",
                        help="directory for the Markdown result")


def require(parser: argparse.ArgumentParser, *programs: str) -> None:
    """Root, and the peer programs, or a usage error."""
    if os.geteuid() != 0:
        parser.error("run as root: Postfix needs it")
    for program in programs:
        if not os.access(program, os.X_OK):
            parser.error(f"{program} is missing (scripts/install-peers installs it)")


def publish(report: str, output: Path, name: str) -> int:
    """Write the report under ``output`` and print it."""
    output.mkdir(parents=True, exist_ok=True)
    path = output / f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}.md"
    path.write_text(report)
    print(report)
    print(f"written to {path}", file=sys.stderr)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Measure tayori and Postfix accepting mail into their queues, side by "
                    "side: messages/s, CPU per message, memory with concurrent large "
                    "messages. Needs root, Postfix 3.x and smtp-source (Debian: postfix).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--small", type=int, default=5000, help="4 KB messages per run")
    parser.add_argument("--large", type=int, default=1000, help="100 KB messages per run")
    common_arguments(parser, warmup=200, warmup_help="messages sent before each measured run",
                     repeats=3)
    parser.add_argument("--big-size", type=int, default=10, help="MB per large message")
    parser.add_argument("--big-count", type=int, default=20,
                        help="large messages sent at once (one session each)")
    parser.add_argument("--postfix-modes", nargs="+", choices=["hold", "defer"],
                        default=["hold", "defer"], help="Postfix configurations to compare")
    args = parser.parse_args()
    require(parser, SMTP_SOURCE, "/usr/sbin/postfix")
    return publish(run(args), args.output, "accept")


if __name__ == "__main__":
    sys.exit(main())
