"""Which webhook URLs AuthPool will send to: HTTPS, or plain HTTP to this machine in development.

Never to a link-local or cloud-metadata address (169.254.169.254 and friends):
a webhook that reaches the instance metadata service can leak the machine's
cloud credentials (SSRF). The URL's host is checked when the config is
loaded (`check_webhook_url`), and the addresses it resolves to before every
delivery (`blocked_address`), so a DNS name pointing there is refused too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import SplitResult, urlsplit

from authpool_server.addresses import is_loopback_host

__all__ = [
    "BLOCKED_TARGET",
    "blocked_address",
    "check_webhook_url",
    "is_blocked_host",
    "is_loopback_host",
    "redacted_url",
    "resolves_to_blocked",
]

BLOCKED_TARGET = "must not point at a link-local or cloud-metadata address (169.254.0.0/16, fe80::/10, metadata hosts)"

# Cloud instance-metadata endpoints outside the link-local ranges.
_METADATA_ADDRESSES = frozenset(
    {
        ipaddress.ip_address("fd00:ec2::254"),  # AWS IMDS over IPv6
        ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
    }
)
_METADATA_NAMES = frozenset({"metadata.google.internal", "metadata.goog", "metadata", "instance-data"})


def _literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """`host` as an address if it is one, in any form the resolver accepts ("2852039166", "0xa9.254.169.254")."""
    host = host.strip("[]").split("%", 1)[0]
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


def blocked_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether a webhook may never be sent to `address`: link-local, unspecified or a metadata endpoint."""
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped or address.sixtofour
        if mapped is not None and blocked_address(mapped):
            return True
    return address.is_link_local or address.is_unspecified or address in _METADATA_ADDRESSES


def is_blocked_host(host: str) -> bool:
    """Whether the URL host `host` (a name or an address literal) is a blocked target, before any DNS."""
    name = host.strip("[]").rstrip(".").lower()
    if name in _METADATA_NAMES:
        return True
    address = _literal(name)
    return address is not None and blocked_address(address)


def _split(url: str) -> SplitResult | None:
    try:
        parts = urlsplit(url.strip())
        _ = parts.port  # raises ValueError for a port that is not a number in 0-65535
    except ValueError:
        return None
    return parts


def check_webhook_url(url: str, allow_insecure_loopback: bool) -> str | None:
    """What is wrong with `url` as a webhook endpoint, or None if it is acceptable.

    HTTPS only. Plain HTTP only when `allow_insecure_loopback` (a development
    flag) is set and the host is loopback. The problem text never repeats the
    URL: it may carry a token in its path or query.
    """
    parts = _split(url)
    if parts is None:
        return "is not a valid URL"
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        return "must be an https:// URL"
    if not parts.hostname:
        return "has no host"
    if is_blocked_host(parts.hostname):
        return BLOCKED_TARGET
    if scheme == "https":
        return None
    if not allow_insecure_loopback:
        return (
            "must be an https:// URL (http:// is allowed only for a loopback receiver "
            "when insecure loopback webhooks are enabled for development)"
        )
    if not is_loopback_host(parts.hostname):
        return "must be an https:// URL: http:// is allowed only for a loopback host (127.0.0.0/8, ::1, localhost)"
    return None


def redacted_url(url: str) -> str:
    """``scheme://host[:port]/…``: what may be shown of `url` (no user info, path or query)."""
    parts = _split(str(url))
    if parts is None or not parts.hostname:
        return "<webhook URL>"
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    port = f":{parts.port}" if parts.port is not None else ""
    rest = "/…" if (parts.path not in ("", "/") or parts.query or parts.fragment) else "/"
    return f"{parts.scheme}://{host}{port}{rest}"


async def resolves_to_blocked(url: str) -> bool:
    """Whether `url`'s host resolves to a blocked address (checked before each delivery).

    A name that does not resolve is not blocked here: the delivery fails on its own.
    The check and the connection resolve separately, so a DNS server answering
    differently within that moment could still slip through; names pointing at
    metadata endpoints, and every literal form of those addresses, are caught.
    """
    parts = _split(url)
    if parts is None or not parts.hostname:
        return False
    if is_blocked_host(parts.hostname):
        return True
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    for *_, sockaddr in infos:
        address = _literal(str(sockaddr[0]))
        if address is not None and blocked_address(address):
            return True
    return False
