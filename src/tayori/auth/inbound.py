"""Sender authentication of received mail: SPF at MAIL, DKIM, ARC and DMARC at the end of
the data, and the Authentication-Results tayori writes.

Takes: per worker, the config; per transaction, the session's
:class:`~tayori.policy.screening.Client` (its address, and whether it is *screened*: an
untrusted, not logged-in client of an ``smtp`` listener; only their mail is checked),
the HELO name and the MAIL FROM address (:meth:`Inbound.at_mail`), then the client's
message as the spool holds it, CRLF line ends, and the Received field tayori put above
it (:meth:`Inbound.at_end`).
Promises:

- :meth:`Inbound.at_mail` returns an :class:`SpfOutcome`: the SPF verdict (HELO, then
  MAIL FROM, as :func:`tayori.auth.spf.check` orders them; ``spf.helo``,
  ``spf.timeout``) and the refusal the policy asks for: ``fail`` ``550 5.7.23`` with
  the domain's explanation (``spf.on_fail``), ``softfail`` ``550 5.7.23``
  (``spf.on_softfail``), ``permerror`` ``550 5.7.24`` (``spf.on_permerror``),
  ``temperror`` ``451 4.7.24`` (``spf.on_temperror``). ``tag`` lets the mail in, with
  the result in its header.
- :meth:`Inbound.at_end` returns an :class:`InboundVerdict`: every DKIM signature
  verified (``dkim.max_signatures``; big bodies hashed on a worker thread), the ARC
  chain validated (``cv=``), DMARC evaluated on the From field(s) with the SPF and
  DKIM results (``dmarc.psd``); the action: accept; refuse (``p=reject`` under
  ``dmarc.on_reject = "reject"``: ``550 5.7.1``); quarantine (``p=quarantine``, or
  reject under ``on_reject = "quarantine"``, with ``dmarc.on_quarantine = "header"``:
  ``X-Tayori-Quarantine: yes`` prepended) or hold (``on_quarantine = "hold"``: queued in
  the ``held`` state until ``tayori queue release``); and the rewrite of the draft's
  header block (:meth:`tayori.queue.spool.Spool.rewrite_header`): from the top,
  ``X-Tayori-Quarantine``, ``Authentication-Results`` (``authserv_id``; one result per
  method, one per DKIM signature), ``Received-SPF`` (RFC 7208 §9.1), then tayori's
  Received field and the client's header with every ``Authentication-Results`` field
  that claims our authserv-id removed (RFC 8601 §5). The checks run on the message as
  the client sent it (tayori's Received field is not part of it).
- With ``dmarc.reports``, every DMARC pass or fail under a record with ``rua=`` is
  counted in ``<spool>/dmarc-reports.sqlite3`` (:class:`~tayori.auth.dmarc_reports.ReportStore`,
  opened in the worker on first use, written on a thread); sending reports is not
  this module's.
- Mail of clients that are not screened (trusted networks, logged-in clients,
  submission and LMTP listeners) is not checked and gets no Authentication-Results of
  ours, but the forgeries go from it all the same: :meth:`Inbound.at_end` needs only
  its header section then, and rewrites the draft only when a field claiming our
  authserv-id is there (``forged`` counts them). Every message that comes in from
  outside tayori is such a client's: RFC 8601 §5 asks for the removal at the ADMD's
  border, and a field kept from a logged-in user or a trusted host would reach local
  users as our verdict, and be copied under our ARC seal when forwarded
  (:mod:`tayori.auth.outbound`).

Failure policy:

- DNS trouble is a result, never an exception. SPF: ``temperror``, deferred or tagged
  by ``spf.on_temperror``. DKIM: a key lookup that fails is ``dkim=temperror``
  (tagged). ARC: ``arc=fail`` (RFC 8617 §5.2.1 makes every failure permanent;
  tagged). DMARC: discovery that fails is ``dmarc=temperror``, and deferred with
  ``451 4.7.0`` unless DMARC only tags (``on_reject`` and ``on_quarantine`` both
  ``tag``); a DMARC ``fail`` whose author domain an aligned DKIM signature or SPF
  identity might have passed, had its lookup not failed, is a ``temperror`` too (RFC
  7489 §6.6.2 lets the receiver defer): a DNS hiccup never rejects mail.
- An exception (a bug) answers ``451 4.3.0`` for that MAIL or that message (fail
  closed, DESIGN §2.4: never a 250 for a message the checks did not finish, never a
  5xx), is logged with its traceback, and the session goes on.
- The report store failing is logged (``dmarc-report-failed``) and never affects mail.

Config keys: ``authserv_id``, ``hostname``, ``spool``, ``dns.*``, ``spf.*``,
``dkim.verify``, ``dkim.max_signatures``, ``dmarc.check``, ``dmarc.on_reject``,
``dmarc.on_quarantine``, ``dmarc.psd``, ``dmarc.reports``, ``dmarc.report_org``,
``dmarc.report_from``, ``dmarc.report_interval``, ``arc.verify``.
Standards: RFC 7208 (SPF; §9.1 Received-SPF), RFC 7372 (5.7.23, 5.7.24, 4.7.24),
RFC 6376, 8463, 8301 (DKIM), RFC 7489 (DMARC; §6.6.2 temporary failures, Appendix C
report data), RFC 9091 (PSD DMARC), RFC 8617 (ARC, ``arc=``), RFC 8601
(Authentication-Results; §5 removal of forged fields).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from tayori import maillog
from tayori.auth import arc, dkim, dmarc, spf
from tayori.auth.arc import ArcVerdict
from tayori.auth.dkim import DkimResult, DkimSignatureResult
from tayori.auth.dmarc import DmarcResult, DmarcVerdict, Policy
from tayori.auth.dmarc_reports import DkimAuth, ReportStore, SpfAuth
from tayori.auth.headers import parse_message
from tayori.auth.results import (
    MethodResult,
    authentication_results,
    dkim_result,
    header_fields,
    spf_result,
    strip_forged,
)
from tayori.auth.spf import SpfOptions, SpfResult, SpfVerdict
from tayori.config import Config
from tayori.config.model import DmarcConfig, SpfConfig
from tayori.dns import DnsPythonResolver, Resolver
from tayori.errors import INTERNAL_ERROR, Reply
from tayori.policy.screening import Client
from tayori.queue import reports

QUARANTINE_FIELD = b"X-Tayori-Quarantine: yes\r\n"
LINE_LIMIT = 78
"""Received-SPF is folded at spaces to keep its lines this short (RFC 5322 §2.1.1)."""
_QUOTED_PAIR = re.compile(r"\\(.)")
_RESULTS_FIELD = re.compile(rb"^authentication-results[ \t]*:", re.IGNORECASE | re.MULTILINE)
"""A quick look for the field (in the body too: then the header is parsed for nothing)."""


class Action(StrEnum):
    """What becomes of a message."""

    ACCEPT = "accept"
    REFUSE = "refuse"          # the verdict's reply, 5xx or 4xx
    QUARANTINE = "quarantine"  # accepted with X-Tayori-Quarantine: yes
    HOLD = "hold"              # accepted, queued in the held state


@dataclass(frozen=True, slots=True)
class SpfOutcome:
    """SPF at MAIL: the verdict (None: not checked) and the refusal policy asks for."""

    verdict: SpfVerdict | None = None
    refusal: Reply | None = None


NOT_CHECKED = SpfOutcome()


@dataclass(frozen=True, slots=True)
class InboundVerdict:
    """The stage's word on one message; see the module docstring.

    ``reply`` is set for :attr:`Action.REFUSE` only. ``rewrite`` is ``(header block,
    length it replaces)`` for the draft, None when nothing changes. ``header`` is what
    was added (for logs and ``tayori check-auth``); ``forged`` the number of
    Authentication-Results fields removed.
    """

    action: Action = Action.ACCEPT
    reply: Reply | None = None
    rewrite: tuple[bytes, int] | None = None
    header: bytes = b""
    forged: int = 0
    spf: SpfVerdict | None = None
    dkim: tuple[DkimSignatureResult, ...] = ()
    dmarc: DmarcVerdict | None = None
    arc: ArcVerdict | None = None


class Inbound:
    """One per worker process: its resolver and its report store, both made on first use
    (never before the workers are forked)."""

    def __init__(self, config: Config, resolver: Resolver | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._given_resolver = resolver
        self._resolver = resolver
        self._clock = clock
        self._reports: ReportStore | None = None
        self._reports_lock = threading.Lock()
        self.config = config

    def update(self, config: Config) -> None:
        """Use ``config`` from now on (SIGHUP): the resolver and the report store are
        made again from it when next needed."""
        self.config = config
        self._resolver = self._given_resolver
        self.close()

    @property
    def resolver(self) -> Resolver:
        if self._resolver is None:
            self._resolver = DnsPythonResolver(self.config.dns.nameservers,
                                               timeout=self.config.dns.timeout)
        return self._resolver

    @staticmethod
    def checks(client: Client) -> bool:
        """Whether this client's mail is checked (and its whole content read); of the
        others, :meth:`at_end` needs only the header section."""
        return client.screened

    # --- MAIL ------------------------------------------------------------------------------

    async def at_mail(self, client: Client, helo: str, mail_from: str) -> SpfOutcome:
        """SPF for the transaction; ``mail_from`` is ``""`` for the null reverse-path."""
        config = self.config.spf
        if not (client.screened and config.check):
            return NOT_CHECKED
        try:
            verdict = await spf.check(
                self.resolver, client.ip, unquoted(mail_from), helo, self.config.hostname,
                check_helo=config.helo,
                options=SpfOptions(clock=self._clock, budget=config.timeout))
        except Exception:   # a bug: defer this MAIL, keep the session
            _failed(client, "SPF", None)
            return SpfOutcome(refusal=INTERNAL_ERROR)
        maillog.event("spf", session=client.session, result=verdict.result.value,
                      identity=verdict.identity, domain=verdict.domain,
                      mechanism=verdict.mechanism, problem=verdict.problem)
        return SpfOutcome(verdict, _spf_refusal(verdict, config))

    # --- the end of the data ---------------------------------------------------------------

    async def at_end(self, client: Client, spf_outcome: SpfOutcome, message: bytes, *,
                     trace: bytes = b"", recipients: Sequence[str] = (),
                     queue_id: str | None = None) -> InboundVerdict:
        """DKIM, ARC and DMARC on ``message`` (the client's content; for a client not
        checked, its header section is enough), and forged Authentication-Results
        removed; ``trace`` is the Received field the draft holds above it, re-emitted in
        a rewritten header."""
        try:
            if not self.checks(client):
                verdict = self._unforged(message, trace)
            else:
                verdict = await self._judge(client, spf_outcome.verdict, message, trace,
                                            recipients)
        except Exception:   # a bug: defer this message (never 250 for it), keep the session
            _failed(client, "DKIM/DMARC/ARC", queue_id)
            return InboundVerdict(Action.REFUSE, INTERNAL_ERROR)
        if self.checks(client) or verdict.forged:
            _log(client, queue_id, verdict)
        return verdict

    def _unforged(self, message: bytes, trace: bytes) -> InboundVerdict:
        """An unchecked client's verdict: only the forged fields removed, if any."""
        if not _RESULTS_FIELD.search(message):
            return InboundVerdict()
        header = _header_of(message)
        return self._stripped(InboundVerdict(), trace, header)

    def _stripped(self, verdict: InboundVerdict, trace: bytes, header: bytes,
                  added: bytes = b"") -> InboundVerdict:
        """``verdict`` with the draft's rewrite: ``added`` on top, the forged fields
        claiming our authserv-id gone from ``header``."""
        kept = strip_forged(header, self.config.authserv_id)
        return dataclasses.replace(
            verdict, rewrite=_rewrite(added, trace, header, kept), header=added,
            forged=len(header_fields(header)[0]) - len(header_fields(kept)[0]))

    async def _judge(self, client: Client, spf_verdict: SpfVerdict | None, message: bytes,
                     trace: bytes, recipients: Sequence[str]) -> InboundVerdict:
        now = self._clock()
        header = _header_of(message)
        signatures = await self._dkim(message, now)
        chain = await arc.validate(message, self.resolver, now=now) \
            if self.config.arc.verify else None
        policy = await self._dmarc(header, spf_verdict, signatures)
        if policy is not None:
            await self._record(client, policy, spf_verdict, signatures, recipients)
        action, reply = _action(policy, self.config.dmarc)
        verdict = InboundVerdict(action, reply, spf=spf_verdict, dkim=signatures, dmarc=policy,
                                 arc=chain)
        if action is Action.REFUSE:
            return verdict
        return self._stripped(verdict, trace, header, self._fields(client, verdict))

    async def _dkim(self, message: bytes, now: float) -> tuple[DkimSignatureResult, ...]:
        config = self.config.dkim
        if not config.verify:
            return ()
        return tuple(await dkim.verify(message, self.resolver, now=now,
                                       max_signatures=config.max_signatures))

    async def _dmarc(self, header: bytes, spf_verdict: SpfVerdict | None,
                     signatures: Sequence[DkimSignatureResult]) -> DmarcVerdict | None:
        config = self.config.dmarc
        if not config.check:
            return None
        verdict = await dmarc.evaluate(
            header, spf=(spf_verdict.result.value, spf_verdict.domain) if spf_verdict else None,
            dkim=[(s.result.value, s.domain) for s in signatures], resolver=self.resolver,
            enforcement=_ceiling(config), psd=config.psd)
        if _unsure(verdict, spf_verdict, signatures):
            return dataclasses.replace(verdict, result=DmarcResult.TEMPERROR,
                                       disposition=Policy.NONE,
                                       reason="an aligned SPF or DKIM check failed "
                                              "temporarily")
        disposition = _disposition(verdict.applied, config)
        return dataclasses.replace(verdict, disposition=disposition,
                                   local_override=disposition is not verdict.applied)

    def _fields(self, client: Client, verdict: InboundVerdict) -> bytes:
        """The header fields to prepend, top first."""
        results: list[MethodResult] = []
        if verdict.spf is not None:
            results.append(_spf_method(verdict.spf))
        if self.config.dkim.verify:
            results += [_dkim_method(s) for s in verdict.dkim] or [MethodResult("dkim", "none")]
        if verdict.dmarc is not None:
            results.append(verdict.dmarc.method_result())
        if verdict.arc is not None:
            results.append(verdict.arc.method_result(client.ip))
        fields = [QUARANTINE_FIELD] if verdict.action is Action.QUARANTINE else []
        if results:
            fields.append(authentication_results(self.config.authserv_id, results))
        if verdict.spf is not None:
            fields.append(_folded("Received-SPF",
                                  spf.received_spf(verdict.spf, self.config.hostname)))
        return b"".join(fields)

    # --- DMARC aggregate report data -------------------------------------------------------

    async def _record(self, client: Client, verdict: DmarcVerdict,
                      spf_verdict: SpfVerdict | None,
                      signatures: Sequence[DkimSignatureResult],
                      recipients: Sequence[str]) -> None:
        if not (self.config.dmarc.reports and verdict.record and verdict.record.rua):
            return
        spf_auth = [SpfAuth(spf_verdict.result.value, spf_verdict.domain,
                            "mfrom" if spf_verdict.identity == "mailfrom" else "helo")
                    ] if spf_verdict else []
        dkim_auth = [DkimAuth(s.result.value, s.domain, s.selector)   # reasons stay here
                     for s in signatures if s.domain]
        envelope_to = recipients[0].rpartition("@")[2] if recipients else ""
        try:
            await asyncio.to_thread(self._write_report, verdict, client.ip, dkim_auth,
                                    spf_auth, envelope_to)
        except Exception as exc:   # report data is never worth a message
            maillog.warning("dmarc-report-failed", session=client.session,
                            reason=str(exc) or type(exc).__name__)

    def _write_report(self, verdict: DmarcVerdict, source_ip: str, dkim_auth: list[DkimAuth],
                      spf_auth: list[SpfAuth], envelope_to: str) -> None:
        with self._reports_lock:
            if self._reports is None:
                self._reports = _open_reports(self.config)
            store = self._reports
        store.record(verdict, source_ip=source_ip, received=self._clock(), dkim=dkim_auth,
                     spf=spf_auth, envelope_to=envelope_to)

    def close(self) -> None:
        """Close the report store (it is opened again when next needed)."""
        with self._reports_lock:
            if self._reports is not None:
                self._reports.close()
                self._reports = None


