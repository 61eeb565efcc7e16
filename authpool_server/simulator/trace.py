"""The trace format: one JSON object per line, a header first, then events in time order.

A trace is what a week of clients did, independent of any policy: who
arrived when, what each request cost and how it went, who left. Which
subscription served a request is the policy's choice, so it is never in the
trace; a subscription's own trouble (a provider rate-limiting it) is declared
in the header as an *incident* and applied by the simulator to the requests
that land on it. The format is described in full in ``docs/simulator.md``.

Files ending in ``.gz`` are gzip-compressed; they are written with a zero
timestamp so that the same trace always gives the same bytes.

Every problem found while reading is raised as a `TraceError` that names the
file, the line and the field (``tests/data/traces/near.jsonl.gz:1:
pool.subscriptions[2].weeklyBudget: must be a number greater than 0``), like
the config loader does.
"""

from __future__ import annotations

import datetime as dt
import gzip
import io
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import IO, Any, NamedTuple

from pydantic import BaseModel, ValidationError

from authpool_server.config import BudgetResetConfig, ExtraWindowConfig
from authpool_server.domain import (
    MICROS_PER_UNIT,
    PPM,
    BudgetReset,
    ExtraWindow,
    Outcome,
    PoolSpec,
    RebalancePolicy,
    SubscriptionSpec,
)

__all__ = [
    "ARRIVE",
    "DEPART",
    "FORMAT",
    "REQUEST",
    "VERSION",
    "Incident",
    "Trace",
    "TraceError",
    "TraceEvent",
    "pool_to_json",
    "read_trace",
    "write_trace",
]

FORMAT = "authpool-trace"
VERSION = 1

# Event kinds, as small ints: the replay loop compares them millions of times.
ARRIVE, REQUEST, DEPART = 0, 1, 2
_KIND_OF = {"arrive": ARRIVE, "request": REQUEST, "depart": DEPART}
_NAME_OF = {kind: name for name, kind in _KIND_OF.items()}
_OUTCOMES = {outcome.value: outcome for outcome in Outcome}

_EVENT_FIELDS = {
    ARRIVE: {"t", "type", "client", "subscription_type"},
    REQUEST: {"t", "type", "client", "cost_micros", "outcome", "model"},
    DEPART: {"t", "type", "client"},
}
_HEADER_FIELDS = {"type", "format", "version", "start", "pool", "incidents", "generator", "description"}
_POOL_FIELDS = {
    "subscriptions",
    "budgetReset",
    "maxClientsPerSubscription",
    "weeklyBudgetThreshold",
    "fallbackWhenExhausted",
    "rebalancing",
    "leaseTtlSeconds",
    # The policy's newer knobs; passed on only when the trace sets them.
    "cooldownSeconds",
    "authFailureLimit",
    "errorWindowSeconds",
    "forecastHorizonHours",
}
_SUBSCRIPTION_FIELDS = {
    "id",
    "type",
    "weeklyBudget",
    "maxClientsPerSub",
    "email",
    "configDir",
    "budgetReset",
    "windows",
}
_REBALANCING_FIELDS = {"enabled", "intervalSeconds", "costGapThreshold", "maxClientsToMovePerCycle", "idleSeconds"}
_INCIDENT_FIELDS = {"subscription", "outcome", "from", "until", "share"}
# Optional PoolSpec fields by their JSON name, with how to turn the JSON value into the field.
_OPTIONAL_POOL_KNOBS = {
    "cooldownSeconds": ("cooldown_seconds", 1.0),
    "authFailureLimit": ("auth_failure_limit", None),
    "errorWindowSeconds": ("error_window_seconds", 1.0),
    "forecastHorizonHours": ("forecast_horizon_seconds", 3600.0),
}


class TraceError(ValueError):
    """A trace file cannot be used; the message names the file, line and field."""


class TraceEvent(NamedTuple):
    """One event. `detail` is the model of a request and the wanted subscription type of an arrival."""

    t: float  # seconds since the trace's start
    kind: int  # ARRIVE, REQUEST or DEPART
    client: int  # index into Trace.clients
    cost_micros: int
    outcome: Outcome
    detail: str


