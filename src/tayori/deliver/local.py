"""Local delivery: recipients routed to a ``maildir`` action go into their mailboxes.

Takes: a :class:`~tayori.deliver.dispatch.Delivery` whose action is ``deliver =
"maildir"``: the message's recipients routed to that action.
Aliases: a recipient that is an alias of the action's ``aliases`` table becomes the
recipients it expands to (new rows of the same message, queued at once, routed by the
match rules like mail tayori writes itself); the alias is reported ``expanded``.
``|command`` targets run through :mod:`tayori.deliver.pipe`; ``/path`` targets are
appended to an mbox file (flock, mboxrd quoting, fsync). Expansion deeper than
:data:`~tayori.route.local.MAX_DEPTH` (a loop through addresses) is ``554 5.4.6``.
Promises: the mailbox path is the action's ``path`` with ``{user}`` (the local part,
lower-cased, without a ``+tag``) and ``{domain}`` (the A-label domain, lower-cased)
filled in; a local part that could leave the mail directory (``/``, a leading dot, NUL,
``..``) never reaches the file system: it is refused ``550 5.1.3``. The message is
written by :func:`tayori.deliver.maildir.deliver` on a worker thread (fsync'd and
renamed into ``new/`` before the result says delivered), with ``Return-Path`` and
``Delivered-To`` added. Results are final (``delivered`` in a DSN).
Failure policy: :class:`~tayori.deliver.maildir.MaildirError` replies as they are
(temporary for disk and permission problems: mail waits for the operator, it does not
bounce); anything unexpected reaches the queue manager, which answers ``451 4.3.0``.
Config keys: ``actions.NAME.path``, ``hostname``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import pwd
import re
import time
from collections.abc import Iterator

from tayori import maillog
from tayori.address import AddressError, parse_mailbox, xtext_decode, xtext_encode
from tayori.config import Config
from tayori.config.model import ActionConfig
from tayori.deliver import maildir, pipe
from tayori.deliver.dispatch import Delivery, Result
from tayori.errors import Reply
from tayori.policy.relay import Rules
from tayori.queue.spool import RecipientRecord
from tayori.queue.store import Claim
from tayori.route.local import (
    MAX_DEPTH,
    AliasLoop,
    LocalRecipients,
    MailboxPathError,
    mailbox_path,
)


class LocalDeliverer:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.local = LocalRecipients(config)
        self.rules = Rules(config)

    def update(self, config: Config) -> None:
        self.config = config
        self.local = LocalRecipients(config)
        self.rules = Rules(config)

    async def deliver(self, job: Delivery) -> list[Result]:
        """One result per recipient. The plain mailbox deliveries of the job go to the
        disk in one worker-thread call (one hand-off per message, not per recipient)."""
        results: list[Result | None] = []
        mailboxes: list[tuple[int, Claim, str]] = []
        for claim in job.recipients:
            routed = await self._route(job, claim)
            if isinstance(routed, str):
                mailboxes.append((len(results), claim, routed))
            results.append(routed if isinstance(routed, Result) else None)
        if mailboxes:
            written = await asyncio.get_running_loop().run_in_executor(
                None, self._write_all, job, [(claim, path) for _, claim, path in mailboxes])
            for (index, _, _), result in zip(mailboxes, written, strict=True):
                results[index] = result
        return [result or Result(Reply(451, "4.3.0", "not delivered")) for result in results]

    async def _route(self, job: Delivery, claim: Claim) -> Result | str:
        """The result for a recipient that needs no mailbox write (pipe, file, alias,
        catch-all, refusal), or the path of its mailbox."""
        if claim.address.startswith("|"):
            return await self._pipe(job, claim)
        if claim.address.startswith("/"):
            return await asyncio.get_running_loop().run_in_executor(
                None, _to_file, claim.address, job, claim)
        try:
            targets = self.local.expand(job.action_name, claim.address)
            if targets is not None and claim.depth >= MAX_DEPTH:
                raise AliasLoop(claim.address)
        except AliasLoop:
            return Result(Reply(554, "5.4.6", f"alias loop for {claim.address}"))
        if targets is not None:
            return self._expanded(job, claim, targets)
        catch_all = self.local.catch_all(job.action_name, claim.address)
        if catch_all is not None:
            return self._expanded(job, claim, [catch_all])
        try:
            return mailbox_path(job.action.path, claim.address, job.action.subaddress)
        except MailboxPathError:
            return Result(Reply(550, "5.1.3", "this local part cannot name a mailbox"))

    def _write_all(self, job: Delivery, mailboxes: list[tuple[Claim, str]]) -> list[Result]:
        """On a worker thread: each message file written, fsync'd and linked in turn."""
        action = job.action
        results = []
        for claim, path in mailboxes:
            try:
                name = maildir.deliver(
                    path, job.path, return_path=job.message.sender,
                    delivered_to=claim.address, hostname=self.config.hostname,
                    folder=_folder(action, claim.address), quota=quota_of(action),
                    owner=_owner(action.owner))
            except maildir.MaildirError as exc:
                reply = exc.reply
                if reply.status == "4.2.2" and action.quota_hard:
                    reply = Reply(552, "5.2.2", reply.text)
                results.append(Result(reply, target=f"maildir:{path}"))
                continue
            results.append(Result(Reply(250, "2.0.0", f"delivered to maildir as {name}"),
                                  target=f"maildir:{path}", final=True))
        return results

    def _expanded(self, job: Delivery, claim: Claim, targets: list[str]) -> Result:
        """An alias: its targets become recipients of the message (queued now, routed
        like mail tayori writes itself); the alias itself is done ("expanded")."""
        orcpt = claim.orcpt or f"rfc822;{xtext_encode(claim.address)}"
        notify = claim.notify
        if notify is not None and "SUCCESS" in notify:   # RFC 3461 §6.2.7.4: reported now
            notify = tuple(n for n in notify if n != "SUCCESS") or ("NEVER",)
        records = []
        for target in targets:
            action = job.action_name if target.startswith(("|", "/")) else \
                self.rules.route_internal(_domain_of(target))
            if action is None:
                maillog.warning("alias-target-dropped", queue_id=job.message.queue_id,
                                alias=claim.address, target=target,
                                reason="no match rule routes its domain")
                continue
            records.append(RecipientRecord(target, action, orcpt, notify,
                                           depth=claim.depth + 1))
        if not records:
            return Result(Reply(550, "5.1.1", f"the alias {claim.address} leads nowhere"))
        return Result(Reply(250, "2.1.5", f"alias expanded into {len(records)} "
                            "recipient(s)"), target="aliases", final=True,
                      expanded=tuple(records))

    async def _pipe(self, job: Delivery, claim: Claim, command: str | None = None) -> Result:
        """A ``|command`` alias target, or (``command`` given) a ``pipe`` action."""
        original = xtext_decode(claim.orcpt.split(";", 1)[1]) if claim.orcpt else ""
        reply = await pipe.run_pipe(pipe.PipeRequest(
            command=command or claim.address[1:], message_path=job.path,
            sender=job.message.sender, recipient=original or claim.address,
            original_recipient=original or claim.address, hostname=self.config.hostname,
            user=job.action.run_as or None, timeout=job.action.timeout,
            extension_delimiter=job.action.subaddress))
        return Result(reply, target="pipe", final=reply.is_positive)

    async def mbox_action(self, job: Delivery) -> list[Result]:
        """An ``mbox`` action: each recipient's message appended to its mbox file."""
        loop = asyncio.get_running_loop()
        results = []
        for claim in job.recipients:
            try:
                path = mailbox_path(job.action.path, claim.address, job.action.subaddress)
            except MailboxPathError:
                results.append(Result(Reply(550, "5.1.3", "this local part cannot name a "
                                            "mailbox")))
                continue
            results.append(await loop.run_in_executor(None, _to_mbox, path, job, claim))
        return results

    async def pipe_action(self, job: Delivery) -> list[Result]:
        """A ``pipe`` action: the command once per recipient."""
        return [await self._pipe(job, claim, job.action.command) for claim in job.recipients]


