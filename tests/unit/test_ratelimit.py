"""tayori.policy.ratelimit: token buckets and the login ban, on a fake clock."""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import threading
from pathlib import Path
from typing import Any

import argon2
import pytest

from tayori.config.model import AuthConfig
from tayori.errors import Reply
from tayori.maillog import TextFormatter
from tayori.policy.authentication import Authenticator
from tayori.policy.ratelimit import (
    Allowed,
    Denied,
    LoginGuard,
    TokenBuckets,
    auth_ban_fields,
    auth_failure_fields,
    ban_reply,
    client_network,
    rate_limited,
)
from tayori.policy.userdb_file import add_user

T0 = 5000.0
HOUR = 3600.0
FAST = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


# --- keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("ip", "key"), [
    ("192.0.2.1", "192.0.2.1"),
    ("::ffff:192.0.2.1", "192.0.2.1"),
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    ("2001:DB8::1", "2001:db8::/64"),
])
def test_client_network_defaults(ip: str, key: str) -> None:
    assert client_network(ip) == key


def test_client_network_prefixes() -> None:
    assert client_network("192.0.2.77", 24) == "192.0.2.0/24"
    assert client_network("2001:db8::1", 32, 48) == "2001:db8::/48"
    assert client_network("2001:db8::1", 32, 128) == "2001:db8::1"
    with pytest.raises(ValueError):
        client_network("192.0.2")


# --- token buckets --------------------------------------------------------------------------------


def test_a_burst_then_a_wait_then_a_refill() -> None:
    buckets = TokenBuckets(3, HOUR)  # "3/1h"
    for left in (2, 1, 0):
        assert buckets.take("alice@example.org", 1, T0) == Allowed(left)
    denied = buckets.take("alice@example.org", 1, T0)
    assert denied == Denied(1200.0)  # one token per 20 minutes
    assert buckets.take("alice@example.org", 1, T0 + 1199) == Denied(pytest.approx(1.0))
    assert isinstance(buckets.take("alice@example.org", 1, T0 + 1200), Allowed)
    assert isinstance(buckets.take("alice@example.org", 1, T0 + 1200), Denied)


def test_a_denial_takes_nothing() -> None:
    buckets = TokenBuckets(2, 60)
    buckets.take("k", 2, T0)
    for _ in range(5):
        assert isinstance(buckets.take("k", 1, T0 + 10), Denied)
    assert buckets.level("k", T0 + 30) == pytest.approx(1.0)
    assert isinstance(buckets.take("k", 1, T0 + 30), Allowed)


def test_keys_are_independent_and_never_overfill() -> None:
    buckets = TokenBuckets(2, 60)
    buckets.take("a", 2, T0)
    assert buckets.take("b", 2, T0) == Allowed(0)
    assert buckets.level("a", T0 + 10 * HOUR) == 2.0
    assert buckets.level("never-seen", T0) == 2.0


def test_burst_can_differ_from_the_rate() -> None:
    buckets = TokenBuckets(60, 60, burst=5)  # one per second, five at once
    assert buckets.take("k", 5, T0) == Allowed(0)
    assert buckets.take("k", 1, T0) == Denied(1.0)
    assert buckets.take("k", 3, T0 + 3) == Allowed(0)


def test_more_than_the_burst_is_taken_from_a_full_bucket_into_debt() -> None:
    buckets = TokenBuckets(10, 100)  # 0.1 token/s
    assert buckets.take("k", 25, T0) == Allowed(-15)
    assert buckets.take("k", 1, T0) == Denied(pytest.approx(160.0))
    assert isinstance(buckets.take("k", 25, T0 + 240), Denied)   # 9 tokens: not full yet
    assert buckets.take("k", 25, T0 + 250) == Allowed(pytest.approx(-15))


def test_memory_is_bounded_by_forgetting_the_least_recently_used() -> None:
    buckets = TokenBuckets(1, HOUR, max_keys=2)
    buckets.take("a", 1, T0)
    buckets.take("b", 1, T0)
    buckets.take("a", 0, T0)      # a is used again: b is now the oldest
    buckets.take("c", 1, T0)
    assert len(buckets) == 2
    assert isinstance(buckets.take("a", 1, T0), Denied)
    assert isinstance(buckets.take("b", 1, T0), Allowed)  # forgotten, so full again


def test_sweep_forgets_only_the_full_buckets() -> None:
    buckets = TokenBuckets(2, 60)
    buckets.take("old", 1, T0)
    buckets.take("busy", 2, T0 + 50)
    assert buckets.sweep(T0 + 60) == 1
    assert len(buckets) == 1 and buckets.level("busy", T0 + 60) < 2


def test_a_clock_stepping_back_refills_nothing() -> None:
    buckets = TokenBuckets(1, 60)
    buckets.take("k", 1, T0)
    assert isinstance(buckets.take("k", 1, T0 - 1000), Denied)
    assert isinstance(buckets.take("k", 1, T0 + 60), Allowed)


