"""The flags every operator command shares, and the environment variables behind them.

Kept apart from the commands so that building the `authpool` parser imports
neither grpc nor rich: `authpool config check` and `authpool serve --help`
stay as quick as they were.
"""

from __future__ import annotations

import argparse

__all__ = [
    "CA_ENV",
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT_SECONDS",
    "TARGET_ENV",
    "TOKEN_ENV",
    "TOKEN_FILE_ENV",
    "common_flags",
]

DEFAULT_TARGET = "127.0.0.1:50051"  # where `make run` serves
DEFAULT_TIMEOUT_SECONDS = 10.0
TARGET_ENV = "AUTHPOOL_TARGET"
TOKEN_ENV = "AUTHPOOL_TOKEN"  # noqa: S105 - the variable's name, not a token
TOKEN_FILE_ENV = "AUTHPOOL_TOKEN_FILE"  # noqa: S105 - likewise
CA_ENV = "AUTHPOOL_CA"


def common_flags() -> argparse.ArgumentParser:
    """A parent parser with the connection flags and --json, for every command that calls the server."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--json", action="store_true", help="print JSON with stable keys, for scripts")
    group = parser.add_argument_group("connection")
    group.add_argument("--target", help=f"the server's host:port (default: ${TARGET_ENV}, else {DEFAULT_TARGET})")
    group.add_argument(
        "--token-file",
        help=f"a file holding the bearer token (default: ${TOKEN_ENV}, else the file ${TOKEN_FILE_ENV} names); "
        "there is no --token flag, so that the token stays out of `ps` and shell history",
    )
    group.add_argument("--ca", help=f"verify the server's TLS certificate with this CA bundle (default: ${CA_ENV})")
    group.add_argument("--tls", action="store_true", help="use TLS, trusting the system's CAs")
    group.add_argument("--cert", help="client certificate (PEM) for mutual TLS; needs --key")
    group.add_argument("--key", help="the client certificate's private key (PEM)")
    group.add_argument("--server-name", help="the name to expect on the server's certificate (default: the host)")
    group.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_SECONDS,
        help=f"deadline of each call, in seconds (default: {DEFAULT_TIMEOUT_SECONDS:g})",
    )
    return parser
