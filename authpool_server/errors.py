"""The one error hierarchy of the server.

    AuthPoolError                  every error a caller can see
    ├── InvalidArgument            INVALID_ARGUMENT, with the offending fields
    ├── LeaseNotFound              NOT_FOUND
    ├── SubscriptionNotFound       NOT_FOUND
    ├── StaleFencingToken          ABORTED: another holder owns the lease now
    ├── PoolExhausted              RESOURCE_EXHAUSTED, with a retry delay
    ├── EventsCompacted            OUT_OF_RANGE: resume from the oldest retained event
    ├── SequenceAhead              OUT_OF_RANGE: the cursor is past the log's end
    ├── StoreUnavailable           UNAVAILABLE: the store failed; retrying is safe
    ├── WatcherLagged              ABORTED: a watcher fell behind; resume from its last sequence
    ├── ShuttingDown               UNAVAILABLE: the server is stopping; a watcher resumes elsewhere
    ├── Unauthenticated            UNAUTHENTICATED: no credentials, or unknown ones
    ├── PermissionDenied           PERMISSION_DENIED: the caller's role may not call this method
    └── RateLimited                RESOURCE_EXHAUSTED, with a retry delay

Each error carries a stable UPPER_SNAKE `reason` (AIP-193). Mapping to gRPC
statuses happens in one place, `rpc_errors.py`; nothing here knows gRPC.
Messages never contain secrets.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AuthPoolError",
    "EventsCompacted",
    "FieldViolation",
    "InvalidArgument",
    "LeaseNotFound",
    "PermissionDenied",
    "PoolExhausted",
    "RateLimited",
    "SequenceAhead",
    "ShuttingDown",
    "StaleFencingToken",
    "StoreUnavailable",
    "SubscriptionNotFound",
    "Unauthenticated",
    "WatcherLagged",
]

FieldViolation = tuple[str, str]  # (field path, what is wrong with it)


class AuthPoolError(Exception):
    reason = "INTERNAL"

    def __init__(self, message: str, **metadata: str) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = metadata


class InvalidArgument(AuthPoolError):
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: Sequence[FieldViolation]) -> None:
        self.violations = list(violations)
        super().__init__("; ".join(f"{field}: {what}" for field, what in self.violations))


class LeaseNotFound(AuthPoolError):
    reason = "LEASE_NOT_FOUND"

    def __init__(self, lease_id: str) -> None:
        super().__init__(f"lease_id: no live lease {lease_id!r}", lease_id=lease_id)


class SubscriptionNotFound(AuthPoolError):
    reason = "SUBSCRIPTION_NOT_FOUND"

    def __init__(self, subscription_id: str) -> None:
        super().__init__(f"subscription_id: no subscription {subscription_id!r} in the pool")


class StaleFencingToken(AuthPoolError):
    reason = "STALE_FENCING_TOKEN"

    def __init__(self, lease_id: str, presented: int, accepted_from: int, current: int) -> None:
        super().__init__(
            f"fencing_token: {presented} is stale for lease {lease_id!r}; "
            f"the holder has been told of token {accepted_from}, the lease is at {current}",
            lease_id=lease_id,
            current_fencing_token=str(current),
        )


class PoolExhausted(AuthPoolError):
    reason = "POOL_EXHAUSTED"

    def __init__(self, message: str, retry_after_seconds: float) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class EventsCompacted(AuthPoolError):
    reason = "EVENTS_COMPACTED"

    def __init__(self, requested: int, oldest: int) -> None:
        super().__init__(
            f"after_sequence: events after {requested} were compacted away; "
            f"the oldest retained event is {oldest}, resume from after_sequence={oldest - 1}",
            oldest_sequence=str(oldest),
        )


class SequenceAhead(AuthPoolError):
    reason = "SEQUENCE_AHEAD"

    def __init__(self, requested: int, last: int) -> None:
        super().__init__(
            f"after_sequence: {requested} is past the newest event {last}; was the store restored "
            "from a backup? Resume from a sequence you have seen from this server",
            last_sequence=str(last),
        )


class StoreUnavailable(AuthPoolError):
    reason = "STORE_UNAVAILABLE"


class WatcherLagged(AuthPoolError):
    reason = "WATCHER_LAGGED"

    def __init__(self, last_sequence: int) -> None:
        super().__init__(
            f"the watcher fell too far behind the event log; resume with after_sequence={last_sequence}",
            resume_after_sequence=str(last_sequence),
        )


class ShuttingDown(AuthPoolError):
    reason = "SHUTTING_DOWN"

    def __init__(self, last_sequence: int) -> None:
        super().__init__(
            f"the server is shutting down; resume with after_sequence={last_sequence} (here after the restart, "
            "or on another replica)",
            resume_after_sequence=str(last_sequence),
        )


class Unauthenticated(AuthPoolError):
    reason = "UNAUTHENTICATED"


class PermissionDenied(AuthPoolError):
    reason = "PERMISSION_DENIED"

    def __init__(self, method: str, role: str, needed: str | None) -> None:
        """`needed` None: a method no role may call (one missing from the role table, or a closed service's)."""
        super().__init__(
            f"{method} needs the {needed} role; this caller has {role}"
            if needed is not None
            else f"{method} is open to no role; this caller has {role}",
            method=method,
            role=role,
            required_role=needed or "none",
        )


class RateLimited(AuthPoolError):
    reason = "RATE_LIMITED"

    def __init__(self, principal: str, retry_after_seconds: float) -> None:
        super().__init__(
            f"too many calls from {principal}; retry after {retry_after_seconds:.3f} s",
            principal=principal,
        )
        self.retry_after_seconds = retry_after_seconds


class StartupRefused(Exception):
    """The server will not start as configured (not a caller's error: never sent on the wire)."""
