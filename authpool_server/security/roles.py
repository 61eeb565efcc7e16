"""Roles and the one table of which role each RPC needs.

Roles nest: an operator can do everything a client can, an admin everything
an operator can. A method missing from the table is refused to everyone
(a new RPC must be given a role on purpose), except the services the
configuration leaves open (health and reflection by default).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["METHOD_ROLES", "Principal", "Role", "required_role"]

_SERVICE = "/authpool.v1.AuthPool/"


class Role(enum.IntEnum):
    CLIENT = 1
    OPERATOR = 2
    ADMIN = 3

    def __str__(self) -> str:
        return self.name.lower()

    @classmethod
    def named(cls, name: str) -> Role:
        return cls[name.upper()]


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. `name` appears in access logs, spans and rate limits; never a secret."""

    name: str
    role: Role


METHOD_ROLES: dict[str, Role] = {
    _SERVICE + "Allocate": Role.CLIENT,
    _SERVICE + "Renew": Role.CLIENT,
    _SERVICE + "Release": Role.CLIENT,
    _SERVICE + "ReportUsage": Role.CLIENT,
    _SERVICE + "Status": Role.OPERATOR,
    _SERVICE + "WatchEvents": Role.OPERATOR,
    _SERVICE + "Rebalance": Role.OPERATOR,
    _SERVICE + "DrainSubscription": Role.ADMIN,
    _SERVICE + "ResumeSubscription": Role.ADMIN,
}


def required_role(method: str) -> Role | None:
    """The least role that may call `method` (a full gRPC path), or None if nobody may."""
    return METHOD_ROLES.get(method)
