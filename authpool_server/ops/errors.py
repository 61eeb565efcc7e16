"""Failures of the operator commands, each told as one line: the gRPC status, AuthPool's reason, a hint.

An operator (or a script) reads the status code first: `UNAVAILABLE` means
try again, `UNAUTHENTICATED` means fix the token, `NOT_FOUND` means fix the
argument. So the line leads with it, then AuthPool's `ErrorInfo.reason` when
it says more than the code, the server's message, and what to do next.
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

__all__ = ["OpsError", "describe_rpc_error"]


class OpsError(Exception):
    """A failure to report as one line on stderr with `exit_code`: 1 for a failed call, 2 for a usage error."""

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _error_info(error: grpc.Call) -> error_details_pb2.ErrorInfo | None:
    raw = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
    if not isinstance(raw, bytes):
        return None  # raised by grpc itself (no connection, deadline): no details
    for detail in status_pb2.Status.FromString(raw).details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def _hint(code: grpc.StatusCode, info: error_details_pb2.ErrorInfo | None, target: str, has_token: bool) -> str:
    resume = info.metadata.get("resume_after_sequence") if info is not None else None
    if info is not None and info.reason == "EVENTS_COMPACTED":
        resume = str(int(info.metadata["oldest_sequence"]) - 1)
    if resume is not None:
        return f"resume with --from-sequence {resume}"
    if code is grpc.StatusCode.UNAUTHENTICATED:
        if has_token:
            return "the server does not know this token"
        return "no token was given: set AUTHPOOL_TOKEN or pass --token-file"
    if code is grpc.StatusCode.UNAVAILABLE:
        return f"is the server at {target} up, and is it plaintext or TLS (--ca, --tls)?"
    return ""


def describe_rpc_error(error: grpc.RpcError, *, target: str, has_token: bool) -> str:
    """`CODE (REASON): message; hint`, on one line, for a failed call. Never contains the token."""
    assert isinstance(error, grpc.Call)  # every RpcError a channel raises is also its Call
    code = error.code()
    info = _error_info(error)
    head = code.name if info is None or info.reason == code.name else f"{code.name} ({info.reason})"
    message = " ".join((error.details() or "").split())  # one line, whatever the server wrote
    if code is grpc.StatusCode.DEADLINE_EXCEEDED and info is None:
        message = f"no answer from {target} in time (--timeout)"
    hint = _hint(code, info, target, has_token)
    return head + (f": {message}" if message else "") + (f"; {hint}" if hint else "")
