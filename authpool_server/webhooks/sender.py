"""Delivering one signed webhook over HTTPS, and the retry schedule around it.

`WebhookSender.deliver` makes one attempt and says how it went; it never
raises for the receiver's faults and never sleeps or retries. The dispatcher
owns the outbox: it calls `deliver` with the stored notification id and body
(the same on every attempt), then uses `RetryPolicy` to decide when to try
again or to dead-letter.

Failure reasons are short and meant for operators (`Status`, logs, the
`webhook_failure` event): "HTTP 500", "timed out after 5 s",
"connection refused", "TLS: certificate verify failed: ...". They never
contain the URL, which may carry a token, nor anything of the secret.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import httpx

from authpool_server import __version__
from authpool_server.webhooks.signing import WebhookSecret, sign
from authpool_server.webhooks.urls import BLOCKED_TARGET, check_webhook_url, redacted_url, resolves_to_blocked

__all__ = ["USER_AGENT", "DeliveryResult", "RetryPolicy", "WebhookSender", "backoff", "load_ca_bundle"]

USER_AGENT = f"authpool/{__version__}"


class Random(Protocol):
    """What `backoff` needs of a random source (`random.Random` has it)."""

    def random(self) -> float: ...


def backoff(attempt: int, *, initial: float, maximum: float, rng: Random) -> float:
    """Seconds to wait after failed attempt number `attempt` (1 for the first), with full jitter.

    The cap doubles from `initial` with each attempt up to `maximum`; the delay is
    uniform in [0, cap], so receivers recovering from an outage are not hit by
    every sender at once (AWS Architecture Blog, "Exponential Backoff And Jitter").
    """
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    if initial <= 0 or maximum < initial:
        raise ValueError("need 0 < initial <= maximum")
    # Clamp the exponent: 2.0 ** 1100 overflows a float.
    cap = min(maximum, initial * 2.0 ** min(attempt - 1, 64))
    return cap * rng.random()


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how long to try one notification before it is dead-lettered.

    With the defaults the eighth failure dead-letters a notification, having
    waited at most 1 + 2 + ... + 64 = 127 s (less with jitter) in between.
    """

    max_attempts: int = 8
    initial_seconds: float = 1.0
    maximum_seconds: float = 300.0
    timeout_seconds: float = 5.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not 0 < self.initial_seconds <= self.maximum_seconds:
            raise ValueError("need 0 < initial_seconds <= maximum_seconds")
        if self.timeout_seconds <= 0:
            raise ValueError("timeout_seconds must be positive")

    def exhausted(self, attempts: int) -> bool:
        """Whether `attempts` failed attempts are the last allowed (dead-letter now)."""
        return attempts >= self.max_attempts

    def delay(self, attempt: int, rng: Random) -> float:
        """Seconds to wait after failed attempt `attempt` (1-based) before the next."""
        return backoff(attempt, initial=self.initial_seconds, maximum=self.maximum_seconds, rng=rng)


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """How one attempt went.

    Attributes:
        delivered: The receiver answered 2xx.
        error: Why not, for operators ("HTTP 500", "connection refused"); empty when delivered.
        status_code: The receiver's HTTP status, None when no answer came.
        seconds: How long the attempt took.
    """

    delivered: bool
    error: str = ""
    status_code: int | None = None
    seconds: float = 0.0


def load_ca_bundle(path: str | Path) -> ssl.SSLContext:
    """A client TLS context that trusts only the CAs in the PEM file at `path`.

    Raises:
        ValueError: the file cannot be read or holds no certificate.
    """
    try:
        return ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as exc:
        raise ValueError(f"CA bundle {path} holds no usable PEM certificate ({exc.reason})") from None
    except OSError as exc:
        raise ValueError(f"cannot read CA bundle {path} ({exc.strerror})") from None


