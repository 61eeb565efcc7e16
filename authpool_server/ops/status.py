"""`authpool status`: the pool at a glance, from the `Status` RPC.

One row per subscription (status, health, a usage/budget bar, live clients,
projected end-of-window spend and when the threshold will be reached), the
pool's totals below, and with `--clients` every live lease.
"""

from __future__ import annotations

from typing import Any

from rich.console import JustifyMethod
from rich.table import Table
from rich.text import Text

from authpool_server.api import authpool_pb2 as pb
from authpool_server.ops.connection import Session
from authpool_server.ops.output import Output, bar, clock_time, duration, enum_name, money, timestamp

__all__ = ["lease_document", "run_status", "status_document"]

_STATUS_STYLE = {
    "active": "green",
    "limited": "yellow",
    "draining": "cyan",
    "exhausted": "red",
    "disabled": "bold red",
}


def _health_style(score: int) -> str:
    # The guide's lines: above 70 is the target, below 50 an alert.
    return "green" if score > 70 else "yellow" if score >= 50 else "red"


def subscription_document(state: pb.SubscriptionState) -> dict[str, Any]:
    return {
        "subscription_id": state.subscription_id,
        "type": state.type,
        "masked_email": state.masked_email,
        "status": enum_name(pb.SubscriptionStatus, state.status),
        "health_score": state.health_score,
        "live_clients": state.live_clients,
        "max_clients": state.max_clients,
        "weekly_usage_micros": state.weekly_usage_micros,
        "weekly_budget_micros": state.weekly_budget_micros,
        "utilization": state.utilization,
        "spend_rate_micros_per_hour": state.spend_rate_micros_per_hour,
        "projected_window_usage_micros": state.projected_window_usage_micros,
        "seconds_to_threshold": state.seconds_to_threshold if state.HasField("seconds_to_threshold") else None,
        "recent_error_rate": state.recent_error_rate,
        "window_start": timestamp(state.window_start),
        "window_end": timestamp(state.window_end),
    }


def lease_document(lease: pb.Lease) -> dict[str, Any]:
    return {
        "lease_id": lease.lease_id,
        "client_id": lease.client_id,
        "session_id": lease.session_id,
        "subscription_id": lease.subscription_id,
        "subscription_type": lease.subscription_type,
        "credential_ref": lease.credential_ref,
        "fallback": lease.fallback,
        "fencing_token": lease.fencing_token,
        "granted_at": timestamp(lease.granted_at),
        "expires_at": timestamp(lease.expires_at),
        "labels": dict(sorted(lease.labels.items())),
    }


def status_document(reply: pb.StatusResponse, *, include_clients: bool) -> dict[str, Any]:
    """The reply as JSON with stable keys; `clients` only when asked for, so its absence means "not asked"."""
    totals = reply.totals
    webhooks = reply.webhooks
    document: dict[str, Any] = {
        "as_of": timestamp(reply.as_of),
        "subscriptions": [subscription_document(state) for state in reply.subscriptions],
        "totals": {
            "subscriptions": totals.subscriptions,
            "active_subscriptions": totals.active_subscriptions,
            "live_clients": totals.live_clients,
            "fallback_clients": totals.fallback_clients,
            "weekly_usage_micros": totals.weekly_usage_micros,
            "weekly_budget_micros": totals.weekly_budget_micros,
            "fallback_usage_micros": totals.fallback_usage_micros,
            "average_health": totals.average_health,
            "last_sequence": totals.last_sequence,
        },
        "webhooks": {
            "enabled": webhooks.enabled,
            "pending": webhooks.pending,
            "delivered": webhooks.delivered,
            "dead_lettered": webhooks.dead_lettered,
            "recent_dead_letters": [
                {
                    "notification_id": dead.notification_id,
                    "event_sequence": dead.event_sequence,
                    "rule": dead.rule,
                    "attempts": dead.attempts,
                    "last_error": dead.last_error,
                    "failed_at": timestamp(dead.failed_at),
                }
                for dead in webhooks.recent_dead_letters
            ],
        },
    }
    if include_clients:
        document["clients"] = [lease_document(lease) for lease in reply.clients]
    return document


def _usage_cell(state: pb.SubscriptionState, style: str) -> Text:
    share = state.weekly_usage_micros / state.weekly_budget_micros if state.weekly_budget_micros else 0.0
    return Text.assemble(
        bar(share, style=style),
        f" {money(state.weekly_usage_micros)} / {money(state.weekly_budget_micros)} ({share:.0%})",
    )


