"""Which addresses are this machine's own: for development-only options that must stay local."""

from __future__ import annotations

import ipaddress

__all__ = ["is_loopback_host"]

LOOPBACK_NAMES = frozenset({"localhost"})


def is_loopback_host(host: str) -> bool:
    """Whether `host` (a name or an IP literal, brackets optional) is this machine: 127.0.0.0/8, ::1, localhost."""
    host = host.strip("[]").rstrip(".").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
