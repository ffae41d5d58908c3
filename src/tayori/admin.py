"""Operator commands that manage tayori's own data: ``tayori user`` and ``tayori dkim``.

Takes: parsed command-line arguments (registered on the ``tayori`` parser by
:func:`add_commands`) and the config file they name.
Promises:
- ``tayori user add LOGIN [--sender ADDR ...]``, ``passwd LOGIN``, ``senders LOGIN ADDR
  ...``, ``delete LOGIN``, ``list``: edit the ``auth.users`` file (each edit an atomic
  rewrite under a lock; new passwords hashed with argon2id). A password is read from the
  terminal (asked twice) or, with ``--password-stdin``, from the first line of standard
  input: never from the command line, where ``ps`` would show it.
- ``tayori dkim keygen DOMAIN SELECTOR [--algorithm rsa|ed25519] [--bits N] [--out
  FILE]``: writes a new private key (mode 0600, never replacing a file) and prints the
  DNS TXT record to publish.
Failure policy: a problem the operator can fix (user exists, no such user, mismatched
passwords, an existing key file) raises :class:`AdminError`, which the CLI prints as one
line with exit status 1.
Config keys: ``auth.users``.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable

from tayori.auth import dkim_keys
from tayori.config import load
from tayori.policy import userdb_file


class AdminError(Exception):
    pass


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser],
                 with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
                 ) -> None:
    user = commands.add_parser("user", help="manage the users of SMTP AUTH (auth.users)")
    actions = user.add_subparsers(dest="user_command", required=True)
    add = with_config(actions.add_parser("add", help="add a user"))
    add.add_argument("login")
    add.add_argument("--sender", action="append", default=[], metavar="ADDRESS",
                     help="another address (or @domain) the user may send as; repeatable")
    _password_option(add)
    add.set_defaults(func=_user_add)
    passwd = with_config(actions.add_parser("passwd", help="set a user's password"))
    passwd.add_argument("login")
    _password_option(passwd)
    passwd.set_defaults(func=_user_passwd)
    senders = with_config(actions.add_parser(
        "senders", help="set the addresses a user may send as (besides the login)"))
    senders.add_argument("login")
    senders.add_argument("addresses", nargs="*", metavar="ADDRESS")
    senders.set_defaults(func=_user_senders)
    delete = with_config(actions.add_parser("delete", help="remove a user"))
    delete.add_argument("login")
    delete.set_defaults(func=_user_delete)
    listing = with_config(actions.add_parser("list", help="list the users"))
    listing.set_defaults(func=_user_list)
    dkim = commands.add_parser("dkim", help="DKIM keys")
    dkim_actions = dkim.add_subparsers(dest="dkim_command", required=True)
    keygen = dkim_actions.add_parser(
        "keygen", help="make a signing key and print the DNS record to publish")
    keygen.add_argument("domain")
    keygen.add_argument("selector")
    keygen.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa")
    keygen.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    keygen.add_argument("--out", metavar="FILE",
                        help="the key file (default: DOMAIN.SELECTOR.pem here)")
    keygen.set_defaults(func=_dkim_keygen)


def _password_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--password-stdin", action="store_true",
                        help="read the password from the first line of standard input")


def _users_file(args: argparse.Namespace) -> str:
    config = load(args.config)
    if config.auth.backend != "file":
        raise AdminError(f"{config.file}: auth.{config.auth.backend} is the user directory; "
                         "tayori user edits only auth.users files")
    return config.auth.users


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
    else:
        try:
            password = getpass.getpass("Password: ")
            if getpass.getpass("Again: ") != password:
                raise AdminError("the passwords differ")
        except EOFError:
            raise AdminError("no password given (use --password-stdin in scripts)") from None
    if not password:
        raise AdminError("the password must not be empty")
    return password


def _edit(action: Callable[[], object]) -> None:
    try:
        action()
    except userdb_file.UserTableError as exc:
        raise AdminError(str(exc)) from None
    except OSError as exc:
        raise AdminError(f"cannot write the user file: {exc}") from None


def _user_add(args: argparse.Namespace) -> int:
    path = _users_file(args)
    password = _password(args)
    _edit(lambda: userdb_file.add_user(path, args.login, password, args.sender))
    print(f"added {args.login} to {path}")
    return 0


def _user_passwd(args: argparse.Namespace) -> int:
    path = _users_file(args)
    password = _password(args)
    _edit(lambda: userdb_file.set_password(path, args.login, password))
    print(f"password of {args.login} changed")
    return 0


def _user_senders(args: argparse.Namespace) -> int:
    path = _users_file(args)
    _edit(lambda: userdb_file.set_senders(path, args.login, args.addresses))
    print(f"senders of {args.login}: {', '.join(args.addresses) or '(the login only)'}")
    return 0


def _user_delete(args: argparse.Namespace) -> int:
    path = _users_file(args)
    _edit(lambda: userdb_file.delete_user(path, args.login))
    print(f"deleted {args.login}")
    return 0


def _user_list(args: argparse.Namespace) -> int:
    for entry in userdb_file.list_users(_users_file(args)):
        senders = f"  (also sends as {', '.join(entry.senders)})" if entry.senders else ""
        print(f"{entry.login}{senders}")
    return 0


def _dkim_keygen(args: argparse.Namespace) -> int:
    path = args.out or f"{args.domain}.{args.selector}.pem"
    try:
        record = dkim_keys.create_key(path, args.domain, args.selector, args.algorithm,
                                      args.bits)
    except FileExistsError:
        raise AdminError(f"{path} exists; choose another --out or selector") from None
    except (OSError, ValueError) as exc:
        raise AdminError(str(exc)) from None
    print(f"; private key written to {os.path.abspath(path)} (mode 0600)", file=sys.stderr)
    print(record)
    return 0
