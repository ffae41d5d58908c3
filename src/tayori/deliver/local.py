"""Local delivery: recipients routed to a ``maildir`` action go into their mailboxes.

Takes: a :class:`~tayori.deliver.dispatch.Delivery` whose action is ``deliver =
"maildir"``: the message's recipients routed to that action.
Aliases: a recipient that is an alias of the action's ``aliases`` table becomes the
recipients it expands to (new rows of the same message, queued at once, routed by the
match rules like mail tayori writes itself); the alias is reported ``expanded``.
``.forward`` (with ``forward``): a recipient that is a system account with a usable
``.forward`` (:mod:`tayori.route.forward`) is expanded the same way, after the aliases;
its targets carry the account as their ``owner``, so that its ``|command`` and
``/file`` targets run as that account. ``\\user`` targets (and a ``.forward``'s own
address) go straight to that mailbox, never expanded again, and a recipient that an
account's ``.forward`` made is not expanded by that ``.forward`` again.
``|command`` targets run through :mod:`tayori.deliver.pipe`; ``/path`` targets are
appended to an mbox file (:mod:`tayori.deliver.mbox`). These three forms exist only in
recipients an expansion made (depth above 0): a recipient as received (SMTP, sendmail)
is always an address, whatever its local part starts with (a ``/`` in it is then
refused ``550 5.1.3`` below). Expansion deeper than
:data:`~tayori.route.local.MAX_DEPTH` (a loop through addresses) is ``554 5.4.6``, and
so is one that would take the message's recipient rows past ``limits.max_recipients``
plus :data:`~tayori.route.forward.MAX_TARGETS` (judged by the expanded recipient's
row: rows are only ever appended, so a fan-out through addresses stays bounded).
Promises: the mailbox path is the action's ``path`` with ``{user}`` (the local part,
lower-cased, without a ``+tag``) and ``{domain}`` (the A-label domain, lower-cased)
filled in; a local part that could leave the mail directory (``/``, a leading dot, NUL,
``..``) never reaches the file system: it is refused ``550 5.1.3``. The message is
written by :func:`tayori.deliver.maildir.deliver` on a worker thread (fsync'd and
renamed into ``new/`` before the result says delivered), with ``Return-Path`` and
``Delivered-To`` added. Results are final (``delivered`` in a DSN).
Ownership: without ``owner`` the files belong to the user tayori runs as; with
``owner`` (one account, or ``"recipient"``: the account the local part names) that is
not the user tayori runs as, the privileged helper (:mod:`tayori.deliver.privileged`)
writes the Maildir as that account, also when tayori runs as root (root never writes
into a directory a user controls); the same helper runs commands and appends files as
another account.
Failure policy: :class:`~tayori.deliver.maildir.MaildirError` replies as they are
(temporary for disk and permission problems: mail waits for the operator, it does not
bounce); no helper where one is needed, and an owner the password database cannot
find now (``owner``, a ``.forward``'s account), is ``451 4.3.5``: the queue's lifetime
ends it, never a delivery as tayori; anything unexpected reaches the queue manager,
which answers ``451 4.3.0``.
Config keys: ``actions.NAME.path``, ``.owner``, ``.forward``, ``.forward_path``,
``.run_as``, ``.timeout``, ``hostname``, ``limits.max_recipients``.
"""

from __future__ import annotations

import asyncio
import functools
import os
import pwd
from dataclasses import dataclass

from tayori import maillog
from tayori.address import AddressError, parse_mailbox, xtext_decode, xtext_encode
from tayori.config import Config
from tayori.config.model import ActionConfig
from tayori.deliver import maildir, mbox, pipe, privileged
from tayori.deliver.dispatch import Delivery, Result
from tayori.errors import Reply
from tayori.policy.relay import Rules
from tayori.queue.spool import RecipientRecord
from tayori.queue.store import Claim
from tayori.route.forward import MAX_TARGETS, ForwardUnavailable, forward_of, system_account
from tayori.route.local import (
    MAX_DEPTH,
    OWNER_RECIPIENT,
    AliasLoop,
    LocalRecipients,
    MailboxPathError,
    mailbox_path,
)


