"""Webhook notifications end to end: a real server, a real HTTPS receiver (trustme), real retries.

The receiver and its certificates come from test_webhooks.py. Delivery runs
on the real clock with short backoffs (50-100 ms), so retries happen within
the test; the SIGKILL test runs `authpool serve` as a child process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import grpc
import pytest
import standardwebhooks
import trustme
from aiohttp import web
from authpool_client.api import authpool_pb2 as pb
from authpool_client.api import authpool_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from authpool_server.config import WebhookSettings
from authpool_server.domain import NotificationRuleSpec
from authpool_server.server import Server
from authpool_server.webhooks import RetryPolicy, WebhookSecret
from tests.conftest import NO_AUTH, eventually, make_spec
from tests.integration.server_process import ServerProcess, write_config
from tests.integration.test_rpc_policy import UNIT, Stub, allocate, events, report
from tests.integration.webhook_receiver import (
    PATH_TOKEN,
    QUERY_TOKEN,
    SECRET_TEXT,
    Receiver,
    receiver_app,
    server_context,
)

RULES = (
    NotificationRuleSpec("usage_threshold", ("webhook",), threshold_ppm=800_000),
    NotificationRuleSpec("webhook_failure", ("log",)),
)
QUICK = RetryPolicy(max_attempts=3, initial_seconds=0.05, maximum_seconds=0.1, timeout_seconds=0.5)


def webhook_settings(url: str, ca_path: Path, policy: RetryPolicy = QUICK) -> WebhookSettings:
    return WebhookSettings(
        url=url,
        secret=WebhookSecret.parse(SECRET_TEXT),
        policy=policy,
        ca_file=str(ca_path),
        allow_insecure_loopback=False,
    )


@pytest.fixture
async def webhook_server(tmp_path: Path, receiver: Receiver, ca_file: Path) -> AsyncIterator[Server]:
    spec = dataclasses.replace(make_spec(2, ttl=3_600), notification_rules=RULES, webhooks_enabled=True)
    server = Server(
        spec,
        data_dir=tmp_path,
        security=NO_AUTH,
        listen="127.0.0.1:0",
        admin_listen="127.0.0.1:0",
        background=False,
        webhooks=webhook_settings(receiver.hook, ca_file),
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def served(webhook_server: Server) -> AsyncIterator[Stub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{webhook_server.port}") as channel:
        yield authpool_pb2_grpc.AuthPoolStub(channel)


async def scrape(server: Server) -> dict[str, float]:
    """`authpool_webhook_*` samples from /metrics, by name and labels."""
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{server.admin_port}/metrics") as reply:
        text = await reply.text()
    return {
        sample.name
        + "".join(f"[{v}]" for k, v in sorted(sample.labels.items()) if not k.startswith("otel_")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("authpool_webhook")
    }


async def cross_the_threshold(stub: Stub) -> pb.Lease:
    lease = await allocate(stub, "worker-1")
    await report(stub, lease, 85 * UNIT)  # 85 of 100: the 0.8 rule fires
    return lease


async def webhook_state(stub: Stub) -> pb.WebhookState:
    return (await stub.Status(pb.StatusRequest())).webhooks


async def settled(stub: Stub, done: Callable[[pb.WebhookState], bool]) -> pb.WebhookState:
    """The outbox state once `done` holds (the dispatcher records each answer just after it)."""
    async with asyncio.timeout(10):
        while not done(state := await webhook_state(stub)):  # noqa: ASYNC110 - polls the server over RPC
            await asyncio.sleep(0.02)
    return state


async def first_event(stub: Stub, event_type: int) -> pb.Event:
    """The first event of a type, waiting for it to be published if need be."""
    async with asyncio.timeout(10):
        async for message in stub.WatchEvents(pb.WatchEventsRequest()):
            if message.event.type == event_type:
                return message.event
    raise AssertionError("the stream ended early")


async def test_a_notification_is_delivered_signed(served: Stub, receiver: Receiver) -> None:
    lease = await cross_the_threshold(served)
    await eventually(lambda: receiver.seen)
    headers, body = receiver.seen[0]
    standardwebhooks.Webhook(SECRET_TEXT).verify(body, headers)  # raises if the signature is wrong
    payload = json.loads(body)
    assert payload["type"] == "authpool.usage_threshold"
    assert payload["data"]["event"]["subscriptionId"] == lease.subscription_id
    assert payload["data"]["event"]["attributes"]["threshold_ppm"] == "800000"
    assert headers["webhook-id"] == payload["data"]["id"]
    state = await settled(served, lambda state: state.delivered == 1)
    assert (state.enabled, state.pending, state.dead_lettered) == (True, 0, 0)


async def test_failures_are_retried_with_the_same_id_then_delivered(
    served: Stub,
    receiver: Receiver,
) -> None:
    receiver.failures_left = 2
    await cross_the_threshold(served)
    await eventually(lambda: len(receiver.seen) == 3)
    assert len({headers["webhook-id"] for headers, _ in receiver.seen}) == 1
    assert len({body for _, body in receiver.seen}) == 1
    state = await settled(served, lambda state: state.delivered == 1)
    assert (state.pending, state.dead_lettered) == (0, 0)


async def test_the_last_failure_dead_letters_it_visibly(
    webhook_server: Server,
    served: Stub,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver.failures_left = 100
    await cross_the_threshold(served)
    await eventually(lambda: len(receiver.seen) >= QUICK.max_attempts)
    state = await settled(served, lambda state: state.dead_lettered == 1)
    assert state.pending == 0
    assert len(receiver.seen) == QUICK.max_attempts  # no attempt after the last
    [dead] = state.recent_dead_letters
    assert (dead.rule, dead.attempts, dead.last_error) == ("usage_threshold", QUICK.max_attempts, "HTTP 500")
    # The outbox counts the dead letter as the decision is taken; its event is
    # published once that batch commits, a moment later.
    await first_event(served, pb.EVENT_TYPE_WEBHOOK_FAILURE)
    [failure] = await events(served, pb.EVENT_TYPE_WEBHOOK_FAILURE)
    assert failure.attributes["notification_id"] == dead.notification_id
    assert failure.attributes["last_error"] == "HTTP 500"
    metrics = await scrape(webhook_server)
    assert metrics["authpool_webhook_attempts_total[retry]"] == QUICK.max_attempts - 1
    assert metrics["authpool_webhook_attempts_total[dead]"] == 1
    assert metrics["authpool_webhook_dead_lettered"] == 1
    assert metrics["authpool_webhook_pending"] == 0


@pytest.mark.slow
async def test_pending_deliveries_survive_sigkill(
    tmp_path: Path,
    ca_file: Path,
    closed_port: int,
    ca: trustme.CA,
) -> None:
    config = json.loads(write_config(tmp_path / "auth-pool.json", subscriptions=2).read_text())
    url = f"https://127.0.0.1:{closed_port}/hooks/{PATH_TOKEN}?token={QUERY_TOKEN}"
    config["notifications"] = {
        "rules": [
            {"type": "usage_threshold", "threshold": 0.5, "channels": ["webhook"]},
            {"type": "usage_threshold", "threshold": 0.8, "channels": ["webhook"]},
        ],
        "webhookUrl": url,
        "caFile": str(ca_file),
        "initialBackoffSeconds": 0.05,
        "maxBackoffSeconds": 0.2,
        "maxAttempts": 100,
    }
    (tmp_path / "auth-pool.json").write_text(json.dumps(config))
    server = ServerProcess(tmp_path / "auth-pool.json", tmp_path / "data", env={"AUTHPOOL_WEBHOOK_SECRET": SECRET_TEXT})
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = authpool_pb2_grpc.AuthPoolStub(channel)
            for client in ("a", "b"):
                lease = stub.Allocate(pb.AllocateRequest(client_id=client)).lease
                stub.ReportUsage(
                    pb.ReportUsageRequest(
                        request_id=f"r-{client}",
                        lease_id=lease.lease_id,
                        fencing_token=lease.fencing_token,
                        cost_micros=900 * UNIT,  # 90 % of 1000: both thresholds
                    )
                )
            state = stub.Status(pb.StatusRequest()).webhooks
            assert state.pending == 4  # the receiver is down: all waiting, being retried
        server.kill()
    finally:
        server.stop()

    revived = Receiver()
    app = web.AppRunner(receiver_app(revived), access_log=None, shutdown_timeout=0.1)
    await app.setup()
    await web.TCPSite(app, "127.0.0.1", closed_port, ssl_context=server_context(ca)).start()
    revived.port = closed_port
    restarted = ServerProcess(
        tmp_path / "auth-pool.json", tmp_path / "data", env={"AUTHPOOL_WEBHOOK_SECRET": SECRET_TEXT}
    )
    try:
        restarted.start()
        await eventually(lambda: len({h["webhook-id"] for h, _ in revived.seen}) == 4)
        for headers, body in revived.seen:
            standardwebhooks.Webhook(SECRET_TEXT).verify(body, headers)
        thresholds = sorted(
            json.loads(body)["data"]["event"]["attributes"]["threshold_ppm"] for _, body in revived.seen
        )
        assert thresholds[:4] == ["500000", "500000", "800000", "800000"]
        with grpc.insecure_channel(f"127.0.0.1:{restarted.port}") as channel:
            stub = authpool_pb2_grpc.AuthPoolStub(channel)
            deadline = asyncio.get_running_loop().time() + 10
            while (state := stub.Status(pb.StatusRequest()).webhooks).delivered < 4:
                assert asyncio.get_running_loop().time() < deadline, f"not all delivered: {state}"
                await asyncio.sleep(0.05)
            assert (state.pending, state.dead_lettered) == (0, 0)
    finally:
        restarted.stop()
        await app.cleanup()
    assert SECRET_TEXT not in (tmp_path / "data" / "server.log").read_text()


async def test_a_delivered_notification_is_not_sent_again_after_a_restart(
    tmp_path: Path, receiver: Receiver, ca_file: Path
) -> None:
    spec = dataclasses.replace(make_spec(2, ttl=3_600), notification_rules=RULES, webhooks_enabled=True)

    def new_server() -> Server:
        return Server(
            spec,
            data_dir=tmp_path,
            security=NO_AUTH,
            listen="127.0.0.1:0",
            background=False,
            webhooks=webhook_settings(receiver.hook, ca_file),
        )

    server = new_server()
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = authpool_pb2_grpc.AuthPoolStub(channel)
            await cross_the_threshold(stub)
            await settled(stub, lambda state: state.delivered == 1)
    finally:
        await server.stop()
    restarted = new_server()
    await restarted.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{restarted.port}") as channel:
            state = await webhook_state(authpool_pb2_grpc.AuthPoolStub(channel))
        await asyncio.sleep(0.3)  # time enough for a wrongly pending entry to be sent again
    finally:
        await restarted.stop()
    assert (state.pending, state.delivered) == (0, 1)
    assert len(receiver.seen) == 1
