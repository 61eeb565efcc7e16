"""The pool: the one place that changes state.

Each operation reads the clock once, asks the balancer for a decision on the
in-memory state, applies the decision to memory and to a `WriteBatch`, hands
the batch to the group committer and answers only once it is durable. On one
event loop the steps up to the hand-off never yield, so decisions are
serialised without a lock; batches are committed in the order the decisions
were taken, and their events are published after the commit.

An answer that depends on an earlier, still-uncommitted change (a sticky
Allocate of a lease granted a moment ago, a retried usage report) waits for
that change to be durable first, so nothing is ever acknowledged that a crash
could take back.

On a store shared by several replicas (PostgreSQL) a decision must see what
the other replicas committed, so it is taken later, under the store's pool
lock, by the `LockedCommitter`, after this replica has caught up; the
decision functions are the same. There, the background work (reaper,
rebalancer, webhook delivery) runs on one replica at a time: the one the
store says leads.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Protocol, TypeVar

from authpool_server import balancer
from authpool_server.balancer import Forecast, Placement, PlannedMove, Refusal, SubscriptionLoad
from authpool_server.committer import Committer
from authpool_server.domain import (
    PPM,
    BudgetReset,
    DecisionKind,
    DeliveryState,
    EndedLease,
    Event,
    EventType,
    Lease,
    OutboxEntry,
    Outcome,
    PoolSpec,
    SubscriptionSpec,
    SubscriptionStatus,
    UsageRecord,
)
from authpool_server.errors import (
    InvalidArgument,
    LeaseNotFound,
    PoolExhausted,
    StaleFencingToken,
    StoreUnavailable,
    SubscriptionNotFound,
)
from authpool_server.events import EventHub
from authpool_server.ledger import SubscriptionFlags, SubscriptionLedger
from authpool_server.locked_committer import LockedCommitter
from authpool_server.notifications import Rules, log_notification
from authpool_server.outbox import Attempt, Outbox, OutboxStatus
from authpool_server.store.base import PruneHorizon, Snapshot, Store, WriteBatch
from authpool_server.store.replication import CatchUp, Change, SharedStore
from authpool_server.store.usage import UsagePlan
from authpool_server.usage_log import FetchedSpend, UsageLog

__all__ = [
    "Allocation",
    "Pool",
    "PoolStatus",
    "RebalanceOutcome",
    "Renewal",
    "SubscriptionView",
    "UsageAck",
    "UsageReport",
]

log = logging.getLogger(__name__)

_PRUNE_EVERY_SECONDS = 600.0
# Memory keeps each usage record this much longer than the forecast horizon (or error window) needs it,
# and lets the old ones go in steps (`UsageLog.evict`), so a reload's recount (see `reconfigure`) rarely races one.
_RECENT_MARGIN_SECONDS = 3600.0


class _Recount(Exception):
    """A reconfiguration needs spend from before what memory holds that it did not fetch: fetch again."""


@dataclass(frozen=True, slots=True)
class Allocation:
    lease: Lease
    kind: DecisionKind
    reason: str


@dataclass(frozen=True, slots=True)
class Renewal:
    lease: Lease
    moved: bool


@dataclass(frozen=True, slots=True)
class UsageReport:
    request_id: str
    lease_id: str
    fencing_token: int
    cost_micros: int
    input_tokens: int
    output_tokens: int
    model: str
    outcome: Outcome
    provider_remaining_ppm: int | None = None
    provider_reset_at: float = 0.0


@dataclass(frozen=True, slots=True)
class UsageAck:
    duplicate: bool
    subscription_id: str


@dataclass(frozen=True, slots=True)
class RebalanceOutcome:
    # Each planned move with the lease's fencing token after it (0 in a dry run).
    moves: tuple[tuple[PlannedMove, int], ...]
    reason: str
    dry_run: bool
    # Planning and applying, without the commit; a measurement, not part of the outcome.
    seconds: float = field(default=0.0, compare=False, repr=False)


class PoolObserver(Protocol):
    """Told of the pool's own work that no RPC reports (for metrics)."""

    def rebalanced(self, outcome: RebalanceOutcome, trigger: str) -> None: ...

    def webhook_attempted(self, entry: OutboxEntry) -> None: ...


@dataclass(frozen=True, slots=True)
class Reconfiguration:
    """What applying a reloaded config changed (subscription ids)."""

    added: tuple[str, ...]
    removed: tuple[str, ...]  # draining until their clients are gone
    changed: tuple[str, ...]
    pool_changed: bool  # pool-wide settings (thresholds, TTL, rules, ...)
    clients_moved: int  # idle clients moved off removed subscriptions at once


@dataclass(frozen=True, slots=True)
class SubscriptionView:
    spec: SubscriptionSpec
    status: SubscriptionStatus
    health: int
    live_clients: int
    window_usage_micros: int
    forecast: Forecast
    error_rate: float
    window_start: float
    window_end: float


@dataclass(frozen=True, slots=True)
class PoolStatus:
    subscriptions: tuple[SubscriptionView, ...]
    fallback_clients: int
    fallback_usage_micros: int
    last_sequence: int
    leases: tuple[Lease, ...]
    as_of: float
    webhooks: OutboxStatus


def _usage_key(request_id: str) -> str:
    return f"usage:{request_id}"


def _written_keys(batch: WriteBatch) -> Iterator[str]:
    for lease in batch.leases:
        yield lease.lease_id
    for ended in batch.ended:
        yield ended.lease.lease_id
    for record in batch.usage:
        yield _usage_key(record.request_id)


_Result = TypeVar("_Result")