@dataclass(frozen=True, slots=True)
class _Mailbox:
    """A recipient's Maildir, and the address it is delivered as (``Delivered-To``)."""

    path: str
    address: str


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
        mailboxes: list[tuple[int, _Mailbox]] = []
        for claim in job.recipients:
            routed = await self._route(job, claim)
            if isinstance(routed, _Mailbox):
                mailboxes.append((len(results), routed))
            results.append(routed if isinstance(routed, Result) else None)
        if mailboxes:
            written = await asyncio.get_running_loop().run_in_executor(
                None, self._write_all, job, [box for _, box in mailboxes])
            for (index, _), result in zip(mailboxes, written, strict=True):
                results[index] = result
        return [result or Result(Reply(451, "4.3.0", "not delivered")) for result in results]

    async def _route(self, job: Delivery, claim: Claim) -> Result | _Mailbox:
        """The result for a recipient that needs no mailbox write (pipe, file, alias,
        ``.forward``, catch-all, refusal), or its mailbox."""
        if claim.depth > 0:   # only an alias or a .forward makes the special forms
            special = await self._special(job, claim)
            if special is not None:
                return special
        address = claim.address
        try:
            targets = self.local.expand(job.action_name, address)
            if targets is not None and claim.depth >= MAX_DEPTH:
                raise AliasLoop(address)
        except AliasLoop:
            return Result(Reply(554, "5.4.6", f"alias loop for {address}"))
        if targets is not None:
            return self._expanded(job, claim, targets)
        if job.action.forward:
            forwarded = await self._forward(job, claim)
            if forwarded is not None:
                return forwarded
        catch_all = self.local.catch_all(job.action_name, address)
        if catch_all is not None:
            return self._expanded(job, claim, [catch_all])
        return self._mailbox(job, address)

    async def _special(self, job: Delivery, claim: Claim) -> Result | _Mailbox | None:
        """An expansion's ``|command``, ``/file`` or ``\\user`` target; None for an
        address."""
        address = claim.address
        if address.startswith("|"):
            return await self._pipe(job, claim)
        if address.startswith("/"):
            original = xtext_decode(claim.orcpt.split(";", 1)[1]) if claim.orcpt else address
            return await asyncio.get_running_loop().run_in_executor(
                None, functools.partial(_append, address, job, claim, delivered_to=original))
        if address.startswith("\\"):   # \user: its own mailbox, no alias, no .forward
            return self._mailbox(job, address[1:])
        return None

    async def _forward(self, job: Delivery, claim: Claim) -> Result | None:
        """The recipient's ``.forward`` expanded; None when it has none."""
        try:
            forward = await asyncio.get_running_loop().run_in_executor(
                None, forward_of, job.action.forward_path, claim.address,
                job.action.subaddress, claim.owner)
        except ForwardUnavailable as exc:
            maillog.warning("forward-unavailable", queue_id=job.message.queue_id,
                            recipient=claim.address, reason=str(exc))
            return Result(Reply(451, "4.3.0", "cannot read the .forward file now"))
        if forward is None:
            return None
        if claim.depth >= MAX_DEPTH:
            return Result(Reply(554, "5.4.6", f"forwarding loop for {claim.address}"))
        return self._expanded(job, claim, list(forward.targets), owner=forward.user)

    @staticmethod
    def _mailbox(job: Delivery, address: str) -> Result | _Mailbox:
        try:
            return _Mailbox(mailbox_path(job.action.path, address, job.action.subaddress),
                            address)
        except MailboxPathError:
            return Result(Reply(550, "5.1.3", "this local part cannot name a mailbox"))

    def _write_all(self, job: Delivery, mailboxes: list[_Mailbox]) -> list[Result]:
        """On a worker thread: the copies tayori may write itself in one batch
        (:func:`tayori.deliver.maildir.deliver_copies`), those of another owner through
        the privileged helper, as that owner."""
        outcomes: list[str | maildir.MaildirError | None] = [None] * len(mailboxes)
        batch: list[tuple[int, maildir.Copy]] = []
        euid = os.geteuid()
        for index, box in enumerate(mailboxes):
            copy = maildir.Copy(box.path, box.address, _folder(job.action, box.address),
                                quota=quota_of(job.action))
            try:
                owner = _owner(job.action, box.address)
            except maildir.MaildirError as exc:
                outcomes[index] = exc
                continue
            if owner is None or owner[0] == euid:
                batch.append((index, copy))
            else:
                outcomes[index] = self._through_helper(job, owner[0], copy)
        written = maildir.deliver_copies([copy for _, copy in batch], job.path,
                                         return_path=job.message.sender,
                                         hostname=self.config.hostname)
        for (index, _), outcome in zip(batch, written, strict=True):
            outcomes[index] = outcome
        return [self._result(job.action, box.path, outcome)
                for box, outcome in zip(mailboxes, outcomes, strict=True)]

    @staticmethod
    def _result(action: ActionConfig, path: str,
                outcome: str | maildir.MaildirError | None) -> Result:
        if isinstance(outcome, str):
            return Result(Reply(250, "2.0.0", f"delivered to maildir as {outcome}"),
                          target=f"maildir:{path}", final=True)
        reply = outcome.reply if outcome is not None else Reply(451, "4.3.0", "not delivered")
        if reply.status == "4.2.2" and action.quota_hard:
            reply = Reply(552, "5.2.2", reply.text)
        return Result(reply, target=f"maildir:{path}")

    def _through_helper(self, job: Delivery, uid: int,
                        copy: maildir.Copy) -> str | maildir.MaildirError:
        """A Maildir owned by another account, written by the privileged helper."""
        try:
            with open(job.path, "rb") as source:
                return privileged.write_maildir(
                    uid, copy.mailbox, source.fileno(), return_path=job.message.sender,
                    delivered_to=copy.delivered_to, hostname=self.config.hostname,
                    folder=copy.folder, quota=copy.quota)
        except FileNotFoundError:
            return maildir.MaildirError(Reply(451, "4.3.0", "Queued message file is missing"))
        except privileged.HelperUnavailable as exc:
            return maildir.MaildirError(Reply(451, "4.3.5", "cannot write a mailbox owned "
                                              f"by uid {uid}: {exc}"))
        except maildir.MaildirError as exc:
            return exc

    def _expanded(self, job: Delivery, claim: Claim, targets: list[str],
                  owner: str = "") -> Result:
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
                                           depth=claim.depth + 1, owner=owner))
        if not records:
            return Result(Reply(550, "5.1.1", f"the alias {claim.address} leads nowhere"))
        if claim.index + len(records) > self.config.limits.max_recipients + MAX_TARGETS:
            return Result(Reply(554, "5.4.6", f"{claim.address} expands into too many "
                                "recipients for one message"))
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
            user=claim.owner or job.action.run_as or None, timeout=job.action.timeout,
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
            results.append(await loop.run_in_executor(None, functools.partial(
                _append, path, job, claim, delivered_to=claim.address, make_parents=True)))
        return results

    async def pipe_action(self, job: Delivery) -> list[Result]:
        """A ``pipe`` action: the command once per recipient."""
        return [await self._pipe(job, claim, job.action.command) for claim in job.recipients]


