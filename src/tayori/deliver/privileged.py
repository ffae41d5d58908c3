"""The privileged delivery helper: mailbox writes, file appends, ``.forward`` reads and
commands done as the system user they belong to, while tayori itself runs as ``user``.

Takes: :func:`start` is called by the service while it is still root, before it drops
privileges (config ``user``; also when it keeps running as root, for the operations
that must run as another user). Requests come from tayori's own processes through the
client functions below (:func:`write_maildir`, :func:`append_file`, :func:`read_file`)
and from pipe deliveries (:func:`exec_request`, sent by :mod:`tayori.deliver.pipe`).

Promises:
- Two small processes stay root. The keeper holds the listening socket, an abstract
  unix socket named after the spool (nothing on disk), so that the name stays tayori's,
  and runs the server in a child, started again (logged ``privileged-helper-died``)
  whenever it dies. The server accepts a connection only from a process running as
  tayori's user or as root (``SO_PEERCRED``; others are closed unread) and forks a child
  per request; neither parses a request. A failure while accepting (``fork`` refused
  with ``EAGAIN`` or ``ENOMEM``, ``EMFILE``...) drops that one connection (the client
  answers 451) and is logged; the server goes on.
- The clients check that root serves the socket (``SO_PEERCRED`` of the server) before
  they send anything: should both helper processes be gone, a local user who binds the
  name gets no spool descriptor and cannot fake an answer; the request fails
  (:class:`HelperUnavailable`, logged ``privileged-helper-unavailable``) and mail waits.
- The child serves the request, one datagram with the spool body's descriptor
  attached (``SCM_RIGHTS``: the user never needs read access to the spool). Every
  operation runs as the account (supplementary groups, gid, uid), so the kernel checks
  that user's rights, and root follows no link a user controls: ``maildir`` first
  creates, as root, what the account may not (the missing Maildir root and parents,
  :func:`tayori.deliver.maildir.make_root`: relative to the directory above, no link
  followed; and not at all when a symbolic link on the existing part of the path is
  not root's), then writes the message as the account
  (:func:`tayori.deliver.maildir.deliver_from` without ``owner``): a Maildir replaced by
  a link to a directory the account cannot write gets nothing. ``append`` (an mbox
  file), ``read`` (a ``.forward`` file) and ``exec`` (a command) run as the account
  only.
- ``read`` returns a file only when its name is ``.forward`` or ends in ``.forward``
  (what ``forward_path`` must name: the helper serves no other file), and it is a
  regular file owned by the account or root and writable by nobody else (sendmail's
  and Postfix's rule for ``.forward``), at most :data:`MAX_FORWARD` bytes.
- ``exec`` runs the command in a session of its own with the caller's standard input,
  output and error, and reports its wait status; when the caller goes away (the pipe
  delivery's timeout killed it) the command's process group is killed.
- Never as root: a request naming uid 0, or a uid the password database does not know,
  is refused. Any process running as tayori's user may ask for work as any other
  account; that is the trust Postfix gives the processes that talk to its local(8).
- The helper ends with the process that started it: the server with the keeper
  (``PR_SET_PDEATHSIG``, and a check of its parent every second), the keeper with
  tayori (a check every :data:`PARENT_CHECK` seconds: a tayori that dropped its
  privileges may not send a root process its death signal). Should the keeper itself
  die, nothing starts it again before tayori restarts: requests fail ``451 4.3.5``
  (see below) and mail waits.
Failure policy: a refused or failed request answers a :class:`~tayori.errors.Reply`
(temporary: mail waits for the operator); the client functions raise
:class:`HelperUnavailable` when no helper runs (tayori was not started as root), when
it does not answer or when not root serves its socket, and the callers answer
``451 4.3.5``. Nothing here raises into the event loop. The helper's own problems go
to the mail log (its file stays open in the helper).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pwd
import select
import signal
import socket
import stat
import struct
import time
from collections.abc import Callable
from typing import Any

from tayori import maillog
from tayori.deliver import maildir, mbox
from tayori.errors import Reply
from tayori.process import die_with_parent

MAX_REQUEST = 1 << 16
MAX_FORWARD = 1 << 16
REQUEST_TIMEOUT = 300.0
RESTART_PAUSE = 1.0    # seconds at least between two starts of the server
PARENT_CHECK = 0.5     # seconds between two looks at the server and at tayori
ERROR_PAUSE = 0.1      # after a failure while accepting (no busy loop on EMFILE)
FORWARD_NAME = ".forward"
_address: str | None = None   # set in the service's processes once the helper runs
_pid = 0                      # the helper's (keeper's) pid, in the process that forked it


class HelperUnavailable(Exception):
    """No privileged helper runs (tayori was not started as root)."""


def socket_address(spool_dir: str) -> str:
    digest = hashlib.sha256(os.path.realpath(spool_dir).encode()).hexdigest()[:24]
    return f"\0tayori-privileged-{digest}"


def available() -> str | None:
    """The helper's socket address, when one runs for this process's service."""
    return _address


def helper_pid() -> int:
    """The helper's pid in the process that started it (0: none), to notice its end."""
    return _pid


