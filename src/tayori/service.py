"""The running daemon: start-up, worker processes, privileges, signals, shutdown.

Takes: a config path (or None for the embedded default).
Promises: start-up in a safe order: validate the config, lock and recover the spool
(DESIGN §2.2), bind the listeners (privileged ports need root), start the privileged
delivery helper when root (:mod:`tayori.deliver.privileged`: mailboxes and commands as
their users), hand the spool to the unprivileged ``user`` and drop to it, then serve.
With ``workers`` above 1 the process becomes a supervisor that forks that many workers
(each with its own event loop, spool committer and index connection, all accepting on
the shared listening sockets; worker 0 also runs the queue manager, which delivers),
restarts a worker that dies, and forwards signals; workers die with the supervisor
(PR_SET_PDEATHSIG), so a killed tayori leaves nothing behind. SIGTERM/SIGINT drain: no
new connections, running sessions get ``limits.drain_timeout`` to finish, then exit 0.
SIGHUP re-reads the config; an invalid new config is logged and the old one kept.
Failure policy: a start-up problem (bad config, port in use, unknown user, unreadable TLS
file, spool in use) raises :class:`StartupError` with a one-line reason; the CLI prints
it and exits 1. A worker that keeps dying at start stops the whole service (exit 1).
Config keys: ``user``, ``workers``, ``log.*``, ``spool`` and, through the receiver, the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import signal
import time
import traceback
from collections.abc import Coroutine
from typing import Any

from tayori import maillog
from tayori.config import Config, ConfigError, load
from tayori.deliver import privileged
from tayori.deliver.dispatch import Dispatcher, Identity
from tayori.dns import DnsPythonResolver
from tayori.process import die_with_parent
from tayori.queue.manager import QueueManager
from tayori.queue.reports import ReportJob
from tayori.queue.spool import Spool, SpoolBusy
from tayori.receive.connections import ConnectionTable
from tayori.receive.listener import Receiver
from tayori.receive.tls import TlsSetupError

RESPAWN_WINDOW = 5.0      # a worker that dies sooner than this after its start...
MAX_QUICK_DEATHS = 3      # ...this many times in a row stops the service
HANDLED_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


class StartupError(Exception):
    pass


def run(config_path: str | None) -> int:
    """Run until SIGTERM. Returns the exit status."""
    config = load(config_path)
    maillog.configure(config.log.level, config.log.format, config.log.file)
    spool = Spool(config.spool)
    try:
        report = spool.prepare()
    except SpoolBusy as exc:
        raise StartupError(str(exc)) from None
    except OSError as exc:
        raise StartupError(f"cannot open the spool {config.spool}: {exc.strerror}") from None
    maillog.event("spool-recovered", spool=config.spool, removed_incoming=report.removed_incoming,
                  removed_unacknowledged=report.removed_orphans, requeued=report.requeued)
    for queue_id in report.corrupt:
        maillog.error("corrupt", queue_id=queue_id, reason="body file missing; kept in index")
    workers = config.workers or os.cpu_count() or 1
    try:
        receiver = Receiver(config, spool, ConnectionTable(workers))
        receiver.bind()
    except TlsSetupError as exc:
        spool.close()
        raise StartupError(str(exc)) from None
    except OSError as exc:
        spool.close()
        raise StartupError(f"cannot listen: {exc.strerror} ({exc.errno})") from None
    if os.geteuid() == 0:
        _start_privileged_helper(config)
    if config.user:
        drop_privileges(config.user, config.spool, config.log.file)
    if workers == 1:
        return _serve(receiver, spool, config_path, announce=True, deliver=True)
    return Supervisor(receiver, spool, config_path, workers).run()


def _serve(receiver: Receiver, spool: Spool, config_path: str | None, *, announce: bool,
           deliver: bool) -> int:
    """One event loop serving the listeners (and, in one worker, the queue manager)
    until SIGTERM, then draining."""
    spool.start()
    try:
        return _run_loop(_worker(receiver, config_path, announce, deliver))
    finally:
        spool.close()
        maillog.event("stopped", pid=os.getpid())


def _run_loop(main: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


async def _worker(receiver: Receiver, config_path: str | None, announce: bool,
                  deliver: bool) -> int:
    await receiver.serve()
    config = receiver.config
    manager = await _start_manager(config, receiver.spool) if deliver else None
    if announce:
        maillog.event("started", pid=os.getpid(), config=config.file, hostname=config.hostname)
    await _wait_for_signals(receiver, config_path, manager)
    if manager is None:
        await receiver.drain()
    else:
        await asyncio.gather(receiver.drain(),
                             manager.stop(receiver.config.limits.drain_timeout))
    return 0


async def _start_manager(config: Config, spool: Spool) -> QueueManager:
    resolver = DnsPythonResolver(config.dns.nameservers, timeout=config.dns.timeout)
    manager = QueueManager(config, spool, Dispatcher(config, resolver, Identity.of(config)),
                           reports=ReportJob(spool, resolver))
    await manager.start()
    return manager


class Supervisor:
    """Forks the workers, keeps them running, forwards signals, waits for the end."""

    def __init__(self, receiver: Receiver, spool: Spool, config_path: str | None,
                 count: int) -> None:
        self.receiver, self.spool, self.config_path = receiver, spool, config_path
        self.count = count
        self.children: dict[int, tuple[int, float]] = {}  # pid -> (worker, started at)
        self.stopping = False
        self.quick_deaths = 0

    def run(self) -> int:
        for worker in range(self.count):
            self._spawn(worker)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        config = self.receiver.config
        maillog.event("started", pid=os.getpid(), config=config.file, hostname=config.hostname,
                      workers=self.count)
        status = 0
        while self.children:
            try:
                pid, wait_status = os.wait()
            except ChildProcessError:
                break
            if self._reap(pid, wait_status):
                status = 1
        self.receiver.close_sockets()
        self.spool.close()
        maillog.event("stopped", pid=os.getpid())
        return status

    def _spawn(self, worker: int) -> None:
        # The worker starts with these signals blocked and unblocks them once its event
        # loop handles them: a signal in between must wait, not kill it.
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        pid = os.fork()
        if pid:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
            self.children[pid] = (worker, time.monotonic())
            return
        code = 1
        try:
            for signum in HANDLED_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            die_with_parent()
            self.receiver.connections.worker = worker
            code = _serve(self.receiver, self.spool, self.config_path, announce=False,
                          deliver=worker == 0)
        except BaseException:
            maillog.error("worker-failed", worker=worker, detail=traceback.format_exc(limit=8))
        finally:
            os._exit(code)

    def _reap(self, pid: int, wait_status: int) -> bool:
        """Handle one child's exit; True when the service must stop with an error."""
        entry = self.children.pop(pid, None)
        if entry is None:
            if pid == privileged.helper_pid() and not self.stopping:
                maillog.error("privileged-helper-died",
                              status=os.waitstatus_to_exitcode(wait_status),
                              effect="mail for other accounts waits (451 4.3.5) until "
                                     "tayori is restarted")
            return False
        worker, started = entry
        self.receiver.connections.clear(worker)
        if self.stopping:
            return False
        maillog.error("worker-died", worker=worker, pid=pid,
                      status=os.waitstatus_to_exitcode(wait_status))
        quick = time.monotonic() - started < RESPAWN_WINDOW
        self.quick_deaths = self.quick_deaths + 1 if quick else 0
        if self.quick_deaths >= MAX_QUICK_DEATHS:
            maillog.error("stopping", reason="workers keep dying at start")
            self._on_stop(signal.SIGTERM, None)
            return True
        self._spawn(worker)
        return False

    def _on_stop(self, signum: int, frame: object) -> None:
        self.stopping = True
        self.receiver.close_sockets()  # so that nothing new is accepted anywhere
        self._forward(signal.SIGTERM)

    def _on_reload(self, signum: int, frame: object) -> None:
        try:
            load(self.config_path)
        except ConfigError as exc:
            maillog.error("reload-failed", reason=str(exc), kept="previous configuration")
            return
        self._forward(signal.SIGHUP)

    def _forward(self, signum: int) -> None:
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)


