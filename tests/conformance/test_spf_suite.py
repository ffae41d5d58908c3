"""tayori.auth.spf against the openspf RFC 7208 suite and Stalwart's SPF scenarios.

The openspf suite (``../shared/testdata/spf/rfc7208-tests.yml``, 203 tests) runs in
process, each scenario's ``zonedata`` served by :class:`spf_suite.SuiteResolver`, which
follows the suite's own conventions (see :mod:`spf_suite`; the same cases run through a
running tayori in test_spf_e2e.py).

Each test checks the MAIL FROM identity alone (``check_helo=False``, as the suite's
driver does) with the default explanation ``DEFAULT``; where the suite lists several
results any of them passes, and where it gives an explanation it must match exactly.

The Stalwart scenarios (``../shared/testdata/spf/stalwart/*.yml``) are read line by line
as ../shared/testdata/README.md says: records accumulate per file, ``domain:`` is the HELO
name, and each ``expect:`` runs :func:`check` with the HELO check on, which is what
Stalwart's own harness does (HELO first, MAIL FROM when HELO passes; ours also moves on
after a HELO result other than fail, which none of these cases tells apart).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Coroutine, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from spf_suite import (
    FIXED_TIME,
    RECEIVER,
    SUITE_SIZE,
    TESTDATA,
    Entry,
    SuiteCase,
    SuiteResolver,
    dns_name,
    suite_cases,
)
from tayori.auth.spf import SpfOptions, SpfResult, SpfVerdict, check
from tayori.dns import DnsTemporaryError

T = TypeVar("T")
STALWART = TESTDATA / "stalwart"
TEST_TIMEOUT = 10.0


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, TEST_TIMEOUT))


# --- the openspf suite -------------------------------------------------------------------------

SUITE_CASES = list(suite_cases())


def test_the_suite_has_all_its_tests() -> None:
    assert len(SUITE_CASES) == SUITE_SIZE
    assert len({case.name for case in SUITE_CASES}) == SUITE_SIZE


@pytest.mark.parametrize("case", SUITE_CASES, ids=lambda case: case.name)
def test_rfc7208_suite(case: SuiteCase) -> None:
    options = SpfOptions(default_explanation="DEFAULT", clock=lambda: FIXED_TIME)
    verdict = run(check(SuiteResolver(case.zone), case.host, case.mailfrom, case.helo,
                        RECEIVER, check_helo=False, options=options))
    assert verdict.result.value in case.results, (case.scenario, verdict)
    if case.explanation is not None:
        assert verdict.explanation == case.explanation, verdict


# --- Stalwart's scenarios ------------------------------------------------------------------------

STALWART_RECEIVER = "localdomain.org"
LIVE_DNS_STANDINS = {f"t{n}.org": ["192.0.2.1"] for n in range(1, 12)}
"""basic.yml's "DNS Lookup Limits" names t1.org...t11.org, which Stalwart's harness
resolves over live DNS, where they exist. Offline they would be NXDOMAIN, so the void
lookup limit (2) would end the evaluation before the 10-term limit the case is about;
they get a documentation address here instead (matching no client of the case)."""
STALWART_SKIPS = {
    "all.yml/All test/1": "'ip:10.0.0.1' after -all is an unknown mechanism, a syntax error: "
                          "permerror by RFC 7208 §4.6 (the suite's detect-errors-anywhere)",
    "exists.yml/Exists/2": "exists looks up A records only, even for IPv6 (RFC 7208 §5.7; "
                           "the suite's exists-ip6only); the name has only AAAA",
    "ip.yml/IPv6 match/4": "an IPv4 client never matches ip6, not even an IPv4-mapped network "
                           "(RFC 7208 §5, §5.6; the suite's cidr6-0-ip4)",
    "macro.yml/Macro expansion 2/2": "exists looks up A records only (RFC 7208 §5.7); the "
                                     "name for the IPv6 client has only an AAAA record",
}


@dataclass(frozen=True)
class StalwartCase:
    ident: str
    helo: str
    sender: str
    ip: str
    result: str
    explanation: str
    zone: Mapping[str, list[Entry]]


def stalwart_cases() -> Iterator[StalwartCase]:
    for path in sorted(STALWART.glob("*.yml")):
        yield from _stalwart_file(path)


def _stalwart_file(path: Path) -> Iterator[StalwartCase]:
    zone: dict[str, dict[str, list[object]]] = {
        name: {"A": list(addresses)} for name, addresses in LIVE_DNS_STANDINS.items()}
    for block in path.read_text(encoding="utf-8").split("---\n"):
        name, helo, sender, ip, number = "", "", "", "127.0.0.1", 0
        for raw in block.splitlines():
            line = raw.strip().removeprefix("-").strip()
            key, _, value = line.partition(":")
            value = value.strip()
            if key == "name":
                name = value
            elif key in _RECORD_LINES:
                _RECORD_LINES[key](zone, *value.split(" ", 1))
            elif key in ("domain", "sender", "ip"):
                helo, sender, ip = (value if key == "domain" else helo,
                                    value if key == "sender" else sender,
                                    value if key == "ip" else ip)
            elif key == "expect":
                number += 1
                result, _, explanation = value.partition(" ")
                yield StalwartCase(f"{path.name}/{name}/{number}", helo, sender, ip, result,
                                   explanation, _entries(zone))


def _set(zone: dict[str, dict[str, list[object]]], name: str, rtype: str,
         values: list[object]) -> None:
    zone.setdefault(dns_name(name), {})[rtype] = values


def _split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _mx_line(zone: dict[str, dict[str, list[object]]], name: str, addresses: str) -> None:
    """``mx: name ip, ip``: one MX host per address, as Stalwart's harness makes them."""
    hosts: list[object] = []
    for position, address in enumerate(_split_list(addresses)):
        host = f"mx.{address}.{position}"
        rtype = "A" if ipaddress.ip_address(address).version == 4 else "AAAA"
        _set(zone, host, rtype, [address])
        hosts.append([position + 1, host])
    _set(zone, name, "MX", hosts)


