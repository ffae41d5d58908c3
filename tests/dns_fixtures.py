"""The DNS fixtures of the unit tests that ask a real DNS server on loopback.

``stub, resolver = stub_and_resolver(ZONE)`` at a test module's top level gives it two
fixtures: ``stub``, a :class:`~tayori.testing.dnsstub.DnsStub` serving ``ZONE`` (its
query counts tell what was asked), and ``resolver``, tayori's
:class:`~tayori.dns.DnsPythonResolver` asking that stub (2 s timeout).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tayori.dns import DnsPythonResolver
from tayori.testing.dnsstub import DnsStub, Zone


def stub_and_resolver(zone: Zone) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The ``stub`` and ``resolver`` fixtures for ``zone``."""

    @pytest.fixture
    def stub() -> Iterator[DnsStub]:
        with DnsStub(zone) as server:
            yield server

    @pytest.fixture
    def resolver(stub: DnsStub) -> DnsPythonResolver:
        return DnsPythonResolver([stub.address], timeout=2.0)

    return stub, resolver
