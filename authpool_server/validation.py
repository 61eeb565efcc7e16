"""Input checks for every request field, before anything is decided.

Each check names the field it rejects (AIP-193 `BadRequest` paths) so a
caller can fix its request; a request that fails any check changes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Container, Mapping, Sequence

from authpool_server.errors import FieldViolation, InvalidArgument

__all__ = [
    "MAX_COST_MICROS",
    "MAX_FILTER_ENTRIES",
    "MAX_LABELS",
    "Violations",
]

MAX_LABELS = 16
# One provider request costing more than a million units is a bug upstream.
MAX_COST_MICROS = 10**12
MAX_TOKENS = 10**9
# Values in one of a WatchEvents request's filters (types, subscription ids, client ids).
MAX_FILTER_ENTRIES = 100
_NANOS_PER_SECOND = 1_000_000_000
_ID = re.compile(r"[A-Za-z0-9._:@/-]{1,128}")
_LABEL_KEY = re.compile(r"[A-Za-z0-9._/-]{1,63}")
_TYPE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def _printable(value: str) -> bool:
    return value.isprintable()


class Violations:
    """Collects every problem with a request, then raises them together."""

    def __init__(self) -> None:
        self._found: list[FieldViolation] = []

    def add(self, field: str, problem: str) -> None:
        self._found.append((field, problem))

    def identifier(self, field: str, value: str, *, required: bool = True) -> None:
        if not value:
            if required:
                self.add(field, "is required")
            return
        if not _ID.fullmatch(value):
            self.add(field, "must be 1-128 characters from A-Z a-z 0-9 . _ : @ / -")

    def text(self, field: str, value: str, *, max_length: int, required: bool = False) -> None:
        if not value:
            if required:
                self.add(field, "is required")
            return
        if len(value) > max_length:
            self.add(field, f"must be at most {max_length} characters, got {len(value)}")
        elif not _printable(value):
            self.add(field, "must not contain control characters")

    def subscription_type(self, field: str, value: str) -> None:
        if value and not _TYPE.fullmatch(value):
            self.add(field, "must be a subscription type such as 'claude-pro' (lower case, digits, . _ -)")

    def labels(self, field: str, labels: Mapping[str, str]) -> None:
        if len(labels) > MAX_LABELS:
            self.add(field, f"must have at most {MAX_LABELS} entries, got {len(labels)}")
            return
        for key, value in labels.items():
            if not _LABEL_KEY.fullmatch(key):
                self.add(f"{field}[{key[:63]!r}]", "key must be 1-63 characters from A-Z a-z 0-9 . _ / -")
            else:
                self.text(f"{field}[{key!r}]", value, max_length=256)

    def fencing_token(self, field: str, value: int) -> None:
        if value <= 0:
            self.add(field, "is required: the lease's fencing token, a positive number")

    def amount(self, field: str, value: int, *, maximum: int) -> None:
        if value < 0:
            self.add(field, f"must not be negative, got {value}")
        elif value > maximum:
            self.add(field, f"must be at most {maximum}, got {value}")

    def enum_value(self, field: str, value: int, known: Container[int], *, kind: str) -> None:
        if value == 0:
            self.add(field, f"must not be the UNSPECIFIED {kind} (0)")
        elif value not in known:
            self.add(field, f"unknown {kind} {value}")

    def entries(self, field: str, values: Sequence[object], *, maximum: int) -> bool:
        """At most `maximum` values in a repeated field; False (and a violation) if more."""
        if len(values) > maximum:
            self.add(field, f"must have at most {maximum} entries, got {len(values)}")
            return False
        return True

    def identifiers(self, field: str, values: Sequence[str], *, maximum: int) -> None:
        if self.entries(field, values, maximum=maximum):
            for index, value in enumerate(values):
                self.identifier(f"{field}[{index}]", value)

    def duration(self, field: str, seconds: int, nanos: int, *, minimum: float, maximum: float) -> float | None:
        """A `google.protobuf.Duration` between `minimum` and `maximum` seconds, in seconds; None if not."""
        if not -_NANOS_PER_SECOND < nanos < _NANOS_PER_SECOND or (seconds < 0 < nanos) or (nanos < 0 < seconds):
            self.add(field, "is not a valid duration (nanos out of range or of another sign than seconds)")
            return None
        value = (seconds * _NANOS_PER_SECOND + nanos) / _NANOS_PER_SECOND
        if not minimum <= value <= maximum:
            self.add(field, f"must be between {minimum:g} s and {maximum:g} s, got {value:g} s")
            return None
        return value

    def raise_if_any(self) -> None:
        if self._found:
            raise InvalidArgument(self._found)
