"""tayori.auth.arc against ValiMail's ARC test suites and Stalwart's ARC chains.

The suites (``../shared/testdata/arc``) run in process, each scenario's ``txt-records``
served by a :class:`StaticResolver` (a YAML block's line breaks are dropped: the suite's
DNS server publishes the key text, and a TXT record carries no line breaks), under the
rules of the suite's own harness (``testarc.py``, learnt from, not copied):

* validation: the verdict's ``cv`` must equal the test's ``cv`` case-insensitively. The
  three tests whose ``cv`` is empty are chains in which an ARC-Seal already says
  ``cv=fail``; the runner the suite was made with (dkimpy) prints nothing for them,
  meaning "the chain was terminated by an earlier sealer". RFC 8617 §5.2 calls that
  ``fail``, and so does :func:`validate`, recording the instance in
  ``fail_reported_at``; so ``""`` here means ``cv == fail`` with ``fail_reported_at``
  set, and ``Fail`` means ``fail`` without it: the mapping is checked both ways.
  The YAML repeats four test names in its "Arc Seal Fields" scenario; a YAML loader
  keeps the later of each, which gives the suite's count of 171 (as upstream's harness
  runs it); the four shadowed earlier tests run too, as extras.
* signing: the scenario's private key and selector, the test's ``srv-id`` (whose
  Authentication-Results fields, merged with :func:`collect_results`, make the AAR),
  ``sig-headers`` and fixed time ``t``; the chain status comes from :func:`validate`.
  Each produced field is compared as the harness compares it: all whitespace removed,
  then the ``;``-separated parts as a set, against AS, AMS and AAR. All three empty
  means no set may be added (the newest ARC-Seal says ``cv=fail``). Every sealed
  message must then validate as ``pass``, or as ``fail`` reported at the new set.

Stalwart's chains (DNS lines, a blank line, the message; LF turned into CRLF): 001 (a
Gmail chain) passes. 002 seals i=1 with ``ed25519-sha256``, which RFC 8617 does not
define (its only algorithm is rsa-sha256; Ed25519 for ARC was an expired draft), so
tayori fails it, as dkimpy does; with ``algorithms`` widened it passes, which shows the
refusal is the rule and not a defect.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from harness import SHARED, shared_data
from tayori.auth.arc import (
    ArcVerdict,
    ChainStatus,
    collect_results,
    seal,
    validate,
)
from tayori.auth.dkim_keys import SigningKey, load_signing_key
from tayori.auth.headers import parse_message
from tayori.testing.dnsstub import StaticResolver

T = TypeVar("T")
ARC = SHARED / "arc"
VALIDATION = ARC / "arc-draft-validation-tests.yml"
SIGNING = ARC / "arc-draft-sign-tests.yml"
VALIDATION_SIZE = 171
SIGNING_SIZE = 17
SHADOWED = "#shadowed"
Zone = dict[str, dict[str, list[str]]]


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, 10.0))


def crlf(text: str | bytes) -> bytes:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def suite_zone(records: dict[str, str]) -> Zone:
    return {name: {"TXT": [value.replace("\n", "").strip()]} for name, value in records.items()}


class _KeepDuplicates(yaml.SafeLoader):
    """A loader that keeps a repeated key as ``name#shadowed`` instead of dropping it."""


def _mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        while key in mapping:
            key = f"{key}{SHADOWED}"
        mapping[key] = loader.construct_object(value_node, deep=True)
    return mapping


