"""Maildir delivery read back through a real Dovecot IMAP server (issue 4).

Messages delivered with :func:`tayori.deliver.maildir.deliver` into the Maildir of a
user of a private Dovecot (:class:`peers.DovecotImap`) are fetched with imaplib (LOGIN,
EXAMINE, FETCH BODY.PEEK[]): each is byte-identical to what tayori received (CRLF line
ends, as IMAP gives them) apart from the Return-Path and Delivered-To it prepends, and
its RFC822.SIZE is the ``W=`` of the file name. Also: the MIME corpus
(../shared/testdata/mime), 4 processes x 25 messages into one mailbox at once with an
IMAP session watching, and a +tag folder appearing as an IMAP mailbox.
"""

from __future__ import annotations

import imaplib
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import SHARED, TIMEOUT, shared_data, wait_for
from peers import DovecotImap, ImapMessage
from tayori.deliver.maildir import deliver

pytestmark = pytest.mark.peer

DOMAIN = "imap.test"
USERS = ("plain", "corpus", "busy", "tagged")
HOST = "mx.tayori.test"
MIME = SHARED / "mime"
CORPUS = sorted([*MIME.glob("*.eml"), *MIME.glob("cpython-email/*.txt")]) \
    if MIME.exists() else []


@pytest.fixture(scope="module")
def imap() -> Iterator[DovecotImap]:
    with DovecotImap(users={f"{user}@{DOMAIN}": None for user in USERS}) as server:
        yield server
        # Dovecot found nothing wrong in the Maildirs (a wrong S= or W= is logged as an
        # error: "Cached message size mismatch", "Broken physical size"...).
        complaints = [line for line in server.log_path.read_text().splitlines()
                      if re.search(r": (Warning|Error|Panic|Fatal): ", line)]
        assert not complaints, "\n".join(complaints)


def crlf(data: bytes) -> bytes:
    """The message as the spool holds it: CRLF line ends, ending in one."""
    data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def store(imap: DovecotImap, user: str, body: bytes, sender: str, *, spool: Path,
          folder: str = "") -> str:
    """Deliver ``body`` (as a spool file in ``spool``) to ``user``; the name in new/."""
    rcpt = f"{user}@{DOMAIN}"
    path = spool / f"body-{len(list(spool.iterdir()))}"
    path.write_bytes(body)
    return deliver(str(imap.maildir(rcpt)), str(path), return_path=sender,
                   delivered_to=rcpt, hostname=HOST, folder=folder, owner=imap.owner)


def trace(sender: str, user: str) -> bytes:
    return f"Return-Path: <{sender}>\r\nDelivered-To: {user}@{DOMAIN}\r\n".encode()


def by_sender(messages: list[ImapMessage]) -> dict[str, ImapMessage]:
    """Fetched messages keyed by their Return-Path (Dovecot's UID order is the order it
    found the files in, not necessarily the order of delivery)."""
    found = {}
    for message in messages:
        match = re.match(rb"Return-Path: <([^>]*)>\r\n", message.body)
        assert match, message.body[:200]
        found[match.group(1).decode()] = message
    assert len(found) == len(messages)
    return found


def check(message: ImapMessage, sender: str, user: str, original: bytes) -> None:
    assert message.body.startswith(trace(sender, user))
    assert message.body == trace(sender, user) + original
    assert message.size == len(message.body)   # the W= in the file name was right


def test_messages_read_back_byte_identical(imap: DovecotImap, tmp_path: Path) -> None:
    messages = {
        "simple@x.example": b"From: a@x.example\r\nTo: plain@imap.test\r\nSubject: hi\r\n"
                            b"\r\nHello.\r\n",
        "": b"Subject: from the null sender\r\n\r\nA bounce, say.\r\n",
        "eight@x.example": "Subject: =?utf-8?q?=C3=BC?=\r\nContent-Type: text/plain; "
                           "charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
                           "ünïcödé, 日本語\r\n".encode(),
        "dots@x.example": b"Subject: dots\r\n\r\n.\r\n..\r\n.leading\r\nFrom here\r\n"
                          b">From there\r\n\r\n\r\n",
        "big@x.example": b"Subject: big\r\n\r\n" + b"".join(
            b"%07d %s\r\n" % (i, b"z" * 70) for i in range(30_000)),
        "no-end@x.example": b"Subject: BDAT without a final line end\r\n\r\nlast",
    }
    names = {sender: store(imap, "plain", body, sender, spool=tmp_path)
             for sender, body in messages.items()}
    assert all(f",S={(imap.maildir('plain@imap.test') / 'new' / name).stat().st_size},"
               in name for name in names.values())
    fetched = by_sender(imap.fetch(f"plain@{DOMAIN}"))
    assert set(fetched) == set(messages)
    for sender, original in messages.items():
        check(fetched[sender], sender, "plain", original)


