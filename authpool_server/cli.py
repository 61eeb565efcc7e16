"""The `authpool` command: `serve`, `config check`, `db migrate`, `simulate`, and the operator commands.

The operator commands (`status`, `watch`, `rebalance`, `drain`, `undrain`)
are clients of a running server; they live in `authpool_server.ops`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from authpool_server.config import ConfigError, Settings, load_config
from authpool_server.errors import StartupRefused, StoreUnavailable
from authpool_server.logs import configure_logging
from authpool_server.security.settings import is_loopback
from authpool_server.store import DATABASE_FILE, make_store

__all__ = ["main"]


def _load(path: str | None) -> Settings:
    try:
        return load_config(path)
    except ConfigError as error:
        source = path or "the configuration"
        print(f"authpool: {source} is invalid:", file=sys.stderr)
        for problem in error.problems:
            print(f"  {problem}", file=sys.stderr)
        raise SystemExit(2) from None


def _serve(args: argparse.Namespace) -> int:
    from authpool_server.server import serve  # grpc is only needed to serve
    from authpool_server.telemetry.sentry import init_sentry

    settings = _load(args.config)
    configure_logging(settings.log_level, settings.log_format)
    init_sentry(os.environ)
    listen = args.listen or settings.listen
    data_dir = Path(args.data_dir) if args.data_dir else settings.data_dir
    security = settings.security
    admin_listen = args.admin_listen or settings.admin.listen
    if args.insecure_no_auth:
        for what, address in (("listen", listen), ("the admin port", admin_listen if settings.admin.enabled else "")):
            if address and not is_loopback(address):
                print(
                    f"authpool: --insecure-no-auth is for local development: {what} must be on 127.0.0.1, "
                    f"not {address}",
                    file=sys.stderr,
                )
                return 2
        security = security.without_auth()
    try:
        asyncio.run(
            serve(
                settings.pool,
                data_dir=data_dir,
                listen=listen,
                security=security,
                admin_listen=admin_listen if settings.admin.enabled else None,
                webhooks=settings.webhooks,
                store=make_store(
                    settings.store.kind,
                    data_dir=data_dir,
                    dsn=settings.store.dsn,
                    schema=settings.store.schema,
                    pool_size=settings.store.pool_size,
                    connect_timeout_seconds=settings.store.connect_timeout_seconds,
                ),
                config=settings,
                config_poll_seconds=args.config_poll_seconds,
            )
        )
    except StartupRefused as refusal:
        print(f"authpool: {refusal}", file=sys.stderr)
        return 2
    except StoreUnavailable as error:
        print(f"authpool: cannot start: {error}", file=sys.stderr)
        return 1
    return 0


def _config_check(args: argparse.Namespace) -> int:
    if args.json:
        return _config_check_json(args.file)
    settings = _load(args.file)
    pool = settings.pool
    print(
        f"{settings.source}: valid; {len(pool.subscriptions)} subscriptions, "
        f"weekly budget {sum(s.weekly_budget_micros for s in pool.subscriptions) / 1e6:g} in all"
    )
    for note in _config_notes(settings):
        print(f"note: {note}")
    return 0


def _config_notes(settings: Settings) -> list[str]:
    notes = []
    if settings.webhooks is not None and settings.webhooks.secret is None:
        notes.append(
            "notification rules send to the webhook but AUTHPOOL_WEBHOOK_SECRET is not set in this "
            "environment; `authpool serve` will refuse to start until it is"
        )
    if not settings.security.has_credentials:
        notes.append(
            "no principal has a token in this environment; `authpool serve` will refuse to start "
            "until one does (AUTHPOOL_ADMIN_TOKEN, ...) or it is given --insecure-no-auth"
        )
    return notes


def _config_check_json(path: str) -> int:
    """The same verdict for scripts: `valid`, and `problems` or the pool's size and `notes`; exit 2 if invalid."""
    try:
        settings = load_config(path)
    except ConfigError as error:
        print(json.dumps({"source": path, "valid": False, "problems": error.problems}, indent=2))
        return 2
    subscriptions = settings.pool.subscriptions
    document = {
        "source": str(settings.source),
        "valid": True,
        "subscriptions": len(subscriptions),
        "weekly_budget_micros": sum(s.weekly_budget_micros for s in subscriptions),
        "notes": _config_notes(settings),
    }
    print(json.dumps(document, indent=2))
    return 0


