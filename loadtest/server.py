"""The server under test, as deployed: `authpool serve` with a config file in the guide's format.

Not `bench.server` (which builds a pool that never runs out): here the
production entry point reads a generated `auth-pool.json` with the guide's
shape (subscriptions with weekly budgets and client limits, the 0.85
threshold, the fallback, rebalancing, notification rules, one bearer token
per calling service, per-principal rate limits as shipped) and serves it
with the whole interceptor chain and a JSON access-log line per call. Its
log goes to a file; the "serving" line says its port.

`Sampler` reads the server's RSS and CPU, the generators' CPU, the
machine's CPU and its CPU and I/O pressure (PSI) from /proc, and the pool's state from Status, every half second;
and every two seconds what the server says it holds (/debug/memory: live
and ended leases, usage records, asyncio tasks), so that memory growth can
be told from state the server must keep.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from authpool_client.api import authpool_pb2 as pb
from authpool_client.api import authpool_pb2_grpc

from bench.load import _machine_cpu, _process_cpu_seconds

__all__ = ["PoolShape", "Sampler", "ServerProcess", "Tokens", "pressure_seconds", "rss_bytes", "serve", "write_config"]

_START_TIMEOUT = 60.0
_STATUS_NAMES = {value: name.removeprefix("SUBSCRIPTION_STATUS_") for name, value in pb.SubscriptionStatus.items()}


@dataclass(frozen=True)
class PoolShape:
    """The pool: `subscriptions` alike, each with `budget` units a week and room for `max_clients`."""

    subscriptions: int = 20
    budget: float = 456.0  # the guide's claude-pro budget, in units (USD)
    max_clients: int = 25
    ttl_seconds: float = 60.0
    services: int = 8  # calling services, each its own principal, token and rate-limit bucket

    def subscription_ids(self) -> list[str]:
        return [f"lt-sub{i:02d}" for i in range(1, self.subscriptions + 1)]


@dataclass(frozen=True)
class Tokens:
    """Bearer tokens, by the environment variable that carries each to the server."""

    clients: dict[str, str]
    ops: tuple[str, str]

    @classmethod
    def fresh(cls, services: int) -> Tokens:
        return cls(
            {f"LOADTEST_TOKEN_SVC{i}": secrets.token_hex(24) for i in range(services)},
            ("LOADTEST_TOKEN_OPS", secrets.token_hex(24)),
        )

    def server_env(self) -> dict[str, str]:
        return {**self.clients, self.ops[0]: self.ops[1]}

    def generator_env(self) -> dict[str, str]:
        return {"LOADTEST_TOKENS": ",".join(self.clients.values()), "LOADTEST_OPS_TOKEN": self.ops[1]}


def write_config(path: Path, shape: PoolShape, tokens: Tokens, *, schema: str | None) -> None:
    """The guide's config template, sized by `shape`; PostgreSQL's DSN stays in the environment."""
    path = path.resolve()
    config: dict[str, Any] = {
        "subscriptions": [
            {
                "id": sub,
                "email": f"team+{sub}@company.com",
                "type": "claude-pro",
                "configDir": f"~/.claude-{sub}",
                "weeklyBudget": shape.budget,
                "maxClientsPerSub": shape.max_clients,
            }
            for sub in shape.subscription_ids()
        ],
        "maxClientsPerSubscription": shape.max_clients,
        "weeklyBudgetThreshold": 0.85,
        "fallbackWhenExhausted": True,
        "fallback": {"id": "fallback", "type": "pay-as-you-go", "credentialRef": ""},
        # Every 30 s rather than the guide's 300, so that cycles (and the moves they make) fall within the run.
        "rebalancing": {
            "enabled": True,
            "intervalSeconds": 30,
            "costGapThreshold": 5.0,
            "maxClientsToMovePerCycle": 3,
            "idleSeconds": 30,
        },
        "notifications": {
            "rules": [
                {"type": "usage_threshold", "threshold": 0.8, "channels": ["log"], "enabled": True},
                {"type": "usage_threshold", "threshold": 0.9, "channels": ["log"], "enabled": True},
                {"type": "failover", "channels": ["log"], "enabled": True},
                {"type": "all_exhausted", "channels": ["log"], "enabled": True},
            ]
        },
        "credentialsRoot": str(path.parent),
        "dataDir": str(path.parent / "data"),
        "leaseTtlSeconds": shape.ttl_seconds,
        "usageRetentionDays": 7,
        "eventRetentionDays": 7,
        "security": {
            "auth": {
                "principals": [
                    *(
                        {"name": f"svc{i}", "role": "client", "tokenEnv": variable}
                        for i, variable in enumerate(tokens.clients)
                    ),
                    {"name": "ops", "role": "operator", "tokenEnv": tokens.ops[0]},
                ]
            }
        },
        "admin": {"enabled": True, "listen": "127.0.0.1:0"},
    }
    if schema is not None:
        config["store"] = {"kind": "postgres", "schema": schema}
    path.write_text(json.dumps(config, indent=2) + "\n")


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    port: int
    admin_port: int
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_problems(self, limit: int = 20) -> list[str]:
        """The first WARNING and ERROR lines of the server's log, and how many.

        The access log is INFO; notifications (the rules' `log` channel, module
        `authpool.notifications`) are WARNING by design and left out.
        """
        found: list[str] = []
        count = 0
        with contextlib.suppress(OSError), self.log_path.open(errors="replace") as log:
            for line in log:
                if '"module": "authpool.notifications"' in line:
                    continue
                if '"level": "WARNING"' in line or '"level": "ERROR"' in line or '"level": "CRITICAL"' in line:
                    count += 1
                    if len(found) < limit:
                        found.append(line.strip()[:400])
                elif not line.startswith("{") and line.strip():
                    count += 1  # not ours: a traceback or a library writing to stderr
                    if len(found) < limit:
                        found.append(line.rstrip()[:400])
        if count > len(found):
            found.append(f"... {count - len(found)} more")
        return found

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _serving_ports(log_path: Path, process: subprocess.Popen[bytes]) -> tuple[int, int]:
    """The gRPC and admin ports from the server's "serving" log line, once it is there."""
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited at start:\n{log_path.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(OSError):
            for line in log_path.read_text(errors="replace").splitlines():
                if line.startswith("{") and '"serving"' in line:
                    entry = json.loads(line)
                    if entry.get("message") == "serving":
                        return int(entry["context"]["port"]), int(entry["context"]["admin_port"] or 0)
        time.sleep(0.1)
    raise RuntimeError(f"the server did not start within {_START_TIMEOUT:.0f}s")


@contextlib.contextmanager
def serve(config: Path, env: dict[str, str], root: Path) -> Iterator[ServerProcess]:
    """`authpool serve --config config` on an ephemeral port; SIGTERM (a graceful stop) on the way out."""
    log_path = config.parent / "server.log"
    command = [sys.executable, "-m", "authpool_server", "serve", "--config", str(config), "--listen", "127.0.0.1:0"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            cwd=root,
            stdout=log,
            stderr=log,
            env={**os.environ, "LOG_FORMAT": "json", "LOG_LEVEL": "info", **env},
        )
    try:
        yield ServerProcess(process, *_serving_ports(log_path, process), log_path)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def pressure_seconds(resource: str) -> float | None:
    """Total time some task waited for `resource` (cpu, io, memory) since boot: Linux PSI; None without it."""
    try:
        some = Path(f"/proc/pressure/{resource}").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    return int(some.rsplit("total=", 1)[1]) / 1e6


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a process, from /proc/<pid>/status (Linux); None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class Sampler:
    """A thread sampling the server and generators every `interval` seconds until stopped."""

    server_pid: int
    target: str
    ops_token: str
    admin_port: int = 0
    interval: float = 0.5
    memory_every: int = 4  # samples between two reads of /debug/memory
    generator_pids: list[int] = field(default_factory=list)
    t0: float = 0.0  # unix time the plan starts; samples are in seconds from it
    samples: list[dict[str, Any]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="loadtest-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = authpool_pb2_grpc.AuthPoolStub(channel)
            metadata = (("authorization", f"Bearer {self.ops_token}"),)
            next_at = time.monotonic()
            while not self._stop.is_set():
                sample = self._sample(stub, metadata)
                if self.admin_port and len(self.samples) % self.memory_every == 0:
                    sample["memory"] = self._memory_page()
                self.samples.append(sample)
                next_at += self.interval
                self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _memory_page(self) -> dict[str, Any] | None:
        """The server's own account of what it holds (/debug/memory on the admin port), or None."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.admin_port}/debug/memory",
            headers={"Authorization": f"Bearer {self.ops_token}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as reply:  # noqa: S310 - fixed http URL, loopback
                page: dict[str, Any] = json.loads(reply.read())
        except (OSError, ValueError):
            return None
        return page

    def _sample(self, stub: authpool_pb2_grpc.AuthPoolStub, metadata: tuple[tuple[str, str], ...]) -> dict[str, Any]:
        sample: dict[str, Any] = {
            "t": time.time() - self.t0,
            "rss_bytes": rss_bytes(self.server_pid),
            "server_cpu_s": _process_cpu_seconds(self.server_pid),
            "generator_cpu_s": [_process_cpu_seconds(pid) for pid in self.generator_pids],
            "machine_cpu_s": _machine_cpu(),
            "pressure_s": {resource: pressure_seconds(resource) for resource in ("cpu", "io")},
        }
        try:
            status = stub.Status(pb.StatusRequest(), timeout=5, metadata=metadata)
        except grpc.RpcError:
            return sample
        counts: dict[str, int] = {}
        for sub in status.subscriptions:
            name = _STATUS_NAMES.get(sub.status, str(sub.status))
            counts[name] = counts.get(name, 0) + 1
        totals = status.totals
        sample["pool"] = {
            "live_clients": totals.live_clients,
            "fallback_clients": totals.fallback_clients,
            "statuses": counts,
            "usage_fraction": totals.weekly_usage_micros / totals.weekly_budget_micros
            if totals.weekly_budget_micros
            else None,
            "last_sequence": totals.last_sequence,
        }
        return sample
