"""What the operator commands print: rich text for people, JSON with stable keys for scripts.

JSON keys are the proto's field names (`subscription_id`, `weekly_usage_micros`),
so a script written against `--json` reads like one written against grpcurl,
except that 64-bit integers are JSON numbers (grpcurl prints them as strings)
and enum values are short lower-case names (`"limited"`, `"lease_granted"`),
the same words the admin port's /debug/auth-pool uses.
"""

from __future__ import annotations

import json
import os
import sys
from typing import IO, Any

from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.text import Text

from authpool_server.domain import MICROS_PER_UNIT

__all__ = ["Output", "bar", "clock_time", "duration", "enum_name", "money", "timestamp"]

# Wide enough for the status table when stdout is a pipe or a file (rich assumes 80 columns there).
PIPE_WIDTH = 160


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich exits with 1 here; let the runner end it like every other command in a pipeline (141).
        self.quiet = True
        raise BrokenPipeError


class Output:
    """stdout for results (rich or JSON), stderr for everything else."""

    def __init__(self, *, json_mode: bool, stdout: IO[str] | None = None, stderr: IO[str] | None = None) -> None:
        self.json_mode = json_mode
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        piped = not self.stdout.isatty() and "COLUMNS" not in os.environ
        self.console = _Console(file=self.stdout, highlight=False, width=PIPE_WIDTH if piped else None)

    def json(self, document: Any, *, lines: bool = False) -> None:
        """One document, indented; or with `lines`, one compact line (JSON Lines, for streams)."""
        self.stdout.write(json.dumps(document, indent=None if lines else 2) + "\n")
        self.stdout.flush()

    def print(self, *renderables: Any) -> None:
        """Tables and the like, laid out to the terminal's width."""
        # No console markup: ids, reasons and errors from the server are printed as they are.
        self.console.print(*renderables, markup=False)

    def line(self, text: str | Text) -> None:
        """One line, never wrapped, so that `grep` and `cut` see whole lines; flushed at once."""
        self.console.print(text, markup=False, soft_wrap=True)
        self.stdout.flush()

    def note(self, message: str) -> None:
        """One line on stderr, never wrapped (a script may grep it), whatever the mode."""
        self.stderr.write(message + "\n")
        self.stderr.flush()


def enum_name(enum: Any, value: int) -> str:
    """`SUBSCRIPTION_STATUS_LIMITED` -> `limited`; an unknown number (a newer server) as `unknown_<n>`."""
    try:
        name: str = enum.Name(value)
    except ValueError:
        return f"unknown_{value}"
    # Every enum of the API has a `<PREFIX>_UNSPECIFIED = 0` (buf style), which names its prefix.
    prefix = enum.Name(0).removesuffix("UNSPECIFIED")
    return name.removeprefix(prefix).lower()


def timestamp(stamp: Timestamp) -> str | None:
    """RFC 3339 in UTC, or None when unset."""
    return stamp.ToJsonString() if stamp.seconds or stamp.nanos else None


def clock_time(stamp: Timestamp) -> str:
    """For people: `2025-11-24 16:00:05Z`, whole seconds; empty when unset."""
    if not (stamp.seconds or stamp.nanos):
        return ""
    return stamp.ToDatetime().strftime("%Y-%m-%d %H:%M:%SZ")


def money(micros: int) -> str:
    return f"{micros / MICROS_PER_UNIT:,.2f}"


def duration(seconds: float) -> str:
    """`2d 3h`, `3h 10m`, `4m 5s`, `12s`: two units are plenty at a glance."""
    whole = int(seconds)
    days, rest = divmod(whole, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def bar(fraction: float, *, width: int = 16, style: str = "") -> Text:
    """A usage bar of block characters, readable without colour (in a pipe, a log, a test)."""
    clamped = min(max(fraction, 0.0), 1.0)
    filled = round(clamped * width)
    return Text.assemble(("█" * filled, style), ("░" * (width - filled), "dim"))
