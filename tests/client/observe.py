"""What a test reads back from the server to check what the client library did: live leases, the event log."""

from __future__ import annotations

from authpool_client import AuthPoolClient
from authpool_client.api import authpool_pb2 as pb


def live_leases(client: AuthPoolClient) -> dict[str, pb.Lease]:
    """The server's live leases by lease id (expired ones are reaped within a quarter TTL)."""
    return {lease.lease_id: lease for lease in client.status(include_clients=True).clients}


def event_log(client: AuthPoolClient) -> list[pb.Event]:
    """Every event so far, in order: the stream from 0 read up to the newest sequence Status reports."""
    last = client.status().totals.last_sequence
    events: list[pb.Event] = []
    if last == 0:
        return events
    for message in client.watch_events(0, timeout=10):
        if message.HasField("event"):
            events.append(message.event)
            if message.event.sequence >= last:
                break
    return events


def lease_history(client: AuthPoolClient, lease_id: str) -> list[str]:
    """The names of the events about one lease, e.g. ["LEASE_GRANTED", "LEASE_RELEASED"]."""
    return [
        pb.EventType.Name(event.type).removeprefix("EVENT_TYPE_")
        for event in event_log(client)
        if event.lease_id == lease_id
    ]
