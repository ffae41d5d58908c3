"""Delivery attempts: one message to one destination, over a fresh or reused connection.

Takes: a :class:`Delivery` (a message, the action routing it, the destination — the
recipients' domain for ``mx``, the configured host for ``relay`` and ``lmtp`` — and the
recipients), from the queue manager.
Promises:
- :meth:`Dispatcher.deliver` returns one :class:`Result` per recipient, in order, and
  never raises for anything the network or the peer does.
- Next hops: ``mx``: the domain's MX hosts (:func:`tayori.route.mx.mx_hops`), each
  address tried in turn while connecting fails or the greeting/EHLO is refused; all
  failing is a temporary result for every recipient (the last hop's reason), never a
  bounce. ``relay``: ``[host]:port`` (no MX lookup) or ``host:port`` (MX lookup);
  ``lmtp``: ``host:port`` or a unix socket path.
- Concurrency: at most ``max_connections`` of the action per destination and
  ``delivery.max_connections`` in total; a connection that finished a transaction
  cleanly (RSET accepted) waits ``delivery.reuse_time`` for the next message to the
  same destination.
- Outbound authentication (:mod:`tayori.auth.outbound`): each transaction gets the
  DKIM signatures and ARC set its message and recipients call for, made over the
  content as it is sent (after a downgrade) and sent in front of it.
- The operator log gets one line per connection failure and per TLS fallback.
Failure policy: an unexpected exception in an attempt gives ``451 4.3.0`` for its
recipients (they are retried) and an error line in the log.
Config keys: ``actions.*``, ``delivery.*``, ``dns.*``, ``hostname``; through
:mod:`tayori.auth.outbound`, ``dkim.*``, ``dkim_key``, ``arc.*``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import traceback
from dataclasses import dataclass, field

from tayori import maillog
from tayori.auth.outbound import OutboundAuth, Prefix
from tayori.config import Config
from tayori.config.model import ActionConfig, parse_next_hop
from tayori.deliver.client import (
    ClientSettings,
    Connection,
    HopError,
    Recipient,
    Target,
    Timeouts,
    TlsFallback,
    Transaction,
    is_ip,
)
from tayori.dns import DnsTemporaryError, NxDomain, Resolver
from tayori.errors import INTERNAL_ERROR, Reply
from tayori.queue.spool import RecipientRecord
from tayori.queue.store import Claim, QueuedMessage
from tayori.route.mx import RouteError, mx_hops
from tayori.smtp.client import MailOptions


@dataclass(frozen=True, slots=True)
class Delivery:
    message: QueuedMessage
    path: str
    action_name: str
    action: ActionConfig
    destination: str
    recipients: tuple[Claim, ...]


@dataclass(frozen=True, slots=True)
class Result:
    reply: Reply
    remote_mta: str | None = None     # host name of the server that answered
    target: str | None = None         # host[address]:port, for the log
    tls: str | None = None            # "TLSv1.3 TLS_AES_256_GCM_SHA384", for the log
    dsn_passed_on: bool = False       # the peer took NOTIFY/ORCPT (RFC 3461 §4.2)
    final: bool = False               # LMTP: delivered into the mailbox store
    expanded: tuple[RecipientRecord, ...] = ()   # an alias: the recipients it became


@dataclass(slots=True)
class _Destination:
    key: tuple[str, str]          # (action, domain or host)
    slots: asyncio.Semaphore
    limit: int
    idle: list[Connection] = field(default_factory=list)
    jobs: int = 0                 # attempts running or waiting for a slot


@dataclass(frozen=True, slots=True)
class Identity:
    """What counts as ourselves when an MX points back here (a mail loop): our host
    name, and the (address, port) pairs we listen on."""

    names: frozenset[str]
    endpoints: frozenset[tuple[str, int]]

    @classmethod
    def of(cls, config: Config) -> Identity:
        endpoints = set()
        for listener in config.listen:
            host, port = listener.address
            if host in ("0.0.0.0", "::"):   # every local address: the usual ones
                endpoints |= {(a, port) for a in ("127.0.0.1", "::1", *_addresses_of(
                    config.hostname))}
            else:
                endpoints.add((host, port))
        return cls(frozenset({config.hostname.lower()}), frozenset(endpoints))

    def addresses(self, port: int) -> frozenset[str]:
        return frozenset(address for address, p in self.endpoints if p == port)


def _addresses_of(name: str) -> set[str]:
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(name, None)}
    except (OSError, UnicodeError):
        return set()


class Dispatcher:
    def __init__(self, config: Config, resolver: Resolver, identity: Identity) -> None:
        self.config, self.resolver, self.identity = config, resolver, identity
        self.outbound = OutboundAuth(config, resolver)   # loads the DKIM keys
        self._total = asyncio.Semaphore(config.delivery.max_connections)
        self._destinations: dict[tuple[str, str], _Destination] = {}

    def update(self, config: Config) -> None:
        """A reloaded configuration: applies to the next attempts (a changed
        per-destination limit once that destination is idle again)."""
        if config.delivery.max_connections != self.config.delivery.max_connections:
            self._total = asyncio.Semaphore(config.delivery.max_connections)
        self.config = config
        self.identity = Identity.of(config)
        self.outbound = OutboundAuth(config, self.resolver)

    def saturated(self, job: Delivery) -> bool:
        """True when the job's destination already has twice its connection limit's
        worth of attempts running or waiting (the queue manager postpones it)."""
        destination = self._destinations.get((job.action_name, job.destination))
        return destination is not None and destination.jobs >= 2 * destination.limit

    async def deliver(self, job: Delivery) -> list[Result]:
        key = (job.action_name, job.destination)
        destination = self._destinations.get(key)
        if destination is None:
            limit = job.action.max_connections or 1
            destination = self._destinations[key] = _Destination(
                key, asyncio.Semaphore(limit), limit)
        destination.jobs += 1
        try:
            async with destination.slots, self._total:
                return await self._attempt(job, destination)
        except Exception:
            maillog.error("delivery-failed", queue_id=job.message.queue_id,
                          destination=job.destination, detail=traceback.format_exc(limit=6))
            return [Result(INTERNAL_ERROR)] * len(job.recipients)
        finally:
            destination.jobs -= 1
            self._forget_if_unused(destination)

    def _forget_if_unused(self, destination: _Destination) -> None:
        """Memory stays bounded by what is active, not by every domain ever seen."""
        if not destination.jobs and not destination.idle and \
                self._destinations.get(destination.key) is destination:
            del self._destinations[destination.key]

    async def close(self) -> None:
        """Close idle connections (QUIT)."""
        idle = [c for d in self._destinations.values() for c in d.idle]
        for destination in self._destinations.values():
            destination.idle.clear()
        await asyncio.gather(*(connection.quit() for connection in idle))

    # --- one attempt ------------------------------------------------------------------

    async def _attempt(self, job: Delivery, destination: _Destination) -> list[Result]:
        if not _exists(job.path):   # removed by `tayori queue delete` meanwhile
            return [Result(Reply(451, "4.3.0", "the message was removed from the queue"))
                    ] * len(job.recipients)
        transaction = _transaction(job, self.outbound.prefix(job.message, job.recipients))
        while destination.idle:
            connection = destination.idle.pop()
            replies = await _send(connection, transaction)
            if connection.broken and all(r.code == 451 and r.status == "4.4.2"
                                         for r in replies):
                connection.close()   # the server closed it while idle: try afresh
                continue
            return await self._finish(connection, destination, replies)
        settings = self._settings(job.action)
        try:
            targets = await self._targets(job)
        except RouteError as exc:
            return [Result(exc.reply)] * len(job.recipients)
        failure = Reply(451, "4.4.1", f"no server for {job.destination} answered")
        for target in targets:
            try:
                connection = await self._open(job, target, settings)
            except HopError as exc:
                maillog.warning("connect-failed", queue_id=job.message.queue_id,
                                relay=target.describe(), reason=str(exc.reply))
                failure = exc.reply
                continue
            return await self._finish(connection, destination,
                                      await _send(connection, transaction))
        return [Result(_temporary(failure), target=None)] * len(job.recipients)

    async def _open(self, job: Delivery, target: Target, settings: ClientSettings) -> Connection:
        try:
            return await Connection.open(target, settings)
        except TlsFallback as exc:
            maillog.warning("tls-fallback", queue_id=job.message.queue_id,
                            relay=target.describe(), reason=str(exc.reply),
                            next="a new connection without TLS")
            return await Connection.open(target, settings, use_tls=False)

    async def _finish(self, connection: Connection, destination: _Destination,
                      replies: list[Reply]) -> list[Result]:
        tls = connection.tls
        target = connection.target   # a unix socket's path is no name for Remote-MTA
        remote = target.host if target.port else (connection.server_name or None)
        results = [Result(reply, remote, target.describe(),
                          f"{tls.version} {tls.cipher}" if tls else None,
                          dsn_passed_on=connection.caps.dsn and reply.is_positive,
                          final=connection.settings.lmtp and reply.is_positive)
                   for reply in replies]
        if await connection.reset():
            destination.idle.append(connection)
            asyncio.get_running_loop().call_later(
                self.config.delivery.reuse_time, self._expire, destination, connection,
                connection.transactions)
        else:
            connection.close()
        return results

    def _expire(self, destination: _Destination, connection: Connection, used: int) -> None:
        """Close a connection idle since its ``used``-th transaction (a later one has
        its own timer)."""
        if connection.transactions == used and connection in destination.idle:
            destination.idle.remove(connection)
            self._forget_if_unused(destination)
            task = asyncio.ensure_future(connection.quit())
            task.add_done_callback(lambda t: t.exception())

    def _settings(self, action: ActionConfig) -> ClientSettings:
        delivery = self.config.delivery
        return ClientSettings(
            helo_name=self.config.hostname, lmtp=action.deliver == "lmtp",
            tls=action.tls if action.deliver != "lmtp" else "none",
            tls_ca_file=action.tls_ca_file, source_address=action.source_address,
            auth_user=action.auth_user, auth_password=action.auth_password,
            timeouts=Timeouts(connect=delivery.connect_timeout,
                              greeting=delivery.command_timeout,
                              command=delivery.command_timeout,
                              data_end=delivery.data_timeout))

    # --- next hops --------------------------------------------------------------------

    async def _targets(self, job: Delivery) -> list[Target]:
        action = job.action
        if action.deliver == "mx":
            return await self._mx_targets(job.destination, action.port)
        host, port, brackets = parse_next_hop(action.host, 25 if action.deliver == "relay"
                                              else 24)
        if port == 0 or is_ip(host):
            return [Target(host, host, port)]
        if action.deliver == "relay" and not brackets:
            try:
                return await self._mx_targets(host, port)
            except RouteError as exc:   # our own next hop, not the recipient's domain:
                raise RouteError(_temporary(exc.reply)) from None   # never a bounce
        return [Target(host, address, port) for address in await self._addresses(host)]

    async def _mx_targets(self, domain: str, port: int) -> list[Target]:
        delivery = self.config.delivery
        hops = await mx_hops(self.resolver, domain, own_names=self.identity.names,
                             own_addresses=self.identity.addresses(port),
                             prefer_ipv6=delivery.prefer_ipv6, ipv4=delivery.ipv4,
                             ipv6=delivery.ipv6)
        return [Target(hop.host, hop.address, port) for hop in hops]

    async def _addresses(self, host: str) -> list[str]:
        delivery = self.config.delivery
        families = [f for f, on in ((socket.AF_INET, delivery.ipv4),
                                    (socket.AF_INET6, delivery.ipv6)) if on]
        if delivery.prefer_ipv6:
            families.reverse()
        addresses: list[str] = []
        temporary = False
        for family in families:
            try:
                addresses += await self.resolver.addresses(host, family)
            except NxDomain:
                break
            except DnsTemporaryError:
                temporary = True
        if addresses:
            return addresses
        if temporary:
            raise RouteError(Reply(451, "4.4.3", f"cannot look up {host} now (DNS)"))
        raise RouteError(Reply(451, "4.4.4", f"the next hop {host} has no address "
                               "(check the action's host)"))


async def _send(connection: Connection, transaction: Transaction) -> list[Reply]:
    """One transaction; whatever escapes it (a cancellation at shutdown) closes the
    connection rather than leaking it."""
    try:
        return await connection.send(transaction)
    except BaseException:
        connection.close()
        raise


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _transaction(job: Delivery, prefix: Prefix | None) -> Transaction:
    message = job.message
    return Transaction(
        sender=message.sender,
        recipients=tuple(Recipient(c.address, c.notify, c.orcpt) for c in job.recipients),
        options=MailOptions(size=message.size, body=message.body_type,
                            smtputf8=message.smtputf8, ret=message.ret, envid=message.envid),
        path=job.path, prefix=prefix)


def _temporary(reply: Reply) -> Reply:
    """A hop-level failure (even a 5xx greeting) defers: another time, another hop."""
    if reply.code < 500:
        return reply
    status = "4" + reply.status[1:] if reply.status else "4.4.0"
    return Reply(451, status, reply.text)

