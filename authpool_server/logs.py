"""Logging set-up: the guide's JSON shape when LOG_FORMAT=json, text otherwise.

Each JSON line carries `timestamp`, `level`, `module`, `message` and
`context` (whatever was passed as `extra={"context": {...}}`). Callers must
never put secrets into messages or context; as a second line of defence,
anything shaped like an email address is masked in every line written.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

__all__ = ["JsonFormatter", "TextFormatter", "configure_logging", "mask_emails"]

_EMAIL = re.compile(r"([A-Za-z0-9._%+-])[A-Za-z0-9._%+-]*@([A-Za-z0-9.-]+\.[A-Za-z]{2,})")


def mask_emails(text: str) -> str:
    """`team+sub1@company.com` -> `t***@company.com` wherever it appears in `text`."""
    return _EMAIL.sub(r"\1***@\2", text) if "@" in text else text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "timestamp": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "module": record.name,
            "message": record.getMessage(),
            "context": getattr(record, "context", {}),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return mask_emails(json.dumps(entry, default=str))


class TextFormatter(logging.Formatter):
    """One line for people: time, level, module, message, then the context as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = getattr(record, "context", None)
        if context:
            line += " " + " ".join(f"{key}={value}" for key, value in context.items())
        return mask_emails(line)


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Send the server's logs to stderr at `level`, as JSON lines when `fmt` is "json"."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
