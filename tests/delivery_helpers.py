"""Helpers for delivery tests: a tayori with delivery on, submitting to it, reading what
arrived at the far end (trace headers off), MX hosts on loopback port 25.

Shared by the delivery test modules (tests/integration/test_delivery*.py). Every wait has
a deadline (harness.wait_for); nothing sleeps.
"""

from __future__ import annotations

import contextlib
import email
import email.message
import email.policy
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness import SHARED, Tayori, queued_id

MakeTayori = Callable[..., Tayori]

MIME = SHARED / "mime"
CORPUS = sorted([*MIME.glob("*.eml"), *MIME.glob("cpython-email/*.txt")]) if MIME.exists() \
    else []

RECEIVED = re.compile(rb"Received: [^\r\n]*\r?\n(?:[ \t][^\r\n]*\r?\n)*", re.IGNORECASE)
CHECK_RESULTS = re.compile(rb"(?:(?:Authentication-Results|Received-SPF):[^\n]*\n"
                           rb"(?:[ \t][^\n]*\n)*)*")


@contextlib.contextmanager
def shared_tmpdir() -> Iterator[Path]:
    """A temporary directory other users can reach (mode 0755 under /tmp), removed after:
    for peers that drop privileges (smtp-sink ``-u nobody`` writing its ``-d`` dumps),
    which cannot enter pytest's ``tmp_path`` (its parents are mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="tayori-test-"))
    path.chmod(0o755)
    try:
        yield path / "d"
    finally:
        shutil.rmtree(path, ignore_errors=True)


def can_bind_25(host: str) -> bool:
    """True when this process may listen on host:25 (root, as in CI)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, 25))
        except OSError:
            return False
    return True


def needs_port_25(host: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not can_bind_25(host),
                              reason=f"MX hosts listen on {host}:25, which needs root")


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def dot_stuff(data: bytes) -> bytes:
    stuffed = data.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


def corpus_message(path: Path) -> bytes:
    """A MIME corpus file as a message on the wire: CRLF line ends, ending in CRLF."""
    message = crlf(path.read_bytes())
    return message if message.endswith(b"\r\n") else message + b"\r\n"


def is_8bit(message: bytes) -> bool:
    return any(byte > 127 for byte in message)


def split_received(data: bytes, count: int) -> tuple[list[bytes], bytes]:
    """The first ``count`` Received fields (asserted present) and what follows them.
    The results of tayori's checks of a stranger's mail (Authentication-Results,
    Received-SPF, just above its Received) are passed over."""
    fields = []
    for _ in range(count):
        data = data[CHECK_RESULTS.match(data).end():]  # type: ignore[union-attr]
        match = RECEIVED.match(data)
        assert match, f"expected a Received field at {data[:120]!r}"
        fields.append(match.group(0))
        data = data[match.end():]
    return fields, data


@dataclass(frozen=True)
class Outgoing:
    """One message to submit: envelope, parameters, content (CRLF, not dot-stuffed)."""

    recipients: tuple[str, ...]
    message: bytes
    sender: str = "alice@sender.test"
    mail_params: str = ""
    rcpt_params: str = ""


def submit_all(tayori: Tayori, items: Iterable[Outgoing], timeout: float = 30) -> list[str]:
    """Submit each message over one SMTP session (DATA); their queue ids, in order."""
    ids = []
    with tayori.client(timeout=timeout) as client:
        client.greeting_and_ehlo()
        for item in items:
            client.expect_cmd(f"MAIL FROM:<{item.sender}>{item.mail_params}", 250)
            for rcpt in item.recipients:
                client.expect_cmd(f"RCPT TO:<{rcpt}>{item.rcpt_params}", 250)
            client.expect_cmd("DATA", 354)
            client.send(dot_stuff(item.message) + b".\r\n")
            ids.append(queued_id(client.expect(250)))
        client.expect_cmd("QUIT", 221)
    return ids


def submit(tayori: Tayori, recipients: list[str], message: bytes, **options: Any) -> str:
    """Submit one message; its queue id."""
    [queue_id] = submit_all(tayori, [Outgoing(tuple(recipients), message, **options)])
    return queue_id


def log_lines(tayori: Tayori, event: str, queue_id: str | None = None) -> list[str]:
    """The operator log lines of one event (``delivered``, ``bounced``...)."""
    needle = f" {event} queue_id={queue_id}" if queue_id else f" {event} queue_id="
    return [line for line in tayori.log().splitlines() if needle in line]


def parse_dsn(data: bytes) -> email.message.EmailMessage:
    """A DSN as received: (human part, delivery-status part, original) checked present."""
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    assert parsed.get_content_type() == "multipart/report", parsed.get_content_type()
    assert parsed.get_param("report-type") == "delivery-status"
    return parsed


def dsn_fields(dsn: email.message.EmailMessage) -> list[email.message.Message]:
    """The field groups of a DSN's message/delivery-status part: the per-message group,
    then one per recipient."""
    _human, status, *_original = dsn.iter_parts()
    assert status.get_content_type() == "message/delivery-status"
    groups = status.get_payload()
    assert isinstance(groups, list)
    return [group for group in groups if isinstance(group, email.message.Message)]


def dsn_recipients(dsn: email.message.EmailMessage) -> list[email.message.Message]:
    """The per-recipient field groups of a DSN."""
    return dsn_fields(dsn)[1:]


def sink_sessions(text: str) -> int:
    """Sessions that ended, from smtp-sink's ``-c`` counter (``sess=S quit=Q mesg=N``)."""
    counts = re.findall(r"sess=(\d+)", text)
    return int(counts[-1]) if counts else 0


def dump_recipients(path: Path) -> list[str]:
    """The recipients of one smtp-sink dump (``-d``): its X-Rcpt-Args fields."""
    return re.findall(r"^X-Rcpt-Args: <([^>]*)>", path.read_text(errors="replace"), re.M)
