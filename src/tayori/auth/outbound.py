"""Outbound authentication: DKIM signatures and ARC seals on the mail tayori sends on.

Takes: the configuration (``[dkim]``, ``[[dkim_key]]``, ``[arc]``, ``authserv_id``, and
the match rules' network tables, which say what a trusted network is), a
:class:`~tayori.dns.Resolver` (to validate an ARC chain before sealing it) and a clock;
then per delivery attempt the queued message's envelope
(:class:`~tayori.queue.store.QueuedMessage`) and the recipients it goes to
(:class:`~tayori.queue.store.Claim`, whose ``depth`` says an alias or ``.forward`` made
them), and at last the message's content exactly as it goes out (after any RFC 6152
downgrade, CRLF line ends, not dot-stuffed; :mod:`tayori.deliver.client` hands it in).
Promises:
- :class:`OutboundAuth` loads every ``[[dkim_key]]`` once, when it is made (the delivery
  side's start and each reload); see the failure policy for keys that cannot be used.
- :meth:`OutboundAuth.prefix` returns None when a transaction gets nothing, otherwise a
  :data:`Prefix`: given the content, the header fields to put in front of it, newest
  first: the ARC Set, then the DKIM-Signature fields. They cover exactly the bytes
  sent, so they stay valid as long as nothing on the way changes the message (DESIGN
  §2.3); nothing is stored, each attempt signs anew.
- DKIM (RFC 6376 §5, RFC 8463): a message is signed when its client logged in (the
  envelope's protocol ends in ``A``, ESMTPA/ESMTPSA, RFC 3848) and ``dkim.sign_for``
  names ``authenticated``, or when its client is in a trusted network (a network table
  of a match rule) and it names ``trusted``. Mail tayori writes itself (DSNs, DMARC
  reports) and mail from the sendmail command is queued as from 127.0.0.1: trusted when
  localhost is. The keys are those of the ``[[dkim_key]]`` entries whose domain is an
  author domain, the domain of a From address (RFC 7489 §6.6.1; exact match, no parent
  domain), one signature per key: two keys (RSA-2048 and Ed25519) make a dual signature;
  none, no signature. relaxed/relaxed, ``dkim.headers`` (empty: RFC 6376's recommended
  set; From is always signed, §5.4), ``dkim.oversign`` signed once more than they
  occur, ``x=`` after ``dkim.expire`` (0: none).
- ARC (RFC 8617 §5.1): with ``arc.seal``, a transaction with a recipient that an alias
  or ``.forward`` produced (``depth`` > 0; the other recipients of the same transaction
  share its one content, so they get the set too) is sealed with the ``[[dkim_key]]``
  named by ``arc.seal_domain`` and ``arc.seal_selector``: the chain the message arrived
  with is validated first (its ``cv=``), the ARC-Authentication-Results carries our own
  Authentication-Results found in the message (``authserv_id``), and the set is made
  after the DKIM signatures and over them (the ARC-Message-Signature signs
  DKIM-Signature). A chain that may not be sealed (a reported ``cv=fail``, 50 sets)
  gets no set (logged).
- Signing and sealing run in a worker thread for a big message
  (:func:`~tayori.auth.dkim.sign_async`, :func:`~tayori.auth.arc.seal_async`).
Failure policy: a signature or a seal never stops a message. A key file that cannot be
read or is no usable key is logged at load (``dkim-key-unusable``, naming the file) and
left out; the other keys still sign. Keys are read by the process that delivers, after
privileges are dropped: a key file must be readable by ``user`` (as TLS files must be
for a reload). A failure while signing or sealing is logged (``dkim-sign-failed``,
``arc-seal-failed``, with the queue id) and the message goes without that part. Why
not defer, as DESIGN §2.4 has policy hooks fail closed: that rule keeps a failing check
from letting in mail it would have refused; a signature admits nothing. Unsigned mail
is still valid mail (what a tayori without keys sends), while a deferral would repeat
the same failure on every attempt (the same bytes, the same key) until the message
expires and bounces: later, and worse, than a receiver's verdict on unsigned mail.
Config keys: ``dkim.sign_for``, ``dkim.headers``, ``dkim.oversign``, ``dkim.expire``,
``dkim_key`` (``domain``, ``selector``, ``key_file``), ``arc.seal``, ``arc.seal_domain``,
``arc.seal_selector``, ``authserv_id``, ``tables`` and ``match`` (trusted networks).
Standards: RFC 6376 §5 (signing), RFC 8463 (Ed25519), RFC 8301 (RSA of 1024 bits at
least), RFC 8617 §5.1 (sealing), RFC 7489 §6.6.1 (author domains), RFC 3848 (``A``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from tayori import maillog
from tayori.auth import arc
from tayori.auth.dkim import DEFAULT_HEADERS, SignOptions, sign_async
from tayori.auth.dkim_keys import SigningKey, load_signing_key
from tayori.auth.dmarc import author_domains, from_field_values
from tayori.config import Config
from tayori.config.model import DkimConfig, DkimKeyConfig
from tayori.dns import Resolver
from tayori.policy.relay import Rules
from tayori.queue.store import Claim, QueuedMessage

Prefix = Callable[[bytes], Awaitable[bytes]]
"""Given the content as it goes out, the fields to put before it (the shape of
:data:`tayori.deliver.client.Prefix`)."""


@dataclass(frozen=True, slots=True)
class Keyring:
    """The usable keys: for signing, by domain (A-label), in configuration order; the
    one to seal with (None: no sealing)."""

    signing: Mapping[str, tuple[SigningKey, ...]]
    seal: SigningKey | None = None


def load_keys(config: Config) -> Keyring:
    """Every ``[[dkim_key]]`` that loads; see the module's failure policy."""
    signing: dict[str, tuple[SigningKey, ...]] = {}
    seal = None
    for entry in config.dkim_keys:
        key = _load(entry)
        if key is None:
            continue
        signing[key.domain] = (*signing.get(key.domain, ()), key)
        if (entry.domain, entry.selector) == (config.arc.seal_domain, config.arc.seal_selector):
            seal = key
    if config.arc.seal and (seal is None or seal.algorithm != arc.RSA_SHA256):
        maillog.error("arc-seal-disabled", domain=config.arc.seal_domain,
                      selector=config.arc.seal_selector,
                      reason="no usable RSA key for arc.seal_domain and arc.seal_selector")
        seal = None
    return Keyring(signing, seal if config.arc.seal else None)