def unquoted(address: str) -> str:
    """``address`` with a quoted local part in its plain form (``"a b"@d`` is ``a b@d``):
    the mailbox name, as SPF's ``%{l}`` should expand it, and as Postfix hands senders to
    its SPF policy servers."""
    local, at, domain = address.rpartition("@")
    if len(local) < 2 or not (local.startswith('"') and local.endswith('"')):
        return address
    return _QUOTED_PAIR.sub(r"\1", local[1:-1]) + at + domain


# --- policy --------------------------------------------------------------------------------


def _spf_refusal(verdict: SpfVerdict, config: SpfConfig) -> Reply | None:
    policy = {SpfResult.FAIL: config.on_fail, SpfResult.SOFTFAIL: config.on_softfail,
              SpfResult.PERMERROR: config.on_permerror,
              SpfResult.TEMPERROR: config.on_temperror}.get(verdict.result, "tag")
    if policy == "tag":
        return None
    # softfail has no reply of its own (RFC 7208 §8.5 expects tagging): fail's, if refused
    return spf.recommended_reply(verdict) or spf.RECOMMENDED_REPLIES[SpfResult.FAIL]


def _ceiling(config: DmarcConfig) -> Policy:
    """The strictest disposition the config can lead to (``none``: DMARC only tags, and
    so never defers either)."""
    if config.on_reject == "reject":
        return Policy.REJECT
    if config.on_reject == "quarantine" or config.on_quarantine != "tag":
        return Policy.QUARANTINE
    return Policy.NONE


