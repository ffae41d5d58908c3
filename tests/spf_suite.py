"""The openspf RFC 7208 test suite (``../shared/testdata/spf/rfc7208-tests.yml``, 203
tests) as data: its scenarios' cases, and their ``zonedata`` served in memory
(:class:`SuiteResolver`, for the in-process suite) or by a DNS server on loopback
(:class:`SuiteDnsStub`, for the suite run through a running tayori).

The zonedata follows the suite's own conventions (those of pyspf's driver, learnt from,
not copied):

* type SPF records are never asked for (RFC 7208 dropped them), but a name with no TXT
  entry at all gets its SPF entries as TXT records, after its other entries; any TXT
  entry, even ``TXT: NONE``, turns that off, and ``NONE`` itself is no record;
* ``TIMEOUT`` in a name's entries answers a question with a timeout
  (DnsTemporaryError) unless a record of the asked type came before it, in which case
  the records before it are the answer;
* a name absent from the zone is NXDOMAIN, a name without the asked type NODATA;
  CNAME entries are followed (a loop is a temporary error, as a resolver's SERVFAIL).

Over DNS the same answers go on the wire: a temporary error is SERVFAIL, a CNAME is
answered with its target's records under the name asked, and no answer is cached (TTL
0), so the zone can change from one scenario to the next.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tayori.dns import DnsTemporaryError, MxRecord, NxDomain
from tayori.testing.dnsstub import DnsStub

TESTDATA = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "spf"
SUITE = TESTDATA / "rfc7208-tests.yml"
SUITE_SIZE = 203
FIXED_TIME = 1_700_000_000.0
RECEIVER = "mx.receiver.test"


TIMEOUT = "TIMEOUT"
Entry = tuple[str, object] | str  # (type, value) or "TIMEOUT"


def dns_name(text: str) -> str:
    return text.lower().removesuffix(".")


def _txt_bytes(value: object) -> bytes:
    """One TXT record: a string, or a list of character-strings joined (RFC 7208 §3.3)."""
    if isinstance(value, list):
        return b"".join(_txt_bytes(part) for part in value)
    return str(value).encode("utf-8")


def suite_entries(records: list[Any]) -> list[Entry]:
    """A name's entries in order, SPF entries copied as TXT when it has no TXT entry."""
    entries: list[Entry] = []
    generated: list[Entry] = []
    has_txt = any(isinstance(item, dict) and "TXT" in item for item in records)
    for item in records:
        if item == TIMEOUT:
            entries.append(TIMEOUT)
            continue
        for rtype, value in item.items():
            if rtype == "SPF" and not has_txt and value != "NONE":
                generated.append(("TXT", value))
            if value != "NONE":
                entries.append((rtype, value))
    return entries + generated


@dataclass
class SuiteResolver:
    """A :class:`tayori.dns.Resolver` answering from one scenario's entries."""

    zone: Mapping[str, list[Entry]]
    queries: list[tuple[str, str]] = field(default_factory=list)

    async def mx(self, domain: str) -> list[MxRecord]:
        return [MxRecord(int(pref), dns_name(str(host)))
                for pref, host in (_pair(value) for value in self._ask(domain, "MX"))]

    async def addresses(self, host: str, family: int) -> list[str]:
        rtype = "A" if family == socket.AF_INET else "AAAA"
        return [str(value) for value in self._ask(host, rtype)]

    async def txt(self, name: str) -> list[bytes]:
        return [_txt_bytes(value) for value in self._ask(name, "TXT")]

    async def ptr(self, address: str) -> list[str]:
        reverse = ipaddress.ip_address(address).reverse_pointer
        return [dns_name(str(value)) for value in self._ask(reverse, "PTR")]

    def _ask(self, name: str, rtype: str, hops: int = 0) -> list[object]:
        self.queries.append((dns_name(name), rtype))
        entries = self.zone.get(dns_name(name))
        if entries is None:
            raise NxDomain(f"{name} does not exist")
        found: list[object] = []
        for entry in entries:
            if entry == TIMEOUT:
                if not found:
                    raise DnsTemporaryError(f"DNS lookup of {name} {rtype} timed out")
                break
            kind, value = entry
            if kind == "CNAME" and rtype != "CNAME":
                if hops >= 8:
                    raise DnsTemporaryError(f"CNAME chain too long at {name}")
                return self._ask(str(value), rtype, hops + 1)
            if kind == rtype:
                found.append(value)
        return found


def _pair(value: object) -> tuple[int, str]:
    assert isinstance(value, list) and len(value) == 2, value
    return int(value[0]), str(value[1])



@dataclass(frozen=True)
class SuiteCase:
    scenario: str
    name: str
    helo: str
    host: str
    mailfrom: str
    results: tuple[str, ...]
    explanation: str | None
    zone: Mapping[str, list[Entry]]


def suite_cases() -> Iterator[SuiteCase]:
    with SUITE.open("rb") as stream:
        for scenario in yaml.safe_load_all(stream):
            zone = {dns_name(name): suite_entries(records)
                    for name, records in scenario["zonedata"].items()}
            for name, test in scenario["tests"].items():
                result = test["result"]
                yield SuiteCase(scenario["description"], name, str(test["helo"]),
                                str(test["host"]), str(test["mailfrom"]),
                                tuple(result) if isinstance(result, list) else (result,),
                                test.get("explanation"), zone)


# --- the same zone on a DNS server ---------------------------------------------------------


class SuiteZone:
    """One scenario's zone in the form :class:`DnsStub` serves: records, a status, or
    None for NXDOMAIN (the stub's zone interface, ``find``)."""

    def __init__(self, zone: Mapping[str, list[Entry]]) -> None:
        self._resolver = SuiteResolver(zone)

    def find(self, name: str, rtype: str) -> Sequence[object] | str | None:
        try:
            values = self._resolver._ask(_unescaped(name), rtype)
        except NxDomain:
            return None
        except DnsTemporaryError:
            return "SERVFAIL"
        if rtype == "MX":
            return [_pair(value) for value in values]
        if rtype == "TXT":
            return [value or "" for value in values]  # no strings at all: one empty string
        return [str(value) for value in values]


def _unescaped(name: str) -> str:
    """A name as dnslib prints it (``\\032`` for a space, ``\\.`` ...) in plain text."""
    return re.sub(r"\\(\d{3}|.)", lambda m: chr(int(m[1])) if m[1].isdigit() else m[1], name)


class SuiteDnsStub(DnsStub):
    """A DNS server on loopback answering one scenario at a time (:meth:`use`)."""

    def __init__(self) -> None:
        super().__init__({}, ttl=0, negative_ttl=0)

    def use(self, zone: Mapping[str, list[Entry]]) -> None:
        self._zone = SuiteZone(zone)  # type: ignore[assignment]  # the same interface
