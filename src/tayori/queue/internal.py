"""Mail tayori writes itself (DSNs, DMARC reports) into its own queue.

Takes: the spool, the relay rules, a whole message (CRLF line ends), its envelope sender
and recipients.
Promises: :func:`route` gives the action for a recipient of such mail by the match
rules' domains alone (:meth:`~tayori.policy.relay.Rules.route_internal`: nobody outside
can make tayori write it, so the client part of a rule does not apply).
:func:`enqueue` commits the message through the spool as received mail is (durable when
it returns), as from 127.0.0.1 (``localhost``, HELO the host name) with the protocol
name given (``dsn``, ``dmarc-report``), ``BODY=8BITMIME`` when it holds 8-bit octets,
and SMTPUTF8 when asked or when an address needs it.
Failure policy: OSError and sqlite3.Error from the spool reach the caller; nothing is
queued then.
Config keys: ``hostname`` (through the caller), ``match``.
"""

from __future__ import annotations

from collections.abc import Sequence

from tayori.address import AddressError, parse_mailbox
from tayori.policy.relay import Rules
from tayori.queue.spool import Envelope, RecipientRecord, Spool

LOCAL_CLIENT = "127.0.0.1"


def route(rules: Rules, address: str) -> str | None:
    """The action for ``address``, or None when no match rule routes its domain."""
    try:
        domain = parse_mailbox(address, utf8=True).ascii_domain
    except AddressError:
        domain = ""
    return rules.route_internal(domain)


async def enqueue(spool: Spool, content: bytes, *, queue_id: str, sender: str,
                  recipients: Sequence[RecipientRecord], hostname: str, protocol: str,
                  now: float, smtputf8: bool = False) -> None:
    """Queue ``content`` for ``recipients``; see the module docstring."""
    draft = spool.new_draft(queue_id)
    draft.write(content)
    addresses = [sender, *(r.address for r in recipients)]
    envelope = Envelope(
        queue_id=queue_id, sender=sender, recipients=tuple(recipients), size=len(content),
        client_address=LOCAL_CLIENT, client_name="localhost", helo=hostname,
        protocol=protocol, received_at=now,
        body_type="7BIT" if content.isascii() else "8BITMIME",
        smtputf8=smtputf8 or not all(address.isascii() for address in addresses))
    await spool.commit(draft, envelope)


__all__ = ["LOCAL_CLIENT", "enqueue", "route"]