def _domain_of(address: str) -> str:
    try:
        return parse_mailbox(address, utf8=True).ascii_domain
    except AddressError:
        return address.rpartition("@")[2].lower()


def _append(path: str, job: Delivery, claim: Claim, *, delivered_to: str,
            make_parents: bool = False) -> Result:
    """Append to an mbox file (:mod:`tayori.deliver.mbox`): as tayori, or as the
    ``.forward``'s owner through the privileged helper (deferred while that account
    cannot be looked up: never as tayori instead)."""
    account = _account(claim.owner) if claim.owner else None
    if claim.owner and account is None:
        return Result(Reply(451, "4.3.5", f"cannot append to {path} as {claim.owner}: "
                            "no such account now"), target=f"file:{path}")
    try:
        with open(job.path, "rb") as source:
            if account is None or account.pw_uid == os.geteuid():
                mbox.append(path, source.fileno(), sender=job.message.sender,
                            delivered_to=delivered_to, make_parents=make_parents)
                refused = None
            else:
                refused = privileged.append_file(
                    account.pw_uid, path, source.fileno(), sender=job.message.sender,
                    delivered_to=delivered_to, make_parents=make_parents)
    except OSError as exc:
        refused = Reply(451, "4.2.0", f"cannot append to {path}: {exc.strerror or exc}")
    except privileged.HelperUnavailable as exc:
        refused = Reply(451, "4.3.5", f"cannot append to {path} as {claim.owner}: {exc}")
    if refused is not None:
        return Result(refused, target=f"file:{path}")
    return Result(Reply(250, "2.0.0", f"appended to {path}"), target=f"file:{path}",
                  final=True)


def _account(user: str) -> pwd.struct_passwd | None:
    """The account named ``user``; None when the password database does not say."""
    try:
        return pwd.getpwnam(user)
    except (KeyError, OSError):
        return None


def _owner(action: ActionConfig, address: str) -> tuple[int, int] | None:
    """The (uid, gid) that owns the recipient's Maildir; None: whoever tayori runs as.
    An account that cannot be looked up defers the delivery (the password database may
    be failing; the queue's lifetime ends it): :class:`~tayori.deliver.maildir.MaildirError`
    ``451 4.3.5``."""
    if not action.owner:
        return None
    if action.owner == OWNER_RECIPIENT:
        try:
            account = system_account(address, action.subaddress)
        except OSError:
            account = None
        if account is None:
            raise maildir.MaildirError(Reply(451, "4.3.5", "no system account for this "
                                             "recipient now"))
    else:
        account = _account(action.owner)
        if account is None:
            raise maildir.MaildirError(Reply(451, "4.3.5", f"the mailbox owner "
                                             f"{action.owner!r} is no user of this system "
                                             "(actions.*.owner)"))
    return account.pw_uid, account.pw_gid


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

