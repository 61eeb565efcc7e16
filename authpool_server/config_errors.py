"""The configuration's problems in an operator's terms: ``<field path>: <message>``, with the JSON names.

pydantic reports a field by its Python name and its errors in its own
words; an operator edits the JSON file, so each error is turned into the
path as written there (camelCase, indexes, a mistyped key as typed, with
the nearest known name suggested) and a short sentence.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
from typing import Any

from authpool_server.config_model import ConfigModel

__all__ = ["message", "problem", "show"]

_KIND = {
    "bool_type": "true or false",
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "list_type": "an array",
    "tuple_type": "an array",
}


def _models(base: type[ConfigModel]) -> list[type[ConfigModel]]:
    found = []
    for model in base.__subclasses__():
        found += [model, *_models(model)]
    return found


@functools.cache
def _aliases() -> dict[str, str]:
    # Asked first while a document is validated, when every model (config, config_server) is defined.
    return {name: info.alias or name for m in _models(ConfigModel) for name, info in m.model_fields.items()}


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def _path(loc: tuple[int | str, ...], *, unknown_last: bool = False) -> str:
    # pydantic names a defaulted field by its Python name; the operator knows the JSON one.
    aliases = _aliases()
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        keep = unknown_last and i == len(loc) - 1  # a typo must be shown as typed
        name = part if keep else aliases.get(part, part)
        if keep and not _PLAIN_KEY.fullmatch(name):
            out += f"[{json.dumps(name)}]"  # "", "a.b" or " x" would read as another path
            continue
        out += f".{name}" if out else name
    return out or "<root>"


def problem(error: Any) -> str:
    """One pydantic error as ``<field path>: <message>``, with the JSON names."""
    unknown = error["type"] == "extra_forbidden"
    return f"{_path(error['loc'], unknown_last=unknown)}: {message(error)}"


def _bound(value: object) -> object:
    # Float fields report their bound as 0.0; the file said 0.
    return int(value) if isinstance(value, float) and value.is_integer() else value


def show(value: object) -> str:
    """A value as the operator wrote it when it is a JSON scalar, else its type's name."""
    if value is None or isinstance(value, str | int | float | bool):
        return json.dumps(value)
    return type(value).__name__


def message(error: Any) -> str:
    """One pydantic error as a short sentence in JSON terms."""
    kind, ctx = error["type"], error.get("ctx", {})
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", error["msg"]))
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        name = str(error["loc"][-1]) if error["loc"] else ""
        close = difflib.get_close_matches(name, sorted(set(_aliases().values())), n=1)
        return "unknown field" + (f"; did you mean {close[0]!r}?" if close else "")
    if kind == "greater_than":
        return f"must be greater than {_bound(ctx['gt'])}"
    if kind == "greater_than_equal":
        return f"must be at least {_bound(ctx['ge'])}"
    if kind == "less_than_equal":
        return f"must be at most {_bound(ctx['le'])}"
    if kind == "less_than":
        return f"must be less than {_bound(ctx['lt'])}"
    if kind in ("too_short", "string_too_short"):
        return "must not be empty"
    if kind == "literal_error":
        return f"must be {ctx['expected']} (got {show(error['input'])})"
    if kind in _KIND:
        return f"must be {_KIND[kind]} (got {show(error['input'])})"
    return str(error["msg"])
