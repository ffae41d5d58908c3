"""Local recipients: who exists (checked at RCPT) and what an alias expands to.

Takes: the configuration's ``maildir`` actions with their ``users`` table (local parts,
or whole addresses, that have a mailbox) and ``aliases`` table (a file in aliases(5)
format: ``name: target, target, ...`` with continuation lines, ``#`` comments; targets
are local names, addresses, ``|command``, ``/path/file`` and ``:include:/path``). A name
may be a whole address (``info@example.org:``, a virtual alias of that domain only) or
``@example.org`` (that domain's catch-all); a bare name applies to every domain.
Promises:
- :meth:`LocalRecipients.known` says whether a recipient exists, so that an unknown one
  is refused at RCPT (``550 5.1.1``) instead of bounced later (DESIGN §2.5). Local parts
  compare case-insensitively; ``user+tag`` is ``user`` (delimiter ``subaddress``);
  ``postmaster`` always exists (RFC 5321 §4.5.1). With ``owner = "recipient"`` every
  system account but root exists too. An action without ``users``, ``aliases`` and
  that ``owner`` accepts every local part (the embedded default's behaviour).
- :meth:`LocalRecipients.expand` returns the final targets of an alias (None for a
  plain mailbox): names are expanded recursively, ``:include:`` files read, duplicates
  dropped, at most :data:`~tayori.route.forward.MAX_TARGETS` kept; a loop or more
  than :data:`MAX_DEPTH` levels raises :class:`AliasLoop`.
  A ``\\name`` target comes back as ``\\name@domain``: that mailbox, never expanded
  again (``root: \\root, admin`` keeps a copy without looping).
- Table files (users, aliases) are read again when their modification time changes.
- ``postmaster`` without a mailbox or alias of its own goes to ``queue.postmaster``.
Failure policy: an unreadable table at run time keeps the last good copy and is logged.
- :meth:`LocalRecipients.over_quota` says whether a mailbox is full already, so that
  RCPT can answer ``452 4.2.2``.
Config keys: ``tables`` (``format = "aliases"``), ``actions.NAME.users``,
``actions.NAME.aliases``, ``actions.NAME.subaddress``, ``actions.NAME.quota_*``.
"""

from __future__ import annotations

import os
import re
import sqlite3
from collections.abc import Container
from dataclasses import dataclass, field
from typing import Protocol

from tayori import maillog
from tayori.address import AddressError, parse_mailbox
from tayori.config import Config
from tayori.config.model import ActionConfig
from tayori.deliver.maildir import usage
from tayori.route.aliases import AliasError, parse_aliases, split_targets, target_text
from tayori.route.forward import MAX_TARGETS, system_account

MAX_DEPTH = 20
OWNER_RECIPIENT = "recipient"
"""``owner`` value: each mailbox belongs to the system account its local part names."""

_SAFE_LOCAL = re.compile(r"[^/\x00]+\Z")


class MailboxPathError(ValueError):
    """A local part that could leave the mail directory."""


def mailbox_path(template: str, address: str, delimiter: str = "+") -> str:
    """The Maildir for ``address`` from the action's path template."""
    try:
        mailbox = parse_mailbox(address, utf8=True)
    except AddressError:
        raise MailboxPathError(address) from None
    user = (mailbox.local.split(delimiter, 1)[0] if delimiter else mailbox.local).lower()
    domain = mailbox.ascii_domain.lower()
    for part in (user, domain):
        if not _SAFE_LOCAL.match(part) or part.startswith(".") or ".." in part:
            raise MailboxPathError(address)
    return template.replace("{user}", user).replace("{domain}", domain)


class AliasLoop(Exception):
    """An alias leads back to itself (or nests too deep): ``554 5.4.6``."""


@dataclass(slots=True)
class _AliasFile:
    path: str
    mtime: float = -1.0
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def current(self) -> dict[str, tuple[str, ...]]:
        try:
            mtime = os.stat(self.path).st_mtime
            if mtime != self.mtime:
                with open(self.path, encoding="utf-8") as handle:
                    self.aliases = parse_aliases(handle.read())
                self.mtime = mtime
        except (OSError, UnicodeDecodeError, AliasError) as exc:
            maillog.error("aliases-unreadable", file=self.path, reason=str(exc),
                          kept="the last good copy")
        return self.aliases


