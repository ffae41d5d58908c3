"""DMARC aggregate reports: recording, the Appendix C XML, the report mail, §7.1 checks."""

from __future__ import annotations

import asyncio
import gzip
import xml.etree.ElementTree as ET
from collections.abc import Coroutine, Iterator, Sequence
from datetime import UTC, datetime
from email import message_from_bytes
from email.message import Message
from email.policy import default as default_policy
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tayori.auth.dmarc import DmarcVerdict, Policy, ReportUri, evaluate
from tayori.auth.dmarc_reports import (
    DkimAuth,
    Report,
    Reporter,
    ReportStore,
    SpfAuth,
    authorized_destinations,
    report_message,
    within_limit,
)
from tayori.dns import DnsTemporaryError
from tayori.testing.dnsstub import StaticResolver, Zone

T = TypeVar("T")
DAY = 86400
T0 = 1_700_006_400  # 2023-11-15 00:00:00 UTC, a period boundary
REPORTER = Reporter("mx.tayori.test", "Tayori Test", "dmarc-reports@tayori.test", "https://x")
ZONE: Zone = {
    "_dmarc.example.com": {"TXT": [
        "v=DMARC1; p=reject; pct=50; adkim=s; fo=1; rua=mailto:agg@example.com!1m"]},
    "_dmarc.example.org": {"TXT": ["v=DMARC1; p=quarantine; rua=mailto:agg@example.org"]},
    "_dmarc.quiet.test": {"TXT": ["v=DMARC1; p=reject"]},
}


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, 10))


def judge(author: str, *, dkim: Sequence[tuple[str, str]] = (), sample: float = 0.0,
          enforcement: Policy = Policy.REJECT) -> DmarcVerdict:
    return run(evaluate([author], spf=("pass", "bounces.example.net"), dkim=dkim,
                        resolver=StaticResolver(ZONE), sample=lambda: sample,
                        enforcement=enforcement))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ReportStore]:
    opened = ReportStore(tmp_path / "dmarc.sqlite", REPORTER)
    yield opened
    opened.close()


def auth() -> dict[str, Any]:
    return {"dkim": [DkimAuth("pass", "Example.com", "s1", "good"),
                     DkimAuth("weird", "other.example")],
            "spf": [SpfAuth("pass", "bounces.example.net")]}


def elements(report: Report) -> ET.Element:
    return ET.fromstring(report.xml)


def child(element: ET.Element, tag: str) -> ET.Element:
    found = element.find(tag)
    assert found is not None, tag
    return found


# --- recording ------------------------------------------------------------------------------

def test_only_requested_reports_are_recorded(store: ReportStore) -> None:
    assert store.record(judge("a@example.com"), source_ip="192.0.2.1", received=T0)
    assert not store.record(judge("a@quiet.test"), source_ip="192.0.2.1", received=T0)
    assert not store.record(judge("a@nowhere.test"), source_ip="192.0.2.1", received=T0)
    assert not store.record(judge("no domain"), source_ip="192.0.2.1", received=T0)


def test_nothing_is_due_before_the_period_ends(store: ReportStore) -> None:
    store.record(judge("a@example.com"), source_ip="192.0.2.1", received=T0 + 10)
    assert store.pending_reports(T0 + DAY - 1) == []
    assert len(store.pending_reports(T0 + DAY)) == 1


def test_rows_are_counted_per_identity(store: ReportStore) -> None:
    failing = judge("a@example.com", sample=0.9)  # sampled out: quarantine
    passing = judge("b@example.com", dkim=[("pass", "example.com")])
    for hour in range(3):
        store.record(failing, source_ip="192.0.2.1", received=T0 + hour * 3600, **auth())
    store.record(failing, source_ip="2001:db8::1", received=T0 + 7200, **auth())
    store.record(passing, source_ip="192.0.2.1", received=T0 + 60, envelope_to="Tayori.Test")
    (report,) = store.pending_reports(T0 + DAY)
    rows = {(r.findtext("row/source_ip"), r.findtext("row/policy_evaluated/dkim")):
            r for r in elements(report).iter("record")}
    assert sorted(rows) == [("192.0.2.1", "fail"), ("192.0.2.1", "pass"),
                            ("2001:db8::1", "fail")]
    failed = rows[("192.0.2.1", "fail")]
    assert failed.findtext("row/count") == "3"
    assert failed.findtext("row/policy_evaluated/disposition") == "quarantine"
    assert failed.findtext("row/policy_evaluated/spf") == "fail"
    assert [r.findtext("type") for r in failed.iterfind("row/policy_evaluated/reason")] == [
        "sampled_out"]
    assert failed.findtext("identifiers/header_from") == "example.com"
    assert failed.find("identifiers/envelope_to") is None
    assert [(d.findtext("domain"), d.findtext("selector"), d.findtext("result"),
             d.findtext("human_result")) for d in failed.iterfind("auth_results/dkim")] == [
        ("example.com", "s1", "pass", "good"), ("other.example", None, "none", None)]
    assert [(s.findtext("domain"), s.findtext("scope"), s.findtext("result"))
            for s in failed.iterfind("auth_results/spf")] == [
        ("bounces.example.net", "mfrom", "pass")]
    passed = rows[("192.0.2.1", "pass")]
    assert passed.findtext("identifiers/envelope_to") == "tayori.test"
    assert passed.findtext("auth_results/spf/result") == "none"  # at least one spf element


