"""Crash safety while delivering: tayori killed with SIGKILL again and again while its
queue manager relays mail loses nothing it acknowledged, and repeats only what was in
flight (DESIGN §2.2: at-least-once).

The sink is a :class:`~tayori.testing.peer.SmtpPeer` on a free 127.0.0.1 port, reached by
tayori's ``remote`` action as a ``relay`` (no DNS, no port 25). Load: client threads send
messages with two recipients each, continuously, and record the Message-ID of each one
acknowledged by a complete ``250`` line. tayori (``queue.max_active`` small, so at most a
few recipients are in flight at any time) is killed with SIGKILL a dozen times, each time
after a seeded random number of deliveries since its start plus a seeded random pause,
and restarted on the same spool. Right after each kill (once the spool lock is free: the
workers are gone too) the index is read: its ``inflight`` recipients are the only ones
that may reach the sink twice. At the end, after a final restart without load: every
acknowledged message reached the sink once for each recipient, with the bytes sent
(after tayori's Received header); every extra copy of a (message, recipient) is matched
by a kill during which that recipient was in flight; the queue and the spool are empty.
"""

from __future__ import annotations

import collections
import fcntl
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from harness import Tayori, wait_for
from load import TrackedLoad, kill_under_load
from tayori.testing.peer import SmtpPeer

pytestmark = [pytest.mark.slow]
MakeTayori = Callable[..., Tayori]

KILLS = 12
CLIENTS = 3
MAX_ACTIVE = 6          # recipients in flight at once: the window a kill may repeat
SEED = 20261128
SENDER = "crash@sender.test"
RECIPIENTS = ("one@dest.test", "two@other.test")
MESSAGE_ID = re.compile(rb"^Message-ID: <([^>]+)>\r$", re.MULTILINE | re.IGNORECASE)


def wait_spool_free(server: Tayori) -> None:
    """Until no process of the killed tayori holds the spool lock (its workers die with
    the supervisor, but not in the same instant)."""
    fd = os.open(server.spool / "lock", os.O_RDWR)
    try:
        def free() -> bool:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(fd, fcntl.LOCK_UN)
            return True
        wait_for(free, what="the killed tayori's workers to exit")
    finally:
        os.close(fd)


@dataclass
class Kills:
    """The kills so far, and what each left in flight in the index."""

    at_kill: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    inflight: list[int] = field(default_factory=list)

    def duplicates(self, copies: collections.Counter[tuple[str, str]]) -> tuple[
            dict[tuple[str, str], int], int]:
        """The extra copies of each (message, recipient), checked: each one is matched by
        a kill during which that recipient was in flight. Returns them and their sum."""
        duplicates = {key: n - 1 for key, n in copies.items() if n > 1}
        unexplained = {key: n for key, n in duplicates.items() if n > self.at_kill[key]}
        assert not unexplained, ("delivered more than once without being in flight at a "
                                 f"kill: {sorted(unexplained.items())[:5]}")
        extra = sum(duplicates.values())
        assert extra <= sum(self.inflight) <= len(self.inflight) * MAX_ACTIVE
        assert sum(1 for n in self.inflight if n) >= KILLS // 4, (
            f"too few kills hit deliveries in flight: {self.inflight}")
        return duplicates, extra

    def kill(self, server: Tayori) -> None:
        """SIGKILL; once its workers are gone too, note the recipients in flight: the only
        ones the next start may deliver a second time."""
        server.kill()
        wait_spool_free(server)
        left = [((env.message_id or "").strip("<>"), r.address)
                for env in server.envelopes() for r in env.recipients
                if r.state == "inflight"]
        assert len(left) <= MAX_ACTIVE, f"{len(left)} in flight: the window is not bounded"
        self.at_kill.update(left)
        self.inflight.append(len(left))


def token_of(data: bytes) -> str:
    match = MESSAGE_ID.search(data)
    assert match, data[:300]
    return match.group(1).decode()


