"""The queue manager: what is due goes out, what fails comes back as a DSN.

Takes: the spool (body files, index), the configuration (actions, ``queue.*``), a
:class:`~tayori.deliver.dispatch.Dispatcher` that makes attempts, and the relay rules
(to route the DSNs it writes).
Promises (DESIGN §2.2, §2.5, §5):
- A bounded active window: at most ``queue.max_active`` recipients are claimed from the
  index at once, whatever the queue size; due recipients are claimed as soon as the
  window has room and the manager is woken (a commit in any worker, ``queue flush``) or
  the next attempt falls due.
- A slow destination cannot starve the others: when the window is more than half full,
  recipients for a destination with twice its connection limit in attempts already are
  put back for about 30 s (no attempt counted).
- Recipients of one message with the same action and destination share one attempt
  (``delivery.max_recipients`` at most per transaction);
  the attempts of one message end together, in one DSN and one index transaction.
- Each recipient ends an attempt in exactly one state: delivered (2xx), bounced (5xx),
  deferred (4xx, next attempt per ``queue.retry`` with ±10% jitter) or expired (still
  failing after ``queue.lifetime``: reported as failed). Held messages are never claimed.
- DSNs (:mod:`tayori.bounce`): one per message and pass, to its sender, from ``<>``,
  for failures (unless NOTIFY=NEVER or NOTIFY without FAILURE), for successes asked for
  with NOTIFY=SUCCESS (``relayed`` when the next hop could not take the request on,
  ``delivered`` over LMTP), and once per recipient for delays (NOTIFY=DELAY after 4h, or
  ``queue.delay_warning``). Nothing is ever sent to ``<>``: a failed message from ``<>``
  goes to ``queue.postmaster`` if set, and only once (a DSN about a DSN to the
  postmaster is logged and dropped). The DSN is queued before the outcome is recorded: a
  crash in between repeats the attempt and the DSN, it never loses it.
- Messages with nothing left to do leave the index and the disk.
- Messages dropped by the sendmail command (:mod:`tayori.queue.maildrop`) are picked
  up into the queue when the maildrop changed (a stat per turn), or every 30 s.
- DMARC aggregate reports are queued by the :class:`~tayori.queue.reports.ReportJob`
  the manager is given (the daemon gives one), run beside it from
  :meth:`QueueManager.start` to :meth:`QueueManager.stop`.
- ``maildir``, ``mbox`` and ``pipe`` recipients are delivered by
  :mod:`tayori.deliver.local`, a message's recipients of one action together; the others
  by the dispatcher.
Failure policy: an error of the index or the disk is logged and the manager tries again
after a pause; an unexpected exception in one attempt is confined to its recipients
(``451 4.3.0``, retried).
Config keys: ``queue.*``, ``hostname``, ``actions``, ``match``, ``dmarc.report*``.
Standards: RFC 3461 (NOTIFY, ORCPT, ENVID, RET), RFC 3464, RFC 5321 §4.5.4.1 (retry).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import sqlite3
import time
import traceback
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from tayori import bounce, maillog
from tayori.address import AddressError, parse_mailbox
from tayori.config import Config
from tayori.deliver.dispatch import Delivery, Dispatcher, Result
from tayori.deliver.local import LocalDeliverer
from tayori.errors import Reply
from tayori.policy.relay import Rules
from tayori.queue import internal, maildrop, wakeup
from tayori.queue.reports import ReportJob
from tayori.queue.spool import RecipientRecord, Spool, new_queue_id
from tayori.queue.store import Claim, Outcome, QueuedMessage, QueueStore

DELIVERABLE = ("mx", "relay", "lmtp", "maildir", "mbox", "pipe")
DEFAULT_DELAY_WARNING = 4 * 3600.0   # with NOTIFY=DELAY and no queue.delay_warning
IDLE_POLL = 60.0                      # look at the index at least this often
ERROR_PAUSE = 5.0
DSN_RETRY = 60.0                      # a DSN that could not be queued: attempt again
MAILDROP_RESCAN = 30.0                # look into the maildrop at least this often
POSTPONE = 30.0                       # a busy destination's recipients wait about this
JITTER = 0.1
T = TypeVar("T")


def retry_delay(schedule: tuple[float, ...], attempts: int, rng: random.Random) -> float:
    """The wait after the ``attempts``-th failed attempt (1-based), with jitter."""
    base = schedule[min(max(attempts, 1), len(schedule)) - 1]
    return base * rng.uniform(1 - JITTER, 1 + JITTER)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one attempt means for one recipient: its new state, and what to report."""

    outcome: Outcome
    report: bounce.RecipientReport | None


