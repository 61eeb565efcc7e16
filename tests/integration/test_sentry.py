"""Error reports to Sentry, received the way Sentry receives them: envelopes POSTed over HTTP.

`sentry_sdk.init` configures the whole process, so the reporting side runs
in a child process (the server's own set-up: `configure_logging`, then
`init_sentry`), and a small HTTP server in this process plays Sentry's
ingest endpoint. What matters is what leaves the process: the error, with
emails masked as in the logs and no secret from the failing frame.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import sentry_sdk

from authpool_server.telemetry.sentry import init_sentry

ROOT = Path(__file__).resolve().parents[2]
SUBSCRIPTION_EMAIL = "team+sub1@company.com"
MASKED_EMAIL = "t***@company.com"
# The secret lives only in the failing frame's local variable (read from the environment,
# so it is not in the script's source either): nothing may carry it to Sentry.
FAKE_TOKEN = "sk-ant-oat01-FAKE-token-3f9a7c1e5b2d40688c1e"
# Webhook endpoints carry secrets in their paths (Slack's /services/T../B../<secret>).
WEBHOOK_PATH_SECRET = "hookpath-FAKE-7d41c09a3be2"
# A caller of the admin port whose trace is sampled: that must not make this process trace.
SAMPLED_TRACE = "771f4b6e0b1e4a0c9a5d2c3e4f5a6b7c-8a3c60f7d188f8fa-1"

# The child: the server's own set-up, a real server whose admin port is scraped by a caller
# whose trace is sampled (the aiohttp integration sees those requests), a webhook delivered
# (through httpx) to a URL whose path holds a secret, then an unexpected error logged the
# way the service logs one.
REPORTER = textwrap.dedent(
    """
    import asyncio
    import logging
    import os
    import sys
    import urllib.request
    from pathlib import Path

    import sentry_sdk

    from authpool_server.logs import configure_logging
    from authpool_server.server import Server
    from authpool_server.telemetry.sentry import init_sentry
    from authpool_server.webhooks.sender import WebhookSender
    from authpool_server.webhooks.signing import WebhookSecret
    from tests.conftest import NO_AUTH, make_spec

    configure_logging("info", "json")
    if not init_sentry({"SENTRY_DSN": sys.argv[1]}):
        sys.exit("init_sentry did not start reporting")
    log = logging.getLogger("authpool_server.service")


    async def serve_and_scrape():
        server = Server(
            make_spec(), data_dir=Path(sys.argv[2]), security=NO_AUTH, listen="127.0.0.1:0",
            admin_listen="127.0.0.1:0", background=False,
        )
        await server.start()
        try:
            for _ in range(3):
                url = f"http://127.0.0.1:{server.admin_port}/metrics"
                request = urllib.request.Request(url, headers={"sentry-trace": os.environ["SAMPLED_TRACE"]})
                with await asyncio.to_thread(urllib.request.urlopen, request, timeout=5) as reply:
                    assert reply.status == 200
        finally:
            await server.stop()
        hook = f"{os.environ['INGEST']}/services/T0/B0/{os.environ['WEBHOOK_PATH_SECRET']}"
        async with WebhookSender(hook, WebhookSecret(os.urandom(32)), allow_insecure_loopback=True) as sender:
            assert (await sender.deliver("ntf-1-0", "{}")).delivered


    def refresh_credentials(subscription_email):
        token = os.environ["FAKE_TOKEN"]  # a secret a handler holds while it works
        authorization = "Bearer " + token
        raise RuntimeError(f"provider refused the credentials of {subscription_email}")


    asyncio.run(serve_and_scrape())
    try:
        refresh_credentials("team+sub1@company.com")
    except RuntimeError:
        log.exception(
            "refresh failed for %s",
            "team+sub1@company.com",
            # A secret put into a log line's context by mistake: the logs would show it, Sentry must not.
            extra={"context": {"subscription": "team+sub1@company.com", "refresh_token": os.environ["FAKE_TOKEN"]}},
        )
    sentry_sdk.flush(timeout=5)
    """
)


@dataclass
class Ingest:
    """What a Sentry ingest endpoint received: each envelope's path and decoded body."""

    port: int = 0
    envelopes: list[tuple[str, str]] = field(default_factory=list)  # (path, body)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def bodies(self) -> list[str]:
        with self.lock:
            return [body for _, body in self.envelopes]

    def items(self) -> list[tuple[dict[str, Any], str]]:
        """Every item of every envelope: (item header, payload)."""
        return [item for body in self.bodies() for item in _items(body)]

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(payload) for header, payload in self.items() if header["type"] == "event"]


def _items(body: str) -> list[tuple[dict[str, Any], str]]:
    """An envelope is JSON lines: its header, then per item a header and a one-line payload."""
    lines = body.split("\n")
    items = []
    index = 1
    while index + 1 < len(lines) and lines[index]:
        items.append((json.loads(lines[index]), lines[index + 1]))
        index += 2
    return items