# --- the client side ----------------------------------------------------------------------


def write_maildir(uid: int, mailbox: str, source: int, *, return_path: str,
                  delivered_to: str, hostname: str, folder: str,
                  quota: maildir.Quota | None) -> str:
    """:func:`tayori.deliver.maildir.deliver_from` with the mailbox owned by ``uid``.
    Raises :class:`~tayori.deliver.maildir.MaildirError` as that would."""
    answer = _ask({"op": "maildir", "uid": uid, "mailbox": mailbox, "folder": folder,
                   "return_path": return_path, "delivered_to": delivered_to,
                   "hostname": hostname,
                   "quota": None if quota is None else [quota.bytes, quota.messages]},
                  [source])
    if "name" not in answer:
        raise maildir.MaildirError(_reply_of(answer))
    return str(answer["name"])


def append_file(uid: int, path: str, source: int, *, sender: str, delivered_to: str,
                make_parents: bool = False) -> Reply | None:
    """:func:`tayori.deliver.mbox.append` as the account ``uid``; None when done."""
    answer = _ask({"op": "append", "uid": uid, "path": path, "sender": sender,
                   "delivered_to": delivered_to, "make_parents": make_parents}, [source])
    return None if answer.get("done") else _reply_of(answer)


def read_file(uid: int, path: str) -> str | None:
    """The text of the account's file at ``path`` (a ``.forward``), None when it does
    not exist. Raises :class:`RefusedFile` when it exists but is unsafe or unreadable."""
    answer = _ask({"op": "read", "uid": uid, "path": path}, [])
    if "refused" in answer:
        raise RefusedFile(str(answer["refused"]))
    text = answer.get("text")
    return None if text is None else str(text)


class RefusedFile(Exception):
    """A file that exists but is not used: its owner or mode is unsafe, or unreadable."""


def exec_request(uid: int, argv: list[str], *, env: dict[str, str], cwd: str,
                 umask: int) -> bytes:
    """The request that runs ``argv`` as ``uid``; send it with :func:`socket.send_fds`
    and the command's standard input, output and error. The helper answers with
    :func:`exec_status`'s input once the command has ended, and kills the command's
    process group if the connection is closed first."""
    return json.dumps({"op": "exec", "uid": uid, "argv": argv, "env": env, "cwd": cwd,
                       "umask": umask}).encode()


def exec_status(answer: bytes) -> int | None:
    """The command's wait status from the helper's answer; None when it gave none."""
    try:
        status = json.loads(answer).get("status")
    except (ValueError, AttributeError):
        return None
    return status if isinstance(status, int) else None