def _embedded_database(args: argparse.Namespace, what: str) -> Path | None:
    """The SQLite file `authpool serve` would use with these arguments; None (after saying why) on PostgreSQL."""
    settings = _load(args.config)
    if settings.store.kind == "postgres":
        print(
            f"authpool: the config's store is PostgreSQL: {what} it with PostgreSQL's own tools "
            "(pg_dump / pg_restore of the schema, or your provider's backups and point-in-time recovery)",
            file=sys.stderr,
        )
        return None
    return (Path(args.data_dir) if args.data_dir else settings.data_dir) / DATABASE_FILE


def _backup(args: argparse.Namespace) -> int:
    from authpool_server.store.sqlite_backup import BackupError, backup

    database = _embedded_database(args, "back")
    if database is None:
        return 2
    try:
        summary = backup(database, Path(args.file))
    except (BackupError, OSError) as error:
        print(f"authpool backup: {error}", file=sys.stderr)
        return 1
    print(f"backed up {database} to {args.file}: {summary.describe()}")
    return 0


def _restore(args: argparse.Namespace) -> int:
    from authpool_server.store.sqlite_backup import BackupError, restore

    database = _embedded_database(args, "restore")
    if database is None:
        return 2
    try:
        summary, kept = restore(Path(args.file), database)
    except (BackupError, StartupRefused, OSError) as error:
        print(f"authpool restore: {error}", file=sys.stderr)
        return 1
    print(f"restored {args.file} into {database}: {summary.describe()}")
    if kept is not None:
        print(f"the database it replaced is kept as {kept}")
    return 0


def _db_migrate(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    if settings.store.kind != "postgres":
        print("authpool: the config's store is the embedded SQLite file; it migrates itself at start", file=sys.stderr)
        return 2
    from authpool_server.store.postgres import migrate

    try:
        applied = asyncio.run(migrate(settings.store.dsn, settings.store.schema))
    except (StoreUnavailable, StartupRefused) as error:
        print(f"authpool: {error}", file=sys.stderr)
        return 1
    print(f"schema {settings.store.schema}: " + (f"applied {', '.join(applied)}" if applied else "up to date"))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="authpool", description="AuthPool credential-pool service")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the gRPC API")
    serve.add_argument("--config", help="config file (default: $AUTH_POOL_CONFIG, else the bundled example)")
    serve.add_argument("--listen", help="host:port to listen on (default: the config's `listen`)")
    serve.add_argument("--data-dir", help="where the embedded store lives (default: $AUTHPOOL_DATA_DIR or ./var)")
    serve.add_argument("--admin-listen", help="host:port of the admin HTTP port (default: the config's admin.listen)")
    serve.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="LOCAL DEVELOPMENT ONLY: accept every caller as admin, without a token (loopback addresses only)",
    )
    serve.add_argument(
        "--config-poll-seconds",
        type=float,
        default=2.0,
        help="check the config file for changes this often and apply them (0: only on SIGHUP; default 2)",
    )
    serve.set_defaults(run=_serve)

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate a config file without serving")
    check.add_argument("file", help="the config file to check")
    check.add_argument("--json", action="store_true", help="print the verdict as JSON, for scripts")
    check.set_defaults(run=_config_check)

    db = commands.add_parser("db", help="database tools (the PostgreSQL store)")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    migrate = db_commands.add_parser("migrate", help="apply the schema migrations (also done at start)")
    migrate.add_argument("--config", help="config file (default: $AUTH_POOL_CONFIG); the DSN is $AUTHPOOL_DATABASE_URL")
    migrate.set_defaults(run=_db_migrate)

    backup = commands.add_parser("backup", help="copy the embedded store to FILE while the server serves")
    backup.add_argument("file", help="where to write the backup (replaced atomically)")
    restore = commands.add_parser("restore", help="replace a stopped server's embedded store with a backup")
    restore.add_argument("file", help="the backup to restore")
    for command, run in ((backup, _backup), (restore, _restore)):
        command.add_argument("--config", help="config file (default: $AUTH_POOL_CONFIG): where dataDir is")
        command.add_argument("--data-dir", help="the server's data directory (default: the config's dataDir)")
        command.set_defaults(run=run)

    from authpool_server.simulator.cli import build_parser as build_simulator_parser

    simulate = commands.add_parser(
        "simulate", help="replay traffic traces through the real balancer (docs/simulator.md)"
    )
    build_simulator_parser(simulate)  # its subcommands set `run`

    from authpool_server.ops import add_commands as add_operator_commands

    add_operator_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
