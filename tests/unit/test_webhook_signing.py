"""Webhook signing, secrets, the JSON body and the retry schedule: pure functions, no network.

Signatures are checked three ways: the Standard Webhooks spec's own example,
the reference `standardwebhooks` library's verifier (an independent
implementation), and the tampering it must reject.
"""

from __future__ import annotations

import base64
import copy
import json
import pickle
import random
import time

import pytest
import standardwebhooks
from hypothesis import given
from hypothesis import strategies as st

from authpool_server.domain import Event, EventType, Notification, Severity
from authpool_server.webhooks import (
    MIN_KEY_BYTES,
    RetryPolicy,
    WebhookSecret,
    backoff,
    generate_secret,
    notification_body,
    sign,
)
from tests.conftest import secret

# The example of the Standard Webhooks specification (its README, "Signature scheme").
SPEC_SECRET = secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_BODY = '{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

KEY = b"unit-test-webhook-key-0123456789"  # 32 bytes
SECRET_TEXT = secret("whsec_" + base64.b64encode(KEY).decode())
KEY_B64 = secret(base64.b64encode(KEY).decode())


def verify(secret_text: str, msg_id: str, timestamp: int, body: str, signature: str) -> None:
    """The reference verifier; raises WebhookVerificationError on a bad signature."""
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(timestamp), "webhook-signature": signature}
    standardwebhooks.Webhook(secret_text).verify(body, headers, json_parse=False)


# --- signing ---------------------------------------------------------------------------------


def test_the_specifications_example() -> None:
    assert sign(WebhookSecret.parse(SPEC_SECRET), SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY) == SPEC_SIGNATURE


@given(
    msg_id=st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40),
    body=st.text(max_size=200),
)
def test_the_reference_verifier_accepts_our_signatures(msg_id: str, body: str) -> None:
    now = int(time.time())  # the verifier rejects timestamps more than 5 minutes away
    signature = sign(WebhookSecret.parse(SECRET_TEXT), msg_id, now, body)
    verify(SECRET_TEXT, msg_id, now, body, signature)


@pytest.mark.parametrize("tamper", ["id", "timestamp", "body", "key"])
def test_the_reference_verifier_rejects_a_changed_message(tamper: str) -> None:
    now = int(time.time())
    signature = sign(WebhookSecret.parse(SECRET_TEXT), "n-1", now, '{"a":1}')
    msg_id, timestamp, body, key = "n-1", now, '{"a":1}', SECRET_TEXT
    if tamper == "id":
        msg_id = "n-2"
    elif tamper == "timestamp":
        timestamp = now - 1
    elif tamper == "body":
        body = '{"a":2}'
    else:
        key = generate_secret()
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        verify(key, msg_id, timestamp, body, signature)


def test_the_signature_header_shape() -> None:
    value = sign(WebhookSecret.parse(SECRET_TEXT), "n-1", 1_700_000_000, "{}")
    version, _, digest = value.partition(",")
    assert version == "v1"
    assert len(base64.b64decode(digest, validate=True)) == 32  # SHA-256


# --- secrets ---------------------------------------------------------------------------------


def test_parse_accepts_a_files_newline_and_unpadded_base64() -> None:
    padded = WebhookSecret.parse(SECRET_TEXT + "\n")
    unpadded = WebhookSecret.parse(SECRET_TEXT.rstrip("="))
    assert padded == unpadded == WebhookSecret(KEY)


def test_generated_secrets_parse_and_differ() -> None:
    first, second = generate_secret(), generate_secret()
    assert first.startswith("whsec_")
    assert WebhookSecret.parse(first) != WebhookSecret.parse(second)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "must be of the form whsec_"),
        (KEY_B64, "must be of the form whsec_"),  # the key without its prefix
        ("Bearer " + SECRET_TEXT, "must be of the form whsec_"),
        ("whsec_" + KEY_B64[:-4] + "!!!!", "not valid base64"),
        ("whsec_" + KEY_B64[:-1] + "-", "not valid base64"),  # URL-safe alphabet is not the spec's
        ("whsec_" + KEY_B64[:5], "not valid base64"),  # a length base64 cannot have
        ("whsec_", f"shorter than {MIN_KEY_BYTES} bytes"),
        ("whsec_" + base64.b64encode(KEY[: MIN_KEY_BYTES - 1]).decode(), f"shorter than {MIN_KEY_BYTES} bytes"),
    ],
)
def test_parse_rejects_with_a_message_that_never_echoes_the_value(text: str, expected: str) -> None:
    if len(text) > 8:
        secret(text)  # the session check: never in a log line either
    with pytest.raises(ValueError, match=expected) as raised:
        WebhookSecret.parse(text)
    message = str(raised.value)
    # No chained binascii error that might quote it.
    assert raised.value.__cause__ is None
    assert raised.value.__context__ is None or raised.value.__suppress_context__
    for piece in (text, text.removeprefix("whsec_"), KEY_B64[:12]):
        if len(piece) >= 8:
            assert piece not in message


def test_the_minimum_key_length_is_accepted() -> None:
    WebhookSecret(b"k" * MIN_KEY_BYTES)
    with pytest.raises(ValueError, match="shorter than"):
        WebhookSecret(b"k" * (MIN_KEY_BYTES - 1))


