"""The client's one error hierarchy, rebuilt from the `google.rpc` details the server sends.

    AuthPoolError                 every failed call (`code`, `reason`, `metadata`, `retry_delay`, ...)
    ├── InvalidArgument           INVALID_ARGUMENT; `field_violations` names each bad field
    ├── NotFound                  NOT_FOUND (LEASE_NOT_FOUND, SUBSCRIPTION_NOT_FOUND)
    ├── StaleFencingToken         ABORTED (STALE_FENCING_TOKEN): another holder owns the lease now
    ├── ResourceExhausted         RESOURCE_EXHAUSTED; `retry_delay` says when to try again
    │   ├── PoolExhausted         POOL_EXHAUSTED: every subscription is spent, no fallback
    │   └── RateLimited           RATE_LIMITED: this caller sent too many calls
    ├── Unauthenticated           UNAUTHENTICATED: no token, or an unknown one
    ├── PermissionDenied          PERMISSION_DENIED: the token's role may not call this method
    ├── Unavailable               UNAVAILABLE after the channel's retries ran out
    ├── DeadlineExceeded          DEADLINE_EXCEEDED: the call's deadline passed
    └── LeaseLost                 raised by the library: a held lease can no longer be renewed

The server encodes details as AIP-193 says (see `authpool_server/rpc_errors.py`):
an `ErrorInfo` (domain `authpool.v1`, UPPER_SNAKE `reason`, `metadata`) on
every error it raises itself, a `BadRequest` for INVALID_ARGUMENT and a
`RetryInfo` for RESOURCE_EXHAUSTED. Errors raised by the gRPC layer (an
unreachable server, a message too large) carry only the code; `reason` is then
the code's name.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

import grpc
from google.rpc import error_details_pb2, status_pb2

__all__ = [
    "AuthPoolError",
    "DeadlineExceeded",
    "FieldViolation",
    "InvalidArgument",
    "LeaseLost",
    "NotFound",
    "PermissionDenied",
    "PoolExhausted",
    "RateLimited",
    "ResourceExhausted",
    "StaleFencingToken",
    "Unauthenticated",
    "Unavailable",
    "from_rpc_error",
]

_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request, from the error's `google.rpc.BadRequest`."""

    field: str
    description: str


class AuthPoolError(Exception):
    """A call failed; what the server said, typed.

    Attributes:
        code: The gRPC status code.
        message: The status message, for people.
        reason: The stable `ErrorInfo.reason` (e.g. "LEASE_NOT_FOUND"), or the
            code's name when the server attached none.
        domain: The `ErrorInfo.domain` ("authpool.v1"), or "" when absent.
        metadata: The `ErrorInfo.metadata`, e.g. {"required_role": "operator"}.
        retry_delay: Seconds to wait before retrying, from a `RetryInfo`, or None.
        field_violations: Each bad field, from a `BadRequest` (INVALID_ARGUMENT).
        status: The whole `google.rpc.Status`, or None when the error carried none.
    """

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
        reason: str = "",
        domain: str = "",
        metadata: dict[str, str] | None = None,
        retry_delay: float | None = None,
        field_violations: tuple[FieldViolation, ...] = (),
        status: status_pb2.Status | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason or code.name
        self.domain = domain
        self.metadata = dict(metadata or {})
        self.retry_delay = retry_delay
        self.field_violations = field_violations
        self.status = status

    def __str__(self) -> str:
        return f"{self.code.name} ({self.reason}): {self.message}"


class InvalidArgument(AuthPoolError):
    """The request was refused as malformed; nothing changed. `field_violations` says what to fix."""


class NotFound(AuthPoolError):
    """The lease or subscription named does not exist (any more)."""


class StaleFencingToken(AuthPoolError):
    """The fencing token presented is stale: the lease moved on and someone else holds it."""


class ResourceExhausted(AuthPoolError):
    """Try again after `retry_delay` seconds."""


class PoolExhausted(ResourceExhausted):
    """Every subscription is spent and the pool has no fallback for new clients."""


class RateLimited(ResourceExhausted):
    """This caller exceeded its rate limit."""


class Unauthenticated(AuthPoolError):
    """No bearer token was sent, or the server does not know it."""


class PermissionDenied(AuthPoolError):
    """The token's role may not call this method (`metadata["required_role"]` says which may)."""


class Unavailable(AuthPoolError):
    """The server could not be reached (or is shutting down) and the channel's retries ran out."""


class DeadlineExceeded(AuthPoolError):
    """The call did not finish within its deadline."""


class LeaseLost(AuthPoolError):
    """A held lease can no longer be renewed: it expired, was released by someone else, or moved to another holder.

    Stop using its credential. `cause` is the error that showed it, when a call did.
    """

    def __init__(self, message: str, *, lease_id: str, cause: AuthPoolError | None = None) -> None:
        super().__init__(
            message,
            code=cause.code if cause is not None else grpc.StatusCode.NOT_FOUND,
            reason=cause.reason if cause is not None else "LEASE_EXPIRED",
            domain=cause.domain if cause is not None else "",
            metadata={**(cause.metadata if cause is not None else {}), "lease_id": lease_id},
            status=cause.status if cause is not None else None,
        )
        self.lease_id = lease_id
        self.cause = cause


_BY_REASON: dict[str, type[AuthPoolError]] = {
    "POOL_EXHAUSTED": PoolExhausted,
    "RATE_LIMITED": RateLimited,
    "STALE_FENCING_TOKEN": StaleFencingToken,
}
_BY_CODE: dict[grpc.StatusCode, type[AuthPoolError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def _rich_status(error: grpc.RpcError) -> status_pb2.Status | None:
    # Both grpc.RpcError (sync, also a grpc.Call) and grpc.aio.AioRpcError have trailing_metadata(),
    # as (key, value) pairs; values of "-bin" keys are bytes.
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in cast("Iterable[tuple[str, str | bytes]]", trailing or ()):
        if key == _DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except Exception:  # a garbled detail must not hide the error itself
                return None
    return None


def from_rpc_error(error: grpc.RpcError) -> AuthPoolError:
    """The typed error for a failed call, with the details the server attached."""
    code: grpc.StatusCode = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message: str = (error.details() if hasattr(error, "details") else None) or ""
    status = _rich_status(error)
    reason = domain = ""
    metadata: dict[str, str] = {}
    retry_delay: float | None = None
    violations: list[FieldViolation] = []
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_delay = retry.retry_delay.ToNanoseconds() / 1e9
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
    kind = _BY_REASON.get(reason) or _BY_CODE.get(code, AuthPoolError)
    return kind(
        message,
        code=code,
        reason=reason,
        domain=domain,
        metadata=metadata,
        retry_delay=retry_delay,
        field_violations=tuple(violations),
        status=status,
    )
