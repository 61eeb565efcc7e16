"""Run `authpool serve` as a real child process, the way an operator does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

AUTHPOOL = str(Path(sys.executable).with_name("authpool"))


def write_config(path: Path, *, subscriptions: int = 3, max_clients: int = 50, ttl: int = 600) -> Path:
    config = {
        "subscriptions": [
            {
                "id": f"sub{i}",
                "email": f"team+sub{i}@company.com",
                "type": "claude-pro",
                "configDir": f"~/.claude-sub{i}",
                "weeklyBudget": 1000,
                "maxClientsPerSub": max_clients,
            }
            for i in range(1, subscriptions + 1)
        ],
        "weeklyBudgetThreshold": 0.85,
        "fallbackWhenExhausted": True,
        "credentialsRoot": str(path.parent),
        "leaseTtlSeconds": ttl,
        # These servers are driven flat out to test durability, not the rate limiter.
        "security": {"rateLimits": {"enabled": False}},
    }
    path.write_text(json.dumps(config))
    return path


class ServerProcess:
    """`authpool serve` on a free port with its store in `data_dir`.

    Without `env` tokens it runs with --insecure-no-auth; the admin port is
    on a free port too (`admin_port`), so several servers never collide.
    """

    def __init__(
        self, config: Path, data_dir: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = ()
    ) -> None:
        self.config = config
        self.data_dir = data_dir
        self.env = env or {}
        self.args = args  # more `authpool serve` options
        self.process: subprocess.Popen[str] | None = None
        self.port = 0
        self.admin_port = 0
        self.log = data_dir / "server.log"

    def start(self, timeout: float = 20.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "LOG_FORMAT": "json", "LOG_LEVEL": "info", **self.env}
        with_tokens = any(name.startswith("AUTHPOOL_") and "TOKEN" in name for name in self.env)
        with self.log.open("a") as log:
            if self.log.stat().st_size and not self.log.read_bytes().endswith(b"\n"):
                log.write("\n")  # an earlier server was killed mid-line: start this one's on a line of its own
                log.flush()
            self.process = subprocess.Popen(
                [
                    AUTHPOOL,
                    "serve",
                    "--config",
                    str(self.config),
                    "--data-dir",
                    str(self.data_dir),
                    "--listen",
                    "127.0.0.1:0",
                    "--admin-listen",
                    "127.0.0.1:0",
                    *([] if with_tokens else ["--insecure-no-auth"]),
                    *self.args,
                ],
                stdout=log,
                stderr=log,
                text=True,
                env=env,
            )
        self.port = self._wait_for_port(timeout)
        self._wait_serving(timeout)

    def _wait_for_port(self, timeout: float) -> int:
        # The server logs the port it bound as JSON; an operator can do the same.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log.read_text()}")
            for line in reversed(self.log.read_text().splitlines()):
                if line.startswith("{"):
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue  # the last line of a server killed mid-write
                    if entry["message"] == "serving" and entry["context"].get("pid") == self.process.pid:
                        self.admin_port = int(entry["context"]["admin_port"])
                        return int(entry["context"]["port"])
            time.sleep(0.05)
        raise TimeoutError(f"server did not start:\n{self.log.read_text()}")

    def _wait_serving(self, timeout: float) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service="authpool.v1.AuthPool"), timeout=timeout)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
