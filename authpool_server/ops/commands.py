"""The operator subcommands of `authpool`, and the one runner that gives each its exit code.

Exit codes: 0 when the command did what was asked (a watch stopped by Ctrl-C,
`--count` or `--duration` included); 1 when a call failed, with one line on
stderr naming the gRPC status (`authpool status: UNAVAILABLE: ...`); 2 for a
usage error (a bad flag, an unreadable token file); 130 when Ctrl-C stops
any other command; 141 when the reader of stdout went away (`| head`), as
for other Unix tools. Never a traceback: an operator reads the line, a
script reads the code.

grpc and rich are imported only when a command runs, so building the parser
costs `authpool serve` and `authpool config check` nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from authpool_server.ops.flags import common_flags

if TYPE_CHECKING:
    from authpool_server.ops.connection import Session
    from authpool_server.ops.output import Output

__all__ = ["add_commands"]

Command = Callable[[argparse.Namespace, "Session", "Output"], int]


def _status(args: argparse.Namespace, session: Session, out: Output) -> int:
    from authpool_server.ops.status import run_status

    return run_status(session, out, include_clients=args.clients)


def _watch(args: argparse.Namespace, session: Session, out: Output) -> int:
    from authpool_server.ops.watch import WatchOptions, event_types, run_watch

    def every(values: list[str] | None) -> tuple[str, ...]:
        # Repeated flags and comma-separated lists both work: --type a,b --type c.
        return tuple(part.strip() for value in values or () for part in value.split(",") if part.strip())

    options = WatchOptions(
        after_sequence=args.from_sequence,
        types=tuple(event_types(every(args.type))),
        subscription_ids=every(args.subscription),
        client_ids=every(args.client),
        count=args.count,
        duration=args.duration,
        progress_interval=args.progress_interval,
    )
    return run_watch(session, out, options)


def _rebalance(args: argparse.Namespace, session: Session, out: Output) -> int:
    from authpool_server.ops.actions import run_rebalance

    return run_rebalance(session, out, dry_run=args.dry_run)


def _drain(args: argparse.Namespace, session: Session, out: Output) -> int:
    from authpool_server.ops.actions import run_drain

    return run_drain(session, out, args.subscription_id)


def _undrain(args: argparse.Namespace, session: Session, out: Output) -> int:
    from authpool_server.ops.actions import run_undrain

    return run_undrain(session, out, args.subscription_id)


def _quiet_stdout() -> None:
    # The reader of our stdout went away (`authpool watch | head`): send the
    # rest nowhere, so that the interpreter's final flush does not complain.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass  # stdout is not a file descriptor (captured): nothing to flush at exit


def _runner(command: Command) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        import grpc

        from authpool_server.ops.connection import endpoint_from, open_session
        from authpool_server.ops.errors import OpsError, describe_rpc_error
        from authpool_server.ops.output import Output

        out = Output(json_mode=args.json)
        prog = f"authpool {args.command}"
        endpoint = None
        try:
            endpoint = endpoint_from(args, os.environ)
            with open_session(endpoint) as session:
                return command(args, session, out)
        except OpsError as error:
            out.note(f"{prog}: {error}")
            return error.exit_code
        except grpc.RpcError as error:
            assert endpoint is not None  # calls happen only once it is built
            out.note(f"{prog}: {describe_rpc_error(error, target=endpoint.target, has_token=bool(endpoint.token))}")
            return 1
        except KeyboardInterrupt:
            out.note(f"{prog}: interrupted")
            return 130
        except BrokenPipeError:
            _quiet_stdout()
            return 141  # as if killed by SIGPIPE, like other Unix tools in a pipeline

    return run


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text}")
    return value


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `status`, `watch`, `rebalance`, `drain` and `undrain` to the `authpool` parser."""
    common = common_flags()

    status = commands.add_parser(
        "status", parents=[common], help="the pool at a glance: status, health, usage, clients, forecast"
    )
    status.add_argument("--clients", action="store_true", help="also list every live lease")
    status.set_defaults(run=_runner(_status))

    watch = commands.add_parser(
        "watch",
        parents=[common],
        help="tail the event log (Ctrl-C stops; the last sequence is printed for --from-sequence)",
    )
    watch.add_argument(
        "--from-sequence",
        type=_non_negative_int,
        metavar="N",
        help="every event after N first (0: the whole retained log); default: only new events",
    )
    watch.add_argument(
        "--type", action="append", metavar="TYPE", help="only these event types, e.g. lease_moved (repeat or a,b)"
    )
    watch.add_argument("--subscription", action="append", metavar="ID", help="only events about these subscriptions")
    watch.add_argument("--client", action="append", metavar="ID", help="only events about these clients")
    watch.add_argument("--count", type=_positive_int, metavar="N", help="stop after N events")
    watch.add_argument("--duration", type=_positive_seconds, metavar="SECONDS", help="stop after this long")
    watch.add_argument(
        "--progress-interval",
        type=_positive_seconds,
        metavar="SECONDS",
        help="how often a quiet stream reports progress (1 to 3600; default: the server's)",
    )
    watch.set_defaults(run=_runner(_watch))

    rebalance = commands.add_parser("rebalance", parents=[common], help="run one rebalancing cycle now")
    rebalance.add_argument("--dry-run", action="store_true", help="only show the moves it would make")
    rebalance.set_defaults(run=_runner(_rebalance))

    drain = commands.add_parser(
        "drain", parents=[common], help="take a subscription out of rotation, e.g. to rotate its credential (admin)"
    )
    drain.add_argument("subscription_id", metavar="SUBSCRIPTION", help="the subscription's id from the config")
    drain.set_defaults(run=_runner(_drain))

    undrain = commands.add_parser(
        "undrain",
        aliases=["resume"],
        parents=[common],
        help="put a drained or disabled subscription back into rotation (admin)",
    )
    undrain.add_argument("subscription_id", metavar="SUBSCRIPTION", help="the subscription's id from the config")
    undrain.set_defaults(run=_runner(_undrain))
