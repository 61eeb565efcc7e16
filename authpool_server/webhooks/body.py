"""The JSON body of a webhook notification, in the Standard Webhooks shape.

    {"type": "authpool.<rule>", "timestamp": "<event time, ISO 8601 UTC>",
     "data": {"id", "severity", "summary",
              "event": {"sequence", "type", "time", "subscriptionId", "clientId",
                        "leaseId", "fencingToken", "attributes"}}}

The body is built once, stored in the outbox and sent byte for byte on every
attempt, so a receiver that drops repeats by ``webhook-id`` sees one payload.
Building it is deterministic too: the same notification always gives the same
text (keys in a fixed order, attributes sorted, compact separators, ASCII).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from authpool_server.domain import Notification
from authpool_server.logs import mask_emails

__all__ = ["TYPE_PREFIX", "notification_body"]

TYPE_PREFIX = "authpool."


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def notification_body(n: Notification) -> str:
    """The request body for `n`, exactly as it is signed and sent."""
    event = n.event
    document = {
        "type": TYPE_PREFIX + n.rule,
        "timestamp": _iso(event.at),
        "data": {
            "id": n.id,
            "severity": str(n.severity),
            "summary": n.summary,
            "event": {
                "sequence": event.sequence,
                "type": str(event.type),
                "time": _iso(event.at),
                "subscriptionId": event.subscription_id,
                "clientId": event.client_id,
                "leaseId": event.lease_id,
                "fencingToken": event.fencing_token,
                "attributes": dict(sorted(event.attributes)),
            },
        },
    }
    text = json.dumps(document, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    # A second line of defence, as in the logs: summaries and attributes should hold
    # identifiers only. Masking the serialized text keeps it valid JSON, because the
    # pattern matches only letters, digits and `._%+-@` and only shortens a local part.
    return mask_emails(text)