def _ask(request: dict[str, Any], fds: list[int], *, address: str | None = None,
         timeout: float | None = REQUEST_TIMEOUT) -> dict[str, Any]:
    address = address or _address
    if address is None:
        raise HelperUnavailable("tayori was not started as root")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
        conn.settimeout(timeout)
        try:
            conn.connect(address)
            check_server(conn)
            socket.send_fds(conn, [json.dumps(request).encode()], fds)
            data = conn.recv(MAX_REQUEST)
        except OSError as exc:
            raise unavailable(f"the privileged helper did not answer: {exc}") from None
    try:
        answer = json.loads(data)
    except ValueError:
        raise unavailable("the privileged helper answered nothing") from None
    if not isinstance(answer, dict):
        raise unavailable("the privileged helper answered nonsense")
    return answer


def check_server(conn: socket.socket) -> None:
    """Raise :class:`HelperUnavailable` unless root serves the other end of ``conn``
    (connected to the helper's address, which any local user may bind once the helper
    is gone)."""
    uid = _peer_uid(conn)
    if uid != 0:
        raise unavailable(f"the privileged helper's socket is served by uid {uid}, "
                          "not by root")


def unavailable(reason: str) -> HelperUnavailable:
    """The error for a helper that should run but does not serve (logged: mail for
    other accounts waits until it is back)."""
    maillog.error("privileged-helper-unavailable", reason=reason)
    return HelperUnavailable(reason)


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def _reply_of(answer: dict[str, Any]) -> Reply:
    try:
        code, status, text = answer["reply"]
        return Reply(int(code), str(status), str(text))
    except (KeyError, TypeError, ValueError):
        return Reply(451, "4.3.0", "the privileged helper failed")


# --- the helper process -------------------------------------------------------------------


def start(spool_dir: str, client_uid: int) -> int:
    """Fork the helper (we are root); its pid. Processes forked later know its address."""
    global _address, _pid
    address = socket_address(spool_dir)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(address)
    listener.listen(64)
    pid = os.fork()
    if pid:
        listener.close()
        _address, _pid = address, pid
        return pid
    try:
        die_with_parent()
        _keep(listener, client_uid)
    finally:
        os._exit(0)


def _keep(listener: socket.socket, client_uid: int) -> None:
    """The keeper: holds the listening socket and runs the server, again when it dies."""
    _close_all_but({listener.fileno(), *_log_descriptors()})
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)
    parent = os.getppid()
    while os.getppid() == parent:
        started = time.monotonic()
        try:
            pid = _fork_server(listener, client_uid)
            status = _server_end(pid, parent)
        except OSError as exc:
            maillog.error("privileged-helper-error", reason=_reason(exc), action="retrying")
        else:
            if status is None:   # tayori has ended
                return
            maillog.error("privileged-helper-died", pid=pid,
                          status=os.waitstatus_to_exitcode(status), action="restarting")
        time.sleep(max(0.0, RESTART_PAUSE - (time.monotonic() - started)))


def _server_end(pid: int, parent: int) -> int | None:
    """The server's wait status once it ends; None (the server killed) when tayori ends
    first. Polled: tayori, no longer root, may not send the keeper its death signal."""
    while os.getppid() == parent:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(PARENT_CHECK)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return None


def _fork_server(listener: socket.socket, client_uid: int) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            die_with_parent()
            _serve(listener, client_uid)
        finally:
            os._exit(0)
    return pid


def _serve(listener: socket.socket, client_uid: int) -> None:
    parent = os.getppid()
    while os.getppid() == parent:
        _serve_once(listener, client_uid)


def _serve_once(listener: socket.socket, client_uid: int) -> None:
    """Wait (a second at most) for a connection and hand it to a child. Nothing raised
    here ends the server: a failure drops the one connection, is logged, and it goes on."""
    try:
        ready, _, _ = select.select([listener], [], [], 1.0)
        _reap()
        if ready:
            _accept(listener, client_uid)
    except Exception as exc:
        maillog.error("privileged-helper-error", reason=_reason(exc), request="dropped")
        time.sleep(ERROR_PAUSE)


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return type(exc).__name__