def without_received(data: bytes) -> bytes:
    match = re.match(rb"Received: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", data)
    assert match, data[:200]
    return data[match.end():]


def log_errors(server: Tayori) -> list[str]:
    """tayori's error lines so far (its log survives the restarts)."""
    return [line[:1500] for line in server.log().splitlines() if "Z error " in line]


def wait_all_delivered(server: Tayori, delivered: Callable[[], set[tuple[str, str]]],
                       acked: dict[str, bytes], recipients: tuple[str, ...], where: str) -> None:
    """Until ``delivered()`` (Message-ID, recipient) pairs hold every acknowledged message
    for every recipient and the queue is empty; then no error in the log, no body left."""
    wanted = {(token, rcpt) for token in acked for rcpt in recipients}
    try:
        wait_for(lambda: wanted <= delivered() and not server.envelopes(), timeout=30,
                 interval=0.1, what=f"every acknowledged message {where}, queue empty")
    except AssertionError:
        lost = sorted(wanted - delivered())
        stuck = [(env.message_id, env.state, [(r.address, r.state, r.last_reply)
                                              for r in env.recipients])
                 for env in server.envelopes()]
        raise AssertionError(f"{len(lost)} acknowledged deliveries missing, e.g. {lost[:5]}; "
                             f"{len(stuck)} messages still queued, e.g. {stuck[:5]}") from None
    errors = log_errors(server)
    assert not errors, f"{len(errors)} errors in tayori's log, e.g. {errors[:3]}"
    assert os.listdir(server.spool / "messages") == [], "body files left after delivery"


def test_sigkill_while_delivering_loses_nothing_repeats_only_inflight(
        make_tayori: MakeTayori) -> None:
    started = time.monotonic()
    kills = Kills()
    with SmtpPeer("127.0.0.1", 0) as sink:
        server = make_tayori(
            deliver=True, limits={"drain_timeout": 1},
            queue={"max_active": MAX_ACTIVE, "retry": ["1s"]},
            remote={"deliver": "relay", "host": f"[127.0.0.1]:{sink.port}", "tls": "none"})
        load = TrackedLoad(server, CLIENTS, timeout=10, sender=SENDER, recipients=RECIPIENTS,
                           tag="delivery-crash")
        kill_under_load(server, load, kills, lambda: len(sink.transactions), times=KILLS,
                        seed=SEED, errors=lambda: log_errors(server))
        server.start()  # the final restart
        wait_all_delivered(server, lambda: {(token_of(m.data), rcpt) for m in sink.messages
                                            for rcpt in m.recipients},
                           load.acked, RECIPIENTS, "at the sink")
    messages = sink.messages

    copies: collections.Counter[tuple[str, str]] = collections.Counter()
    split = 0
    for got in messages:
        token = token_of(got.data)
        sent = load.attempted.get(token)
        assert sent is not None, f"the sink got a message nobody sent: {token}"
        assert got.sender == SENDER, token
        # one transaction for both, unless the active window cut the claim between them
        assert got.recipients and set(got.recipients) <= set(RECIPIENTS), got.recipients
        split += len(got.recipients) < len(RECIPIENTS)
        assert without_received(got.data) == sent, f"{token}: bytes changed on the way"
        copies.update((token, rcpt) for rcpt in got.recipients)
    duplicates, extra = kills.duplicates(copies)
    unacked = len({t for t, _ in copies} - load.acked.keys())
    print(f"\nkills: {len(kills.inflight)} (recipients in flight at each: {kills.inflight}); "
          f"acknowledged: {len(load.acked)} messages x {len(RECIPIENTS)} recipients; "
          f"delivered: {len(messages)} transactions ({split} with one recipient), "
          f"{sum(copies.values())} recipient deliveries; duplicates: {extra} recipient "
          f"deliveries of {len(duplicates)} (message, recipient) pairs, at most "
          f"{sum(kills.inflight)} (in flight at the kills); delivered but not acknowledged "
          f"(a kill cut the 250 off): {unacked}; {time.monotonic() - started:.1f} s")
