"""The blocking client, and its lease: renewed by a background thread, released on exit."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc

from authpool_client._channel import ChannelSettings, RetryPolicy
from authpool_client._errors import AuthPoolError, LeaseLost, StaleFencingToken, from_rpc_error
from authpool_client._lease import LeaseState, LeaseView
from authpool_client._models import (
    WATCH_BATCH_EVENTS,
    Outcome,
    UsageReceipt,
    allocate_request,
    one_by_one,
    receipt,
    usage_request,
    watch_request,
)
from authpool_client.api import authpool_pb2 as pb
from authpool_client.api import authpool_pb2_grpc

__all__ = ["DEFAULT_TIMEOUT", "AuthPoolClient", "Lease"]

log = logging.getLogger("authpool_client")

# Every unary call gets a deadline unless the caller gives another: a call to
# a wedged server must not hang a worker forever.
DEFAULT_TIMEOUT = 10.0

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


class AuthPoolClient:
    """A blocking AuthPool client over one channel. Thread-safe; share one per process.

    Args:
        target: host:port of the server (any gRPC target, e.g. "dns:///authpool:50051").
        token: The bearer token, sent as `authorization: Bearer ...` on every call.
        insecure: Plaintext, for a local development server only.
        root_ca: PEM bytes or a file of the CA that signed the server's certificate; None: the system's roots.
        client_cert: PEM bytes or file of this client's certificate chain, for mutual TLS (with `client_key`).
        client_key: PEM bytes or file of its private key.
        timeout: The deadline, in seconds, of every unary call that does not give its own.
        retry: The channel's retry policy for UNAVAILABLE.
        options: More gRPC channel options, e.g. keepalive settings.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        insecure: bool = False,
        root_ca: bytes | Path | None = None,
        client_cert: bytes | Path | None = None,
        client_key: bytes | Path | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        options: Iterable[tuple[str, Any]] = (),
    ) -> None:
        self._settings = ChannelSettings.build(
            target,
            token=token,
            insecure=insecure,
            root_ca=root_ca,
            client_cert=client_cert,
            client_key=client_key,
            retry=retry,
            options=tuple(options),
        )
        self.timeout = timeout
        self._channel = self._settings.sync_channel()
        self._stub = authpool_pb2_grpc.AuthPoolStub(self._channel)

    def __repr__(self) -> str:
        return f"AuthPoolClient({self._settings!r})"

    def __enter__(self) -> AuthPoolClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel. Leases still held stop renewing and expire on the server."""
        self._channel.close()

    def _call(
        self, method: grpc.UnaryUnaryMultiCallable[_Request, _Response], request: _Request, timeout: float | None
    ) -> _Response:
        try:
            return method(
                request, timeout=self.timeout if timeout is None else timeout, metadata=self._settings.metadata
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error

    # -- leases ---------------------------------------------------------------

    def lease(
        self,
        client_id: str,
        *,
        session_id: str = "",
        subscription_type: str = "",
        labels: Mapping[str, str] | None = None,
        on_move: Callable[[Lease], object] | None = None,
        on_lost: Callable[[Lease, LeaseLost], object] | None = None,
    ) -> Lease:
        """A lease for `client_id`, to use as a context manager::

            with client.lease("worker-7") as lease:
                run_with(lease.credential_ref)

        Entering allocates it; while inside, a background thread renews it;
        leaving releases it, also when the body raised. `on_move(lease)` is
        called (from the renewal thread) when the lease moved to another
        credential; `on_lost(lease, error)` when it can no longer be renewed.
        """
        return Lease(
            self,
            allocate_request(client_id, session_id, subscription_type, labels),
            on_move=on_move,
            on_lost=on_lost,
        )

    def allocate(
        self,
        client_id: str,
        *,
        session_id: str = "",
        subscription_type: str = "",
        labels: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> pb.AllocateResponse:
        """Allocate a lease without renewing it (prefer `lease()`, which renews and releases)."""
        request = allocate_request(client_id, session_id, subscription_type, labels)
        return self._call(self._stub.Allocate, request, timeout)

    def renew(self, lease_id: str, fencing_token: int, *, timeout: float | None = None) -> pb.RenewResponse:
        """Renew a lease by hand; `moved` in the answer says to switch to its new credential and token."""
        return self._call(self._stub.Renew, pb.RenewRequest(lease_id=lease_id, fencing_token=fencing_token), timeout)

    def release(self, lease_id: str, fencing_token: int, *, timeout: float | None = None) -> bool:
        """Release a lease; False when it was no longer live (which is not an error)."""
        request = pb.ReleaseRequest(lease_id=lease_id, fencing_token=fencing_token)
        return self._call(self._stub.Release, request, timeout).released

    def report_usage(
        self,
        lease_id: str,
        fencing_token: int,
        cost_micros: int,
        *,
        model: str = "",
        input_tokens: int = 0,
        output_tokens: int = 0,
        outcome: Outcome = Outcome.OK,
        remaining_fraction: float | None = None,
        resets_at: datetime | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> UsageReceipt:
        """Record what one provider request cost, in integer micro-units (1 USD = 1,000,000).

        The request id is generated (a UUID) unless given, so every retry of
        this report, the channel's or yours with `receipt.request_id`, is
        counted once. `remaining_fraction` and `resets_at` pass on what the
        provider's rate-limit headers said about the subscription's allowance.
        """
        request = usage_request(
            lease_id=lease_id,
            fencing_token=fencing_token,
            cost_micros=cost_micros,
            model=model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            outcome=outcome,
            remaining_fraction=remaining_fraction,
            resets_at=resets_at,
            request_id=request_id,
        )
        return receipt(request, self._call(self._stub.ReportUsage, request, timeout))

    # -- operators ------------------------------------------------------------

    def status(self, *, include_clients: bool = False, timeout: float | None = None) -> pb.StatusResponse:
        """Every subscription and the pool's totals (operator role)."""
        return self._call(self._stub.Status, pb.StatusRequest(include_clients=include_clients), timeout)

    def rebalance(self, *, dry_run: bool = False, timeout: float | None = None) -> pb.RebalanceResponse:
        """Run one rebalancing cycle now, or only plan it (operator role)."""
        return self._call(self._stub.Rebalance, pb.RebalanceRequest(dry_run=dry_run), timeout)

    def drain_subscription(self, subscription_id: str, *, timeout: float | None = None) -> int:
        """Take a subscription out of rotation (admin role); returns how many idle clients moved at once."""
        request = pb.DrainSubscriptionRequest(subscription_id=subscription_id)
        return self._call(self._stub.DrainSubscription, request, timeout).clients_moved

    def resume_subscription(self, subscription_id: str, *, timeout: float | None = None) -> None:
        """Put a drained or disabled subscription back into rotation (admin role)."""
        request = pb.ResumeSubscriptionRequest(subscription_id=subscription_id)
        self._call(self._stub.ResumeSubscription, request, timeout)

    def watch_events(
        self,
        after_sequence: int = 0,
        *,
        types: Iterable[pb.EventType.ValueType] = (),
        subscription_ids: Iterable[str] = (),
        client_ids: Iterable[str] = (),
        progress_interval: float | None = None,
        max_batch_events: int = WATCH_BATCH_EVENTS,
        batch_window: float | None = None,
        timeout: float | None = None,
    ) -> Iterator[pb.WatchEventsResponse]:
        """Follow the event log from `after_sequence` (operator role): events, and `progress` while idle.

        A watch has no deadline unless `timeout` is given: it is meant to stay
        open. Resume after an error from the last sequence received. Leaving
        the loop early cancels the stream.

        The server sends up to `max_batch_events` events per message (1: one
        each, as servers before batching did), whatever it has when it writes;
        `batch_window` (seconds, at most 1) lets it wait that long for more to
        fill a message, for a watcher that can take the latency. However they
        travel, this yields one `WatchEventsResponse` per event (its `event`
        set) or per progress message, in order.
        """
        request = watch_request(
            after_sequence, types, subscription_ids, client_ids, progress_interval, max_batch_events, batch_window
        )
        stream = self._stub.WatchEvents(request, timeout=timeout, metadata=self._settings.metadata)
        try:
            for message in stream:
                yield from one_by_one(message)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        finally:
            stream.cancel()

    def _renew_future(self, lease_id: str, fencing_token: int) -> grpc.Future[pb.RenewResponse]:
        return self._stub.Renew.future(
            pb.RenewRequest(lease_id=lease_id, fencing_token=fencing_token),
            timeout=self.timeout,
            metadata=self._settings.metadata,
        )