def _log_descriptors() -> set[int]:
    """The files the mail log writes to (the helper keeps them open)."""
    fds = set()
    for handler in logging.getLogger("tayori").handlers:
        stream: Any = getattr(handler, "stream", None)
        with contextlib.suppress(AttributeError, ValueError, OSError):
            fds.add(int(stream.fileno()))
    return fds


def _close_all_but(keep: set[int]) -> None:
    low = 3
    for fd in sorted(keep):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, _max_fd())


def _max_fd() -> int:
    return os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 65536


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _accept(listener: socket.socket, client_uid: int) -> None:
    conn, _ = listener.accept()
    with conn:
        if _peer_uid(conn) not in (client_uid, 0):
            return
        if os.fork() == 0:
            listener.close()
            try:
                _handle(conn)
            finally:
                os._exit(0)


def _handle(conn: socket.socket) -> None:
    conn.settimeout(REQUEST_TIMEOUT)
    fds: list[int] = []
    try:
        data, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST, 3)
        request = json.loads(data)
        account = _account(request["uid"])
        answer = _OPERATIONS[request["op"]](request, account, fds, conn)
    except _Refused as exc:
        answer = {"reply": [451, "4.3.5", str(exc)]}
    except (KeyError, TypeError, ValueError, OSError):
        answer = {"reply": [451, "4.3.0", "malformed request to the privileged helper"]}
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
    with contextlib.suppress(OSError):
        conn.send(json.dumps(answer).encode())


class _Refused(Exception):
    pass


def _account(uid: object) -> pwd.struct_passwd:
    if not isinstance(uid, int) or uid <= 0:
        raise _Refused("the privileged helper does nothing as root")
    try:
        return pwd.getpwuid(uid)
    except KeyError:
        raise _Refused(f"uid {uid} is no user of this system") from None


def _become(account: pwd.struct_passwd) -> None:
    os.setgroups(os.getgrouplist(account.pw_name, account.pw_gid))
    os.setgid(account.pw_gid)
    os.setuid(account.pw_uid)


def _maildir(request: dict[str, Any], account: pwd.struct_passwd, fds: list[int],
             conn: socket.socket) -> dict[str, Any]:
    mailbox = os.path.abspath(str(request["mailbox"]))
    limits = request["quota"]
    quota = None if limits is None else maildir.Quota(limits[0], limits[1])
    try:
        _make_mailbox(mailbox, account)
        _become(account)
        name = maildir.deliver_from(
            mailbox, fds[0], return_path=str(request["return_path"]),
            delivered_to=str(request["delivered_to"]), hostname=str(request["hostname"]),
            folder=str(request["folder"]), quota=quota)
    except maildir.MaildirError as exc:
        return {"reply": [exc.reply.code, exc.reply.status, exc.reply.text]}
    return {"name": name}