class _RedactUrls(logging.Filter):
    """httpx logs every request with its full URL at INFO; a webhook URL may carry a token.

    Installed on the "httpx" logger, it shows such URLs as ``scheme://host:port/…``.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(arg, httpx.URL) for arg in record.args):
            record.args = tuple(redacted_url(str(a)) if isinstance(a, httpx.URL) else a for a in record.args)
        return True


def _redact_httpx_logs() -> None:
    logger = logging.getLogger("httpx")
    if not any(isinstance(f, _RedactUrls) for f in logger.filters):
        logger.addFilter(_RedactUrls())


class WebhookSender:
    """POSTs signed notifications to one receiver.

    Args:
        url: The receiver; checked with `check_webhook_url`.
        secret: The signing key.
        timeout_seconds: The whole attempt (connect, TLS, request, response headers) must fit in this.
        ca_file: A PEM bundle to trust instead of the system's CAs (internal endpoints).
        allow_insecure_loopback: Development only: allow http:// to a loopback host.
        clock: POSIX seconds, for `webhook-timestamp`.
        transport: Replaces the network (tests: `httpx.MockTransport`).

    Raises:
        ValueError: the URL is not acceptable, or the CA bundle cannot be loaded.
            The message never repeats the URL.
    """

    def __init__(
        self,
        url: str,
        secret: WebhookSecret,
        *,
        timeout_seconds: float = 5.0,
        ca_file: str | Path | None = None,
        allow_insecure_loopback: bool = False,
        clock: Callable[[], float] = time.time,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if problem := check_webhook_url(url, allow_insecure_loopback):
            raise ValueError(f"webhook URL {problem}")
        if timeout_seconds <= 0:
            raise ValueError("timeout_seconds must be positive")
        verify = load_ca_bundle(ca_file) if ca_file is not None else ssl.create_default_context()
        _redact_httpx_logs()
        self._url = url.strip()
        self._secret = secret
        self._timeout = timeout_seconds
        self._clock = clock
        self._hidden = _hidden_parts(self._url)
        self._guard_dns = transport is None  # a transport of the caller's replaces the network
        self._client = httpx.AsyncClient(
            verify=verify,
            http1=True,
            http2=False,
            follow_redirects=False,
            timeout=httpx.Timeout(timeout_seconds),
            headers={"user-agent": USER_AGENT},
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"WebhookSender({redacted_url(self._url)})"

    @property
    def target(self) -> str:
        """The receiver as it may be shown: ``scheme://host:port/…``."""
        return redacted_url(self._url)

    async def deliver(self, notification_id: str, body: str) -> DeliveryResult:
        """One attempt: POST `body`, signed, with `notification_id` as ``webhook-id``.

        Never raises for network or receiver problems; those come back as a
        failed result. Cancellation propagates.
        """
        timestamp = int(self._clock())
        headers = {
            "content-type": "application/json",
            "webhook-id": notification_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self._secret, notification_id, timestamp, body),
        }
        started = time.monotonic()
        if self._guard_dns:
            try:
                async with asyncio.timeout(self._timeout):
                    blocked = await resolves_to_blocked(self._url)
            except TimeoutError as exc:
                return DeliveryResult(False, _describe(exc, self._timeout), seconds=_since(started))
            if blocked:
                # The name passed the config check but resolves to, e.g., the cloud metadata service.
                return DeliveryResult(False, f"webhook URL {BLOCKED_TARGET}", seconds=_since(started))
        try:
            # httpx's timeout bounds each phase; this bounds the attempt, so a receiver
            # that trickles its answer cannot hold a delivery slot for long.
            async with (
                asyncio.timeout(self._timeout),
                self._client.stream("POST", self._url, content=body.encode(), headers=headers) as response,
            ):
                # The answer's body is never read: nothing in it matters, and it may be large.
                status = response.status_code
        except (httpx.HTTPError, TimeoutError, OSError) as exc:
            return DeliveryResult(False, self._scrub(_describe(exc, self._timeout)), seconds=_since(started))
        if 200 <= status < 300:
            return DeliveryResult(True, status_code=status, seconds=_since(started))
        reason = f"HTTP {status} (redirects are not followed)" if 300 <= status < 400 else f"HTTP {status}"
        return DeliveryResult(False, reason, status_code=status, seconds=_since(started))

    async def close(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> WebhookSender:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    def _scrub(self, text: str) -> str:
        # Reasons are built from fixed words plus what TLS and the OS say; should either
        # ever quote the request, this keeps the URL's secret-bearing parts out.
        for part in self._hidden:
            text = text.replace(part, "…")
        return text


def _since(started: float) -> float:
    return time.monotonic() - started


def _hidden_parts(url: str) -> tuple[str, ...]:
    parts = urlsplit(url)
    candidates = [url, parts.path, parts.query, parts.fragment, parts.username or "", parts.password or ""]
    # Longest first, so the whole URL goes before its pieces; "/" alone says nothing.
    return tuple(sorted({c for c in candidates if len(c) > 1}, key=len, reverse=True))


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then what caused it, breadth first, through exception groups."""
    seen: set[int] = set()
    queue = [exc]
    while queue:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        if isinstance(current, BaseExceptionGroup):
            queue.extend(current.exceptions)
        queue.extend(e for e in (current.__cause__, current.__context__) if e is not None)


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return f"timed out after {timeout:g} s"
    for cause in _causes(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"TLS: certificate verify failed: {cause.verify_message}"
        if isinstance(cause, ssl.SSLError):
            return f"TLS: {cause.reason or 'handshake failed'}"
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, ConnectionResetError):
            return "connection reset by the receiver"
        if isinstance(cause, socket.gaierror):
            return "host name not resolved"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "the receiver closed the connection without a valid HTTP answer"
    if isinstance(exc, httpx.ConnectError):
        return "connection failed"
    if isinstance(exc, httpx.NetworkError):
        return "network error"
    return f"request failed ({type(exc).__name__})"
