"""Per-subscription bookkeeping: what the policy needs to know, kept current.

A `SubscriptionLedger` counts one subscription's live clients and spend in
its budget window, and keeps the recent history that forecasts, error rates,
cooldowns and the auth-failure streak are made of. It hands the balancer an
immutable `SubscriptionLoad` as of a given time, rebuilt only when something
changed, because every Allocate reads every subscription's load.

Only the pool writes to ledgers; it rebuilds them from the store at start:
each absorbs the summary of its older usage records (`absorb`), then
replays the recent ones in time order, so nothing here is persisted but the
operator's flags (`SubscriptionFlags`).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from authpool_server.balancer import SubscriptionLoad
from authpool_server.domain import PPM, BudgetReset, Outcome, PoolSpec, SubscriptionSpec

if TYPE_CHECKING:
    from authpool_server.store.usage import EarlySpend

__all__ = ["SubscriptionFlags", "SubscriptionLedger"]

_ERRORS = frozenset({Outcome.RATE_LIMITED, Outcome.AUTH_FAILED, Outcome.SERVER_ERROR})


@dataclass(frozen=True, slots=True)
class SubscriptionFlags:
    """What an operator set on a subscription; durable."""

    subscription_id: str
    draining: bool = False
    # Auth failures before this time no longer count: the operator resumed it.
    resumed_at: float = 0.0


class SubscriptionLedger:
    __slots__ = (
        "_auth_failures_in_a_row",
        "_forget_due",
        "_load",
        "_outcomes",
        "_pool",
        "_provider_used",
        "_recent_errors",
        "_recent_spend",
        "_since_provider",
        "_spend",
        "extra_usage",
        "extra_windows",
        "flags",
        "learned_anchor",
        "live_clients",
        "rate_limited_at",
        "spec",
        "window",
        "window_usage",
    )

    def __init__(self, spec: SubscriptionSpec, pool: PoolSpec, window: tuple[float, float]) -> None:
        self.spec = spec
        self._pool = pool
        self.window = window
        self.window_usage = 0
        self.live_clients = 0
        self.flags = SubscriptionFlags(spec.id)
        self.rate_limited_at = 0.0
        self._auth_failures_in_a_row = 0
        self._spend: deque[tuple[float, int]] = deque()
        self._recent_spend = 0
        self._outcomes: deque[tuple[float, bool]] = deque()
        self._recent_errors = 0
        self._load: SubscriptionLoad | None = None
        # From when `load` has history to forget (-inf: look now); see `_forget_before`.
        self._forget_due = -math.inf
        # The provider's own account, when it gave one this window: what it
        # says is used, plus what we recorded since it said so.
        self._provider_used: int | None = None
        self._since_provider = 0
        # A reset time the provider announced; budget windows then run from it.
        self.learned_anchor: float | None = None
        # The spec's extra windows: where each now stands and what was spent in it.
        self.extra_windows: list[tuple[float, float]] = [(0.0, 0.0)] * len(spec.extra_windows)
        self.extra_usage: list[int] = [0] * len(spec.extra_windows)

    @property
    def reset(self) -> BudgetReset:
        """When this subscription's budget window resets: the provider's word beats the config."""
        return self.spec.reset if self.learned_anchor is None else BudgetReset(anchor=self.learned_anchor)

    @property
    def window_spend(self) -> int:
        """Spend in the window, as the provider last reported it if it did, else as we counted it."""
        if self._provider_used is None:
            return self.window_usage
        return self._provider_used + self._since_provider

    @property
    def disabled(self) -> bool:
        return self._auth_failures_in_a_row >= self._pool.auth_failure_limit

    def respec(self, spec: SubscriptionSpec, pool: PoolSpec) -> None:
        """Take a reloaded config's settings; the caller rolls the windows if their schedule changed."""
        if len(spec.extra_windows) != len(self.spec.extra_windows):
            self.extra_windows = [(0.0, 0.0)] * len(spec.extra_windows)  # rolled on the next decision
            self.extra_usage = [0] * len(spec.extra_windows)
        self.spec = spec
        self._pool = pool
        self._load = None
        self._forget_due = -math.inf  # the horizons may have changed

    def add_clients(self, count: int) -> None:
        self.live_clients += count
        self._load = None

    def set_flags(self, flags: SubscriptionFlags) -> None:
        if flags.resumed_at > self.flags.resumed_at:
            self._auth_failures_in_a_row = 0
        self.flags = flags
        self._load = None

    def roll(self, window: tuple[float, float], usage: int) -> None:
        """Enter a new budget window in which `usage` has been spent so far."""
        self.window = window
        self.window_usage = usage
        self._provider_used = None
        self._since_provider = 0
        self._load = None
        self._forget_due = -math.inf  # spend from before the new window is forgotten at once

    def roll_extra(self, index: int, window: tuple[float, float], usage: int) -> None:
        """Enter a new period of extra window `index`, with `usage` spent in it so far."""
        self.extra_windows[index] = window
        self.extra_usage[index] = usage
        self._load = None

    def absorb(self, early: EarlySpend) -> None:
        """Take in the summary of the records before the recent ones, as if each had been recorded.

        Right after the windows are set (and the flags, whose resume time
        decides which auth failures count), before any record. The
        forecast and error histories need none of them: they reach back only
        as far as the recent records go (see `Pool._recent_seconds`).
        """
        if early.spend:
            self.window_usage += early.spend[0]
            for index, spend in enumerate(early.spend[1 : len(self.extra_usage) + 1]):
                self.extra_usage[index] += spend
        if early.provider_remaining_ppm is not None:
            budget = self.spec.weekly_budget_micros
            self._provider_used = budget - budget * early.provider_remaining_ppm // PPM
        self._since_provider = early.spent_since_provider
        if early.provider_reset_at is not None:
            self.learned_anchor = early.provider_reset_at
            self.window = (self.window[0], early.provider_reset_at)
        self.rate_limited_at = max(self.rate_limited_at, early.rate_limited_at)
        self._auth_failures_in_a_row = sum(1 for at in early.auth_failures if at >= self.flags.resumed_at)
        self._load = None
        self._forget_due = -math.inf

    def record(
        self,
        at: float,
        cost_micros: int,
        outcome: Outcome,
        *,
        provider_remaining_ppm: int | None = None,
        provider_reset_at: float = 0.0,
    ) -> None:
        """Count one provider request made on this subscription at `at`, and what the provider said."""
        if at >= self.window[0]:
            self.window_usage += cost_micros
            self._since_provider += cost_micros
        for index, (start, _) in enumerate(self.extra_windows):
            if at >= start:
                self.extra_usage[index] += cost_micros
        if provider_reset_at > at:
            # The provider says when its window ends: ours ends then too, and
            # the next ones run a week at a time from there.
            self.learned_anchor = provider_reset_at
            self.window = (self.window[0], provider_reset_at)
        if provider_remaining_ppm is not None and at >= self.window[0]:
            budget = self.spec.weekly_budget_micros
            self._provider_used = budget - budget * provider_remaining_ppm // PPM
            self._since_provider = 0
        self._spend.append((at, cost_micros))
        self._recent_spend += cost_micros
        error = outcome in _ERRORS
        self._outcomes.append((at, error))
        self._recent_errors += error
        if outcome is Outcome.RATE_LIMITED:
            self.rate_limited_at = max(self.rate_limited_at, at)
        if outcome is Outcome.AUTH_FAILED:
            if at >= self.flags.resumed_at:
                self._auth_failures_in_a_row += 1
        elif outcome is Outcome.OK:
            self._auth_failures_in_a_row = 0
        self._load = None
        self._forget_due = -math.inf

    def load(self, now: float) -> SubscriptionLoad:
        """The subscription as the balancer sees it at `now`."""
        if now >= self._forget_due:  # every new Allocate reads every subscription's load: only look when due
            self._forget_before(now)
        if self._load is None:
            self._load = SubscriptionLoad(
                spec=self.spec,
                live_clients=self.live_clients,
                window_usage_micros=self.window_spend,
                window_start=self.window[0],
                window_end=self.window[1],
                recent_spend_micros=self._recent_spend,
                recent_requests=len(self._outcomes),
                recent_errors=self._recent_errors,
                rate_limited_at=self.rate_limited_at,
                disabled=self.disabled,
                draining=self.flags.draining,
                extra_usage_micros=tuple(self.extra_usage),
                extra_window_ends=tuple(end for _, end in self.extra_windows),
            )
        return self._load

    def _forget_before(self, now: float) -> None:
        spend_since = max(now - self._pool.forecast_horizon_seconds, self.window[0])
        while self._spend and self._spend[0][0] < spend_since:
            self._recent_spend -= self._spend.popleft()[1]
            self._load = None
        errors_since = now - self._pool.error_window_seconds
        while self._outcomes and self._outcomes[0][0] < errors_since:
            self._recent_errors -= self._outcomes.popleft()[1]
            self._load = None
        # Nothing more leaves either history before its oldest entry ages out of
        # the horizon (or the error window); what changes that resets this.
        due = math.inf
        if self._spend:
            due = self._spend[0][0] + self._pool.forecast_horizon_seconds
        if self._outcomes:
            due = min(due, self._outcomes[0][0] + self._pool.error_window_seconds)
        self._forget_due = due