@dataclass(frozen=True, slots=True)
class Incident:
    """From `start` until `end` (trace seconds), `share` of the OK requests served on the
    subscription come back with `outcome` instead (a provider rate-limiting it, say)."""

    subscription_id: str
    outcome: Outcome
    start: float
    end: float
    share: float


@dataclass(frozen=True, slots=True)
class Trace:
    name: str
    pool: PoolSpec
    start: float  # POSIX seconds of t = 0
    incidents: tuple[Incident, ...]
    clients: tuple[str, ...]
    events: tuple[TraceEvent, ...]
    generator: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def requests(self) -> int:
        return sum(1 for event in self.events if event.kind == REQUEST)

    @property
    def demand_micros(self) -> int:
        return sum(event.cost_micros for event in self.events if event.kind == REQUEST)

    @property
    def duration(self) -> float:
        return self.events[-1].t if self.events else 0.0


# -- reading --------------------------------------------------------------------------


def read_trace(path: str | Path) -> Trace:
    """Read and check a trace file (``.jsonl`` or ``.jsonl.gz``)."""
    path = Path(path)
    try:
        with _open(path, "rt") as stream:
            return _parse(stream, path)
    except (EOFError, gzip.BadGzipFile) as error:
        raise TraceError(f"{path}: is not a valid gzip file: {error}") from None
    except OSError as error:
        raise TraceError(f"{path}: cannot be read: {error.strerror or error}") from None


def _open(path: Path, mode: str) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, mode, encoding="utf-8")
    return path.open(mode, encoding="utf-8")


def _parse(lines: Iterable[str], path: Path) -> Trace:
    where = str(path)
    numbered = enumerate(lines, start=1)
    header = None
    for number, line in numbered:
        if line.strip():
            header = _parse_header(_json(line, where, number), f"{where}:{number}")
            break
    if header is None:
        raise TraceError(f"{where}: is empty; the first line must be the header")
    pool, start, incidents, generator, description = header

    types = {spec.type for spec in pool.subscriptions}
    client_index: dict[str, int] = {}
    present: set[int] = set()
    events: list[TraceEvent] = []
    last_t = 0.0
    for number, line in numbered:
        if not line.strip():
            continue
        at = f"{where}:{number}"
        raw = _json(line, where, number)
        kind_name = raw.get("type")
        kind = _KIND_OF.get(kind_name) if isinstance(kind_name, str) else None
        if kind is None:
            raise TraceError(f"{at}: type: must be one of arrive, request, depart (got {_show(kind_name)})")
        _no_unknown(raw, _EVENT_FIELDS[kind], at, "")
        t = raw.get("t")
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            raise TraceError(f"{at}: t: must be a number of seconds >= 0 (got {_show(t)})")
        if t < last_t:
            raise TraceError(f"{at}: t: {t} is before the previous event's {last_t}; events must be in time order")
        last_t = float(t)
        name = raw.get("client")
        if not isinstance(name, str) or not name:
            raise TraceError(f"{at}: client: must be a non-empty string (got {_show(name)})")
        client = client_index.setdefault(name, len(client_index))
        cost, outcome, detail = 0, Outcome.OK, ""
        if kind == ARRIVE:
            if client in present:
                raise TraceError(f"{at}: client {name!r} arrives again without having departed")
            present.add(client)
            detail = raw.get("subscription_type", "")
            if not isinstance(detail, str) or (detail and detail not in types):
                raise TraceError(
                    f"{at}: subscription_type: must be one of the pool's types {sorted(types)} (got {_show(detail)})"
                )
        else:
            if client not in present:
                what = "makes a request" if kind == REQUEST else "departs"
                raise TraceError(f"{at}: client {name!r} {what} without having arrived")
            if kind == DEPART:
                present.discard(client)
            else:
                cost = raw.get("cost_micros")
                if isinstance(cost, bool) or not isinstance(cost, int) or cost < 0:
                    raise TraceError(f"{at}: cost_micros: must be an integer >= 0 (got {_show(cost)})")
                outcome_name = raw.get("outcome")
                found = _OUTCOMES.get(outcome_name) if isinstance(outcome_name, str) else None
                if found is None:
                    raise TraceError(
                        f"{at}: outcome: must be one of {', '.join(_OUTCOMES)} (got {_show(outcome_name)})"
                    )
                outcome = found
                detail = raw.get("model")
                if not isinstance(detail, str):
                    raise TraceError(f"{at}: model: must be a string (got {_show(detail)})")
        events.append(TraceEvent(last_t, kind, client, cost, outcome, detail))
    return Trace(
        name=_stem(path),
        pool=pool,
        start=start,
        incidents=incidents,
        clients=tuple(client_index),
        events=tuple(events),
        generator=generator,
        description=description,
    )


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name


