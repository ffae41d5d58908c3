"""The operator's mail log: one line per event, each with its session and queue id.

Takes: events from the stages (``connect``, ``helo``, ``mail``, ``rcpt``, ``reject``,
``queued``, ``disconnect``, ``tls``, ``error``, service events) with key=value fields.
Promises: a fixed vocabulary of events, one line each, written as readable text
(``2026-11-28T11:00:00.123Z info connect session=S1 client=[192.0.2.1]:4711``) or as
one JSON object per line; values that could break a line are escaped, so a client
cannot forge log lines. Goes to stderr or a file (``[log]``), at a configured level.
Developers' debug tracing stays in the standard ``logging`` tree under ``tayori.debug``.
Failure policy: logging never raises into the caller (``logging`` handles write errors).
Config keys: ``log.level``, ``log.format``, ``log.file``.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

_LOGGER = logging.getLogger("tayori.mail")
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def _clean(value: object) -> str:
    text = str(value)
    if text.isprintable() and " " not in text and '"' not in text:
        return text
    return json.dumps(text, ensure_ascii=not text.isprintable())


def _timestamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + \
        f".{int(created * 1000) % 1000:03d}Z"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        parts = [_timestamp(record.created), record.levelname.lower(), record.getMessage()]
        parts += [f"{key}={_clean(value)}" for key, value in fields.items() if value is not None]
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        out = {"time": _timestamp(record.created), "level": record.levelname.lower(),
               "event": record.getMessage()}
        out.update({k: v for k, v in fields.items() if v is not None})
        return json.dumps(out, ensure_ascii=False, default=str)


def configure(level: str, fmt: str, file: str) -> None:
    """(Re)configure the mail log; safe to call again on reload."""
    handler: logging.Handler = logging.FileHandler(file) if file else logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("tayori")
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(_LEVELS[level])
    root.propagate = False
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False


def event(name: str, level: int = logging.INFO, /, **fields: Any) -> None:
    """Log one event: ``event("queued", session=s, queue_id=q, size=n)``."""
    if _LOGGER.isEnabledFor(level):
        _LOGGER.log(level, name, extra={"fields": fields})


def warning(name: str, /, **fields: Any) -> None:
    event(name, logging.WARNING, **fields)


def error(name: str, /, **fields: Any) -> None:
    event(name, logging.ERROR, **fields)
