"""Screening of clients: DNS blocklists at connect, HELO and reverse-DNS checks, rate
limits per sender and per client, greylisting.

Takes: the config (``dnsbl``, ``greylist``, ``limits.*_per_*``, ``smtp.helo_syntax``,
``smtp.fcrdns``) and, per session, a :class:`Client`: its address, and whether it is
*screened*: an untrusted (no match rule's network table lists it), not logged-in client
of an ``smtp`` listener. Mail programs on the submission ports and trusted networks are
not screened; the rate limits apply to every client.
Promises:
- :meth:`Screening.connect`: a screened client listed in the blocklists (their weights
  summed up to ``dnsbl.threshold``) gets ``554 5.7.1`` naming the lists as its greeting;
  one listed in an allowlist is exempt from the blocklists and from greylisting.
- :meth:`Screening.helo`: with ``smtp.helo_syntax``, a screened client's EHLO/HELO name
  must be a fully qualified domain or an address literal (``501 5.5.2``).
- :meth:`Screening.mail`: the per-sender and per-client message buckets (``450 4.7.1``
  with the wait); with ``smtp.fcrdns = "reject"`` a screened client without
  forward-confirmed reverse DNS gets ``550 5.7.25`` (``450 4.7.25`` when DNS fails).
- :meth:`Screening.rcpt`: the recipient buckets, then greylisting of screened,
  non-exempt clients (``451 4.7.1 Greylisted``). The null sender has no sender bucket
  (every DSN would share it).
The greylist store is opened (on first use, in the worker) and used on threads, never
on the event loop: opening it may wait for another worker's lock on the file.
Failure policy: the lists fail open per zone (:mod:`tayori.policy.dnsbl`); a greylist
store that fails, or cannot be opened, answers ``451 4.3.0`` (fail closed); the rate
limits and the ban are kept per worker process.
Config keys: ``dnsbl.*``, ``greylist.*``, ``limits.messages_per_*``,
``limits.recipients_per_*``, ``smtp.helo_syntax``, ``smtp.fcrdns``, ``dns.*``.
Standards: RFC 5782 (DNSBL), RFC 7372 (X.7.25), RFC 6647 (greylisting).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from tayori import maillog
from tayori.config import Config
from tayori.dns import DnsPythonResolver, Resolver
from tayori.errors import Reply
from tayori.policy import dnsbl, helo
from tayori.policy.greylist import Greylist, GreylistError
from tayori.policy.ratelimit import Allowed, TokenBuckets, client_network, rate_limited

GREYLIST_TROUBLE = Reply(451, "4.3.0", "Temporary local problem, try again later")


@dataclass
class Client:
    """What screening knows of one session's client."""

    session: str
    ip: str
    screened: bool
    exempt: bool = False          # an allowlist names it: no blocklists, no greylisting
    fcrdns: helo.FcrdnsResult | None = None


class Screening:
    """One per worker process (its buckets and its greylist connection)."""

    def __init__(self, config: Config, resolver: Resolver | None = None) -> None:
        self._resolver = resolver
        self._greylist: Greylist | None = None
        self._greylist_opening = asyncio.Lock()
        self.update(config)

    def update(self, config: Config) -> None:
        self.config = config
        self.zones = [dnsbl.zone_from_text(z) for z in config.dnsbl.zones] + \
            [dnsbl.zone_from_text(z, "allow") for z in config.dnsbl.allow]
        limits = config.limits
        self.buckets = {name: TokenBuckets(*rate) for name, rate in (
            ("messages from the sender", limits.messages_per_sender),
            ("recipients from the sender", limits.recipients_per_sender),
            ("messages from your address", limits.messages_per_client),
            ("recipients from your address", limits.recipients_per_client)) if rate}
        if self._greylist is not None:
            self._greylist.close()
            self._greylist = None

    @property
    def resolver(self) -> Resolver:
        if self._resolver is None:   # made in the worker that uses it, never before fork
            self._resolver = DnsPythonResolver(self.config.dns.nameservers,
                                               timeout=self.config.dns.timeout)
        return self._resolver

    # --- the phases ---------------------------------------------------------------------

    async def connect(self, client: Client) -> Reply | None:
        if not (client.screened and self.zones):
            return None
        verdict = await dnsbl.check(self.resolver, client.ip, self.zones,
                                    self.config.dnsbl.threshold,
                                    time_limit=self.config.dnsbl.time_limit)
        for problem in verdict.problems:
            maillog.warning("dnsbl-problem", session=client.session, reason=problem)
        client.exempt = verdict.exempt
        if verdict.hits or verdict.exempt:
            maillog.event("dnsbl", session=client.session, client=client.ip,
                          listed=",".join(verdict.listed_in) or None, score=verdict.score,
                          allowed=",".join(h.zone for h in verdict.allowed_by) or None)
        return verdict.reply()

    def helo(self, client: Client, name: str) -> Reply | None:
        if not (client.screened and self.config.smtp.helo_syntax):
            return None
        reason = helo.check_helo(name, forbidden=(self.config.hostname,))
        return None if reason is None else helo.helo_reply(reason)

    async def mail(self, client: Client, sender_key: str) -> Reply | None:
        refusal = self._take(client, sender_key, "messages")
        if refusal is not None or not client.screened or self.config.smtp.fcrdns == "off":
            return refusal
        if client.fcrdns is None:
            client.fcrdns = await helo.fcrdns(self.resolver, client.ip)
            maillog.event("fcrdns", session=client.session, client=client.ip,
                          result=client.fcrdns.status, names=",".join(client.fcrdns.names),
                          note=client.fcrdns.note or None)
        return helo.fcrdns_reply(client.fcrdns) if self.config.smtp.fcrdns == "reject" \
            else None

    async def rcpt(self, client: Client, sender_key: str, sender: str,
                   recipient: str) -> Reply | None:
        refusal = self._take(client, sender_key, "recipients")
        if refusal is not None or not (client.screened and self.config.greylist.enabled) \
                or client.exempt:
            return refusal
        try:
            store = await self._greylist_store()
            verdict = await store.check_async(client.ip, sender, recipient, time.time())
        except (GreylistError, OSError) as exc:
            maillog.error("greylist-failed", session=client.session, reason=str(exc))
            return GREYLIST_TROUBLE
        return verdict.reply()

    # --- helpers ------------------------------------------------------------------------

    def _take(self, client: Client, sender_key: str, what: str) -> Reply | None:
        """One message or recipient out of the sender's and the client's buckets."""
        now = time.time()
        for name, key in ((f"{what} from the sender", sender_key),
                          (f"{what} from your address", client_network(client.ip))):
            buckets = self.buckets.get(name)
            if buckets is None or not key:
                continue
            taken = buckets.take(key, 1, now)
            if not isinstance(taken, Allowed):
                return rate_limited(name.replace("the sender", f"<{key}>"), taken)
        return None

    async def _greylist_store(self) -> Greylist:
        """The store, opened on a thread the first time (one session opens it, the
        others wait for it). Raises GreylistError or OSError."""
        async with self._greylist_opening:
            if self._greylist is None:
                settings = self.config.greylist
                self._greylist = await asyncio.to_thread(
                    Greylist, settings.path, delay=settings.delay,
                    retry_window=settings.retry_window, allow_time=settings.allow_time)
            return self._greylist