def _json(line: str, where: str, number: int) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        raise TraceError(f"{where}:{number}: is not valid JSON: {error.msg} (column {error.colno})") from None
    if not isinstance(value, dict):
        raise TraceError(f"{where}:{number}: must be a JSON object (got {_show(value)})")
    return value


def _show(value: object) -> str:
    text = json.dumps(value) if not isinstance(value, Decimal) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _no_unknown(raw: Mapping[str, Any], known: set[str], at: str, prefix: str) -> None:
    unknown = sorted(set(raw) - known)
    if unknown:
        raise TraceError(f"{at}: {prefix}{unknown[0]}: unknown field; expected one of {', '.join(sorted(known))}")


def _parse_header(raw: dict[str, Any], at: str) -> tuple[PoolSpec, float, tuple[Incident, ...], Mapping[str, Any], str]:
    if raw.get("type") != "header":
        raise TraceError(f'{at}: type: the first line must be the header, with "type": "header"')
    _no_unknown(raw, _HEADER_FIELDS, at, "")
    if raw.get("format") != FORMAT:
        raise TraceError(f"{at}: format: must be {FORMAT!r} (got {_show(raw.get('format'))})")
    if raw.get("version") != VERSION:
        raise TraceError(f"{at}: version: this simulator reads version {VERSION} (got {_show(raw.get('version'))})")
    start = _parse_start(raw.get("start"), at)
    pool_raw = raw.get("pool")
    if not isinstance(pool_raw, dict):
        raise TraceError(f"{at}: pool: must be an object")
    pool = _parse_pool(pool_raw, at)
    incidents_raw = raw.get("incidents", [])
    if not isinstance(incidents_raw, list):
        raise TraceError(f"{at}: incidents: must be a list")
    ids = {spec.id for spec in pool.subscriptions}
    incidents = tuple(_parse_incident(item, f"incidents[{i}].", ids, at) for i, item in enumerate(incidents_raw))
    generator = raw.get("generator", {})
    if not isinstance(generator, dict):
        raise TraceError(f"{at}: generator: must be an object")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise TraceError(f"{at}: description: must be a string")
    return pool, start, incidents, generator, description


def _parse_start(value: object, at: str) -> float:
    if isinstance(value, str):
        try:
            moment = dt.datetime.fromisoformat(value)
        except ValueError:
            moment = None
        if moment is not None and moment.tzinfo is not None:
            return moment.timestamp()
    raise TraceError(f'{at}: start: must be an ISO 8601 time with a zone, like "2025-11-17T00:00:00Z"')


def _number(raw: Mapping[str, Any], key: str, at: str, path: str, *, default: object = None) -> Decimal:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TraceError(f"{at}: {path}{key}: must be a number (got {_show(value)})")
    try:
        exact = Decimal(str(value))  # shortest round-trip form: 0.85 stays exactly 0.85
    except InvalidOperation:
        raise TraceError(f"{at}: {path}{key}: must be a number (got {_show(value)})") from None
    if not exact.is_finite():
        raise TraceError(f"{at}: {path}{key}: must be a finite number")
    return exact


