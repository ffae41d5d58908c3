"""DNS fakes for tests: a real DNS server on loopback, and an in-memory resolver.

Takes: a zone as a plain dict, the same for both fakes::

    {"example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")],
                      "TXT": ["v=spf1 -all"]},
     "mx1.example.test": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
     "2.0.0.127.in-addr.arpa": {"PTR": ["mx1.example.test"]},
     "servfail.test": "SERVFAIL",        # any RCODE name: SERVFAIL, REFUSED, ...
     "slow.test": "TIMEOUT"}             # never answered

Record types: ``A``, ``AAAA`` and ``PTR`` take text; ``MX`` takes ``(preference, host)``
(host ``"."`` is the null MX); ``TXT`` takes text or bytes, or a sequence of them for one
record of several character-strings. Names are matched case-insensitively, with or
without the trailing dot.
Promises: a name not in the zone is NXDOMAIN; a name present without the asked type is
NODATA. :class:`DnsStub` serves the zone over UDP and TCP on one loopback port, puts an
SOA (TTL and MINIMUM = ``negative_ttl``) in the authority section of every negative
answer so negative caching can be exercised, truncates UDP answers larger than the
client's EDNS payload (512 bytes without EDNS) so TCP retry can be exercised, and counts
the queries per (name, type). :class:`StaticResolver` answers the same zone in memory
as a :class:`tayori.dns.Resolver`, for unit tests that need no sockets.
Failure policy: a zone with an unknown record type or status raises ValueError at
construction. The server never prints; an unparsable query is dropped.
Config keys: none.
Standards: RFC 1035 (messages, TC bit), RFC 2308 (SOA in negative answers), RFC 6891
(EDNS0 payload size).
"""

from __future__ import annotations

import ipaddress
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import dns.rdatatype
from dnslib import (
    AAAA,
    MX,
    PTR,
    QTYPE,
    RCODE,
    RR,
    SOA,
    TXT,
    A,
    DNSError,
    DNSRecord,
)
from dnslib.server import DNSHandler, DNSLogger, DNSServer

from tayori.dns import DnsTemporaryError, MxRecord, NxDomain, address_rdtype

RecordSet = Mapping[str, Sequence[object]]
Zone = Mapping[str, RecordSet | str]

TIMEOUT = "TIMEOUT"
RECORD_TYPES = frozenset({"A", "AAAA", "MX", "TXT", "PTR"})
_TEMPORARY_STATUSES = frozenset({"SERVFAIL", "REFUSED", "NOTIMP", "FORMERR", TIMEOUT})
_CLASSIC_UDP_LIMIT = 512
_MAX_STRING = 255
_HOLD_LIMIT = 30.0  # seconds a TIMEOUT query is held at most, should stop() never come


def _key(name: str) -> str:
    return name.rstrip(".").lower()


class _ZoneData:
    """The zone, normalised and checked; ``find`` answers one question."""

    def __init__(self, zone: Zone) -> None:
        self._zone: dict[str, RecordSet | str] = {}
        for name, entry in zone.items():
            _check_entry(name, entry)
            self._zone[_key(name)] = entry

    def find(self, name: str, rtype: str) -> Sequence[object] | str | None:
        """Records (``[]`` = NODATA), a status such as ``"SERVFAIL"``, or None (NXDOMAIN)."""
        entry = self._zone.get(_key(name))
        if entry is None or isinstance(entry, str):
            return entry
        return entry.get(rtype, ())


def _check_entry(name: str, entry: RecordSet | str) -> None:
    if isinstance(entry, str):
        if entry not in _TEMPORARY_STATUSES:
            raise ValueError(f"{name}: unknown status {entry!r}")
        return
    unknown = set(entry) - RECORD_TYPES
    if unknown:
        raise ValueError(f"{name}: unsupported record types {sorted(unknown)}")


def _txt_strings(value: object) -> list[bytes]:
    """One TXT record's character-strings, as bytes."""
    if isinstance(value, str):
        return [value.encode("utf-8")]
    if isinstance(value, bytes):
        return [value]
    if isinstance(value, Sequence):
        return [part for item in value for part in _txt_strings(item)]
    raise ValueError(f"not a TXT value: {value!r}")


def _mx_value(value: object) -> tuple[int, str]:
    if (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
            and isinstance(value[0], int) and isinstance(value[1], str)):
        return value[0], value[1]
    raise ValueError(f"not an MX value (preference, host): {value!r}")


# --- the in-memory resolver -----------------------------------------------------------------


class StaticResolver:
    """A :class:`tayori.dns.Resolver` answering from a zone dict, counting the questions.

    A status (``"SERVFAIL"``, ``"TIMEOUT"``, ...) raises DnsTemporaryError at once.
    """

    def __init__(self, zone: Zone) -> None:
        self._zone = _ZoneData(zone)
        self.queries: Counter[tuple[str, str]] = Counter()

    async def mx(self, domain: str) -> list[MxRecord]:
        values = self._ask(domain, "MX")
        return [MxRecord(pref, _key(host)) for pref, host in map(_mx_value, values)]

    async def addresses(self, host: str, family: int) -> list[str]:
        rtype = dns.rdatatype.to_text(address_rdtype(family))
        return [str(value) for value in self._ask(host, rtype)]

    async def txt(self, name: str) -> list[bytes]:
        return [b"".join(_txt_strings(value)) for value in self._ask(name, "TXT")]

    async def ptr(self, address: str) -> list[str]:
        name = ipaddress.ip_address(address).reverse_pointer
        return [_key(str(value)) for value in self._ask(name, "PTR")]

    def _ask(self, name: str, rtype: str) -> Sequence[object]:
        self.queries[(_key(name), rtype)] += 1
        found = self._zone.find(name, rtype)
        if found is None:
            raise NxDomain(f"{_key(name)} does not exist")
        if isinstance(found, str):
            raise DnsTemporaryError(f"DNS lookup of {_key(name)} {rtype} failed: {found}")
        return found


