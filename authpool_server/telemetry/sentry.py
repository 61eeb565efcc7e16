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

import logging
from collections.abc import Mapping
from typing import Any

from authpool_server import __version__
from authpool_server.logs import mask_emails

__all__ = ["init_sentry"]

log = logging.getLogger(__name__)


# sentry-sdk 3 collects user details, headers, bodies and the local variables of stack
# frames unless told not to. A frame may hold a token, and a request to the admin port
# carries one in its headers: none of it is sent.
_COLLECT_NOTHING_PERSONAL = {
    "user_info": False,
    "cookies": {"mode": "off"},
    "http_headers": {"request": {"mode": "off"}},
    "http_bodies": [],
    "url_query_params": {"mode": "off"},
    "stack_frame_variables": False,
    "database_query_data": False,
}


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return mask_emails(value)
    if isinstance(value, dict):
        return {key: _scrub(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_scrub(item) for item in value]
    return value


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