def _positive(raw: Mapping[str, Any], key: str, at: str, path: str, *, default: object = None) -> Decimal:
    value = _number(raw, key, at, path, default=default)
    if value <= 0:
        raise TraceError(f"{at}: {path}{key}: must be a number greater than 0 (got {value})")
    return value


def _count(raw: Mapping[str, Any], key: str, at: str, path: str, *, default: int, minimum: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise TraceError(f"{at}: {path}{key}: must be an integer >= {minimum} (got {_show(value)})")
    return value


def _scaled(value: Decimal, scale: int, at: str, name: str) -> int:
    scaled = value * scale
    if scaled != scaled.to_integral_value():
        raise TraceError(f"{at}: {name}: has more than 6 decimal places")
    return int(scaled)


def _config_part(model: type[BaseModel], raw: object, at: str, path: str) -> Any:
    """A part of the header that the config file has too, checked by the config's own model."""
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise TraceError(f"{at}: {path}{'.' + where if where else ''}: {first['msg']}") from None


def _parse_pool(raw: dict[str, Any], at: str) -> PoolSpec:
    _no_unknown(raw, _POOL_FIELDS, at, "pool.")
    pool_reset = BudgetReset()
    if "budgetReset" in raw:
        pool_reset = _config_part(BudgetResetConfig, raw["budgetReset"], at, "pool.budgetReset").to_spec()
    subs_raw = raw.get("subscriptions")
    if not isinstance(subs_raw, list) or not subs_raw:
        raise TraceError(f"{at}: pool.subscriptions: must be a non-empty list")
    default_max = _count(raw, "maxClientsPerSubscription", at, "pool.", default=15, minimum=1)
    subscriptions: list[SubscriptionSpec] = []
    for i, sub in enumerate(subs_raw):
        path = f"pool.subscriptions[{i}]."
        if not isinstance(sub, dict):
            raise TraceError(f"{at}: {path[:-1]}: must be an object")
        _no_unknown(sub, _SUBSCRIPTION_FIELDS, at, path)
        sid = sub.get("id")
        if not isinstance(sid, str) or not sid:
            raise TraceError(f"{at}: {path}id: must be a non-empty string")
        if any(spec.id == sid for spec in subscriptions):
            raise TraceError(f"{at}: {path}id: duplicate id {sid!r}")
        type_ = sub.get("type", "claude-pro")
        if not isinstance(type_, str) or not type_:
            raise TraceError(f"{at}: {path}type: must be a non-empty string")
        budget = _positive(sub, "weeklyBudget", at, path)
        reset = pool_reset
        if "budgetReset" in sub:
            reset = _config_part(BudgetResetConfig, sub["budgetReset"], at, f"{path}budgetReset").to_spec()
        windows = sub.get("windows", [])
        if not isinstance(windows, list):
            raise TraceError(f"{at}: {path}windows: must be a list")
        extra = tuple(
            _config_part(ExtraWindowConfig, window, at, f"{path}windows[{j}]").to_spec()
            for j, window in enumerate(windows)
        )
        subscriptions.append(
            SubscriptionSpec(
                id=sid,
                email=str(sub.get("email", f"{sid}@simulated.invalid")),
                type=type_,
                credential_ref=str(sub.get("configDir", f"simulated:{sid}")),
                weekly_budget_micros=_scaled(budget, MICROS_PER_UNIT, at, f"{path}weeklyBudget"),
                max_clients=_count(sub, "maxClientsPerSub", at, path, default=default_max, minimum=1),
                reset=reset,
                extra_windows=extra,
            )
        )
    threshold = _positive(raw, "weeklyBudgetThreshold", at, "pool.", default=0.85)
    if threshold > 1:
        raise TraceError(f"{at}: pool.weeklyBudgetThreshold: must be at most 1 (got {threshold})")
    fallback = raw.get("fallbackWhenExhausted", True)
    if not isinstance(fallback, bool):
        raise TraceError(f"{at}: pool.fallbackWhenExhausted: must be true or false")
    reb = raw.get("rebalancing", {})
    if not isinstance(reb, dict):
        raise TraceError(f"{at}: pool.rebalancing: must be an object")
    _no_unknown(reb, _REBALANCING_FIELDS, at, "pool.rebalancing.")
    enabled = reb.get("enabled", True)
    if not isinstance(enabled, bool):
        raise TraceError(f"{at}: pool.rebalancing.enabled: must be true or false")
    gap = _number(reb, "costGapThreshold", at, "pool.rebalancing.", default=5.0)
    if gap < 0:
        raise TraceError(f"{at}: pool.rebalancing.costGapThreshold: must be >= 0 (got {gap})")
    idle = _number(reb, "idleSeconds", at, "pool.rebalancing.", default=300.0)
    if idle < 0:
        raise TraceError(f"{at}: pool.rebalancing.idleSeconds: must be >= 0 (got {idle})")
    rebalancing = RebalancePolicy(
        enabled=enabled,
        interval_seconds=float(_positive(reb, "intervalSeconds", at, "pool.rebalancing.", default=300.0)),
        cost_gap_micros=_scaled(gap, MICROS_PER_UNIT, at, "pool.rebalancing.costGapThreshold"),
        max_moves_per_cycle=_count(reb, "maxClientsToMovePerCycle", at, "pool.rebalancing.", default=3, minimum=0),
        idle_seconds=float(idle),
    )
    knobs: dict[str, Any] = {}
    spec_fields = {f.name for f in fields(PoolSpec)}
    for key, (name, scale) in _OPTIONAL_POOL_KNOBS.items():
        if key not in raw:
            continue
        if name not in spec_fields:
            raise TraceError(f"{at}: pool.{key}: this version of the policy has no such setting")
        if scale is None:
            knobs[name] = _count(raw, key, at, "pool.", default=1, minimum=1)
        else:
            value = _number(raw, key, at, "pool.")
            if value < 0:
                raise TraceError(f"{at}: pool.{key}: must be >= 0 (got {value})")
            knobs[name] = float(value) * scale
    return PoolSpec(
        subscriptions=tuple(subscriptions),
        threshold_ppm=_scaled(threshold, PPM, at, "pool.weeklyBudgetThreshold"),
        fallback_when_exhausted=fallback,
        rebalancing=rebalancing,
        lease_ttl_seconds=float(_positive(raw, "leaseTtlSeconds", at, "pool.", default=60.0)),
        **knobs,
    )


def _parse_incident(raw: object, path: str, ids: set[str], at: str) -> Incident:
    if not isinstance(raw, dict):
        raise TraceError(f"{at}: {path[:-1]}: must be an object")
    _no_unknown(raw, _INCIDENT_FIELDS, at, path)
    sid = raw.get("subscription")
    if sid not in ids:
        raise TraceError(f"{at}: {path}subscription: must name a subscription of the pool (got {_show(sid)})")
    outcome = _OUTCOMES.get(raw.get("outcome")) if isinstance(raw.get("outcome"), str) else None
    if outcome is None or outcome is Outcome.OK:
        raise TraceError(f"{at}: {path}outcome: must be one of rate_limited, auth_failed, server_error")
    start = _number(raw, "from", at, path)
    end = _number(raw, "until", at, path) if "until" in raw else Decimal("Infinity")
    if start < 0 or end <= start:
        raise TraceError(f"{at}: {path}until: must be after from, and from >= 0")
    share = _positive(raw, "share", at, path, default=1.0)
    if share > 1:
        raise TraceError(f"{at}: {path}share: must be at most 1 (got {share})")
    return Incident(str(sid), outcome, float(start), float(end), float(share))


# -- writing --------------------------------------------------------------------------


def pool_to_json(pool: PoolSpec) -> dict[str, Any]:
    """The header's ``pool`` object for `pool`: a subset of the guide's auth-pool.json."""
    reb = pool.rebalancing
    return {
        "subscriptions": [_subscription_json(spec) for spec in pool.subscriptions],
        "weeklyBudgetThreshold": _units(pool.threshold_ppm, PPM),
        "fallbackWhenExhausted": pool.fallback_when_exhausted,
        "rebalancing": {
            "enabled": reb.enabled,
            "intervalSeconds": reb.interval_seconds,
            "costGapThreshold": _units(reb.cost_gap_micros, MICROS_PER_UNIT),
            "maxClientsToMovePerCycle": reb.max_moves_per_cycle,
            "idleSeconds": reb.idle_seconds,
        },
        "leaseTtlSeconds": pool.lease_ttl_seconds,
    }


_WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


def _subscription_json(spec: SubscriptionSpec) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": spec.id,
        "type": spec.type,
        "weeklyBudget": _units(spec.weekly_budget_micros, MICROS_PER_UNIT),
        "maxClientsPerSub": spec.max_clients,
    }
    if spec.reset != BudgetReset():
        reset = spec.reset
        out["budgetReset"] = (
            {"anchor": _iso(reset.anchor)}
            if reset.anchor is not None
            else {
                "weekday": _WEEKDAYS[reset.weekday],
                "hour": reset.hour,
                "minute": reset.minute,
                "timezone": reset.timezone,
            }
        )
    if spec.extra_windows:
        out["windows"] = [_window_json(window) for window in spec.extra_windows]
    return out


