"""DMARC aggregate reports (RFC 7489 §7.2, Appendix C): record, build, address, verify.

Takes: for each evaluated message, its :class:`~tayori.auth.dmarc.DmarcVerdict`, the
client's IP address, the time it arrived, and the raw SPF and DKIM results as
:class:`SpfAuth` / :class:`DkimAuth` (plain values, so this module needs neither
verifier); who we are (:class:`Reporter`); an SQLite file path; a Resolver for §7.1.
Promises:
- :meth:`ReportStore.record` counts the message in an SQLite file, under its policy
  domain and the hour it arrived, one counter per distinct report row (source IP,
  disposition, aligned DKIM/SPF, override reasons, header From, envelope To, the auth
  results). Only verdicts that used a record with a ``rua=`` are kept: nobody else
  asked for a report. The policy record seen last in each hour is kept with them.
- :meth:`ReportStore.pending_reports` builds, for every policy domain and every
  finished reporting period (``interval`` seconds, aligned to the Unix epoch, so a day
  is a UTC day) not yet marked sent, a :class:`Report`: the Appendix C XML (version 1.0
  feedback, report_metadata, policy_published, one record per row), its gzip form
  (deterministic: no timestamp in the gzip header) and the §7.2.1.1 file name
  ``receiver!policy-domain!begin!end.xml.gz``. :meth:`ReportStore.mark_sent` forgets
  that period's rows and remembers it was sent, so a report is built once.
- :func:`report_message` makes the mail carrying a report: a multipart/mixed MIME
  message, CRLF, with the §7.2.1.1 Subject and the ``application/gzip`` attachment.
- :func:`authorized_destinations` applies §7.1: a ``mailto:`` rua whose host has
  another organizational domain than the policy domain is used only when
  ``<policy-domain>._report._dmarc.<host>`` publishes a ``v=DMARC1`` record; a rua=
  in that record replaces the URI if it names the same host (otherwise the URI is
  dropped). Non-mailto URIs are dropped: tayori sends reports by mail only.
Failure policy: the store raises sqlite3 errors (the caller logs them; losing report
data never affects mail); it is synchronous and thread-safe, so call it from the event
loop through ``asyncio.to_thread``. Writes use WAL with synchronous=NORMAL: a power cut
may lose the last counts, which reports tolerate. :func:`authorized_destinations` lets
DnsTemporaryError through, so the periodic job retries later (§7.1 step 4).
Config keys (read by the caller): ``dmarc.report_org``, ``dmarc.report_from``,
``dmarc.report_interval``; the store is ``<spool>/dmarc-reports.sqlite3``; the receiver
name is ``hostname``.
Standards: RFC 7489 §7.1 (external destinations), §7.2 and Appendix C (aggregate
reports, XML schema), §7.2.1.1 (file name, Subject); RFC 6713 (application/gzip);
RFC 5322 / RFC 2045-2046 (the report message).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sqlite3
import threading
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid
from typing import Any, NamedTuple

from tayori.auth import orgdomain
from tayori.auth.dmarc import (
    DmarcRecord,
    DmarcResult,
    DmarcVerdict,
    Policy,
    RecordError,
    ReportUri,
    is_dmarc_record,
    parse_record,
    parse_uris,
)
from tayori.dns import NxDomain, Resolver

BUCKET = 3600
"""Counts are kept per hour; a reporting interval is a whole number of hours."""
DKIM_RESULTS = frozenset({"none", "pass", "fail", "policy", "neutral", "temperror",
                          "permerror"})
SPF_RESULTS = frozenset({"none", "neutral", "pass", "fail", "softfail", "temperror",
                         "permerror"})
KEEP_SENT = 10
"""Periods a sent mark is kept; counts arriving later than that are dropped."""
OVERRIDE_REASONS = frozenset({"forwarded", "sampled_out", "trusted_forwarder",
                              "mailing_list", "local_policy", "other"})


class DkimAuth(NamedTuple):
    """One DKIM signature's result for the report (Appendix C DKIMAuthResultType)."""

    result: str
    domain: str
    selector: str = ""
    human_result: str = ""


class SpfAuth(NamedTuple):
    """The SPF result for the report; ``scope`` is ``mfrom`` or ``helo``."""

    result: str
    domain: str
    scope: str = "mfrom"


@dataclass(frozen=True, slots=True)
class Reporter:
    """Who sends the reports: ``receiver`` is our domain (the file name's first part and
    the Subject's Submitter), ``org_name`` and ``email`` go into report_metadata."""

    receiver: str
    org_name: str
    email: str
    extra_contact_info: str = ""


