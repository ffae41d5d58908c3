"""Crash safety of local delivery: tayori killed with SIGKILL again and again while its
queue manager delivers into Maildirs loses nothing it acknowledged, never leaves a partial
file in ``new/``, and repeats only what was in flight (DESIGN §2.2: at-least-once).

The pieces are those of ``test_delivery_crash.py`` (kills, index reads after each kill)
and ``load.py`` (client threads that reconnect after a kill), with local recipients: the
harness's ``local`` action delivers ``*@tayori.test`` into
``<root>/mail/tayori.test/<user>/``. Client threads send messages, each with a unique
Message-ID, to ``a@tayori.test`` and ``b@tayori.test``; tayori (``queue.max_active``
small) is killed a dozen times, each after a seeded random number of new files in the
two ``new/`` directories plus a seeded random pause, and restarted on the same spool.
Right after each kill the index's ``inflight`` recipients are read: the only ones that
may be delivered twice. At the end, after a final restart without load and with the
queue empty:

- every acknowledged message is in both mailboxes' ``new/`` (matched by Message-ID);
- every file in ``new/`` is whole: ``Return-Path``, ``Delivered-To``, tayori's
  ``Received`` and exactly the bytes sent (LF line ends), its ``S=`` the file's size,
  and it parses as a message with that Message-ID;
- every extra copy of a (message, recipient) is matched by a kill during which that
  recipient was in flight;
- ``tmp/`` holds only files of writes a kill cut short (named with a pid of a killed
  process, at most one per recipient in flight at a kill); none of them is in ``new/``
  unless the kill fell between the link into ``new/`` and the unlink from ``tmp/`` (the
  same inode, then: a whole file).
"""

from __future__ import annotations

import collections
import email
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from test_delivery_crash import MAX_ACTIVE, Kills, log_errors, token_of, wait_all_delivered

from harness import Tayori
from load import TrackedLoad, kill_under_load

pytestmark = [pytest.mark.slow]
MakeTayori = Callable[..., Tayori]

KILLS = 12
CLIENTS = 3
SEED = 20261201
SENDER = "crash@sender.test"
RECIPIENTS = ("a@tayori.test", "b@tayori.test")
SIZE_FIELD = re.compile(r",S=(\d+),W=(\d+)$")
PID_FIELD = re.compile(r"\.M\d+P(\d+)Q\d+R[0-9a-f]+\.")


def maildir(server: Tayori, rcpt: str) -> Path:
    return server.root / "mail" / "tayori.test" / rcpt.partition("@")[0]


