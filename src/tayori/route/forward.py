"""System accounts as mail recipients, and their ``.forward`` files.

Takes: a recipient address of a ``maildir`` action, its subaddress delimiter, and (for
:func:`forward_of`) the action's ``forward_path`` template.
Promises:
- :func:`system_account` is the password-database entry named by the address's local
  part (lower-cased, without ``+tag``), or None; root is never one (mail for root is
  for an alias to name a person).
- :func:`forward_of` reads the account's ``.forward`` (``{home}`` and ``{user}`` in the
  template replaced) as that user: through the privileged helper when tayori runs as
  ``user``, directly when tayori is that user or root. The file is used only when it is a
  regular file, not a symbolic link, owned by the account or root and writable by
  nobody else (sendmail's and Postfix's rule); an unusable one is logged and ignored,
  as if absent, and so is an empty one. Its targets, aliases(5) syntax (commas or
  lines, ``#`` comments, quoted ``"|command, with commas"``): addresses; bare names
  (local to the recipient's domain); ``\\name`` (that mailbox itself, not expanded
  again: the usual way to keep a copy) and the account's own address, which means the
  same; ``|command`` and ``/file``, which the caller runs as the account.
  ``:include:`` is not honoured in a ``.forward`` (logged).
Failure policy: when the file cannot be read now (the helper does not answer) raises
:class:`ForwardUnavailable`, and the delivery is deferred: mail is never delivered to
the mailbox by mistake because its redirection could not be read.
Config keys: ``actions.NAME.forward``, ``actions.NAME.forward_path``.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass

from tayori import maillog
from tayori.deliver import privileged
from tayori.route.aliases import split_targets, target_text


class ForwardUnavailable(Exception):
    """The ``.forward`` could not be read now; try again later."""


@dataclass(frozen=True, slots=True)
class Forward:
    user: str                   # the account the targets run as
    targets: tuple[str, ...]


def system_account(address: str, delimiter: str) -> pwd.struct_passwd | None:
    local = address.lstrip("\\").rpartition("@")[0] or address
    if delimiter and delimiter in local[1:]:
        local = local[0] + local[1:].split(delimiter, 1)[0]
    try:
        account = pwd.getpwnam(local.lower())
    except (KeyError, ValueError):   # ValueError: a NUL in the name
        return None
    return account if account.pw_uid != 0 else None


def forward_of(template: str, address: str, delimiter: str) -> Forward | None:
    """The redirection of ``address``'s system account; None when it has none."""
    account = system_account(address, delimiter)
    if account is None:
        return None
    path = template.replace("{home}", account.pw_dir).replace("{user}", account.pw_name)
    text = _read(account, path)
    if text is None:
        return None
    domain = address.rpartition("@")[2]
    own = f"{account.pw_name}@{domain}".lower()
    targets = tuple(dict.fromkeys(
        target for line in text.splitlines() if not line.lstrip().startswith("#")
        for part in split_targets(line)
        if (target := _target(target_text(part), domain, own, path))))
    return Forward(account.pw_name, targets) if targets else None


def _target(text: str, domain: str, own: str, path: str) -> str:
    if not text:
        return ""
    if text.startswith(":include:"):
        maillog.warning("forward-include-ignored", file=path, target=text)
        return ""
    if text.startswith(("|", "/")):
        return text
    name = text.lstrip("\\")
    address = name if "@" in name else f"{name}@{domain}"
    if address.lower() == own:
        return "\\" + own
    if text.startswith("\\"):
        return "\\" + address
    return address


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
