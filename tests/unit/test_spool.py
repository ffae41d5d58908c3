"""Unit tests for tayori.queue.spool: commit, concurrent commits, recovery, failures."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from tayori.queue import spool as spool_module
from tayori.queue.spool import (
    SPILL_SIZE,
    Envelope,
    RecipientRecord,
    RecoveryReport,
    Spool,
    SpoolBusy,
    new_queue_id,
    read_envelopes,
)


def envelope(queue_id: str, size: int, *, sender: str = "a@x.example",
             recipients: tuple[RecipientRecord, ...] | None = None) -> Envelope:
    return Envelope(
        queue_id=queue_id, sender=sender,
        recipients=recipients or (
            RecipientRecord("b@y.example", "remote", orcpt="rfc822;b@y.example",
                            notify=("SUCCESS", "FAILURE")),
            RecipientRecord("c@y.example", "remote", notify=("NEVER",)),
            RecipientRecord("d@localhost", "local"),
        ),
        size=size, client_address="192.0.2.1", client_name="client.example",
        helo="client.example", protocol="ESMTPS", received_at=1_700_000_000.5,
        body_type="8BITMIME", smtputf8=True, ret="HDRS", envid="ENV+2B1",
        message_id="<m@client.example>")


async def commit(spool: Spool, body: bytes, sender: str = "a@x.example") -> Envelope:
    queue_id = new_queue_id()
    draft = spool.new_draft(queue_id)
    for start in range(0, len(body), 1000):
        draft.write(body[start : start + 1000])
    assert draft.size == len(body)
    env = envelope(queue_id, len(body), sender=sender)
    await spool.commit(draft, env)
    return env


def visible(directory: Path) -> tuple[list[str], list[str], list[Envelope]]:
    return (sorted(os.listdir(directory / "incoming")), sorted(os.listdir(directory / "messages")),
            list(read_envelopes(str(directory))))


def test_queue_ids_are_unique_and_sortable() -> None:
    ids = [new_queue_id(1_700_000_000.0 + i) for i in range(200)]
    assert len(set(ids)) == 200
    assert ids == sorted(ids, key=lambda q: (len(q), q))
    assert all(set(q) <= set(spool_module._CROCKFORD) for q in ids)


def test_commit_then_read_envelopes(tmp_path: Path) -> None:
    async def main() -> Envelope:
        spool = Spool(str(tmp_path))
        assert spool.open() == RecoveryReport(0, 0, (), 0)
        try:
            return await commit(spool, b"Subject: hi\r\n\r\nbody\r\n", sender="")
        finally:
            spool.close()

    env = asyncio.run(main())
    incoming, messages, stored = visible(tmp_path)
    assert incoming == [] and messages == [env.queue_id]
    assert stored == [env]
    assert stored[0].sender == ""
    assert [(r.address, r.notify, r.orcpt, r.state) for r in stored[0].recipients] == [
        ("b@y.example", ("SUCCESS", "FAILURE"), "rfc822;b@y.example", "queued"),
        ("c@y.example", ("NEVER",), None, "queued"),
        ("d@localhost", None, None, "queued")]
    assert (tmp_path / "messages" / env.queue_id).read_bytes() == b"Subject: hi\r\n\r\nbody\r\n"
    assert list(read_envelopes(str(tmp_path), env.queue_id)) == [env]
    assert list(read_envelopes(str(tmp_path), "NOSUCHID")) == []


def test_large_draft_is_spilled_and_committed(tmp_path: Path) -> None:
    body = bytes(range(256)) * (SPILL_SIZE // 256 * 3 + 7)

    async def main() -> Envelope:
        spool = Spool(str(tmp_path))
        spool.open()
        try:
            return await commit(spool, body)
        finally:
            spool.close()

    env = asyncio.run(main())
    assert (tmp_path / "messages" / env.queue_id).read_bytes() == body
    assert os.listdir(tmp_path / "incoming") == []


def test_concurrent_commits_all_land(tmp_path: Path) -> None:
    async def main() -> list[Envelope]:
        spool = Spool(str(tmp_path))
        spool.open()
        try:
            return list(await asyncio.gather(
                *(commit(spool, f"message {i}\r\n".encode() * (i + 1)) for i in range(50))))
        finally:
            spool.close()

    envs = asyncio.run(main())
    assert len({env.queue_id for env in envs}) == 50
    stored = {env.queue_id: env for env in read_envelopes(str(tmp_path))}
    assert stored == {env.queue_id: env for env in envs}
    for env in envs:
        body = (tmp_path / "messages" / env.queue_id).read_bytes()
        assert len(body) == env.size
    assert os.listdir(tmp_path / "incoming") == []


def test_recovery_on_open(tmp_path: Path) -> None:
    async def fill() -> list[Envelope]:
        spool = Spool(str(tmp_path))
        spool.open()
        try:
            return [await commit(spool, f"m{i}\r\n".encode()) for i in range(3)]
        finally:
            spool.close()

    lost, interrupted, untouched = asyncio.run(fill())
    # a crash leaves: a draft in incoming/, a body never indexed, an index row whose body
    # is gone, and a delivery attempt that never finished
    (tmp_path / "incoming" / "DRAFT1").write_bytes(b"half a message")
    (tmp_path / "messages" / "ORPHAN1").write_bytes(b"never acknowledged")
    (tmp_path / "messages" / lost.queue_id).unlink()
    db = sqlite3.connect(tmp_path / "index.sqlite3")
    with db:
        db.execute("UPDATE recipients SET state = 'inflight' WHERE message = ? AND idx < 2",
                   (interrupted.queue_id,))
        db.execute("UPDATE recipients SET state = 'delivered' WHERE message = ? AND idx = 2",
                   (interrupted.queue_id,))
    db.close()

    spool = Spool(str(tmp_path))
    report = spool.open()
    spool.close()
    assert report == RecoveryReport(removed_incoming=1, removed_orphans=1,
                                    corrupt=(lost.queue_id,), requeued=2)
    incoming, messages, stored = visible(tmp_path)
    assert incoming == []
    assert messages == sorted([interrupted.queue_id, untouched.queue_id])
    by_id = {env.queue_id: env for env in stored}
    assert set(by_id) == {lost.queue_id, interrupted.queue_id, untouched.queue_id}
    assert by_id[lost.queue_id].state == "corrupt"  # marked, never deleted
    assert len(by_id[lost.queue_id].recipients) == 3
    assert [r.state for r in by_id[interrupted.queue_id].recipients] == [
        "queued", "queued", "delivered"]
    assert by_id[untouched.queue_id] == untouched

    again = Spool(str(tmp_path))
    assert again.open() == RecoveryReport(0, 0, (), 0)  # already recovered: nothing to do
    again.close()


def test_second_spool_on_the_same_directory_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_module, "LOCK_WAIT", 0.1)
    first = Spool(str(tmp_path))
    first.open()
    try:
        second = Spool(str(tmp_path))
        with pytest.raises(SpoolBusy, match=str(os.getpid())):
            second.open()
        second.close()
    finally:
        first.close()
    third = Spool(str(tmp_path))
    third.open()
    third.close()


def _break_messages_dir(directory: Path, how: str) -> None:
    messages = directory / "messages"
    if how == "read-only":
        messages.chmod(0o500)
    elif how == "missing":
        shutil.rmtree(messages)
    else:
        shutil.rmtree(messages)
        messages.write_bytes(b"not a directory")


@pytest.mark.parametrize("how", ["read-only", "missing", "not a directory"])
@pytest.mark.parametrize("size", [100, SPILL_SIZE + 100])
def test_failed_commit_raises_and_leaves_nothing_visible(tmp_path: Path, how: str,
                                                         size: int) -> None:
    if how == "read-only" and os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")

    async def main() -> None:
        spool = Spool(str(tmp_path))
        spool.open()
        try:
            _break_messages_dir(tmp_path, how)
            with pytest.raises(OSError):
                await commit(spool, b"x" * size)
        finally:
            spool.close()
            if how == "read-only":
                (tmp_path / "messages").chmod(0o750)

    asyncio.run(main())
    assert os.listdir(tmp_path / "incoming") == []
    assert list(read_envelopes(str(tmp_path))) == []
    if (tmp_path / "messages").is_dir():
        assert os.listdir(tmp_path / "messages") == []


def test_failed_index_write_raises_and_leaves_nothing_visible(tmp_path: Path) -> None:
    async def main() -> Envelope:
        spool = Spool(str(tmp_path))
        spool.open()
        try:
            kept = await commit(spool, b"first\r\n")
            db = sqlite3.connect(tmp_path / "index.sqlite3")
            db.execute("CREATE TRIGGER refuse BEFORE INSERT ON messages "
                       "BEGIN SELECT RAISE(ABORT, 'refused by test'); END")
            db.commit()
            db.close()
            with pytest.raises(sqlite3.Error):
                await commit(spool, b"second\r\n")
            return kept
        finally:
            spool.close()

    kept = asyncio.run(main())
    incoming, messages, stored = visible(tmp_path)
    assert incoming == [] and messages == [kept.queue_id]
    assert stored == [kept]


def test_failed_directory_fsync_raises_and_leaves_nothing_visible(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_fsync(path: str) -> None:
        raise OSError(5, "Input/output error")

    async def main() -> None:
        spool = Spool(str(tmp_path))
        spool.open()
        try:
            monkeypatch.setattr(spool_module, "_fsync_dir", broken_fsync)
            with pytest.raises(OSError, match="Input/output"):
                await commit(spool, b"body\r\n")
        finally:
            spool.close()

    asyncio.run(main())
    assert visible(tmp_path) == ([], [], [])


def test_draft_write_error_is_raised_at_commit(tmp_path: Path) -> None:
    async def main() -> None:
        spool = Spool(str(tmp_path))
        spool.open()
        try:
            shutil.rmtree(tmp_path / "incoming")
            draft = spool.new_draft(new_queue_id())
            draft.write(b"y" * (SPILL_SIZE + 1))  # spills: the file cannot be created
            assert draft.error is not None
            draft.write(b"more")  # ignored once failed
            with pytest.raises(OSError):
                await spool.commit(draft, envelope(draft.queue_id, draft.size))
        finally:
            spool.close()

    asyncio.run(main())
    assert os.listdir(tmp_path / "messages") == []
    assert list(read_envelopes(str(tmp_path))) == []


def test_commit_before_open_is_an_error(tmp_path: Path) -> None:
    async def main() -> None:
        spool = Spool(str(tmp_path))
        try:
            draft = spool.new_draft(new_queue_id())
            with pytest.raises(RuntimeError):
                await spool.commit(draft, envelope(draft.queue_id, 0))
        finally:
            spool.close()

    asyncio.run(main())


def test_read_envelopes_without_an_index(tmp_path: Path) -> None:
    assert list(read_envelopes(str(tmp_path / "nothing"))) == []