def test_override_reasons(store: ReportStore) -> None:
    capped = judge("a@example.com", enforcement=Policy.NONE)
    store.record(capped, source_ip="192.0.2.1", received=T0,
                 reasons=[("forwarded", "via a list"), ("bogus", "")])
    (report,) = store.pending_reports(T0 + DAY)
    reasons = [(r.findtext("type"), r.findtext("comment"))
               for r in elements(report).iterfind("record/row/policy_evaluated/reason")]
    assert reasons == [("local_policy", None), ("forwarded", "via a list"), ("other", None)]


def test_reports_per_domain_and_period(store: ReportStore) -> None:
    store.record(judge("a@example.com"), source_ip="192.0.2.1", received=T0 + 5)
    store.record(judge("a@example.org"), source_ip="192.0.2.1", received=T0 + 5)
    store.record(judge("a@example.com"), source_ip="192.0.2.1", received=T0 + DAY + 5)
    due = store.pending_reports(T0 + 2 * DAY)
    assert [(r.policy_domain, r.begin, r.end) for r in due] == [
        ("example.com", T0, T0 + DAY - 1), ("example.org", T0, T0 + DAY - 1),
        ("example.com", T0 + DAY, T0 + 2 * DAY - 1)]


def test_mark_sent(store: ReportStore) -> None:
    store.record(judge("a@example.com"), source_ip="192.0.2.1", received=T0)
    (report,) = store.pending_reports(T0 + DAY)
    store.mark_sent(report)
    assert store.pending_reports(T0 + DAY) == []
    store.record(judge("a@example.com"), source_ip="192.0.2.9", received=T0 + 1)  # late
    assert store.pending_reports(T0 + 2 * DAY) == []
    store.record(judge("a@example.com"), source_ip="192.0.2.9", received=T0 + DAY)
    assert [r.begin for r in store.pending_reports(T0 + 2 * DAY)] == [T0 + DAY]


def test_the_store_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "dmarc.sqlite"
    first = ReportStore(path, REPORTER)
    first.record(judge("a@example.com"), source_ip="192.0.2.1", received=T0)
    first.close()
    second = ReportStore(path, REPORTER)
    try:
        assert len(second.pending_reports(T0 + DAY)) == 1
    finally:
        second.close()


def test_hourly_interval(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="whole number of hours"):
        ReportStore(tmp_path / "x.sqlite", REPORTER, interval=1800)
    hourly = ReportStore(tmp_path / "h.sqlite", REPORTER, interval=3600)
    try:
        hourly.record(judge("a@example.com"), source_ip="192.0.2.1", received=T0 + 3599)
        hourly.record(judge("a@example.com"), source_ip="192.0.2.1", received=T0 + 3600)
        assert [r.begin for r in hourly.pending_reports(T0 + 7200)] == [T0, T0 + 3600]
    finally:
        hourly.close()


# --- the XML --------------------------------------------------------------------------------

def test_feedback_document(store: ReportStore) -> None:
    store.record(judge("a@example.com"), source_ip="192.0.2.1", received=T0)
    (report,) = store.pending_reports(T0 + DAY)
    assert report.xml.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n<feedback>')
    root = elements(report)
    assert root.findtext("version") == "1.0"
    assert [(e.tag, e.text) for e in child(root, "report_metadata") if e.text
            and e.text.strip()] == [
        ("org_name", "Tayori Test"), ("email", "dmarc-reports@tayori.test"),
        ("extra_contact_info", "https://x"), ("report_id", report.report_id)]
    assert root.findtext("report_metadata/date_range/begin") == str(T0)
    assert root.findtext("report_metadata/date_range/end") == str(T0 + DAY - 1)
    assert [(e.tag, e.text) for e in child(root, "policy_published")] == [
        ("domain", "example.com"), ("adkim", "s"), ("aspf", "r"), ("p", "reject"),
        ("sp", "reject"), ("pct", "50"), ("fo", "1")]


def _paths(element: ET.Element, prefix: str = "") -> set[str]:
    path = f"{prefix}/{element.tag}"
    return {path}.union(*(_paths(child, path) for child in element))


