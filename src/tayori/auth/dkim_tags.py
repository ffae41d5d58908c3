"""Tag=value lists: reading them (DKIM-Signature, key records, ARC headers) and writing them.

Takes: the raw value of a header field (folding included) or a DNS TXT record, as bytes;
for writing, the tags in order and a :class:`Layout`.
Promises: :func:`parse_tag_list` returns the tags as an ordered ``dict`` of name to value
(UTF-8 text, folding CRLFs removed, surrounding whitespace stripped, inner whitespace
kept: :func:`compact` removes it for base64 values). :func:`strip_tag_value` blanks one
tag's value, surrounding whitespace included, byte for byte elsewhere: this is how the
``b=`` of the signature being checked is left out of its own hash. :func:`number_value`
and :func:`base64_value` read a numeric or base64 tag, for DKIM and ARC alike.
:func:`fold_field` lays a signature field out on lines shorter than the layout's width,
breaking only where folding whitespace is allowed, with ``b=`` on lines of its own.
Failure policy: a malformed list (a tag name that is not ``ALPHA *(ALPHA / DIGIT / "_")``,
a tag without ``=``, a duplicate tag, a control character or a bare CR/LF in a value,
invalid UTF-8) raises :class:`TagListError`; empty tag-specs (``;;``, a trailing ``;``)
are tolerated, unless ``strict`` (RFC 6376 §3.2's grammar: one trailing ``;`` only, as
ARC validators read it). :func:`number_value` and :func:`base64_value` raise the caller's
own ``error`` (DKIM's permerror, ARC's broken chain) with the reason.
Config keys: none.
Standards: RFC 6376 §3.2 (tag=value lists), §3.5 (``b=`` blanked for hashing); RFC 8616
(UTF-8 in tag values); RFC 8617 §4.1 (ARC uses the same lists).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

_TAG_NAME = re.compile(rb"[A-Za-z][A-Za-z0-9_]*\Z")
# tag-value: VALCHARs (and UTF-8 octets) separated by folding whitespace
_TAG_VALUE = re.compile(rb"(?:[\x21-\x3a\x3c-\x7e\x80-\xff]|[ \t]|\r\n[ \t])*\Z")
_FWS = b" \t\r\n"
_WHITESPACE = re.compile(r"[ \t\r\n]+")


class TagListError(ValueError):
    """A tag=value list that does not follow RFC 6376 §3.2."""


@dataclass(frozen=True, slots=True)
class _Spec:
    """One tag-spec: its name, and where its value (with surrounding FWS) lies."""

    name: bytes
    value_start: int  # just after the "="
    end: int  # the ";" ending the spec, or the end of the list


def _specs(data: bytes, strict: bool = False) -> Iterator[_Spec]:
    start = 0
    while start <= len(data):
        end = data.find(b";", start)
        end = len(data) if end < 0 else end
        spec = data[start:end]
        if spec.strip(_FWS):
            equals = spec.find(b"=")
            if equals < 0:
                raise TagListError(f"tag without '=': {_show(spec)}")
            name = spec[:equals].strip(_FWS)
            if not _TAG_NAME.match(name):
                raise TagListError(f"malformed tag name: {_show(name)}")
            yield _Spec(name, start + equals + 1, end)
        elif strict and end < len(data):
            raise TagListError("empty tag-spec (';;' or a leading ';')")
        start = end + 1


def parse_tag_list(data: bytes, *, strict: bool = False) -> dict[str, str]:
    """The tags of ``data`` in order of appearance; see the module docstring."""
    tags: dict[str, str] = {}
    for spec in _specs(data, strict):
        name = spec.name.decode("ascii")
        if name in tags:
            raise TagListError(f"duplicate tag {name}=")
        raw = data[spec.value_start : spec.end]
        if not _TAG_VALUE.match(raw):
            raise TagListError(f"malformed value of {name}=")
        try:
            value = raw.replace(b"\r\n", b"").strip(b" \t").decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TagListError(f"value of {name}= is not UTF-8") from exc
        tags[name] = value
    return tags


def strip_tag_value(data: bytes, name: str) -> bytes:
    """``data`` with the value of tag ``name`` (and the whitespace around it) removed."""
    wanted = name.encode("ascii")
    for spec in _specs(data):
        if spec.name == wanted:
            return data[: spec.value_start] + data[spec.end :]
    return data


def compact(value: str) -> str:
    """``value`` without any whitespace (for base64 values such as ``b=``, ``p=``)."""
    return _WHITESPACE.sub("", value)


def split_list(value: str, separator: str = ":") -> list[str]:
    """A colon-separated tag value (``h=``, ``q=``, key ``h=``/``s=``/``t=``), stripped."""
    return [item.strip(" \t") for item in value.split(separator)]


def number_value(tags: dict[str, str], name: str, digits: re.Pattern[str],
                 error: Callable[[str], Exception]) -> int | None:
    """The number tag ``name`` holds, None without it; ``error(reason)`` is raised when its
    value does not match ``digits``."""
    value = tags.get(name)
    if value is None:
        return None
    if not digits.match(value):
        raise error(f"malformed {name}={value}")
    return int(value)


def base64_value(tags: dict[str, str], name: str, error: Callable[[str], Exception]) -> bytes:
    """The data tag ``name`` holds in base64 (whitespace removed, :func:`compact`);
    ``error(reason)`` is raised when it is not base64, or empty."""
    try:
        data = base64.b64decode(compact(tags[name]), validate=True)
    except binascii.Error as exc:
        raise error(f"{name}= is not base64") from exc
    if not data:
        raise error(f"{name}= is empty")
    return data


def _show(data: bytes) -> str:
    return repr(data[:40].decode("ascii", "replace"))


# --- writing -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Layout:
    """How a signature field is laid out. The signature covers the field as written.

    ``width``: a line of tags stays shorter than this, a line of ``b=`` fills it.
    ``list_separator``: between the names of ``h=``, ``":"`` or ``" : "`` (as in the
    RFC 6376 and RFC 8463 examples). ``query_tag``: write the default ``q=dns/txt``.
    """

    width: int = 76
    list_separator: str = ":"
    query_tag: bool = False

    def __post_init__(self) -> None:
        if self.width < 20:
            raise ValueError("a folding width below 20 leaves no room for tags")
        if self.list_separator not in (":", " : "):
            raise ValueError("the list separator is ':' or ' : '")


@dataclass(frozen=True, slots=True)
class _Word:
    text: str
    spaced: bool  # a space separates it from the previous word on the same line


TagValue = str | Sequence[str]


def _list_words(name: str, items: Sequence[str], separator: str) -> list[_Word]:
    """A list value (``h=a:b:c``) as words, so a line may break between its items."""
    if not items:
        raise ValueError(f"empty list for {name}=")
    if separator == ":":  # "h=a:" "b:" "c;": no space between, FWS where a line breaks
        texts = [f"{name}={items[0]}", *items[1:]]
        ends = [":"] * (len(texts) - 1) + [";"]
        return [_Word(text + end, index == 0)
                for index, (text, end) in enumerate(zip(texts, ends, strict=True))]
    words = [_Word(f"{name}={items[0]}", True)]
    for item in items[1:]:
        words += [_Word(":", True), _Word(item, True)]
    return [*words[:-1], _Word(words[-1].text + ";", True)]


def fold_field(
    field_name: str, tags: Sequence[tuple[str, TagValue]], b_value: str, layout: Layout
) -> bytes:
    """The whole field ``field_name: tag=value; ...`` ending with ``b=`` and CRLF.

    A tag whose value is a sequence is written as a list (``h=``), breakable between
    items. ``b_value`` empty gives the form that is hashed when signing.
    """
    words: list[_Word] = []
    for name, value in tags:
        if isinstance(value, str):
            words.append(_Word(f"{name}={value};", True))
        else:
            words.extend(_list_words(name, value, layout.list_separator))
    lines = [field_name + ":"]
    for word in words:
        separator = " " if word.spaced else ""
        if len(lines[-1]) + len(separator) + len(word.text) < layout.width:
            lines[-1] += separator + word.text
        else:
            lines.append(" " + word.text)
    lines.extend(_b_lines(b_value, layout.width))
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def _b_lines(b_value: str, width: int) -> list[str]:
    first = width - len(" b=")
    lines = [" b=" + b_value[:first]]
    rest = b_value[first:]
    lines.extend(" " + rest[i : i + width - 1] for i in range(0, len(rest), width - 1))
    return lines


__all__ = [
    "Layout",
    "TagListError",
    "TagValue",
    "base64_value",
    "compact",
    "fold_field",
    "number_value",
    "parse_tag_list",
    "split_list",
    "strip_tag_value",
]
