"""DNS lookups: the resolver interface every stage uses, and its dnspython implementation.

Takes: names already in lower-case A-label form (callers convert with
:func:`tayori.address.to_ascii_domain`; a trailing dot is optional), IP addresses for PTR.
Promises: :class:`Resolver` answers MX, A/AAAA, TXT and PTR questions with plain values:
``[]`` when the name exists without records of that type (NODATA), :class:`NxDomain`
when the name does not exist, :class:`DnsTemporaryError` for everything that may heal
(SERVFAIL, REFUSED, timeout, network error), so a caller defers on it and never bounces.
Host names come back lower-case, without the trailing dot; the root (a null MX's
exchange) comes back as ``""``.
:class:`DnsPythonResolver` sends the queries with dnspython (EDNS0, 1232-byte UDP
payload, retried over TCP on truncation), and keeps a bounded LRU cache: positive answers
for their TTL (at most :data:`MAX_POSITIVE_TTL`), NXDOMAIN and NODATA for the RFC 2308
negative TTL (the smaller of the SOA record's TTL and its MINIMUM field, at most
:data:`MAX_NEGATIVE_TTL`; a negative answer without an SOA is not cached). Temporary
errors are never cached: the next caller asks again. Concurrent identical questions
share one lookup in flight.
Failure policy: a malformed name (empty, non-ASCII, a label too long) is a caller's bug
and raises ValueError; no other exception type leaves the resolver for DNS trouble.
Config keys: ``dns.nameservers`` (handed in by the caller as ``(host, port)`` pairs;
empty means the system resolver from /etc/resolv.conf, or 127.0.0.1:53 when that file
names none, as resolv.conf(5) prescribes).
Standards: RFC 1035 (messages, TCP retry on TC), RFC 2308 (negative caching),
RFC 6891 (EDNS0), RFC 3596 (AAAA), RFC 7505 (null MX: reported, not judged, here).
"""

from __future__ import annotations

import asyncio
import functools
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdata
import dns.rdatatype
import dns.resolver
import dns.reversename
from dns.rdtypes.ANY.MX import MX
from dns.rdtypes.ANY.PTR import PTR
from dns.rdtypes.ANY.TXT import TXT
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.AAAA import AAAA

MAX_POSITIVE_TTL = 86400
"""Cap on how long a positive answer is cached, whatever its TTL says (1 day)."""
MAX_NEGATIVE_TTL = 3600
"""Cap on how long NXDOMAIN or NODATA is cached (1 hour; RFC 2308 §5 suggests 1-3 hours)."""
EDNS_PAYLOAD = 1232
"""Advertised UDP payload size: fits an IPv6 packet without fragmentation."""
_LOCAL_NAMESERVER = "127.0.0.1"  # resolv.conf(5): no nameserver lines means the local host


class DnsTemporaryError(Exception):
    """The question could not be answered now (SERVFAIL, REFUSED, timeout, network).

    The message is for logs only, never for the SMTP wire.
    """


class NxDomain(Exception):
    """The name does not exist (an authoritative NXDOMAIN answer)."""


@dataclass(frozen=True, slots=True)
class MxRecord:
    """One MX record; ``host`` is a lower-case A-label without the trailing dot.

    ``host`` is ``""`` for the null MX ``.`` (RFC 7505).
    """

    preference: int
    host: str


class Resolver(Protocol):
    """The questions tayori asks of DNS. Implementations: DnsPythonResolver, StaticResolver."""

    async def mx(self, domain: str) -> list[MxRecord]:
        """The MX records of ``domain``, in answer order; ``[]`` on NODATA."""
        ...

    async def addresses(self, host: str, family: int) -> list[str]:
        """A (``socket.AF_INET``) or AAAA (``socket.AF_INET6``) addresses as text."""
        ...

    async def txt(self, name: str) -> list[bytes]:
        """Each TXT record with its character-strings joined (RFC 7208 §3.3)."""
        ...

    async def ptr(self, address: str) -> list[str]:
        """The PTR names of an IPv4 or IPv6 address."""
        ...


def address_rdtype(family: int) -> dns.rdatatype.RdataType:
    """The record type holding addresses of ``family`` (AF_INET or AF_INET6)."""
    if family == socket.AF_INET:
        return dns.rdatatype.A
    if family == socket.AF_INET6:
        return dns.rdatatype.AAAA
    raise ValueError(f"not an IP address family: {family}")


def host_text(name: dns.name.Name) -> str:
    """A host name as tayori writes it: lower case, no trailing dot, ``""`` for the root."""
    if name == dns.name.root:
        return ""
    return name.to_text(omit_final_dot=True).lower()


def _to_name(text: str) -> dns.name.Name:
    if not text or text == "." or not text.isascii():
        raise ValueError(f"not a DNS name in A-label form: {text!r}")
    try:
        return dns.name.from_text(text)
    except dns.exception.DNSException as exc:
        raise ValueError(f"malformed DNS name: {text!r}") from exc


# --- the cache ---------------------------------------------------------------------------

_Key = tuple[dns.name.Name, dns.rdatatype.RdataType]


@dataclass(frozen=True, slots=True)
class _Entry:
    """One answer: its records (``None`` for NXDOMAIN) and when it stops being fresh."""

    records: tuple[dns.rdata.Rdata, ...] | None
    expires: float


