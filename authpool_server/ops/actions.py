"""`authpool rebalance`, `drain` and `undrain`: the operator's levers, each one RPC.

`drain` and `undrain` are `DrainSubscription` and `ResumeSubscription`, which
need an admin token; `rebalance` needs an operator's.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

from authpool_server.api import authpool_pb2 as pb
from authpool_server.ops.connection import Session
from authpool_server.ops.output import Output

__all__ = ["rebalance_document", "run_drain", "run_rebalance", "run_undrain"]


def rebalance_document(reply: pb.RebalanceResponse) -> dict[str, Any]:
    return {
        "dry_run": reply.dry_run,
        "reason": reply.reason,
        "moves": [
            {
                "lease_id": move.lease_id,
                "client_id": move.client_id,
                "from_subscription_id": move.from_subscription_id,
                "to_subscription_id": move.to_subscription_id,
                "fencing_token": move.fencing_token,
            }
            for move in reply.moves
        ],
    }


def run_rebalance(session: Session, out: Output, *, dry_run: bool) -> int:
    reply = session.stub.Rebalance(pb.RebalanceRequest(dry_run=dry_run), **session.call_options())
    if out.json_mode:
        out.json(rebalance_document(reply))
        return 0
    moves = len(reply.moves)
    clients = f"{moves} client{'' if moves == 1 else 's'}"
    if not moves:
        headline = "Nothing to move"
    elif reply.dry_run:
        headline = f"Dry run: would move {clients}; nothing was moved"
    else:
        headline = f"Moved {clients}; each learns it on its next Renew"
    out.line(f"{headline}. {reply.reason}")
    if moves:
        table = Table()
        for header in ("Client", "From", "To", "Lease", "Fencing token"):
            table.add_column(header, no_wrap=True)
        for move in reply.moves:
            token = "-" if reply.dry_run else str(move.fencing_token)
            table.add_row(move.client_id, move.from_subscription_id, move.to_subscription_id, move.lease_id, token)
        out.print(table)
    return 0


def run_drain(session: Session, out: Output, subscription_id: str) -> int:
    request = pb.DrainSubscriptionRequest(subscription_id=subscription_id)
    reply = session.stub.DrainSubscription(request, **session.call_options())
    if out.json_mode:
        out.json({"subscription_id": subscription_id, "status": "draining", "clients_moved": reply.clients_moved})
        return 0
    moved = reply.clients_moved
    out.line(
        f"{subscription_id} is draining: it takes no new clients; {moved} idle client{'' if moved == 1 else 's'} "
        "moved now, busy ones move as soon as they go idle. Watch it empty with `authpool status`; "
        f"`authpool undrain {subscription_id}` puts it back."
    )
    return 0


def run_undrain(session: Session, out: Output, subscription_id: str) -> int:
    request = pb.ResumeSubscriptionRequest(subscription_id=subscription_id)
    session.stub.ResumeSubscription(request, **session.call_options())
    if out.json_mode:
        out.json({"subscription_id": subscription_id, "resumed": True})
        return 0
    out.line(f"{subscription_id} is back in rotation; its status follows its spend again (`authpool status`).")
    return 0
