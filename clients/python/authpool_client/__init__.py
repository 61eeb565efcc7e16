"""The Python client of AuthPool, the credential-pool service.

Lease a credential for as long as a block of work runs::

    from authpool_client import AuthPoolClient

    with AuthPoolClient("127.0.0.1:50051", token=TOKEN, insecure=True) as client:
        with client.lease("worker-7") as lease:
            run_with(lease.credential_ref)
            lease.report_usage(25_000, model="claude-sonnet-4")  # micro-units: 0.025 USD

The lease is renewed in the background and released on exit, also when the
body raises (or, with `AsyncAuthPoolClient` and `async with`, is cancelled).
Every call has a deadline, UNAVAILABLE is retried by the channel itself, and
errors are the typed exceptions below, with the server's `google.rpc` details.

The generated messages and stubs are in `authpool_client.api`
(`authpool_pb2`, `authpool_pb2_grpc`), for anything the wrapper leaves out.
"""

from authpool_client._async_client import AsyncAuthPoolClient, AsyncLease
from authpool_client._channel import RetryPolicy
from authpool_client._client import DEFAULT_TIMEOUT, AuthPoolClient, Lease
from authpool_client._errors import (
    AuthPoolError,
    DeadlineExceeded,
    FieldViolation,
    InvalidArgument,
    LeaseLost,
    NotFound,
    PermissionDenied,
    PoolExhausted,
    RateLimited,
    ResourceExhausted,
    StaleFencingToken,
    Unauthenticated,
    Unavailable,
)
from authpool_client._models import Decision, LeaseInfo, Outcome, UsageReceipt
from authpool_client.api import authpool_pb2, authpool_pb2_grpc

__all__ = [
    "DEFAULT_TIMEOUT",
    "AsyncAuthPoolClient",
    "AsyncLease",
    "AuthPoolClient",
    "AuthPoolError",
    "DeadlineExceeded",
    "Decision",
    "FieldViolation",
    "InvalidArgument",
    "Lease",
    "LeaseInfo",
    "LeaseLost",
    "NotFound",
    "Outcome",
    "PermissionDenied",
    "PoolExhausted",
    "RateLimited",
    "ResourceExhausted",
    "RetryPolicy",
    "StaleFencingToken",
    "Unauthenticated",
    "Unavailable",
    "UsageReceipt",
    "authpool_pb2",
    "authpool_pb2_grpc",
]
