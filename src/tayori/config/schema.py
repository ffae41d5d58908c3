"""Declarative settings: one dataclass field per config key, with its kind and meaning.

Takes: frozen dataclasses whose fields are made with :func:`setting`.
Promises: :func:`build` turns a TOML table into such a dataclass, converting each value
by its kind (size, duration, enum, address...) and raising :class:`ConfigError` that
names the file, the dotted key, what is wrong and what is allowed. Unknown keys are
errors (a typo must not silently fall back to a default). :func:`describe` walks the same
fields, so the configuration reference in docs/ is generated from, and tested against,
the code that reads the file.
Failure policy: every bad value raises ConfigError; nothing is guessed.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass, fields
from typing import Any, TypeVar

T = TypeVar("T")

_SIZE = re.compile(r"(\d+)\s*([KMG]?)B?\Z", re.IGNORECASE)
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\Z")
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


class ConfigError(ValueError):
    """A config problem: ``file``, dotted ``key``, what is ``wrong``, what is ``allowed``."""

    def __init__(self, file: str, key: str, wrong: str, allowed: str = "") -> None:
        self.file, self.key, self.wrong, self.allowed = file, key, wrong, allowed
        text = f"{file}: {key}: {wrong}" if key else f"{file}: {wrong}"
        super().__init__(text + (f"; allowed: {allowed}" if allowed else ""))


@dataclass(frozen=True, slots=True)
class Kind:
    """How a key's TOML value is checked and converted, and how the docs name it."""

    name: str
    allowed: str
    convert: Callable[[Any], Any]


def setting(default: Any, kind: Kind, doc: str, shown_default: str | None = None) -> Any:
    """A config key: default value, kind, one-paragraph meaning."""
    meta = {"kind": kind, "doc": doc, "shown_default": shown_default}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def required(kind: Kind, doc: str) -> Any:
    return dataclasses.field(metadata={"kind": kind, "doc": doc, "shown_default": "(required)"})


class BadValue(ValueError):
    pass


def _expect(value: Any, types: type | tuple[type, ...], what: str) -> Any:
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise BadValue(f"{value!r} is not {what}")
    if not isinstance(value, types):
        raise BadValue(f"{value!r} is not {what}")
    return value


def _string(value: Any) -> str:
    return str(_expect(value, str, "a string"))


def _boolean(value: Any) -> bool:
    return bool(_expect(value, bool, "true or false"))


def _integer(value: Any) -> int:
    number = int(_expect(value, int, "an integer"))
    if number < 0:
        raise BadValue(f"{number} is negative")
    return number


def _size(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return _integer(value)
    match = _SIZE.match(_string(value).strip())
    if not match:
        raise BadValue(f"{value!r} is not a size")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def _duration(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0 <= value < float("inf"):
            raise BadValue(f"{value} is not a duration")
        return float(value)
    match = _DURATION.match(_string(value).strip())
    if not match:
        raise BadValue(f"{value!r} is not a duration")
    return float(match.group(1)) * _SECONDS[match.group(2)]


def _string_list(value: Any) -> list[str]:
    items = _expect(value, list, "a list of strings")
    return [_string(item) for item in items]


def _duration_list(value: Any) -> tuple[float, ...]:
    items = _expect(value, list, "a list of durations")
    if not items:
        raise BadValue("the list is empty")
    return tuple(_duration(item) for item in items)


def _rate(value: Any) -> tuple[int, float] | None:
    """``"100/1h"``: at most 100 in any hour (a token bucket); ``""``: no limit."""
    text = _string(value).strip()
    if not text:
        return None
    count, sep, per = text.partition("/")
    if not sep or not count.strip().isdigit() or int(count) < 1:
        raise BadValue(f"{value!r} is not COUNT/DURATION")
    seconds = _duration(per.strip())
    if seconds <= 0:
        raise BadValue(f"{value!r}: the duration must be positive")
    return int(count), seconds


STRING = Kind("string", "a string", _string)
BOOL = Kind("boolean", "true or false", _boolean)
INT = Kind("integer", "a whole number >= 0", _integer)
SIZE = Kind("size", 'bytes as a number, or a string with K, M or G (e.g. "50M")', _size)
DURATION = Kind("duration", 'seconds as a number, or a string with ms, s, m, h or d (e.g. "5m")',
                _duration)
DURATION_LIST = Kind("list of durations", 'a non-empty list of durations, e.g. ["5m", "1h"]',
                     _duration_list)
STRING_LIST = Kind("list of strings", "a list of strings", _string_list)
PATH = Kind("path", "a file or directory path", _string)
RATE = Kind("rate", '"COUNT/DURATION", e.g. "100/1h"; "" for no limit', _rate)


def enum(*choices: str) -> Kind:
    allowed = " | ".join(choices)

    def convert(value: Any) -> str:
        text = _string(value)
        if text not in choices:
            raise BadValue(f"{text!r} is not one of the choices")
        return text

    return Kind(f"one of {allowed}", allowed, convert)


def checked(base: Kind, name: str, allowed: str, check: Callable[[Any], Any]) -> Kind:
    """A kind whose converted value is further checked (and possibly transformed)."""

    def convert(value: Any) -> Any:
        return check(base.convert(value))

    return Kind(name, allowed, convert)


def build(cls: type[T], table: Any, file: str, prefix: str) -> T:
    """Make ``cls`` from a TOML table; errors name ``prefix.key``."""
    return cls(**convert(cls, table, file, prefix))


def convert(cls: type[Any], table: Any, file: str, prefix: str) -> dict[str, Any]:
    """The converted values of the settings of ``cls`` found in ``table``."""
    if not isinstance(table, dict):
        raise ConfigError(file, prefix, "must be a table", "a TOML table of keys")
    known = {f.name: f for f in fields(cls) if "kind" in f.metadata}
    for key in table:
        if key not in known:
            raise ConfigError(file, _dotted(prefix, key), "unknown key",
                              ", ".join(sorted(known)) or "no keys")
    values: dict[str, Any] = {}
    for name, spec in known.items():
        kind: Kind = spec.metadata["kind"]
        if name not in table:
            if spec.default is MISSING and spec.default_factory is MISSING:
                raise ConfigError(file, _dotted(prefix, name), "is required", kind.allowed)
            continue
        try:
            values[name] = kind.convert(table[name])
        except BadValue as exc:
            raise ConfigError(file, _dotted(prefix, name), str(exc), kind.allowed) from None
    return values


def describe(cls: type[Any]) -> Iterator[tuple[str, str, str, str]]:
    """(key, kind, default as shown, meaning) for each setting of ``cls``."""
    for spec in fields(cls):
        kind = spec.metadata.get("kind")
        if kind is None:
            continue
        shown = spec.metadata.get("shown_default")
        if shown is None:
            default = spec.default if spec.default is not MISSING else (
                spec.default_factory() if spec.default_factory is not MISSING else "")
            shown = _show(default)
        yield spec.name, kind.name, shown, spec.metadata["doc"]


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def _dotted(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key