def judge(claim: Claim, result: Result, now: float, config: Config,
          rng: random.Random) -> Verdict:
    """The state a recipient moves to after an attempt, and the DSN line it earns."""
    reply, queue, notify = result.reply, config.queue, claim.notify
    status = reply.status or f"{reply.code // 100}.0.0"
    text = _reply_text(reply)
    base = Outcome(claim.message.queue_id, claim.index, "delivered", claim.attempts + 1, now,
                   text, status, result.remote_mta, now, claim.warned)

    def report(action: str, until: float | None = None) -> bounce.RecipientReport:
        return bounce.RecipientReport(claim.address, action, status, claim.orcpt,
                                      result.remote_mta, text, now, until)

    if 200 <= reply.code < 300:
        wants = notify is not None and "SUCCESS" in notify and not result.dsn_passed_on
        action = "expanded" if result.expanded else "delivered" if result.final else "relayed"
        return Verdict(replace(base, expanded=result.expanded),
                       report(action) if wants else None)
    fails = notify is None or "FAILURE" in notify
    expires = claim.message.received_at + queue.lifetime
    if reply.is_permanent or now >= expires:
        state = "bounced" if reply.is_permanent else "expired"
        if state == "expired" and status == "4.2.2":   # still full: now for good (RFC 3463)
            status = "5.2.2"
            base = replace(base, status=status)
        return Verdict(replace(base, state=state), report("failed") if fails else None)
    deferred = replace(base, state="deferred", next_attempt=min(
        now + retry_delay(queue.retry, base.attempts, rng), expires))
    warn = _warn_after(notify, config)
    if warn is not None and not claim.warned and now - claim.message.received_at >= warn:
        return Verdict(replace(deferred, warned=True), report("delayed", expires))
    return Verdict(deferred, None)


def _without_report(verdict: Verdict, retry_at: float) -> Verdict:
    """A verdict whose DSN could not be queued: the recipient waits for another attempt
    (and another DSN) instead of ending unreported."""
    if verdict.report is None:
        return verdict
    if verdict.outcome.state == "delivered":   # a success notice is not worth a resend
        return Verdict(verdict.outcome, None)
    return Verdict(replace(verdict.outcome, state="deferred", next_attempt=retry_at,
                           warned=False), None)


def _warn_after(notify: tuple[str, ...] | None, config: Config) -> float | None:
    if notify is None:
        return config.queue.delay_warning or None
    if "DELAY" in notify:
        return config.queue.delay_warning or DEFAULT_DELAY_WARNING
    return None


def _reply_text(reply: Reply) -> str:
    return "\n".join(f"{reply.code} {line}" for line in reply.lines())


CANCELLED = Reply(550, "5.0.0", "deleted from the queue by the postmaster")


@dataclass(slots=True)
class _Pass:
    """One message's recipients claimed together, until all their attempts end."""

    message: QueuedMessage
    pending: int
    seed: float    # one retry jitter per pass: deferred together, retried together
    verdicts: list[Verdict] = field(default_factory=list)
    log: list[tuple[Claim, Result, float]] = field(default_factory=list)


