"""API tokens and roles.

A token reads ``edgellm_<id>_<secret>``: ``id`` (public, 12 hex characters) names the row,
``secret`` (32 random bytes, urlsafe base64) is never stored — only the SHA-256 of the whole
token is, compared in constant time. Tokens are shown once, when made; a lost token is revoked
and replaced. Roles are ordered: each includes the ones before it.

    viewer     read: devices, rollouts, telemetry, metrics
    operator   + rollouts (start, pause, resume, abort, rollback), device commands, federated runs
    admin      + tokens, publishing, the audit log
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
import secrets

from server.errors import ServerError
from server.store import Store, TokenRow

ROLES = ("viewer", "operator", "admin")
_TOKEN_RE = re.compile(r"^edgellm_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@-]{0,63}$")


class AuthError(ServerError):
    """No usable token (HTTP 401) or a role too low for the call (HTTP 403: ``status``)."""

    def __init__(self, message: str, *, status: int = 401, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who makes a call: a token (``token_id``) or the loopback-trusted local user."""

    name: str
    role: str
    token_id: str | None = None

    def allows(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ServerError(f"unknown role {role!r}", hint=f"use one of {', '.join(ROLES)}")
    return role


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(store: Store, *, name: str, role: str) -> tuple[TokenRow, str]:
    """Make a token; returns its row and the token itself (shown once, never stored)."""
    check_role(role)
    if not _NAME_RE.match(name):
        raise ServerError(
            f"token name {name!r} is not valid", hint="use 1-64 letters, digits, spaces and . _ @ - (e.g. 'ci-deploy')"
        )
    token_id = secrets.token_hex(6)
    token = f"edgellm_{token_id}_{secrets.token_urlsafe(32)}"
    store.add_token(token_id, name=name, role=role, token_hash=_hash(token))
    row = next(t for t in store.tokens() if t.id == token_id)
    return row, token


def authenticate(store: Store, header: str | None) -> Principal:
    """The principal of an ``Authorization: Bearer <token>`` header; :class:`AuthError` (401)
    for a missing, malformed, unknown or revoked token."""
    hint = "pass --token (or $EDGELLM_SERVER_TOKEN); an admin makes one with `edgellm-server token create`"
    if not header:
        raise AuthError("authentication required: no bearer token", hint=hint)
    scheme, _, token = header.strip().partition(" ")
    m = _TOKEN_RE.match(token.strip()) if scheme.lower() == "bearer" else None
    if m is None:
        raise AuthError("malformed bearer token", hint=hint)
    found = store.token_hash(m.group(1))
    if found is None or not hmac.compare_digest(found[1], _hash(token.strip())):
        raise AuthError("unknown or revoked token", hint=hint)
    row = found[0]
    store.touch_token(row.id)
    return Principal(name=row.name, role=row.role, token_id=row.id)


def require(principal: Principal, role: str) -> None:
    if not principal.allows(role):
        raise AuthError(
            f"token {principal.name!r} has role {principal.role}; this call needs {role}",
            status=403,
            hint=f"ask an admin for a {role} token",
        )