_RECORD_LINES = {
    "spf": lambda zone, name, text="": _set(zone, name, "TXT", [text]),
    "exp": lambda zone, name, text="": _set(zone, name, "TXT", [text]),
    "a": lambda zone, name, text: _set(zone, name, "A", list(_split_list(text))),
    "aaaa": lambda zone, name, text: _set(zone, name, "AAAA", list(_split_list(text))),
    "ptr": lambda zone, address, text: _set(
        zone, ipaddress.ip_address(address).reverse_pointer, "PTR",
        [dns_name(host) for host in _split_list(text)]),
    "mx": _mx_line,
}


def _entries(zone: Mapping[str, Mapping[str, list[object]]]) -> dict[str, list[Entry]]:
    """A snapshot of the zone, in SuiteResolver's form."""
    out: dict[str, list[Entry]] = {}
    for name, records in zone.items():
        out[name] = [(rtype, value) for rtype, values in records.items() for value in values]
    return out


class StalwartResolver(SuiteResolver):
    """Stalwart's convention: names starting ``_dns_error.`` fail temporarily."""

    def _ask(self, name: str, rtype: str, hops: int = 0) -> list[object]:
        if dns_name(name).startswith("_dns_error."):
            raise DnsTemporaryError(f"DNS lookup of {name} {rtype} failed")
        return super()._ask(name, rtype, hops)


STALWART_CASES = list(stalwart_cases())


def _stalwart_param(case: StalwartCase) -> Any:
    reason = STALWART_SKIPS.get(case.ident)
    marks = [pytest.mark.skip(reason=f"contradicts RFC 7208: {reason}")] if reason else []
    return pytest.param(case, id=case.ident, marks=marks)


def test_every_stalwart_skip_names_a_case() -> None:
    assert set(STALWART_SKIPS) <= {case.ident for case in STALWART_CASES}


@pytest.mark.parametrize("case", [_stalwart_param(case) for case in STALWART_CASES])
def test_stalwart_scenarios(case: StalwartCase) -> None:
    verdict: SpfVerdict = run(check(StalwartResolver(case.zone), case.ip, case.sender,
                                    case.helo, STALWART_RECEIVER,
                                    options=SpfOptions(clock=lambda: FIXED_TIME)))
    assert verdict.result is SpfResult(case.result), verdict
    if case.explanation:
        assert verdict.explanation == case.explanation, verdict
