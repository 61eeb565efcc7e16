"""The webhook channel's HTTP side: signing, the body, one delivery attempt, the retry schedule.

Durable delivery (the outbox, the dispatcher loop, dead-lettering) lives with
the pool and the store; this package does no storage and keeps no state
between attempts.

- `signing`: Standard Webhooks ``whsec_`` secrets and ``webhook-signature``.
- `body`: a `Notification` as the JSON body that is stored, signed and sent.
- `sender`: `WebhookSender.deliver` (one HTTPS attempt), `RetryPolicy`, `backoff`.
- `urls`: `check_webhook_url`, the HTTPS-only rule the config enforces.
"""

from authpool_server.webhooks.body import notification_body
from authpool_server.webhooks.sender import (
    USER_AGENT,
    DeliveryResult,
    RetryPolicy,
    WebhookSender,
    backoff,
    load_ca_bundle,
)
from authpool_server.webhooks.signing import MIN_KEY_BYTES, WebhookSecret, generate_secret, sign
from authpool_server.webhooks.urls import check_webhook_url, is_loopback_host, redacted_url

__all__ = [
    "MIN_KEY_BYTES",
    "USER_AGENT",
    "DeliveryResult",
    "RetryPolicy",
    "WebhookSecret",
    "WebhookSender",
    "backoff",
    "check_webhook_url",
    "generate_secret",
    "is_loopback_host",
    "load_ca_bundle",
    "notification_body",
    "redacted_url",
    "sign",
]