def _domain_of(address: str) -> str:
    try:
        return parse_mailbox(address, utf8=True).ascii_domain
    except AddressError:
        return address.rpartition("@")[2].lower()


def _to_file(path: str, job: Delivery, claim: Claim, delivered_to: str = "") -> Result:
    """Append to an mbox file (an alias's ``/path`` target, or an ``mbox`` action's
    mailbox): locked as mail readers expect (a ``.lock`` dot-lock file and an fcntl
    lock, as Dovecot and mutt do), mboxrd quoting (``>From `` lines), fsync'd before the
    result says delivered."""
    quoted = re.compile(rb"^(>*From )", re.MULTILINE)
    original = xtext_decode(claim.orcpt.split(";", 1)[1]) if claim.orcpt else claim.address
    try:
        with open(job.path, "rb") as source:
            body = source.read().replace(b"\r\n", b"\n")
        stamp = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime())
        entry = (f"From {job.message.sender or 'MAILER-DAEMON'} {stamp}\n"
                 f"Return-Path: <{job.message.sender}>\n"
                 f"Delivered-To: {delivered_to or original}\n").encode()
        entry += quoted.sub(rb">\1", body).rstrip(b"\n") + b"\n\n"
        with _dot_lock(path):
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX)
                view = memoryview(entry)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
    except OSError as exc:
        return Result(Reply(451, "4.2.0", f"cannot append to {path}: {exc.strerror}"),
                      target=f"file:{path}")
    return Result(Reply(250, "2.0.0", f"appended to {path}"), target=f"file:{path}",
                  final=True)