def _window_json(window: ExtraWindow) -> dict[str, Any]:
    hours = window.length_seconds / 3600
    out: dict[str, Any] = {
        "name": window.name,
        "lengthHours": int(hours) if hours == int(hours) else hours,
        "budget": _units(window.budget_micros, MICROS_PER_UNIT),
    }
    if window.anchor:
        out["anchor"] = _iso(window.anchor)
    return out


def _iso(posix: float) -> str:
    return dt.datetime.fromtimestamp(posix, dt.UTC).isoformat().replace("+00:00", "Z")


def _units(value: int, scale: int) -> int | float:
    whole, rest = divmod(value, scale)
    return whole if not rest else float(Decimal(value) / scale)


def _event_json(event: TraceEvent, clients: tuple[str, ...]) -> dict[str, Any]:
    t: int | float = int(event.t) if event.t == int(event.t) else event.t
    out: dict[str, Any] = {"t": t, "type": _NAME_OF[event.kind], "client": clients[event.client]}
    if event.kind == REQUEST:
        out.update(cost_micros=event.cost_micros, outcome=event.outcome.value, model=event.detail)
    elif event.kind == ARRIVE and event.detail:
        out["subscription_type"] = event.detail
    return out


def write_trace(path: str | Path, trace: Trace) -> None:
    """Write `trace` as JSONL (gzip-compressed when `path` ends in ``.gz``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = _iso(trace.start)
    header: dict[str, Any] = {
        "type": "header",
        "format": FORMAT,
        "version": VERSION,
        "start": start,
        "description": trace.description,
        "pool": pool_to_json(trace.pool),
        "incidents": [_incident_json(incident) for incident in trace.incidents],
        "generator": dict(trace.generator),
    }
    if path.suffix != ".gz":
        with path.open("w", encoding="utf-8", newline="\n") as stream:
            stream.writelines(_lines(header, trace))
        return
    # mtime=0 and no file name in the gzip header: the same trace, the same bytes.
    with (
        path.open("wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as zipped,
        io.TextIOWrapper(zipped, encoding="utf-8", newline="\n") as stream,
    ):
        stream.writelines(_lines(header, trace))


def _incident_json(incident: Incident) -> dict[str, Any]:
    out: dict[str, Any] = {
        "subscription": incident.subscription_id,
        "outcome": incident.outcome.value,
        "from": incident.start,
        "share": incident.share,
    }
    if math.isfinite(incident.end):
        out["until"] = incident.end
    return out


def _lines(header: dict[str, Any], trace: Trace) -> Iterator[str]:
    yield json.dumps(header, separators=(",", ":")) + "\n"
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    for event in trace.events:
        yield dumps(_event_json(event, trace.clients)) + "\n"
