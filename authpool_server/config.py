"""Loading and validating the pool's JSON configuration.

The file format is the production guide's ``config/auth-pool.json``, which must
keep loading exactly as written, plus a few optional keys of our own (listen
address, data directory, credentials root, retention, fallback credential).
The pydantic models below mirror the JSON with its camelCase names; `load_config`
turns a validated document into the plain `domain.PoolSpec` the rest of the
server uses, so pydantic stops at this module.

Every problem is reported, one line each, as ``<field path>: <message>`` with
the JSON names (``subscriptions[1].configDir: must not contain '..'``; see
`config_errors`), so an operator can fix a file in one pass instead of one
error per restart.

Money and ratios never go through float arithmetic: numbers are turned into
`Decimal` via their shortest string form and then into integer micro-units
(money) or parts per million (ratios).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path, PurePath
from typing import Annotated, Any, Literal, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BeforeValidator,
    EmailStr,
    Field,
    ModelWrapValidatorHandler,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from authpool_server.config_errors import message, problem, show
from authpool_server.config_model import ConfigModel, check_id
from authpool_server.config_server import AdminConfig, SecurityConfig, StoreConfig
from authpool_server.domain import (
    MICROS_PER_UNIT,
    PPM,
    BudgetReset,
    ExtraWindow,
    FallbackSpec,
    NotificationRuleSpec,
    PoolSpec,
    RebalancePolicy,
    SubscriptionSpec,
)
from authpool_server.security.settings import SecuritySettings, load_security
from authpool_server.webhooks.sender import RetryPolicy, load_ca_bundle
from authpool_server.webhooks.signing import WebhookSecret
from authpool_server.webhooks.urls import check_webhook_url

__all__ = [
    "EXAMPLE_CONFIG",
    "ConfigError",
    "FallbackConfig",
    "NotificationRule",
    "NotificationsConfig",
    "PoolConfig",
    "RebalancingConfig",
    "Settings",
    "SubscriptionConfig",
    "load_config",
]

EXAMPLE_CONFIG = Path(__file__).with_name("example-config.json")
"""The packaged example, loaded when neither a path nor AUTH_POOL_CONFIG is given."""

_MAX_DECIMAL_PLACES = 6  # one micro-unit / one part per million
_SECONDS_PER_DAY = 86_400
_LOG_LEVELS = {"debug": "debug", "info": "info", "warn": "warning", "warning": "warning", "error": "error"}
_LOG_FORMATS = ("json", "text")


class ConfigError(Exception):
    """The configuration cannot be used; `problems` holds one line per problem.

    Attributes:
        problems: Lines formatted ``<field path>: <message>``.
        source: The file being loaded, when there was one.
    """

    def __init__(self, problems: list[str], source: Path | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


# --- exact numbers ---------------------------------------------------------


def _to_decimal(value: object) -> Decimal:
    # bool is an int subclass, and a quoted "456" is more likely a mistake than intent.
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        raise ValueError(f"must be a number (got {show(value)})")
    # str() of a float is its shortest round-trip form, so 0.85 becomes exactly 0.85.
    exact = Decimal(str(value))
    if not exact.is_finite():
        raise ValueError("must be a finite number")
    exponent = exact.normalize().as_tuple().exponent
    if isinstance(exponent, int) and -exponent > _MAX_DECIMAL_PLACES:
        raise ValueError(f"must have at most {_MAX_DECIMAL_PLACES} decimal places")
    return exact


Exact = Annotated[Decimal, BeforeValidator(_to_decimal)]
Budget = Annotated[Exact, Field(gt=0)]
Ratio = Annotated[Exact, Field(gt=0, le=1)]
_BUDGET = TypeAdapter(Budget)


def _scaled(value: Decimal, scale: int) -> int:
    # At most six decimal places were allowed in, so this is exact.
    return int((value * scale).to_integral_exact())


# --- credential paths ------------------------------------------------------


@dataclass
class _Scope:
    """State shared by the validators of one document (see `PoolConfig`)."""

    root: Path | None  # resolved credentialsRoot; None when it is itself invalid
    fallback_id: str = "fallback"
    seen_ids: set[str] = field(default_factory=set)
    seen_dirs: dict[str, str] = field(default_factory=dict)


# Validators of nested models cannot see top-level keys, and pydantic's own
# `context` is only there when every caller remembers to pass one; a context
# variable set by the root model's wrap validator works however it is called.
_SCOPE: ContextVar[_Scope | None] = ContextVar("authpool_config_scope", default=None)


def _current_scope() -> _Scope:
    scope = _SCOPE.get()
    return scope if scope is not None else _Scope(_resolve_root(None))


def _resolve_root(value: object) -> Path:
    if value is None:
        return Path(os.path.realpath(Path.home()))
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    path = Path(value).expanduser()
    if not path.is_absolute():
        # A security boundary that moves with the working directory is no boundary.
        raise ValueError("must be an absolute path or start with '~'")
    return Path(os.path.realpath(path))


def _resolve_config_dir(value: str, root: Path) -> str:
    if not value:
        raise ValueError("must not be empty")
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    if ".." in PurePath(value).parts:
        raise ValueError("must not contain '..'")
    if value == "~" or value.startswith("~/"):
        # "~" means credentialsRoot, not $HOME: the root is the boundary we promise.
        candidate = root / value[2:]
    elif value.startswith("~"):
        raise ValueError("'~user' paths are not supported; use '~/...' (relative to credentialsRoot)")
    elif Path(value).is_absolute():
        candidate = Path(os.path.normpath(value))
        if not (candidate.is_relative_to(root) or Path(os.path.realpath(candidate)).is_relative_to(root)):
            raise ValueError(f"must be under credentialsRoot ({root})")
    else:
        candidate = root / value
    # realpath follows every existing symlink on the way, including the parents.
    resolved = Path(os.path.realpath(candidate))
    if not resolved.is_relative_to(root):
        raise ValueError(f"resolves through a symlink to {resolved}, outside credentialsRoot ({root})")
    return str(resolved)


_check_id = check_id


# --- models ----------------------------------------------------------------


_Model = ConfigModel


def _aware_iso_time(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError("must be an ISO 8601 time such as '2026-01-07T09:30:00+01:00'") from None
    if moment.tzinfo is None:
        raise ValueError("must carry its UTC offset, e.g. '+00:00', so it means one moment")
    return value


_WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


class BudgetResetConfig(_Model):
    """When weekly budgets reset: a weekday and wall-clock time in a zone, or an anchor time."""

    weekday: Literal["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"] = "monday"
    hour: int = Field(default=0, ge=0, le=23)
    minute: int = Field(default=0, ge=0, le=59)
    timezone: str = "UTC"
    # An ISO 8601 time with its offset, e.g. "2026-01-07T09:30:00+01:00": the
    # budget resets every 7 x 24 hours from then (the weekday and hour are ignored).
    anchor: str | None = None

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}; use an IANA name such as 'Europe/Berlin'") from None
        return value

    @field_validator("anchor")
    @classmethod
    def _aware_time(cls, value: str | None) -> str | None:
        return _aware_iso_time(value)

    def to_spec(self) -> BudgetReset:
        anchor = None if self.anchor is None else datetime.fromisoformat(self.anchor).timestamp()
        return BudgetReset(
            weekday=_WEEKDAYS.index(self.weekday),
            hour=self.hour,
            minute=self.minute,
            timezone=self.timezone,
            anchor=anchor,
        )


class ExtraWindowConfig(_Model):
    """A shorter limit beside the weekly budget, such as Claude's five-hour sessions."""

    name: str = Field(min_length=1, max_length=64)
    length_hours: Exact = Field(gt=0)
    budget: Budget
    # Periods follow one another from this ISO 8601 time (default: the Unix epoch).
    anchor: str | None = None

    @field_validator("anchor")
    @classmethod
    def _aware_time(cls, value: str | None) -> str | None:
        return _aware_iso_time(value)

    def to_spec(self) -> ExtraWindow:
        return ExtraWindow(
            name=self.name,
            length_seconds=float(self.length_hours * 3600),
            budget_micros=_scaled(self.budget, MICROS_PER_UNIT),
            anchor=0.0 if self.anchor is None else datetime.fromisoformat(self.anchor).timestamp(),
        )


