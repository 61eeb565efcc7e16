"""Optional error reporting to Sentry: on when `SENTRY_DSN` is set and `sentry-sdk` is installed.

`pip install 'authpool[sentry]'` adds the SDK. Errors logged at ERROR level
(unexpected exceptions in handlers and background work) become Sentry
events. Sentry's own tracing stays off (spans go to OpenTelemetry), so no
transactions are made or sent. Nothing personal or secret is sent: no
default PII, no local variables of stack frames (a frame may hold a token),
and events pass through the same email masking as the logs. This is written
for sentry-sdk 3, whose defaults collect more than 2's did (`data_collection`).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from authpool_server import __version__
from authpool_server.logs import mask_emails

if TYPE_CHECKING:
    from sentry_sdk.integrations import Integration

__all__ = ["init_sentry"]

log = logging.getLogger(__name__)


# sentry-sdk 3 collects user details, headers, bodies and the local variables of stack
# frames unless told not to. A frame may hold a token, and a request to the admin port
# carries one in its headers: none of it is sent. (The SDK ignores a key it does not
# know, so a misspelt one here would silently leave its category at the default.)
_COLLECT_NOTHING_PERSONAL = {
    "user_info": False,
    "cookies": {"mode": "off"},
    "http_headers": {"request": {"mode": "off"}},
    "http_bodies": [],
    "url_query_params": {"mode": "off"},
    "stack_frame_variables": False,
    "database_query_data": False,
    "queues": False,
    "graphql": {"document": False, "variables": False},
    "gen_ai": {"inputs": False, "outputs": False},
    "mcp": {"inputs": False, "outputs": False},
}
# Integrations sentry-sdk turns on by itself when their package is installed, kept off:
# - aiohttp (the admin port) makes and sends a span for every request whose caller sent a
#   sampled `sentry-trace` header, whatever `traces_sample_rate` says;
# - httpx (webhook delivery) records each request's full URL as a breadcrumb, and a
#   webhook URL's path may hold its secret (the sender's own log lines redact it).
_UNWANTED_INTEGRATIONS = (
    ("sentry_sdk.integrations.aiohttp", "AioHttpIntegration"),
    ("sentry_sdk.integrations.httpx", "HttpxIntegration"),
)
# Values under keys like these are never sent, whatever a log line's context holds: the
# second line of defence that sentry-sdk 2 had built in (3 has none) against a secret
# logged by mistake.
_SECRET_KEY_PARTS = ("token", "secret", "password", "passwd", "authorization", "credential", "api_key", "apikey")
_FILTERED = "[Filtered]"


def _is_secret_key(key: object) -> bool:
    return isinstance(key, str) and any(part in key.lower() for part in _SECRET_KEY_PARTS)


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return mask_emails(value)
    if isinstance(value, dict):
        return {key: _FILTERED if _is_secret_key(key) else _scrub(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_scrub(item) for item in value]
    return value


def _unwanted_integrations() -> list[type[Integration]]:
    """The integrations of `_UNWANTED_INTEGRATIONS` that sentry-sdk could turn on here."""
    from sentry_sdk.integrations import DidNotEnable

    found = []
    for module, name in _UNWANTED_INTEGRATIONS:
        # Its package missing or unsupported, the SDK cannot turn it on either.
        with contextlib.suppress(ImportError, DidNotEnable):
            found.append(getattr(importlib.import_module(module), name))
    return found


def _before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
    return _scrub(event)  # type: ignore[no-any-return]


def init_sentry(env: Mapping[str, str]) -> bool:
    """Start reporting errors to Sentry if the environment asks for it; says whether it did."""
    dsn = env.get("SENTRY_DSN", "").strip()
    if not dsn:
        return False
    try:
        import sentry_sdk
    except ImportError:
        log.warning("SENTRY_DSN is set but sentry-sdk is not installed (pip install 'authpool[sentry]'); not reporting")
        return False
    from sentry_sdk.integrations.logging import LoggingIntegration

    sentry_sdk.init(
        dsn=dsn,
        release=f"authpool@{__version__}",
        environment=env.get("SENTRY_ENVIRONMENT") or None,
        # sentry-sdk 3 no longer reports logged errors by default: ERROR lines become
        # events, INFO and above breadcrumbs, and none goes to Sentry's own log product.
        integrations=[LoggingIntegration(level=None, event_level=logging.ERROR, breadcrumb_level=logging.INFO)],
        disabled_integrations=_unwanted_integrations(),
        data_collection=_COLLECT_NOTHING_PERSONAL,
        # Tracing goes to OpenTelemetry. No sample rate means no Sentry tracing at
        # all; a rate of 0 would still make (and drop, and report dropping) a
        # span for every admin-port request.
        traces_sample_rate=None,
        trace_propagation_targets=[],  # nor sentry-trace/baggage headers on outgoing requests
        before_send=_before_send,
        before_breadcrumb=lambda crumb, hint: _scrub(crumb),
    )
    log.info("reporting errors to Sentry")
    return True
