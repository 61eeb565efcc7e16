"""`authpool watch`: tail the event log through `WatchEvents`, filtered, resumable.

Without `--from-sequence` it starts at the newest event (like `tail -f`):
the cursor comes from `Status`, and since the stream delivers every event
after it, nothing that happens in between is missed. `--from-sequence 0`
replays the whole retained log first.

However the watch ends (Ctrl-C, `--count`, `--duration`, or an error), the
last sequence it received goes to stderr, so that the next
`authpool watch --from-sequence N` continues exactly there. Progress
messages move that cursor too (they say every event up to their sequence
was considered), so a resume after a quiet, filtered watch skips nothing
and replays nothing.

It asks for batches (`max_batch_events`, never a `batch_window`: a tail
shows each event as soon as it can), so a replay of a long log or a burst
arrives in few messages; each event is still printed, and counted, on its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration
from rich.text import Text

from authpool_server.api import authpool_pb2 as pb
from authpool_server.ops.connection import Session
from authpool_server.ops.errors import OpsError, describe_rpc_error
from authpool_server.ops.output import Output, clock_time, enum_name, timestamp

__all__ = ["WatchOptions", "event_document", "event_types", "run_watch"]

_TYPE_STYLE = {
    "lease_granted": "green",
    "lease_released": "blue",
    "lease_expired": "yellow",
    "lease_moved": "magenta",
    "subscription_status_changed": "bold yellow",
    "rotation": "cyan",
    "pool_exhausted": "bold red",
    "webhook_failure": "red",
}
# Errors about the request itself: resuming would fail the same way, so no resume hint.
# Events per message the watch asks for; the server sends what it has when it writes.
_MAX_BATCH_EVENTS = 100
_NOT_RESUMABLE = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.OUT_OF_RANGE,  # carries its own hint when a resume can work
    }
)


def event_types(names: Iterable[str]) -> list[int]:
    """`lease_granted`, `LEASE-GRANTED` or `EVENT_TYPE_LEASE_GRANTED` -> the enum value; OpsError for others."""
    known = {enum_name(pb.EventType, value): value for value in pb.EventType.values() if value}
    found = []
    for name in names:
        short = name.strip().lower().replace("-", "_").removeprefix("event_type_")
        if short not in known:
            raise OpsError(f"--type {name!r} is not an event type; one of: {', '.join(known)}", exit_code=2)
        found.append(known[short])
    return found


@dataclass(frozen=True, slots=True)
class WatchOptions:
    after_sequence: int | None  # None: from the newest event
    types: tuple[int, ...] = ()
    subscription_ids: tuple[str, ...] = ()
    client_ids: tuple[str, ...] = ()
    count: int | None = None  # stop after this many events
    duration: float | None = None  # stop after this many seconds
    progress_interval: float | None = None  # None: the server's default


def event_document(event: pb.Event) -> dict[str, Any]:
    return {
        "kind": "event",
        "sequence": event.sequence,
        "time": timestamp(event.time),
        "type": enum_name(pb.EventType, event.type),
        "subscription_id": event.subscription_id,
        "client_id": event.client_id,
        "lease_id": event.lease_id,
        "fencing_token": event.fencing_token,
        "attributes": dict(sorted(event.attributes.items())),
    }


def _progress_document(progress: pb.Progress) -> dict[str, Any]:
    return {"kind": "progress", "sequence": progress.sequence, "time": timestamp(progress.time)}


def _event_line(event: pb.Event) -> Text:
    kind = enum_name(pb.EventType, event.type)
    facts = [
        f"{key}={value}"
        for key, value in (
            ("subscription", event.subscription_id),
            ("client", event.client_id),
            ("lease", event.lease_id),
            ("token", event.fencing_token or ""),
        )
        if value
    ]
    facts += [f"{key}={value}" for key, value in sorted(event.attributes.items())]
    return Text.assemble(
        (f"{event.sequence:>8}", "bold"),
        f"  {clock_time(event.time)}  ",
        (f"{kind:<28}", _TYPE_STYLE.get(kind, "")),
        " ",
        " ".join(facts),
    )


def _request(options: WatchOptions, after: int) -> pb.WatchEventsRequest:
    request = pb.WatchEventsRequest(
        after_sequence=after,
        types=options.types,
        subscription_ids=options.subscription_ids,
        client_ids=options.client_ids,
        max_batch_events=_MAX_BATCH_EVENTS,
    )
    if options.progress_interval is not None:
        interval = Duration()
        interval.FromNanoseconds(round(options.progress_interval * 1e9))
        request.progress_interval.CopyFrom(interval)
    return request


def run_watch(session: Session, out: Output, options: WatchOptions) -> int:
    after = options.after_sequence
    if after is None:
        after = session.stub.Status(pb.StatusRequest(), **session.call_options()).totals.last_sequence
    call = session.stub.WatchEvents(
        _request(options, after), metadata=session.endpoint.metadata, timeout=options.duration
    )
    cursor, events = after, 0
    try:
        for message in call:
            kind = message.WhichOneof("message")
            if kind == "progress":
                cursor = message.progress.sequence
                if out.json_mode:
                    out.json(_progress_document(message.progress), lines=True)
                continue
            for event in message.batch.events if kind == "batch" else (message.event,):
                cursor, events = event.sequence, events + 1
                if out.json_mode:
                    out.json(event_document(event), lines=True)
                else:
                    out.line(_event_line(event))
                if options.count is not None and events >= options.count:
                    break
            if options.count is not None and events >= options.count:
                break
    except KeyboardInterrupt:
        pass  # the operator has seen enough: a normal end
    except grpc.RpcError as error:
        code = error.code() if isinstance(error, grpc.Call) else None
        if not (code is grpc.StatusCode.DEADLINE_EXCEEDED and options.duration is not None):
            line = describe_rpc_error(error, target=session.endpoint.target, has_token=bool(session.endpoint.token))
            if code not in _NOT_RESUMABLE and "--from-sequence" not in line:
                line += f"; resume with --from-sequence {cursor}"
            raise OpsError(line) from None
    finally:
        call.cancel()  # no-op when it has ended; otherwise tells the server to stop sending
    out.note(f"{events} events; last sequence {cursor} (resume with --from-sequence {cursor})")
    return 0
