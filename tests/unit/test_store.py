"""Unit tests for tayori.queue.store: claims, outcomes, removal, the operator's commands."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tayori.queue.spool import Envelope, RecipientRecord, Spool
from tayori.queue.store import Claim, InFlight, Outcome, QueuedMessage, QueueStore

T0 = 1_700_000_000.0
# the actions whose recipients wait (are not claimed): what the manager passes
ONLY_REMOTE = ("local",)
ALL: tuple[str, ...] = ()
ONLY_LOCAL = ("remote",)
NOTHING = ("remote", "local")


def envelope(queue_id: str, received_at: float = T0,
             recipients: tuple[RecipientRecord, ...] | None = None) -> Envelope:
    return Envelope(
        queue_id=queue_id, sender="a@x.example",
        recipients=recipients or (
            RecipientRecord("b@y.example", "remote", orcpt="rfc822;b@y.example",
                            notify=("SUCCESS", "FAILURE")),
            RecipientRecord("c@y.example", "remote", notify=("NEVER",)),
            RecipientRecord("d@localhost", "local"),
        ),
        size=6, client_address="192.0.2.1", client_name="client.example",
        helo="client.example", protocol="ESMTPS", received_at=received_at,
        body_type="8BITMIME", smtputf8=True, ret="HDRS", envid="ENV+2B1",
        message_id="<m@client.example>")


def one(queue_id: str, received_at: float = T0, action: str = "remote") -> Envelope:
    return envelope(queue_id, received_at, (RecipientRecord(f"{queue_id}@y.example", action),))


async def _commit_all(directory: Path, envelopes: tuple[Envelope, ...]) -> None:
    spool = Spool(str(directory))
    spool.open()
    try:
        async with asyncio.timeout(30):
            for env in envelopes:
                draft = spool.new_draft(env.queue_id)
                draft.write(b"body\r\n")
                await spool.commit(draft, env)
    finally:
        spool.close()


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def store(spool_dir: Path) -> Iterator[QueueStore]:
    asyncio.run(_commit_all(spool_dir, ()))   # creates the index
    queue_store = QueueStore(str(spool_dir))
    try:
        yield queue_store
    finally:
        queue_store.close()


def commit(store: QueueStore, *envelopes: Envelope) -> None:
    asyncio.run(_commit_all(Path(store.spool_dir), envelopes))


def rows(store: QueueStore, queue_id: str) -> list[dict[str, Any]]:
    db = sqlite3.connect(Path(store.spool_dir) / "index.sqlite3")
    db.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in db.execute(
            "SELECT * FROM recipients WHERE message = ? ORDER BY idx", (queue_id,))]
    finally:
        db.close()


def states(store: QueueStore, queue_id: str) -> list[str]:
    return [row["state"] for row in rows(store, queue_id)]


def message_state(store: QueueStore, queue_id: str) -> str | None:
    db = sqlite3.connect(Path(store.spool_dir) / "index.sqlite3")
    try:
        row = db.execute("SELECT state FROM messages WHERE id = ?", (queue_id,)).fetchone()
        return None if row is None else str(row[0])
    finally:
        db.close()


def keys(claims: list[Claim]) -> list[tuple[str, int]]:
    return sorted((claim.message.queue_id, claim.index) for claim in claims)


def outcome(claim_or_key: Claim | tuple[str, int], state: str, *, next_attempt: float = T0,
            at: float = T0, warned: bool = False) -> Outcome:
    queue_id, index = (claim_or_key if isinstance(claim_or_key, tuple)
                       else (claim_or_key.message.queue_id, claim_or_key.index))
    return Outcome(queue_id, index, state, 1, next_attempt, f"reply {state}", "4.4.1",
                   "mx.y.example", at, warned)


# --- claim -------------------------------------------------------------------------------


def test_claim_returns_the_recipients_with_their_message(store: QueueStore) -> None:
    commit(store, envelope("A1"))
    claims = sorted(store.claim(T0, 10, ALL), key=lambda c: c.index)
    message = QueuedMessage("A1", "a@x.example", 6, "8BITMIME", True, "HDRS", "ENV+2B1", T0,
                            "192.0.2.1", "client.example", "ESMTPS")
    assert claims == [
        Claim(message, 0, "b@y.example", "rfc822;b@y.example", ("SUCCESS", "FAILURE"),
              "remote", 0, False, False, None, None, None),
        Claim(message, 1, "c@y.example", None, ("NEVER",), "remote", 0, False, False,
              None, None, None),
        Claim(message, 2, "d@localhost", None, None, "local", 0, False, False, None, None,
              None)]


def test_claim_returns_due_recipients_only(store: QueueStore) -> None:
    commit(store, one("A1", T0), one("B2", T0 + 100))
    assert store.claim(T0 - 0.001, 10, ONLY_REMOTE) == []
    assert keys(store.claim(T0 + 99, 10, ONLY_REMOTE)) == [("A1", 0)]
    assert keys(store.claim(T0 + 100, 10, ONLY_REMOTE)) == [("B2", 0)]


def test_claim_respects_the_limit_oldest_due_first(store: QueueStore) -> None:
    commit(store, one("C3", T0 + 2), one("A1", T0), one("B2", T0 + 1))
    assert keys(store.claim(T0 + 10, 2, ONLY_REMOTE)) == [("A1", 0), ("B2", 0)]
    assert keys(store.claim(T0 + 10, 2, ONLY_REMOTE)) == [("C3", 0)]
    assert store.claim(T0 + 10, 2, ONLY_REMOTE) == []


@pytest.mark.parametrize(("limit", "waiting"), [(0, ALL), (-1, ALL), (10, NOTHING)])
def test_claim_nothing(store: QueueStore, limit: int, waiting: tuple[str, ...]) -> None:
    commit(store, envelope("A1"))
    assert store.claim(T0, limit, waiting) == []
    assert states(store, "A1") == ["queued"] * 3


def test_claim_respects_the_actions_filter(store: QueueStore) -> None:
    commit(store, envelope("A1"))
    assert keys(store.claim(T0, 10, ONLY_REMOTE)) == [("A1", 0), ("A1", 1)]
    assert states(store, "A1") == ["inflight", "inflight", "queued"]
    assert store.claim(T0, 10, NOTHING) == []
    assert keys(store.claim(T0, 10, ONLY_LOCAL)) == [("A1", 2)]


def test_claimed_recipients_are_inflight_and_not_claimed_twice(store: QueueStore) -> None:
    commit(store, envelope("A1"))
    assert len(store.claim(T0, 10, ALL)) == 3
    assert states(store, "A1") == ["inflight"] * 3
    assert store.claim(T0 + 1e9, 10, ALL) == []
    assert store.next_due(ALL) is None


def test_claim_skips_held_messages(store: QueueStore) -> None:
    commit(store, envelope("A1"), one("B2"))
    assert store.hold("A1") == 3
    assert message_state(store, "A1") == "held"
    assert states(store, "A1") == ["held"] * 3
    assert keys(store.claim(T0 + 10, 10, ALL)) == [("B2", 0)]


def test_claim_skips_corrupt_messages(spool_dir: Path, store: QueueStore) -> None:
    commit(store, one("A1"), one("B2"))
    (spool_dir / "messages" / "A1").unlink()
    spool = Spool(str(spool_dir))
    assert spool.open().corrupt == ("A1",)
    spool.close()
    assert keys(store.claim(T0, 10, ONLY_REMOTE)) == [("B2", 0)]
    assert store.next_due(ONLY_REMOTE) is None


def test_claims_of_one_message_share_its_record(store: QueueStore) -> None:
    commit(store, envelope("A1"))
    first, second, third = store.claim(T0, 10, ALL)
    assert first.message == second.message == third.message


# --- record ------------------------------------------------------------------------------


def test_record_moves_each_recipient_to_its_state(store: QueueStore) -> None:
    commit(store, envelope("A1", recipients=tuple(
        RecipientRecord(f"r{i}@y.example", "remote") for i in range(4))))
    claims = sorted(store.claim(T0, 10, ONLY_REMOTE), key=lambda c: c.index)
    store.record([
        outcome(claims[0], "delivered", at=T0 + 5),
        outcome(claims[1], "deferred", next_attempt=T0 + 600, at=T0 + 5, warned=True),
        outcome(claims[2], "bounced", at=T0 + 5),
        outcome(claims[3], "expired", at=T0 + 5),
    ])
    recorded = rows(store, "A1")
    assert [row["state"] for row in recorded] == ["delivered", "deferred", "bounced", "expired"]
    deferred = recorded[1]
    assert (deferred["attempts"], deferred["next_attempt"], deferred["last_reply"],
            deferred["status"], deferred["remote_mta"], deferred["last_attempt"],
            deferred["warned"]) == (1, T0 + 600, "reply deferred", "4.4.1", "mx.y.example",
                                    T0 + 5, 1)
    assert recorded[0]["warned"] == 0


def test_deferred_recipient_comes_back_when_due_with_its_history(store: QueueStore) -> None:
    commit(store, one("A1"))
    (claim,) = store.claim(T0, 10, ONLY_REMOTE)
    store.record([outcome(claim, "deferred", next_attempt=T0 + 600, warned=True)])
    assert store.next_due(ONLY_REMOTE) == T0 + 600
    assert store.claim(T0 + 599, 10, ONLY_REMOTE) == []
    (again,) = store.claim(T0 + 600, 10, ONLY_REMOTE)
    assert (again.attempts, again.warned, again.cancelled, again.last_reply, again.last_status,
            again.remote_mta) == (1, True, False, "reply deferred", "4.4.1", "mx.y.example")


def test_record_ignores_recipients_that_were_not_claimed(store: QueueStore) -> None:
    commit(store, envelope("A1"))
    store.claim(T0, 10, ONLY_LOCAL)
    store.record([outcome(("A1", 0), "delivered"), outcome(("A1", 2), "delivered"),
                  outcome(("NOSUCH", 0), "delivered")])
    assert states(store, "A1") == ["queued", "queued", "delivered"]


def test_record_nothing(store: QueueStore) -> None:
    store.record([])


def test_deferred_outcome_on_a_message_held_meanwhile_is_held(store: QueueStore) -> None:
    commit(store, envelope("A1"))
    claims = sorted(store.claim(T0, 10, ONLY_REMOTE), key=lambda c: c.index)
    assert store.hold("A1") == 1           # the one not inflight
    store.record([outcome(claims[0], "deferred", next_attempt=T0 + 600),
                  outcome(claims[1], "bounced")])
    assert states(store, "A1") == ["held", "bounced", "held"]
    assert store.claim(T0 + 1e6, 10, ALL) == []
    assert store.release("A1", T0 + 50) == 2
    assert states(store, "A1") == ["queued", "bounced", "queued"]
    assert keys(store.claim(T0 + 50, 10, ALL)) == [("A1", 0), ("A1", 2)]


def test_deferred_outcome_after_hold_and_release_is_deferred(store: QueueStore) -> None:
    commit(store, one("A1"))
    (claim,) = store.claim(T0, 10, ONLY_REMOTE)
    store.hold("A1")
    store.release("A1", T0)
    store.record([outcome(claim, "deferred", next_attempt=T0 + 600)])
    assert states(store, "A1") == ["deferred"]


def test_cancel_leaves_recipients_in_an_attempt_alone(store: QueueStore) -> None:
    """`delete --dsn` is refused while an attempt runs (InFlight); cancel never takes a
    recipient away from the attempt that holds it."""
    commit(store, one("A1"))
    (claim,) = store.claim(T0, 10, ONLY_REMOTE)
    assert states(store, "A1") == ["inflight"]
    with pytest.raises(InFlight):
        store.cancel("A1")
    store.record([outcome(claim, "deferred", next_attempt=T0 + 600)])
    assert states(store, "A1") == ["deferred"]
    assert store.cancel("A1") == 1


# --- remove_finished / next_due / requeue_inflight --------------------------------------


def test_remove_finished_deletes_only_messages_without_open_recipients(
        store: QueueStore) -> None:
    commit(store, one("A1"), envelope("B2"), one("C3"))
    claims = store.claim(T0, 10, ALL)
    by_key = {(c.message.queue_id, c.index): c for c in claims}
    store.record([outcome(by_key["A1", 0], "delivered"), outcome(by_key["B2", 0], "bounced"),
                  outcome(by_key["B2", 1], "expired"),
                  outcome(by_key["B2", 2], "deferred", next_attempt=T0 + 600)])
    assert store.remove_finished(["A1", "B2", "C3", "A1"]) == ["A1"]
    assert not store.exists("A1")
    assert rows(store, "A1") == []
    assert store.exists("B2") and store.exists("C3")   # C3 is still inflight
    assert store.remove_finished([]) == []


def test_settle_records_and_removes_in_one_call(store: QueueStore) -> None:
    commit(store, one("A1"), one("B2"), one("C3"))
    by_key = {(c.message.queue_id, c.index): c for c in store.claim(T0, 10, ONLY_REMOTE)}
    done = store.settle([outcome(by_key["B2", 0], "bounced"),
                         outcome(by_key["A1", 0], "delivered"),
                         outcome(by_key["C3", 0], "deferred", next_attempt=T0 + 600)],
                        ["B2", "A1", "C3", "B2"])
    assert done == ["B2", "A1"]
    assert not store.exists("A1") and not store.exists("B2")
    assert states(store, "C3") == ["deferred"]
    assert store.settle([], []) == []


@pytest.mark.parametrize("state", ["queued", "deferred", "held", "cancelled", "inflight"])
def test_remove_finished_keeps_a_message_with_an_open_recipient(
        store: QueueStore, state: str) -> None:
    commit(store, envelope("A1", recipients=(RecipientRecord("b@y.example", "remote"),
                                             RecipientRecord("c@y.example", "local"))))
    (first,) = store.claim(T0, 10, ONLY_REMOTE)
    store.record([outcome(first, "delivered")])
    if state == "deferred":
        store.claim(T0, 10, ONLY_LOCAL)
        store.record([outcome(("A1", 1), "deferred", next_attempt=T0 + 600)])
    elif state == "held":
        store.hold("A1")
    elif state == "cancelled":
        store.cancel("A1")
    elif state == "inflight":
        store.claim(T0, 10, ONLY_LOCAL)
    assert states(store, "A1") == ["delivered", state]
    assert store.remove_finished(["A1"]) == []
    assert store.exists("A1")


def test_next_due(store: QueueStore) -> None:
    assert store.next_due(ALL) is None
    commit(store, one("A1", T0 + 30), one("B2", T0 + 20, "local"), one("C3", T0 + 10))
    assert store.next_due(ALL) == T0 + 10
    assert store.next_due(ONLY_LOCAL) == T0 + 20
    assert store.next_due(NOTHING) is None
    store.hold("C3")
    assert store.next_due(ONLY_REMOTE) == T0 + 30
    store.claim(T0 + 30, 10, ONLY_REMOTE)
    assert store.next_due(ONLY_REMOTE) is None
    assert store.next_due(ALL) == T0 + 20


def test_requeue_inflight(store: QueueStore) -> None:
    commit(store, envelope("A1"))
    assert store.requeue_inflight() == 0
    assert len(store.claim(T0, 10, ONLY_REMOTE)) == 2
    assert store.requeue_inflight() == 2
    assert states(store, "A1") == ["queued"] * 3
    assert keys(store.claim(T0, 10, ONLY_REMOTE)) == [("A1", 0), ("A1", 1)]


# --- the operator's commands -------------------------------------------------------------


def test_exists(store: QueueStore) -> None:
    commit(store, one("A1"))
    assert store.exists("A1")
    assert not store.exists("B2")


def test_hold_and_release(store: QueueStore) -> None:
    commit(store, envelope("A1"))
    assert store.hold("A1") == 3
    assert store.hold("A1") == 0
    assert store.hold("NOSUCH") == 0
    assert store.release("A1", T0 + 500) == 3
    assert message_state(store, "A1") == "queued"
    assert [row["next_attempt"] for row in rows(store, "A1")] == [T0 + 500] * 3
    assert store.release("A1", T0 + 500) == 0
    assert store.claim(T0 + 499, 10, ALL) == []
    assert len(store.claim(T0 + 500, 10, ALL)) == 3


def test_hold_keeps_finished_recipients(store: QueueStore) -> None:
    commit(store, envelope("A1"))
    claims = sorted(store.claim(T0, 10, ONLY_LOCAL), key=lambda c: c.index)
    store.record([outcome(claims[0], "delivered")])
    assert store.hold("A1") == 2
    assert store.release("A1", T0) == 2
    assert states(store, "A1") == ["queued", "queued", "delivered"]


def test_flush_one_message(store: QueueStore) -> None:
    commit(store, one("A1"), one("B2"))
    claims = store.claim(T0, 10, ONLY_REMOTE)
    store.record([outcome(c, "deferred", next_attempt=T0 + 3600) for c in claims])
    assert store.flush("A1", T0 + 1) == 1
    assert keys(store.claim(T0 + 1, 10, ONLY_REMOTE)) == [("A1", 0)]
    assert store.next_due(ONLY_REMOTE) == T0 + 3600


def test_flush_all(store: QueueStore) -> None:
    commit(store, one("A1"), one("B2"), one("C3", T0 + 9999))
    claims = store.claim(T0, 10, ONLY_REMOTE)
    store.record([outcome(c, "deferred", next_attempt=T0 + 3600) for c in claims])
    assert store.flush(None, T0 + 1) == 3
    assert keys(store.claim(T0 + 1, 10, ONLY_REMOTE)) == [("A1", 0), ("B2", 0), ("C3", 0)]


def test_flush_leaves_held_and_inflight_alone(store: QueueStore) -> None:
    commit(store, one("A1"), one("B2", T0 + 3600))
    store.claim(T0, 10, ONLY_REMOTE)
    store.hold("B2")
    assert store.flush(None, T0 + 1) == 0
    assert states(store, "A1") == ["inflight"]
    assert store.claim(T0 + 1e6, 10, ONLY_REMOTE) == []


def test_cancelled_recipients_are_claimed_regardless_of_action_and_time(
        store: QueueStore) -> None:
    commit(store, envelope("A1", T0 + 10_000), one("B2", T0 + 10_000))
    claims = sorted(store.claim(T0 + 10_000, 10, ONLY_LOCAL), key=lambda c: c.index)
    store.record([outcome(claims[0], "delivered")])
    store.hold("A1")
    assert store.cancel("A1") == 2              # the delivered recipient stays delivered
    assert message_state(store, "A1") == "queued"
    assert states(store, "A1") == ["cancelled", "cancelled", "delivered"]
    assert store.next_due(ALL) == T0 + 10_000  # B2 only
    claimed = store.claim(T0, 10, NOTHING)
    assert keys(claimed) == [("A1", 0), ("A1", 1)]
    assert all(claim.cancelled for claim in claimed)
    assert states(store, "A1") == ["inflight", "inflight", "delivered"]
    store.record([outcome(c, "bounced") for c in claimed])
    assert states(store, "A1") == ["bounced", "bounced", "delivered"]
    assert store.remove_finished(["A1", "B2"]) == ["A1"]


def test_cancel_deferred_recipients(store: QueueStore) -> None:
    commit(store, one("A1"))
    claims = store.claim(T0, 10, ONLY_REMOTE)
    store.record([outcome(c, "deferred", next_attempt=T0 + 3600) for c in claims])
    assert store.cancel("A1") == 1
    (claim,) = store.claim(T0 + 1, 10, ONLY_REMOTE)
    assert claim.cancelled and claim.attempts == 1
    with pytest.raises(InFlight):                  # inflight now
        store.cancel("A1")
    assert store.cancel("NOSUCH") == 0


def test_claim_limit_applies_to_cancelled_recipients(store: QueueStore) -> None:
    commit(store, envelope("A1"))
    store.cancel("A1")
    assert len(store.claim(T0, 2, ONLY_REMOTE)) == 2
    assert len(store.claim(T0, 2, ONLY_REMOTE)) == 1


def test_remove(spool_dir: Path, store: QueueStore) -> None:
    commit(store, envelope("A1"), one("B2"))
    store.claim(T0, 1, ONLY_REMOTE)
    store.remove("A1")
    store.remove("NOSUCH")
    assert not store.exists("A1")
    assert rows(store, "A1") == []
    assert store.exists("B2")
    assert (spool_dir / "messages" / "A1").exists()   # the caller removes the body file
