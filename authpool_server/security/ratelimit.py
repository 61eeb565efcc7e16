"""Per-principal token buckets.

Each principal has a bucket of `burst` tokens refilled at `rate` per second;
a call takes one token or is refused with the time until one is available,
which becomes the `RetryInfo` delay. Buckets exist only for principals that
called, and there is one per principal name, so memory is bounded by the
configured principals (plus `anonymous` when auth is off).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = ["Bucket", "RateLimiter"]


@dataclass(frozen=True, slots=True)
class Bucket:
    rate: float  # tokens per second
    burst: int


class _State:
    __slots__ = ("tokens", "updated")

    def __init__(self, tokens: float, updated: float) -> None:
        self.tokens = tokens
        self.updated = updated


class RateLimiter:
    def __init__(
        self,
        default: Bucket,
        overrides: Mapping[str, Bucket] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._default = default
        self._overrides = dict(overrides or {})
        self._clock = clock
        self._states: dict[str, _State] = {}

    def acquire(self, principal: str) -> float:
        """Take one token for `principal`: 0.0 if allowed, else seconds until a token is due."""
        bucket = self._overrides.get(principal, self._default)
        now = self._clock()
        state = self._states.get(principal)
        if state is None:
            state = self._states[principal] = _State(float(bucket.burst), now)
        else:
            state.tokens = min(float(bucket.burst), state.tokens + (now - state.updated) * bucket.rate)
            state.updated = now
        if state.tokens >= 1.0:
            state.tokens -= 1.0
            return 0.0
        return (1.0 - state.tokens) / bucket.rate