def _moved_extra_windows(old: SubscriptionSpec, new: SubscriptionSpec) -> list[int]:
    """The extra windows of `new` whose schedule differs from `old`'s (all, if their number changed)."""
    if len(old.extra_windows) != len(new.extra_windows):
        return list(range(len(new.extra_windows)))
    return [
        index
        for index, (before, after) in enumerate(zip(old.extra_windows, new.extra_windows, strict=True))
        if (before.length_seconds, before.anchor) != (after.length_seconds, after.anchor)
    ]


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection while the state loads.

    Loading creates an object or more per retained row (a million usage
    records at scale), all long-lived: the collector would traverse the
    growing heap over and over while they pile up (a sixth of a restart's
    time). (`authpool serve` then freezes them out of later collections:
    see `server.serve`.)
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class Pool:
    """Owns the pool's state; every change goes through one of its methods."""

    def __init__(
        self,
        spec: PoolSpec,
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
        new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        self.spec = spec
        self._store = store
        self._clock = clock
        self._new_id = new_id
        self.events = EventHub(store, watcher_capacity=spec.watcher_buffer)
        self._committer = Committer(store, on_durable=self._durable, on_failure=self._reload)
        # Replicas sharing the store decide under its lock, and take turns at the background work.
        self._shared = store if isinstance(store, SharedStore) else None
        self._locked = LockedCommitter(self._shared, self) if self._shared is not None else None
        self._follower: asyncio.Task[None] | None = None
        self.version = 0  # the newest write of a shared store that memory includes
        self.is_leader = self._shared is None
        self._leases: dict[str, Lease] = {}
        self._lease_of_client: dict[str, str] = {}
        self._ended: dict[str, EndedLease] = {}
        # Each subscription's live clients and spend in its window, kept current
        # as they change so a decision never rebuilds them (Allocate is the hot path).
        self._ledgers: dict[str, SubscriptionLedger] = {}
        self._statuses: dict[str, SubscriptionStatus] = {}
        # The recent usage records and the request ids charged (on PostgreSQL, those of every retained
        # record: see `usage_log`). Older records are in the store alone, summarised into the ledgers at
        # start, and found by request id there (`report_usage`).
        self._usage_log = UsageLog()
        self._sequence = 0
        self._token = 0
        # Writes not yet durable, by lease id or "usage:<request id>": the
        # committer ticket of the newest batch that wrote each.
        self._unsettled: dict[str, int] = {}
        self._healthy = False
        self._last_prune = 0.0
        # No budget window ends before this: until then `_advance` has nothing to roll (-inf: look).
        self._next_roll = -math.inf
        self._reaper: asyncio.Task[None] | None = None
        self._observers: list[PoolObserver] = []
        self._rules = Rules(spec.notification_rules)
        self.outbox = Outbox(enabled=spec.webhooks_enabled)
        # Set when new notifications are durable: the webhook dispatcher waits on it.
        self.outbox_wakeup = asyncio.Event()
        self._pool_exhausted = False
        self._flags: dict[str, SubscriptionFlags] = {}  # the newest flags of every subscription, by id
        # Subscriptions a reloaded config removed, draining until their last
        # client leaves, with the flags they had (restored if they come back).
        self._retired: dict[str, SubscriptionFlags] = {}

    # -- lifecycle -----------------------------------------------------------

    async def start(self, *, background: bool = True) -> None:
        """Open the store, rebuild state from it and start committing."""
        with _collector_paused():
            self._rebuild(await self._store.open(self._usage_plan))
        if self._locked is not None and self._shared is not None:
            self._locked.start()
            self._follower = asyncio.create_task(
                self._shared.follow(self._locked.changed, self._lead), name="authpool-follower"
            )
        else:
            self._committer.start()
        if background:
            self._reaper = asyncio.create_task(self._reap_forever(), name="authpool-reaper")
        self._healthy = True

    async def close(self) -> None:
        """Stop background work and make everything acknowledged durable."""
        self._healthy = False
        for task in (self._reaper, self._follower):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._locked is not None:
            await self._locked.close()
        else:
            await self._committer.close()
        await self._store.close()

    def _lead(self, leading: bool) -> None:
        """The shared store says whether this replica runs the background work now."""
        self.is_leader = leading
        self.outbox_wakeup.set()  # the webhook dispatcher starts or stops at once

    @property
    def sequence(self) -> int:
        """The newest event this replica has applied, its own and others'."""
        return self._sequence

    @property
    def ready(self) -> bool:
        return self._healthy

    async def check_ready(self) -> bool:
        """Whether calls can be served: state loaded and the store reachable now."""
        if not self._healthy:
            return False
        try:
            await self._store.ping()
        except Exception:
            return False
        return True

    @property
    def _recent_seconds(self) -> float:
        """How far back the ledgers read whole usage records: the forecast horizon, or the error window."""
        return max(self.spec.forecast_horizon_seconds, self.spec.error_window_seconds)

    def _usage_plan(self, newest_event_at: float | None) -> UsagePlan:
        """What to load of the usage log (the store calls this while it loads)."""
        # State is rebuilt as of the last recorded change, not now: a window
        # that ended while the server was down then rolls on the next call,
        # which records its status changes like any other.
        now = self._clock() if newest_event_at is None else min(newest_event_at, self._clock())
        starts = {
            spec.id: (
                balancer.window_bounds(now, spec.reset)[0],
                *(balancer.extra_window_bounds(now, window)[0] for window in spec.extra_windows),
            )
            for spec in self.spec.subscriptions
        }
        return UsagePlan(now=now, recent_since=now - self._recent_seconds, starts=starts)

    def _rebuild(self, snapshot: Snapshot) -> None:
        early = snapshot.early
        # A store given the plan always answers with it; the fallback is for a store that ignores plans.
        now = early.plan.now if early.plan.now is not None else self._clock()
        self._leases = {lease.lease_id: lease for lease in snapshot.live_leases}
        self._lease_of_client = {lease.client_id: lease.lease_id for lease in snapshot.live_leases}
        self._ended = {ended.lease.lease_id: ended for ended in snapshot.ended_leases}
        self._ledgers = {
            spec.id: SubscriptionLedger(spec, self.spec, balancer.window_bounds(now, spec.reset))
            for spec in self.spec.subscriptions
        }
        self._next_roll = -math.inf
        # Removed subscriptions still draining are not rebuilt: their clients
        # are moved at their next call, as for any subscription not in the pool.
        self._retired = {}
        for ledger in self._ledgers.values():
            for index, window in enumerate(ledger.spec.extra_windows):
                ledger.roll_extra(index, balancer.extra_window_bounds(now, window), 0)
        # Every subscription's flags, configured or not: one that comes back keeps them.
        self._flags = {flags.subscription_id: flags for flags in snapshot.flags}
        for flags in snapshot.flags:
            if flags.subscription_id in self._ledgers:
                self._ledgers[flags.subscription_id].set_flags(flags)
        for lease in snapshot.live_leases:
            if not lease.fallback and lease.subscription_id in self._ledgers:
                self._ledgers[lease.subscription_id].add_clients(1)
        self._sequence = snapshot.last_sequence
        self._token = snapshot.fencing_token
        self.version = snapshot.version
        self.events.last_sequence = snapshot.last_sequence
        for sid, spend in early.subscriptions.items():
            if sid in self._ledgers:
                self._ledgers[sid].absorb(spend)
        self._usage_log = UsageLog(early)
        for record in sorted(snapshot.usage, key=lambda record: record.at):
            # Spend after the as-of time belongs to windows the next decision rolls into.
            self._count_usage(record, in_ledger=record.at <= now)
        self._statuses = {sid: self._status(sid, now) for sid in self._ledgers}
        self._pool_exhausted = self._no_subscription_active(now)
        self.outbox.restore(snapshot.outbox, snapshot.delivered_notifications)
        self.outbox_wakeup.set()  # deliveries pending before a restart resume at once

    def reload(self) -> Awaitable[None]:
        """Rebuild memory from the store (the locked committer's way in)."""
        return self._reload()

    async def _reload(self) -> None:
        # A failed write leaves memory ahead of the disk: refuse calls until
        # memory matches what is durable again.
        self._healthy = False
        self._unsettled.clear()
        published = self.events.last_sequence
        while True:
            try:
                snapshot = await self._store.load(self._usage_plan)
                self._rebuild(snapshot)
                await self._publish_missed(published, snapshot.last_sequence)
            except Exception:
                log.exception("reloading state from the store failed; retrying in 1s")
                await asyncio.sleep(1.0)
            else:
                self._healthy = True
                log.warning("state reloaded from the store after a failed write")
                return

    async def _publish_missed(self, published: int, last: int) -> None:
        """Hand watchers the events of a write that reported failure but committed.

        A networked store can lose the connection while COMMIT is in flight:
        the write failed for us, yet its events are durable. Watchers must
        not skip them.
        """
        self.events.last_sequence = published
        while self.events.last_sequence < last:
            page = await self._store.events_after(self.events.last_sequence, 500)
            if not page:
                break
            self.events.publish(page)
        self.events.last_sequence = last

    def _roll_window(self, ledger: SubscriptionLedger, now: float, fetched: FetchedSpend | None = None) -> None:
        window = balancer.window_bounds(now, ledger.reset)
        ledger.roll(window, self._usage_log.spend_since(ledger.spec.id, window[0], fetched))

    def _evict(self, now: float) -> None:
        """Let go of the usage records the ledgers no longer read (they stay in the store).

        With a margin: a report another replica made a moment ago, in its own time, must find its window's
        spend here when it is caught up.
        """
        self._usage_log.evict(now - self._recent_seconds - _RECENT_MARGIN_SECONDS)

    # -- helpers -------------------------------------------------------------

    def _check_ready(self) -> None:
        if not self._healthy:
            raise StoreUnavailable("the pool is not ready: its store is loading or failed")

    def _add_clients(self, subscription_id: str, count: int) -> None:
        ledger = self._ledgers.get(subscription_id)
        if ledger is not None:  # a lease may outlive its subscription's removal from the config
            ledger.add_clients(count)

    def _loads(self, now: float) -> list[SubscriptionLoad]:
        return [ledger.load(now) for ledger in self._ledgers.values()]

    def _placement(self, lease: Lease | None, wanted_type: str, now: float) -> Placement | Refusal:
        """`balancer.decide_allocation` for `lease` (None: a new client), reading as few loads as it can.

        Whether a lease may stay depends on its own subscription's load alone
        (`balancer._can_keep`), so a sticky answer, the common one for Renew and
        a repeated Allocate, is decided from that one load; only a move, a
        fallback lease or a new client reads every subscription's (a thousand
        at scale). Same inputs, same decision: this only skips reading loads
        the balancer would not look at.
        """
        if lease is not None and not lease.fallback:
            ledger = self._ledgers.get(lease.subscription_id)
            if ledger is not None:
                decision = balancer.decide_allocation((ledger.load(now),), self.spec, lease, wanted_type, now)
                if isinstance(decision, Placement) and decision.kind is DecisionKind.STICKY:
                    return decision
        return balancer.decide_allocation(self._loads(now), self.spec, lease, wanted_type, now)

    def _status(self, subscription_id: str, now: float) -> SubscriptionStatus:
        return balancer.subscription_status(self._ledgers[subscription_id].load(now), self.spec, now)

    def _event(self, batch: WriteBatch, now: float, type_: EventType, **fields: object) -> None:
        self._sequence += 1
        attributes = fields.pop("attributes", ())
        event = Event(self._sequence, now, type_, attributes=tuple(attributes), **fields)  # type: ignore[arg-type]
        batch.events.append(event)
        if self._rules:
            # In the event's own batch: a webhook notification is durable exactly when its event is.
            for notification in self._rules.for_event(event):
                if (entry := self.outbox.add(notification, now)) is not None:
                    batch.outbox.append(entry)

    def _next_token(self, batch: WriteBatch) -> int:
        self._token += 1
        batch.fencing_token = self._token
        return self._token

    def _note_status(self, subscription_id: str, batch: WriteBatch, now: float) -> None:
        if subscription_id not in self._ledgers:
            return
        new = self._status(subscription_id, now)
        old = self._statuses.get(subscription_id)
        if new is not old:
            self._statuses[subscription_id] = new
            self._event(
                batch,
                now,
                EventType.SUBSCRIPTION_STATUS_CHANGED,
                subscription_id=subscription_id,
                attributes=(("from", str(old or "")), ("to", str(new))),
            )
            exhausted = self._no_subscription_active(now)
            if exhausted and not self._pool_exhausted:
                self._event(batch, now, EventType.POOL_EXHAUSTED, attributes=(("last", subscription_id),))
            self._pool_exhausted = exhausted

    def _no_subscription_active(self, now: float) -> bool:
        # Each status as of now, not as last noted: a cooldown that just ended
        # (noticed by the reaper within seconds) must not make a false alarm.
        return bool(self._ledgers) and all(
            self._status(sid, now) is not SubscriptionStatus.ACTIVE for sid in self._ledgers
        )

    def _advance(self, now: float, batch: WriteBatch) -> None:
        """Roll every budget window that `now` has left."""
        if now < self._next_roll:
            return  # the common case: this runs before every decision, over every subscription
        next_roll = math.inf
        for subscription_id, ledger in self._ledgers.items():
            rolled = False
            if now >= ledger.window[1]:
                self._roll_window(ledger, now)
                rolled = True
            # Most subscriptions have no extra window; this loop runs over all of them before every decision.
            for index, (_, end) in enumerate(ledger.extra_windows) if ledger.extra_windows else ():
                if now >= end:
                    window = balancer.extra_window_bounds(now, ledger.spec.extra_windows[index])
                    ledger.roll_extra(index, window, self._usage_log.spend_since(subscription_id, window[0]))
                    rolled = True
            if rolled:
                self._note_status(subscription_id, batch, now)
            next_roll = min(next_roll, ledger.window[1], *(end for _, end in ledger.extra_windows))
        self._next_roll = next_roll

    def _live_lease(self, lease_id: str, now: float, batch: WriteBatch) -> Lease | None:
        lease = self._leases.get(lease_id)
        if lease is not None and lease.expires_at <= now:
            self._end(lease, now, batch, EventType.LEASE_EXPIRED)
            return None
        return lease

    def _store_lease(self, lease: Lease, batch: WriteBatch) -> None:
        self._leases[lease.lease_id] = lease
        batch.leases.append(lease)

    def _end(self, lease: Lease, now: float, batch: WriteBatch, why: EventType) -> None:
        del self._leases[lease.lease_id]
        if self._lease_of_client.get(lease.client_id) == lease.lease_id:
            del self._lease_of_client[lease.client_id]
        if not lease.fallback:
            self._add_clients(lease.subscription_id, -1)
        ended = EndedLease(lease, now)
        self._ended[lease.lease_id] = ended
        batch.ended.append(ended)
        self._event(
            batch,
            now,
            why,
            subscription_id=lease.subscription_id,
            client_id=lease.client_id,
            lease_id=lease.lease_id,
            fencing_token=lease.fencing_token,
        )

    def _place(
        self, lease: Lease, placement: Placement, now: float, batch: WriteBatch, cause: str = "failover"
    ) -> Lease:
        """Move an existing lease to the placement's subscription.

        `cause` says why, in the event: "failover" (its subscription can no
        longer serve it), "rebalance" or "rotation" (an operator drained it).
        """
        fallback = placement.kind is DecisionKind.FALLBACK
        if not lease.fallback:
            self._add_clients(lease.subscription_id, -1)
        if not fallback:
            self._add_clients(placement.subscription_id, 1)
        moved = replace(
            lease,
            subscription_id=placement.subscription_id,
            fallback=fallback,
            fencing_token=self._next_token(batch),
            history=(*lease.history, (lease.fencing_token, lease.subscription_id)),
        )
        self._store_lease(moved, batch)
        self._event(
            batch,
            now,
            EventType.LEASE_MOVED,
            subscription_id=moved.subscription_id,
            client_id=moved.client_id,
            lease_id=moved.lease_id,
            fencing_token=moved.fencing_token,
            attributes=(
                ("from_subscription_id", lease.subscription_id),
                ("kind", str(placement.kind)),
                ("cause", cause),
            ),
        )
        return moved

    def _submit(self, batch: WriteBatch) -> asyncio.Future[None] | None:
        """Hand `batch` to the committer; what it writes stays unsettled until durable."""
        if not (
            batch.leases or batch.ended or batch.usage or batch.events or batch.flags or batch.outbox or batch.prune
        ):
            return None
        future = self._committer.submit(batch)
        ticket = self._committer.submitted
        for key in _written_keys(batch):
            self._unsettled[key] = ticket
        return future

    def _durable(self, batch: WriteBatch, ticket: int) -> None:
        """Called by the committer once `batch` (up to `ticket`) is on disk."""
        for key in _written_keys(batch):
            if self._unsettled.get(key, ticket + 1) <= ticket:
                del self._unsettled[key]
        self.events.publish(batch.events)
        if self._rules:
            for event in batch.events:
                for notification in self._rules.for_event(event):
                    if "log" in notification.channels:
                        log_notification(notification)
        if batch.outbox:
            self.outbox.settle(entry.notification_id for entry in batch.outbox)
            self.outbox_wakeup.set()

    async def _settled(self, key: str) -> None:
        """Return once the newest write of `key` (a lease or a usage report) is durable."""
        ticket = self._unsettled.get(key)
        if ticket is not None:
            await self._committer.wait_durable(ticket)

    async def _apply(self, decide: Callable[[float, WriteBatch], _Result]) -> _Result:
        """Take one decision and answer once what it changed is durable.

        `decide` runs synchronously and the batch is handed to the committer
        before anything yields, so batches are committed (and their events
        published) in the order the decisions were taken. When `decide`
        raises, whatever it had already changed (a window roll, an inline
        expiry) is committed all the same, so memory, store and event log never
        disagree and no sequence number is skipped.
        """
        self._check_ready()
        if self._locked is not None:
            return await self._locked.submit(lambda batch: self._decide(decide, batch))
        now = self._clock()
        batch = WriteBatch()
        self._advance(now, batch)
        self._evict(now)
        try:
            result = decide(now, batch)
        except BaseException:
            future = self._submit(batch)
            if future is not None:
                await future
            raise
        future = self._submit(batch)
        if future is not None:
            await future
        return result

    def _decide(self, decide: Callable[[float, WriteBatch], _Result], batch: WriteBatch) -> _Result:
        """One decision of a locked cycle, on a state that includes every replica's writes."""
        now = self._clock()
        self._advance(now, batch)
        self._evict(now)
        return decide(now, batch)

    # -- replication (a store shared by replicas) ------------------------------

    def catch_up(self, seen: CatchUp) -> None:
        """Apply what other replicas committed, then hand their events to this replica's watchers."""
        for change in seen.changes:
            self._apply_change(change)
        for event in seen.events:
            # Their status changes were noted there: noting them again here would repeat the events.
            if event.type is EventType.SUBSCRIPTION_STATUS_CHANGED and event.subscription_id in self._ledgers:
                self._statuses[event.subscription_id] = SubscriptionStatus(dict(event.attributes)["to"])
        if seen.changes:
            # As the others left it: a pool they ran dry was announced there; one they refilled may run dry here.
            self._pool_exhausted = self._no_subscription_active(self._clock())
        self._sequence = max(self._sequence, seen.last_sequence)
        self._token = max(self._token, seen.fencing_token)
        self.version = seen.version
        self._drop_retired()
        self.events.publish(seen.events)
        if any(change.outbox for change in seen.changes):
            self.outbox_wakeup.set()

    def _apply_change(self, change: Change) -> None:
        for lease in change.leases:
            old = self._leases.get(lease.lease_id)
            if old is not None and not old.fallback:
                self._add_clients(old.subscription_id, -1)
            if not lease.fallback:
                self._add_clients(lease.subscription_id, 1)
            self._leases[lease.lease_id] = lease
            self._lease_of_client[lease.client_id] = lease.lease_id
        for ended in change.ended:
            old = self._leases.pop(ended.lease.lease_id, None)
            if old is not None:
                if self._lease_of_client.get(old.client_id) == old.lease_id:
                    del self._lease_of_client[old.client_id]
                if not old.fallback:
                    self._add_clients(old.subscription_id, -1)
            self._ended[ended.lease.lease_id] = ended
        for record in change.usage:
            if self._usage_log.charged(record.request_id) is None:
                self._count_usage(record)
        for flags in change.flags:
            self._flags[flags.subscription_id] = flags
            if flags.subscription_id in self._retired:
                self._retired[flags.subscription_id] = flags  # it stays out of rotation while retired here
            elif flags.subscription_id in self._ledgers:
                self._ledgers[flags.subscription_id].set_flags(flags)
        self.outbox.adopt(change.outbox)
        if change.prune is not None:
            self._forget(change.prune)

    async def caught_up_to(self, sequence: int, *, seconds: float = 2.0) -> None:
        """Return once this replica has published `sequence`, or after `seconds`.

        A watcher resuming here with a cursor from another replica may be a
        moment ahead of this one; without replicas, there is nothing to wait for.
        """
        if self._locked is None or sequence <= self.events.last_sequence:
            return
        self._locked.catch_up_soon()
        deadline = time.monotonic() + seconds
        while self.events.last_sequence < sequence and time.monotonic() < deadline:  # noqa: ASYNC110 - rare path
            await asyncio.sleep(0.01)

    def committed(self, batch: WriteBatch, version: int) -> None:
        """The locked committer wrote this replica's `batch` as `version`."""
        self.version = version
        self._durable(batch, 0)

    # -- operations ----------------------------------------------------------

    async def allocate(
        self,
        client_id: str,
        *,
        session_id: str = "",
        wanted_type: str = "",
        labels: Iterable[tuple[str, str]] = (),
    ) -> Allocation:
        """Grant the client a lease, or return the one it holds (sticky)."""
        labels = tuple(labels)
        allocation = await self._apply(
            lambda now, batch: self._allocate(client_id, session_id, wanted_type, labels, now, batch)
        )
        # The live lease may come from a grant whose commit is still in flight.
        await self._settled(allocation.lease.lease_id)
        return allocation

    def _allocate(
        self,
        client_id: str,
        session_id: str,
        wanted_type: str,
        labels: tuple[tuple[str, str], ...],
        now: float,
        batch: WriteBatch,
    ) -> Allocation:
        if wanted_type and not any(spec.type == wanted_type for spec in self.spec.subscriptions):
            raise InvalidArgument([("subscription_type", f"the pool has no subscription of type {wanted_type!r}")])
        lease_id = self._lease_of_client.get(client_id)
        current = self._live_lease(lease_id, now, batch) if lease_id else None
        decision = self._placement(current, wanted_type, now)
        if isinstance(decision, Refusal):
            raise PoolExhausted(decision.reason, decision.retry_after_seconds)
        if current is not None and decision.kind is DecisionKind.STICKY:
            if current.acked_token != current.fencing_token:
                current = replace(current, acked_token=current.fencing_token)
                self._store_lease(current, batch)
            return Allocation(current, DecisionKind.STICKY, decision.reason)
        if current is not None:
            lease = self._place(current, decision, now, batch)
            lease = replace(lease, acked_token=lease.fencing_token, expires_at=now + self.spec.lease_ttl_seconds)
            self._store_lease(lease, batch)
        else:
            lease = self._grant(client_id, session_id, wanted_type, labels, decision, now, batch)
        if not lease.fallback:
            self._note_status(lease.subscription_id, batch, now)
        return Allocation(lease, decision.kind, decision.reason)

    def _grant(
        self,
        client_id: str,
        session_id: str,
        wanted_type: str,
        labels: tuple[tuple[str, str], ...],
        placement: Placement,
        now: float,
        batch: WriteBatch,
    ) -> Lease:
        token = self._next_token(batch)
        lease = Lease(
            lease_id=self._new_id(),
            client_id=client_id,
            session_id=session_id,
            subscription_id=placement.subscription_id,
            fallback=placement.kind is DecisionKind.FALLBACK,
            granted_at=now,
            expires_at=now + self.spec.lease_ttl_seconds,
            fencing_token=token,
            acked_token=token,
            last_used_at=now,
            wanted_type=wanted_type,
            labels=labels,
        )
        self._store_lease(lease, batch)
        self._lease_of_client[client_id] = lease.lease_id
        if not lease.fallback:
            self._add_clients(lease.subscription_id, 1)
        self._event(
            batch,
            now,
            EventType.LEASE_GRANTED,
            subscription_id=lease.subscription_id,
            client_id=client_id,
            lease_id=lease.lease_id,
            fencing_token=token,
            attributes=(("kind", str(placement.kind)),),
        )
        return lease

    def _check_token(self, lease: Lease, token: int) -> None:
        if lease.subscription_at(token) is None:
            raise InvalidArgument([("fencing_token", f"{token} was never a token of lease {lease.lease_id!r}")])
        if token < lease.acked_token:
            raise StaleFencingToken(lease.lease_id, token, lease.acked_token, lease.fencing_token)

    async def renew(self, lease_id: str, fencing_token: int) -> Renewal:
        """Extend a lease; move it first if its subscription can no longer serve it."""
        return await self._apply(lambda now, batch: self._renew(lease_id, fencing_token, now, batch))

    def _renew(self, lease_id: str, fencing_token: int, now: float, batch: WriteBatch) -> Renewal:
        lease = self._live_lease(lease_id, now, batch)
        if lease is None:
            raise LeaseNotFound(lease_id)
        self._check_token(lease, fencing_token)
        decision = self._placement(lease, lease.wanted_type, now)  # balancer.decide_renewal
        if isinstance(decision, Refusal):
            raise PoolExhausted(decision.reason, decision.retry_after_seconds)
        if decision.kind is not DecisionKind.STICKY:
            lease = self._place(lease, decision, now, batch)
            self._note_status(lease.subscription_id, batch, now)
        renewed = replace(lease, expires_at=now + self.spec.lease_ttl_seconds, acked_token=lease.fencing_token)
        self._store_lease(renewed, batch)
        return Renewal(renewed, moved=fencing_token < renewed.fencing_token)

    async def release(self, lease_id: str, fencing_token: int) -> bool:
        """End a lease; True when this call ended it, False when it was not live."""
        released = await self._apply(lambda now, batch: self._release(lease_id, fencing_token, now, batch))
        if not released:
            # Another call may have ended it a moment ago: answer once that is durable.
            await self._settled(lease_id)
        return released

    def _release(self, lease_id: str, fencing_token: int, now: float, batch: WriteBatch) -> bool:
        lease = self._live_lease(lease_id, now, batch)
        if lease is None:
            return False
        self._check_token(lease, fencing_token)
        self._end(lease, now, batch, EventType.LEASE_RELEASED)
        return True

    async def report_usage(self, report: UsageReport) -> UsageAck:
        """Record one provider request's cost, once per request id."""
        self._check_ready()
        charged = self._usage_log.charged(report.request_id)
        if charged is None:
            if not self._usage_log.holds_every_request_id:
                # Memory holds the recent records only (`UsageLog.kept_since`); an older one is in the store alone.
                # Anything this misses was written since it looked, and is in memory by the decision.
                charged = await self._store.charged(report.request_id)
                if charged is not None:
                    return UsageAck(duplicate=True, subscription_id=charged)
        # With replicas the first report may be on another one: ask under the lock.
        elif self._locked is None:
            # The first report may still be on its way to disk.
            await self._settled(_usage_key(report.request_id))
            return UsageAck(duplicate=True, subscription_id=charged)
        return await self._apply(lambda now, batch: self._report_usage(report, now, batch))

    def _report_usage(self, report: UsageReport, now: float, batch: WriteBatch) -> UsageAck:
        charged = self._usage_log.charged(report.request_id)
        if charged is not None:
            return UsageAck(duplicate=True, subscription_id=charged)
        lease = self._live_lease(report.lease_id, now, batch)
        if lease is None:
            ended = self._ended.get(report.lease_id)
            if ended is None:
                raise LeaseNotFound(report.lease_id)
            lease = ended.lease
        subscription_id = lease.subscription_at(report.fencing_token)
        if subscription_id is None:
            raise InvalidArgument(
                [("fencing_token", f"{report.fencing_token} was never a token of lease {lease.lease_id!r}")]
            )
        # Config forbids a subscription with the fallback's id, so the id says which it was.
        fallback = subscription_id == self.spec.fallback.id
        record = UsageRecord(
            request_id=report.request_id,
            lease_id=lease.lease_id,
            client_id=lease.client_id,
            subscription_id=subscription_id,
            fallback=fallback,
            at=now,
            cost_micros=report.cost_micros,
            input_tokens=report.input_tokens,
            output_tokens=report.output_tokens,
            model=report.model,
            outcome=report.outcome,
            provider_remaining_ppm=report.provider_remaining_ppm,
            provider_reset_at=report.provider_reset_at,
        )
        batch.usage.append(record)
        ledger = self._ledgers.get(subscription_id) if not fallback else None
        before = ledger.window_spend if ledger is not None else 0
        self._count_usage(record)
        if ledger is not None:
            self._note_thresholds(ledger, before, now, batch)
        if lease.lease_id in self._leases:
            self._store_lease(replace(lease, last_used_at=now), batch)
        self._event(
            batch,
            now,
            EventType.USAGE_RECORDED,
            subscription_id=subscription_id,
            client_id=lease.client_id,
            lease_id=lease.lease_id,
            fencing_token=report.fencing_token,
            attributes=(
                ("cost_micros", str(record.cost_micros)),
                ("outcome", str(record.outcome)),
                ("model", record.model),
            ),
        )
        if not fallback:
            self._note_status(subscription_id, batch, now)
        return UsageAck(duplicate=False, subscription_id=subscription_id)

    def _count_usage(self, record: UsageRecord, *, in_ledger: bool = True) -> None:
        """Take a usage record into memory: the log, the request ids, and its subscription's ledger."""
        self._usage_log.add(record)
        if record.fallback:
            return
        if in_ledger and record.subscription_id in self._ledgers:
            if record.provider_reset_at:
                self._next_roll = -math.inf  # the provider's reset time may end the window sooner
            self._ledgers[record.subscription_id].record(
                record.at,
                record.cost_micros,
                record.outcome,
                provider_remaining_ppm=record.provider_remaining_ppm,
                provider_reset_at=record.provider_reset_at,
            )

    def observe(self, observer: PoolObserver) -> None:
        self._observers.append(observer)

    def _note_thresholds(self, ledger: SubscriptionLedger, before: int, now: float, batch: WriteBatch) -> None:
        """An event for each notification threshold this report's spend crossed.

        Spend only grows within a window, so each threshold is crossed once
        per subscription and window (the provider's own figure may move it
        back, and then it can fire again: that is news too).
        """
        after = ledger.window_spend
        budget = ledger.spec.weekly_budget_micros
        for threshold_ppm in self._rules.usage_thresholds_ppm:
            line = budget * threshold_ppm // PPM
            if before < line <= after:
                self._event(
                    batch,
                    now,
                    EventType.USAGE_THRESHOLD_CROSSED,
                    subscription_id=ledger.spec.id,
                    attributes=(
                        ("threshold_ppm", str(threshold_ppm)),
                        ("window_usage_micros", str(after)),
                        ("weekly_budget_micros", str(budget)),
                    ),
                )

    async def rebalance(self, *, dry_run: bool, trigger: str = "operator") -> RebalanceOutcome:
        """Run one rebalancing cycle (or only plan it) and say what moved and why.

        `trigger` says who asked ("operator" or "periodic"), for metrics.
        """
        outcome = await self._apply(lambda now, batch: self._rebalance(dry_run, now, batch))
        for observer in self._observers:
            observer.rebalanced(outcome, trigger)
        return outcome

    def _rebalance(self, dry_run: bool, now: float, batch: WriteBatch) -> RebalanceOutcome:
        started = time.perf_counter()
        plan = balancer.plan_rebalance(self._loads(now), self._leases.values(), self.spec, now)
        if dry_run:
            moves = tuple((move, 0) for move in plan.moves)
            return RebalanceOutcome(moves, plan.reason, dry_run=True, seconds=time.perf_counter() - started)
        moved: list[tuple[PlannedMove, int]] = []
        for move in plan.moves:
            lease = self._leases[move.lease_id]
            placement = Placement(DecisionKind.FAILOVER, move.to_subscription_id, plan.reason)
            moved.append((move, self._place(lease, placement, now, batch, cause="rebalance").fencing_token))
        self._event(
            batch,
            now,
            EventType.REBALANCE_COMPLETED,
            attributes=(("moves", str(len(moved))), ("reason", plan.reason)),
        )
        return RebalanceOutcome(tuple(moved), plan.reason, dry_run=False, seconds=time.perf_counter() - started)

    def status(self, *, include_clients: bool = False) -> PoolStatus:
        """The pool's state now (decisions in flight included)."""
        now = self._clock()
        loads = []
        for load in self._loads(now):
            if now >= load.window_end:
                # The window ended since the last change; the next change (or
                # the reaper, within seconds) rolls it. Until then, read the new one.
                start, end = balancer.window_bounds(now, self._ledgers[load.spec.id].reset)
                load = replace(
                    load,
                    window_usage_micros=self._usage_log.spend_since(load.spec.id, start),
                    window_start=start,
                    window_end=end,
                )
            loads.append(load)
        views = tuple(
            SubscriptionView(
                spec=load.spec,
                status=balancer.subscription_status(load, self.spec, now),
                health=balancer.health_score(load, self.spec, now),
                live_clients=load.live_clients,
                window_usage_micros=load.window_usage_micros,
                forecast=balancer.forecast(load, self.spec, now),
                error_rate=load.recent_errors / load.recent_requests if load.recent_requests else 0.0,
                window_start=load.window_start,
                window_end=load.window_end,
            )
            for load in loads
        )
        leases = tuple(self._leases.values())
        return PoolStatus(
            subscriptions=views,
            fallback_clients=sum(1 for lease in leases if lease.fallback),
            fallback_usage_micros=self._usage_log.fallback_spend,
            last_sequence=self.events.last_sequence,
            leases=leases if include_clients else (),
            as_of=now,
            webhooks=self.outbox.status(),
        )

    # -- operator actions ----------------------------------------------------

    async def drain(self, subscription_id: str) -> int:
        """Take a subscription out of rotation; idle clients move now, busy ones once idle.

        Returns how many clients moved now.
        """
        return await self._apply(lambda now, batch: self._set_draining(subscription_id, True, now, batch))

    async def resume(self, subscription_id: str) -> int:
        """Put a drained or disabled subscription back into rotation."""
        return await self._apply(lambda now, batch: self._set_draining(subscription_id, False, now, batch))

    async def reconfigure(self, spec: PoolSpec) -> Reconfiguration:
        """Apply a reloaded config at once, as one decision.

        New subscriptions join; removed ones drain (idle clients move now,
        busy ones once idle, and the subscription leaves when its last client
        has); changed budgets, limits and schedules take effect for the next
        decision. Webhook delivery is wired at start and stays as it was.
        """
        running, rules = self.spec, self._rules
        try:
            while True:
                fetched = await self._fetch_older_spend(spec)
                try:
                    return await self._apply(
                        lambda now, batch, fetched=fetched: self._reconfigure(spec, fetched, now, batch)  # type: ignore[misc]
                    )
                except _Recount:
                    continue  # a window moved on, or memory let records go, since the fetch: rarely twice
        except BaseException:
            # Not durable: the reload that follows a failed write must rebuild the running config.
            self.spec, self._rules = running, rules
            raise

    async def _fetch_older_spend(self, spec: PoolSpec) -> FetchedSpend:
        """The spend from before what memory holds that reconfiguring to `spec` would recount, from the store."""
        before = self._usage_log.kept_since
        starts = self._recount_starts(spec, self._clock())
        fetched = await self._store.spend_before(before, starts) if starts else {}
        spend = {
            (sid, start): total
            for sid, totals in fetched.items()
            for start, total in zip(starts[sid], totals, strict=True)
        }
        return FetchedSpend(before, spend)

    def _recount_starts(self, spec: PoolSpec, now: float) -> dict[str, tuple[float, ...]]:
        """The window starts, older than memory, from which reconfiguring to `spec` at `now` recounts spend.

        As `_new_ledger` and `_reschedule` find them.
        """
        needed: dict[str, tuple[float, ...]] = {}
        for sub in spec.subscriptions:
            ledger = self._ledgers.get(sub.id)
            starts: list[float] = []
            if ledger is None:
                starts.append(balancer.window_bounds(now, sub.reset)[0])
                moved: Iterable[int] = range(len(sub.extra_windows))
            else:
                if ledger.spec.reset != sub.reset:
                    reset = sub.reset if ledger.learned_anchor is None else BudgetReset(anchor=ledger.learned_anchor)
                    starts.append(balancer.window_bounds(now, reset)[0])
                moved = _moved_extra_windows(ledger.spec, sub)
            starts.extend(balancer.extra_window_bounds(now, sub.extra_windows[index])[0] for index in moved)
            old = tuple(start for start in starts if start < self._usage_log.kept_since)
            if old:
                needed[sub.id] = old
        return needed

    def _reconfigure(self, spec: PoolSpec, fetched: FetchedSpend, now: float, batch: WriteBatch) -> Reconfiguration:
        needed = self._recount_starts(spec, now)
        if needed and fetched.before < self._usage_log.kept_since:
            raise _Recount  # before anything changed
        if any((sid, start) not in fetched.spend for sid, starts in needed.items() for start in starts):
            raise _Recount
        spec = replace(spec, webhooks_enabled=self.spec.webhooks_enabled)
        self._next_roll = -math.inf  # subscriptions may join, and schedules change
        before = {sub.id: sub for sub in self.spec.subscriptions}
        after = {sub.id: sub for sub in spec.subscriptions}
        pool_changed = replace(self.spec, subscriptions=()) != replace(spec, subscriptions=())
        self.spec = spec
        self._rules = Rules(spec.notification_rules)
        added, changed = [], []
        for sub in spec.subscriptions:
            ledger = self._ledgers.get(sub.id)
            if ledger is None:
                self._ledgers[sub.id] = ledger = self._new_ledger(sub, now, fetched)
                added.append(sub.id)
            else:
                if sub.id in self._retired:
                    ledger.set_flags(self._retired.pop(sub.id))  # back in the config: back in rotation
                    added.append(sub.id)
                elif sub != before.get(sub.id):
                    changed.append(sub.id)
                self._reschedule(ledger, sub, spec, now, fetched)
            self._note_status(sub.id, batch, now)
        removed = [sid for sid in self._ledgers if sid not in after and sid not in self._retired]
        for sid in removed:
            ledger = self._ledgers[sid]
            ledger.respec(ledger.spec, spec)
            self._retired[sid] = ledger.flags
            ledger.set_flags(replace(ledger.flags, draining=True))  # in memory: the config says so, not an operator
        for ledger in self._ledgers.values():
            ledger.respec(ledger.spec, spec)  # the pool-wide settings every ledger reads
        moved = sum(self._move_off_unservable(now, batch, only=sid, cause="config") for sid in removed)
        self._drop_retired()
        self._event(
            batch,
            now,
            EventType.CONFIG_RELOADED,
            attributes=(
                ("added", ",".join(added)),
                ("removed", ",".join(removed)),
                ("changed", ",".join(changed)),
                ("pool", "changed" if pool_changed else "unchanged"),
            ),
        )
        return Reconfiguration(tuple(added), tuple(removed), tuple(changed), pool_changed, moved)

    def _reschedule(
        self, ledger: SubscriptionLedger, sub: SubscriptionSpec, spec: PoolSpec, now: float, fetched: FetchedSpend
    ) -> None:
        """Give `ledger` the reloaded `sub`, re-reckoning only the windows whose schedule changed.

        A budget alone changing keeps the window, and what the provider said
        about it; a new weekly reset or a new extra-window length or anchor
        recounts that window's spend from the usage log.
        """
        old = ledger.spec
        reset_changed = old.reset != sub.reset
        moved = _moved_extra_windows(old, sub)
        ledger.respec(sub, spec)
        if reset_changed:
            self._roll_window(ledger, now, fetched)
        for index in moved:
            window = balancer.extra_window_bounds(now, sub.extra_windows[index])
            ledger.roll_extra(index, window, self._usage_log.spend_since(sub.id, window[0], fetched))

    def _new_ledger(self, sub: SubscriptionSpec, now: float, fetched: FetchedSpend) -> SubscriptionLedger:
        """A ledger for a subscription that joins the pool: its spend and clients from what memory holds."""
        ledger = SubscriptionLedger(sub, self.spec, balancer.window_bounds(now, sub.reset))
        if sub.id in self._flags:
            ledger.set_flags(self._flags[sub.id])  # drained before it left the config: still drained
        self._roll_window(ledger, now, fetched)
        for index, window in enumerate(sub.extra_windows):
            bounds = balancer.extra_window_bounds(now, window)
            ledger.roll_extra(index, bounds, self._usage_log.spend_since(sub.id, bounds[0], fetched))
        ledger.add_clients(sum(1 for lease in self._leases.values() if lease.subscription_id == sub.id))
        return ledger

    def _drop_retired(self) -> None:
        """Forget removed subscriptions whose last client has gone."""
        for sid in [sid for sid in self._retired if self._ledgers[sid].live_clients <= 0]:
            del self._retired[sid], self._ledgers[sid]
            self._statuses.pop(sid, None)

    def _set_draining(self, subscription_id: str, draining: bool, now: float, batch: WriteBatch) -> int:
        ledger = self._ledgers.get(subscription_id)
        if ledger is None or subscription_id in self._retired:
            raise SubscriptionNotFound(subscription_id)
        resumed_at = ledger.flags.resumed_at if draining else now
        flags = SubscriptionFlags(subscription_id, draining=draining, resumed_at=resumed_at)
        ledger.set_flags(flags)
        self._flags[subscription_id] = flags
        batch.flags.append(flags)
        self._event(
            batch,
            now,
            EventType.ROTATION,
            subscription_id=subscription_id,
            attributes=(("phase", "draining" if draining else "resumed"),),
        )
        self._note_status(subscription_id, batch, now)
        return self._move_off_unservable(now, batch, only=subscription_id, cause="rotation")

    def _move_off_unservable(self, now: float, batch: WriteBatch, *, only: str = "", cause: str = "failover") -> int:
        """Move every lease whose subscription can no longer serve it (drained and idle, disabled, ...)."""
        moved = 0
        for lease in list(self._leases.values()):
            if lease.fallback or (only and lease.subscription_id != only) or lease.expires_at <= now:
                continue
            decision = balancer.decide_renewal(self._loads(now), self.spec, lease, now)
            if isinstance(decision, Placement) and decision.kind is not DecisionKind.STICKY:
                self._place(lease, decision, now, batch, cause=cause)
                moved += 1
        return moved

    # -- background work -----------------------------------------------------

    async def reap(self) -> int:
        """Expire leases past their time to live and prune old records; returns leases expired."""
        if not self._healthy:
            return 0
        return await self._apply(self._reap)

    def _reap(self, now: float, batch: WriteBatch) -> int:
        expired = [lease for lease in self._leases.values() if lease.expires_at <= now]
        for lease in expired:
            self._end(lease, now, batch, EventType.LEASE_EXPIRED)
        # Statuses that change with time alone (a cooldown running out) are
        # noticed here, within one reaper interval.
        for subscription_id in self._ledgers:
            self._note_status(subscription_id, batch, now)
        out_of_service = [sid for sid, ledger in self._ledgers.items() if ledger.flags.draining or ledger.disabled]
        for subscription_id in out_of_service:
            cause = "rotation" if self._ledgers[subscription_id].flags.draining else "failover"
            if subscription_id in self._retired:
                cause = "config"
            self._move_off_unservable(now, batch, only=subscription_id, cause=cause)
        self._drop_retired()
        if now - self._last_prune >= _PRUNE_EVERY_SECONDS:
            self._last_prune = now
            self._prune(now, batch)
        return len(expired)

    def _prune(self, now: float, batch: WriteBatch) -> None:
        # Never prune the current window: its spend is what budgets are checked against.
        usage_before = min(
            now - self.spec.usage_retention_seconds, *(ledger.window[0] for ledger in self._ledgers.values())
        )
        batch.prune = PruneHorizon(
            usage_before=usage_before,
            ended_leases_before=now - self.spec.ended_lease_retention_seconds,
            events_before=now - self.spec.event_retention_seconds,
        )
        self._forget(batch.prune)

    def _forget(self, horizon: PruneHorizon) -> None:
        """Drop from memory what `horizon` prunes (other replicas do it when they apply the write)."""
        self._usage_log.forget(horizon.usage_before)
        for lease_id in [lid for lid, ended in self._ended.items() if ended.ended_at < horizon.ended_leases_before]:
            del self._ended[lease_id]
        self.outbox.prune(horizon.events_before)

    async def _reap_forever(self) -> None:
        next_rebalance = self._clock() + self.spec.rebalancing.interval_seconds
        while True:
            # From the spec in force each time: a reloaded TTL changes how often leases are checked.
            interval = max(0.05, min(5.0, self.spec.lease_ttl_seconds / 4))
            await asyncio.sleep(interval)
            if not self.is_leader:
                continue  # another replica does it
            try:
                await self.reap()
                if self.spec.rebalancing.enabled and self._clock() >= next_rebalance:
                    next_rebalance = self._clock() + self.spec.rebalancing.interval_seconds
                    outcome = await self.rebalance(dry_run=False, trigger="periodic")
                    log.info("rebalancing cycle: %d moves (%s)", len(outcome.moves), outcome.reason)
            except StoreUnavailable:
                log.warning("background work skipped: the store is unavailable")
            except Exception:
                log.exception("background work failed; it runs again in %.1fs", interval)

    # -- webhook deliveries --------------------------------------------------

    async def record_delivery(self, attempt: Attempt) -> None:
        """Write how a delivery attempt went; a last failed attempt dead-letters the notification."""
        await self._apply(lambda now, batch: self._record_delivery(attempt, now, batch))

    def _record_delivery(self, attempt: Attempt, now: float, batch: WriteBatch) -> None:
        entry = self.outbox.record(attempt, now)
        if entry is None:
            return
        batch.outbox.append(entry)
        for observer in self._observers:
            observer.webhook_attempted(entry)
        if entry.state is DeliveryState.DEAD:
            self._event(
                batch,
                now,
                EventType.WEBHOOK_FAILURE,
                attributes=(
                    ("notification_id", entry.notification_id),
                    ("rule", entry.rule),
                    ("attempts", str(entry.attempts)),
                    ("last_error", entry.last_error),
                ),
            )

    # -- introspection -------------------------------------------------------

    def memory(self) -> dict[str, object]:
        """What the pool holds in memory, for /debug/memory: each should stay bounded."""
        return {
            "live_leases": len(self._leases),
            "ended_leases": len(self._ended),
            **self._usage_log.sizes(),
            "unsettled_writes": len(self._unsettled),
            "commit_queue_depth": (self._locked or self._committer).queue_depth,
            "watcher_backlogs": self.events.watcher_backlogs(),
        }

    def subscription_spec(self, subscription_id: str) -> SubscriptionSpec | None:
        ledger = self._ledgers.get(subscription_id)
        return None if ledger is None else ledger.spec