def _make_mailbox(mailbox: str, account: pwd.struct_passwd) -> None:
    """As root, what the account may not create: a missing Maildir root (the account's)
    and its missing parents. Then sync the Maildir's parent, which the account may not
    read, in case another delivery has just made the Maildir."""
    try:
        if not os.path.lexists(mailbox):
            link = _foreign_link(mailbox)
            if link:
                raise maildir.MaildirError(Reply(
                    451, "4.2.0", f"Cannot deliver to mailbox {mailbox}: the symbolic link "
                    f"{link} on its path is not root's"))
            maildir.make_root(mailbox, (account.pw_uid, account.pw_gid))
        fd = os.open(os.path.dirname(mailbox), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise maildir.MaildirError(maildir.reply_for(exc, mailbox)) from None


def _foreign_link(path: str) -> str:
    """The first symbolic link on ``path`` (absolute) that is not root's; "" if none."""
    prefix = "/"
    for part in path.strip("/").split("/"):
        prefix = os.path.join(prefix, part)
        try:
            info = os.lstat(prefix)
        except FileNotFoundError:
            return ""
        if stat.S_ISLNK(info.st_mode) and info.st_uid != 0:
            return prefix
    return ""


def _append(request: dict[str, Any], account: pwd.struct_passwd, fds: list[int],
            conn: socket.socket) -> dict[str, Any]:
    _become(account)
    path = str(request["path"])
    try:
        mbox.append(path, fds[0], sender=str(request["sender"]),
                    delivered_to=str(request["delivered_to"]),
                    make_parents=bool(request["make_parents"]))
    except OSError as exc:
        return {"reply": [451, "4.2.0", f"cannot append to {path} as {account.pw_name}: "
                          f"{exc.strerror or exc}"]}
    return {"done": True}


def _read(request: dict[str, Any], account: pwd.struct_passwd, fds: list[int],
          conn: socket.socket) -> dict[str, Any]:
    _become(account)
    try:
        return {"text": read_owned_file(str(request["path"]), account.pw_uid)}
    except RefusedFile as exc:
        return {"refused": str(exc)}


def read_owned_file(path: str, uid: int) -> str | None:
    """The text of a ``.forward`` that ``uid`` may use; None when there is none. Raises
    :class:`RefusedFile` when it is unreadable or unsafe, or not named ``.forward`` or
    ``*.forward`` (see the module's contract)."""
    if not os.path.basename(path).endswith(FORWARD_NAME):
        raise RefusedFile(f"its name does not end in {FORWARD_NAME} (forward_path)")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RefusedFile(f"cannot open it: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as file:
        problem = _unsafe(os.fstat(fd), uid)
        if problem:
            raise RefusedFile(problem)
        return file.read(MAX_FORWARD).decode("utf-8", "replace")


def _unsafe(info: os.stat_result, uid: int) -> str:
    """Why a ``.forward`` with this ``stat`` may not be used by ``uid``; "" when safe."""
    if not stat.S_ISREG(info.st_mode):
        return "it is not a regular file"
    if info.st_uid not in (uid, 0):
        return "it belongs to another user"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return "others may write it"
    if info.st_size > MAX_FORWARD:
        return f"it is larger than {MAX_FORWARD} bytes"
    return ""


def _exec(request: dict[str, Any], account: pwd.struct_passwd, fds: list[int],
          conn: socket.socket) -> dict[str, Any]:
    argv = [str(a) for a in request["argv"]]
    env = {str(k): str(v) for k, v in request["env"].items()}
    if len(fds) != 3 or not argv:
        raise ValueError("exec needs a command and three descriptors")
    pid = os.fork()
    if pid == 0:
        _child(account, argv, fds, env=env, cwd=str(request["cwd"]),
               umask=int(request["umask"]))
    for fd in fds:
        os.close(fd)
    fds.clear()
    return {"status": _wait_or_kill(pid, conn)}


def _child(account: pwd.struct_passwd, argv: list[str], fds: list[int], *,
           env: dict[str, str], cwd: str, umask: int) -> None:
    try:
        os.setsid()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        os.closerange(3, _max_fd())
        _become(account)
        os.umask(umask)
        os.chdir(cwd)
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.write(2, f"cannot run {argv[0]}: {exc.strerror}\n".encode())
    os._exit(78)   # EX_CONFIG, as the trampoline answers


def _wait_or_kill(pid: int, conn: socket.socket) -> int:
    """The command's wait status; its process group is killed if the caller leaves."""
    poller = select.poll()
    poller.register(conn, select.POLLIN | select.POLLHUP)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if poller.poll(100):   # the caller hung up (it sends nothing more)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            return os.waitpid(pid, 0)[1]


_OPERATIONS: dict[str, Callable[[dict[str, Any], pwd.struct_passwd, list[int],
                                 socket.socket], dict[str, Any]]] = {
    "maildir": _maildir, "append": _append, "read": _read, "exec": _exec}