def _disposition(applied: Policy, config: DmarcConfig) -> Policy:
    """What tayori does with a policy the domain asked for (after pct= sampling)."""
    if applied is Policy.REJECT:
        if config.on_reject == "reject":
            return Policy.REJECT
        if config.on_reject == "tag":
            return Policy.NONE
        applied = Policy.QUARANTINE
    if applied is Policy.QUARANTINE and config.on_quarantine != "tag":
        return Policy.QUARANTINE
    return Policy.NONE


def _unsure(verdict: DmarcVerdict, spf_verdict: SpfVerdict | None,
            signatures: Sequence[DkimSignatureResult]) -> bool:
    """A fail that a temporary error may have caused: an SPF identity or a DKIM ``d=``
    aligned with the author domain whose check could not be completed."""
    record = verdict.record
    if verdict.result is not DmarcResult.FAIL or record is None:
        return False
    author = verdict.from_domain
    if (spf_verdict is not None and spf_verdict.result is SpfResult.TEMPERROR
            and dmarc.aligned(spf_verdict.domain, author, record.aspf)):
        return True
    return any(s.result is DkimResult.TEMPERROR and dmarc.aligned(s.domain, author, record.adkim)
               for s in signatures)


def _action(verdict: DmarcVerdict | None, config: DmarcConfig) -> tuple[Action, Reply | None]:
    if verdict is None:
        return Action.ACCEPT, None
    reply = dmarc.reply_for(verdict)
    if reply is not None:
        return Action.REFUSE, reply
    if verdict.disposition is Policy.QUARANTINE:
        return (Action.HOLD if config.on_quarantine == "hold" else Action.QUARANTINE), None
    return Action.ACCEPT, None


