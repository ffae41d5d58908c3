"""The documentation stays true: the configuration reference is the code's, every key in it."""

from __future__ import annotations

from pathlib import Path

from tayori.config.reference import SECTIONS, markdown
from tayori.config.schema import describe

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_configuration_reference_is_current() -> None:
    written = (DOCS / "configuration.md").read_text()
    assert written == markdown(), "run: tayori config-reference > docs/configuration.md"


def test_every_setting_has_a_meaning() -> None:
    for _title, _text, cls in SECTIONS:
        for key, kind, _default, doc in describe(cls):
            assert doc.strip() and kind, f"{cls.__name__}.{key} is undocumented"


def test_readme_names_the_two_commands() -> None:
    readme = (DOCS.parent / "README.md").read_text()
    head = readme[:1500]
    assert "scripts/run" in head and "scripts/test" in head
    ci = (DOCS.parent / ".ci" / "run").read_text()
    assert "scripts/test" in ci
