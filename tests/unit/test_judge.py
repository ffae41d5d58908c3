"""Unit tests for tayori.queue.manager's pure parts: judge() and retry_delay()."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest

from tayori.bounce import RecipientReport
from tayori.config import Config
from tayori.config.model import from_document
from tayori.deliver.dispatch import Result
from tayori.errors import Reply
from tayori.queue.manager import CANCELLED, DEFAULT_DELAY_WARNING, judge, retry_delay
from tayori.queue.store import Claim, Outcome, QueuedMessage

T0 = 1_700_000_000.0
HOUR = 3600.0
SCHEDULE = (300.0, 600.0, 1200.0)
LIFETIME = 2 * 86400.0
SEED = 1234


def config(**queue: Any) -> Config:
    queue.setdefault("retry", list(SCHEDULE))
    queue.setdefault("lifetime", LIFETIME)
    return from_document({"hostname": "mx.example", "listen": [{"address": "127.0.0.1:2525"}],
                          "queue": queue}, "test.toml", "/")


DEFAULT = config()
MESSAGE = QueuedMessage("Q1", "a@x.example", 100, "7BIT", False, None, None, T0,
                        "192.0.2.1", "client.example", "ESMTP")


def claim(notify: tuple[str, ...] | None = None, *, attempts: int = 0,
          warned: bool = False) -> Claim:
    return Claim(MESSAGE, 3, "b@y.example", "rfc822;b@y.example", notify, "remote", attempts,
                 warned, False, None, None, None)


def result(code: int, status: str | None = None, text: str = "text", **kwargs: Any) -> Result:
    return Result(Reply(code, status, text), remote_mta="mx.y.example", **kwargs)


def rng() -> random.Random:
    return random.Random(SEED)


def expected_outcome(state: str, now: float, reply: str, status: str, *,
                     attempts: int = 1, next_attempt: float | None = None,
                     warned: bool = False) -> Outcome:
    return Outcome("Q1", 3, state, attempts, now if next_attempt is None else next_attempt,
                   reply, status, "mx.y.example", now, warned)


def expected_report(action: str, now: float, status: str, diagnostic: str,
                    until: float | None = None) -> RecipientReport:
    return RecipientReport("b@y.example", action, status, "rfc822;b@y.example", "mx.y.example",
                           diagnostic, now, until)


# --- 2xx -----------------------------------------------------------------------------------


@pytest.mark.parametrize("notify", [None, ("FAILURE",), ("DELAY",), ("NEVER",),
                                    ("FAILURE", "DELAY")])
def test_success_without_notify_success_is_not_reported(notify: tuple[str, ...] | None) -> None:
    now = T0 + 60
    verdict = judge(claim(notify, attempts=2, warned=True), result(250, "2.0.0", "ok"), now,
                    DEFAULT, rng())
    assert verdict.outcome == expected_outcome("delivered", now, "250 2.0.0 ok", "2.0.0",
                                               attempts=3, warned=True)
    assert verdict.report is None


@pytest.mark.parametrize(
    ("final", "action"), [(False, "relayed"), (True, "delivered")])
def test_success_with_notify_success_is_reported(final: bool, action: str) -> None:
    now = T0 + 60
    verdict = judge(claim(("SUCCESS", "FAILURE")), result(250, "2.0.0", "ok", final=final),
                    now, DEFAULT, rng())
    assert verdict.outcome.state == "delivered"
    assert verdict.report == expected_report(action, now, "2.0.0", "250 2.0.0 ok")


@pytest.mark.parametrize("final", [False, True])
def test_success_passed_on_to_the_next_hop_is_not_reported(final: bool) -> None:
    verdict = judge(claim(("SUCCESS",)), result(250, "2.0.0", "ok", dsn_passed_on=True,
                                                 final=final), T0, DEFAULT, rng())
    assert verdict.outcome.state == "delivered"
    assert verdict.report is None


def test_success_without_enhanced_status_gets_one() -> None:
    verdict = judge(claim(("SUCCESS",)), result(251, None, "will forward"), T0, DEFAULT, rng())
    assert verdict.outcome.status == "2.0.0"
    assert verdict.outcome.reply == "251 will forward"
    assert verdict.report is not None and verdict.report.status == "2.0.0"


def test_a_3xx_reply_is_not_a_delivery() -> None:
    verdict = judge(claim(), result(354, None, "go ahead"), T0, DEFAULT, rng())
    assert verdict.outcome.state != "delivered"


# --- 5xx -----------------------------------------------------------------------------------


@pytest.mark.parametrize("notify", [None, ("FAILURE",), ("SUCCESS", "FAILURE", "DELAY")])
def test_permanent_failure_bounces_with_a_report(notify: tuple[str, ...] | None) -> None:
    now = T0 + 60
    verdict = judge(claim(notify, attempts=1),
                    result(550, "5.1.1", "no such user\nreally"), now, DEFAULT, rng())
    text = "550 5.1.1 no such user\n550 5.1.1 really"
    assert verdict.outcome == expected_outcome("bounced", now, text, "5.1.1", attempts=2)
    assert verdict.report == expected_report("failed", now, "5.1.1", text)


@pytest.mark.parametrize("notify", [("NEVER",), ("SUCCESS",), ("DELAY",), ("SUCCESS", "DELAY")])
def test_permanent_failure_without_notify_failure_is_not_reported(
        notify: tuple[str, ...]) -> None:
    verdict = judge(claim(notify), result(554, "5.7.1", "no"), T0, DEFAULT, rng())
    assert verdict.outcome.state == "bounced"
    assert verdict.report is None


def test_permanent_failure_without_enhanced_status_gets_one() -> None:
    verdict = judge(claim(), result(550, None, "go away"), T0, DEFAULT, rng())
    assert verdict.outcome.status == "5.0.0"
    assert verdict.report is not None and verdict.report.status == "5.0.0"
    assert verdict.report.diagnostic == "550 go away"


def test_permanent_failure_after_the_lifetime_is_bounced_not_expired() -> None:
    verdict = judge(claim(), result(550, "5.1.1", "no"), T0 + LIFETIME + 1, DEFAULT, rng())
    assert verdict.outcome.state == "bounced"


def test_cancelled_recipient_bounces() -> None:
    verdict = judge(replace(claim(), cancelled=True), Result(CANCELLED), T0, DEFAULT, rng())
    assert verdict.outcome.state == "bounced"
    assert verdict.report is not None
    assert (verdict.report.action, verdict.report.status) == ("failed", "5.0.0")


# --- 4xx -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("attempts", "base"), [(0, 300.0), (1, 600.0), (2, 1200.0),
                                                (3, 1200.0), (50, 1200.0)])
def test_temporary_failure_defers_per_the_schedule(attempts: int, base: float) -> None:
    now = T0 + 60
    verdict = judge(claim(attempts=attempts), result(451, "4.3.0", "later"), now, DEFAULT,
                    rng())
    delay = retry_delay(SCHEDULE, attempts + 1, rng())
    assert 0.9 * base <= delay <= 1.1 * base
    assert verdict.outcome == expected_outcome(
        "deferred", now, "451 4.3.0 later", "4.3.0", attempts=attempts + 1,
        next_attempt=now + delay)
    assert verdict.report is None


def test_temporary_failure_jitter_is_within_ten_percent_and_varies() -> None:
    source = random.Random(SEED)
    waits = {judge(claim(), result(421, None, "busy"), T0, DEFAULT, source).outcome.next_attempt
             - T0 for _ in range(200)}
    assert len(waits) > 100
    assert all(270.0 <= wait <= 330.0 for wait in waits)
    assert min(waits) < 280.0 and max(waits) > 320.0


def test_temporary_failure_without_enhanced_status_gets_one() -> None:
    verdict = judge(claim(), result(421, None, "busy"), T0, DEFAULT, rng())
    assert verdict.outcome.status == "4.0.0"
    assert verdict.outcome.reply == "421 busy"


def test_next_attempt_is_capped_at_the_end_of_the_lifetime() -> None:
    now = T0 + LIFETIME - 10
    verdict = judge(claim(attempts=5), result(451, "4.3.0", "later"), now, DEFAULT, rng())
    assert verdict.outcome.state == "deferred"
    assert verdict.outcome.next_attempt == T0 + LIFETIME


@pytest.mark.parametrize("late", [0.0, 0.001, 86400.0])
@pytest.mark.parametrize("notify", [None, ("FAILURE",), ("DELAY", "FAILURE")])
def test_temporary_failure_after_the_lifetime_expires(late: float,
                                                      notify: tuple[str, ...] | None) -> None:
    now = T0 + LIFETIME + late
    verdict = judge(claim(notify, attempts=9), result(451, "4.4.1", "no answer"), now, DEFAULT,
                    rng())
    assert verdict.outcome == expected_outcome("expired", now, "451 4.4.1 no answer", "4.4.1",
                                               attempts=10)
    assert verdict.report == expected_report("failed", now, "4.4.1", "451 4.4.1 no answer")


@pytest.mark.parametrize("notify", [("NEVER",), ("SUCCESS",), ("DELAY",)])
def test_expiry_without_notify_failure_is_not_reported(notify: tuple[str, ...]) -> None:
    verdict = judge(claim(notify), result(451, "4.4.1", "x"), T0 + LIFETIME, DEFAULT, rng())
    assert verdict.outcome.state == "expired"
    assert verdict.report is None


def test_lifetime_comes_from_the_config() -> None:
    short = config(lifetime="1h")
    assert judge(claim(), result(451, None, "x"), T0 + HOUR, short, rng()).outcome.state == \
        "expired"
    assert judge(claim(), result(451, None, "x"), T0 + HOUR - 1, short,
                 rng()).outcome.next_attempt == T0 + HOUR


# --- delay warnings ------------------------------------------------------------------------


def test_notify_delay_warns_after_four_hours_by_default() -> None:
    assert DEFAULT_DELAY_WARNING == 4 * HOUR
    early = judge(claim(("DELAY",)), result(451, "4.4.1", "x"), T0 + 4 * HOUR - 1, DEFAULT,
                  rng())
    assert early.report is None and not early.outcome.warned
    now = T0 + 4 * HOUR
    verdict = judge(claim(("DELAY", "FAILURE"), attempts=4), result(451, "4.4.1", "x"), now,
                    DEFAULT, rng())
    assert verdict.outcome == expected_outcome(
        "deferred", now, "451 4.4.1 x", "4.4.1", attempts=5,
        next_attempt=now + retry_delay(SCHEDULE, 5, rng()), warned=True)
    assert verdict.report == expected_report("delayed", now, "4.4.1", "451 4.4.1 x",
                                             until=T0 + LIFETIME)


def test_delay_warning_is_sent_once() -> None:
    first = judge(claim(("DELAY",)), result(451, "4.4.1", "x"), T0 + 5 * HOUR, DEFAULT, rng())
    assert first.report is not None and first.outcome.warned
    again = judge(claim(("DELAY",), attempts=1, warned=first.outcome.warned),
                  result(451, "4.4.1", "x"), T0 + 6 * HOUR, DEFAULT, rng())
    assert again.report is None
    assert again.outcome.warned                 # stays set for the next attempts


@pytest.mark.parametrize("notify", [None, ("FAILURE",), ("SUCCESS",), ("NEVER",)])
def test_no_delay_warning_by_default_without_notify_delay(
        notify: tuple[str, ...] | None) -> None:
    verdict = judge(claim(notify), result(451, "4.4.1", "x"), T0 + LIFETIME - 1, DEFAULT, rng())
    assert verdict.outcome.state == "deferred"
    assert verdict.report is None and not verdict.outcome.warned


def test_queue_delay_warning_for_recipients_without_notify() -> None:
    conf = config(delay_warning="1h")
    assert judge(claim(), result(451, None, "x"), T0 + HOUR - 1, conf, rng()).report is None
    verdict = judge(claim(), result(451, None, "x"), T0 + HOUR, conf, rng())
    assert verdict.outcome.warned
    assert verdict.report == expected_report("delayed", T0 + HOUR, "4.0.0", "451 x",
                                             until=T0 + LIFETIME)
    assert judge(claim(warned=True), result(451, None, "x"), T0 + 2 * HOUR, conf,
                 rng()).report is None


def test_queue_delay_warning_applies_to_notify_delay_too() -> None:
    conf = config(delay_warning="1h")
    assert judge(claim(("DELAY",)), result(451, None, "x"), T0 + HOUR, conf,
                 rng()).report is not None


@pytest.mark.parametrize("notify", [("FAILURE",), ("NEVER",), ("SUCCESS", "FAILURE")])
def test_queue_delay_warning_respects_notify_without_delay(notify: tuple[str, ...]) -> None:
    conf = config(delay_warning="1h")
    verdict = judge(claim(notify), result(451, None, "x"), T0 + 10 * HOUR, conf, rng())
    assert verdict.report is None and not verdict.outcome.warned


def test_no_delay_warning_for_final_outcomes() -> None:
    conf = config(delay_warning="1h")
    now = T0 + 10 * HOUR
    assert judge(claim(("DELAY",)), result(250, None, "ok"), now, conf, rng()).report is None
    bounced = judge(claim(("DELAY",)), result(550, None, "no"), now, conf, rng())
    assert bounced.report is None and not bounced.outcome.warned
    expired = judge(claim(), result(451, None, "x"), T0 + LIFETIME, conf, rng())
    assert expired.report is not None and expired.report.action == "failed"


# --- retry_delay ---------------------------------------------------------------------------


@pytest.mark.parametrize(("attempts", "base"), [(0, 300.0), (1, 300.0), (2, 600.0),
                                                (3, 1200.0), (4, 1200.0), (1000, 1200.0)])
def test_retry_delay_follows_the_schedule_then_repeats_the_last(attempts: int,
                                                                base: float) -> None:
    source = random.Random(SEED)
    delays = [retry_delay(SCHEDULE, attempts, source) for _ in range(100)]
    assert all(0.9 * base <= delay <= 1.1 * base for delay in delays)


def test_retry_delay_is_deterministic_with_a_seeded_rng() -> None:
    assert retry_delay(SCHEDULE, 2, random.Random(7)) == retry_delay(SCHEDULE, 2,
                                                                     random.Random(7))
    assert retry_delay(SCHEDULE, 2, random.Random(7)) == 600.0 * random.Random(7).uniform(
        0.9, 1.1)


def test_retry_delay_with_one_value() -> None:
    assert 54.0 <= retry_delay((60.0,), 7, rng()) <= 66.0