# --- header fields ---------------------------------------------------------------------------


def _spf_method(verdict: SpfVerdict) -> MethodResult:
    problem = verdict.result in (SpfResult.TEMPERROR, SpfResult.PERMERROR)
    return spf_result(verdict.result.value,
                      mailfrom=verdict.domain if verdict.identity == "mailfrom" else None,
                      helo=verdict.helo if verdict.identity == "helo" else None,
                      reason=(verdict.problem or "") if problem else "")


def _dkim_method(signature: DkimSignatureResult) -> MethodResult:
    return dkim_result(signature.result.value, domain=signature.domain or None,
                       selector=signature.selector or None,
                       signature=signature.header_b or None,
                       reason="" if signature.result is DkimResult.PASS else signature.reason)


def _folded(name: str, value: str) -> bytes:
    """``name: value`` CRLF, folded before spaces so lines stay within
    :data:`LINE_LIMIT` (unfolding gives back the value exactly)."""
    lines = [f"{name}:"]
    for word in value.split(" "):
        if len(lines[-1]) + 1 + len(word) > LINE_LIMIT and lines[-1].strip():
            lines.append("")
        lines[-1] += " " + word
    return ("\r\n".join(lines) + "\r\n").encode("ascii", "replace")


def _header_of(message: bytes) -> bytes:
    """The header fields of ``message``, byte for byte, without the blank line."""
    return message[: sum(len(f.raw) for f in parse_message(message).fields)]


