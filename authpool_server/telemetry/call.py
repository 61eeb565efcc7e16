"""What one RPC was about, gathered as it runs, for its access-log line, metrics and span.

The interceptor chain opens a `Call` for each RPC and hands it to its steps;
the auth step fills in the principal, and the service annotates the client,
subscription, decision and usage outcome through `annotate`. The span is made
from the record once the call has ended (`interceptors.tracing`).
Everything here is an identifier, never a secret or an email.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

__all__ = ["Call", "annotate", "close_call", "open_call"]


@dataclass(slots=True)
class Call:
    method: str
    principal: str = ""
    client_id: str = ""
    subscription_id: str = ""
    decision: str = ""
    outcome: str = ""  # of a reported provider call
    admitted: bool = False  # reached the service: not refused by auth or a rate limit
    # Kept by the chain's steps between their enter and exit:
    started: float = 0.0  # perf_counter() when the access step entered
    parent: Any = None  # the caller's trace context, when its metadata carried one
    crash: BaseException | None = None  # what ended it unexpectedly, for the span


_CURRENT: ContextVar[Call | None] = ContextVar("authpool_call", default=None)


def open_call(method: str) -> tuple[Call, object]:
    """Start the record of an RPC; pass the token to `close_call` when it ends."""
    call = Call(method)
    return call, _CURRENT.set(call)


def close_call(token: object) -> None:
    _CURRENT.reset(token)  # type: ignore[arg-type]


def annotate(**fields: str) -> None:
    """Record identifiers of the current RPC (client_id, subscription_id, decision, principal)."""
    call = _CURRENT.get()
    if call is not None:
        for name, value in fields.items():
            setattr(call, name, value)