def test_mime_corpus_read_back_byte_identical(imap: DovecotImap, tmp_path: Path) -> None:
    shared_data("mime")
    assert len(CORPUS) >= 40
    originals = {}
    for number, path in enumerate(CORPUS):
        sender = f"corpus-{number}@x.example"
        originals[sender] = crlf(path.read_bytes())
        store(imap, "corpus", originals[sender], sender, spool=tmp_path)
    fetched = by_sender(imap.fetch(f"corpus@{DOMAIN}"))
    assert set(fetched) == set(originals)
    for sender, original in originals.items():
        check(fetched[sender], sender, "corpus", original)


DELIVER_SCRIPT = """
import sys
from pathlib import Path
from tayori.deliver.maildir import deliver
box, proc, count, spool, uid, gid = sys.argv[1:7]
for i in range(int(count)):
    deliver(box, str(Path(spool) / f"p{proc}-{i}"), return_path=f"p{proc}-{i}@x.example",
            delivered_to="busy@imap.test", hostname="mx.tayori.test",
            owner=(int(uid), int(gid)))
"""


def test_concurrent_deliveries_all_readable(imap: DovecotImap, tmp_path: Path) -> None:
    """4 processes x 25 messages into one mailbox at once, while an IMAP session has it
    selected: the session sees all 100 arrive, and each reads back whole."""
    processes, each = 4, 25
    user = f"busy@{DOMAIN}"
    originals = {}
    for p in range(processes):
        for i in range(each):
            sender = f"p{p}-{i}@x.example"
            originals[sender] = (f"Subject: {sender}\r\n\r\n".encode() +
                                 b"line\r\n" * (1 + 37 * i))
            (tmp_path / f"p{p}-{i}").write_bytes(originals[sender])
    watcher = imap.login(user)
    try:
        status, data = watcher.select("INBOX")
        assert status == "OK" and data == [b"0"], data
        uid, gid = imap.owner
        children = [subprocess.Popen(
            [sys.executable, "-c", DELIVER_SCRIPT, str(imap.maildir(user)), str(p),
             str(each), str(tmp_path), str(uid), str(gid)], stderr=subprocess.PIPE)
            for p in range(processes)]
        for child in children:
            _, err = child.communicate(timeout=120)
            assert child.returncode == 0, err.decode()
        count = 0

        def all_seen() -> bool:
            nonlocal count
            count = exists(watcher, count)
            return count == processes * each

        wait_for(all_seen, timeout=TIMEOUT, what="the IMAP session to see 100 messages")
    finally:
        watcher.logout()
    fetched = by_sender(imap.fetch(user))
    assert len(fetched) == processes * each
    assert set(fetched) == set(originals)
    for sender, original in originals.items():
        check(fetched[sender], sender, "busy", original)


def exists(client: imaplib.IMAP4, known: int) -> int:
    """The selected mailbox's message count after a NOOP (``known``: the count it had;
    the server reports EXISTS only when it changed)."""
    status, _ = client.noop()
    assert status == "OK"
    _, data = client.response("EXISTS")
    counts = [int(item) for item in data if item is not None]
    return counts[-1] if counts else known


def test_tag_folder_is_an_imap_mailbox(imap: DovecotImap, tmp_path: Path) -> None:
    user = f"tagged@{DOMAIN}"
    body = b"Subject: to a list\r\n\r\nfor tagged+lists\r\n"
    store(imap, "tagged", body, "list@x.example", spool=tmp_path, folder="Lists")
    store(imap, "tagged", body, "sub@x.example", spool=tmp_path, folder="Lists.tayori")
    assert {"INBOX", "Lists", "Lists.tayori"} <= set(imap.mailboxes(user))
    [message] = imap.fetch(user, "Lists")
    check(message, "list@x.example", "tagged", body)
    [message] = imap.fetch(user, "Lists.tayori")
    check(message, "sub@x.example", "tagged", body)
    assert imap.fetch(user) == []
