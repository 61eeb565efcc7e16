"""Splitting gRPC method paths: `/authpool.v1.AuthPool/Allocate` into service and method."""

from __future__ import annotations

__all__ = ["method_name", "service_of"]


def service_of(method: str) -> str:
    """`/authpool.v1.AuthPool/Allocate` -> `authpool.v1.AuthPool`."""
    return method[1:].partition("/")[0]


def method_name(method: str) -> str:
    """`/authpool.v1.AuthPool/Allocate` -> `Allocate`."""
    return method.rpartition("/")[2]