def test_nonsense_rates_are_refused() -> None:
    for args in ((0, 60), (1, 0), (-1, 60)):
        with pytest.raises(ValueError):
            TokenBuckets(*args)
    with pytest.raises(ValueError):
        TokenBuckets(1, 60, burst=0)
    with pytest.raises(ValueError):
        TokenBuckets(1, 60).take("k", -1, T0)


def test_the_rate_limit_reply() -> None:
    reply = rate_limited("messages from <alice@example.org>", Denied(1199.2))
    assert reply.to_bytes() == (b"450 4.7.1 Too many messages from <alice@example.org>, "
                                b"try again in 1200 seconds\r\n")
    assert "in 1 seconds" in str(rate_limited("recipients", Denied(0.01)))


# --- the login guard ------------------------------------------------------------------------


def test_the_nth_failure_in_the_window_bans() -> None:
    guard = LoginGuard(max_failures=3, window=600, ban_time=HOUR)
    assert guard.record_failure("192.0.2.1", T0) is False
    assert guard.record_failure("192.0.2.1", T0 + 10) is False
    assert guard.failures("192.0.2.1", T0 + 10) == 2
    assert not guard.is_banned("192.0.2.1", T0 + 10)
    assert guard.record_failure("192.0.2.1", T0 + 20) is True
    assert guard.is_banned("192.0.2.1", T0 + 20)
    assert guard.ban_remaining("192.0.2.1", T0 + 20) == HOUR
    assert not guard.is_banned("192.0.2.2", T0 + 20)


def test_a_ban_ends_after_ban_time() -> None:
    guard = LoginGuard(max_failures=1, window=600, ban_time=HOUR)
    assert guard.record_failure("192.0.2.1", T0)
    assert guard.is_banned("192.0.2.1", T0 + HOUR - 1)
    assert not guard.is_banned("192.0.2.1", T0 + HOUR)
    assert guard.failures("192.0.2.1", T0 + HOUR) == 0  # the slate is clean
    assert guard.record_failure("192.0.2.1", T0 + HOUR)  # and a new ban can start


def test_the_window_slides() -> None:
    guard = LoginGuard(max_failures=3, window=600, ban_time=HOUR)
    guard.record_failure("192.0.2.1", T0)
    guard.record_failure("192.0.2.1", T0 + 300)
    assert guard.record_failure("192.0.2.1", T0 + 600) is False  # the first has left
    assert guard.failures("192.0.2.1", T0 + 600) == 2
    assert guard.record_failure("192.0.2.1", T0 + 700) is True


def test_failures_during_a_ban_are_not_counted_again() -> None:
    guard = LoginGuard(max_failures=2, window=600, ban_time=100)
    guard.record_failure("192.0.2.1", T0)
    assert guard.record_failure("192.0.2.1", T0 + 1)
    assert guard.record_failure("192.0.2.1", T0 + 2) is False
    assert guard.ban_remaining("192.0.2.1", T0 + 2) == 99


def test_a_success_clears_failures_but_not_a_ban() -> None:
    guard = LoginGuard(max_failures=2, window=600, ban_time=HOUR)
    guard.record_failure("192.0.2.1", T0)
    guard.record_success("192.0.2.1")
    assert guard.record_failure("192.0.2.1", T0 + 1) is False
    assert guard.record_failure("192.0.2.1", T0 + 2) is True
    guard.record_success("192.0.2.1")
    assert guard.is_banned("192.0.2.1", T0 + 3)


def test_ipv6_clients_are_banned_by_their_slash_64() -> None:
    guard = LoginGuard(max_failures=2, window=600, ban_time=HOUR)
    guard.record_failure("2001:db8::1", T0)
    assert guard.record_failure("2001:db8::2", T0 + 1)
    assert guard.is_banned("2001:db8::ffff:1", T0 + 2)
    assert not guard.is_banned("2001:db8:0:1::1", T0 + 2)
    assert guard.key("2001:db8::1") == "2001:db8::/64"


def test_ipv6_prefix_is_configurable() -> None:
    guard = LoginGuard(max_failures=1, ipv6_prefix=128)
    assert guard.record_failure("2001:db8::1", T0)
    assert not guard.is_banned("2001:db8::2", T0)


def test_the_guard_forgets_failures_that_aged_out(tmp_path: Path) -> None:
    guard = LoginGuard(max_failures=2, window=600, ban_time=HOUR,
                       path=str(tmp_path / "logins.sqlite3"))
    for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        guard.record_failure(ip, T0)
    guard.record_failure("192.0.2.4", T0 + 601)   # writing deletes what has aged out
    rows = sqlite3.connect(tmp_path / "logins.sqlite3").execute(
        "SELECT key FROM failures").fetchall()
    assert rows == [("192.0.2.4",)]


