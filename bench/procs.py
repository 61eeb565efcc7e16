"""Child processes of the soak and scale benchmarks: a `bench.server`, `bench.load` runs, /proc readings.

`serve` starts a `bench.server` on a data directory and yields once its
health check says SERVING, with how long that took from the moment the
process was spawned (a restart as an operator sees it). `run_load` runs one
`bench.load` scenario against it and returns its raw result.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ServerHandle",
    "open_fds",
    "readline_within",
    "rss_bytes",
    "run_in_scratch",
    "run_load",
    "serve",
    "tail",
    "thread_count",
]

ROOT = Path(__file__).resolve().parent.parent
_PAGE = os.sysconf("SC_PAGE_SIZE")
_START_TIMEOUT = 120.0
_POLL_SECONDS = 0.01


@dataclass
class ServerHandle:
    process: subprocess.Popen[str]
    port: int
    pid: int
    admin_port: int
    # From spawning the process to the first SERVING health check, and `Server.start()` alone.
    seconds_to_serving: float
    start_seconds: float
    stderr_path: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stderr_tail(self, lines: int = 20) -> str:
        return tail(self.stderr_path, lines)


def tail(path: Path, lines: int = 20) -> str:
    """The last `lines` of a child's stderr file, for an error message ("" if unreadable)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def readline_within(stream: Any, timeout: float) -> str:
    """One line from a child's stdout, or "" after `timeout` seconds."""
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return box[0] if box else ""


def _wait_serving(target: str, deadline: float) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    request = health_pb2.HealthCheckRequest(service="authpool.v1.AuthPool")
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            with contextlib.suppress(grpc.RpcError):
                if stub.Check(request, timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{target} did not become SERVING within {_START_TIMEOUT:.0f}s")
            time.sleep(_POLL_SECONDS)


@contextlib.contextmanager
def serve(
    data_dir: Path,
    stderr_path: Path,
    *,
    subscriptions: int,
    max_clients: int = 100_000,
    chain: str = "off",
    env: dict[str, str] | None = None,
    extra: Sequence[str] = (),
) -> Iterator[ServerHandle]:
    """A `bench.server` on `data_dir`, SERVING; stopped with SIGTERM (a graceful stop) after the block."""
    command = [
        *(sys.executable, "-m", "bench.server", "--data-dir", str(data_dir), "--chain", chain),
        *("--subscriptions", str(subscriptions), "--max-clients", str(max_clients), *extra),
    ]
    with stderr_path.open("w") as stderr:
        spawned = time.monotonic()
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True, env={**os.environ, **(env or {})}
        )
    try:
        line = readline_within(process.stdout, _START_TIMEOUT)
        if not line:
            raise RuntimeError(f"the server did not start:\n{stderr_path.read_text(errors='replace')[-2000:]}")
        info = json.loads(line)
        target = f"127.0.0.1:{info['port']}"
        _wait_serving(target, spawned + _START_TIMEOUT)
        serving = time.monotonic() - spawned
        yield ServerHandle(
            process,
            int(info["port"]),
            int(info["pid"]),
            int(info.get("admin_port") or 0),
            serving,
            float(info.get("start_seconds", 0.0)),
            stderr_path,
        )
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def run_load(
    server: ServerHandle,
    scenario: str,
    out: Path,
    *,
    concurrency: int,
    warmup: float,
    duration: float,
    prefix: str,
    token: str = "",
) -> dict[str, Any]:
    """One `bench.load` run of `scenario` against `server`; its raw result (latencies, errors, CPU)."""
    command = [
        *(sys.executable, "-m", "bench.load", "--target", server.target, "--scenario", scenario),
        *("--concurrency", str(concurrency), "--warmup", str(warmup), "--duration", str(duration)),
        *("--prefix", prefix, "--server-pid", str(server.pid), "--out", str(out)),
    ]
    env = {**os.environ, "BENCH_TOKEN": token} if token else None
    process = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        if readline_within(process.stdout, 60).strip() != "ready":
            raise RuntimeError(f"the {scenario} load process did not get ready:\n{server.stderr_tail()}")
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
        if process.wait(timeout=warmup + duration + 60) != 0:
            raise RuntimeError(f"the {scenario} load process failed (exit {process.returncode})")
        if server.process.poll() is not None:
            raise RuntimeError(f"the server exited during {scenario}:\n{server.stderr_tail()}")
        result: dict[str, Any] = json.loads(out.read_text())
        return result
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def run_in_scratch(root: Path, prefix: str, out: Path | None, run: Callable[[Path], dict[str, Any]]) -> int:
    """A phase's `main`: `run` in a scratch directory under `root` (removed after), its JSON to `out` or stdout."""
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    try:
        result = run(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    text = json.dumps(result, indent=2)
    if out is not None:
        out.write_text(text + "\n")
    else:
        print(text)
    return 0