def listing(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except FileNotFoundError:
        return []


def new_files(server: Tayori) -> int:
    return sum(len(listing(maildir(server, rcpt) / "new")) for rcpt in RECIPIENTS)


def expected_file(rcpt: str, data: bytes, received: bytes) -> bytes:
    """The file delivery must write: trace headers, tayori's Received, the bytes sent."""
    return (f"Return-Path: <{SENDER}>\nDelivered-To: {rcpt}\n".encode() + received
            + data.replace(b"\r\n", b"\n"))


def received_of(content: bytes) -> bytes:
    """tayori's Received header (with its continuation lines) after the trace headers."""
    match = re.match(rb"Return-Path: [^\n]*\nDelivered-To: [^\n]*\n"
                     rb"(Received: [^\n]*\n(?:[ \t][^\n]*\n)*)", content)
    assert match, content[:300]
    return match.group(1)


@dataclass
class Mailboxes:
    """What the two ``new/`` directories hold, each file checked once (files in ``new/``
    never change): ``copies`` of each (Message-ID, recipient)."""

    server: Tayori
    attempted: dict[str, bytes]
    seen: set[tuple[str, str]] = field(default_factory=set)
    copies: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    inodes: set[tuple[int, int]] = field(default_factory=set)

    def scan(self) -> set[tuple[str, str]]:
        for rcpt in RECIPIENTS:
            new = maildir(self.server, rcpt) / "new"
            for name in listing(new):
                if (rcpt, name) not in self.seen:
                    self._check(rcpt, new / name)
                    self.seen.add((rcpt, name))
        return set(self.copies)

    def _check(self, rcpt: str, path: Path) -> None:
        content = path.read_bytes()
        stat = path.stat()
        self.inodes.add((stat.st_dev, stat.st_ino))
        size = SIZE_FIELD.search(path.name)
        assert size and int(size.group(1)) == len(content), f"{path.name}: S= is not the size"
        assert int(size.group(2)) == len(content) + content.count(b"\n"), f"{path.name}: W="
        token = token_of(content.replace(b"\n", b"\r\n"))
        data = self.attempted.get(token)
        assert data is not None, f"{path}: a message nobody sent: {token}"
        assert content == expected_file(rcpt, data, received_of(content)), (
            f"{path}: not the message sent (partial or changed): ...{content[-200:]!r}")
        parsed = email.message_from_bytes(content)
        assert parsed["Message-ID"] == f"<{token}>" and parsed["Delivered-To"] == rcpt
        self.copies[(token, rcpt)] += 1


def process_tree(root: int) -> set[int]:
    """root and its descendants (the running tayori: supervisor and workers)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children[int(stat.rsplit(")", 1)[1].split()[1])].append(int(entry))
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo.extend(children[pid])
    return tree


@dataclass
class Leftovers:
    """Files in ``tmp/``: writes a kill cut short."""

    partial: int = 0      # cut during the copy or before the fsync: never linked
    whole: int = 0        # written (and fsync'd or not) but not linked into new/
    linked: int = 0       # linked into new/, the kill came before the unlink from tmp/


def check_tmp(server: Tayori, boxes: Mailboxes, kills: Kills) -> Leftovers:
    assert server.process is not None
    live = process_tree(server.process.pid)
    left = Leftovers()
    for rcpt in RECIPIENTS:
        tmp = maildir(server, rcpt) / "tmp"
        new_names = listing(maildir(server, rcpt) / "new")
        for name in listing(tmp):
            pid = PID_FIELD.search(name)
            assert pid, f"{name}: not a Maildir name of tayori's"
            assert int(pid.group(1)) not in live, (
                f"tmp/{name}: left by the running tayori, not by a killed write")
            path = tmp / name
            content = path.read_bytes()
            stat = path.stat()
            match = re.search(rb"^Message-ID: <([^>]+)>$", content, re.MULTILINE)
            if match:   # far enough to name its message: it was in flight at a kill
                token = match.group(1).decode()
                assert kills.at_kill[(token, rcpt)], (
                    f"tmp/{name}: {token} to {rcpt} was not in flight at any kill")
            if stat.st_nlink > 1:
                assert (stat.st_dev, stat.st_ino) in boxes.inodes, f"tmp/{name}: linked where?"
                left.linked += 1   # the new/ file with this inode was checked whole
                continue
            assert not any(n.startswith(name + ",") for n in new_names), (
                f"tmp/{name} has a namesake in new/ that is another file")
            data = boxes.attempted.get(match.group(1).decode()) if match else None
            if data is not None and content == expected_file(rcpt, data, received_of(content)):
                left.whole += 1
            else:
                left.partial += 1
    assert left.partial + left.whole + left.linked <= sum(kills.inflight), (
        f"more files left in tmp/ ({left}) than recipients in flight at the kills")
    return left


def test_sigkill_while_delivering_locally_loses_nothing_repeats_only_inflight(
        make_tayori: MakeTayori) -> None:
    started = time.monotonic()
    kills = Kills()
    server = make_tayori(deliver=True, limits={"drain_timeout": 1},
                         queue={"max_active": MAX_ACTIVE, "retry": ["1s"]})
    load = TrackedLoad(server, CLIENTS, timeout=10, sender=SENDER, recipients=RECIPIENTS,
                       tag="local-crash")
    kill_under_load(server, load, kills, lambda: new_files(server), times=KILLS, seed=SEED,
                    errors=lambda: log_errors(server))
    server.start()  # the final restart
    boxes = Mailboxes(server, load.attempted)
    wait_all_delivered(server, boxes.scan, load.acked, RECIPIENTS, "in new/")
    left = check_tmp(server, boxes, kills)

    copies = boxes.copies
    duplicates, extra = kills.duplicates(copies)
    unacked = len({t for t, _ in copies} - load.acked.keys())
    print(f"\nkills: {len(kills.inflight)} (recipients in flight at each: {kills.inflight}); "
          f"acknowledged: {len(load.acked)} messages x {len(RECIPIENTS)} recipients; "
          f"files in new/: {sum(copies.values())}, all whole; duplicates: {extra} files "
          f"of {len(duplicates)} (message, recipient) pairs, at most {sum(kills.inflight)} "
          f"(in flight at the kills); delivered but not acknowledged (a kill cut the 250 "
          f"off): {unacked}; left in tmp/ by killed writes: {left.partial} partial, "
          f"{left.whole} whole but not linked, {left.linked} linked into new/ before the "
          f"kill (none otherwise in new/); {time.monotonic() - started:.1f} s")