class SubscriptionConfig(_Model):
    """One entry of ``subscriptions``; after validation `config_dir` is the resolved path."""

    id: str
    email: EmailStr
    type: str = Field(min_length=1)
    config_dir: str
    weekly_budget: Budget
    max_clients_per_sub: int | None = Field(default=None, ge=1)
    # Overrides the pool's budgetReset for a subscription that resets at its own moment.
    budget_reset: BudgetResetConfig | None = None
    # Shorter limits beside the weekly budget, e.g. [{"name": "session", "lengthHours": 5, "budget": 20}].
    windows: tuple[ExtraWindowConfig, ...] = Field(default=(), strict=False)

    @field_validator("id")
    @classmethod
    def _unique_id(cls, value: str) -> str:
        _check_id(value)
        scope = _current_scope()
        if value in scope.seen_ids:
            raise ValueError(f"duplicate id {value!r}; subscription ids must be unique")
        if value == scope.fallback_id:
            raise ValueError(f"{value!r} is the fallback credential's id; choose another")
        scope.seen_ids.add(value)
        return value

    @field_validator("config_dir")
    @classmethod
    def _contained(cls, value: str, info: ValidationInfo) -> str:
        scope = _current_scope()
        if scope.root is None:
            return value  # credentialsRoot is wrong and reported on its own
        resolved = _resolve_config_dir(value, scope.root)
        owner = info.data.get("id", "another subscription")
        first = scope.seen_dirs.setdefault(resolved, owner)
        if first != owner:
            # Two ids on one login would be billed as one account but balanced as two.
            raise ValueError(f"is the same directory as subscription {first!r}")
        return resolved