_KeepDuplicates.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def scenarios(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open("rb") as stream:
        return list(yaml.load_all(stream, Loader=_KeepDuplicates))  # a SafeLoader


# --- validation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValidationCase:
    name: str
    message: bytes
    cv: str
    zone: Zone


def validation_cases() -> Iterator[ValidationCase]:
    for scenario in scenarios(VALIDATION):
        zone = suite_zone(scenario["txt-records"])
        for name, test in scenario["tests"].items():
            yield ValidationCase(name, crlf(test["message"]), test["cv"].strip().lower(), zone)


VALIDATION_CASES = list(validation_cases())


def suite_cv(verdict: ArcVerdict) -> str:
    """The verdict as the suite writes it: ``""`` for a chain a sealer ended."""
    if verdict.cv is ChainStatus.FAIL and verdict.fail_reported_at is not None:
        return ""
    return verdict.cv.value


def test_the_validation_suite_has_all_its_tests() -> None:
    shared_data("arc")
    counted = [case for case in VALIDATION_CASES if SHADOWED not in case.name]
    assert len(counted) == VALIDATION_SIZE
    assert len({case.name for case in VALIDATION_CASES}) == len(VALIDATION_CASES)
    expected = sorted(case.cv for case in counted)
    assert [expected.count(cv) for cv in ("pass", "fail", "none", "")] == [54, 109, 5, 3]
    assert len(VALIDATION_CASES) - len(counted) == 4


@pytest.mark.parametrize("case", VALIDATION_CASES, ids=lambda case: case.name)
def test_validation_suite(case: ValidationCase) -> None:
    verdict = run(validate(case.message, StaticResolver(case.zone)))
    assert suite_cv(verdict) == case.cv, verdict.reason
    if verdict.cv is ChainStatus.PASS:
        assert verdict.oldest_pass is not None
        assert [s.instance for s in verdict.sets] == list(range(1, verdict.instance + 1))


# --- signing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SigningCase:
    name: str
    message: bytes
    when: int
    headers: tuple[str, ...]
    authserv_id: str
    expected: dict[str, str]
    domain: str
    selector: str
    private_key: str
    zone: Zone


def signing_cases() -> Iterator[SigningCase]:
    for scenario in scenarios(SIGNING):
        for name, test in scenario["tests"].items():
            yield SigningCase(
                name, crlf(test["message"]), int(test["t"]),
                tuple(test["sig-headers"].split(":")), test["srv-id"],
                {"arc-seal": test["AS"], "arc-message-signature": test["AMS"],
                 "arc-authentication-results": test["AAR"]},
                scenario["domain"], scenario["sel"], scenario["privatekey"],
                suite_zone(scenario["txt-records"]))


SIGNING_CASES = list(signing_cases())


def comparable(value: str | bytes) -> set[str]:
    """The harness's comparison: whitespace removed, the ``;``-separated parts as a set."""
    text = value.decode("utf-8") if isinstance(value, bytes) else value
    return set("".join(text.split()).split(";"))


def suite_key(case: SigningCase, tmp_path: Path) -> SigningKey:
    path = tmp_path / "suite.pem"
    path.write_text(case.private_key)
    return load_signing_key(path, case.domain, case.selector)


def test_the_signing_suite_has_all_its_tests() -> None:
    shared_data("arc")
    assert len(SIGNING_CASES) == SIGNING_SIZE


@pytest.mark.parametrize("case", SIGNING_CASES, ids=lambda case: case.name)
def test_signing_suite(case: SigningCase, tmp_path: Path) -> None:
    resolver = StaticResolver(case.zone)
    chain = run(validate(case.message, resolver))
    arc_set = seal(case.message, suite_key(case, tmp_path), authserv_id=case.authserv_id,
                   results=collect_results(case.message, case.authserv_id), chain=chain,
                   now=case.when, headers=case.headers)
    if not any(value.strip() for value in case.expected.values()):
        assert arc_set == b""
        assert chain.seal_refusal is not None
        return
    made = {field.key: comparable(field.value)
            for field in parse_message(arc_set + b"\r\n").fields}
    assert made == {name: comparable(value) for name, value in case.expected.items()}
    sealed = run(validate(arc_set + case.message, resolver))
    if chain.cv is ChainStatus.FAIL:
        assert (sealed.cv, sealed.fail_reported_at) == (ChainStatus.FAIL, chain.instance + 1)
    else:
        assert (sealed.cv, sealed.instance) == (ChainStatus.PASS, chain.instance + 1)


# --- Stalwart's chains ------------------------------------------------------------------------


def stalwart(name: str) -> tuple[bytes, StaticResolver]:
    dns, _, message = (shared_data("arc") / name).read_bytes().partition(b"\n\n")
    records = dict(line.split(" ", 1) for line in dns.decode("ascii").splitlines())
    return crlf(message), StaticResolver({n: {"TXT": [v]} for n, v in records.items()})


def test_stalwart_001_a_gmail_chain_passes() -> None:
    message, resolver = stalwart("stalwart-arc-001.txt")
    verdict = run(validate(message, resolver))
    assert (verdict.cv, verdict.instance, verdict.oldest_pass) == (ChainStatus.PASS, 1, 0)
    (arc_set,) = verdict.sets
    assert (arc_set.seal_domain, arc_set.signature_domain) == ("google.com", "google.com")
    assert arc_set.authserv_id == "mx.google.com"


def test_stalwart_002_ed25519_is_refused_by_rule() -> None:
    message, resolver = stalwart("stalwart-arc-002.txt")
    verdict = run(validate(message, resolver))
    assert verdict.cv is ChainStatus.FAIL
    assert "a=ed25519-sha256" in verdict.reason
    widened = run(validate(message, resolver, algorithms=("rsa-sha256", "ed25519-sha256")))
    assert (widened.cv, widened.instance, widened.oldest_pass) == (ChainStatus.PASS, 2, 0)
    assert [s.seal_domain for s in widened.sets] == ["scamorza.org", "manchego.org"]