def _decode(body: bytes, encoding: str) -> str:
    if encoding == "gzip":
        body = gzip.decompress(body)
    elif encoding == "deflate":
        body = zlib.decompress(body)
    elif encoding == "br":
        import brotli  # sentry-sdk compresses with brotli only when it is installed

        body = brotli.decompress(body)
    elif encoding not in ("", "identity"):
        raise AssertionError(f"unexpected Content-Encoding {encoding!r}")
    return body.decode()


@pytest.fixture(scope="module")
def ingest() -> Iterator[Ingest]:
    received = Ingest()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.path.startswith("/services/"):  # the child's stand-in webhook, not Sentry
                self.send_response(204)
                self.end_headers()
                return
            with received.lock:
                received.envelopes.append((self.path, _decode(body, self.headers.get("Content-Encoding", ""))))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, format: str, *args: object) -> None:  # quiet: the test reads what arrived
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    received.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, name="sentry-ingest", daemon=True)
    thread.start()
    try:
        yield received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@dataclass(frozen=True)
class Reported:
    ingest: Ingest
    returncode: int
    stderr: str


@pytest.fixture(scope="module")
def reported(ingest: Ingest, tmp_path_factory: pytest.TempPathFactory) -> Reported:
    """One run of the child (a second or two); the tests below read what it sent."""
    work = tmp_path_factory.mktemp("sentry")
    script = work / "reporter.py"
    script.write_text(REPORTER)
    env = {name: value for name, value in os.environ.items() if not name.startswith(("SENTRY_", "OTEL_"))}
    env["FAKE_TOKEN"] = FAKE_TOKEN
    env["WEBHOOK_PATH_SECRET"] = WEBHOOK_PATH_SECRET
    env["SAMPLED_TRACE"] = SAMPLED_TRACE
    env["INGEST"] = f"http://127.0.0.1:{ingest.port}"
    env["PYTHONPATH"] = str(ROOT)  # the child imports tests.conftest
    result = subprocess.run(
        # Warnings are errors, as under pytest: a deprecated option in init_sentry fails here.
        [sys.executable, "-W", "error", str(script), f"http://publickey@127.0.0.1:{ingest.port}/1", str(work)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return Reported(ingest, result.returncode, result.stderr)


def test_an_error_logged_reaches_sentry_with_emails_masked_and_no_secret(reported: Reported) -> None:
    ingest = reported.ingest
    with ingest.lock:
        paths = {path for path, _ in ingest.envelopes}
    assert paths == {"/api/1/envelope/"}
    [event] = ingest.events()
    assert event["level"] == "error"
    assert event["logger"] == "authpool_server.service"
    assert event["release"] == "authpool@0.1.0"
    assert event["logentry"]["formatted"] == f"refresh failed for {MASKED_EMAIL}"
    assert event["logentry"]["params"] == [MASKED_EMAIL]
    assert event["extra"]["context"] == {"subscription": MASKED_EMAIL, "refresh_token": "[Filtered]"}
    [exception] = event["exception"]["values"]
    assert exception["type"] == "RuntimeError"
    assert exception["value"] == f"provider refused the credentials of {MASKED_EMAIL}"
    [frame] = [frame for frame in exception["stacktrace"]["frames"] if frame["function"] == "refresh_credentials"]
    assert "vars" not in frame  # the frame held the token: its locals are never sent

    for body in ingest.bodies():
        assert SUBSCRIPTION_EMAIL not in body
        assert FAKE_TOKEN not in body
        assert FAKE_TOKEN[-12:] not in body  # nor any sizeable piece of it
        assert WEBHOOK_PATH_SECRET not in body  # no breadcrumb of the outgoing request's URL
    # The child's own log line masked the email too: the logs and Sentry agree.
    assert SUBSCRIPTION_EMAIL not in reported.stderr
    assert MASKED_EMAIL in reported.stderr


def test_sentry_gets_errors_not_traces(reported: Reported) -> None:
    # Tracing goes to OpenTelemetry: admin-port requests make no Sentry transaction or span,
    # not even for a caller whose trace is sampled, nor one that is dropped and reported as dropped.
    kinds = [header["type"] for header, _ in reported.ingest.items()]
    assert kinds.count("event") == 1
    assert not {"transaction", "span"} & set(kinds), kinds
    for header, payload in reported.ingest.items():
        if header["type"] == "client_report":
            categories = {entry["category"] for entry in json.loads(payload).get("discarded_events", [])}
            assert not categories & {"transaction", "span"}, payload


def test_without_a_dsn_nothing_is_reported() -> None:
    assert init_sentry({}) is False
    assert init_sentry({"SENTRY_DSN": "  "}) is False
    assert init_sentry({"SENTRY_ENVIRONMENT": "prod"}) is False
    assert not sentry_sdk.get_client().is_active()
