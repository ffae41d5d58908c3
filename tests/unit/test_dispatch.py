"""deliver.dispatch: next hops and failures that must defer rather than bounce."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from tayori.config.model import from_document
from tayori.deliver.dispatch import Delivery, Dispatcher, Identity, Result
from tayori.dns import NxDomain
from tayori.queue.store import Claim, QueuedMessage


class NoSuchDomain:
    """A resolver for which nothing exists."""

    async def mx(self, domain: str) -> list[Any]:
        raise NxDomain(domain)

    async def addresses(self, host: str, family: int) -> list[str]:
        raise NxDomain(host)


def test_relay_host_that_does_not_resolve_defers(tmp_path: Path) -> None:
    """NXDOMAIN for the smarthost is our configuration's problem (or DNS's), not the
    recipient's: a temporary failure, never a bounce of everything routed through it."""
    cfg = from_document({
        "hostname": "mx.example", "listen": [{"address": "127.0.0.1:2525"}],
        "actions": {"smart": {"deliver": "relay", "host": "smtp.provider.example:587"}},
        "match": [{"to": "any", "from": "authenticated", "action": "smart"}]}, "t.toml", "/")
    body = tmp_path / "Q"
    body.write_bytes(b"Subject: x\r\n\r\nhi\r\n")
    message = QueuedMessage("Q", "a@x.example", 10, "7BIT", False, None, None, time.time(),
                            "127.0.0.1", "h", "ESMTP")
    claim = Claim(message, 0, "b@y.example", None, None, "smart", 0, False, False, None, None,
                  None)

    async def main() -> list[Result]:
        dispatcher = Dispatcher(cfg, NoSuchDomain(), Identity.of(cfg))  # type: ignore[arg-type]
        return await dispatcher.deliver(Delivery(message, str(body), "smart",
                                                 cfg.actions["smart"], "smtp.provider.example:587",
                                                 (claim,)))

    [result] = asyncio.run(main())
    assert result.reply.code == 451 and "smtp.provider.example" in result.reply.text