def _to_mbox(path: str, job: Delivery, claim: Claim) -> Result:
    """An ``mbox`` action's delivery: its directory made if missing (0700), as for
    Maildirs; then :func:`_to_file`."""
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    except OSError as exc:
        return Result(Reply(451, "4.2.0", f"cannot make the directory of {path}: "
                            f"{exc.strerror}"), target=f"file:{path}")
    return _to_file(path, job, claim, claim.address)


@contextlib.contextmanager
def _dot_lock(path: str, wait: float = 30.0, stale: float = 300.0) -> Iterator[None]:
    """``path.lock``, created exclusively; one older than ``stale`` seconds is a crashed
    writer's and is taken over. Raises OSError (EAGAIN) after ``wait`` seconds."""
    lock = path + ".lock"
    deadline = time.monotonic() + wait
    while True:
        try:
            os.close(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            break
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - os.stat(lock).st_mtime > stale:
                    os.unlink(lock)
                    continue
            if time.monotonic() > deadline:
                raise OSError(errno.EAGAIN, "the mailbox stays locked") from None
            time.sleep(0.05)   # on a worker thread: another writer holds the lock
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)


def _owner(user: str) -> tuple[int, int] | None:
    if not user:
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise maildir.MaildirError(Reply(451, "4.3.5", f"the mailbox owner {user!r} is no "
                                         "user of this system (actions.*.owner)")) from None
    return entry.pw_uid, entry.pw_gid


def _folder(action: ActionConfig, address: str) -> str:
    """The +tag's folder when the action asks for it and the tag names a valid one."""
    local = address.rpartition("@")[0]
    if not (action.tag_folder and action.subaddress and action.subaddress in local):
        return ""
    tag = local.split(action.subaddress, 1)[1]
    return tag if maildir.valid_folder(tag) else ""


def quota_of(action: ActionConfig) -> maildir.Quota | None:
    if not (action.quota_bytes or action.quota_messages):
        return None
    return maildir.Quota(action.quota_bytes or None, action.quota_messages or None)

