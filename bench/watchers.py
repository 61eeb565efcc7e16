"""Live WatchEvents streams held open during a scenario: `python -m bench.watchers --target HOST:PORT`.

What `allocate_watched` measures Allocate with: `--watchers` (100) streams,
each on a connection of its own as separate operators' tools or sidecars
would be, each following one subscription (``--follow subscription``:
watcher i follows ``bench-sub{i mod subscriptions + 1}``, so with the bench's
20 subscriptions every subscription has five watchers and every event about
one reaches five streams), or every event (``--follow all``: the firehose an
audit-log shipper reads, each event to every stream). Progress messages come
at the server's default interval. ``--follow bare`` opens as many streams of
`bench.bare_writes` instead (``--bare-target``, one message every
``--bare-period-ms``) and only counts their messages: the transport's own
cost, without AuthPool's.

The process opens every stream from the newest sequence (no replay), waits
until the server has answered each one's headers, prints ``ready``, and then
counts what each stream receives until it reads ``stop`` on stdin. With
``--nice``, it first lowers its own CPU priority: the watchers stand for
consumers on other machines, and on the benchmark's two cores their own
CPU (about a tenth of a core for 100 streams) would otherwise be taken from
the server whose cost is measured. Each message's lag (when it arrived,
minus when its newest event was committed; one clock, one machine) shows
that they kept up all the same: a watcher that fell behind would see its
lag grow, and take fewer, fuller messages.

Each stream asks for what a well-written watcher of this kind would: batches
of up to 100 events (``--max-batch``) and a 100 ms ``--batch-window``, as a
dashboard or sidecar that can take a tenth of a second of latency; every
event of every batch is counted and checked for order all the same.
``--max-batch 1`` watches one event per message, as clients before batching
did. Then, with
the load over, it reads the log the scenario wrote from an unfiltered stream
of its own, works out what each watcher should have received, waits (a few
seconds at most) for the last messages in flight, and writes per watcher what
it received and what it missed, as JSON to ``--out``: the proof that the
watchers were live throughout and kept up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from authpool_client.api import authpool_pb2 as pb
from authpool_client.api import authpool_pb2_grpc

from bench.bare_writes import FOLLOW

__all__ = ["main"]

_CALL_TIMEOUT = 10.0
_SETTLE_SECONDS = 5.0
# A channel of its own per watcher: without this, grpc shares one connection among
# channels to the same target with the same options.
_OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


@dataclass
class Watcher:
    subscription_ids: tuple[str, ...]  # empty: every event
    call: grpc.aio.UnaryStreamCall | None = None
    events: int = 0
    messages: int = 0  # responses that carried events (one, or a batch)
    progress: int = 0
    last_sequence: int = 0
    out_of_order: int = 0
    lags: list[float] = field(default_factory=list)  # seconds, one per message with events
    error: str = ""
    reader: asyncio.Task[None] | None = None
    channel: grpc.aio.Channel | None = field(default=None, repr=False)
    due: int | None = None  # events it should have received, once the log has been read
    settled: asyncio.Event = field(default_factory=asyncio.Event)

    def expect(self, due: int) -> None:
        self.due = due
        if self.events >= due or self.error:
            self.settled.set()

    def wants(self, event: pb.Event) -> bool:
        """The server's subscription filter: about it, or a lease moved away from it."""
        ids = self.subscription_ids
        return (
            not ids
            or event.subscription_id in ids
            or (event.type == pb.EVENT_TYPE_LEASE_MOVED and event.attributes.get("from_subscription_id") in ids)
        )

    async def read(self) -> None:
        assert self.call is not None
        try:
            async for message in self.call:
                kind = message.WhichOneof("message")
                if kind == "progress":
                    self.progress += 1
                    continue
                self.messages += 1
                events = message.batch.events if kind == "batch" else (message.event,)
                for event in events:
                    sequence = event.sequence
                    if sequence <= self.last_sequence:
                        self.out_of_order += 1
                    self.last_sequence = sequence
                    self.events += 1
                newest = events[-1].time
                self.lags.append(time.time() - newest.seconds - newest.nanos / 1e9)
                if self.due is not None and self.events >= self.due:
                    self.settled.set()
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                self.error = f"{error.code().name}: {error.details()}"
        finally:
            self.settled.set()


async def _log_between(stub: authpool_pb2_grpc.AuthPoolStub, after: int, last: int, metadata: tuple) -> list[pb.Event]:
    """The events after `after` up to `last`, from an unfiltered stream of our own."""
    events: list[pb.Event] = []
    if last <= after:
        return events
    call = stub.WatchEvents(pb.WatchEventsRequest(after_sequence=after), metadata=metadata)
    try:
        async for message in call:
            if message.HasField("event"):
                events.append(message.event)
                if message.event.sequence >= last:
                    break
    finally:
        call.cancel()
    return events


async def _wait_for_stop() -> None:
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if line.strip() != "stop":
        raise SystemExit("bench.watchers: expected 'stop' on stdin")


