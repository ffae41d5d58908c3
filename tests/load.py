"""Client threads that keep sending mail to a tayori that is being killed (crash tests).

``ClientLoad`` runs ``clients`` threads; each opens sessions and sends message after
message while ``up`` is set, until ``finish``. What one message is, and what its ``250``
acknowledges, a subclass says in :meth:`ClientLoad.send_one`. A dropped connection (tayori
was killed) is expected: the thread reconnects. A wrong reply is kept in ``errors`` and
ends that thread: the test fails with it. Replies are read by :class:`WholeLineClient`,
which refuses a reply line cut short by a kill (a truncated ``250`` is no acknowledgement).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from harness import Client, Reply, Tayori, wait_for


class WholeLineClient(Client):
    """A client that refuses truncated replies: a reply line cut by the kill is not a 250."""

    def reply(self) -> Reply:
        lines = []
        while True:
            raw = self.file.readline(4096)
            if not raw.endswith(b"\r\n"):
                raise ConnectionError(f"connection lost mid-reply: {raw!r}")
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            code, sep, rest = int(text[:3]), text[3:4], text[4:]
            lines.append(rest)
            if sep != "-":
                return Reply(code, lines)


def _set_event() -> threading.Event:
    event = threading.Event()
    event.set()
    return event


@dataclass
class ClientLoad:
    server: Tayori
    clients: int
    timeout: float = 15
    up: threading.Event = field(default_factory=_set_event)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    acked: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def count(self) -> int:
        with self.lock:
            return len(self.acked)

    def start(self) -> None:
        for n in range(self.clients):
            thread = threading.Thread(target=self._run, args=(n,), name=f"load-{n}")
            thread.start()
            self.threads.append(thread)

    def finish(self) -> None:
        self.stop.set()
        self.up.set()
        for thread in self.threads:
            thread.join(60)
            assert not thread.is_alive(), f"{thread.name} is stuck"

    def send_one(self, client: Client, n: int, seq: int) -> None:
        """Send message ``seq`` of client ``n`` and record what its 250 acknowledged."""
        raise NotImplementedError

    def _run(self, n: int) -> None:
        seq = 0
        while not self.stop.is_set():
            if not self.up.wait(1):
                continue
            try:
                with WholeLineClient(self.server.host, self.server.port,
                                     timeout=self.timeout) as client:
                    client.greeting_and_ehlo()
                    while not self.stop.is_set():
                        seq += 1
                        self.send_one(client, n, seq)
            except OSError:  # killed: connection refused, reset, closed or timed out
                self.stop.wait(0.01)
            except Exception as exc:  # a wrong reply: the test fails with it
                with self.lock:
                    self.errors.append(f"client {n} message {seq}: {exc!r}")
                return


def sent(client: Client, sender: str, recipients: list[str], data: bytes) -> Reply:
    """One whole transaction that must end in 250 (``data`` as typed, not yet stuffed)."""
    reply = client.send_message(sender, recipients, data.replace(b"\r\n.", b"\r\n.."))
    assert reply.code == 250, f"DATA: {reply}"
    return reply


def crash_message(client: int, seq: int, sender: str, recipients: tuple[str, ...],
                  tag: str) -> tuple[str, bytes]:
    """A message with a unique Message-ID (returned as its token) and a known last line."""
    token = f"{client}.{seq}@{tag}.test"
    head = (f"From: <{sender}>\r\nTo: " + ", ".join(f"<{r}>" for r in recipients) +
            f"\r\nMessage-ID: <{token}>\r\nSubject: {tag} {client}-{seq}\r\n\r\n").encode()
    line = (f"{client}-{seq} " + "0123456789" * 8)[:78].encode() + b"\r\n"
    body = line * (5 + (seq * 7) % 40) + b".a line that needs dot-stuffing\r\n"
    return token, head + body + f"last line of {client}-{seq}\r\n".encode()


@dataclass
class TrackedLoad(ClientLoad):
    """Messages from ``sender`` to ``recipients``; ``acked`` and ``attempted`` map
    Message-IDs to the bytes sent (attempted: every message begun, acknowledged or not)."""

    sender: str = ""
    recipients: tuple[str, ...] = ()
    tag: str = "crash"
    attempted: dict[str, bytes] = field(default_factory=dict)

    def send_one(self, client: Client, n: int, seq: int) -> None:
        token, data = crash_message(n, seq, self.sender, self.recipients, self.tag)
        with self.lock:
            self.attempted[token] = data
        sent(client, self.sender, list(self.recipients), data)
        with self.lock:
            self.acked[token] = data


class Killer(Protocol):
    def kill(self, server: Tayori) -> None: ...


def kill_under_load(server: Tayori, load: ClientLoad, kills: Killer, delivered: Callable[[],
                    int], *, times: int, seed: int, errors: Callable[[], list[str]]) -> None:
    """``times`` times: a seeded number of deliveries (``delivered()`` counts them) after
    the start, a seeded pause, SIGKILL, restart; then the load stops and tayori is killed
    once more, without load."""
    rng = random.Random(seed)
    load.start()
    try:
        for kill in range(times):
            target = delivered() + rng.randint(10, 100)
            wait_for(lambda t=target: delivered() >= t or load.errors,
                     timeout=30, interval=0.002, what=f"deliveries before kill {kill}")
            assert not load.errors, (load.errors, errors()[:3])
            time.sleep(rng.uniform(0, 0.03))   # a random moment: what the kill interrupts
            kills.kill(server)
            server.start()
        wait_for(lambda: load.count() >= times * 20 or load.errors, timeout=30,
                 what="more acknowledged messages")
    finally:
        load.finish()
    assert not load.errors, (load.errors, errors()[:3])
    kills.kill(server)
