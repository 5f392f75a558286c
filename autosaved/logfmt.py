"""Log lines for people (``key=value`` after a short message, the default) or for log shippers
(``log_format = "json"``: one JSON object per line, ``time``, ``level``, ``event``, then the fields).

The daemon's messages are written ``event words key=value key=value ...``; :func:`split_message` turns one
into the event and its fields (a value runs until the next ``key=``, so ``error=No space left`` stays
whole), a pure function tested on its own.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from typing import Any

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")


def _value(text: str) -> Any:
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if re.fullmatch(r"-?\d+\.\d+", text):
        return float(text)
    return text


def split_message(message: str) -> tuple[str, dict[str, Any]]:
    """``"saved job=a version=3 error=disk full"`` → ``("saved", {"job": "a", "version": 3, "error": "disk
    full"})``. Words before the first ``key=`` are the event; a message with none is all event."""
    words = message.split(" ")
    event: list[str] = []
    fields: dict[str, Any] = {}
    key: str | None = None
    parts: list[str] = []
    for word in words:
        if _KEY.match(word):
            if key is not None:
                fields[key] = _value(" ".join(parts))
            key, _, first = word.partition("=")
            parts = [first]
        elif key is None:
            event.append(word)
        else:
            parts.append(word)
    if key is not None:
        fields[key] = _value(" ".join(parts))
    return " ".join(event).rstrip(":;, ") or message, fields


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (UTC, ISO 8601), ``level``, ``event``, ``logger``, the fields."""

    def format(self, record: logging.LogRecord) -> str:
        event, fields = split_message(record.getMessage())
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "event": event, "logger": record.name,
        }
        for key, value in fields.items():
            doc.setdefault(key, value)  # a field named like a base key keeps the base key's meaning
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def formatter(kind: str) -> logging.Formatter:
    if kind == "json":
        return JsonFormatter()
    return logging.Formatter(TEXT_FORMAT)
