"""The running daemon: start-up, privileges, signals, shutdown.

Takes: a config path (or None for the embedded default).
Promises: start-up in a safe order: validate the config, open the spool (recovering it
after a crash, DESIGN §2.2), bind the listeners (privileged ports need root), prepare the
spool for the unprivileged ``user`` and drop to it, then serve. SIGTERM/SIGINT drain:
no new connections, running sessions get ``limits.drain_timeout`` to finish, then the
spool is closed and the process exits 0. SIGHUP re-reads the config; an invalid new config
is logged and the old one kept.
Failure policy: a start-up problem (bad config, port in use, unknown user, unreadable TLS
file) raises :class:`StartupError` with a one-line reason; the CLI prints it and exits 1.
Config keys: ``user``, ``log.*``, ``spool`` and, through the receiver, the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import signal

from tayori import maillog
from tayori.config import Config, ConfigError, load
from tayori.queue.spool import Spool, SpoolBusy
from tayori.receive.listener import Receiver
from tayori.receive.tls import TlsSetupError


class StartupError(Exception):
    pass


def run(config_path: str | None) -> int:
    """Run until SIGTERM. Returns the exit status."""
    config = load(config_path)
    maillog.configure(config.log.level, config.log.format, config.log.file)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_main(config, config_path))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_main(config, config_path))


async def _main(config: Config, config_path: str | None) -> int:
    spool = Spool(config.spool)
    try:
        report = spool.open()
    except SpoolBusy as exc:
        raise StartupError(str(exc)) from None
    except OSError as exc:
        raise StartupError(f"cannot open the spool {config.spool}: {exc.strerror}") from None
    maillog.event("spool-recovered", spool=config.spool, removed_incoming=report.removed_incoming,
                  removed_unacknowledged=report.removed_orphans, requeued=report.requeued)
    for queue_id in report.corrupt:
        maillog.error("corrupt", queue_id=queue_id, reason="body file missing; kept in index")
    try:
        receiver = Receiver(config, spool)
        receiver.bind()
    except TlsSetupError as exc:
        spool.close()
        raise StartupError(str(exc)) from None
    except OSError as exc:
        spool.close()
        raise StartupError(f"cannot listen: {exc.strerror} ({exc.errno})") from None
    try:
        if config.user:
            drop_privileges(config.user, config.spool, config.log.file)
        await receiver.serve()
        maillog.event("started", pid=os.getpid(), config=config.file, hostname=config.hostname)
        await _wait_for_signals(receiver, config_path)
        await receiver.drain()
    finally:
        spool.close()
    maillog.event("stopped", pid=os.getpid())
    return 0


async def _wait_for_signals(receiver: Receiver, config_path: str | None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, receiver, config_path)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
    maillog.event("stopping", reason="signal")


def _reload(receiver: Receiver, config_path: str | None) -> None:
    try:
        config = load(config_path)
        receiver.reload(config)
    except (ConfigError, TlsSetupError, OSError) as exc:
        maillog.error("reload-failed", reason=str(exc), kept="previous configuration")
        return
    try:
        maillog.configure(config.log.level, config.log.format, config.log.file)
    except OSError as exc:
        maillog.error("reload-failed", reason=f"log file: {exc}", kept="previous log settings")
    maillog.event("reloaded", config=config.file)


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
