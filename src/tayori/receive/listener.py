"""Listeners and what their sessions share: config, spool, relay rules, TLS, limits.

Takes: a validated Config and an open Spool.
Promises: :meth:`Receiver.bind` creates the listening sockets (before privileges are
dropped); :meth:`Receiver.serve` accepts connections, each a
:class:`~tayori.receive.session.Session`; connections over ``limits.max_connections`` in
total or ``limits.max_connections_per_ip`` from one address get ``421 4.7.0`` and are
closed; :meth:`Receiver.drain` stops accepting, lets sessions finish for
``limits.drain_timeout`` and then closes the rest (SIGTERM); :meth:`Receiver.reload`
swaps in a new config for new sessions (SIGHUP) while running sessions keep theirs.
Failure policy: a TLS file that cannot be loaded stops start-up (TlsSetupError); on
reload the old contexts stay.
Per worker, the sessions share the screening and the sender-authentication stage
(:class:`~tayori.auth.inbound.Inbound`), whose resolvers are made in the worker.
A listener that offers AUTH refuses a client banned for password guessing with ``421
4.7.0`` at connect (:mod:`tayori.policy.authentication`; the ban list is read off the
event loop, and a list that cannot be read in time lets the client in: its AUTH is
checked again, failing closed).
Config keys: ``listen``, ``certificate``, ``auth``, ``limits.max_connections``,
``limits.max_connections_per_ip``, ``limits.drain_timeout``, ``smtp.*``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import ssl
from dataclasses import dataclass

from tayori import maillog
from tayori.auth.inbound import Inbound
from tayori.config import Config, ListenConfig
from tayori.config.model import AUTH_MODES
from tayori.errors import Reply
from tayori.policy.authentication import Authenticator
from tayori.policy.relay import Rules
from tayori.policy.screening import Screening
from tayori.queue.spool import Spool
from tayori.receive import tls
from tayori.receive.connections import ConnectionTable
from tayori.receive.session import Session
from tayori.route.local import LocalRecipients
from tayori.smtp.server import EXTENSIONS_ALL, Settings


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    host: str
    port: int
    proxy_protocol: bool
    starttls: bool
    config: ListenConfig

    @property
    def implicit_tls(self) -> bool:
        """``smtps``: TLS from the first byte (after a PROXY header), before the greeting."""
        return self.config.mode == "smtps"


class Receiver:
    def __init__(self, config: Config, spool: Spool,
                 connections: ConnectionTable | None = None) -> None:
        self.spool = spool
        self.config = config
        self.rules = Rules(config)
        self.local = LocalRecipients(config)
        self.authenticator = Authenticator(config.auth, config.spool)
        self.screening = Screening(config)
        self.inbound = Inbound(config)
        self.connections = connections or ConnectionTable(1)
        self._tls: dict[str, tls.CertificateChoice] = {}
        self._sockets: list[tuple[Listener, socket.socket]] = []
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._load_tls(config)

    # --- configuration ------------------------------------------------------------------

    def engine_settings(self, listener: Listener) -> Settings:
        config = self.config
        smtp = config.smtp
        disabled = set()
        if not smtp.smtputf8:
            disabled.add("SMTPUTF8")
        if not smtp.chunking:
            disabled |= {"CHUNKING", "BINARYMIME"}
        if not smtp.dsn:
            disabled.add("DSN")
        return Settings(
            hostname=config.hostname,
            max_message_size=config.limits.max_message_size,
            max_recipients=config.limits.max_recipients,
            max_errors=config.limits.max_errors,
            max_unknown_commands=config.limits.max_unknown_commands,
            tls_available=listener.name in self._tls,
            tls_active=listener.implicit_tls,
            auth_mechanisms=config.auth.mechanisms if listener.config.offers_auth else (),
            auth_without_tls=listener.config.auth_without_tls,
            auth_required=listener.config.mode in AUTH_MODES,
            extensions=tuple(e for e in EXTENSIONS_ALL if e not in disabled))

    def tls_context(self, listener: Listener) -> ssl.SSLContext | None:
        choice = self._tls.get(listener.name)
        return None if choice is None else choice.default

    def _load_tls(self, config: Config) -> None:
        choices = {}
        for index, item in enumerate(config.listen):
            if not item.starttls:
                continue
            cert, key = item.tls_cert, item.tls_key
            if not cert:
                cert, key = tls.self_signed(os.path.join(config.spool, "tls"), config.hostname)
            settings = tls.TlsSettings(item.tls_min_version, item.tls_ciphers,
                                       item.tls_client_certs, item.tls_client_ca)
            name = _name(index, item)
            default = tls.server_context(cert, key, settings)
            default.sni_callback = functools.partial(self._choose_certificate, name)
            choices[name] = tls.CertificateChoice(default, tuple(
                (extra.names or tls.certificate_names(extra.cert),
                 tls.server_context(extra.cert, extra.key, settings))
                for extra in config.certificates))
        self._tls = choices

    def _choose_certificate(self, listener: str, connection: ssl.SSLObject,
                            server_name: str | None, _: ssl.SSLContext) -> None:
        """SNI: the certificate for the name asked, from the contexts loaded now (a
        reload changes them for listeners whose server keeps its first context)."""
        choice = self._tls.get(listener)
        if choice is not None:
            connection.context = choice.context_for(server_name)

    def reload(self, config: Config) -> None:
        """Use ``config`` for new sessions. Raises TlsSetupError, keeping the old one."""
        self._load_tls(config)
        self.rules = Rules(config)
        self.local = LocalRecipients(config)
        self.authenticator.update(config.auth)
        self.screening.update(config)
        self.inbound.update(config)
        self.config = config
        bound = {(lis.host, lis.port) for lis, _ in self._sockets}
        wanted = {item.address for item in config.listen}
        if bound != wanted:
            maillog.warning("reload", reason="listener addresses changed; restart to apply")

    # --- sockets ----------------------------------------------------------------------------

    def bind(self) -> None:
        for index, item in enumerate(self.config.listen):
            host, port = item.address
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind((host, port))
            except OSError:
                sock.close()
                raise
            sock.listen(1024)
            sock.setblocking(False)
            listener = Listener(_name(index, item), host, port, item.proxy_protocol,
                                item.starttls, item)
            self._sockets.append((listener, sock))

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for listener, sock in self._sockets:
            implicit = self.tls_context(listener) if listener.implicit_tls else None
            server = await loop.create_server(
                functools.partial(Session, self, listener), sock=sock, start_serving=True,
                ssl=implicit, ssl_handshake_timeout=30 if implicit else None)
            self._servers.append(server)
            maillog.event("listening", listener=listener.name,
                          address=f"[{listener.host}]:{listener.port}")

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [sock.getsockname()[:2] for _, sock in self._sockets]

    # --- sessions -------------------------------------------------------------------------

    def track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def session_prefix(self) -> str:
        table = self.connections
        return "S" if table.workers == 1 else f"S{table.worker}."

    async def admit(self, session: Session) -> Reply | None:
        """The refusal a new connection gets as its greeting (a ban, too many
        connections), or None: then it is counted until :meth:`release`."""
        if session.listener.config.offers_auth:
            banned = await self.authenticator.ban(session.client_ip)
            if banned is not None:
                return banned
        limits = self.config.limits
        total, from_client = self.connections.counts(session.client_ip)
        if total >= limits.max_connections:
            return Reply(421, "4.7.0", f"{self.config.hostname} Too many connections, "
                                       "try again later")
        if from_client >= limits.max_connections_per_ip:
            return Reply(421, "4.7.0", f"{self.config.hostname} Too many connections from "
                                       "your address, try again later")
        self.connections.add(session.client_ip, 1)
        return None

    def release(self, session: Session, admitted: bool) -> None:
        if admitted:
            self.connections.add(session.client_ip, -1)

    def close_sockets(self) -> None:
        """Stop listening in this process (the supervisor, when it stops)."""
        for _, sock in self._sockets:
            sock.close()

    async def drain(self) -> None:
        """Stop accepting; give sessions ``drain_timeout``; then close the rest."""
        for server in self._servers:
            server.close()
        tasks = set(self._tasks)
        if tasks:
            maillog.event("draining", sessions=len(tasks))
            _, pending = await asyncio.wait(tasks, timeout=self.config.limits.drain_timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()


def _name(index: int, item: ListenConfig) -> str:
    host, port = item.address
    return f"{item.mode}#{index}@{host}:{port}"