def test_no_secret_in_reprs_strings_or_pickles() -> None:
    parsed = WebhookSecret.parse(SECRET_TEXT)
    shown = [repr(parsed), str(parsed), f"{parsed}", repr([parsed]), repr({"s": parsed})]
    for text in shown:
        assert text == "WebhookSecret(<redacted>)" or "WebhookSecret(<redacted>)" in text
        for leak in (SECRET_TEXT, KEY_B64, KEY.decode(), repr(KEY)):
            assert leak not in text
    assert not hasattr(parsed, "__dict__")  # nothing but the slot, so vars() shows nothing either
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(parsed)
    assert copy.deepcopy({"secret": parsed})["secret"] is parsed  # settings holding one can still be copied


# --- the body --------------------------------------------------------------------------------


def notification(**event_changes: object) -> Notification:
    fields: dict[str, object] = {
        "sequence": 42,
        "at": 1_764_000_000.25,
        "type": EventType.USAGE_THRESHOLD_CROSSED,
        "subscription_id": "sub1",
        "client_id": "w1",
        "lease_id": "lease-9",
        "fencing_token": 7,
        "attributes": (("window", "weekly"), ("threshold", "0.8")),
    }
    fields.update(event_changes)
    return Notification(
        id="42-0",
        event=Event(**fields),  # type: ignore[arg-type]
        rule="usage_threshold",
        severity=Severity.INFO,
        channels=("webhook", "log"),
        summary="sub1 passed 80% of its weekly budget",
    )


def test_the_body_has_the_standard_webhooks_shape() -> None:
    body = notification_body(notification())
    assert json.loads(body) == {
        "type": "authpool.usage_threshold",
        "timestamp": "2025-11-24T16:00:00.250Z",
        "data": {
            "id": "42-0",
            "severity": "info",
            "summary": "sub1 passed 80% of its weekly budget",
            "event": {
                "sequence": 42,
                "type": "usage_threshold_crossed",
                "time": "2025-11-24T16:00:00.250Z",
                "subscriptionId": "sub1",
                "clientId": "w1",
                "leaseId": "lease-9",
                "fencingToken": 7,
                "attributes": {"threshold": "0.8", "window": "weekly"},
            },
        },
    }
    assert body == json.dumps(json.loads(body), separators=(",", ":"))  # compact separators
    assert body.isascii()


def test_the_same_notification_gives_the_same_bytes() -> None:
    first = notification_body(notification())
    assert notification_body(notification()) == first
    reordered = notification(attributes=(("threshold", "0.8"), ("window", "weekly")))
    assert notification_body(reordered) == first


@pytest.mark.parametrize(
    "attributes",
    [
        (("owner", "team+sub1@company.com"),),
        (("note", 'moved "alice@example.co.uk"\nto sub2 \u00e9'),),
    ],
)
def test_emails_in_the_body_are_masked_and_it_stays_valid_json(attributes: tuple[tuple[str, str], ...]) -> None:
    body = notification_body(notification(attributes=attributes))
    assert "team+sub1@" not in body
    assert "alice@" not in body
    assert "***@" in json.loads(body)["data"]["event"]["attributes"][attributes[0][0]]


# --- the retry schedule ----------------------------------------------------------------------


class Fixed:
    """A random source that always says `value`."""

    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


def test_the_cap_doubles_up_to_the_maximum() -> None:
    caps = [backoff(n, initial=1.0, maximum=300.0, rng=Fixed(1.0)) for n in range(1, 12)]
    assert caps == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]
    assert backoff(10_000, initial=1.0, maximum=300.0, rng=Fixed(1.0)) == 300.0  # no overflow
    assert backoff(3, initial=1.0, maximum=300.0, rng=Fixed(0.0)) == 0.0


@given(attempt=st.integers(1, 200), seed=st.integers(0, 2**32))
def test_a_delay_is_within_zero_and_the_cap(attempt: int, seed: int) -> None:
    delay = backoff(attempt, initial=0.5, maximum=60.0, rng=random.Random(seed))
    assert 0.0 <= delay <= min(60.0, 0.5 * 2 ** (attempt - 1))


def test_full_jitter_spreads_delays_over_the_whole_range() -> None:
    rng = random.Random(7)
    delays = [backoff(6, initial=1.0, maximum=300.0, rng=rng) for _ in range(2000)]
    assert all(0.0 <= d <= 32.0 for d in delays)
    assert min(delays) < 32.0 * 0.05
    assert max(delays) > 32.0 * 0.95
    assert 32.0 * 0.4 < sum(delays) / len(delays) < 32.0 * 0.6  # uniform: mean near half the cap


@pytest.mark.parametrize(
    ("attempt", "initial", "maximum"),
    [(0, 1.0, 300.0), (1, 0.0, 300.0), (1, 10.0, 5.0)],
)
def test_backoff_refuses_nonsense(attempt: int, initial: float, maximum: float) -> None:
    with pytest.raises(ValueError, match=r"attempt|initial"):
        backoff(attempt, initial=initial, maximum=maximum, rng=Fixed(0.5))


def test_the_retry_policy() -> None:
    policy = RetryPolicy()
    assert (policy.max_attempts, policy.initial_seconds, policy.maximum_seconds, policy.timeout_seconds) == (
        8,
        1.0,
        300.0,
        5.0,
    )
    assert not policy.exhausted(7)
    assert policy.exhausted(8)
    assert policy.delay(4, Fixed(1.0)) == 8.0
    for bad in ({"max_attempts": 0}, {"initial_seconds": 0}, {"maximum_seconds": 0.5}, {"timeout_seconds": 0}):
        with pytest.raises(ValueError, match=r"must|need"):
            RetryPolicy(**bad)  # type: ignore[arg-type]
