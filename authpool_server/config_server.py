"""How the server is exposed: authentication, TLS, rate and input limits, the admin port.

These are the `security` and `admin` blocks of the configuration document.
Nothing here holds a secret: a principal names the environment variable or
the mounted file its token comes from (the guide: "DO NOT store API keys in
config files"), and TLS names its key and certificate files. The values are
read by `security.settings.load_security`.
"""

from __future__ import annotations

import re
from typing import Literal, Self

from pydantic import Field, field_validator, model_validator

from authpool_server.config_model import ConfigModel, check_id

__all__ = [
    "AdminConfig",
    "AuthConfig",
    "CertificateRoleConfig",
    "KeepaliveConfig",
    "LimitsConfig",
    "PrincipalConfig",
    "RateLimitConfig",
    "RateLimitsConfig",
    "SecurityConfig",
    "StoreConfig",
    "TlsConfig",
]

RoleName = Literal["client", "operator", "admin"]

_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,127}")
# Kubernetes probes and grpcurl discovery work without a token unless the operator says otherwise.
DEFAULT_OPEN_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
)


def _host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65_535:
        raise ValueError("must be host:port (port 0-65535)")
    return value


class PrincipalConfig(ConfigModel):
    """A caller known by a bearer token: its name (for logs and rate limits), role and token source."""

    name: str
    role: RoleName
    token_env: str | None = None
    token_file: str | None = None

    _valid_name = field_validator("name")(check_id)

    @field_validator("token_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.fullmatch(value):
            raise ValueError("must be an environment variable name such as AUTHPOOL_TOKEN_SCHEDULER")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.token_env is None) == (self.token_file is None):
            raise ValueError("give exactly one of tokenEnv or tokenFile (the token itself never goes in this file)")
        return self


class AuthConfig(ConfigModel):
    principals: tuple[PrincipalConfig, ...] = Field(default=(), strict=False)
    # Services callable without credentials, by full gRPC service name.
    open_services: tuple[str, ...] = Field(default=DEFAULT_OPEN_SERVICES, strict=False)

    @field_validator("principals")
    @classmethod
    def _unique_names(cls, value: tuple[PrincipalConfig, ...]) -> tuple[PrincipalConfig, ...]:
        names = [p.name for p in value]
        if duplicates := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"principal names must be unique; repeated: {', '.join(duplicates)}")
        return value


class CertificateRoleConfig(ConfigModel):
    """With mutual TLS: a client certificate, by subject or common name, is this principal."""

    subject: str | None = None
    common_name: str | None = None
    name: str
    role: RoleName

    _valid_name = field_validator("name")(check_id)

    @model_validator(mode="after")
    def _one_match(self) -> Self:
        if (self.subject is None) == (self.common_name is None):
            raise ValueError("give exactly one of subject (RFC 2253, e.g. 'CN=ops,O=Company') or commonName")
        return self


class TlsConfig(ConfigModel):
    cert_file: str = Field(min_length=1)
    key_file: str = Field(min_length=1)
    # Mutual TLS: verify client certificates against this CA.
    client_ca_file: str | None = None
    require_client_cert: bool = False
    client_certificates: tuple[CertificateRoleConfig, ...] = Field(default=(), strict=False)

    @model_validator(mode="after")
    def _mtls_needs_ca(self) -> Self:
        if (self.require_client_cert or self.client_certificates) and self.client_ca_file is None:
            raise ValueError("clientCaFile is required to verify client certificates")
        if self.client_certificates and not self.require_client_cert:
            # gRPC's Python API can require a client certificate or not ask for one; it cannot
            # ask for an optional one, so the mapping would never see a certificate.
            raise ValueError("clientCertificates need requireClientCert: true (gRPC cannot ask for an optional one)")
        return self


class RateLimitConfig(ConfigModel):
    """A token bucket: `requestsPerSecond` sustained, bursts of up to `burst` calls."""

    requests_per_second: float = Field(gt=0, strict=False)
    burst: int = Field(ge=1)


class RateLimitsConfig(ConfigModel):
    enabled: bool = True
    # Per principal (each its own bucket), unless listed under `principals`.
    default: RateLimitConfig = RateLimitConfig(requests_per_second=500, burst=1000)
    principals: dict[str, RateLimitConfig] = Field(default_factory=dict, strict=False)


class KeepaliveConfig(ConfigModel):
    """HTTP/2 keepalive: what the server sends, and what it tolerates from clients."""

    # Clients pinging more often than this get a strike; `maxPingStrikes` strikes close the connection.
    min_client_ping_interval_seconds: float = Field(default=10.0, gt=0, strict=False)
    max_ping_strikes: int = Field(default=2, ge=0)
    # Idle WatchEvents streams are legitimate, so pings without calls are allowed by default.
    permit_without_calls: bool = True
    # The server's own pings find dead peers (a vanished pod, a dropped NAT entry).
    server_ping_interval_seconds: float = Field(default=60.0, gt=0, strict=False)
    server_ping_timeout_seconds: float = Field(default=20.0, gt=0, strict=False)
    # Ending connections after a while spreads clients over new replicas; off by default.
    max_connection_age_seconds: float | None = Field(default=None, gt=0, strict=False)


class LimitsConfig(ConfigModel):
    max_message_bytes: int = Field(default=1 << 20, ge=4096, le=64 << 20)
    keepalive: KeepaliveConfig = KeepaliveConfig()


class SecurityConfig(ConfigModel):
    auth: AuthConfig = AuthConfig()
    tls: TlsConfig | None = None
    rate_limits: RateLimitsConfig = RateLimitsConfig()
    limits: LimitsConfig = LimitsConfig()


class StoreConfig(ConfigModel):
    """Where the pool's state lives: the embedded SQLite file (default) or PostgreSQL.

    PostgreSQL's DSN comes from AUTHPOOL_DATABASE_URL or the file named by
    AUTHPOOL_DATABASE_URL_FILE, never from this file: it may hold a password.
    """

    kind: Literal["sqlite", "postgres"] = "sqlite"
    # The PostgreSQL schema holding AuthPool's tables (one per pool on a shared database).
    schema_name: str = Field(default="authpool", pattern=r"^[a-z_][a-z0-9_]{0,62}$", alias="schema")
    pool_size: int = Field(default=4, ge=1, le=64)
    connect_timeout_seconds: float = Field(default=5.0, gt=0, le=60, strict=False)


class AdminConfig(ConfigModel):
    """The admin HTTP port: /metrics, /debug/auth-pool, /debug/memory."""

    enabled: bool = True
    # 9464 is the OpenTelemetry Prometheus exporter's customary port.
    listen: str = "127.0.0.1:9464"

    _valid_listen = field_validator("listen")(_host_port)
