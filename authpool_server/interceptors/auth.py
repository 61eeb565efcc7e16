"""Who is calling, and may they call this method: UNAUTHENTICATED or PERMISSION_DENIED otherwise.

A caller is identified by a bearer token in the `authorization` metadata or,
with mutual TLS, by its client certificate; a token, when present, decides
(a wrong token is refused even over a trusted certificate). The token never
leaves this module: not in errors, logs or spans.
"""

from __future__ import annotations

import logging

import grpc

from authpool_server.errors import AuthPoolError, PermissionDenied, Unauthenticated
from authpool_server.grpc_paths import method_name, service_of
from authpool_server.interceptors.chain import Enter, Hooks, Metadata
from authpool_server.security.roles import Principal, Role, required_role
from authpool_server.security.settings import SecuritySettings
from authpool_server.telemetry.call import Call

__all__ = ["ANONYMOUS", "AuthStep"]

log = logging.getLogger(__name__)

ANONYMOUS = Principal("anonymous", Role.ADMIN)  # only ever used with --insecure-no-auth
_NO_ONE = Principal("-", Role.CLIENT)  # callers of open services


class AuthStep:
    def __init__(self, security: SecuritySettings) -> None:
        self._security = security

    def hooks(self, method: str) -> Hooks:
        """Who may call `method`, worked out once: open, anyone (auth off), or the role it needs."""
        if service_of(method) in self._security.open_services:
            return Hooks(_as(_NO_ONE))
        if not self._security.auth_required:
            return Hooks(_as(ANONYMOUS))
        needed = required_role(method)

        def enter(call: Call, context: grpc.aio.ServicerContext, metadata: Metadata) -> AuthPoolError | None:
            principal = self._identify(context, metadata)
            if isinstance(principal, Unauthenticated):
                return _refused(method, context, principal)
            call.principal = principal.name
            if needed is None or principal.role < needed:
                wanted = None if needed is None else str(needed)
                return _refused(method, context, PermissionDenied(method_name(method), str(principal.role), wanted))
            return None

        return Hooks(enter)

    def _identify(self, context: grpc.aio.ServicerContext, metadata: Metadata) -> Principal | Unauthenticated:
        header = metadata.get("authorization")
        if isinstance(header, str):
            scheme, _, token = header.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return Unauthenticated("authorization: expected 'Bearer <token>'")
            principal = self._security.tokens.principal(token.strip())
            if principal is None:
                return Unauthenticated("authorization: the token is not valid")
            return principal
        if self._security.certificates:
            principal = self._certificate_principal(context)
            if principal is not None:
                return principal
            return Unauthenticated("no bearer token, and the client certificate maps to no principal")
        return Unauthenticated("authorization: a bearer token is required ('authorization: Bearer <token>')")

    def _certificate_principal(self, context: grpc.aio.ServicerContext) -> Principal | None:
        auth = context.auth_context()
        subject = (auth.get("x509_subject") or [b""])[0].decode(errors="replace")
        common_name = (auth.get("x509_common_name") or [b""])[0].decode(errors="replace")
        if not subject and not common_name:
            return None
        for entry in self._security.certificates:
            if entry.matches(subject, common_name):
                return entry.principal
        return None


def _as(principal: Principal) -> Enter:
    """The hook of a method that lets everyone in, as `principal`."""

    def enter(call: Call, context: grpc.aio.ServicerContext, metadata: Metadata) -> None:
        call.principal = principal.name

    return enter


def _refused(method: str, context: grpc.aio.ServicerContext, refusal: AuthPoolError) -> AuthPoolError:
    log.info(
        "call refused",
        extra={"context": {"method": method_name(method), "reason": refusal.reason, "peer": context.peer()}},
    )
    return refusal