class _TtlCache:
    """A bounded LRU map of answers that forgets entries past their expiry."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[_Key, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: _Key, now: float) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= now:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: _Key, entry: _Entry, now: float) -> None:
        if self._size <= 0 or entry.expires <= now:
            return
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


def _negative_ttl(response: dns.message.Message) -> int:
    """RFC 2308 §5: min(SOA TTL, SOA MINIMUM) and any CNAME TTL; 0 without an SOA."""
    if not any(rrset.rdtype == dns.rdatatype.SOA for rrset in response.authority):
        return 0
    if not isinstance(response, dns.message.QueryMessage):
        return 0
    return min(response.resolve_chaining().minimum_ttl, MAX_NEGATIVE_TTL)


# --- the dnspython resolver ----------------------------------------------------------------


class DnsPythonResolver:
    """:class:`Resolver` over dnspython, with a TTL cache and shared in-flight lookups.

    ``nameservers`` are ``(address, port)`` pairs; empty means the system's. ``timeout``
    bounds one whole question, retries included. ``cache_size`` counts (name, type)
    answers; 0 turns caching off. ``clock`` (monotonic seconds) is injectable for tests.
    """

    def __init__(
        self,
        nameservers: Sequence[tuple[str, int]] = (),
        *,
        timeout: float = 5.0,
        cache_size: int = 10000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout <= 0:
            raise ValueError("the DNS timeout must be positive")
        self._resolver = _make_resolver(nameservers, timeout)
        self._timeout = timeout
        self._cache = _TtlCache(cache_size)
        self._clock = clock
        self._inflight: dict[_Key, asyncio.Task[_Entry]] = {}

    @property
    def cached(self) -> int:
        """How many answers the cache holds (expired ones until they are next asked for)."""
        return len(self._cache)

    async def mx(self, domain: str) -> list[MxRecord]:
        records = await self._records(_to_name(domain), dns.rdatatype.MX)
        return [MxRecord(rd.preference, host_text(rd.exchange))
                for rd in records if isinstance(rd, MX)]

    async def addresses(self, host: str, family: int) -> list[str]:
        records = await self._records(_to_name(host), address_rdtype(family))
        return [rd.address for rd in records if isinstance(rd, (A, AAAA))]

    async def txt(self, name: str) -> list[bytes]:
        records = await self._records(_to_name(name), dns.rdatatype.TXT)
        return [b"".join(rd.strings) for rd in records if isinstance(rd, TXT)]

    async def ptr(self, address: str) -> list[str]:
        try:
            name = dns.reversename.from_address(address)
        except (dns.exception.DNSException, ValueError) as exc:
            raise ValueError(f"not an IP address: {address!r}") from exc
        records = await self._records(name, dns.rdatatype.PTR)
        return [host_text(rd.target) for rd in records if isinstance(rd, PTR)]

    async def _records(
        self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> tuple[dns.rdata.Rdata, ...]:
        key = (name, rdtype)
        entry = self._cache.get(key, self._clock()) or await self._shared(key)
        if entry.records is None:
            raise NxDomain(f"{host_text(name)} does not exist")
        return entry.records

    async def _shared(self, key: _Key) -> _Entry:
        """Join the lookup of ``key`` in flight, or start it.

        The lookup runs as its own task, shielded, so one caller giving up (cancelled)
        does not cancel it for the others.
        """
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._lookup(key))
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._landed, key))
        return await asyncio.shield(task)

    def _landed(self, key: _Key, task: asyncio.Task[_Entry]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved, so an unawaited failure is not reported as lost

    async def _lookup(self, key: _Key) -> _Entry:
        name, rdtype = key
        what = f"DNS lookup of {host_text(name)} {dns.rdatatype.to_text(rdtype)}"
        try:
            async with asyncio.timeout(self._timeout):  # dnspython's backoff may overrun
                answer = await self._resolver.resolve(
                    name, rdtype, raise_on_no_answer=False, search=False
                )
        except dns.resolver.NXDOMAIN as exc:
            entry = _Entry(None, self._clock() + _nxdomain_ttl(exc, name))
        except TimeoutError as exc:
            raise DnsTemporaryError(f"{what} timed out after {self._timeout:g}s") from exc
        except (dns.exception.DNSException, OSError) as exc:
            raise DnsTemporaryError(f"{what} failed: {exc}") from exc
        else:
            entry = _answer_entry(answer, self._clock())
        self._cache.put(key, entry, self._clock())
        return entry


def _nxdomain_ttl(exc: dns.resolver.NXDOMAIN, name: dns.name.Name) -> int:
    response = exc.kwargs.get("responses", {}).get(name)
    return _negative_ttl(response) if isinstance(response, dns.message.Message) else 0


def _answer_entry(answer: dns.resolver.Answer, now: float) -> _Entry:
    if answer.rrset is None:  # NODATA
        return _Entry((), now + _negative_ttl(answer.response))
    ttl = min(answer.chaining_result.minimum_ttl, MAX_POSITIVE_TTL)
    return _Entry(tuple(answer.rrset), now + max(ttl, 0))


def _make_resolver(
    nameservers: Sequence[tuple[str, int]], timeout: float
) -> dns.asyncresolver.Resolver:
    if nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port)
                                for host, port in nameservers]
    else:
        try:
            resolver = dns.asyncresolver.Resolver(configure=True)
        except dns.resolver.NoResolverConfiguration:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [_LOCAL_NAMESERVER]
    resolver.timeout = timeout
    resolver.lifetime = timeout
    resolver.cache = None  # ours, with the injectable clock and negative caching
    resolver.use_edns(0, 0, EDNS_PAYLOAD)
    return resolver