async def _run_bare(args: argparse.Namespace) -> dict[str, object]:
    """`--follow bare`: streams of bench.bare_writes, each message counted, nothing else checked."""
    channels = [grpc.aio.insecure_channel(args.bare_target, options=_OWN_CONNECTION) for _ in range(args.watchers)]
    messages = [0] * len(channels)

    async def read(index: int, call: grpc.aio.UnaryStreamCall) -> None:
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            async for _ in call:
                messages[index] += 1

    period = str(args.bare_period_ms).encode()
    calls = [channel.unary_stream(FOLLOW)(period) for channel in channels]
    readers: list[asyncio.Task[None]] = []
    try:
        await asyncio.wait_for(asyncio.gather(*(call.initial_metadata() for call in calls)), timeout=_CALL_TIMEOUT)
        readers = [asyncio.create_task(read(index, call)) for index, call in enumerate(calls)]
        cpu_before, started = time.process_time(), time.monotonic()
        print("ready", flush=True)
        await _wait_for_stop()
        cpu_seconds, seconds = time.process_time() - cpu_before, time.monotonic() - started
    finally:
        for call in calls:
            call.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await asyncio.gather(*(channel.close() for channel in channels))
    return {
        "watchers": len(channels),
        "follow": "bare",
        "bare_period_ms": args.bare_period_ms,
        "messages": messages,
        "seconds": seconds,
        "client_cpu_seconds": cpu_seconds,
    }


async def _run(args: argparse.Namespace) -> dict[str, object]:
    if args.follow == "bare":
        return await _run_bare(args)
    token = os.environ.get("BENCH_TOKEN")
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    if args.follow == "subscription":
        watchers = [Watcher((f"bench-sub{i % args.subscriptions + 1}",)) for i in range(args.watchers)]
    else:
        watchers = [Watcher(()) for _ in range(args.watchers)]
    async with grpc.aio.insecure_channel(args.target) as control:
        stub = authpool_pb2_grpc.AuthPoolStub(control)
        status = await stub.Status(pb.StatusRequest(), timeout=_CALL_TIMEOUT, metadata=metadata)
        first = status.totals.last_sequence
        try:
            for watcher in watchers:
                watcher.channel = grpc.aio.insecure_channel(args.target, options=_OWN_CONNECTION)
                request = pb.WatchEventsRequest(
                    after_sequence=first, subscription_ids=watcher.subscription_ids, max_batch_events=args.max_batch
                )
                if args.batch_window_ms:
                    request.batch_window.FromMilliseconds(args.batch_window_ms)
                watcher.call = authpool_pb2_grpc.AuthPoolStub(watcher.channel).WatchEvents(request, metadata=metadata)
            # The server sends a stream's headers once its watcher is registered.
            await asyncio.wait_for(
                asyncio.gather(*(w.call.initial_metadata() for w in watchers if w.call is not None)),
                timeout=_CALL_TIMEOUT,
            )
            for watcher in watchers:
                watcher.reader = asyncio.create_task(watcher.read())
            cpu_before = time.process_time()
            print("ready", flush=True)
            await _wait_for_stop()
            status = await stub.Status(pb.StatusRequest(), timeout=_CALL_TIMEOUT, metadata=metadata)
            last = status.totals.last_sequence
            log = await asyncio.wait_for(_log_between(stub, first, last, metadata), timeout=60)
            expected = [sum(1 for event in log if watcher.wants(event)) for watcher in watchers]
            for watcher, due in zip(watchers, expected, strict=True):
                watcher.expect(due)
            # The last events may still be on their way; a watcher that never gets them has missed them.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(w.settled.wait() for w in watchers)), _SETTLE_SECONDS)
            cpu_seconds = time.process_time() - cpu_before
        finally:
            for watcher in watchers:
                if watcher.call is not None:
                    watcher.call.cancel()
            await asyncio.gather(*(w.reader for w in watchers if w.reader is not None), return_exceptions=True)
            await asyncio.gather(*(w.channel.close() for w in watchers if w.channel is not None))
    return {
        "watchers": len(watchers),
        "follow": args.follow,
        "first_sequence": first,
        "last_sequence": last,
        "events_in_log": len(log),
        "received": [w.events for w in watchers],
        "expected": expected,
        "missed": sum(max(0, n - w.events) for w, n in zip(watchers, expected, strict=True)),
        "max_batch_events": args.max_batch,
        "batch_window_ms": args.batch_window_ms,
        "event_messages": sum(w.messages for w in watchers),
        "progress_messages": sum(w.progress for w in watchers),
        "out_of_order": sum(w.out_of_order for w in watchers),
        "lags_ms": [round(lag * 1e3, 2) for w in watchers for lag in w.lags],
        "errors": [w.error for w in watchers if w.error],
        "client_cpu_seconds": cpu_seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.watchers")
    parser.add_argument("--target", required=True, help="host:port of the server")
    parser.add_argument("--watchers", type=int, default=100)
    parser.add_argument("--follow", choices=("subscription", "all", "bare"), default="subscription")
    parser.add_argument("--bare-target", help="host:port of bench.bare_writes (--follow bare)")
    parser.add_argument(
        "--bare-period-ms",
        type=int,
        default=int(os.environ.get("BENCH_WATCH_BARE_PERIOD_MS", "120")),
        help="--follow bare: one message per stream this often",
    )
    parser.add_argument("--subscriptions", type=int, default=20, help="the bench pool's subscriptions")
    parser.add_argument(
        "--max-batch",
        type=int,
        default=int(os.environ.get("BENCH_WATCH_MAX_BATCH", "100")),
        help="WatchEventsRequest.max_batch_events (1: one event per response)",
    )
    parser.add_argument(
        "--batch-window-ms",
        type=int,
        default=int(os.environ.get("BENCH_WATCH_WINDOW_MS", "100")),
        help="WatchEventsRequest.batch_window",
    )
    parser.add_argument("--nice", type=int, default=0, help="lower this process's CPU priority by this much")
    parser.add_argument("--out", required=True, help="where to write the JSON result")
    args = parser.parse_args(argv)
    if args.nice:
        os.nice(args.nice)
    result = asyncio.run(_run(args))
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
