"""The `security` block in force: tokens read and hashed, TLS files read, limits as gRPC options.

`load_security` is called by `config.load_config`, so `authpool config check`
reports a missing token variable or an unreadable key file before a deploy,
never the values themselves.

Tokens come from two places, both outside the config file:
- each `security.auth.principals[]` entry's `tokenEnv` or `tokenFile`;
- the shortcuts `AUTHPOOL_CLIENT_TOKEN`, `AUTHPOOL_OPERATOR_TOKEN` and
  `AUTHPOOL_ADMIN_TOKEN` (or `..._FILE`, a path), for principals named after
  their role, so the guide's config template serves with tokens as it is.
A variable or file may hold several tokens (whitespace or comma separated):
that is how a token is rotated without downtime.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from authpool_server.addresses import is_loopback_host
from authpool_server.config_server import KeepaliveConfig, RateLimitConfig, SecurityConfig
from authpool_server.security.ratelimit import Bucket
from authpool_server.security.roles import Principal, Role
from authpool_server.security.tokens import MIN_TOKEN_LENGTH, TokenDirectory, split_tokens

__all__ = ["CertificateRole", "RateLimits", "SecuritySettings", "TlsFiles", "is_loopback", "load_security"]

ROLE_TOKEN_VARIABLES = {role: f"AUTHPOOL_{role.name}_TOKEN" for role in Role}


@dataclass(frozen=True, slots=True)
class CertificateRole:
    """A client certificate matched by its full subject or its common name."""

    principal: Principal
    subject: str | None = None
    common_name: str | None = None

    def matches(self, subject: str, common_name: str) -> bool:
        return subject == self.subject if self.subject is not None else common_name == self.common_name


@dataclass(frozen=True, slots=True)
class TlsFiles:
    # No PEM in reprs: a key may sit in the same file as its certificate.
    cert_chain: bytes = field(repr=False)
    private_key: bytes = field(repr=False)
    client_ca: bytes | None = field(repr=False)
    require_client_cert: bool


@dataclass(frozen=True, slots=True)
class RateLimits:
    default: Bucket
    principals: Mapping[str, Bucket]


@dataclass(frozen=True, slots=True)
class SecuritySettings:
    """Everything the interceptors and the listener need; holds digests, never tokens.

    Attributes:
        auth_required: False only through `without_auth` (the CLI's --insecure-no-auth).
        tokens: Token digests to principals.
        certificates: With mutual TLS, certificate identities to principals.
        open_services: gRPC services callable without credentials.
        tls: Server certificate, key and optional client CA; None serves plaintext.
        rate_limits: Per-principal buckets; None when disabled.
        max_message_bytes: The largest request accepted.
        keepalive: HTTP/2 keepalive policy.
    """

    tokens: TokenDirectory = field(default_factory=TokenDirectory)
    certificates: tuple[CertificateRole, ...] = ()
    open_services: frozenset[str] = frozenset()
    tls: TlsFiles | None = None
    rate_limits: RateLimits | None = None
    max_message_bytes: int = 1 << 20
    keepalive: KeepaliveConfig = field(default_factory=KeepaliveConfig)
    auth_required: bool = True

    def without_auth(self) -> SecuritySettings:
        """For local development only: every caller is an anonymous admin."""
        return replace(self, auth_required=False)

    @property
    def has_credentials(self) -> bool:
        return len(self.tokens) > 0 or bool(self.certificates)

    def grpc_options(self) -> list[tuple[str, int]]:
        k = self.keepalive
        options = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", round(k.server_ping_interval_seconds * 1000)),
            ("grpc.keepalive_timeout_ms", round(k.server_ping_timeout_seconds * 1000)),
            ("grpc.http2.min_ping_interval_without_data_ms", round(k.min_client_ping_interval_seconds * 1000)),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", round(k.min_client_ping_interval_seconds * 1000)),
            ("grpc.http2.max_ping_strikes", k.max_ping_strikes),
            ("grpc.keepalive_permit_without_calls", int(k.permit_without_calls)),
        ]
        if k.max_connection_age_seconds is not None:
            options.append(("grpc.max_connection_age_ms", round(k.max_connection_age_seconds * 1000)))
        return options


def is_loopback(listen: str) -> bool:
    """Whether a host:port (or unix: socket) is reachable only from this machine."""
    return listen.startswith("unix:") or is_loopback_host(listen.rpartition(":")[0])


class _Tokens:
    """Collects (token, principal) pairs and the problems met reading them."""

    def __init__(self, env: Mapping[str, str], base_dir: Path) -> None:
        self.env = env
        self.base_dir = base_dir
        self.entries: list[tuple[str, Principal]] = []
        self.problems: list[str] = []

    def add_env(self, where: str, variable: str, principal: Principal) -> None:
        if not (text := self.env.get(variable, "")).strip():
            self.problems.append(f"{where}: environment variable {variable} is not set")
            return
        self._add(where, f"environment variable {variable}", text, principal)

    def add_file(self, where: str, path: str, principal: Principal) -> None:
        resolved = self.base_dir / Path(path).expanduser()
        try:
            text = resolved.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            self.problems.append(f"{where}: cannot read {resolved} ({reason})")
            return
        self._add(where, str(resolved), text, principal)

    def _add(self, where: str, source: str, text: str, principal: Principal) -> None:
        tokens = split_tokens(text)
        if not tokens:
            self.problems.append(f"{where}: {source} holds no token")
        for token in tokens:
            if len(token) < MIN_TOKEN_LENGTH:
                # Never echo the token, not even its length: say what is expected.
                self.problems.append(f"{where}: a token in {source} is shorter than {MIN_TOKEN_LENGTH} characters")
            else:
                self.entries.append((token, principal))

    def directory(self) -> TokenDirectory:
        owners: dict[str, set[str]] = {}
        for token, principal in self.entries:
            owners.setdefault(token, set()).add(principal.name)
        if any(len(names) > 1 for names in owners.values()):
            shared = sorted({", ".join(sorted(n)) for n in owners.values() if len(n) > 1})
            self.problems.append(f"security.auth: principals {'; '.join(shared)} share a token; each needs its own")
        return TokenDirectory(self.entries)


def _read(where: str, path: str, base_dir: Path, problems: list[str]) -> bytes:
    resolved = base_dir / Path(path).expanduser()
    try:
        data = resolved.read_bytes()
    except OSError as exc:
        problems.append(f"{where}: cannot read {resolved} ({exc.strerror})")
        return b""
    if b"-----BEGIN " not in data:
        problems.append(f"{where}: {resolved} is not PEM")
    return data


def load_security(config: SecurityConfig, env: Mapping[str, str], base_dir: Path) -> tuple[SecuritySettings, list[str]]:
    """Read the tokens and TLS files that `config` names; relative paths are from `base_dir`.

    Returns the settings and a list of problems (``<field path>: <message>``);
    the settings are only usable when the list is empty.
    """
    tokens = _Tokens(env, base_dir)
    for i, entry in enumerate(config.auth.principals):
        where = f"security.auth.principals[{i}]"
        principal = Principal(entry.name, Role.named(entry.role))
        if entry.token_env is not None:
            tokens.add_env(f"{where}.tokenEnv", entry.token_env, principal)
        elif entry.token_file is not None:
            tokens.add_file(f"{where}.tokenFile", entry.token_file, principal)
    for role, variable in ROLE_TOKEN_VARIABLES.items():
        principal = Principal(str(role), role)
        if env.get(variable, "").strip():
            tokens.add_env(variable, variable, principal)
        if path := env.get(f"{variable}_FILE", "").strip():
            tokens.add_file(f"{variable}_FILE", path, principal)
    directory = tokens.directory()
    problems = tokens.problems

    tls = None
    certificates: tuple[CertificateRole, ...] = ()
    if (t := config.tls) is not None:
        tls = TlsFiles(
            cert_chain=_read("security.tls.certFile", t.cert_file, base_dir, problems),
            private_key=_read("security.tls.keyFile", t.key_file, base_dir, problems),
            client_ca=_read("security.tls.clientCaFile", t.client_ca_file, base_dir, problems)
            if t.client_ca_file
            else None,
            require_client_cert=t.require_client_cert,
        )
        certificates = tuple(
            CertificateRole(Principal(c.name, Role.named(c.role)), subject=c.subject, common_name=c.common_name)
            for c in t.client_certificates
        )

    rate_limits = None
    if config.rate_limits.enabled:
        known = directory.principals() | {c.principal.name for c in certificates}
        for name in sorted(set(config.rate_limits.principals) - known):
            problems.append(f"security.rateLimits.principals.{name}: no principal of that name has credentials")
        rate_limits = RateLimits(
            default=_bucket(config.rate_limits.default),
            principals={name: _bucket(limit) for name, limit in config.rate_limits.principals.items()},
        )

    settings = SecuritySettings(
        tokens=directory,
        certificates=certificates,
        open_services=frozenset(config.auth.open_services),
        tls=tls,
        rate_limits=rate_limits,
        max_message_bytes=config.limits.max_message_bytes,
        keepalive=config.limits.keepalive,
    )
    return settings, problems


def _bucket(limit: RateLimitConfig) -> Bucket:
    return Bucket(rate=limit.requests_per_second, burst=limit.burst)