def _projection_cells(state: pb.SubscriptionState, as_of: float) -> tuple[Text, Text]:
    """Projected end-of-window spend, and when the threshold is reached: yellow when before the window ends."""
    projected = state.projected_window_usage_micros
    style = "red" if projected > state.weekly_budget_micros else ""
    if not state.HasField("seconds_to_threshold"):
        return Text(money(projected), style), Text("-", "dim")  # nothing spent lately: no rate, no date
    seconds = state.seconds_to_threshold
    if seconds == 0:
        return Text(money(projected), style or "yellow"), Text("reached", "yellow")
    before_reset = as_of + seconds < state.window_end.seconds
    warn = "yellow" if before_reset else ""
    return Text(money(projected), style or warn), Text(f"in {duration(seconds)}", warn)


def _subscriptions_table(reply: pb.StatusResponse) -> Table:
    table = Table(title=f"AuthPool status as of {clock_time(reply.as_of)}", title_justify="left")
    right: JustifyMethod = "right"
    for header in ("Subscription", "Type", "Status", "Health", "Usage / budget"):
        table.add_column(header, justify=right if header == "Health" else "left", no_wrap=True)
    for header in ("Clients", "Projected", "To threshold"):
        table.add_column(header, justify=right, no_wrap=True)
    as_of = reply.as_of.seconds
    for state in reply.subscriptions:
        status = enum_name(pb.SubscriptionStatus, state.status)
        style = _STATUS_STYLE.get(status, "")
        projected, threshold = _projection_cells(state, as_of)
        table.add_row(
            state.subscription_id,
            state.type,
            Text(status, style),
            Text(str(state.health_score), _health_style(state.health_score)),
            _usage_cell(state, style),
            f"{state.live_clients} / {state.max_clients}",
            projected,
            threshold,
        )
    return table


def _totals_line(reply: pb.StatusResponse) -> str:
    t = reply.totals
    share = t.weekly_usage_micros / t.weekly_budget_micros if t.weekly_budget_micros else 0.0
    return (
        f"Pool: {t.active_subscriptions} of {t.subscriptions} subscriptions active · "
        f"{t.live_clients} live clients, {t.fallback_clients} on the fallback · "
        f"usage {money(t.weekly_usage_micros)} / {money(t.weekly_budget_micros)} ({share:.0%}) · "
        f"fallback spend {money(t.fallback_usage_micros)} · average health {t.average_health:.0f} · "
        f"last event {t.last_sequence}"
    )


def _webhooks_line(webhooks: pb.WebhookState) -> str:
    line = (
        f"Webhooks: {webhooks.pending} pending, {webhooks.delivered} delivered, {webhooks.dead_lettered} dead-lettered"
    )
    if webhooks.recent_dead_letters:
        latest = webhooks.recent_dead_letters[0]
        line += f" (latest {latest.notification_id}, rule {latest.rule}: {latest.last_error})"
    return line


def _expiry(lease: pb.Lease, as_of: int) -> str:
    left = lease.expires_at.seconds - as_of
    return f"in {duration(left)}" if left > 0 else "now"


def _clients_table(reply: pb.StatusResponse) -> Table:
    table = Table(title=f"Live leases ({len(reply.clients)})", title_justify="left")
    for header in ("Client", "Subscription", "Lease", "Fencing", "Granted", "Expires", "Session"):
        table.add_column(header, no_wrap=True)
    for lease in sorted(reply.clients, key=lambda lease: (lease.subscription_id, lease.client_id)):
        table.add_row(
            lease.client_id,
            lease.subscription_id + (" (fallback)" if lease.fallback else ""),
            lease.lease_id,
            str(lease.fencing_token),
            clock_time(lease.granted_at),
            _expiry(lease, reply.as_of.seconds),
            lease.session_id,
        )
    return table


def run_status(session: Session, out: Output, *, include_clients: bool) -> int:
    reply = session.stub.Status(pb.StatusRequest(include_clients=include_clients), **session.call_options())
    if out.json_mode:
        out.json(status_document(reply, include_clients=include_clients))
        return 0
    out.print(_subscriptions_table(reply))
    out.line(_totals_line(reply))
    if reply.webhooks.enabled:
        out.line(_webhooks_line(reply.webhooks))
    if include_clients:
        out.print(_clients_table(reply))
    return 0
