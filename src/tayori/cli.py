"""The ``tayori`` command: serve, check-config, queue (list, show, flush, hold, release,
delete), sendmail (handed to :mod:`tayori.sendmail`, whose flags are sendmail's),
user and dkim (:mod:`tayori.admin`), check-auth (:mod:`tayori.checkauth`),
config-reference.

Takes: command-line arguments.
Promises: each subcommand prints its result to stdout and exits 0; a problem the user can
fix (bad config, unknown queue id, port in use) is one line on stderr and exit status 1
(2 for wrong usage, from argparse). Never a traceback for a user error.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict

from tayori import admin, checkauth
from tayori.config import Config, ConfigError, load
from tayori.queue import wakeup
from tayori.queue.spool import Envelope, RecipientRecord, read_envelopes
from tayori.queue.store import InFlight, QueueStore


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["sendmail"]:   # sendmail's own option syntax, not argparse's
        from tayori.sendmail import main as sendmail

        return sendmail(arguments[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
    except ConfigError as exc:
        print(f"tayori: configuration error: {exc}", file=sys.stderr)
        return 1
    except (UserError, admin.AdminError) as exc:
        print(f"tayori: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return result


class UserError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tayori", description="tayori mail transfer agent")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("-c", "--config", metavar="FILE",
                         help="tayori.toml (default: the embedded default configuration)")
        return sub

    serve = with_config(commands.add_parser("serve", help="run the mail server"))
    serve.set_defaults(func=_serve)
    check = with_config(commands.add_parser("check-config", help="validate a configuration"))
    check.set_defaults(func=_check_config)
    queue = commands.add_parser("queue", help="inspect the queue")
    queue_commands = queue.add_subparsers(dest="queue_command", required=True)
    listing = with_config(queue_commands.add_parser("list", help="list queued messages"))
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(func=_queue_list)
    show = with_config(queue_commands.add_parser("show", help="show one message"))
    show.add_argument("queue_id")
    show.add_argument("--json", action="store_true", help="envelope as JSON")
    show.set_defaults(func=_queue_show)
    flush = with_config(queue_commands.add_parser(
        "flush", help="attempt delivery now (of one message, or of every waiting one)"))
    flush.add_argument("queue_id", nargs="?")
    flush.set_defaults(func=_queue_flush)
    for name, summary in (("hold", "keep a message from delivery until released"),
                          ("release", "let a held message be delivered again")):
        command = with_config(queue_commands.add_parser(name, help=summary))
        command.add_argument("queue_id")
        command.set_defaults(func=_queue_change, change=name)
    delete = with_config(queue_commands.add_parser(
        "delete", help="remove a message from the queue (no DSN unless --dsn)"))
    delete.add_argument("queue_id")
    delete.add_argument("--dsn", action="store_true",
                        help="tell the sender: a DSN for every undelivered recipient")
    delete.set_defaults(func=_queue_delete)
    reference = commands.add_parser("config-reference",
                                    help="print the configuration reference (Markdown)")
    reference.set_defaults(func=_config_reference)
    default = commands.add_parser("default-config", help="print the embedded default config")
    default.set_defaults(func=_default_config)
    admin.add_commands(commands, with_config)
    checkauth.add_command(commands, with_config)
    commands.add_parser("sendmail", add_help=False,
                        help="sendmail-compatible submission: tayori sendmail [-t] [-i] "
                             "[-f sender] [-bs] [recipient ...] (see tayori.sendmail)")
    return parser


def _serve(args: argparse.Namespace) -> int:
    from tayori.service import StartupError, run

    try:
        return run(args.config)
    except StartupError as exc:
        raise UserError(str(exc)) from None


def _check_config(args: argparse.Namespace) -> int:
    config = load(args.config)
    print(f"{config.file}: OK ({len(config.listen)} listener(s), {len(config.match)} match "
          f"rule(s), spool {config.spool})")
    return 0


def _queue_list(args: argparse.Namespace) -> int:
    config = load(args.config)
    envelopes = list(read_envelopes(config.spool))
    if args.json:
        for env in envelopes:
            print(json.dumps(_summary(env), ensure_ascii=False))
        return 0
    if not envelopes:
        print("Queue is empty.")
        return 0
    print(f"{'QUEUE ID':<16} {'SIZE':>9} {'ARRIVED (UTC)':<19} {'STATE':<8} SENDER / RECIPIENTS")
    for env in envelopes:
        print(f"{env.queue_id:<16} {env.size:>9} {_time(env.received_at):<19} {env.state:<8} "
              f"{env.sender or '<>'}")
        for rcpt in env.recipients:
            print(f"{'':<55} {rcpt.address} ({_progress(rcpt)})")
            if rcpt.last_reply:
                print(f"{'':<57} last: {' / '.join(rcpt.last_reply.splitlines())}")
    total = sum(env.size for env in envelopes)
    print(f"-- {len(envelopes)} message(s), {total} bytes.")
    return 0


def _queue_show(args: argparse.Namespace) -> int:
    config = load(args.config)
    found = list(read_envelopes(config.spool, args.queue_id))
    if not found:
        raise UserError(f"no message {args.queue_id!r} in the queue {config.spool}")
    env = found[0]
    if args.json:
        print(json.dumps(asdict(env), ensure_ascii=False, indent=2))
        return 0
    print(f"Queue ID:    {env.queue_id}")
    print(f"State:       {env.state}")
    print(f"Arrived:     {_time(env.received_at)} UTC")
    print(f"Size:        {env.size} bytes")
    print(f"Sender:      {env.sender or '<>'}")
    print(f"Client:      [{env.client_address}] HELO {env.helo} ({env.protocol})")
    print(f"Body:        {env.body_type}{' SMTPUTF8' if env.smtputf8 else ''}")
    if env.ret or env.envid:
        print(f"DSN:         RET={env.ret or '-'} ENVID={env.envid or '-'}")
    print("Recipients:")
    for rcpt in env.recipients:
        extra = "".join([f" NOTIFY={','.join(rcpt.notify)}" if rcpt.notify else "",
                         f" ORCPT={rcpt.orcpt}" if rcpt.orcpt else ""])
        print(f"  {rcpt.address}  state={rcpt.state} action={rcpt.action}{extra}")
    print("Headers:")
    path = os.path.join(config.spool, "messages", env.queue_id)  # see queue/spool.py
    try:
        with open(path, "rb") as handle:
            head = handle.read(64 * 1024)
    except OSError as exc:
        print(f"  (body file unreadable: {exc.strerror})")
        return 0
    end = head.find(b"\r\n\r\n")
    section = head[: end if end >= 0 else len(head)]
    for line in section.decode("utf-8", "replace").split("\r\n"):
        print(f"  {line}")
    return 0


def _progress(rcpt: RecipientRecord) -> str:
    parts = [rcpt.state, f"attempts {rcpt.attempts}"]
    if rcpt.state in ("queued", "deferred") and rcpt.next_attempt is not None:
        parts.append(f"next {_time(rcpt.next_attempt)}")
    return ", ".join(parts)


def _summary(env: Envelope) -> dict[str, object]:
    return {"queue_id": env.queue_id, "size": env.size, "received_at": env.received_at,
            "state": env.state, "sender": env.sender,
            "recipients": [{"address": r.address, "state": r.state, "attempts": r.attempts,
                            "next_attempt": r.next_attempt, "last_reply": r.last_reply}
                           for r in env.recipients]}


def _store(config_path: str | None, queue_id: str | None) -> tuple[Config, QueueStore]:
    config = load(config_path)
    if not os.path.exists(os.path.join(config.spool, "index.sqlite3")):
        raise UserError(f"there is no queue in {config.spool}")
    store = QueueStore(config.spool)
    if queue_id is not None and not store.exists(queue_id):
        store.close()
        raise UserError(f"no message {queue_id!r} in the queue {config.spool}")
    return config, store


def _queue_flush(args: argparse.Namespace) -> int:
    config, store = _store(args.config, args.queue_id)
    try:
        count = store.flush(args.queue_id, time.time())
    finally:
        store.close()
    wakeup.poke(config.spool)
    print(f"{count} recipient(s) due now.")
    return 0


def _queue_change(args: argparse.Namespace) -> int:
    config, store = _store(args.config, args.queue_id)
    try:
        if args.change == "hold":
            count = store.hold(args.queue_id)
        else:
            count = store.release(args.queue_id, time.time())
    finally:
        store.close()
    wakeup.poke(config.spool)
    done = "held" if args.change == "hold" else "released"
    print(f"{args.queue_id}: {count} recipient(s) {done}.")
    return 0


def _queue_delete(args: argparse.Namespace) -> int:
    config, store = _store(args.config, args.queue_id)
    try:
        if args.dsn:
            count = store.cancel(args.queue_id)
        else:
            store.remove(args.queue_id)
    except InFlight:
        raise UserError(f"{args.queue_id} is being delivered right now; try again in a "
                        "moment (or hold it first)") from None
    finally:
        store.close()
    if args.dsn:
        wakeup.poke(config.spool)
        print(f"{args.queue_id}: {count} recipient(s) will be reported to the sender, "
              "then the message removed.")
        return 0
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(config.spool, "messages", args.queue_id))  # see queue/spool.py
    print(f"{args.queue_id}: deleted.")
    return 0


def _time(stamp: float) -> str:
    return datetime.datetime.fromtimestamp(stamp, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _config_reference(args: argparse.Namespace) -> int:
    from tayori.config.reference import markdown

    sys.stdout.write(markdown())
    return 0


def _default_config(args: argparse.Namespace) -> int:
    from tayori.config import default_text

    sys.stdout.write(default_text())
    return 0