async def _wait_for_signals(receiver: Receiver, config_path: str | None,
                            manager: QueueManager | None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, receiver, config_path, manager)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)  # see Supervisor._spawn
    try:
        await stop.wait()
    finally:
        for signum in HANDLED_SIGNALS:
            loop.remove_signal_handler(signum)
    maillog.event("stopping", reason="signal")


def _reload(receiver: Receiver, config_path: str | None, manager: QueueManager | None) -> None:
    try:
        config = load(config_path)
        receiver.reload(config)
        if manager is not None:
            manager.update(config)
    except (ConfigError, TlsSetupError, OSError) as exc:
        maillog.error("reload-failed", reason=str(exc), kept="previous configuration")
        return
    try:
        maillog.configure(config.log.level, config.log.format, config.log.file)
    except OSError as exc:
        maillog.error("reload-failed", reason=f"log file: {exc}", kept="previous log settings")
    maillog.event("reloaded", config=config.file)


def _start_privileged_helper(config: Config) -> None:
    """Root: the helper that writes mailboxes and runs commands as their users, for
    tayori's processes once they run as ``user`` (or as root)."""
    client_uid = 0
    if config.user:
        with contextlib.suppress(KeyError):   # an unknown user fails in drop_privileges
            client_uid = pwd.getpwnam(config.user).pw_uid
    try:
        pid = privileged.start(config.spool, client_uid)
    except OSError as exc:
        raise StartupError(f"cannot start the privileged delivery helper: {exc}") from None
    maillog.event("privileged-helper-started", pid=pid)


def drop_privileges(user: str, spool_dir: str, log_file: str) -> None:
    """Give the spool (and log file) to ``user`` and become it. A no-op unless root."""
    if os.getuid() != 0:
        return
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise StartupError(f"user {user!r} does not exist (config key: user)") from None
    for root, dirs, files in os.walk(spool_dir):
        for name in [*dirs, *files]:
            with contextlib.suppress(FileNotFoundError):
                os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)
    for path in (spool_dir, log_file):
        if path:
            os.chown(path, entry.pw_uid, entry.pw_gid)
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    maillog.event("privileges-dropped", user=user, uid=entry.pw_uid)
