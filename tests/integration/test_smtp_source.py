"""Postfix's smtp-source sends thousands of messages: each one it saw accepted is queued once.

smtp-source aborts with a non-zero exit status on any reply it did not expect (it is run
without ``-A``), and ``-c`` prints a counter that goes up each time a message's DATA
completes with a 2xx reply. So exit status 0 and a final counter of N mean N messages
were acknowledged with 250. The queue must then hold exactly N messages: N index rows,
N body files in ``spool/messages`` with the same ids, nothing left in ``spool/incoming``,
N distinct Message-IDs (smtp-source numbers its messages), each body the size the index
says. The counting method itself is checked against smtp-sink.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from harness import Tayori
from peers import SmtpSink, smtp_source

pytestmark = pytest.mark.peer
MakeTayori = Callable[..., Tayori]


def assert_queue_holds(server: Tayori, count: int, recipients: list[str],
                       payload: int) -> None:
    """Exactly ``count`` messages, each complete, each with ``recipients``."""
    envelopes = server.envelopes()
    ids = [env.queue_id for env in envelopes]
    assert len(ids) == count, f"{len(ids)} in the index, smtp-source counted {count}"
    assert len(set(ids)) == count
    files = set(os.listdir(server.spool / "messages"))
    assert files == set(ids), (f"{len(files - set(ids))} files without index row, "
                               f"{len(set(ids) - files)} rows without file")
    assert os.listdir(server.spool / "incoming") == []
    assert len({env.message_id for env in envelopes}) == count, "a message was queued twice"
    for env in envelopes:
        assert sorted(r.address for r in env.recipients) == sorted(recipients), env
        assert env.sender == "a@x.test"
        assert env.size > payload
        assert os.path.getsize(server.spool / "messages" / env.queue_id) == env.size


def rcpts(count: int) -> list[str]:
    """The recipients smtp-source makes with ``-r count``: u@..., 2u@..., 3u@..."""
    return ["u@tayori.test"] + [f"{n}u@tayori.test" for n in range(2, count + 1)]


def test_the_counter_counts_accepted_messages() -> None:
    """Control: against smtp-sink, smtp-source's counter equals smtp-sink's."""
    with SmtpSink() as sink:
        run = smtp_source(sink.port, "-s", "5", "-m", "300", "-l", "512",
                          "-f", "a@x.test", "-t", "u@y.test")
        assert run.returncode == 0, run.stderr
        assert run.counter == 300
        sink.stop()
        assert sink.counter() == 300


@pytest.mark.slow
def test_3000_messages_20_sessions_one_connection_each(make_tayori: MakeTayori) -> None:
    server = make_tayori()
    run = smtp_source(server.port, "-s", "20", "-m", "3000", "-l", "4096",
                      "-f", "a@x.test", "-t", "u@tayori.test")
    assert run.returncode == 0, run.stderr
    assert run.counter == 3000
    assert_queue_holds(server, run.counter, rcpts(1), 4096)


def test_reused_connections_five_recipients(make_tayori: MakeTayori) -> None:
    """``-d``: many messages per connection; ``-r 5``: five recipients each."""
    server = make_tayori()
    run = smtp_source(server.port, "-d", "-s", "10", "-m", "1000", "-l", "1024", "-r", "5",
                      "-f", "a@x.test", "-t", "u@tayori.test")
    assert run.returncode == 0, run.stderr
    assert run.counter == 1000
    assert_queue_holds(server, run.counter, rcpts(5), 1024)


def test_large_messages_reused_connections(make_tayori: MakeTayori) -> None:
    """300 KB messages: beyond the in-memory draft size, so streamed to incoming/."""
    server = make_tayori()
    run = smtp_source(server.port, "-d", "-s", "8", "-m", "200", "-l", str(300 * 1024),
                      "-f", "a@x.test", "-t", "u@tayori.test")
    assert run.returncode == 0, run.stderr
    assert run.counter == 200
    assert_queue_holds(server, run.counter, rcpts(1), 300 * 1024)
