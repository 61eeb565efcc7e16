"""Which webhook URLs AuthPool will send to: HTTPS, or plain HTTP to this machine in development."""

from __future__ import annotations

from urllib.parse import SplitResult, urlsplit

from authpool_server.addresses import is_loopback_host

__all__ = ["check_webhook_url", "is_loopback_host", "redacted_url"]


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
