"""Config hot reload: apply a changed config file to a running server.

A reload is asked for by SIGHUP, or noticed by polling the file: its
contents are hashed every `poll_seconds`, through whatever symlinks lead to
it, so an edit in place, a replaced file and Kubernetes' ConfigMap update
(an atomic swap of the `..data` symlink the file is reached through) are all
seen. The new file is loaded and validated exactly as at start; an invalid
one is rejected with every problem logged, and the running config stays.
A valid one is applied by the pool as one decision (`Pool.reconfigure`),
which records a CONFIG_RELOADED event. A valid file that could not be
applied (the store was away) is tried again at the next poll: a file
counts as seen only once it was applied or rejected.

What the pool does not hold (listen addresses, TLS, tokens, the store,
webhook endpoint and secret, logging) is read at start only: a change there
is logged as needing a restart and otherwise ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from authpool_server.config import ConfigError, Settings, load_config
from authpool_server.pool import Pool, Reconfiguration

__all__ = ["ConfigReloader", "ReloadResult"]

log = logging.getLogger(__name__)

DEFAULT_POLL_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """How one reload went: applied (with what changed), rejected (with every problem), or failed (retried)."""

    applied: Reconfiguration | None
    problems: tuple[str, ...] = ()
    needs_restart: tuple[str, ...] = ()
    failed: str = ""  # a valid file the pool could not apply now; tried again at the next poll

    @property
    def result(self) -> str:
        """For metrics: applied, rejected or failed."""
        return "applied" if self.applied is not None else "failed" if self.failed else "rejected"


def _restart_only(old: Settings, new: Settings) -> list[str]:
    """The settings read at start only that differ between `old` and `new`."""
    fields = {
        "listen": (old.listen, new.listen),
        "dataDir": (old.data_dir, new.data_dir),
        "security": (old.raw.security, new.raw.security),
        "admin": (old.raw.admin, new.raw.admin),
        "store": (old.raw.store, new.raw.store),
        "notifications.webhook": (old.webhooks, new.webhooks),
        "logging": ((old.log_level, old.log_format), (new.log_level, new.log_format)),
        "events.watcherBuffer": (old.pool.watcher_buffer, new.pool.watcher_buffer),
    }
    return [name for name, (before, after) in fields.items() if before != after]


class ConfigReloader:
    def __init__(
        self,
        path: Path,
        running: Settings,
        pool: Pool,
        *,
        poll_seconds: float = DEFAULT_POLL_SECONDS,
        load: Callable[[Path], Settings] = load_config,
        on_result: Callable[[ReloadResult], None] | None = None,
    ) -> None:
        self._path = path
        self._running = running
        self._pool = pool
        self._poll_seconds = poll_seconds
        self._load = load
        self._on_result = on_result
        # What the running config was loaded from: a change made while the server started is seen.
        self._digest: str | None = running.source_digest or self._read_digest()
        self._asked = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="authpool-config-reload")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def request(self) -> None:
        """Reload as soon as possible (SIGHUP), whether or not the file looks changed."""
        self._asked.set()

    def _read_digest(self) -> str | None:
        try:
            return hashlib.sha256(self._path.read_bytes()).hexdigest()
        except OSError:
            return None  # mid-swap, or gone: look again at the next poll

    async def _run(self) -> None:
        poll = self._poll_seconds if self._poll_seconds > 0 else None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._asked.wait(), timeout=poll)
            asked = self._asked.is_set()
            self._asked.clear()
            digest = self._read_digest()
            if asked or (digest is not None and digest != self._digest):
                try:
                    await self.reload()
                except Exception:  # a reload must never take the server down
                    log.exception("config reload failed; the running config stays")

    async def reload(self) -> ReloadResult:
        """Load the file now and apply it if valid; what happened."""
        async with self._lock:
            # Read before loading: should the file change meanwhile, the next poll sees the newer one.
            digest = self._read_digest()
            try:
                settings = await asyncio.to_thread(self._load, self._path)
            except ConfigError as error:
                self._digest = digest  # seen: the next edit is what matters
                result = ReloadResult(None, problems=tuple(error.problems))
                log.error(
                    "config reload rejected; the running config stays",
                    extra={"context": {"config": str(self._path), "problems": list(error.problems)}},
                )
                self._report(result)
                return result
            try:
                applied = await self._pool.reconfigure(settings.pool)
            except Exception as error:
                # Not seen: the next poll tries again (the pool restored the running config).
                result = ReloadResult(None, failed=str(error) or type(error).__name__)
                log.warning(
                    "config reload could not be applied now; trying again",
                    extra={"context": {"config": str(self._path), "error": result.failed}},
                )
                self._report(result)
                return result
            self._digest = settings.source_digest or digest
            # Compared with what the server started with: those settings never change while it runs.
            needs_restart = _restart_only(self._running, settings)
            result = ReloadResult(applied, needs_restart=tuple(needs_restart))
            log.info(
                "config reloaded",
                extra={
                    "context": {
                        "config": str(self._path),
                        "added": list(applied.added),
                        "removed": list(applied.removed),
                        "changed": list(applied.changed),
                        "pool_settings_changed": applied.pool_changed,
                        "clients_moved": applied.clients_moved,
                    }
                },
            )
            if needs_restart:
                log.warning(
                    "config changes that take effect only after a restart",
                    extra={"context": {"settings": needs_restart}},
                )
            self._report(result)
            return result

    def _report(self, result: ReloadResult) -> None:
        if self._on_result is not None:
            self._on_result(result)