class Lease(LeaseView):
    """One client's lease: allocated on `__enter__`, renewed by a thread, released on `__exit__`.

    Read `credential_ref` (and `fencing_token`) each time you use them: they
    change when the lease moves. `moved` and `on_move` say that it did;
    `lost` and `on_lost` that it cannot be renewed any more, after which its
    credential must not be used.
    """

    def __init__(
        self,
        client: AuthPoolClient,
        request: pb.AllocateRequest,
        *,
        on_move: Callable[[Lease], object] | None,
        on_lost: Callable[[Lease, LeaseLost], object] | None,
    ) -> None:
        self._client = client
        self._request = request
        self._on_move = on_move
        self._on_lost = on_lost
        self._state: LeaseState | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.released: bool | None = None
        """After exit: True when this lease's Release ended it, False when it was already gone."""

    def report_usage(
        self,
        cost_micros: int,
        *,
        model: str = "",
        input_tokens: int = 0,
        output_tokens: int = 0,
        outcome: Outcome = Outcome.OK,
        remaining_fraction: float | None = None,
        resets_at: datetime | None = None,
        request_id: str | None = None,
        fencing_token: int | None = None,
        timeout: float | None = None,
    ) -> UsageReceipt:
        """Report one provider request made under this lease (see `AuthPoolClient.report_usage`).

        `fencing_token` defaults to the newest; pass the one the request was
        made under if the lease moved meanwhile, so the cost is charged where it
        was spent.
        """
        info = self._held.info
        return self._client.report_usage(
            info.lease_id,
            info.fencing_token if fencing_token is None else fencing_token,
            cost_micros,
            model=model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            outcome=outcome,
            remaining_fraction=remaining_fraction,
            resets_at=resets_at,
            request_id=request_id,
            timeout=timeout,
        )

    # -- lifecycle ---------------------------------------------------------------

    def __enter__(self) -> Lease:
        if self._state is not None:
            raise RuntimeError("a Lease is entered once; call client.lease(...) again for another")
        client = self._client
        self._state = LeaseState(client._call(client._stub.Allocate, self._request, None))
        self._renewer = threading.Thread(
            target=self._renew_forever, name=f"authpool-renew-{self._request.client_id}", daemon=True
        )
        self._renewer.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._renewer is not None:
            # Let a Renew in flight finish rather than cancel it: had it moved the
            # lease, releasing with the older token would be refused as stale.
            self._renewer.join(self._client.timeout + 1.0)
        self.released = self._release()

    def _release(self) -> bool:
        state = self._held
        if state.lost is not None:
            return False  # gone, or someone else's now: nothing of ours to release
        try:
            return self._client.release(state.info.lease_id, state.info.fencing_token)
        except StaleFencingToken:
            return False
        except AuthPoolError as error:
            # Never mask the body's own exception; the server frees the slot at expiry anyway.
            log.warning(
                "could not release lease %s (%s); it expires at %s",
                state.info.lease_id,
                error.reason,
                state.info.expires_at.isoformat(),
            )
            return False

    def _renew_forever(self) -> None:
        state = self._held
        after_failure = False
        while not self._stop.wait(state.next_delay(after_failure=after_failure)):
            try:
                response = self._client._renew_future(state.info.lease_id, state.info.fencing_token).result()
            except Exception as exc:  # anything at all: the lease must never stop renewing unnoticed
                error = from_rpc_error(exc) if isinstance(exc, grpc.RpcError) else AuthPoolError(f"{exc!r}")
                if isinstance(error, StaleFencingToken) and (moved := self._recover()) is not None:
                    after_failure = False
                    if moved:
                        self._notify(self._on_move)
                    continue
                lost = state.renewal_failed(error)
                if lost is not None:
                    log.warning("lease %s lost: %s", state.info.lease_id, error.reason)
                    self._notify(self._on_lost, lost)
                    return
                log.info("renewing lease %s failed (%s); retrying", state.info.lease_id, error.reason)
                after_failure = True
                continue
            after_failure = False
            if state.renewed(response):
                self._notify(self._on_move)

    def _recover(self) -> bool | None:
        """After a stale Renew: ask a sticky Allocate for the current token (see `_lease`); None if that failed."""
        try:
            response = self._client._call(self._client._stub.Allocate, self._request, None)
        except AuthPoolError:
            return None
        moved = self._held.recovered(response)
        if moved is None:  # ours is gone and that is a new lease: not this context's to keep
            with contextlib.suppress(AuthPoolError):  # if not, it expires on its own
                self._client.release(response.lease.lease_id, response.lease.fencing_token)
        return moved

    def _notify(self, callback: Callable[..., object] | None, *args: object) -> None:
        if callback is None:
            return
        try:
            callback(self, *args)
        except Exception:
            # A failing callback must not stop the renewals that keep the lease alive.
            log.exception("a lease callback of lease %s raised", self.lease_id)