class QueueManager:
    def __init__(self, config: Config, spool: Spool, dispatcher: Dispatcher, *,
                 clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None, reports: ReportJob | None = None) -> None:
        self.config, self.spool, self.dispatcher = config, spool, dispatcher
        self.rules = Rules(config)
        self.local = LocalDeliverer(config)
        self.clock = clock
        self.rng = rng or random.Random()
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="queue-index")
        self._store: QueueStore | None = None
        self._wake = asyncio.Event()
        self._active = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._runner: asyncio.Task[None] | None = None
        self._listener: wakeup.Listener | None = None
        self._unsettled: list[tuple[list[Outcome], str, asyncio.Future[None]]] = []
        self._maildrop_seen: int | None = None    # the maildrop's mtime when last empty
        self._maildrop_scanned = 0.0
        self._settler: asyncio.Task[None] | None = None
        self.reports = reports
        self._reporting: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> tuple[str, ...]:
        """The actions whose recipients wait: kinds of delivery not built yet."""
        return tuple(name for name, action in self.config.actions.items()
                     if action.deliver not in DELIVERABLE)

    def update(self, config: Config) -> None:
        """A reloaded configuration: applies to the next claims and attempts."""
        self.config = config
        self.rules = Rules(config)
        self.dispatcher.update(config)
        self.local.update(config)
        self._wake.set()

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        self._store = QueueStore(self.spool.directory)
        requeued = await self._index(self._store.requeue_inflight)
        if requeued:
            maillog.event("requeued", recipients=requeued, reason="attempts cut short")
        for queue_id in await self._index(self._store.sweep):
            self._remove_body(queue_id)
        waiting = sorted(self.waiting)
        if waiting:
            maillog.warning("not-delivering", actions=",".join(waiting),
                            reason="no delivery for these kinds of action; "
                                   "recipients routed there stay queued")
        if self.config.queue.suspended:
            maillog.warning("delivery-suspended", reason="queue.suspended is set")
        await asyncio.get_running_loop().run_in_executor(None, maildrop.ensure,
                                                         self.spool.directory)
        self._listener = wakeup.Listener(self.spool.directory, self._wake.set)
        self._runner = asyncio.create_task(self._run())
        if self.reports is not None:
            self._reporting = asyncio.create_task(self.reports.run(lambda: self.config))

    def poke(self) -> None:
        self._wake.set()

    async def stop(self, grace: float) -> None:
        """Claim nothing more; let attempts under way finish for up to ``grace`` s."""
        self._stopping = True
        self._wake.set()
        if self._reporting is not None:
            self._reporting.cancel()
            await asyncio.gather(self._reporting, return_exceptions=True)
        if self._runner is not None:
            await self._runner
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=grace)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
                maillog.warning("stopping", inflight=len(late),
                                note="cut short; retried at the next start")
        await self.dispatcher.close()
        if self._listener is not None:
            self._listener.close()
        if self._store is not None:
            await self._index(self._store.close)
        self._db.shutdown(wait=True)

    async def _index(self, call: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._db, call, *args)

    # --- the loop ---------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                await self._pickup()
                wait = await self._fill()
            except (sqlite3.Error, OSError) as exc:
                maillog.error("queue-index", reason=str(exc), retry_in=ERROR_PAUSE)
                wait = ERROR_PAUSE
            except Exception:   # never let the loop end while the daemon runs
                maillog.error("queue-manager", detail=traceback.format_exc(limit=8),
                              retry_in=ERROR_PAUSE)
                wait = ERROR_PAUSE
            if self._stopping:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def _pickup(self) -> None:
        """Messages dropped by the sendmail command join the queue (each wakes us). The
        maildrop is scanned only when its directory changed since it was last found
        empty, or half a minute passed (a drop within the same timestamp tick as that
        look): the turns woken by received mail pay one stat, not a thread hand-off."""
        try:
            stamp = os.stat(maildrop.path_of(self.spool.directory)).st_mtime_ns
        except OSError:
            stamp = None
        now = time.monotonic()
        if stamp is not None and stamp == self._maildrop_seen and \
                now - self._maildrop_scanned < MAILDROP_RESCAN:
            return
        self._maildrop_scanned = now
        queued = await maildrop.pickup(self.spool, self.config, self.rules)
        if queued:
            maillog.event("picked-up", messages=len(queued))
        else:
            self._maildrop_seen = stamp

    async def _fill(self) -> float:
        """Claim what is due while the window has room; return how long to wait."""
        assert self._store is not None
        room = self.config.queue.max_active - self._active
        if room <= 0 or self.config.queue.suspended:
            return IDLE_POLL    # woken when an attempt ends, or by a reload
        now = self.clock()
        claims = await self._index(self._store.claim, now, room, self.waiting)
        if claims:
            self._dispatch(claims)
            if len(claims) == room:
                return IDLE_POLL
        due = await self._index(self._store.next_due, self.waiting)
        if due is None:
            return IDLE_POLL
        return min(max(due - self.clock(), 0.0), IDLE_POLL) if not claims else 0.0

    def _dispatch(self, claims: list[Claim]) -> None:
        by_message: dict[str, list[Claim]] = {}
        for claim in claims:
            by_message.setdefault(claim.message.queue_id, []).append(claim)
        self._active += len(claims)
        for group in by_message.values():
            jobs = self._jobs(group)
            run = _Pass(group[0].message, len(jobs), self.rng.random())
            for job, members in jobs:
                self._spawn(self._attempt(run, job, members))

    def _jobs(self, claims: list[Claim]) -> list[tuple[Delivery | None, list[Claim]]]:
        """Group one message's recipients by action and destination (None: no attempt,
        the recipients are settled without one)."""
        path = os.path.join(self.spool.messages, claims[0].message.queue_id)
        groups: dict[tuple[str, str], list[Claim]] = {}
        unsettled: list[Claim] = []
        for claim in claims:
            action = self.config.actions.get(claim.action)
            if claim.cancelled or action is None or action.deliver not in DELIVERABLE:
                unsettled.append(claim)
                continue
            destination = {"mx": _domain(claim.address), "maildir": claim.action,
                           "mbox": claim.action, "pipe": claim.action}.get(action.deliver,
                                                                           action.host)
            groups.setdefault((claim.action, destination), []).append(claim)
        size = self.config.delivery.max_recipients
        jobs: list[tuple[Delivery | None, list[Claim]]] = [
            (Delivery(chunk[0].message, path, name, self.config.actions[name], destination,
                      tuple(chunk)), chunk)
            for (name, destination), members in groups.items()
            for chunk in (members[i:i + size] for i in range(0, len(members), size))]
        if unsettled:
            jobs.append((None, unsettled))
        return jobs

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            maillog.error("queue-manager", detail="".join(traceback.format_exception(
                task.exception(), limit=8)))

    async def _attempt(self, run: _Pass, job: Delivery | None, claims: list[Claim]) -> None:
        started = self.clock()
        crowded = self._active > self.config.queue.max_active // 2
        if job is not None and crowded and self.dispatcher.saturated(job):
            self._postpone(run, claims)
        else:
            await self._attempt_now(run, job, claims, started)
        run.pending -= 1
        if run.pending == 0:
            await self._conclude(run)

    def _postpone(self, run: _Pass, claims: list[Claim]) -> None:
        """The window is more than half full and this destination already has twice its
        connections' worth of attempts running or waiting: these recipients go back to
        the queue for a while, no attempt counted, so that one slow destination cannot
        fill the whole active window and starve the others."""
        now = self.clock()
        later = now + POSTPONE * self.rng.uniform(0.5, 1.5)
        busy = Result(Reply(451, "4.4.5", "destination busy: postponed"))
        for claim in claims:
            run.verdicts.append(Verdict(Outcome(
                claim.message.queue_id, claim.index, "queued", claim.attempts, later,
                claim.last_reply, claim.last_status, claim.remote_mta, now, claim.warned), None))
            run.log.append((claim, busy, 0.0))

    async def _attempt_now(self, run: _Pass, job: Delivery | None, claims: list[Claim],
                           started: float) -> None:
        try:
            results = await self._results(job, claims)
        except Exception:
            maillog.error("attempt-failed", queue_id=run.message.queue_id,
                          detail=traceback.format_exc(limit=6))
            results = [Result(Reply(451, "4.3.0", "local error in processing"))] * len(claims)
        now = self.clock()
        for claim, result in zip(claims, results, strict=True):
            run.verdicts.append(judge(claim, result, now, self.config,
                                      random.Random(run.seed)))
            run.log.append((claim, result, now - started))

    async def _results(self, job: Delivery | None, claims: list[Claim]) -> list[Result]:
        if job is not None and job.action.deliver == "maildir":
            return await self.local.deliver(job)
        if job is not None and job.action.deliver == "pipe":
            return await self.local.pipe_action(job)
        if job is not None and job.action.deliver == "mbox":
            return await self.local.mbox_action(job)
        if job is not None:
            return await self.dispatcher.deliver(job)
        out = []
        for claim in claims:
            if claim.cancelled:
                out.append(Result(CANCELLED))
            else:
                out.append(Result(Reply(451, "4.3.5", f"no usable action {claim.action!r} "
                                        "in the configuration")))
        return out

    async def _conclude(self, run: _Pass) -> None:
        """All attempts of a message in this pass ended: DSN, log, then record (retried
        until it succeeds: recipients must not stay in flight while the daemon runs)."""
        try:
            dsn = await self._notify_safely(run)
            now = self.clock()
            for (claim, result, took), verdict in zip(run.log, run.verdicts, strict=True):
                _log_outcome(claim, result, verdict, took, now, dsn=dsn)
            outcomes = [v.outcome for v in run.verdicts]
            while True:
                try:
                    await self._settle(outcomes, run.message.queue_id)
                    break
                except (sqlite3.Error, OSError) as exc:
                    maillog.error("queue-index", queue_id=run.message.queue_id,
                                  reason=str(exc), retry_in=ERROR_PAUSE)
                    if self._stopping:   # the next start repeats the attempt
                        break
                    await asyncio.sleep(ERROR_PAUSE)
        finally:
            self._active -= len(run.verdicts)
            self._wake.set()

    async def _notify_safely(self, run: _Pass) -> str | None:
        """The DSN's queue id, or None. A DSN that cannot be queued turns its recipients
        back to deferred, for another attempt and another DSN later."""
        try:
            return await self._notify(run)
        except Exception as exc:
            maillog.error("dsn-failed", queue_id=run.message.queue_id, reason=str(exc),
                          retry_in=DSN_RETRY, detail=traceback.format_exc(limit=4))
            run.verdicts = [_without_report(v, self.clock() + DSN_RETRY)
                            for v in run.verdicts]
            return None

    async def _settle(self, outcomes: list[Outcome], queue_id: str) -> None:
        """Record a message's outcomes; the messages that end meanwhile share one
        transaction (group commit), whose end this waits for."""
        future = asyncio.get_running_loop().create_future()
        self._unsettled.append((outcomes, queue_id, future))
        if self._settler is None or self._settler.done():
            self._settler = asyncio.create_task(self._settle_batches())
        await future

    async def _settle_batches(self) -> None:
        while self._unsettled:
            batch, self._unsettled = self._unsettled, []
            outcomes = [outcome for item in batch for outcome in item[0]]
            error: BaseException | None = None
            try:
                await self._index(self._settle_now, outcomes, [item[1] for item in batch])
            except BaseException as exc:   # every waiter hears of it, whatever it is
                error = exc
            for _, _, future in batch:
                if future.done():
                    continue
                if error is None:
                    future.set_result(None)
                elif isinstance(error, asyncio.CancelledError):
                    future.cancel()
                else:
                    future.set_exception(error)
            if isinstance(error, asyncio.CancelledError):
                raise error

    def _settle_now(self, outcomes: list[Outcome], queue_ids: list[str]) -> None:
        assert self._store is not None
        for done in self._store.settle(outcomes, queue_ids):
            self._remove_body(done)

    def _remove_body(self, queue_id: str) -> None:
        """After the index forgot the message (committed): a failure here only leaves a
        file that the next start's recovery removes."""
        try:
            os.unlink(os.path.join(self.spool.messages, queue_id))
        except FileNotFoundError:
            pass
        except OSError as exc:
            maillog.warning("remove-failed", queue_id=queue_id, reason=exc.strerror)
        maillog.event("removed", queue_id=queue_id)

    # --- DSNs -------------------------------------------------------------------------

    async def _notify(self, run: _Pass) -> str | None:
        message = run.message
        reports = [v.report for v in run.verdicts if v.report is not None and
                   (message.sender or v.report.action == "failed")]  # <>: failures only
        if not reports:
            return None
        recipient = message.sender or self._double_bounce_address(message, reports)
        if recipient is None:
            return None
        return await self._queue_dsn(message, tuple(reports), recipient)

    def _double_bounce_address(self, message: QueuedMessage,
                               reports: list[bounce.RecipientReport]) -> str | None:
        """Where a failed message from ``<>`` (a bounce) is reported: the postmaster,
        unless it was the postmaster's own notice that failed."""
        postmaster = self.config.queue.postmaster
        if postmaster and not any(r.address == postmaster for r in reports):
            return postmaster
        maillog.warning("dsn-dropped", queue_id=message.queue_id,
                        reason="the failed message had the null sender <>; " +
                        ("it was for the postmaster" if postmaster else
                         "queue.postmaster is not set"))
        return None

    async def _queue_dsn(self, message: QueuedMessage, reports: tuple[bounce.RecipientReport,
                         ...], recipient: str) -> str | None:
        action = internal.route(self.rules, recipient)
        if action is None:
            maillog.warning("dsn-dropped", queue_id=message.queue_id, to=recipient,
                            reason="no match rule routes the sender's domain")
            return None
        now = self.clock()
        dsn_id = new_queue_id(now)
        report = bounce.Report(
            reporting_mta=self.config.hostname, queue_id=message.queue_id, sender=recipient,
            arrival=message.received_at, recipients=reports, envid=message.envid,
            ret=_returned_content(message.ret, reports), smtputf8=message.smtputf8,
            received_from=f"[{message.client_address}] HELO {message.helo}")
        path = os.path.join(self.spool.messages, message.queue_id)
        content = await asyncio.get_running_loop().run_in_executor(
            None, _compose, report, path, now, f"{dsn_id}@{self.config.hostname}",
            self.config.queue.bounce_size_limit)
        await internal.enqueue(self.spool, content, queue_id=dsn_id, sender="",
                               recipients=(RecipientRecord(recipient, action),),
                               hostname=self.config.hostname, protocol="dsn", now=now,
                               smtputf8=message.smtputf8)
        return dsn_id


