"""queue.reports: when the DMARC report job turns, and what it does with reports it cannot
send now (DNS trouble: kept) or ever (no authorized destination: dropped, marked sent).
Reports that go out are checked end to end in tests/integration/test_dkim_signing.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tayori.auth.dmarc import evaluate
from tayori.auth.dmarc_reports import ReportStore
from tayori.config import Config
from tayori.config.model import from_document
from tayori.queue.reports import ReportJob, period_of, reporter_of, store_path
from tayori.testing.dnsstub import StaticResolver

DAY = 86400
T0 = 1_700_006_400   # a UTC midnight
ZONE: dict[str, Any] = {
    "_dmarc.example.com": {"TXT": ["v=DMARC1; p=none; rua=mailto:agg@reports.example"]},
}


def config(**dmarc: Any) -> Config:
    return from_document({"hostname": "mx.example", "listen": [{"address": "127.0.0.1:25"}],
                          "dmarc": {"reports": True, **dmarc}}, "t.toml", "/")


def job(tmp_path: Path, zone: dict[str, Any], now: float) -> ReportJob:
    spool = SimpleNamespace(directory=str(tmp_path))
    return ReportJob(spool, StaticResolver(zone), clock=lambda: now)  # type: ignore[arg-type]


def recorded(tmp_path: Path) -> ReportStore:
    store = ReportStore(store_path(str(tmp_path)), reporter_of(config()))
    verdict = asyncio.run(evaluate(["a@example.com"], spf=("pass", "example.com"), dkim=[],
                                   resolver=StaticResolver(ZONE), sample=lambda: 0.0))
    assert store.record(verdict, source_ip="192.0.2.1", received=T0 + 3600)
    return store


def test_turns_follow_period_boundaries(tmp_path: Path) -> None:
    daily = config()
    assert period_of(daily) == DAY and period_of(config(report_interval="90m")) == 3600
    assert period_of(config(report_interval="10m")) == 3600
    turning = job(tmp_path, ZONE, T0 + 100)
    assert turning._wait(daily, later=False) == DAY - 100 + 60
    assert turning._wait(daily, later=True) == 900


def test_dns_trouble_keeps_the_report_for_later(tmp_path: Path) -> None:
    store = recorded(tmp_path)
    zone = {**ZONE, "example.com._report._dmarc.reports.example": "SERVFAIL"}
    assert asyncio.run(job(tmp_path, zone, T0 + DAY + 60).send_due(config())) is True
    assert len(store.pending_reports(T0 + DAY + 60)) == 1


def test_an_unauthorized_destination_drops_the_report(tmp_path: Path) -> None:
    store = recorded(tmp_path)
    assert asyncio.run(job(tmp_path, ZONE, T0 + DAY + 60).send_due(config())) is False
    assert store.pending_reports(T0 + DAY + 60) == []


def test_nothing_before_the_period_ends(tmp_path: Path) -> None:
    store = recorded(tmp_path)
    assert asyncio.run(job(tmp_path, ZONE, T0 + DAY - 1).send_due(config())) is False
    assert len(store.pending_reports(T0 + DAY)) == 1