def _rewrite(added: bytes, trace: bytes, header: bytes, kept: bytes) -> tuple[bytes, int] | None:
    """The draft's new first bytes and how many they replace: ``added`` above the
    Received field, and the client's header again when forged fields left it."""
    if kept != header:
        return added + trace + kept, len(trace) + len(header)
    return (added, 0) if added else None


# --- plumbing ------------------------------------------------------------------------------------


def _open_reports(config: Config) -> ReportStore:
    """The store the sending side (:mod:`tayori.queue.reports`) reads, as it opens it."""
    return ReportStore(reports.store_path(config.spool), reports.reporter_of(config),
                       interval=reports.period_of(config))


def _failed(client: Client, what: str, queue_id: str | None) -> None:
    maillog.error("error", session=client.session, queue_id=queue_id,
                  reason=f"internal error in the {what} check",
                  detail=traceback.format_exc(limit=8))


def _log(client: Client, queue_id: str | None, verdict: InboundVerdict) -> None:
    dmarc_verdict = verdict.dmarc
    maillog.event(
        "sender-auth", session=client.session, queue_id=queue_id,
        dkim=",".join(f"{s.result.value}:{s.domain or '?'}" for s in verdict.dkim) or None,
        dmarc=dmarc_verdict.result.value if dmarc_verdict else None,
        disposition=dmarc_verdict.disposition.value
        if dmarc_verdict and dmarc_verdict.policy else None,
        from_domain=dmarc_verdict.from_domain or None if dmarc_verdict else None,
        arc=verdict.arc.cv.value if verdict.arc else None, action=verdict.action.value,
        forged=verdict.forged or None)


__all__ = [
    "NOT_CHECKED",
    "QUARANTINE_FIELD",
    "Action",
    "Inbound",
    "InboundVerdict",
    "SpfOutcome",
]
