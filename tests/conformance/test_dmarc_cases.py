"""DMARC against the authheaders cases (../shared/testdata/dmarc/authheaders/cases.json).

cases.json restates authheaders' unit test: a DNS map, messages, and for each case the
expected ``dmarc=`` result and ``policy.dmarc`` value. The harness turns the map into a
:class:`StaticResolver` zone:

- ``_dmarc.*`` and ``*._domainkey.*`` names hold that TXT record; an empty string is a
  TXT record that is not a DMARC record (authheaders' DNS function answered "" for it).
- ``<name> (A/AAAA/MX existence)`` names, and bare names such as ``example.gov``, say
  whether the name exists: a value becomes an MX record at the name, ``null`` or ``""``
  leaves the name out of the zone (NXDOMAIN), as authheaders treated a falsy answer.

DKIM results: where the case gives ``prior_dkim_results`` (authheaders read them from an
earlier A-R field), they are used as given; where it is null, authheaders verified the
signatures itself, so the harness does too, with dkimpy (a test-only oracle) over the
same DNS map. SPF is not evaluated in any case (authheaders ran with spf=False). The PSD
case runs with ``psd=True`` (RFC 9091), as the case's note asks.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest

from harness import shared_data
from tayori.auth.dmarc import DmarcResult, DmarcVerdict, evaluate, from_field_values
from tayori.testing.dnsstub import StaticResolver

EXISTENCE = " (A/AAAA/MX existence)"
PSD_CASES = {"dmarc_psd_sub"}


def _data() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        shared_data("dmarc", "authheaders", "cases.json").read_text())
    return data


def _zone(dns: dict[str, str | None]) -> dict[str, Any]:
    zone: dict[str, Any] = {}
    for key, value in dns.items():
        name = key.removesuffix(EXISTENCE).rstrip(".")
        if name.startswith("_dmarc.") or "._domainkey." in name:
            zone[name] = {"TXT": [value or ""]}
        elif value:
            zone[name] = {"MX": [(10, value)]}
    return zone


def _prior(text: str) -> list[tuple[str, str]]:
    """``dkim=fail d=example.com; dkim=pass d=example.org`` as (result, domain) pairs."""
    return [(m[1], m[2]) for m in re.finditer(r"dkim=(\w+) d=([\w.-]+)", text)]


def _verified(message: bytes, dns: dict[str, str | None]) -> list[tuple[str, str]]:
    """Each DKIM-Signature of ``message`` verified by dkimpy over the case's DNS map."""
    dkim = pytest.importorskip("dkim")

    def dnsfunc(name: bytes | str, timeout: int = 5) -> bytes | None:
        key = name.decode() if isinstance(name, bytes) else name
        value = dns.get(key) or dns.get(key.rstrip("."))
        return value.encode() if value else None

    verifier = dkim.DKIM(message)
    count = message.split(b"\n\n", 1)[0].lower().count(b"\ndkim-signature:")
    count += message.lower().startswith(b"dkim-signature:")
    results = []
    for index in range(count):
        ok = verifier.verify(idx=index, dnsfunc=dnsfunc)
        results.append(("pass" if ok else "fail", verifier.domain.decode()))
    return results


def _run(case: dict[str, Any], data: dict[str, Any], folder: Path) -> DmarcVerdict:
    message = (folder / case["message"]).read_bytes()
    prior = case["prior_dkim_results"]
    dkim = _prior(prior) if prior is not None else _verified(message, data["dns"])
    resolver = StaticResolver(_zone(data["dns"]))
    header = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    coroutine = evaluate(from_field_values(header), spf=None, dkim=dkim, resolver=resolver,
                         psd=case["id"] in PSD_CASES, sample=lambda: 0.0)
    return asyncio.run(asyncio.wait_for(coroutine, 10))


def _cases() -> list[dict[str, Any]]:
    try:
        return list(_data()["cases"])
    except BaseException:  # skipped: no test data here
        return []


CASES = _cases()


def test_all_cases_present() -> None:
    assert len(_data()["cases"]) == 11


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_case(case: dict[str, Any]) -> None:
    data = _data()
    folder = shared_data("dmarc", "authheaders")
    verdict = _run(case, data, folder)
    assert verdict.result is DmarcResult(case["expect_dmarc"]), verdict.reason
    expected = case["expect_policy"]
    assert (verdict.policy.value if verdict.policy else None) == expected, verdict


def test_psd_case_needs_the_flag() -> None:
    """Without RFC 9091 lookups, example.gov has no policy at all."""
    data = _data()
    case = next(c for c in data["cases"] if c["id"] == "dmarc_psd_sub")
    folder = shared_data("dmarc", "authheaders")
    message = (folder / case["message"]).read_bytes().replace(b"\n", b"\r\n")
    coroutine = evaluate(from_field_values(message), spf=None, dkim=[],
                         resolver=StaticResolver(_zone(data["dns"])))
    assert asyncio.run(coroutine).result is DmarcResult.NONE