@dataclass(frozen=True, slots=True)
class Report:
    """One aggregate report: a policy domain over ``begin``..``end`` (inclusive)."""

    policy_domain: str
    begin: int
    end: int
    receiver: str
    report_id: str
    rua: tuple[ReportUri, ...]
    xml: bytes

    @property
    def filename(self) -> str:
        """§7.2.1.1: ``receiver!policy-domain!begin!end.xml.gz``."""
        return f"{self.receiver}!{self.policy_domain}!{self.begin}!{self.end}.xml.gz"

    @property
    def gzipped(self) -> bytes:
        return gzip.compress(self.xml, mtime=0)

    @property
    def subject(self) -> str:
        """§7.2.1.1: ``Report Domain: <d> Submitter: <s> Report-ID: <id>``."""
        return (f"Report Domain: {self.policy_domain} Submitter: {self.receiver} "
                f"Report-ID: <{self.report_id}>")


# --- recording ------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rows (
    domain TEXT NOT NULL,
    bucket INTEGER NOT NULL,
    row TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (domain, bucket, row)
);
CREATE TABLE IF NOT EXISTS published (
    domain TEXT NOT NULL,
    bucket INTEGER NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (domain, bucket)
);
CREATE TABLE IF NOT EXISTS sent (
    domain TEXT NOT NULL,
    begin INTEGER NOT NULL,
    PRIMARY KEY (domain, begin)
);
"""


def _choice(value: str, allowed: frozenset[str], default: str = "none") -> str:
    value = value.lower()
    return value if value in allowed else default


def _reasons(verdict: DmarcVerdict, extra: Sequence[tuple[str, str]]) -> list[list[str]]:
    reasons = [["sampled_out", ""]] if verdict.sampled_out else []
    if verdict.local_override:
        reasons.append(["local_policy", ""])
    reasons += [[_choice(kind, OVERRIDE_REASONS, "other"), comment] for kind, comment in extra]
    return reasons


def _row(verdict: DmarcVerdict, *, source_ip: str, envelope_to: str,
         dkim: Sequence[DkimAuth], spf: Sequence[SpfAuth],
         reasons: Sequence[tuple[str, str]]) -> str:
    """The identity of a report row, as canonical JSON (the counter's key)."""
    row: dict[str, Any] = {
        "source_ip": source_ip,
        "disposition": verdict.disposition.value,
        "dkim": "pass" if verdict.alignment.dkim else "fail",
        "spf": "pass" if verdict.alignment.spf else "fail",
        "reasons": _reasons(verdict, reasons),
        "header_from": verdict.from_domain,
        "envelope_to": envelope_to.lower(),
        "auth_dkim": [[d.domain.lower(), d.selector, _choice(d.result, DKIM_RESULTS),
                       d.human_result] for d in dkim],
        "auth_spf": [[s.domain.lower(), _choice(s.scope, frozenset({"mfrom", "helo"}), "mfrom"),
                      _choice(s.result, SPF_RESULTS)] for s in spf],
    }
    return json.dumps(row, sort_keys=True, separators=(",", ":"))


class ReportStore:
    """Aggregate report data in an SQLite file; see the module docstring."""

    def __init__(self, path: str | os.PathLike[str], reporter: Reporter, *,
                 interval: int = 86400) -> None:
        if interval < BUCKET or interval % BUCKET:
            raise ValueError("the report interval must be a whole number of hours")
        self.reporter = reporter
        self.interval = interval
        self._lock = threading.Lock()
        self._db = sqlite3.connect(os.fspath(path), check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def record(self, verdict: DmarcVerdict, *, source_ip: str, received: float,
               dkim: Sequence[DkimAuth] = (), spf: Sequence[SpfAuth] = (),
               envelope_to: str = "", reasons: Sequence[tuple[str, str]] = ()) -> bool:
        """Count one message; False (nothing kept) when no report was requested.

        ``reasons`` are extra policy overrides (``forwarded``, ``trusted_forwarder``,
        ``mailing_list``, ...) with a comment; sampled_out and local_policy come from
        the verdict.
        """
        record = verdict.record
        if (record is None or not record.rua
                or verdict.result not in (DmarcResult.PASS, DmarcResult.FAIL)):
            return False
        bucket = int(received) // BUCKET * BUCKET
        row = _row(verdict, source_ip=source_ip, envelope_to=envelope_to, dkim=dkim,
                   spf=spf, reasons=reasons)
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.execute(
                "INSERT INTO rows VALUES (?, ?, ?, 1) ON CONFLICT (domain, bucket, row) "
                "DO UPDATE SET count = count + 1", (verdict.policy_domain, bucket, row))
            self._db.execute(
                "INSERT INTO published VALUES (?, ?, ?) ON CONFLICT (domain, bucket) "
                "DO UPDATE SET record = excluded.record",
                (verdict.policy_domain, bucket, record.text))
        return True

    def pending_reports(self, now: float) -> list[Report]:
        """Reports for every finished, unsent period that has data, oldest first."""
        with self._lock:
            periods = self._db.execute(
                "SELECT DISTINCT domain, bucket / ? * ? AS begin FROM rows "
                "WHERE NOT EXISTS (SELECT 1 FROM sent WHERE sent.domain = rows.domain "
                "AND sent.begin = rows.bucket / ? * ?) ORDER BY begin, domain",
                (self.interval,) * 4).fetchall()
            due = [(d, b) for d, b in periods if b + self.interval <= now]
            return [self._build(domain, begin) for domain, begin in due]

    def mark_sent(self, report: Report) -> None:
        """Forget the period's counts and remember it was reported."""
        end = report.begin + self.interval
        with self._lock, self._db:
            self._db.execute("BEGIN")
            for table in ("rows", "published"):
                self._db.execute(f"DELETE FROM {table} WHERE domain = ? AND bucket >= ? "
                                 "AND bucket < ?", (report.policy_domain, report.begin, end))
            self._db.execute("INSERT OR IGNORE INTO sent VALUES (?, ?)",
                             (report.policy_domain, report.begin))
            self._forget_before(report.begin - KEEP_SENT * self.interval)

    def _forget_before(self, horizon: int) -> None:
        """Drop counts and sent marks older than ``horizon``: data that late is stale."""
        for table, column in (("rows", "bucket"), ("published", "bucket"), ("sent", "begin")):
            self._db.execute(f"DELETE FROM {table} WHERE {column} < ?", (horizon,))

    def _build(self, domain: str, begin: int) -> Report:
        span = (domain, begin, begin + self.interval)
        rows = self._db.execute(
            "SELECT row, SUM(count) FROM rows WHERE domain = ? AND bucket >= ? AND bucket < ? "
            "GROUP BY row ORDER BY row", span).fetchall()
        text = self._db.execute(
            "SELECT record FROM published WHERE domain = ? AND bucket >= ? AND bucket < ? "
            "ORDER BY bucket DESC LIMIT 1", span).fetchone()
        record = _record(text[0] if text else "")
        end = begin + self.interval - 1
        report_id = _report_id(self.reporter.receiver, domain, begin, end)
        xml = feedback_xml(self.reporter, domain=domain, begin=begin, end=end,
                           report_id=report_id, record=record,
                           rows=[(json.loads(row), count) for row, count in rows])
        return Report(domain, begin, end, self.reporter.receiver, report_id, record.rua, xml)


def _record(text: str) -> DmarcRecord:
    try:
        return parse_record(text)
    except RecordError:  # it parsed when recorded; only a hand-edited file gets here
        return DmarcRecord(p=Policy.NONE)


def _report_id(receiver: str, domain: str, begin: int, end: int) -> str:
    digest = hashlib.sha256(f"{receiver}!{domain}!{begin}!{end}".encode()).hexdigest()
    return f"{begin}.{digest[:20]}@{receiver}"


# --- the XML (Appendix C) -------------------------------------------------------------------

def _add(parent: ET.Element, tag: str, text: str | int | None = None) -> ET.Element:
    element = ET.SubElement(parent, tag)
    if text is not None:
        element.text = str(text)
    return element


def _metadata(root: ET.Element, reporter: Reporter, report_id: str, begin: int,
              end: int) -> None:
    meta = _add(root, "report_metadata")
    _add(meta, "org_name", reporter.org_name)
    _add(meta, "email", reporter.email)
    if reporter.extra_contact_info:
        _add(meta, "extra_contact_info", reporter.extra_contact_info)
    _add(meta, "report_id", report_id)
    dates = _add(meta, "date_range")
    _add(dates, "begin", begin)
    _add(dates, "end", end)


def _published(root: ET.Element, domain: str, record: DmarcRecord) -> None:
    policy = _add(root, "policy_published")
    _add(policy, "domain", domain)
    _add(policy, "adkim", record.adkim.value)
    _add(policy, "aspf", record.aspf.value)
    _add(policy, "p", record.p.value)
    _add(policy, "sp", (record.sp or record.p).value)
    _add(policy, "pct", record.pct)
    _add(policy, "fo", record.fo)


def _record_element(root: ET.Element, row: dict[str, Any], count: int) -> None:
    record = _add(root, "record")
    fields = _add(record, "row")
    _add(fields, "source_ip", row["source_ip"])
    _add(fields, "count", count)
    evaluated = _add(fields, "policy_evaluated")
    for tag in ("disposition", "dkim", "spf"):
        _add(evaluated, tag, row[tag])
    for kind, comment in row["reasons"]:
        reason = _add(evaluated, "reason")
        _add(reason, "type", kind)
        if comment:
            _add(reason, "comment", comment)
    identifiers = _add(record, "identifiers")
    if row["envelope_to"]:
        _add(identifiers, "envelope_to", row["envelope_to"])
    _add(identifiers, "header_from", row["header_from"])
    _auth_results(_add(record, "auth_results"), row)


def _auth_results(results: ET.Element, row: dict[str, Any]) -> None:
    for domain, selector, outcome, human in row["auth_dkim"]:
        dkim = _add(results, "dkim")
        _add(dkim, "domain", domain)
        if selector:
            _add(dkim, "selector", selector)
        _add(dkim, "result", outcome)
        if human:
            _add(dkim, "human_result", human)
    for domain, scope, outcome in row["auth_spf"] or [["", "mfrom", "none"]]:
        spf = _add(results, "spf")  # Appendix C: at least one spf element
        _add(spf, "domain", domain)
        _add(spf, "scope", scope)
        _add(spf, "result", outcome)


def feedback_xml(reporter: Reporter, *, domain: str, begin: int, end: int, report_id: str,
                 record: DmarcRecord, rows: Sequence[tuple[dict[str, Any], int]]) -> bytes:
    """The Appendix C ``<feedback>`` document, UTF-8, with an XML declaration."""
    root = ET.Element("feedback")
    _add(root, "version", "1.0")
    _metadata(root, reporter, report_id, begin, end)
    _published(root, domain, record)
    for row, count in rows:
        _record_element(root, row, count)
    ET.indent(root)
    body = ET.tostring(root, encoding="unicode")
    return f'<?xml version="1.0" encoding="UTF-8"?>\n{body}\n'.encode()


# --- the report message ---------------------------------------------------------------------

def report_message(report: Report, *, sender: str, recipients: Sequence[str],
                   date: datetime | None = None, message_id: str | None = None) -> bytes:
    """The mail carrying ``report`` (§7.2.1.1), CRLF line ends, ready to queue."""
    message = EmailMessage(policy=SMTP)
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Date"] = format_datetime(date or datetime.now(UTC))
    message["Message-ID"] = message_id or make_msgid(domain=report.receiver)
    message["Subject"] = report.subject
    message.set_content(
        "This is a DMARC aggregate report (RFC 7489).\n"
        f"Reporter: {report.receiver}\nDomain: {report.policy_domain}\n"
        f"From: {_utc(report.begin)}\nTo: {_utc(report.end)}\n")
    message.add_attachment(report.gzipped, maintype="application", subtype="gzip",
                           filename=report.filename)
    return message.as_bytes()


def _utc(timestamp: int) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def within_limit(uri: ReportUri, message: bytes) -> bool:
    """Whether a report message respects the URI's ``!size`` limit (§6.2)."""
    return uri.max_size is None or len(message) <= uri.max_size


# --- external destinations (§7.1) -----------------------------------------------------------

async def _authorization(policy_domain: str, host: str, resolver: Resolver) -> list[str]:
    """The v=DMARC1 records at ``<policy-domain>._report._dmarc.<host>``."""
    try:
        answers = await resolver.txt(f"{policy_domain}._report._dmarc.{host}")
    except (NxDomain, ValueError):  # ValueError: the name is too long to ask about
        return []
    texts = (answer.decode("utf-8", "replace") for answer in answers)
    return [text for text in texts if is_dmarc_record(text)]


def _override(records: list[str], uri: ReportUri, host: str) -> list[ReportUri]:
    """§7.1 step 8: a rua= in the authorizing record replaces the URI, same host only."""
    for text in records:
        for term in text.split(";"):
            name, _, value = term.partition("=")
            if name.strip(" \t").lower() != "rua":
                continue
            uris = parse_uris(value)
            if not uris:
                return [uri]
            return list(uris) if all(u.host == host for u in uris) else []
    return [uri]


async def authorized_destinations(policy_domain: str, uris: Sequence[ReportUri],
                                  resolver: Resolver) -> list[ReportUri]:
    """The mailto: rua URIs a report for ``policy_domain`` may go to (§7.1)."""
    own = orgdomain.organizational_domain(policy_domain)
    allowed: list[ReportUri] = []
    for uri in uris:
        host = uri.host
        if host is None:
            continue
        try:
            if orgdomain.organizational_domain(host) == own:
                allowed.append(uri)
                continue
        except ValueError:
            continue
        records = await _authorization(policy_domain, host, resolver)
        if records:
            allowed.extend(u for u in _override(records, uri, host) if u not in allowed)
    return allowed


__all__ = [
    "BUCKET",
    "DkimAuth",
    "Report",
    "ReportStore",
    "Reporter",
    "SpfAuth",
    "authorized_destinations",
    "feedback_xml",
    "report_message",
    "within_limit",
]
