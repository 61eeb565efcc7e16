"""Reading the `google.rpc` details a real server put on an error."""

from __future__ import annotations

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

_KINDS = (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.RetryInfo)


def error_details(error: grpc.aio.AioRpcError) -> dict[type[Message], Message]:
    """The `google.rpc` details of an error, by type (from grpc-status-details-bin)."""
    raw = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
    assert raw is not None, f"{error.code()} {error.details()!r} carries no google.rpc.Status"
    rich = status_pb2.Status.FromString(raw)
    assert rich.code == error.code().value[0]
    assert rich.message == error.details()
    found: dict[type[Message], Message] = {}
    for any_detail in rich.details:
        for kind in _KINDS:
            if any_detail.Is(kind.DESCRIPTOR):
                detail = kind()
                any_detail.Unpack(detail)
                found[kind] = detail
    assert len(found) == len(rich.details), f"unexpected detail types in {rich.details}"
    return found