class Aliases(Protocol):
    def __contains__(self, key: object) -> bool: ...
    def __getitem__(self, key: str) -> tuple[str, ...]: ...


class _SqliteTable:
    """A table in an SQLite database: ``query`` (one ``?``: the key) returns, for a list,
    a row when the key is in it; for aliases, the targets (one per row, or separated by
    commas). A database error is raised (the caller answers 451: fail closed)."""

    def __init__(self, path: str, query: str) -> None:
        self.path, self.query = path, query
        self._db: sqlite3.Connection | None = None

    def _rows(self, key: str) -> list[str]:
        if self._db is None:
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True,
                                       check_same_thread=False)
        rows = self._db.execute(self.query, (key,)).fetchall()
        return [str(row[0]) for row in rows if row and row[0] is not None]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(self._rows(key))

    def __getitem__(self, key: str) -> tuple[str, ...]:
        targets = tuple(t for row in self._rows(key) for t in
                        (target_text(p) for p in split_targets(row)) if t)
        if not targets:
            raise KeyError(key)
        return targets


def _alias_key(aliases: Aliases, local: str, domain: str) -> str | None:
    """The entry that applies to ``local@domain``: the whole address (a virtual alias of
    that domain), then the local name (every domain of the action), then ``@domain``
    (the domain's catch-all)."""
    for key in (f"{local}@{domain}", local, f"@{domain}"):
        if key in aliases:
            return key
    return None


@dataclass(slots=True)
class _ListFile:
    """A list table's file (one entry per line, ``#`` comments), read again when it
    changes; the copy read with the configuration first."""

    path: str
    entries: frozenset[str] = frozenset()
    mtime: float | None = None

    def current(self) -> frozenset[str]:
        try:
            mtime = os.stat(self.path).st_mtime
            if self.mtime is None:
                self.mtime = mtime
            elif mtime != self.mtime:
                with open(self.path, encoding="utf-8") as handle:
                    lines = (line.split("#", 1)[0].strip() for line in handle)
                    self.entries = frozenset(line.lower() for line in lines if line)
                self.mtime = mtime
        except (OSError, UnicodeDecodeError) as exc:
            maillog.error("table-unreadable", file=self.path, reason=str(exc),
                          kept="the last good copy")
        return self.entries


