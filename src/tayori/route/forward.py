"""System accounts as mail recipients, and their ``.forward`` files.

Takes: a recipient address of a ``maildir`` action, its subaddress delimiter, and (for
:func:`forward_of`) the action's ``forward_path`` template and the account whose
``.forward`` made the recipient, if one did.
Promises:
- :func:`system_account` is the password-database entry named by the address's local
  part (lower-cased, without ``+tag``), or None; root is never one (mail for root is
  for an alias to name a person).
- :func:`forward_of` reads the account's ``.forward`` (``{home}`` and ``{user}`` in the
  template replaced; the file's name must be ``.forward`` or end in ``.forward``, see
  :mod:`tayori.deliver.privileged`) as that user: through the privileged helper when
  it runs (tayori started as root), directly when tayori is that user (or root
  without a helper, as in tests). The file is used
  only when it is a regular file, not a symbolic link, owned by the account or root and
  writable by nobody else (sendmail's and Postfix's rule); an unusable one is logged
  and ignored, as if absent, and so is an empty one. A recipient that the account's own
  ``.forward`` made is never expanded by it again. Its targets, aliases(5) syntax
  (commas or lines, ``#`` comments, quoted ``"|command, with commas"``): addresses;
  bare names (local to the recipient's domain); ``\\name`` (that mailbox itself, not
  expanded again: the usual way to keep a copy); the account's own address (in the
  recipient's domain, with any ``+tag``, any case, any name of its uid), which means
  ``\\account@domain``; ``|command`` and ``/file``, which the caller runs as the account.
  Duplicates are dropped, and at most :data:`MAX_TARGETS` are kept (logged).
  ``:include:`` is not honoured in a ``.forward`` (logged).
Failure policy: when the file cannot be read now (the helper does not answer) or the
password database fails (OSError) raises :class:`ForwardUnavailable`, and the delivery
is deferred: mail is never delivered to the mailbox by mistake because its redirection
could not be read. A name the password database does not know (KeyError) has no
``.forward``: that is what it says for "no such user", and CPython's ``pwd`` says it
for an NSS backend that fails to answer too, which cannot be told apart (such mail goes
to the mailbox path; an ``owner = "recipient"`` action defers it, as it must know the
account).
Config keys: ``actions.NAME.forward``, ``actions.NAME.forward_path``.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass

from tayori import maillog
from tayori.deliver import privileged
from tayori.route.aliases import split_targets, target_text

MAX_TARGETS = 1000
"""Targets one alias or ``.forward`` expands into, at most."""


class ForwardUnavailable(Exception):
    """The ``.forward`` could not be read now; try again later."""


@dataclass(frozen=True, slots=True)
class Forward:
    user: str                   # the account the targets run as
    targets: tuple[str, ...]


def system_account(address: str, delimiter: str) -> pwd.struct_passwd | None:
    """The account the address's local part names; None for none, and for root. Raises
    OSError when the password database fails (not for an unknown name)."""
    local = address.lstrip("\\").rpartition("@")[0] or address
    if delimiter and delimiter in local[1:]:
        local = local[0] + local[1:].split(delimiter, 1)[0]
    try:
        account = pwd.getpwnam(local.lower())
    except (KeyError, ValueError):   # ValueError: a NUL in the name
        return None
    return account if account.pw_uid != 0 else None


def forward_of(template: str, address: str, delimiter: str,
               expanded_by: str = "") -> Forward | None:
    """The redirection of ``address``'s system account; None when it has none, or when
    that account's own ``.forward`` made ``address`` (``expanded_by``)."""
    try:
        account = system_account(address, delimiter)
    except OSError as exc:
        raise ForwardUnavailable(f"password database: {exc.strerror or exc}") from None
    if account is None or account.pw_name == expanded_by:
        return None
    path = template.replace("{home}", account.pw_dir).replace("{user}", account.pw_name)
    text = _read(account, path)
    if text is None:
        return None
    domain = address.rpartition("@")[2]
    try:
        targets = list(dict.fromkeys(
            target for line in text.splitlines() if not line.lstrip().startswith("#")
            for part in split_targets(line)
            if (target := _target(target_text(part), domain, account, delimiter, path))))
    except OSError as exc:
        raise ForwardUnavailable(f"password database: {exc.strerror or exc}") from None
    if len(targets) > MAX_TARGETS:
        maillog.warning("forward-truncated", file=path, targets=len(targets), kept=MAX_TARGETS)
    return Forward(account.pw_name, tuple(targets[:MAX_TARGETS])) if targets else None


def _target(text: str, domain: str, account: pwd.struct_passwd, delimiter: str,
            path: str) -> str:
    if not text:
        return ""
    if text.startswith(":include:"):
        maillog.warning("forward-include-ignored", file=path, target=text)
        return ""
    if text.startswith(("|", "/")):
        return text
    name = text.lstrip("\\")
    address = name if "@" in name else f"{name}@{domain}"
    if _own(address, domain, account, delimiter):
        return f"\\{account.pw_name}@{domain}".lower()
    if text.startswith("\\"):
        return "\\" + address
    return address


def _own(address: str, domain: str, account: pwd.struct_passwd, delimiter: str) -> bool:
    """Whether ``address`` is the account's own: in the recipient's domain, and its
    local part (any case, any +tag) names the same uid."""
    if address.rpartition("@")[2].lower() != domain.lower():
        return False
    named = system_account(address, delimiter)
    return named is not None and named.pw_uid == account.pw_uid


def _read(account: pwd.struct_passwd, path: str) -> str | None:
    try:
        if privileged.available() is not None:
            return privileged.read_file(account.pw_uid, path)
        if os.geteuid() not in (0, account.pw_uid):
            maillog.warning("forward-unreadable", file=path,
                            reason="tayori was not started as root")
            return None
        return privileged.read_owned_file(path, account.pw_uid)
    except privileged.RefusedFile as exc:
        maillog.warning("forward-ignored", file=path, reason=str(exc))
        return None
    except privileged.HelperUnavailable as exc:
        raise ForwardUnavailable(str(exc)) from None