def test_elements_are_those_real_reports_use(store: ReportStore) -> None:
    """Every element we write appears in the third-party sample reports (or is
    Appendix C's envelope_to, which those samples happen not to carry)."""
    from harness import shared_data

    folder = shared_data("dmarc", "stalwart-reports")
    known = {"/feedback/record/identifiers/envelope_to"}
    for sample in sorted(folder.glob("*.xml")):
        known |= _paths(ET.parse(sample).getroot())
    store.record(judge("a@example.com", sample=0.9), source_ip="192.0.2.1", received=T0,
                 envelope_to="tayori.test", **auth())
    (report,) = store.pending_reports(T0 + DAY)
    assert _paths(elements(report)) <= known


def test_file_name_subject_and_gzip(store: ReportStore) -> None:
    store.record(judge("a@example.com"), source_ip="192.0.2.1", received=T0)
    (report,) = store.pending_reports(T0 + DAY)
    assert report.filename == f"mx.tayori.test!example.com!{T0}!{T0 + DAY - 1}.xml.gz"
    assert report.subject == (f"Report Domain: example.com Submitter: mx.tayori.test "
                              f"Report-ID: <{report.report_id}>")
    assert gzip.decompress(report.gzipped) == report.xml
    assert report.gzipped == report.gzipped  # no timestamp: the same bytes every time
    assert report.rua == (ReportUri("mailto:agg@example.com", 1 << 20),)
    assert store.pending_reports(T0 + DAY)[0].report_id == report.report_id


# --- the mail -------------------------------------------------------------------------------

def test_report_message(store: ReportStore) -> None:
    store.record(judge("a@example.com"), source_ip="192.0.2.1", received=T0)
    (report,) = store.pending_reports(T0 + DAY)
    data = report_message(report, sender="dmarc-reports@tayori.test",
                          recipients=["agg@example.com"],
                          date=datetime(2023, 11, 16, tzinfo=UTC), message_id="<r1@tayori.test>")
    assert b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")
    message: Message = message_from_bytes(data, policy=default_policy)
    assert " ".join(str(message["Subject"]).split()) == report.subject
    assert (message["From"], message["To"], message["Message-ID"]) == (
        "dmarc-reports@tayori.test", "agg@example.com", "<r1@tayori.test>")
    assert message["Date"] == "Thu, 16 Nov 2023 00:00:00 +0000"
    attachments = [part for part in message.walk() if part.get_filename()]
    assert len(attachments) == 1
    assert attachments[0].get_content_type() == "application/gzip"
    assert attachments[0].get_filename() == report.filename
    payload = attachments[0].get_payload(decode=True)
    assert isinstance(payload, bytes) and gzip.decompress(payload) == report.xml
    assert within_limit(report.rua[0], data)
    assert not within_limit(ReportUri("mailto:a@example.com", 100), data)
    assert within_limit(ReportUri("mailto:a@example.com"), data)


# --- §7.1 external destinations -------------------------------------------------------------

AUTH_ZONE: Zone = {
    "example.com._report._dmarc.reports.example.net": {"TXT": ["v=DMARC1"]},
    "example.com._report._dmarc.override.example.net": {"TXT": [
        "v=DMARC1; rua=mailto:other-box@override.example.net!5m"]},
    "example.com._report._dmarc.hijack.example.net": {"TXT": [
        "v=DMARC1; rua=mailto:victim@victim.example"]},
    "example.com._report._dmarc.notdmarc.example.net": {"TXT": ["hello"]},
    "example.com._report._dmarc.flaky.example.net": "SERVFAIL",
}


def destinations(*uris: str) -> list[str]:
    found = run(authorized_destinations("example.com", [ReportUri(u) for u in uris],
                                        StaticResolver(AUTH_ZONE)))
    return [u.uri for u in found]


def test_same_organization_needs_no_authorization() -> None:
    assert destinations("mailto:agg@example.com", "mailto:agg@reports.example.com") == [
        "mailto:agg@example.com", "mailto:agg@reports.example.com"]


def test_external_destinations() -> None:
    assert destinations("mailto:a@reports.example.net") == ["mailto:a@reports.example.net"]
    assert destinations("mailto:a@unlisted.example.net") == []
    assert destinations("mailto:a@notdmarc.example.net") == []
    assert destinations("mailto:a@override.example.net") == [
        "mailto:other-box@override.example.net"]
    assert destinations("mailto:a@hijack.example.net") == []
    assert destinations("https://reports.example.net/in", "mailto:") == []


def test_external_destination_temporary_error() -> None:
    with pytest.raises(DnsTemporaryError):
        destinations("mailto:a@flaky.example.net")