def _load(entry: DkimKeyConfig) -> SigningKey | None:
    try:
        return load_signing_key(entry.key_file, entry.domain, entry.selector)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        maillog.error("dkim-key-unusable", file=entry.key_file, domain=entry.domain,
                      selector=entry.selector, reason=reason, effect="this key does not sign")
        return None


def sign_options(dkim: DkimConfig) -> SignOptions:
    """The ``[dkim]`` signing keys as :class:`SignOptions` (From always signed)."""
    headers = tuple(name.lower() for name in dkim.headers) or DEFAULT_HEADERS
    oversign = tuple(name.lower() for name in dkim.oversign)
    if "from" not in headers + oversign:
        headers += ("from",)
    expire = max(1, round(dkim.expire)) if dkim.expire > 0 else None
    return SignOptions(headers=headers, oversign=oversign, expire_after=expire)


class OutboundAuth:
    """What the mail tayori sends on gets; see the module docstring."""

    def __init__(self, config: Config, resolver: Resolver, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.config, self.resolver, self.clock = config, resolver, clock
        self.rules = Rules(config)
        self.keys = load_keys(config)
        self.options = sign_options(config.dkim)

    def signs(self, message: QueuedMessage) -> bool:
        """Whether the envelope makes the message one to sign (``dkim.sign_for``)."""
        sign_for = self.config.dkim.sign_for
        return bool(self.keys.signing) and (
            ("authenticated" in sign_for and message.protocol.endswith("A"))
            or ("trusted" in sign_for and self.rules.trusts(message.client_address)))

    def seals(self, recipients: Sequence[Claim]) -> bool:
        """Whether a transaction to ``recipients`` gets an ARC Set (forwarded mail)."""
        return self.keys.seal is not None and any(claim.depth > 0 for claim in recipients)

    def prefix(self, message: QueuedMessage, recipients: Sequence[Claim]) -> Prefix | None:
        """The fields to put before the message for this transaction, or None."""
        signing, sealing = self.signs(message), self.seals(recipients)
        if not (signing or sealing):
            return None

        async def fields(content: bytes) -> bytes:
            signatures = await self._sign(message.queue_id, content) if signing else b""
            arc_set = await self._seal(message.queue_id, signatures + content) \
                if sealing else b""
            return arc_set + signatures
        return fields

    def keys_for(self, content: bytes) -> list[SigningKey]:
        """The keys of the message's author domains, in From order."""
        domains = author_domains(from_field_values(content)).domains
        return [key for domain in domains for key in self.keys.signing.get(domain, ())]

    async def _sign(self, queue_id: str, content: bytes) -> bytes:
        keys = self.keys_for(content)
        if not keys:
            return b""
        try:
            fields = await sign_async(content, keys, now=self.clock(), options=self.options)
        except Exception as exc:   # the failure policy: logged, sent unsigned
            maillog.error("dkim-sign-failed", queue_id=queue_id, reason=str(exc) or
                          type(exc).__name__, effect="sent without DKIM signature")
            return b""
        maillog.event("dkim-signed", logging.DEBUG, queue_id=queue_id, signatures=",".join(
            f"{key.domain}/{key.selector}/{key.algorithm}" for key in keys))
        return fields

    async def _seal(self, queue_id: str, message: bytes) -> bytes:
        key = self.keys.seal
        assert key is not None
        try:
            now = self.clock()
            chain = await arc.validate(message, self.resolver, now=now)
            results = arc.collect_results(message, self.config.authserv_id)
            arc_set = await arc.seal_async(message, key, authserv_id=self.config.authserv_id,
                                           results=results, chain=chain, now=now)
        except Exception as exc:   # the failure policy: logged, sent without a seal
            maillog.error("arc-seal-failed", queue_id=queue_id, reason=str(exc) or
                          type(exc).__name__, effect="sent without ARC set")
            return b""
        if not arc_set:
            maillog.warning("arc-not-sealed", queue_id=queue_id, reason=chain.seal_refusal)
        else:
            maillog.event("arc-sealed", logging.DEBUG, queue_id=queue_id,
                          instance=chain.instance + 1, cv=chain.cv.value)
        return arc_set


__all__ = ["Keyring", "OutboundAuth", "Prefix", "load_keys", "sign_options"]