class RebalancingConfig(_Model):
    enabled: bool = True
    interval_seconds: float = Field(default=300.0, gt=0)
    cost_gap_threshold: Exact = Field(default=Decimal(5), ge=0)
    max_clients_to_move_per_cycle: int = Field(default=3, ge=0)
    idle_seconds: float = Field(default=300.0, ge=0)


NotificationType = Literal[
    "usage_threshold",
    "failover",
    "rotation",
    "all_exhausted",
    "subscription_disabled",
    "config_reloaded",
    "webhook_failure",
]


class NotificationRule(_Model):
    type: NotificationType
    # validate_default so a usage_threshold rule without a threshold is caught here.
    threshold: Ratio | None = Field(default=None, validate_default=True)
    channels: tuple[Literal["webhook", "log"], ...] = Field(strict=False)
    enabled: bool = True

    @field_validator("threshold")
    @classmethod
    def _threshold_matches_type(cls, value: Decimal | None, info: ValidationInfo) -> Decimal | None:
        kind = info.data.get("type")
        if kind == "usage_threshold" and value is None:
            raise ValueError("is required for usage_threshold rules")
        if kind is not None and kind != "usage_threshold" and value is not None:
            raise ValueError(f"only applies to usage_threshold rules, not {kind}")
        return value


class NotificationsConfig(_Model):
    rules: tuple[NotificationRule, ...] = Field(default=(), strict=False)
    # Development only: accept http:// for a receiver on this machine (loopback).
    allow_insecure_loopback: bool = False
    webhook_url: str | None = Field(default=None, validate_default=True)
    # A PEM bundle to trust for the receiver instead of the system's CAs (internal endpoints).
    ca_file: str | None = None
    timeout_seconds: float = Field(default=5.0, gt=0, le=60, strict=False)
    max_attempts: int = Field(default=8, ge=1, le=100)
    initial_backoff_seconds: float = Field(default=1.0, gt=0, strict=False)
    max_backoff_seconds: float = Field(default=300.0, gt=0, strict=False)

    @field_validator("webhook_url")
    @classmethod
    def _https_only(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            if any(r.enabled and "webhook" in r.channels for r in info.data.get("rules", ())):
                raise ValueError("is required when an enabled rule uses the webhook channel")
            return None
        # The URL itself is never echoed: webhook URLs often carry a token.
        if problem := check_webhook_url(value, info.data.get("allow_insecure_loopback", False)):
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _backoff_bounds(self) -> Self:
        if self.initial_backoff_seconds > self.max_backoff_seconds:
            raise ValueError("initialBackoffSeconds must not exceed maxBackoffSeconds")
        return self

    @property
    def uses_webhook(self) -> bool:
        return self.webhook_url is not None and any(r.enabled and "webhook" in r.channels for r in self.rules)


class EventsConfig(_Model):
    # An idle WatchEvents stream gets a progress message this often.
    progress_interval_seconds: float = Field(default=10.0, ge=1, le=3600)
    # Events a watcher may fall behind by before its stream is ended with where to resume.
    watcher_buffer: int = Field(default=10_000, ge=100, le=1_000_000)


class FallbackConfig(_Model):
    id: str = "fallback"
    type: str = "pay-as-you-go"
    credential_ref: str = ""

    _valid_id = field_validator("id")(_check_id)


class PoolConfig(_Model):
    """The whole configuration document, as validated."""

    subscriptions: tuple[SubscriptionConfig, ...] = Field(strict=False)
    max_clients_per_subscription: int = Field(default=15, ge=1)
    weekly_budget_threshold: Ratio = Decimal("0.85")
    fallback_when_exhausted: bool = True
    fallback: FallbackConfig = FallbackConfig()
    rebalancing: RebalancingConfig = RebalancingConfig()
    notifications: NotificationsConfig = NotificationsConfig()
    listen: str = "127.0.0.1:50051"
    data_dir: str = Field(default="./var", min_length=1)
    credentials_root: str = Field(default_factory=lambda: str(Path.home()), validate_default=True)
    lease_ttl_seconds: float = Field(default=60.0, gt=0)
    budget_reset: BudgetResetConfig = BudgetResetConfig()
    cooldown_seconds: float = Field(default=300.0, ge=0)
    auth_failure_limit: int = Field(default=3, ge=1)
    error_window_seconds: float = Field(default=900.0, gt=0)
    forecast_horizon_hours: float = Field(default=6.0, gt=0)
    usage_retention_days: float = Field(default=7.0, gt=0)
    event_retention_days: float = Field(default=7.0, gt=0)
    events: EventsConfig = EventsConfig()
    store: StoreConfig = StoreConfig()
    security: SecurityConfig = SecurityConfig()
    admin: AdminConfig = AdminConfig()

    @model_validator(mode="wrap")
    @classmethod
    def _scoped(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        raw_root, fallback_id = None, "fallback"
        if isinstance(data, Mapping):
            raw_root = data.get("credentialsRoot", data.get("credentials_root"))
            fallback = data.get("fallback")
            if isinstance(fallback, Mapping) and isinstance(fallback.get("id"), str):
                fallback_id = fallback["id"]
        try:
            root: Path | None = _resolve_root(raw_root)
        except ValueError:
            root = None  # the credentialsRoot field validator reports why
        token = _SCOPE.set(_Scope(root, fallback_id))
        try:
            return handler(data)
        finally:
            _SCOPE.reset(token)

    @field_validator("subscriptions")
    @classmethod
    def _not_empty(cls, value: tuple[SubscriptionConfig, ...]) -> tuple[SubscriptionConfig, ...]:
        # Not Field(min_length=1): pydantic counts only the entries that passed,
        # so three bad entries would also be reported as an empty list.
        if not value:
            raise ValueError("must list at least one subscription")
        return value

    @field_validator("credentials_root")
    @classmethod
    def _absolute_root(cls, value: str) -> str:
        return str(_resolve_root(value))

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value.startswith("unix:"):
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65_535:
            raise ValueError("must be host:port (port 0-65535) or unix:<path>")
        return value


# --- settings --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoreSettings:
    kind: str  # "sqlite" or "postgres"
    dsn: str = field(default="", repr=False)  # may hold a password
    schema: str = "authpool"
    pool_size: int = 4
    connect_timeout_seconds: float = 5.0


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    """The webhook channel: receiver, signing secret (None when not in the environment), retries."""

    url: str = field(repr=False)  # may carry a token
    secret: WebhookSecret | None
    policy: RetryPolicy
    ca_file: str | None
    allow_insecure_loopback: bool


@dataclass(frozen=True, slots=True)
class Settings:
    """What the server needs to start, derived from one config file and the environment.

    Attributes:
        pool: The pool's configuration in domain terms.
        listen: The gRPC listen address.
        data_dir: Where the embedded store keeps its files (absolute).
        log_level: One of debug, info, warning, error.
        log_format: json or text.
        source: The file that was loaded.
        raw: The validated document, for parts not yet in domain terms (notifications).
        security: Authentication, TLS and limits, with tokens already hashed.
        admin: The admin HTTP port.
        webhooks: Where webhook notifications go, when a rule sends any.
        store: Which store holds the state (and the PostgreSQL DSN, never shown).
        source_digest: SHA-256 of the file's bytes as loaded.
    """

    pool: PoolSpec
    listen: str
    data_dir: Path
    log_level: str
    log_format: str
    source: Path | None
    raw: PoolConfig
    security: SecuritySettings
    admin: AdminConfig
    webhooks: WebhookSettings | None = None
    store: StoreSettings = field(default_factory=lambda: StoreSettings("sqlite"))
    source_digest: str = ""  # SHA-256 of the bytes loaded: hot reload compares the file with it


@dataclass(frozen=True, slots=True)
class _EnvOverrides:
    config_path: Path | None = None
    weekly_budget: Decimal | None = None
    data_dir: str | None = None
    log_level: str = "info"
    log_format: str = "text"


def _read_env(env: Mapping[str, str]) -> tuple[_EnvOverrides, list[str]]:
    """Read every environment variable the configuration honours, in one place."""
    problems: list[str] = []
    config_path = env.get("AUTH_POOL_CONFIG") or None
    data_dir = env.get("AUTHPOOL_DATA_DIR") or None

    weekly_budget = None
    if text := env.get("WEEKLY_BUDGET", "").strip():
        try:
            weekly_budget = _BUDGET.validate_python(Decimal(text))
        except InvalidOperation:
            problems.append(f"WEEKLY_BUDGET: must be a number (got {text!r})")
        except ValidationError as exc:
            problems.extend(f"WEEKLY_BUDGET: {message(e)}" for e in exc.errors())

    level = env.get("LOG_LEVEL", "").strip().lower() or "info"
    if level not in _LOG_LEVELS:
        problems.append(f"LOG_LEVEL: must be one of debug, info, warn, error (got {level!r})")
        level = "info"
    log_format = env.get("LOG_FORMAT", "").strip().lower() or "text"
    if log_format not in _LOG_FORMATS:
        problems.append(f"LOG_FORMAT: must be json or text (got {log_format!r})")
        log_format = "text"

    overrides = _EnvOverrides(
        config_path=Path(config_path) if config_path else None,
        weekly_budget=weekly_budget,
        data_dir=data_dir,
        log_level=_LOG_LEVELS[level],
        log_format=log_format,
    )
    return overrides, problems


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Load, validate and convert the configuration.

    Args:
        path: The JSON file. When None, the AUTH_POOL_CONFIG environment
            variable names it, and failing that the packaged example is used.
        env: The environment to read overrides from (AUTH_POOL_CONFIG,
            WEEKLY_BUDGET, AUTHPOOL_DATA_DIR, LOG_LEVEL, LOG_FORMAT) and the
            token variables the security block names; defaults to `os.environ`.

    Returns:
        The settings, with the pool in domain terms.

    Raises:
        ConfigError: The file is missing or unreadable, is not valid JSON, or
            breaks any rule; every problem found is listed.
    """
    env = os.environ if env is None else env
    overrides, problems = _read_env(env)
    chosen = Path(path) if path is not None else overrides.config_path or EXAMPLE_CONFIG
    source = Path(os.path.abspath(chosen.expanduser()))

    data, file_problem, digest = _read_document(source)
    if file_problem:
        raise ConfigError([*problems, file_problem], source) from None

    if overrides.weekly_budget is not None and isinstance(data.get("subscriptions"), list):
        data["subscriptions"] = [_with_budget(s, overrides.weekly_budget) for s in data["subscriptions"]]

    try:
        raw = PoolConfig.model_validate(data)
    except ValidationError as exc:
        problems.extend(problem(e) for e in exc.errors())
        raise ConfigError(problems, source) from None
    security, security_problems = load_security(raw.security, env, source.parent)
    problems.extend(security_problems)
    webhooks = _webhook_settings(raw.notifications, env, source.parent, problems)
    store = _store_settings(raw.store, env, source.parent, problems)
    if problems:
        raise ConfigError(problems, source) from None

    data_dir = Path(overrides.data_dir or raw.data_dir).expanduser()
    return Settings(
        pool=_pool_spec(raw),
        listen=raw.listen,
        data_dir=Path(os.path.abspath(data_dir)),
        log_level=overrides.log_level,
        log_format=overrides.log_format,
        source=source,
        raw=raw,
        security=security,
        admin=raw.admin,
        webhooks=webhooks,
        store=store,
        source_digest=digest,
    )


def _secret_from_env(env: Mapping[str, str], name: str, base_dir: Path, problems: list[str]) -> str:
    """`name`'s value, or the contents of the file `name`_FILE names; "" when neither is set."""
    if text := env.get(name, "").strip():
        return text
    if path := env.get(f"{name}_FILE", "").strip():
        try:
            return (base_dir / Path(path).expanduser()).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            problems.append(f"{name}_FILE: cannot read {path} ({reason})")
    return ""


def _store_settings(config: StoreConfig, env: Mapping[str, str], base_dir: Path, problems: list[str]) -> StoreSettings:
    dsn = ""
    if config.kind == "postgres":
        dsn = _secret_from_env(env, "AUTHPOOL_DATABASE_URL", base_dir, problems)
        if not dsn:
            problems.append(
                "store.kind: postgres needs AUTHPOOL_DATABASE_URL (or AUTHPOOL_DATABASE_URL_FILE) "
                "set to a libpq connection string, e.g. postgresql://authpool@db:5432/authpool"
            )
    return StoreSettings(
        kind=config.kind,
        dsn=dsn,
        schema=config.schema_name,
        pool_size=config.pool_size,
        connect_timeout_seconds=config.connect_timeout_seconds,
    )


def _webhook_settings(
    config: NotificationsConfig, env: Mapping[str, str], base_dir: Path, problems: list[str]
) -> WebhookSettings | None:
    """The webhook channel's settings; its secret comes from the environment, never the file.

    A missing secret is not a problem here (`config check` of the guide's
    template passes without one); `serve` refuses to start without it.
    """
    if not config.uses_webhook or config.webhook_url is None:
        return None
    secret = None
    if text := _secret_from_env(env, "AUTHPOOL_WEBHOOK_SECRET", base_dir, problems):
        try:
            secret = WebhookSecret.parse(text)
        except ValueError as exc:
            problems.append(f"AUTHPOOL_WEBHOOK_SECRET: {exc}")
    ca_file = str(base_dir / Path(config.ca_file).expanduser()) if config.ca_file else None
    if ca_file is not None:
        try:
            load_ca_bundle(ca_file)
        except ValueError as exc:
            problems.append(f"notifications.caFile: {exc}")
    return WebhookSettings(
        url=config.webhook_url,
        secret=secret,
        policy=RetryPolicy(
            max_attempts=config.max_attempts,
            initial_seconds=config.initial_backoff_seconds,
            maximum_seconds=config.max_backoff_seconds,
            timeout_seconds=config.timeout_seconds,
        ),
        ca_file=ca_file,
        allow_insecure_loopback=config.allow_insecure_loopback,
    )


def _read_document(source: Path) -> tuple[dict[str, Any], str | None, str]:
    """The file's JSON object, the problem with it (None if none), and the SHA-256 of the bytes read."""
    try:
        raw = source.read_bytes()
    except FileNotFoundError:
        return {}, f"{source}: file not found", ""
    except OSError as exc:
        return {}, f"{source}: cannot read ({exc.strerror})", ""
    digest = hashlib.sha256(raw).hexdigest()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return {}, f"{source}: not UTF-8 text", digest
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        return {}, f"{source}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}", digest
    except ValueError as exc:
        return {}, f"{source}: invalid JSON: {exc}", digest
    if not isinstance(data, dict):
        return {}, f"{source}: the top level must be a JSON object", digest
    return data, None, digest


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads would silently keep the last of two equal keys.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _with_budget(sub: Any, budget: Decimal) -> Any:
    if not isinstance(sub, dict):
        return sub  # reported by validation as it stands
    updated = {k: v for k, v in sub.items() if k != "weekly_budget"}
    updated["weeklyBudget"] = budget
    return updated


def _pool_spec(raw: PoolConfig) -> PoolSpec:
    subscriptions = tuple(
        SubscriptionSpec(
            id=s.id,
            email=s.email,
            type=s.type,
            credential_ref=s.config_dir,
            weekly_budget_micros=_scaled(s.weekly_budget, MICROS_PER_UNIT),
            max_clients=(
                s.max_clients_per_sub if s.max_clients_per_sub is not None else raw.max_clients_per_subscription
            ),
            reset=(s.budget_reset or raw.budget_reset).to_spec(),
            extra_windows=tuple(window.to_spec() for window in s.windows),
        )
        for s in raw.subscriptions
    )
    r = raw.rebalancing
    return PoolSpec(
        subscriptions=subscriptions,
        threshold_ppm=_scaled(raw.weekly_budget_threshold, PPM),
        fallback_when_exhausted=raw.fallback_when_exhausted,
        fallback=FallbackSpec(id=raw.fallback.id, type=raw.fallback.type, credential_ref=raw.fallback.credential_ref),
        rebalancing=RebalancePolicy(
            enabled=r.enabled,
            interval_seconds=r.interval_seconds,
            cost_gap_micros=_scaled(r.cost_gap_threshold, MICROS_PER_UNIT),
            max_moves_per_cycle=r.max_clients_to_move_per_cycle,
            idle_seconds=r.idle_seconds,
        ),
        lease_ttl_seconds=raw.lease_ttl_seconds,
        cooldown_seconds=raw.cooldown_seconds,
        auth_failure_limit=raw.auth_failure_limit,
        error_window_seconds=raw.error_window_seconds,
        forecast_horizon_seconds=raw.forecast_horizon_hours * 3600,
        usage_retention_seconds=raw.usage_retention_days * _SECONDS_PER_DAY,
        event_retention_seconds=raw.event_retention_days * _SECONDS_PER_DAY,
        watcher_buffer=raw.events.watcher_buffer,
        watch_progress_seconds=raw.events.progress_interval_seconds,
        notification_rules=tuple(
            NotificationRuleSpec(
                type=rule.type,
                channels=rule.channels,
                threshold_ppm=_scaled(rule.threshold, PPM) if rule.threshold is not None else 0,
                enabled=rule.enabled,
            )
            for rule in raw.notifications.rules
        ),
        webhooks_enabled=raw.notifications.uses_webhook,
    )
