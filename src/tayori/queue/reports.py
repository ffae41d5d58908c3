"""DMARC aggregate reports going out: the periodic job that mails what was recorded.

Takes: the configuration (``dmarc.*``, ``hostname``, the match rules), the spool (its
directory holds ``dmarc-reports.sqlite3``, which the receiving side fills through
:meth:`~tayori.auth.dmarc_reports.ReportStore.record`), a
:class:`~tayori.dns.Resolver` (for RFC 7489 §7.1) and a clock.
Promises:
- :meth:`ReportJob.run`, started by the queue manager (so in the one process that
  delivers), makes a turn at once and then after every period boundary: periods of
  ``dmarc.report_interval`` rounded down to whole hours (one at least), aligned to the
  Unix epoch (a day is a UTC day), the turn :data:`SETTLE` seconds after the boundary.
  With ``dmarc.reports`` off a turn does nothing (a reload may turn it on).
- A turn (:meth:`ReportJob.send_due`) takes every finished, unsent period's report
  (:meth:`~tayori.auth.dmarc_reports.ReportStore.pending_reports`) and queues one
  message (:func:`~tayori.auth.dmarc_reports.report_message`; From and envelope sender
  ``dmarc.report_from`` or ``postmaster@`` the host name, organisation
  ``dmarc.report_org`` or the host name, receiver the host name) to the ``rua=``
  mailboxes that :func:`~tayori.auth.dmarc_reports.authorized_destinations` allows
  (§7.1: an external host must publish ``<domain>._report._dmarc.<host>``) and whose
  ``!size`` limit it fits, routed as DSNs are (:mod:`tayori.queue.internal`); then marks
  the period sent. A report with no destination left (none authorized, all too small,
  no route) is logged and marked sent too: nobody would take it later either.
Failure policy: reports never affect mail. A temporary DNS failure leaves that report
for the next turn, which then comes after :data:`RETRY` seconds rather than a period;
so does an error of the store or the spool (logged). A crash between queueing a report
and marking it sent sends it again next time (at least once, as the queue itself).
Config keys: ``dmarc.reports``, ``dmarc.report_interval``, ``dmarc.report_org``,
``dmarc.report_from``, ``hostname``, ``spool``, ``match``.
Standards: RFC 7489 §7.1 (external destinations), §7.2 (aggregate reports).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime

from tayori import maillog
from tayori.auth.dmarc_reports import (
    BUCKET,
    Report,
    Reporter,
    ReportStore,
    authorized_destinations,
    report_message,
    within_limit,
)
from tayori.config import Config
from tayori.dns import DnsTemporaryError, Resolver
from tayori.policy.relay import Rules
from tayori.queue import internal
from tayori.queue.spool import RecipientRecord, Spool, new_queue_id

STORE_NAME = "dmarc-reports.sqlite3"
SETTLE = 60.0        # after a period's end, for the counts of its last moments to land
RETRY = 900.0        # a turn that left a report for later comes again this soon
PROTOCOL = "dmarc-report"


def store_path(spool_directory: str) -> str:
    """Where the report data lives: ``<spool>/dmarc-reports.sqlite3``."""
    return os.path.join(spool_directory, STORE_NAME)


def period_of(config: Config) -> int:
    """``dmarc.report_interval`` in whole hours (at least one), in seconds."""
    return max(BUCKET, int(config.dmarc.report_interval) // BUCKET * BUCKET)


def reporter_of(config: Config) -> Reporter:
    dmarc, hostname = config.dmarc, config.hostname
    return Reporter(receiver=hostname, org_name=dmarc.report_org or hostname,
                    email=dmarc.report_from or f"postmaster@{hostname}")


class ReportJob:
    def __init__(self, spool: Spool, resolver: Resolver, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.spool, self.resolver, self.clock = spool, resolver, clock

    async def run(self, current: Callable[[], Config]) -> None:
        """Turns for ever (cancel to stop); ``current`` gives the config of the moment."""
        while True:
            config = current()
            try:
                later = config.dmarc.reports and await self.send_due(config)
            except Exception:   # never let the job end while the daemon runs
                maillog.error("dmarc-reports", detail=traceback.format_exc(limit=6))
                later = True
            await asyncio.sleep(self._wait(config, later))

    def _wait(self, config: Config, later: bool) -> float:
        period, now = period_of(config), self.clock()
        wait = (now // period + 1) * period + SETTLE - now
        return min(wait, RETRY) if later else wait

    async def send_due(self, config: Config) -> bool:
        """One turn (see the module docstring); True when a report was left for later."""
        later = False
        try:
            store = await asyncio.to_thread(ReportStore, store_path(self.spool.directory),
                                            reporter_of(config), interval=period_of(config))
            try:
                for report in await asyncio.to_thread(store.pending_reports, self.clock()):
                    if await self._send(config, report):
                        await asyncio.to_thread(store.mark_sent, report)
                    else:
                        later = True
            finally:
                store.close()
        except (sqlite3.Error, OSError) as exc:
            maillog.error("dmarc-reports", reason=str(exc), retry_in=RETRY)
            return True
        return later

    async def _send(self, config: Config, report: Report) -> bool:
        """Queue ``report``; False when DNS could not say where it may go."""
        try:
            uris = await authorized_destinations(report.policy_domain, report.rua,
                                                 self.resolver)
        except DnsTemporaryError as exc:
            maillog.warning("dmarc-report-deferred", domain=report.policy_domain,
                            reason=f"DNS: {exc}", retry_in=RETRY)
            return False
        queue_id = new_queue_id(self.clock())
        sender = reporter_of(config).email
        content = report_message(
            report, sender=sender, recipients=sorted({u.mailbox for u in uris if u.mailbox}),
            date=datetime.fromtimestamp(self.clock(), UTC),
            message_id=f"<{queue_id}@{config.hostname}>")
        fitting = {uri.mailbox for uri in uris if uri.mailbox and within_limit(uri, content)}
        recipients = _routed(Rules(config), sorted(fitting))
        if not recipients:
            maillog.warning("dmarc-report-dropped", domain=report.policy_domain,
                            file=report.filename, reason="no authorized destination that "
                            "takes it (RFC 7489 §7.1, size limits, match rules)")
            return True
        await internal.enqueue(self.spool, content, queue_id=queue_id, sender=sender,
                               recipients=recipients, hostname=config.hostname,
                               protocol=PROTOCOL, now=self.clock())
        maillog.event("dmarc-report-queued", queue_id=queue_id, domain=report.policy_domain,
                      file=report.filename, to=",".join(r.address for r in recipients))
        return True


def _routed(rules: Rules, mailboxes: list[str]) -> list[RecipientRecord]:
    records = []
    for mailbox in mailboxes:
        action = internal.route(rules, mailbox)
        if action is None:
            maillog.warning("dmarc-report-dropped", to=mailbox,
                            reason="no match rule routes its domain")
        else:
            records.append(RecipientRecord(mailbox, action))
    return records


__all__ = ["PROTOCOL", "STORE_NAME", "ReportJob", "period_of", "reporter_of", "store_path"]
