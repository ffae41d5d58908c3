"""Crash safety: tayori killed with SIGKILL again and again under load loses nothing it
acknowledged.

Load: Python client threads that send numbered messages and record the queue id of each
``250 2.0.0 Ok: queued as ID`` they read in full (some messages are 2 MB, beyond the
in-memory draft, so they stream to ``spool/incoming``), plus smtp-source as background
load. tayori is killed with SIGKILL a dozen times at different moments and restarted on
the same spool each time. After each restart, before the load resumes: nothing is left in
``spool/incoming`` and every index row has its body file. At the end, every acknowledged
message is in the index and its body file is exactly tayori's Received header plus the
bytes sent (so it is non-empty and ends with the message's last line).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable

import pytest

from harness import Client, Tayori, queued_id, strip_received, wait_for, which_peer
from load import ClientLoad, sent

pytestmark = [pytest.mark.peer, pytest.mark.slow]
MakeTayori = Callable[..., Tayori]

KILLS = 12
CLIENTS = 4
SENDER = "crash@example.net"
BIG = 2 * 1024 * 1024  # above the spool's 256 KiB in-memory draft: streamed to incoming/


def message(client: int, seq: int) -> bytes:
    size = BIG if seq % 5 == 3 else 1500 + (seq * 131) % 3000
    head = (f"From: <{SENDER}>\r\nTo: <c{client}@tayori.test>\r\n"
            f"Message-ID: <{client}.{seq}@crash.test>\r\nSubject: crash {client}-{seq}\r\n"
            f"\r\n").encode()
    line = (f"{client}-{seq} " + "0123456789" * 8)[:78].encode() + b"\r\n"
    lines = max(1, (size - len(head)) // len(line))
    return head + line * lines + f"last line of {client}-{seq}\r\n".encode()


class Load(ClientLoad):
    """Numbered messages; ``acked`` maps each acknowledged queue id to (client, seq)."""

    def send_one(self, client: Client, n: int, seq: int) -> None:
        reply = sent(client, SENDER, [f"c{n}@tayori.test"], message(n, seq))
        with self.lock:
            self.acked[queued_id(reply)] = (n, seq)


def background_load(port: int) -> subprocess.Popen[bytes]:
    """smtp-source, sending until it is stopped (or tayori dies under it)."""
    return subprocess.Popen(
        [which_peer("smtp-source"), "-d", "-s", "4", "-m", "1000000", "-l", "2048",
         "-f", "load@example.net", "-t", "load@tayori.test", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
    process.wait(30)


def check_recovered(server: Tayori) -> None:
    """After a restart, before new load: no drafts, no index row without its body."""
    incoming = os.listdir(server.spool / "incoming")
    assert incoming == [], f"left in incoming/ after recovery: {incoming}"
    bodies = set(os.listdir(server.spool / "messages"))
    for env in server.envelopes():
        assert env.state != "corrupt", f"{env.queue_id} marked corrupt: its body was lost"
        assert env.queue_id in bodies, f"index row {env.queue_id} has no body file"


def test_sigkill_under_load_loses_no_acknowledged_message(make_tayori: MakeTayori) -> None:
    which_peer("smtp-source")  # skip before starting anything when it is missing
    server = make_tayori(limits={"drain_timeout": 1})
    load = Load(server, CLIENTS)
    load.start()
    source = background_load(server.port)
    drafts_at_kill = []
    try:
        for kill in range(KILLS):
            before = load.count()
            wait_for(lambda b=before, k=kill: load.count() >= b + 15 + 5 * k or load.errors,
                     timeout=90, interval=0.005, what=f"acknowledgements before kill {kill}")
            assert not load.errors, load.errors
            load.up.clear()
            server.kill()
            drafts_at_kill.append(len(os.listdir(server.spool / "incoming")))
            stop_process(source)
            server.start()
            check_recovered(server)
            source = background_load(server.port)
            load.up.set()
    finally:
        load.finish()
        stop_process(source)
    assert not load.errors, load.errors
    server.stop()
    server.start()  # one more recovery, then look at everything
    check_recovered(server)

    envelopes = {env.queue_id: env for env in server.envelopes()}
    assert len(load.acked) >= KILLS * 15
    missing = [qid for qid in load.acked if qid not in envelopes]
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {missing[:5]}"
    for qid, (n, seq) in load.acked.items():
        env = envelopes[qid]
        assert env.sender == SENDER
        assert [r.address for r in env.recipients] == [f"c{n}@tayori.test"]
        body = server.body(qid)
        assert body.endswith(f"last line of {n}-{seq}\r\n".encode()), qid
        assert strip_received(body) == message(n, seq), qid
    print(f"acknowledged by 250: {len(load.acked)}; queued in all: {len(envelopes)}; "
          f"files in incoming/ at each kill: {drafts_at_kill}")
