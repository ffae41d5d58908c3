"""Local delivery: recipients routed to a ``maildir`` action go into their mailboxes.

Takes: a :class:`~tayori.deliver.dispatch.Delivery` whose action is ``deliver =
"maildir"`` (one recipient per delivery: each has its own mailbox).
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
import re

from tayori.address import AddressError, parse_mailbox
from tayori.config import Config
from tayori.deliver import maildir
from tayori.deliver.dispatch import Delivery, Result
from tayori.errors import Reply

_SAFE_LOCAL = re.compile(r"[^/\x00]+\Z")


class MailboxPathError(ValueError):
    pass


def mailbox_path(template: str, address: str) -> str:
    """The Maildir for ``address`` from the action's path template."""
    try:
        mailbox = parse_mailbox(address, utf8=True)
    except AddressError:
        raise MailboxPathError(address) from None
    user = mailbox.local.split("+", 1)[0].lower()
    domain = mailbox.ascii_domain.lower()
    for part in (user, domain):
        if not _SAFE_LOCAL.match(part) or part.startswith(".") or ".." in part:
            raise MailboxPathError(address)
    return template.replace("{user}", user).replace("{domain}", domain)


class LocalDeliverer:
    def __init__(self, config: Config) -> None:
        self.config = config

    def update(self, config: Config) -> None:
        self.config = config

    async def deliver(self, job: Delivery) -> list[Result]:
        loop = asyncio.get_running_loop()
        results = []
        for claim in job.recipients:
            try:
                path = mailbox_path(job.action.path, claim.address)
            except MailboxPathError:
                results.append(Result(Reply(550, "5.1.3", "this local part cannot name a "
                                            "mailbox")))
                continue
            try:
                name = await loop.run_in_executor(
                    None, _deliver, path, job.path, job.message.sender, claim.address,
                    self.config.hostname)
            except maildir.MaildirError as exc:
                results.append(Result(exc.reply, target=f"maildir:{path}"))
                continue
            results.append(Result(Reply(250, "2.0.0", f"delivered to maildir as {name}"),
                                  target=f"maildir:{path}", final=True))
        return results


def _deliver(mailbox: str, message: str, sender: str, recipient: str, hostname: str) -> str:
    return maildir.deliver(mailbox, message, return_path=sender, delivered_to=recipient,
                           hostname=hostname)
