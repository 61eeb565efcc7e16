"""How the client's channels are built: retries, TLS, and the bearer token.

Retries are gRPC's own (gRFC A6), configured through the service config,
not loops of ours: the channel re-sends a call that failed with UNAVAILABLE
and got no response headers yet, the same bytes each time, so a retried
`ReportUsage` carries the same `request_id` and the server counts it once.
Every AuthPool RPC is safe to repeat that way: Allocate is sticky per client,
Release and ReportUsage are idempotent, the rest read or converge.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

__all__ = ["ChannelSettings", "RetryPolicy"]

SERVICE = "authpool.v1.AuthPool"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """The channel's retry policy for UNAVAILABLE (a gRPC `retryPolicy`).

    The defaults ride out a server restart of a second or two: up to five
    attempts, waits drawn at random below 0.1, 0.2, 0.4 and 0.8 s. Each call's
    deadline still bounds the whole.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    backoff_multiplier: float = 2.0

    def service_config(self) -> str:
        policy = {
            "maxAttempts": self.max_attempts,
            "initialBackoff": f"{self.initial_backoff}s",
            "maxBackoff": f"{self.max_backoff}s",
            "backoffMultiplier": self.backoff_multiplier,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
        return json.dumps(
            {
                "methodConfig": [{"name": [{"service": SERVICE}], "retryPolicy": policy}],
                # A server that keeps failing is not hammered: retries pause while
                # failures outnumber successes ten to one (per channel).
                "retryThrottling": {"maxTokens": 100, "tokenRatio": 0.1},
            }
        )


def _read(value: bytes | Path | None) -> bytes | None:
    return value.read_bytes() if isinstance(value, Path) else value


@dataclass(frozen=True, slots=True)
class ChannelSettings:
    """Everything a channel needs; built once per client. Its repr never shows the token."""

    target: str
    token: str | None
    insecure: bool
    root_ca: bytes | None
    client_cert: bytes | None
    client_key: bytes | None
    retry: RetryPolicy
    extra_options: tuple[tuple[str, Any], ...]

    @classmethod
    def build(
        cls,
        target: str,
        *,
        token: str | None,
        insecure: bool,
        root_ca: bytes | Path | None,
        client_cert: bytes | Path | None,
        client_key: bytes | Path | None,
        retry: RetryPolicy | None,
        options: tuple[tuple[str, Any], ...],
    ) -> ChannelSettings:
        if insecure and (root_ca is not None or client_cert is not None or client_key is not None):
            raise ValueError("insecure=True sends plaintext; it takes no root_ca, client_cert or client_key")
        if (client_cert is None) != (client_key is None):
            raise ValueError("mutual TLS needs both client_cert and client_key")
        if token is not None and not token.strip():
            raise ValueError("token is empty; pass None to send no token")
        return cls(
            target=target,
            token=token,
            insecure=insecure,
            root_ca=_read(root_ca),
            client_cert=_read(client_cert),
            client_key=_read(client_key),
            retry=retry or RetryPolicy(),
            extra_options=options,
        )

    def __repr__(self) -> str:
        tls = "plaintext" if self.insecure else ("mutual TLS" if self.client_cert else "TLS")
        return f"ChannelSettings(target={self.target!r}, {tls}, token={'set' if self.token else 'none'})"

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Sent with every call. Not call credentials: those refuse plaintext channels, and local development is one."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.enable_retries", 1),
            ("grpc.service_config", self.retry.service_config()),
            # Reconnect within a fraction of a second after a restart (gRPC's default
            # backoff starts at 1 s and grows to 2 min, longer than any call's deadline).
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2_000),
            *self.extra_options,
        ]

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_ca, private_key=self.client_key, certificate_chain=self.client_cert
        )

    def sync_channel(self) -> grpc.Channel:
        if self.insecure:
            return grpc.insecure_channel(self.target, options=self.options())
        return grpc.secure_channel(self.target, self.credentials(), options=self.options())

    def aio_channel(self) -> grpc.aio.Channel:
        if self.insecure:
            return grpc.aio.insecure_channel(self.target, options=self.options())
        return grpc.aio.secure_channel(self.target, self.credentials(), options=self.options())