def _returned_content(ret: str | None, reports: tuple[bounce.RecipientReport, ...]
                      ) -> str | None:
    """RET for the DSN: a report of successes only carries the headers, whatever the
    sender asked (as Postfix does): else anyone could have tayori mail a whole message
    of theirs to any address, by naming it as the sender and asking for NOTIFY=SUCCESS."""
    if all(r.action in ("delivered", "relayed", "expanded") for r in reports):
        return "HDRS"
    return ret


def _compose(report: bounce.Report, path: str, now: float, message_id: str,
             limit: int) -> bytes:
    try:
        handle = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:   # deleted meanwhile: report without the original
        import io
        return bounce.compose(report, io.BytesIO(b""), now=now, message_id=message_id,
                              max_original=limit)
    with handle:
        return bounce.compose(report, handle, now=now, message_id=message_id,
                              max_original=limit)


def _domain(address: str) -> str:
    try:
        return parse_mailbox(address, utf8=True).ascii_domain
    except AddressError:
        return address.rpartition("@")[2].lower()


def _log_outcome(claim: Claim, result: Result, verdict: Verdict, took: float,
                 now: float, *, dsn: str | None) -> None:
    outcome = verdict.outcome
    fields: dict[str, object] = {
        "queue_id": claim.message.queue_id, "to": claim.address,
        "relay": result.target or "none", "delay": f"{now - claim.message.received_at:.2f}",
        "attempt_took": f"{took:.2f}", "attempts": outcome.attempts,
        "reply": outcome.reply}
    if result.tls:
        fields["tls"] = result.tls
    if outcome.state == "deferred":
        fields["next_attempt"] = f"{outcome.next_attempt - now:.0f}s"
    if verdict.report is not None:
        fields["dsn"] = f"{verdict.report.action}:{dsn}" if dsn else "dropped"
    if outcome.state == "queued":   # postponed: no attempt was made
        maillog.event("postponed", logging.DEBUG, **fields)
        return
    maillog.event(outcome.state, **fields)


