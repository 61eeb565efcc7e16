"""Map the server's errors to gRPC statuses with `google.rpc` details (AIP-193).

The one place that knows how an `AuthPoolError` looks on the wire: the code,
an `ErrorInfo` with the stable reason on every error, a `BadRequest` for
field violations and a `RetryInfo` where retrying later helps.
"""

from __future__ import annotations

import math

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from authpool_server import errors

__all__ = ["DOMAIN", "to_status"]

DOMAIN = "authpool.v1"

_CODES: dict[type[errors.AuthPoolError], int] = {
    errors.InvalidArgument: code_pb2.INVALID_ARGUMENT,
    errors.LeaseNotFound: code_pb2.NOT_FOUND,
    errors.SubscriptionNotFound: code_pb2.NOT_FOUND,
    errors.StaleFencingToken: code_pb2.ABORTED,
    errors.PoolExhausted: code_pb2.RESOURCE_EXHAUSTED,
    errors.EventsCompacted: code_pb2.OUT_OF_RANGE,
    errors.SequenceAhead: code_pb2.OUT_OF_RANGE,
    errors.StoreUnavailable: code_pb2.UNAVAILABLE,
    errors.WatcherLagged: code_pb2.ABORTED,
    errors.ShuttingDown: code_pb2.UNAVAILABLE,
    errors.Unauthenticated: code_pb2.UNAUTHENTICATED,
    errors.PermissionDenied: code_pb2.PERMISSION_DENIED,
    errors.RateLimited: code_pb2.RESOURCE_EXHAUSTED,
}


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def to_status(error: errors.AuthPoolError) -> grpc.Status:
    """The gRPC status, with details, that reports `error` to the caller."""
    code = _CODES.get(type(error), code_pb2.INTERNAL)
    details = [
        _pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata)),
    ]
    if isinstance(error, errors.InvalidArgument):
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
                        for field, description in error.violations
                    ]
                )
            )
        )
    if isinstance(error, errors.PoolExhausted):
        delay = duration_pb2.Duration(seconds=math.ceil(error.retry_after_seconds))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    if isinstance(error, errors.RateLimited):
        # Sub-second precision: a bucket refills in milliseconds, and a caller
        # told "1 s" would idle through most of its quota.
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(1_000_000, math.ceil(error.retry_after_seconds * 1e9)))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    return rpc_status.to_status(status_pb2.Status(code=code, message=error.message, details=details))
