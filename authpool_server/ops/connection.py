"""Where the operator commands connect, and as whom: target, TLS and bearer token.

Each comes from a flag or, failing that, the environment:

| what    | flag                            | environment                             | default           |
|---------|---------------------------------|-----------------------------------------|-------------------|
| target  | `--target HOST:PORT`            | `AUTHPOOL_TARGET`                       | `127.0.0.1:50051` |
| token   | `--token-file PATH`             | `AUTHPOOL_TOKEN`, `AUTHPOOL_TOKEN_FILE` | none              |
| TLS     | `--ca FILE` / `--tls`           | `AUTHPOOL_CA`                           | plaintext         |

There is no `--token` flag on purpose: a command line is visible to every
user of the machine through `ps` and lands in shell history. The token goes
into the `authorization` metadata of each call and nowhere else: `Endpoint`
keeps it out of its repr, and no message of this package contains it.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from authpool_server.api import authpool_pb2_grpc
from authpool_server.ops.errors import OpsError
from authpool_server.ops.flags import (
    CA_ENV,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT_SECONDS,
    TARGET_ENV,
    TOKEN_ENV,
    TOKEN_FILE_ENV,
)

__all__ = ["Endpoint", "Session", "endpoint_from", "open_session"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A server to call and the credentials to call it with."""

    target: str
    token: str | None = field(default=None, repr=False)
    credentials: grpc.ChannelCredentials | None = field(default=None, repr=False)
    server_name: str | None = None
    timeout: float = DEFAULT_TIMEOUT_SECONDS

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


def _read(flag: str, path: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as error:
        raise OpsError(f"cannot read {flag} {path} ({error.strerror})", exit_code=2) from None


def _token(args: argparse.Namespace, env: Mapping[str, str]) -> str | None:
    if args.token_file:
        return _token_in_file("--token-file", args.token_file)
    if token := env.get(TOKEN_ENV, "").strip():
        return _one_token(token, TOKEN_ENV)
    if path := env.get(TOKEN_FILE_ENV, "").strip():
        return _token_in_file(TOKEN_FILE_ENV, path)
    return None  # a server run with --insecure-no-auth needs none


def _token_in_file(flag: str, path: str) -> str:
    try:
        text = _read(flag, path).decode()
    except UnicodeDecodeError:
        raise OpsError(f"{flag} {path} is not UTF-8 text", exit_code=2) from None
    return _one_token(text.strip(), f"{flag} {path}")


def _one_token(text: str, source: str) -> str:
    # A server's token file may hold several during a rotation; which one to
    # present is the operator's choice, not ours.
    if not text:
        raise OpsError(f"{source} holds no token", exit_code=2)
    if len(text.replace(",", " ").split()) > 1:
        raise OpsError(f"{source} holds more than one token; give the CLI exactly one", exit_code=2)
    return text


def _credentials(args: argparse.Namespace, env: Mapping[str, str]) -> grpc.ChannelCredentials | None:
    ca = args.ca or env.get(CA_ENV, "").strip() or None
    if bool(args.cert) != bool(args.key):
        raise OpsError("--cert and --key go together", exit_code=2)
    if not (ca or args.tls or args.cert):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read("--ca", ca) if ca else None,  # None: the system's trusted CAs
        private_key=_read("--key", args.key) if args.key else None,
        certificate_chain=_read("--cert", args.cert) if args.cert else None,
    )


def endpoint_from(args: argparse.Namespace, env: Mapping[str, str]) -> Endpoint:
    """The endpoint the flags in `args` and the environment `env` describe; OpsError (exit 2) when unusable."""
    if args.timeout <= 0:
        raise OpsError("--timeout must be more than 0 seconds", exit_code=2)
    return Endpoint(
        target=args.target or env.get(TARGET_ENV, "").strip() or DEFAULT_TARGET,
        token=_token(args, env),
        credentials=_credentials(args, env),
        server_name=args.server_name,
        timeout=args.timeout,
    )


@dataclass(frozen=True, slots=True)
class Session:
    """An open channel to one server: `stub` for the calls, `call_options()` for each unary call."""

    endpoint: Endpoint
    stub: authpool_pb2_grpc.AuthPoolStub

    def call_options(self) -> dict[str, Any]:
        """The token and the deadline (`--timeout`); a stream sets its own deadline instead."""
        return {"metadata": self.endpoint.metadata, "timeout": self.endpoint.timeout}


@contextmanager
def open_session(endpoint: Endpoint) -> Iterator[Session]:
    """A channel to `endpoint`, closed on exit. Connecting is lazy: the first call reports an unreachable server."""
    options = [("grpc.ssl_target_name_override", endpoint.server_name)] if endpoint.server_name else []
    if endpoint.credentials is None:
        channel = grpc.insecure_channel(endpoint.target, options=options)
    else:
        channel = grpc.secure_channel(endpoint.target, endpoint.credentials, options=options)
    with channel:
        yield Session(endpoint, authpool_pb2_grpc.AuthPoolStub(channel))
