"""The operator's side of the `authpool` command: `status`, `watch`, `rebalance`, `drain`, `undrain`.

Each command is a client of the gRPC API (the generated stubs in
`authpool_server.api`), so it works against any reachable server with an
operator token (an admin's for drain and undrain), exactly as grpcurl would.

- `flags.py`       the shared flags and environment variables (no grpc import)
- `commands.py`    the subcommands and the runner: exit codes, one-line errors
- `connection.py`  target, TLS and bearer token -> a channel and its metadata
- `errors.py`      a failed call -> `CODE (REASON): message; hint`
- `output.py`      rich for people, JSON with stable keys for scripts
- `status.py`, `watch.py`, `actions.py` (rebalance, drain, undrain)
"""

from authpool_server.ops.commands import add_commands

__all__ = ["add_commands"]
