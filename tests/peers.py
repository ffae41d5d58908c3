"""Real peers for tests and benchmarks: Postfix, smtp-sink, Dovecot LMTP and IMAP, unbound.

``PostfixInstance`` runs a whole Postfix (master, smtpd, cleanup, qmgr, smtp...) from
the Debian package with its own configuration directory, queue and log under a fresh
temporary directory. It listens only on the 127.0.0.1 port it is given, resolves
nothing (``smtp_dns_support_level = disabled``) and, given a ``relayhost``, sends
everything it accepts there. ``SmtpSink`` runs Postfix's ``smtp-sink`` test server.
``DovecotLmtp`` is a private Dovecot delivering over LMTP (TCP and a unix socket) into
Maildirs with quotas, ``DovecotImap`` one serving IMAP over Maildirs that tests fill
(both :class:`DovecotInstance`); ``Unbound`` a DNS server answering only for the test's
own zones. Each has its own directory from :func:`tempfile.mkdtemp` and a log file, and its
class docstring lists what was learnt making it work; what they share (starting and waiting,
the log in a failure, stopping, ``with``) is :class:`PrivateDaemon`. (The scriptable SMTP/LMTP
peer lives in the package: :mod:`tayori.testing.peer`.)

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
import imaplib
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
from typing import Any, ClassVar, Self

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


def stop_process(process: subprocess.Popen[bytes], timeout: float = 15) -> int:
    """SIGTERM, then SIGKILL if the process lingers; its exit status."""
    if process.poll() is None:
        process.terminate()
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait(timeout)


def tail(path: Path, size: int = 3000) -> str:
    """The end of a log file ("" when it does not exist)."""
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError:
        return ""


def unix_listening(path: Path) -> bool:
    """True when something accepts connections on the unix socket ``path``."""
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(1)
            sock.connect(str(path))
            return True
    except OSError:
        return False


@dataclass
class PrivateDaemon:
    """What every private daemon here shares (:mod:`peers_auth`'s too); a base class.

    :attr:`root` is the daemon's own directory, made by the subclass's ``__post_init__``
    with :func:`tempfile.mkdtemp` once it knows the program is installed (a missing one
    skips the test first). :meth:`spawn` runs the daemon in the foreground as
    :attr:`process`, its output appended to ``<root>/stderr.log``, and waits until
    :meth:`ready`, failing at once if the process exits. :meth:`wait_for` is
    harness.wait_for with the end of :meth:`log` (by default that output; a subclass with
    its own log file says so) in the failure, which :attr:`label` names. :meth:`halt`
    stops the daemon (SIGTERM, then SIGKILL, to :attr:`process`; a daemon that detaches
    overrides it) and :meth:`stop` also removes the directory unless ``keep``;
    ``with Daemon(...) as daemon`` starts it and stops it. ``keep`` is keyword-only, so
    that a subclass's own fields keep their positions (``Slapd(users)``).
    """

    label: ClassVar[str] = "daemon"

    keep: bool = field(default=False, kw_only=True)
    root: Path = field(init=False)
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> Self:
        raise NotImplementedError

    def ready(self) -> bool:
        """True once the daemon serves (its listeners accept connections)."""
        raise NotImplementedError

    def spawn(self, args: list[str], what: str, output: Path | None = None,
              **popen: Any) -> None:
        """Run ``args`` as :attr:`process`, stdout and stderr appended to ``output``
        (default ``<root>/stderr.log``; ``popen``: more Popen arguments), and wait for
        :meth:`ready`."""
        with open(output or self.root / "stderr.log", "ab") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                            **popen)
        self.wait_for(self._up, what=what)

    def _up(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"{self.label} exited {self.process.returncode}")
        return self.ready()

    def wait_for(self, condition: Callable[[], object], timeout: float = TIMEOUT,
                 interval: float = 0.02, what: str = "condition") -> object:
        """harness.wait_for, with the end of the daemon's log in the failure."""
        try:
            return wait_for(condition, timeout=timeout, interval=interval, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; {self.label} log:\n{self.log()[-6000:]}") from None

    def log(self) -> str:
        """The end of its output (``<root>/stderr.log``)."""
        return tail(self.root / "stderr.log")

    def halt(self) -> None:
        """Stop the daemon; its directory stays."""
        if self.process is not None:
            stop_process(self.process)
            self.process = None

    def stop(self) -> None:
        """Stop the daemon and remove its directory unless ``keep``."""
        self.halt()
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class PostfixInstance(PrivateDaemon):
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
    parent: Path | None = None
    started: bool = False

    label: ClassVar[str] = "postfix"

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

    def start(self) -> Self:
        self.configure()
        self._postfix("start")
        self.started = True
        self.wait_for(lambda: listening("127.0.0.1", self.port), timeout=30,
                      what=f"postfix to listen on {self.port}")
        self.wait_for(self.master_pid, what="postfix master.pid")
        return self

    def master_pid(self) -> int | None:
        try:
            text = (self.queue_dir / "pid" / "master.pid").read_text().strip()
        except OSError:
            return None
        pid = int(text) if text.isdigit() else 0
        return pid if pid and proc_alive(pid) else None

    def halt(self) -> None:
        """Stop Postfix (``postfix stop``, then ``abort`` and SIGKILL if it lingers):
        it detaches, so there is no :attr:`process`, only its master's pid file."""
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

    # --- looking at it ------------------------------------------------------------------

    def log(self) -> str:
        """The whole maillog (:meth:`wait_for` shows its end)."""
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
class SmtpSink(PrivateDaemon):
    """``smtp-sink`` on 127.0.0.1:port; with ``dump_dir`` each message is written there
    (``-d``); with ``count`` the counter (``-c``) is printed. Accepts everything. What it
    prints goes to ``<root>/stderr.log`` (:meth:`text`)."""

    port: int = 0
    dump_dir: Path | None = None
    count: bool = True
    backlog: int = 256
    extra: list[str] = field(default_factory=list)
    final_output: str = ""

    label: ClassVar[str] = "smtp-sink"

    def __post_init__(self) -> None:
        which_peer("smtp-sink")
        self.root = Path(tempfile.mkdtemp(prefix="tayori-smtp-sink-"))

    def start(self) -> Self:
        if not self.port:
            self.port = free_port()
        args = [which_peer("smtp-sink"), "-u", "nobody", *self.extra]
        if self.count:
            args.append("-c")
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            nobody = pwd.getpwnam("nobody")
            os.chown(self.dump_dir, nobody.pw_uid, nobody.pw_gid)
            args += ["-d", str(self.dump_dir) + "/%Y%m%d%H/%M."]
        args += [f"127.0.0.1:{self.port}", str(self.backlog)]
        self.spawn(args, what="smtp-sink to listen")
        return self

    def ready(self) -> bool:
        return listening("127.0.0.1", self.port)

    def text(self) -> str:
        """What smtp-sink printed (kept after :meth:`stop`)."""
        try:
            return (self.root / "stderr.log").read_text(errors="replace")
        except OSError:
            return self.final_output

    def counter(self) -> int:
        """Messages received: the last ``mesg=N`` of the ``-c`` counter lines
        (``sess=S quit=Q mesg=N``)."""
        counts = re.findall(r"mesg=(\d+)", self.text())
        return int(counts[-1]) if counts else 0

    def dumped(self) -> list[Path]:
        if self.dump_dir is None:
            return []
        return sorted(p for p in self.dump_dir.rglob("*") if p.is_file())

    def halt(self) -> None:
        super().halt()
        self.final_output = self.text()


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


@dataclass
class DovecotDaemon(PrivateDaemon):
    """A private Dovecot master, ``dovecot -F -c <root>/dovecot.conf``: what
    :class:`DovecotInstance` and :mod:`peers_auth`'s ``DovecotAuthServer`` share.

    Its sockets, state and log (:attr:`log_path`) are in :attr:`root` under an instance
    name of its own (:meth:`config_lines`), so several run side by side; ``settings``
    (keyword-only) are extra top-level dovecot.conf lines (``key = value``), applied last.
    """

    settings: dict[str, str] = field(default_factory=dict, kw_only=True)

    label: ClassVar[str] = "dovecot"

    @property
    def config_path(self) -> Path:
        return self.root / "dovecot.conf"

    @property
    def log_path(self) -> Path:
        return self.root / "dovecot.log"

    def config_lines(self, own: dict[str, str]) -> str:
        """The top-level settings: where it keeps its files, listening on 127.0.0.1 only,
        no SSL, the Debian service users; then the subclass's ``own``, then
        ``settings``."""
        root = self.root
        settings = {
            "base_dir": str(root / "run"),
            "state_dir": str(root / "state"),
            "instance_name": f"tayori-{root.name}",
            "log_path": str(self.log_path),
            "listen": "127.0.0.1",
            "ssl": "no",
            "default_internal_user": "dovecot",
            "default_login_user": "dovenull",
            **own,
            **self.settings,
        }
        return "\n".join(f"{key} = {value}" for key, value in settings.items())

    def run(self, what: str) -> None:
        """Start the master (:meth:`PrivateDaemon.spawn`) on :attr:`config_path`."""
        self.spawn([which_peer("dovecot"), "-F", "-c", str(self.config_path)], what=what)

    def log(self) -> str:
        return super().log() + tail(self.log_path)


@dataclass
class DovecotInstance(DovecotDaemon):
    """A private Dovecot serving LMTP and/or IMAP (:attr:`protocols`) over Maildirs under
    ``<root>/mail/<domain>/<user>`` (``mail_location = maildir:<root>/mail/%d/%n``,
    :meth:`maildir`). Use :class:`DovecotLmtp` or :class:`DovecotImap`.

    LMTP listens on 127.0.0.1:``port`` (0: a free one) and on the unix socket
    :attr:`socket_path`; IMAP on 127.0.0.1:``imap_port``, plaintext LOGIN allowed.
    ``users`` maps each address to its quota (a Dovecot ``quota_rule`` storage value such
    as ``"1K"``; None: ``default_quota``); every user's password is :attr:`password`.
    Unknown users get ``550 5.1.1`` over LMTP. Mail is stored as the ``mail`` system user
    (:attr:`owner`). ``quota_tempfail`` turns the over-quota reply temporary;
    ``settings`` are extra top-level dovecot.conf lines (``key = value``).

    What was found to work here (Dovecot 2.3.19, Debian 12, as root, no systemd/syslog):

    - ``dovecot -F -c CONF`` runs the master in the foreground (a child process the
      fixture can stop with SIGTERM, which stops all of Dovecot's processes); ``-c``
      reads only that file, nothing from /etc/dovecot. ``base_dir`` (sockets, pid file),
      ``state_dir`` and ``log_path`` all point into the instance's directory, so
      several instances run side by side; there is no syslog, so ``log_path`` is a file.
      The directory is made with :func:`tempfile.mkdtemp` and opened to mode 0755:
      Dovecot's unprivileged processes (``dovecot``, ``dovenull``, ``mail``) must reach it.
    - The users have a static uid/gid (``mail``, 8), below Dovecot's default
      ``first_valid_uid`` (500): it is lowered, or every RCPT gets ``451 4.3.0 Temporary
      internal error`` ("Mail access for users with UID 8 not permitted" in the log).
    - The ``auth`` service wants a passdb besides the userdb even though LMTP only looks
      users up ("No passdbs specified ... PLAIN mechanism needs one", and again 451 4.3.0
      to every RCPT): the same passwd-file serves as both (and IMAP's LOGIN uses it).
    - ``ssl = no``: the built-in default logs "Can't load SSL certificate" on every
      connection (it still works, with SSL disabled).
    - The over-quota reply comes after the data, per recipient, while the others in the
      same transaction are delivered: ``552 5.2.2 <u3@lmtp.test> Quota exceeded (mailbox
      for user is full)``; with ``quota_full_tempfail = yes`` it is ``452 4.2.2``. RCPT
      is accepted (``lmtp_rcpt_check_quota`` is off by default).
    - A per-user quota is the ``userdb_quota_rule`` extra field of the passwd-file line.
    - The stored file is not the bytes sent: Dovecot prepends ``Return-Path``,
      ``Delivered-To`` and ``Received`` headers and stores LF line ends
      (``mail_save_crlf = no``); :meth:`messages` returns the files as stored.
    - IMAP needs Debian's ``dovecot-imapd`` (``/usr/lib/dovecot/imap`` and
      ``imap-login``), not part of dovecot-core; without it the tests skip.
      Dovecot counts a connection to 127.0.0.1 from 127.0.0.1 as "secured" (its log
      says so), so plaintext LOGIN works there whatever ``disable_plaintext_auth`` says;
      it is set to ``no`` all the same, so that LOGIN without TLS is allowed on purpose,
      not by that rule. No ``namespace`` block is needed: Dovecot makes the
      default INBOX namespace, Maildir++ layout, ``.`` as the hierarchy separator, so the
      folder ``.Lists`` is the IMAP mailbox ``Lists``.
    - Dovecot checks a Maildir file name's ``W=`` (the size with CRLF line ends) when it
      reads the file: a wrong one fails the FETCH, is logged ("Maildir filename has
      wrong W value") and the file is renamed without it. :meth:`log` shows that.
    """

    protocols: tuple[str, ...] = ("lmtp",)
    port: int = 0
    imap_port: int = 0
    users: dict[str, str | None] = field(default_factory=lambda: {
        "u1@lmtp.test": None, "u2@lmtp.test": None, "u3@lmtp.test": "1K"})
    password: str = "secret"
    default_quota: str = "10M"
    quota_tempfail: bool = False
    hostname: str = "lmtp.test"

    def __post_init__(self) -> None:
        which_peer("dovecot")
        programs = {"lmtp": ("lmtp",), "imap": ("imap", "imap-login")}
        for protocol in self.protocols:
            for program in programs[protocol]:
                if not Path(f"/usr/lib/dovecot/{program}").exists():
                    import pytest

                    pytest.skip(f"dovecot's {program} is not installed (Debian's "
                                f"dovecot-{protocol}d; scripts/install-peers installs it)")
        self.root = Path(tempfile.mkdtemp(prefix="tayori-dovecot-"))

    @property
    def address(self) -> tuple[str, int]:
        """LMTP's TCP address."""
        return "127.0.0.1", self.port

    @property
    def imap_address(self) -> tuple[str, int]:
        return "127.0.0.1", self.imap_port

    @property
    def socket_path(self) -> Path:
        return self.root / "lmtp.sock"

    @property
    def owner(self) -> tuple[int, int]:
        """The uid and gid the mail belongs to (the ``mail`` user)."""
        mail = pwd.getpwnam("mail")
        return mail.pw_uid, mail.pw_gid

    def maildir(self, user: str) -> Path:
        local, _, domain = user.partition("@")
        return self.root / "mail" / domain / local

    def config_text(self) -> str:
        root = self.root
        settings = self.config_lines({
            "protocols": " ".join(self.protocols),
            "hostname": self.hostname,
            "disable_plaintext_auth": "no",
            "first_valid_uid": "1",
            "mail_location": f"maildir:{root}/mail/%d/%n",
            "mail_plugins": "quota",
            "quota_full_tempfail": "yes" if self.quota_tempfail else "no",
        })
        users = root / "users"
        services = {
            "lmtp": f"""service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.port}
  }}
  unix_listener {self.socket_path} {{
    mode = 0666
  }}
}}
""",
            "imap": f"""service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
""",
        }
        return settings + f"""
passdb {{
  driver = passwd-file
  args = {users}
}}
userdb {{
  driver = passwd-file
  args = {users}
}}
plugin {{
  quota = maildir:User quota
  quota_rule = *:storage={self.default_quota}
}}
""" + "".join(services[protocol] for protocol in self.protocols)

    def users_text(self) -> str:
        uid, gid = self.owner
        lines = []
        for user, quota in self.users.items():
            extra = f"userdb_quota_rule=*:storage={quota}" if quota else ""
            home = self.root / "home" / user
            lines.append(f"{user}:{{PLAIN}}{self.password}:{uid}:{gid}::{home}::{extra}")
        return "\n".join(lines) + "\n"

    def configure(self) -> None:
        self.root.chmod(0o755)
        for name in ("mail", "home"):
            (self.root / name).mkdir(exist_ok=True)
            os.chown(self.root / name, *self.owner)
        if "lmtp" in self.protocols and not self.port:
            self.port = free_port()
        if "imap" in self.protocols and not self.imap_port:
            self.imap_port = free_port()
        (self.root / "users").write_text(self.users_text())
        self.config_path.write_text(self.config_text())

    def start(self) -> Self:
        self.configure()
        self.run(f"dovecot to listen ({', '.join(self.protocols)})")
        return self

    def ready(self) -> bool:
        if "lmtp" in self.protocols and not (listening("127.0.0.1", self.port)
                                             and unix_listening(self.socket_path)):
            return False
        return "imap" not in self.protocols or listening("127.0.0.1", self.imap_port)

    def messages(self, user: str) -> list[bytes]:
        """The messages delivered to ``user``'s INBOX, oldest first, as stored."""
        maildir = self.maildir(user)
        files = [path for sub in ("new", "cur") if (maildir / sub).is_dir()
                 for path in (maildir / sub).iterdir() if path.is_file()]
        files.sort(key=lambda path: (path.stat().st_mtime_ns, path.name))
        return [path.read_bytes() for path in files]


@dataclass
class DovecotLmtp(DovecotInstance):
    """A private Dovecot LMTP server: ``with DovecotLmtp() as lmtp: lmtp.address``.

    The default users are u1..u3@lmtp.test, u3 with a 1 KiB quota. See
    :class:`DovecotInstance` for the options and what was learnt making it work.
    """


RecordValue = str | tuple[int, str]


@dataclass
class Unbound(PrivateDaemon):
    """A real DNS server (unbound from Debian) answering for a few test zones only.

    ``records`` maps owner names to record types to values::

        Unbound({"example.test": {"MX": [(10, "mx1.example.test")]},
                 "mx1.example.test": {"A": ["127.0.0.2"], "AAAA": ["::1"]}})

    MX values are ``(preference, host)``; TXT values are the text (quoted and split into
    255-octet strings here); CNAME/NS/PTR targets are names; anything else is the rdata
    in zone-file syntax. ``zones`` are the ``static`` local zones (default: the last two
    labels of each owner name): a name inside them that has no data is NXDOMAIN (or
    NODATA), and every name outside them is REFUSED (``local-zone: "." refuse``), so
    unbound never recurses and never sends a query anywhere; except that unbound's
    built-in special-use zones still answer as they do by default (``localhost`` is
    127.0.0.1, any other name under ``test.``/``invalid.``/``onion.`` is NXDOMAIN, a
    realistic "no such domain"). UDP and TCP on
    127.0.0.1:``port`` (0: a free one). :attr:`nameserver` is the ``HOST:PORT`` string
    for tayori's ``dns.nameservers``.

    What was found to work here (unbound 1.17, Debian 12, as root, no systemd/syslog):

    - ``unbound -d -c CONF`` stays in the foreground; ``logfile`` takes the log once the
      config is read (the first lines still go to stderr). ``username: ""`` and
      ``chroot: ""`` keep it from dropping to the ``unbound`` user or chrooting into
      /etc/unbound, where it could not read the instance's files.
    - ``module-config: "iterator"`` leaves the validator out, so no trust anchor file
      (Debian's /var/lib/unbound/root.key) is needed; ``remote-control`` is off, so no
      control keys either. Nothing from /etc/unbound is read.
    - Debian's unbound package starts no daemon when policy-rc.d says no and systemd is
      absent; scripts/install-peers checks that none is left running.
    """

    records: dict[str, dict[str, list[RecordValue]]] = field(default_factory=dict)
    zones: list[str] | None = None
    port: int = 0
    ttl: int = 300
    final_log: str = ""

    label: ClassVar[str] = "unbound"

    def __post_init__(self) -> None:
        which_peer("unbound")
        self.root = Path(tempfile.mkdtemp(prefix="tayori-unbound-"))

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.root / "unbound.conf"

    @property
    def log_path(self) -> Path:
        return self.root / "unbound.log"

    def zone_names(self) -> list[str]:
        if self.zones is not None:
            return [zone.rstrip(".").lower() for zone in self.zones]
        return sorted({".".join(name.rstrip(".").lower().split(".")[-2:])
                       for name in self.records})

    def local_data(self) -> list[str]:
        """The ``local-data`` lines for :attr:`records`."""
        lines = []
        for name, types in self.records.items():
            for rtype, values in types.items():
                for value in values:
                    rdata = _rdata(rtype.upper(), value)
                    record = f"{_fqdn(name)} {self.ttl} IN {rtype.upper()} {rdata}"
                    quote = "'" if '"' in record else '"'
                    if (quote == "'" and "'" in record) or "\n" in record:
                        raise ValueError(f"cannot quote record {record!r}")
                    lines.append(f"  local-data: {quote}{record}{quote}")
        return lines

    def config_text(self) -> str:
        root = self.root
        zones = [f'  local-zone: "{zone}." static' for zone in self.zone_names()]
        return "\n".join([
            "server:",
            f"  interface: 127.0.0.1@{self.port}",
            "  do-daemonize: no",
            '  chroot: ""',
            '  username: ""',
            f'  directory: "{root}"',
            f'  pidfile: "{root}/unbound.pid"',
            f'  logfile: "{self.log_path}"',
            "  use-syslog: no",
            "  verbosity: 1",
            "  do-ip6: no",
            "  access-control: 127.0.0.0/8 allow",
            '  module-config: "iterator"',
            '  local-zone: "." refuse',
            *zones,
            *self.local_data(),
            "remote-control:",
            "  control-enable: no",
            "",
        ])

    def start(self) -> Self:
        if not self.port:
            self.port = free_port()
        self.config_path.write_text(self.config_text())
        self.spawn([which_peer("unbound"), "-d", "-c", str(self.config_path)],
                   what=f"unbound to listen on {self.port}")
        return self

    def ready(self) -> bool:
        return listening("127.0.0.1", self.port)

    def log(self) -> str:
        """Its log so far (after :meth:`stop`: the whole log, with the query counters
        unbound writes on exit, e.g. ``7 queries, 7 answers from cache, 0 recursions``)."""
        if self.process is None and self.final_log:
            return self.final_log
        return super().log() + tail(self.log_path)

    def halt(self) -> None:
        if self.process is not None:
            super().halt()
            self.final_log = self.log()


def _fqdn(name: str) -> str:
    return name if name.endswith(".") else name + "."


def _rdata(rtype: str, value: RecordValue) -> str:
    if isinstance(value, tuple):
        preference, host = value
        return f"{preference} {_fqdn(host)}"
    if rtype == "TXT":  # ASCII text: one character, one octet
        pieces = [value[i:i + 255] for i in range(0, len(value), 255)] or [""]
        return " ".join('"' + p.replace("\\", "\\\\").replace('"', '\\"') + '"'
                        for p in pieces)
    if rtype in ("CNAME", "NS", "PTR"):
        return _fqdn(value)
    return value


@dataclass(frozen=True)
class SourceRun:
    returncode: int
    counter: int
    stderr: str


def smtp_source(port: int, *args: str, timeout: float = 240) -> SourceRun:
    """Postfix's smtp-source against 127.0.0.1:port, with its counter (``-c``)."""
    program = which_peer("smtp-source")
    result = subprocess.run([program, "-c", *args, f"127.0.0.1:{port}"], capture_output=True,
                            timeout=timeout, check=False)
    numbers = [p for p in result.stdout.decode().replace("\r", "\n").split() if p.isdigit()]
    return SourceRun(result.returncode, int(numbers[-1]) if numbers else 0,
                     result.stderr.decode(errors="replace"))


@dataclass(frozen=True)
class ImapMessage:
    """One message as IMAP FETCH gives it: its UID, RFC822.SIZE and BODY[] (CRLF)."""

    uid: int
    size: int
    body: bytes


@dataclass
class DovecotImap(DovecotInstance):
    """A private Dovecot IMAP server over Maildirs that tests fill themselves::

        with DovecotImap() as imap:
            maildir.deliver(str(imap.maildir(user)), path, ..., owner=imap.owner)
            [message] = imap.fetch(user)

    IMAP on 127.0.0.1:``imap_port`` (0: a free one), plaintext LOGIN allowed (loopback
    only, no TLS); users u1 and u2@imap.test, password :attr:`password`; each user's
    Maildir is :meth:`maildir` (``<root>/mail/<domain>/<user>``), owned by :attr:`owner`.
    See :class:`DovecotInstance` for what was learnt making it work.
    """

    protocols: tuple[str, ...] = ("imap",)
    users: dict[str, str | None] = field(default_factory=lambda: {
        "u1@imap.test": None, "u2@imap.test": None})
    hostname: str = "imap.test"

    def login(self, user: str) -> imaplib.IMAP4:
        """An IMAP connection logged in as ``user`` (LOGIN); the caller logs out."""
        client = imaplib.IMAP4(*self.imap_address, timeout=TIMEOUT)
        try:
            client.login(user, self.password)
        except BaseException:
            client.shutdown()
            raise
        return client

    def mailboxes(self, user: str) -> list[str]:
        """The names IMAP LIST gives for ``user`` (INBOX and the Maildir++ folders)."""
        client = self.login(user)
        try:
            status, lines = client.list()
            assert status == "OK", lines
        finally:
            client.logout()
        names = []
        for line in lines:
            assert isinstance(line, bytes), line
            # (\\HasNoChildren) "." Lists   or   ... "." "with space"
            match = re.fullmatch(rb'\((.*?)\) (?:"[^"]*"|NIL) (.+)', line)
            assert match, line
            names.append(match.group(2).decode().strip('"'))
        return names

    def fetch(self, user: str, mailbox: str = "INBOX") -> list[ImapMessage]:
        """Every message of ``user``'s ``mailbox`` in UID order, read with EXAMINE and
        FETCH (UID RFC822.SIZE BODY.PEEK[]): nothing is marked seen or moved."""
        client = self.login(user)
        try:
            status, data = client.select(mailbox, readonly=True)
            assert status == "OK", data
            if int(data[0] or 0) == 0:
                return []
            status, data = client.fetch("1:*", "(UID RFC822.SIZE BODY.PEEK[])")
            assert status == "OK", data
        finally:
            client.logout()
        messages = []
        for item in data:
            if not isinstance(item, tuple):
                continue   # the closing b")" of each response
            head, body = item
            uid = re.search(rb"UID (\d+)", head)
            size = re.search(rb"RFC822\.SIZE (\d+)", head)
            assert uid and size, head
            messages.append(ImapMessage(int(uid.group(1)), int(size.group(1)), body))
        return sorted(messages, key=lambda message: message.uid)