def test_workers_share_the_counts_and_the_bans(tmp_path: Path) -> None:
    path = str(tmp_path / "logins.sqlite3")
    first, second = (LoginGuard(max_failures=2, window=600, ban_time=HOUR, path=path)
                     for _ in range(2))
    assert first.record_failure("192.0.2.1", T0) is False
    assert second.record_failure("192.0.2.1", T0 + 1) is True   # the second failure in all
    assert first.is_banned("192.0.2.1", T0 + 2)
    reopened = LoginGuard(max_failures=2, window=600, ban_time=HOUR, path=path)
    assert reopened.ban_remaining("192.0.2.1", T0 + 1) == HOUR   # and it survives a restart


def test_nonsense_guard_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        LoginGuard(max_failures=0)
    with pytest.raises(ValueError):
        LoginGuard(window=0)
    with pytest.raises(ValueError):
        LoginGuard(ban_time=-1)


def test_the_ban_reply() -> None:
    assert ban_reply(3599.5).to_bytes() == (b"421 4.7.0 Too many failed logins, try again "
                                            b"in 3600 seconds\r\n")


# --- the log lines fail2ban reads -------------------------------------------------------------

FAILREGEX = r"^\S+ \S+ auth-(?:failure|ban) (?:session=\S+ )?client=\[<HOST>\]"


def log_line(event: str, fields: dict[str, object]) -> str:
    record = logging.LogRecord("tayori.mail", logging.WARNING, __file__, 1, event, None, None)
    record.fields = fields
    return TextFormatter().format(record)


def host_of(line: str) -> str | None:
    pattern = FAILREGEX.replace("<HOST>", r"(?P<host>[0-9a-fA-F.:]+)")
    match = re.match(pattern, line)
    return match.group("host") if match else None


def test_failure_and_ban_lines_match_the_proposed_fail2ban_filter() -> None:
    failure = log_line("auth-failure",
                       {"session": "S7", **auth_failure_fields("192.0.2.1", "bob", "PLAIN", 3)})
    assert failure.endswith("warning auth-failure session=S7 client=[192.0.2.1] login=bob "
                            "mechanism=PLAIN failures=3")
    assert host_of(failure) == "192.0.2.1"
    ban = log_line("auth-ban", auth_ban_fields("2001:db8::1", 5, 3599.2))
    assert ban.endswith("warning auth-ban client=[2001:db8::1] failures=5 ban=3600")
    assert host_of(ban) == "2001:db8::1"


def test_a_login_cannot_forge_the_banned_address() -> None:
    forged = "x client=[198.51.100.7] "
    line = log_line("auth-failure", auth_failure_fields("192.0.2.1", forged, "LOGIN", 1))
    assert host_of(line) == "192.0.2.1"
    assert "198.51.100.7" in line  # logged, but quoted where the filter does not look


# --- the guard off the event loop -------------------------------------------------------------


def guarded_authenticator(tmp_path: Path) -> Authenticator:
    users = tmp_path / "users"
    add_user(str(users), "bob", "bob-pw", hasher=FAST)
    return Authenticator(AuthConfig(users=str(users), max_failures=2), str(tmp_path))


def spy_threads(monkeypatch: pytest.MonkeyPatch, guard: LoginGuard) -> dict[str, str]:
    """Record the thread each of the guard's file calls runs on, by method name."""
    threads: dict[str, str] = {}
    for name in ("ban_remaining", "record_failure", "record_success", "failures"):
        method = getattr(guard, name)

        def spy(*args: Any, _method: Any = method, _name: str = name) -> Any:
            threads[_name] = threading.current_thread().name
            return _method(*args)

        monkeypatch.setattr(guard, name, spy)
    return threads


def test_logins_use_the_guard_on_its_own_thread(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    auth = guarded_authenticator(tmp_path)
    threads = spy_threads(monkeypatch, auth.guard)

    async def main() -> tuple[str, list[int], Reply | None]:
        replies = [(await auth.login("S1", "192.0.2.1", "PLAIN", "bob", password)).code
                   for password in ("bob-pw", "guess", "guess")]
        return threading.current_thread().name, replies, await auth.ban("192.0.2.1")

    loop_thread, replies, banned = asyncio.run(main())
    assert replies == [235, 535, 421]
    assert banned is not None and (banned.code, banned.status) == (421, "4.7.0")
    assert set(threads) == {"ban_remaining", "record_failure", "record_success", "failures"}
    assert all(name.startswith("tayori-logins") and name != loop_thread
               for name in threads.values())


def test_a_slow_ban_list_lets_a_connection_in_but_no_login(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """At connect the ban check fails open after BAN_CHECK_TIMEOUT (the AUTH that
    follows is checked again); at AUTH a ban list that cannot be used fails closed."""
    auth = guarded_authenticator(tmp_path)
    release = threading.Event()

    def stuck(ip: str, now: float) -> float:
        release.wait(10)
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(auth.guard, "ban_remaining", stuck)

    async def main() -> tuple[Reply | None, Reply]:
        at_connect = await auth.ban("192.0.2.1")
        release.set()
        return at_connect, await auth.login("S1", "192.0.2.1", "PLAIN", "bob", "bob-pw")

    at_connect, at_auth = asyncio.run(main())
    assert at_connect is None
    assert (at_auth.code, at_auth.status) == (454, "4.7.0")
