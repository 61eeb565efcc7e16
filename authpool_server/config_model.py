"""The base of every configuration model: camelCase JSON names, strict types, no unknown keys."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

__all__ = ["ConfigModel", "check_id"]

_ID_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")  # used with fullmatch: no trailing-newline loophole


class ConfigModel(BaseModel):
    # strict: a quoted number or "yes" for a boolean is a mistake in a config file.
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        strict=True,
    )


def check_id(value: str) -> str:
    """Ids (subscriptions, principals) are short, lower-case and safe in paths, logs and labels."""
    if not _ID_RE.fullmatch(value):
        raise ValueError("must be 1-64 characters of a-z, 0-9, '.', '_' or '-', starting with a letter or digit")
    return value
