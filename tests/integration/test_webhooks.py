"""Webhook delivery against a real local HTTPS receiver.

The receiver is an aiohttp server on an ephemeral port with a certificate from
a throwaway CA (trustme); the sender trusts that CA through its `ca_file`.
Each test makes single attempts, as the dispatcher does, and checks what the
receiver saw (verified with the reference `standardwebhooks` verifier) or the
short reason a failed attempt gives. The receiver's URL carries a token in its
path, registered as a test secret: no failure reason and no log line of the
session may show it.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import standardwebhooks
import trustme

import authpool_server
from authpool_server.domain import Event, EventType, Notification, Severity
from authpool_server.webhooks import (
    USER_AGENT,
    DeliveryResult,
    WebhookSecret,
    WebhookSender,
    check_webhook_url,
    generate_secret,
    notification_body,
)
from tests.integration.webhook_receiver import PATH_TOKEN, QUERY_TOKEN, SECRET_TEXT, Receiver, serve, server_context

TIMEOUT = 0.5


@pytest.fixture
def secret_key() -> WebhookSecret:
    return WebhookSecret.parse(SECRET_TEXT)


@pytest.fixture
async def sender(receiver: Receiver, ca_file: Path, secret_key: WebhookSecret) -> AsyncIterator[WebhookSender]:
    async with WebhookSender(receiver.hook, secret_key, timeout_seconds=TIMEOUT, ca_file=ca_file) as sender:
        yield sender


def a_notification(sequence: int = 17) -> Notification:
    event = Event(
        sequence=sequence,
        at=1_764_000_000.0,
        type=EventType.POOL_EXHAUSTED,
        subscription_id="sub2",
        attributes=(("owner", "team+sub2@company.com"),),
    )
    return Notification(
        id=f"{sequence}-1",
        event=event,
        rule="all_exhausted",
        severity=Severity.CRITICAL,
        channels=("webhook",),
        summary="every subscription is exhausted",
    )


def assert_failed(result: DeliveryResult, reason: str) -> None:
    assert not result.delivered
    assert result.error.startswith(reason), result.error
    for leak in (PATH_TOKEN, QUERY_TOKEN, SECRET_TEXT, SECRET_TEXT.removeprefix("whsec_"), "/hooks/"):
        assert leak not in result.error


async def one_attempt(url: str, ca_file: Path | None, secret_key: WebhookSecret) -> DeliveryResult:
    async with WebhookSender(url, secret_key, timeout_seconds=TIMEOUT, ca_file=ca_file) as sender:
        return await sender.deliver("n-1", "{}")


# --- delivered -------------------------------------------------------------------------------


async def test_a_delivery_verifies_with_the_reference_verifier(sender: WebhookSender, receiver: Receiver) -> None:
    n = a_notification()
    body = notification_body(n)
    result = await sender.deliver(n.id, body)
    assert result.delivered, result.error
    assert (result.error, result.status_code) == ("", 204)

    [(headers, received)] = receiver.seen
    assert received == body
    payload = standardwebhooks.Webhook(SECRET_TEXT).verify(received, headers)
    assert payload["type"] == "authpool.all_exhausted"
    assert payload["data"]["id"] == n.id == headers["webhook-id"]
    assert payload["data"]["severity"] == "critical"
    assert payload["data"]["event"]["attributes"] == {"owner": "t***@company.com"}
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"] == USER_AGENT == f"authpool/{authpool_server.__version__}"


async def test_every_attempt_carries_the_same_id_and_body(sender: WebhookSender, receiver: Receiver) -> None:
    receiver.failures_left = 2
    n = a_notification()
    body = notification_body(n)
    results = [await sender.deliver(n.id, notification_body(n)) for _ in range(3)]
    assert [r.delivered for r in results] == [False, False, True]
    assert [r.error for r in results[:2]] == ["HTTP 500", "HTTP 500"]

    assert [received for _, received in receiver.seen] == [body] * 3
    assert {headers["webhook-id"] for headers, _ in receiver.seen} == {n.id}
    for headers, received in receiver.seen:  # each attempt signed afresh, each valid
        standardwebhooks.Webhook(SECRET_TEXT).verify(received, headers)


async def test_another_key_does_not_verify(sender: WebhookSender, receiver: Receiver) -> None:
    assert (await sender.deliver("n-1", "{}")).delivered
    [(headers, received)] = receiver.seen
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(generate_secret()).verify(received, headers)


# --- failed attempts, each with its short reason ---------------------------------------------


async def test_a_500(receiver: Receiver, ca_file: Path, secret_key: WebhookSecret) -> None:
    result = await one_attempt(receiver.url("/fail"), ca_file, secret_key)
    assert_failed(result, "HTTP 500")
    assert result.status_code == 500


async def test_a_redirect_is_not_followed(receiver: Receiver, ca_file: Path, secret_key: WebhookSecret) -> None:
    result = await one_attempt(receiver.url("/redirect"), ca_file, secret_key)
    assert_failed(result, "HTTP 302 (redirects are not followed)")
    assert receiver.elsewhere_hits == 0


async def test_a_receiver_slower_than_the_timeout(receiver: Receiver, ca_file: Path, secret_key: WebhookSecret) -> None:
    started = asyncio.get_running_loop().time()
    result = await one_attempt(receiver.url("/slow"), ca_file, secret_key)
    assert_failed(result, f"timed out after {TIMEOUT:g} s")
    assert result.error == "timed out after 0.5 s"
    assert asyncio.get_running_loop().time() - started < TIMEOUT + 1.0


async def test_a_receiver_that_is_down(closed_port: int, ca_file: Path, secret_key: WebhookSecret) -> None:
    url = f"https://127.0.0.1:{closed_port}/hooks/{PATH_TOKEN}"
    assert_failed(await one_attempt(url, ca_file, secret_key), "connection refused")


async def test_a_certificate_from_an_unknown_ca(ca_file: Path, secret_key: WebhookSecret) -> None:
    stranger = Receiver()
    runner = await serve(stranger, server_context(trustme.CA()))
    try:
        result = await one_attempt(stranger.hook, ca_file, secret_key)
    finally:
        await runner.cleanup()
    assert_failed(result, "TLS: certificate verify failed")
    assert stranger.seen == []


async def test_without_a_ca_file_the_system_cas_do_not_trust_a_private_ca(
    receiver: Receiver, secret_key: WebhookSecret
) -> None:
    assert_failed(await one_attempt(receiver.hook, None, secret_key), "TLS: certificate verify failed")
    assert receiver.seen == []


async def test_a_certificate_for_another_name(ca: trustme.CA, ca_file: Path, secret_key: WebhookSecret) -> None:
    other = Receiver()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("receiver.internal").configure_cert(context)
    runner = await serve(other, context)
    try:
        result = await one_attempt(other.hook, ca_file, secret_key)
    finally:
        await runner.cleanup()
    assert_failed(result, "TLS: certificate verify failed")
    assert "mismatch" in result.error


async def test_the_transport_seam(secret_key: WebhookSecret) -> None:
    """Tests of the dispatcher can replace the network with httpx.MockTransport."""
    requests: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(202)

    async with WebhookSender(
        "https://hooks.example.com/x", secret_key, transport=httpx.MockTransport(answer), clock=lambda: 1_700_000_000.9
    ) as sender:
        result = await sender.deliver("n-9", '{"a":1}')
    assert result.delivered
    [request] = requests
    assert request.headers["webhook-timestamp"] == "1700000000"
    assert request.content == b'{"a":1}'


# --- the URL rule ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "allow_insecure_loopback", "problem"),
    [
        ("https://hooks.example.com/x", False, None),
        ("https://127.0.0.1:8443/x", False, None),
        ("HTTPS://Hooks.Example.com/x", False, None),
        ("http://hooks.example.com/x", False, "must be an https:// URL"),
        ("http://127.0.0.1:8080/x", False, "must be an https:// URL"),
        ("http://hooks.example.com/x", True, "allowed only for a loopback host"),
        ("http://10.0.0.1/x", True, "allowed only for a loopback host"),
        ("http://localhost.example.com/x", True, "allowed only for a loopback host"),
        ("http://127.0.0.1:8080/x", True, None),
        ("http://127.8.9.10/x", True, None),
        ("http://[::1]:8080/x", True, None),
        ("http://localhost:8080/x", True, None),
        ("ftp://127.0.0.1/x", True, "must be an https:// URL"),
        ("hooks.example.com/x", False, "must be an https:// URL"),
        ("https:///x", False, "has no host"),
        ("https://hooks.example.com:99999/x", False, "is not a valid URL"),
        ("https://[::1/x", False, "is not a valid URL"),
    ],
)
def test_the_url_rule(url: str, allow_insecure_loopback: bool, problem: str | None) -> None:
    found = check_webhook_url(url, allow_insecure_loopback)
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert problem in found
        assert "example" not in found  # never echoes the URL


def test_the_sender_refuses_http_without_the_flag(secret_key: WebhookSecret) -> None:
    url = f"http://127.0.0.1:8080/hooks/{PATH_TOKEN}"
    with pytest.raises(ValueError, match="must be an https:// URL") as raised:
        WebhookSender(url, secret_key)
    assert PATH_TOKEN not in str(raised.value)
    with pytest.raises(ValueError, match="loopback host"):
        WebhookSender(f"http://hooks.example.com/{PATH_TOKEN}", secret_key, allow_insecure_loopback=True)


async def test_http_to_loopback_with_the_development_flag(secret_key: WebhookSecret) -> None:
    plain = Receiver()
    runner = await serve(plain, None)
    try:
        async with WebhookSender(
            plain.hook.replace("https://", "http://"), secret_key, timeout_seconds=TIMEOUT, allow_insecure_loopback=True
        ) as sender:
            result = await sender.deliver("n-1", "{}")
    finally:
        await runner.cleanup()
    assert result.delivered, result.error
    [(headers, received)] = plain.seen
    standardwebhooks.Webhook(SECRET_TEXT).verify(received, headers)


def test_an_unreadable_ca_bundle_is_reported_without_the_url(tmp_path: Path, secret_key: WebhookSecret) -> None:
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    for path, reason in ((tmp_path / "missing.pem", "cannot read CA bundle"), (not_pem, "no usable PEM")):
        with pytest.raises(ValueError, match=reason) as raised:
            WebhookSender(f"https://hooks.example.com/{PATH_TOKEN}", secret_key, ca_file=path)
        assert PATH_TOKEN not in str(raised.value)


async def test_the_sender_shows_neither_the_urls_path_nor_the_secret(secret_key: WebhookSecret) -> None:
    url = f"https://user:{PATH_TOKEN}@hooks.example.com:8443/hooks/{PATH_TOKEN}?token={QUERY_TOKEN}"
    async with WebhookSender(url, secret_key) as sender:
        assert sender.target == "https://hooks.example.com:8443/…"
        assert repr(sender) == "WebhookSender(https://hooks.example.com:8443/…)"