class LocalRecipients:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._files: dict[str, _AliasFile] = {}
        self._lists: dict[str, _ListFile] = {}
        self._databases: dict[tuple[str, str], _SqliteTable] = {}

    def known(self, action_name: str, address: str) -> bool:
        action = self.config.actions.get(action_name)
        if action is None or action.deliver != "maildir" or not _checks_recipients(action):
            return True
        local, domain = self._split(action_name, address)
        return bool(action.catch_all) or self._exists(action_name, local, domain)

    def _exists(self, action_name: str, local: str, domain: str) -> bool:
        return local == "postmaster" or self._listed(action_name, local, domain)

    def _listed(self, action_name: str, local: str, domain: str) -> bool:
        if _alias_key(self._aliases(action_name), local, domain) is not None:
            return True
        if self.config.actions[action_name].owner == OWNER_RECIPIENT and \
                system_account(local, "") is not None:
            return True
        users = self._users(action_name)
        return local in users or f"{local}@{domain}" in users

    def catch_all(self, action_name: str, address: str) -> str | None:
        """Where mail for a recipient without a mailbox goes instead: ``postmaster``
        (unless a user or alias) to ``queue.postmaster`` when set; an unknown local part
        to the action's ``catch_all``. None: the recipient's own mailbox."""
        action = self.config.actions.get(action_name)
        if action is None or not _checks_recipients(action):
            return None
        local, domain = self._split(action_name, address)
        postmaster = self.config.queue.postmaster
        if local == "postmaster" and postmaster and not self._listed(action_name, local,
                                                                     domain):
            return postmaster
        if not action.catch_all or self._exists(action_name, local, domain):
            return None
        return f"{action.catch_all.lower()}@{domain}"

    def has_quota(self, action_name: str) -> bool:
        action = self.config.actions.get(action_name)
        return action is not None and action.deliver == "maildir" and bool(
            action.quota_bytes or action.quota_messages)

    def over_quota(self, action_name: str, address: str) -> bool:
        """True when the recipient's mailbox is full already (blocking: a directory
        scan; call it off the event loop)."""
        action = self.config.actions.get(action_name)
        if action is None or not self.has_quota(action_name):
            return False
        try:
            used = usage(mailbox_path(action.path, address, action.subaddress))
        except (MailboxPathError, OSError):
            return False   # the delivery attempt will say what is wrong
        return bool((action.quota_bytes and used.bytes >= action.quota_bytes) or
                    (action.quota_messages and used.messages >= action.quota_messages))

    def expand(self, action_name: str, address: str) -> list[str] | None:
        """The final targets of an alias; None when ``address`` is not an alias."""
        aliases = self._aliases(action_name)
        local, domain = self._split(action_name, address)
        key = _alias_key(aliases, local, domain)
        if key is None:
            return None
        targets: list[str] = []
        self._expand(aliases, key, domain, [], targets)
        return list(dict.fromkeys(targets))[:MAX_TARGETS]

    def _expand(self, aliases: Aliases, name: str, domain: str,
                chain: list[str], out: list[str]) -> None:
        if name in chain or len(chain) >= MAX_DEPTH:
            raise AliasLoop(" -> ".join([*chain, name]))
        for target in aliases[name]:
            if target.startswith(":include:"):
                for included in self._include(target[len(":include:"):].strip()):
                    self._one(aliases, included, domain, [*chain, name], out)
            else:
                self._one(aliases, target, domain, [*chain, name], out)

    def _one(self, aliases: Aliases, target: str, domain: str,
             chain: list[str], out: list[str]) -> None:
        if target.startswith(("|", "/")) or "@" in target:
            out.append(target)
            return
        name = target.lstrip("\\").lower()
        if target.startswith("\\"):   # \name: the mailbox itself, never expanded again
            out.append(f"\\{name}@{domain}")
        elif name in aliases:
            self._expand(aliases, name, domain, chain, out)
        else:
            out.append(f"{name}@{domain}")

    def _include(self, path: str) -> list[str]:
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except (OSError, UnicodeDecodeError) as exc:
            maillog.error("aliases-include-unreadable", file=path, reason=str(exc))
            return []
        lines = (line.split("#", 1)[0] for line in text.splitlines())
        return [t for line in lines for t in (target_text(p) for p in split_targets(line)) if t]

    def _split(self, action_name: str, address: str) -> tuple[str, str]:
        delimiter = self.config.actions[action_name].subaddress
        try:
            mailbox = parse_mailbox(address, utf8=True)
            local, domain = mailbox.local, mailbox.ascii_domain.lower()
        except AddressError:
            local, _, domain = address.rpartition("@")
        if delimiter and delimiter in local:
            local = local.split(delimiter, 1)[0]
        return local.lower(), domain

    def _users(self, action_name: str) -> Container[str]:
        name = self.config.actions[action_name].users
        table = self.config.tables.get(name) if name else None
        if table is None:
            return frozenset()
        if table.query:
            return self._sqlite(table.path, table.query)
        if not table.path:
            return frozenset(e.lower() for e in table.entries)
        source = self._lists.get(table.path)
        if source is None:
            source = self._lists[table.path] = _ListFile(
                table.path, entries=frozenset(e.lower() for e in table.entries))
        return source.current()

    def _sqlite(self, path: str, query: str) -> _SqliteTable:
        source = self._databases.get((path, query))
        if source is None:
            source = self._databases[(path, query)] = _SqliteTable(path, query)
        return source

    def _aliases(self, action_name: str) -> Aliases:
        name = self.config.actions[action_name].aliases
        table = self.config.tables.get(name) if name else None
        if table is not None and table.query:
            return self._sqlite(table.path, table.query)
        if table is None or not table.path:
            return {}
        source = self._files.get(table.path)
        if source is None:
            source = self._files[table.path] = _AliasFile(table.path)
        return source.current()


def _checks_recipients(action: ActionConfig) -> bool:
    """Whether the action knows its recipients (else it takes every local part)."""
    return bool(action.users or action.aliases or action.owner == OWNER_RECIPIENT)
