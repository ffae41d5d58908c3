"""Real peers for tests and benchmarks: a private Postfix instance, and smtp-sink.

``PostfixInstance`` runs a whole Postfix (master, smtpd, cleanup, qmgr, smtp...) from
the Debian package with its own configuration directory, queue and log under a fresh
temporary directory. It listens only on the 127.0.0.1 port it is given, resolves
nothing (``smtp_dns_support_level = disabled``) and, given a ``relayhost``, sends
everything it accepts there. ``SmtpSink`` runs Postfix's ``smtp-sink`` test server.

What was found to work here (Postfix 3.7, Debian 12, as root):

- ``postfix -c DIR start`` works for root without listing DIR in
  ``alternate_config_directories`` of /etc/postfix/main.cf (that check applies to
  unprivileged users only).
- The queue directory must be owned by root (Postfix warns ``not owned by root``
  otherwise); ``postfix start`` creates the queue subdirectories, owned by ``postfix``.
  ``data_directory`` must be owned by ``postfix``.
- Debian's master.cf runs most services chrooted, which would need copies of /etc files
  inside the queue directory: the master.cf written here runs nothing chrooted.
- Postfix logs to syslog by default, and there is no syslog here: ``maillog_file`` (served
  by the ``postlog`` service) puts the log in ``<root>/maillog``; its directory must be
  listed in ``maillog_file_prefixes``.
- The ``postfix`` command prints its errors to stderr only when stderr is a terminal;
  otherwise only to the log. Failures to start are reported with the log's tail.
- The temporary directory is made with :func:`tempfile.mkdtemp` (mode 0755), not under
  pytest's ``tmp_path``, whose parents are mode 0700 and would lock out the ``postfix``
  user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from harness import TIMEOUT, Client, free_port, wait_for, which_peer

POSTFIX_ETC = Path("/etc/postfix")
QUEUE_DIRS = ("maildrop", "incoming", "active", "deferred", "hold")

# One line per service; nothing chrooted. The smtpd line is added by PostfixInstance.
MASTER_SERVICES = """\
pickup     unix  n       -       n       60      1       pickup
cleanup    unix  n       -       n       -       0       cleanup
qmgr       unix  n       -       n       300     1       qmgr
tlsmgr     unix  -       -       n       1000?   1       tlsmgr
rewrite    unix  -       -       n       -       -       trivial-rewrite
bounce     unix  -       -       n       -       0       bounce
defer      unix  -       -       n       -       0       bounce
trace      unix  -       -       n       -       0       bounce
verify     unix  -       -       n       -       1       verify
flush      unix  n       -       n       1000?   0       flush
proxymap   unix  -       -       n       -       -       proxymap
proxywrite unix  -       -       n       -       1       proxymap
smtp       unix  -       -       n       -       -       smtp
relay      unix  -       -       n       -       -       smtp
showq      unix  n       -       n       -       -       showq
error      unix  -       -       n       -       -       error
retry      unix  -       -       n       -       -       error
discard    unix  -       -       n       -       -       discard
local      unix  -       n       n       -       -       local
virtual    unix  -       n       n       -       -       virtual
lmtp       unix  -       -       n       -       -       lmtp
anvil      unix  -       -       n       -       1       anvil
scache     unix  -       -       n       -       1       scache
postlog    unix-dgram n  -       n       -       1       postlogd
"""


def postfix_available() -> str:
    """Path of the ``postfix`` command, or skip the test (harness.which_peer)."""
    which_peer("postconf")
    return which_peer("postfix")


def listening(host: str, port: int) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def proc_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class PostfixInstance:
    """A private Postfix: ``PostfixInstance(relayhost="[127.0.0.1]:2525").start()``.

    ``port`` is its smtpd port on 127.0.0.1 (0: a free one). ``settings`` are extra
    main.cf parameters (``postconf -e`` syntax, values as strings). ``keep`` leaves the
    directory in place after :meth:`stop` (for debugging). ``parent``: where to make the
    instance's directory (default: the system's temporary directory); it must be
    reachable by the ``postfix`` user.
    """

    port: int = 0
    relayhost: str = ""
    mydestination: str = ""
    settings: dict[str, str] = field(default_factory=dict)
    hostname: str = "postfix.test"
    keep: bool = False
    parent: Path | None = None
    root: Path = field(init=False)
    started: bool = False

    def __post_init__(self) -> None:
        postfix_available()  # skip before making anything
        self.root = Path(tempfile.mkdtemp(prefix="tayori-postfix-", dir=self.parent))

    @property
    def config_dir(self) -> Path:
        return self.root / "etc"

    @property
    def queue_dir(self) -> Path:
        return self.root / "queue"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "maillog"

    def main_cf(self) -> dict[str, str]:
        """Every parameter this instance sets in its main.cf."""
        return {
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.root),
            "myhostname": self.hostname,
            "mydomain": "test",
            "myorigin": "$myhostname",
            "mydestination": self.mydestination,
            "relayhost": self.relayhost,
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtp_dns_support_level": "disabled",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "biff": "no",
            # Mail submitted over SMTP from loopback is "remote": no header rewriting, no
            # headers added; what the client sent is what Postfix relays.
            "local_header_rewrite_clients": "",
            # Try again soon after a failed delivery (tests restart the next hop).
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            **self.settings,
        }

    def configure(self) -> None:
        self.root.chmod(0o755)
        postfix = pwd.getpwnam("postfix")
        self.config_dir.mkdir(exist_ok=True)
        self.queue_dir.mkdir(mode=0o755, exist_ok=True)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        os.chown(self.data_dir, postfix.pw_uid, postfix.pw_gid)
        for name in ("main.cf", "dynamicmaps.cf"):
            if (POSTFIX_ETC / name).exists():
                shutil.copy(POSTFIX_ETC / name, self.config_dir / name)
        # Debian's "No configuration" install has no main.cf at all; postconf -e needs one,
        # and without compatibility_level smtpd refuses to start (no relay restrictions).
        if not (self.config_dir / "main.cf").exists():
            (self.config_dir / "main.cf").write_text("compatibility_level = 3.6\n")
        if (POSTFIX_ETC / "dynamicmaps.cf.d").is_dir():
            shutil.copytree(POSTFIX_ETC / "dynamicmaps.cf.d",
                            self.config_dir / "dynamicmaps.cf.d", dirs_exist_ok=True)
        if not self.port:
            self.port = free_port()
        smtpd = f"127.0.0.1:{self.port} inet n - n - - smtpd\n"
        (self.config_dir / "master.cf").write_text(smtpd + MASTER_SERVICES)
        self.postconf("-e", *(f"{k}={v}" for k, v in self.main_cf().items()))

    def postconf(self, *args: str) -> str:
        result = subprocess.run(["postconf", "-c", str(self.config_dir), *args],
                                capture_output=True, text=True, timeout=30, check=False)
        if result.returncode != 0:
            raise AssertionError(f"postconf {args}: {result.stderr}")
        return result.stdout

    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["postfix", "-c", str(self.config_dir), *args],
                                capture_output=True, text=True, timeout=60, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"postfix {' '.join(args)} exited {result.returncode}: "
                                 f"{result.stderr}{self.log()[-2000:]}")
        return result

    def start(self) -> PostfixInstance:
        self.configure()
        self._postfix("start")
        self.started = True
        self.wait_for(lambda: listening("127.0.0.1", self.port), timeout=30,
                      what=f"postfix to listen on {self.port}")
        self.wait_for(self.master_pid, what="postfix master.pid")
        return self

    def wait_for(self, condition: Callable[[], object], timeout: float = TIMEOUT,
                 interval: float = 0.02, what: str = "condition") -> object:
        """harness.wait_for, with the tail of Postfix's log in the failure."""
        try:
            return wait_for(condition, timeout=timeout, interval=interval, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; postfix log:\n{self.log()[-3000:]}") from None

    def master_pid(self) -> int | None:
        try:
            text = (self.queue_dir / "pid" / "master.pid").read_text().strip()
        except OSError:
            return None
        pid = int(text) if text.isdigit() else 0
        return pid if pid and proc_alive(pid) else None

    def stop(self) -> None:
        """Stop Postfix (``postfix stop``, then ``abort`` and SIGKILL if it lingers) and
        remove its directory unless ``keep``."""
        if self.started:
            pid = self.master_pid()
            self._postfix("stop", check=False)
            if pid is not None:
                try:
                    wait_for(lambda: not proc_alive(pid), timeout=20,
                             what="postfix master to exit")
                except AssertionError:
                    self._postfix("abort", check=False)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            self.started = False
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostfixInstance:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- looking at it ------------------------------------------------------------------

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def queue_files(self, dirs: Iterable[str] = QUEUE_DIRS) -> list[Path]:
        """The queue files in ``dirs`` (hashed subdirectories included)."""
        found: list[Path] = []
        for name in dirs:
            for parent, _subdirs, files in os.walk(self.queue_dir / name):
                found.extend(Path(parent) / f for f in files)
        return found

    def queue_size(self, dirs: Iterable[str] = QUEUE_DIRS) -> int:
        return len(self.queue_files(dirs))

    def wait_queue_empty(self, timeout: float = 60) -> None:
        self.wait_for(lambda: self.queue_size() == 0, timeout=timeout, interval=0.1,
                      what="postfix queue to empty")

    def processes(self) -> list[int]:
        """The master and all its descendants (the whole running Postfix)."""
        master = self.master_pid()
        return [master, *descendants(master)] if master else []

    # --- sending to it ------------------------------------------------------------------

    def client(self, timeout: float = TIMEOUT) -> Client:
        return Client("127.0.0.1", self.port, timeout)

    def sendmail(self, message: bytes, sender: str, recipients: list[str]) -> None:
        """Submit with Postfix's own ``sendmail -C DIR`` (local submission: Postfix may
        rewrite and add headers)."""
        subprocess.run(["sendmail", "-C", str(self.config_dir), "-i", "-f", sender, "--",
                        *recipients], input=message, check=True, timeout=60,
                       capture_output=True)


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = children(pid)
    while todo:
        child = todo.pop()
        out.append(child)
        todo.extend(children(child))
    return out


@dataclass
class SmtpSink:
    """``smtp-sink`` on 127.0.0.1:port; with ``dump_dir`` each message is written there
    (``-d``); with ``count`` the counter (``-c``) is printed. Accepts everything."""

    port: int = 0
    dump_dir: Path | None = None
    count: bool = True
    backlog: int = 256
    extra: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    output: Path | None = None
    final_output: str = ""

    def start(self) -> SmtpSink:
        program = which_peer("smtp-sink")
        if not self.port:
            self.port = free_port()
        args = [program, "-u", "nobody", *self.extra]
        if self.count:
            args.append("-c")
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            nobody = pwd.getpwnam("nobody")
            os.chown(self.dump_dir, nobody.pw_uid, nobody.pw_gid)
            args += ["-d", str(self.dump_dir) + "/%Y%m%d%H/%M."]
        args += [f"127.0.0.1:{self.port}", str(self.backlog)]
        handle, name = tempfile.mkstemp(prefix="smtp-sink-", suffix=".out")
        self.output = Path(name)
        with os.fdopen(handle, "wb") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        wait_for(self._up, what="smtp-sink to listen")
        return self

    def _up(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"smtp-sink exited {self.process.returncode}: "
                                 f"{self.text()}")
        return listening("127.0.0.1", self.port)

    def text(self) -> str:
        """What smtp-sink printed (kept after :meth:`stop`)."""
        if self.output is None:
            return self.final_output
        return self.output.read_text(errors="replace")

    def counter(self) -> int:
        """Messages received: the last ``mesg=N`` of the ``-c`` counter lines
        (``sess=S quit=Q mesg=N``)."""
        counts = re.findall(r"mesg=(\d+)", self.text())
        return int(counts[-1]) if counts else 0

    def dumped(self) -> list[Path]:
        if self.dump_dir is None:
            return []
        return sorted(p for p in self.dump_dir.rglob("*") if p.is_file())

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(15)
            self.process = None
        if self.output is not None:
            self.final_output = self.text()
            self.output.unlink(missing_ok=True)
            self.output = None

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def postfix_relay(port: int, settings: dict[str, str] | None = None,
                  keep: bool = False) -> Iterator[PostfixInstance]:
    """A running Postfix that relays everything it accepts to 127.0.0.1:port."""
    instance = PostfixInstance(relayhost=f"[127.0.0.1]:{port}", settings=settings or {},
                               keep=keep)
    try:
        yield instance.start()
    finally:
        instance.stop()

