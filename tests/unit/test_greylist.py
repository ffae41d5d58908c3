"""tayori.policy.greylist: the greylisting policy on a fake clock, and its SQLite store."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tayori.policy.greylist import (
    DAY,
    Greylist,
    GreylistError,
    GreylistVerdict,
    normalise_sender,
)

T0 = 1_700_000_000.0  # the fake clock's start (wall-clock seconds)
CLIENT = "192.0.2.1"
SENDER = "alice@sender.example"
RCPT = "bob@example.org"


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "not-yet" / "greylist.sqlite")  # the directory is created too


@pytest.fixture
def grey(path: str) -> Iterator[Greylist]:
    with Greylist(path) as store:
        yield store


def open_store(path: str, **options: Any) -> Greylist:
    return Greylist(path, **options)


# --- the policy ---------------------------------------------------------------------------------


def test_a_new_triplet_is_deferred_for_the_delay(grey: Greylist) -> None:
    verdict = grey.check(CLIENT, SENDER, RCPT, T0)
    assert verdict == GreylistVerdict(True, 300, "new")
    reply = verdict.reply()
    assert reply is not None
    assert reply.to_bytes() == b"451 4.7.1 Greylisted, try again in 300 seconds\r\n"


def test_an_early_retry_waits_for_the_rest_without_restarting(grey: Greylist) -> None:
    grey.check(CLIENT, SENDER, RCPT, T0)
    assert grey.check(CLIENT, SENDER, RCPT, T0 + 100) == GreylistVerdict(True, 200, "early")
    assert grey.check(CLIENT, SENDER, RCPT, T0 + 299.5) == GreylistVerdict(True, 1, "early")
    verdict = grey.check(CLIENT, SENDER, RCPT, T0 + 300)
    assert verdict == GreylistVerdict(False, 0, "passed")
    assert verdict.reply() is None


def test_a_passed_triplet_stays_known(path: str) -> None:
    with open_store(path, auto_allow_after=0) as grey:
        grey.check(CLIENT, SENDER, RCPT, T0)
        grey.check(CLIENT, SENDER, RCPT, T0 + 600)
        assert grey.check(CLIENT, SENDER, RCPT, T0 + 10 * DAY).reason == "known"
        assert grey.check(CLIENT, SENDER, RCPT, T0 + 40 * DAY).reason == "known"  # renewed
        assert grey.check(CLIENT, SENDER, RCPT, T0 + 76 * DAY).reason == "new"   # 36 d unused
        # without auto-allowing, another recipient is greylisted on its own
        assert grey.check(CLIENT, SENDER, "carol@example.org", T0 + 76 * DAY).defer


def test_after_a_pass_the_client_network_is_auto_allowed(grey: Greylist) -> None:
    grey.check(CLIENT, SENDER, RCPT, T0)
    grey.check(CLIENT, SENDER, RCPT, T0 + 300)
    other = grey.check("192.0.2.200", "x@elsewhere.example", "carol@example.org", T0 + 301)
    assert other == GreylistVerdict(False, 0, "auto-allowed")
    assert grey.check("192.0.3.1", SENDER, RCPT, T0 + 302).reason == "new"  # another /24


def test_auto_allowing_lasts_allow_time_from_the_last_use(grey: Greylist) -> None:
    grey.check(CLIENT, SENDER, RCPT, T0)
    grey.check(CLIENT, SENDER, RCPT, T0 + 300)
    assert grey.check(CLIENT, "n@x.example", RCPT, T0 + 30 * DAY).reason == "auto-allowed"
    assert grey.check(CLIENT, "m@x.example", RCPT, T0 + 64 * DAY).reason == "auto-allowed"
    assert grey.check(CLIENT, "o@x.example", RCPT, T0 + 100 * DAY).reason == "new"


def test_auto_allow_after_n_passes_counts_one_per_hour(path: str) -> None:
    with open_store(path, auto_allow_after=2) as grey:
        for rcpt in ("a@example.org", "b@example.org"):   # one message, two recipients
            grey.check(CLIENT, SENDER, rcpt, T0)
        for rcpt in ("a@example.org", "b@example.org"):
            assert grey.check(CLIENT, SENDER, rcpt, T0 + 300).reason == "passed"
        assert grey.check(CLIENT, SENDER, "c@example.org", T0 + 400).reason == "new"
        assert grey.check(CLIENT, SENDER, "c@example.org", T0 + 3900).reason == "passed"
        assert grey.check(CLIENT, SENDER, "d@example.org", T0 + 3901).reason == "auto-allowed"


def test_a_retry_after_the_window_starts_over(grey: Greylist) -> None:
    grey.check(CLIENT, SENDER, RCPT, T0)
    late = T0 + 2 * DAY + 1
    assert grey.check(CLIENT, SENDER, RCPT, late) == GreylistVerdict(True, 300, "new")
    assert grey.check(CLIENT, SENDER, RCPT, late + 300).reason == "passed"


def test_ipv4_clients_share_a_slash_24_and_ipv6_a_slash_64(grey: Greylist) -> None:
    assert grey.key("192.0.2.77", SENDER, RCPT)[0] == "192.0.2.0/24"
    assert grey.key("::ffff:192.0.2.77", SENDER, RCPT)[0] == "192.0.2.0/24"
    assert grey.key("2001:db8::1", SENDER, RCPT)[0] == "2001:db8::/64"
    grey.check("2001:db8::1", SENDER, RCPT, T0)
    assert grey.check("2001:db8::ffff", SENDER, RCPT, T0 + 300).reason == "passed"
    assert grey.check("2001:db8:0:1::1", "z@x.example", RCPT, T0 + 301).reason == "new"


def test_prefixes_are_configurable(path: str) -> None:
    with open_store(path, ipv4_prefix=32, ipv6_prefix=128) as grey:
        assert grey.key("192.0.2.77", SENDER, RCPT)[0] == "192.0.2.77"
        assert grey.key("2001:db8::1", SENDER, RCPT)[0] == "2001:db8::1"


def test_sender_and_recipient_are_case_insensitive(grey: Greylist) -> None:
    grey.check(CLIENT, "Alice@Sender.Example", "BOB@example.org", T0)
    assert grey.check(CLIENT, SENDER, RCPT, T0 + 300).reason == "passed"


def test_the_null_sender_is_greylisted_like_any_other(grey: Greylist) -> None:
    assert grey.key(CLIENT, "", RCPT) == ("192.0.2.0/24", "", RCPT)
    assert grey.check(CLIENT, "", RCPT, T0).reason == "new"
    assert grey.check(CLIENT, SENDER, RCPT, T0 + 1).reason == "new"  # a triplet of its own
    assert grey.check(CLIENT, "", RCPT, T0 + 300).reason == "passed"


def test_allowlisted_networks_pass_and_leave_no_trace(path: str) -> None:
    with open_store(path, allow_networks=["192.0.2.0/25", "2001:db8::/32"]) as grey:
        assert grey.check(CLIENT, SENDER, RCPT, T0) == GreylistVerdict(False, 0, "allowlisted")
        assert grey.check("2001:db8:1::5", SENDER, RCPT, T0).reason == "allowlisted"
        assert grey.check("192.0.2.200", SENDER, RCPT, T0).reason == "new"
        assert grey.counts() == (1, 0)


def test_normalised_senders_share_a_triplet(path: str) -> None:
    with open_store(path, normalise_senders=True) as grey:
        grey.check(CLIENT, "prvs=1234abcdef=List-Bounce+7731@lists.example", RCPT, T0)
        later = grey.check(CLIENT, "prvs=5678fedcba=list-bounce+8812@lists.example", RCPT,
                           T0 + 300)
        assert later.reason == "passed"


@pytest.mark.parametrize(("sender", "key"), [
    ("", ""),
    ("Postmaster", "postmaster"),
    ("Alice@Example.ORG", "alice@example.org"),
    ("alice+news@example.org", "alice@example.org"),
    ("+only@example.org", "+only@example.org"),
    ("prvs=0123abcdef=alice@example.org", "alice@example.org"),
    ("SRS0=HHH=TT=orig.example=alice@forwarder.example", "alice@orig.example"),
    ("SRS0+xyz=TT=orig.example=alice@forwarder.example", "alice@orig.example"),
    ("SRS1=HHH=fwd1.example==HHH=TT=orig.example=alice@fwd2.example", "alice@orig.example"),
    ("bounce-12345-678@lists.example", "bounce-#-#@lists.example"),
    ("user2024@example.org", "user2024@example.org"),  # digits inside a word stay
])
def test_normalise_sender(sender: str, key: str) -> None:
    assert normalise_sender(sender) == key


# --- the store --------------------------------------------------------------------------------


def test_state_survives_reopening_the_store(path: str) -> None:
    with open_store(path) as grey:
        assert grey.check(CLIENT, SENDER, RCPT, T0).reason == "new"
    with open_store(path) as grey:
        assert grey.check(CLIENT, SENDER, RCPT, T0 + 100).reason == "early"
    with open_store(path) as grey:
        assert grey.check(CLIENT, SENDER, RCPT, T0 + 300).reason == "passed"
    with open_store(path) as grey:
        assert grey.check(CLIENT, "x@y.example", RCPT, T0 + 400).reason == "auto-allowed"
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    finally:
        db.close()


def test_cleanup_removes_what_has_expired(grey: Greylist) -> None:
    grey.check(CLIENT, SENDER, RCPT, T0)                    # passes, then unused
    grey.check(CLIENT, SENDER, RCPT, T0 + 300)
    grey.check("198.51.100.1", SENDER, RCPT, T0 + DAY)       # never retried
    assert grey.counts() == (2, 1)
    assert grey.cleanup(T0 + 2 * DAY) == 0
    assert grey.cleanup(T0 + 3 * DAY + 1) == 1               # past its retry window
    assert grey.counts() == (1, 1)
    assert grey.cleanup(T0 + 36 * DAY) == 2                  # triplet and client unused
    assert grey.counts() == (0, 0)


def test_check_async_runs_off_the_event_loop(grey: Greylist) -> None:
    async def scenario() -> tuple[GreylistVerdict, GreylistVerdict, int]:
        first = await grey.check_async(CLIENT, SENDER, RCPT, T0)
        second = await grey.check_async(CLIENT, SENDER, RCPT, T0 + 300)
        return first, second, await grey.cleanup_async(T0 + 301)

    first, second, removed = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert first.defer and not second.defer and removed == 0


def test_a_clock_stepping_back_never_asks_for_more_than_the_delay(grey: Greylist) -> None:
    grey.check(CLIENT, SENDER, RCPT, T0)
    assert grey.check(CLIENT, SENDER, RCPT, T0 - 3600) == GreylistVerdict(True, 300, "early")


def test_a_file_that_is_no_database_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(GreylistError):
        Greylist(str(junk))


def test_a_newer_schema_is_refused(path: str) -> None:
    Greylist(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(GreylistError, match="schema version 99"):
        Greylist(path)


def test_database_errors_during_a_check_become_greylist_errors(grey: Greylist,
                                                               path: str) -> None:
    db = sqlite3.connect(path)
    db.execute("DROP TABLE triplets")
    db.close()
    with pytest.raises(GreylistError):
        grey.check(CLIENT, SENDER, RCPT, T0)


def test_nonsense_settings_are_refused(path: str) -> None:
    with pytest.raises(ValueError):
        Greylist(path, delay=300, retry_window=300)
    with pytest.raises(ValueError):
        Greylist(path, auto_allow_after=-1)


def test_a_malformed_client_address_is_a_caller_error(grey: Greylist) -> None:
    with pytest.raises(ValueError):
        grey.check("not-an-ip", SENDER, RCPT, T0)