# --- the DNS server ---------------------------------------------------------------------------

def _mx_rdata(value: object) -> Any:
    preference, host = _mx_value(value)
    return MX(host, preference)


def _txt_rdata(value: object) -> Any:
    return TXT([chunk for string in _txt_strings(value) for chunk in _chunks(string)])


_RDATA: dict[str, Callable[[object], Any]] = {
    "A": lambda value: A(str(value)),
    "AAAA": lambda value: AAAA(str(value)),
    "PTR": lambda value: PTR(str(value)),
    "MX": _mx_rdata,
    "TXT": _txt_rdata,
}


def _chunks(data: bytes) -> list[bytes]:
    """Split a string into the 255-byte character-strings TXT records are made of."""
    return [data[i : i + _MAX_STRING] for i in range(0, len(data), _MAX_STRING)] or [b""]


class _Handler(DNSHandler):  # type: ignore[misc]
    """dnslib's handler, plus: no answer at all when told so, and EDNS-aware truncation."""

    def get_reply(self, data: bytes) -> bytes:
        request = DNSRecord.parse(data)
        reply = self.server.resolver.resolve(request, self)
        if reply is None:
            raise DNSError("query deliberately left unanswered")  # dnslib drops it
        packed = bytes(reply.pack())
        if self.protocol == "udp" and len(packed) > _udp_limit(request):
            truncated = request.reply()
            truncated.header.tc = 1
            packed = bytes(truncated.pack())
        return packed


def _udp_limit(request: Any) -> int:
    for rr in request.ar:
        if rr.rtype == QTYPE.OPT:
            return max(int(rr.rclass), _CLASSIC_UDP_LIMIT)
    return _CLASSIC_UDP_LIMIT


class DnsStub:
    """A DNS server for tests on ``host`` (loopback), UDP and TCP on one port.

    It is also the resolver object dnslib's server calls (:meth:`resolve`).

    ``port=0`` picks a free port. ``ttl`` is every record's TTL; ``negative_ttl`` the
    SOA's TTL and MINIMUM in negative answers. Use as a context manager, or start()/stop().
    """

    def __init__(self, zone: Zone, *, ttl: int = 300, negative_ttl: int = 60,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self._zone = _ZoneData(zone)
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self._host = host
        self._port = port
        self._servers: list[Any] = []
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._queries: Counter[tuple[str, str]] = Counter()

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` the stub listens on; only once started."""
        if not self._servers:
            raise RuntimeError("the DNS stub is not running")
        return self._host, self._port

    def count(self, name: str, rtype: str) -> int:
        """How many queries for (name, type) arrived, over UDP and TCP together."""
        with self._lock:
            return self._queries[(_key(name), rtype.upper())]

    def start(self) -> DnsStub:
        if self._servers:
            raise RuntimeError("the DNS stub is already running")
        self._stopping.clear()
        self._servers = self._bind()
        for server in self._servers:
            thread = threading.Thread(target=server.server.serve_forever,
                                      kwargs={"poll_interval": 0.02},
                                      name=f"dnsstub-{self._port}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop serving, release held queries, close the sockets, join the threads."""
        self._stopping.set()
        for server in self._servers:
            server.server.shutdown()
            server.server.server_close()  # joins the handler threads
        for thread in self._threads:
            thread.join()
        self._servers, self._threads = [], []

    def __enter__(self) -> DnsStub:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    def _bind(self) -> list[Any]:
        """A UDP server, then a TCP server on the same port; a fresh port if that is taken."""
        attempts = 1 if self._port else 20
        for attempt in range(attempts):
            udp = self._server(self._port, tcp=False)
            port = udp.server.server_address[1]
            try:
                tcp = self._server(port, tcp=True)
            except OSError:
                udp.server.server_close()
                if attempt == attempts - 1:
                    raise
                continue
            self._port = port
            return [udp, tcp]
        raise AssertionError("unreachable")

    def resolve(self, request: Any, handler: Any) -> Any:
        """dnslib's resolver interface: the reply to ``request``, or None for no reply."""
        name, rtype = str(request.q.qname), QTYPE[request.q.qtype]
        with self._lock:
            self._queries[(_key(name), rtype)] += 1
        found = self._zone.find(name, rtype)
        if found == TIMEOUT:
            self._stopping.wait(_HOLD_LIMIT)
            return None
        reply = request.reply()
        if isinstance(found, str):
            reply.header.rcode = getattr(RCODE, found)
        elif not found:
            if found is None:
                reply.header.rcode = RCODE.NXDOMAIN
            reply.add_auth(self._soa())
        else:
            for value in found:
                reply.add_answer(RR(request.q.qname, request.q.qtype, ttl=self.ttl,
                                    rdata=_RDATA[rtype](value)))
        return reply

    def _server(self, port: int, *, tcp: bool) -> Any:
        logger = DNSLogger(log="-request,-reply,-truncated,-error", logf=lambda _: None)
        server = DNSServer(self, address=self._host, port=port, tcp=tcp,
                           logger=logger, handler=_Handler)
        server.server.daemon_threads = False  # so server_close() waits for the handlers
        return server

    def _soa(self) -> Any:
        times = (1, 3600, 600, 86400, self.negative_ttl)
        return RR(".", QTYPE.SOA, ttl=self.negative_ttl,
                  rdata=SOA("ns.stub.test.", "hostmaster.stub.test.", times))


__all__ = ["TIMEOUT", "DnsStub", "RecordSet", "StaticResolver", "Zone"]
