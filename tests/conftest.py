"""Shared fixtures: a running tayori per test (``tayori``) or per module (``server``)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import Tayori


@pytest.fixture
def make_tayori(tmp_path: Path) -> Iterator[Callable[..., Tayori]]:
    """Start a tayori with config overrides: ``make_tayori(limits={...})``."""
    started: list[Tayori] = []

    def make(**options: Any) -> Tayori:
        server = Tayori(tmp_path / f"t{len(started)}", **options)
        started.append(server)
        return server.start()

    yield make
    for server in started:
        if server.process is not None:
            server.stop()


@pytest.fixture
def tayori(make_tayori: Callable[..., Tayori]) -> Tayori:
    return make_tayori()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tayori]:
    """One tayori shared by a module's tests (small limits so the error paths are cheap)."""
    instance = Tayori(tmp_path_factory.mktemp("tayori"),
                      limits={"max_message_size": 1024 * 1024, "max_recipients": 5,
                              "max_unknown_commands": 3})
    instance.start()
    yield instance
    instance.stop()
