"""Who is calling: ``Authorization: Bearer <key>`` → ``Principal`` (tenant + role).

Without a keys file the server is single-tenant and every caller acts as the ``default`` tenant's
admin. With one, every route but /health, /ready and /metrics needs a key: a missing or unknown
key is a 401 (``invalid_api_key``), an admin-only route called by a user is a 403
(``permission_denied``). The keys file is re-read when it changes, so keys added with
``loraplex keys add`` and limits changed with ``loraplex keys limits`` apply without a restart.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi import Request

from adapters.tenant_limits import TenantLimits
from adapters.tenants import NO_LIMITS, SINGLE_TENANT, KeyRing, Principal
from server.api.errors import ApiError

_RELOAD_CHECK_INTERVAL_S = 2.0


class Authenticator:
    """Turns a request's bearer key into a Principal; ``keyring`` None means single-tenant.
    ``on_reload(keyring)`` is called once now and after every reload that changed the keys."""

    def __init__(self, keyring: KeyRing | None, on_reload: Callable[[KeyRing], None] | None = None) -> None:
        self.keyring = keyring
        self._next_reload_check = 0.0
        self._on_reload = on_reload
        if keyring is not None and on_reload is not None:
            on_reload(keyring)

    @property
    def is_single_tenant(self) -> bool:
        return self.keyring is None

    def principal(self, authorization: str | None) -> Principal:
        if self.keyring is None:
            return SINGLE_TENANT
        self._maybe_reload()
        principal = self.keyring.authenticate(_bearer_key(authorization))
        if principal is None:
            raise ApiError(
                401,
                "Incorrect or missing API key: send 'Authorization: Bearer <key>' with a key made by "
                "`loraplex keys add`.",
                code="invalid_api_key",
            )
        return principal

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now >= self._next_reload_check:
            self._next_reload_check = now + _RELOAD_CHECK_INTERVAL_S
            if self.keyring.maybe_reload() and self._on_reload is not None:
                self._on_reload(self.keyring)

    def limits(self, tenant: str) -> TenantLimits:
        """The tenant's limits as last read (none in single-tenant mode)."""
        return NO_LIMITS if self.keyring is None else self.keyring.limits(tenant)


def _bearer_key(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, key = authorization.strip().partition(" ")
    return key.strip() if scheme.lower() == "bearer" else None


def caller(request: Request) -> Principal:
    """FastAPI dependency: the authenticated caller of this request."""
    authenticator: Authenticator = request.app.state.loraplex.auth
    return authenticator.principal(request.headers.get("authorization"))


def admin(request: Request) -> Principal:
    """FastAPI dependency: the caller, who must be an admin (403 otherwise)."""
    principal = caller(request)
    if not principal.is_admin:
        raise ApiError(403, "This operation needs an admin key.", code="permission_denied")
    return principal
