"""The asyncio client, and its lease: renewed by a task, released on exit, also when cancelled."""

# `timeout=` is the gRPC deadline, sent to the server with the call (grpc-timeout) so that it
# stops working when the caller gives up; `asyncio.timeout()` around the call could not do that.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc

from authpool_client._channel import ChannelSettings, RetryPolicy
from authpool_client._client import DEFAULT_TIMEOUT
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

__all__ = ["AsyncAuthPoolClient", "AsyncLease"]

log = logging.getLogger("authpool_client")

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


class AsyncAuthPoolClient:
    """An asyncio AuthPool client over one channel; create it inside the event loop that uses it.

    Takes the same arguments as `AuthPoolClient`; use it as
    `async with AsyncAuthPoolClient(...) as client:` or `await client.close()`.
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
        self._channel = self._settings.aio_channel()
        self._stub = authpool_pb2_grpc.AuthPoolStub(self._channel)

    def __repr__(self) -> str:
        return f"AsyncAuthPoolClient({self._settings!r})"

    async def __aenter__(self) -> AsyncAuthPoolClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel. Leases still held stop renewing and expire on the server."""
        await self._channel.close()

    async def _call(
        self, method: grpc.aio.UnaryUnaryMultiCallable[_Request, _Response], request: _Request, timeout: float | None
    ) -> _Response:
        try:
            return await method(
                request, timeout=self.timeout if timeout is None else timeout, metadata=self._settings.metadata
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from error

    # -- leases ---------------------------------------------------------------

    def lease(
        self,
        client_id: str,
        *,
        session_id: str = "",
        subscription_type: str = "",
        labels: Mapping[str, str] | None = None,
        on_move: Callable[[AsyncLease], object] | None = None,
        on_lost: Callable[[AsyncLease, LeaseLost], object] | None = None,
    ) -> AsyncLease:
        """A lease for `client_id`, to use as `async with client.lease("worker-7") as lease:`.

        Entering allocates it; while inside, a task renews it; leaving
        releases it, also when the body raised or was cancelled. The callbacks
        may be plain functions or coroutine functions.
        """
        return AsyncLease(
            self, allocate_request(client_id, session_id, subscription_type, labels), on_move=on_move, on_lost=on_lost
        )

    async def allocate(
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
        return await self._call(self._stub.Allocate, request, timeout)

    async def renew(self, lease_id: str, fencing_token: int, *, timeout: float | None = None) -> pb.RenewResponse:
        """Renew a lease by hand; `moved` in the answer says to switch to its new credential and token."""
        request = pb.RenewRequest(lease_id=lease_id, fencing_token=fencing_token)
        return await self._call(self._stub.Renew, request, timeout)

    async def release(self, lease_id: str, fencing_token: int, *, timeout: float | None = None) -> bool:
        """Release a lease; False when it was no longer live (which is not an error)."""
        request = pb.ReleaseRequest(lease_id=lease_id, fencing_token=fencing_token)
        return (await self._call(self._stub.Release, request, timeout)).released

    async def report_usage(
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
        """Record one provider request's cost in integer micro-units; see `AuthPoolClient.report_usage`."""
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
        return receipt(request, await self._call(self._stub.ReportUsage, request, timeout))

    # -- operators ------------------------------------------------------------

    async def status(self, *, include_clients: bool = False, timeout: float | None = None) -> pb.StatusResponse:
        """Every subscription and the pool's totals (operator role)."""
        return await self._call(self._stub.Status, pb.StatusRequest(include_clients=include_clients), timeout)

    async def rebalance(self, *, dry_run: bool = False, timeout: float | None = None) -> pb.RebalanceResponse:
        """Run one rebalancing cycle now, or only plan it (operator role)."""
        return await self._call(self._stub.Rebalance, pb.RebalanceRequest(dry_run=dry_run), timeout)

    async def drain_subscription(self, subscription_id: str, *, timeout: float | None = None) -> int:
        """Take a subscription out of rotation (admin role); returns how many idle clients moved at once."""
        request = pb.DrainSubscriptionRequest(subscription_id=subscription_id)
        return (await self._call(self._stub.DrainSubscription, request, timeout)).clients_moved

    async def resume_subscription(self, subscription_id: str, *, timeout: float | None = None) -> None:
        """Put a drained or disabled subscription back into rotation (admin role)."""
        request = pb.ResumeSubscriptionRequest(subscription_id=subscription_id)
        await self._call(self._stub.ResumeSubscription, request, timeout)

    async def watch_events(
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
    ) -> AsyncIterator[pb.WatchEventsResponse]:
        """Follow the event log (operator role); no deadline unless `timeout` is given. See `AuthPoolClient`."""
        request = watch_request(
            after_sequence, types, subscription_ids, client_ids, progress_interval, max_batch_events, batch_window
        )
        stream = self._stub.WatchEvents(request, timeout=timeout, metadata=self._settings.metadata)
        try:
            async for message in stream:
                for single in one_by_one(message):
                    yield single
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from error
        finally:
            stream.cancel()


class AsyncLease(LeaseView):
    """One client's lease under asyncio: allocated on `__aenter__`, renewed by a task, released on `__aexit__`.

    The same surface as the sync `Lease`; see there.
    """

    _USE_INSIDE = "async with client.lease(...)"

    def __init__(
        self,
        client: AsyncAuthPoolClient,
        request: pb.AllocateRequest,
        *,
        on_move: Callable[[AsyncLease], object] | None,
        on_lost: Callable[[AsyncLease, LeaseLost], object] | None,
    ) -> None:
        self._client = client
        self._request = request
        self._on_move = on_move
        self._on_lost = on_lost
        self._state: LeaseState | None = None
        self._stop = asyncio.Event()
        self._renewer: asyncio.Task[None] | None = None
        self.released: bool | None = None
        """After exit: True when this lease's Release ended it, False when it was already gone."""

    async def report_usage(
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
        """Report one provider request made under this lease; see the sync `Lease.report_usage`."""
        info = self._held.info
        return await self._client.report_usage(
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

    async def __aenter__(self) -> AsyncLease:
        if self._state is not None:
            raise RuntimeError("an AsyncLease is entered once; call client.lease(...) again for another")
        client = self._client
        self._state = LeaseState(await client._call(client._stub.Allocate, self._request, None))
        self._renewer = asyncio.create_task(self._renew_forever(), name=f"authpool-renew-{self._request.client_id}")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        # Shielded: when the body was cancelled (or is cancelled again while we
        # wait), stopping the renewer and releasing still run to the end, so the
        # slot is freed now rather than at expiry. The cancellation propagates.
        await asyncio.shield(self._finish())

    async def _finish(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            # The renewer leaves at its next wait; a Renew in flight finishes first
            # (releasing under a token that Renew just replaced would be refused as stale).
            await self._renewer
        self.released = await self._release()

    async def _release(self) -> bool:
        state = self._held
        if state.lost is not None:
            return False
        try:
            return await self._client.release(state.info.lease_id, state.info.fencing_token)
        except StaleFencingToken:
            return False
        except AuthPoolError as error:
            log.warning(
                "could not release lease %s (%s); it expires at %s",
                state.info.lease_id,
                error.reason,
                state.info.expires_at.isoformat(),
            )
            return False

    async def _renew_forever(self) -> None:
        state = self._held
        after_failure = False
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), state.next_delay(after_failure=after_failure))
            if self._stop.is_set():
                return
            try:
                response = await self._client.renew(state.info.lease_id, state.info.fencing_token)
            except Exception as exc:  # anything at all: the lease must never stop renewing unnoticed
                error = exc if isinstance(exc, AuthPoolError) else AuthPoolError(f"{type(exc).__name__}: {exc}")
                if isinstance(error, StaleFencingToken) and (moved := await self._recover()) is not None:
                    after_failure = False
                    if moved:
                        await self._notify(self._on_move)
                    continue
                lost = state.renewal_failed(error)
                if lost is not None:
                    log.warning("lease %s lost: %s", state.info.lease_id, error.reason)
                    await self._notify(self._on_lost, lost)
                    return
                log.info("renewing lease %s failed (%s); retrying", state.info.lease_id, error.reason)
                after_failure = True
                continue
            after_failure = False
            if state.renewed(response):
                await self._notify(self._on_move)

    async def _recover(self) -> bool | None:
        """After a stale Renew: ask a sticky Allocate for the current token (see `_lease`); None if that failed."""
        try:
            response = await self._client._call(self._client._stub.Allocate, self._request, None)
        except AuthPoolError:
            return None
        moved = self._held.recovered(response)
        if moved is None:  # ours is gone and that is a new lease: not this context's to keep
            with contextlib.suppress(AuthPoolError):  # if not, it expires on its own
                await self._client.release(response.lease.lease_id, response.lease.fencing_token)
        return moved

    async def _notify(self, callback: Callable[..., object] | None, *args: object) -> None:
        if callback is None:
            return
        try:
            result = callback(self, *args)
            if inspect.isawaitable(result):
                await result
        except Exception:
            # A failing callback must not stop the renewals that keep the lease alive.
            log.exception("a lease callback of lease %s raised", self.lease_id)
