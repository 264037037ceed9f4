"""The store's control half: API tokens (hashed), the operator audit log, and leases (one
replica holds a named lease at a time; the leader of the rollout driver is the holder of
``leader``)."""

from __future__ import annotations

import time
from typing import Any

from server.store.dialect import Conn
from server.store.rows import AuditRow, TokenRow

#: bound of an audit row's text fields
_AUDIT_TEXT = 1000
#: calls without a valid token are logged too, but only those among the last this many entries
#: are kept: anyone who can reach the API can make them, and they must not fill the database
UNAUTHENTICATED_KEEP = 10_000
ANONYMOUS = "(no valid token)"
_TOKEN_COLUMNS = "id, name, role, created, revoked, last_used"


class ControlTables:
    """Mixed into :class:`server.store.Store` (which provides ``db``)."""

    db: Conn

    # ------------------------------------------------------------------ tokens

    def add_token(self, token_id: str, *, name: str, role: str, token_hash: str) -> None:
        self.db.execute(
            "INSERT INTO api_tokens (id, name, role, hash, created) VALUES (?,?,?,?,?)",
            (token_id, name, role, token_hash, time.time()),
        )

    def token_hash(self, token_id: str) -> tuple[TokenRow, str] | None:
        """A live (not revoked) token and its stored hash."""
        r = self.db.execute(
            f"SELECT {_TOKEN_COLUMNS}, hash FROM api_tokens WHERE id=? AND revoked IS NULL", (token_id,)
        ).fetchone()
        return (_token(r), r["hash"]) if r is not None else None

    def tokens(self) -> list[TokenRow]:
        return [_token(r) for r in self.db.execute(f"SELECT {_TOKEN_COLUMNS} FROM api_tokens ORDER BY created, id")]

    def revoke_token(self, token_id: str) -> bool:
        return (
            self.db.execute(
                "UPDATE api_tokens SET revoked=? WHERE id=? AND revoked IS NULL", (time.time(), token_id)
            ).rowcount
            == 1
        )

    def touch_token(self, token_id: str) -> None:
        self.db.execute("UPDATE api_tokens SET last_used=? WHERE id=?", (time.time(), token_id))

    # ------------------------------------------------------------------ audit

    def audit(
        self, *, token: str | None, who: str, role: str | None, action: str, target: str, status: int, result: str
    ) -> None:
        self.db.execute(
            "INSERT INTO audit_log (ts, token, who, role, action, target, status, result) VALUES (?,?,?,?,?,?,?,?)",
            (
                time.time(),
                token,
                who[:_AUDIT_TEXT],
                role,
                action[:_AUDIT_TEXT],
                target[:_AUDIT_TEXT],
                status,
                result[:_AUDIT_TEXT],
            ),
        )
        if who == ANONYMOUS:
            self.db.execute(
                "DELETE FROM audit_log WHERE who=? AND id <= (SELECT MAX(id) FROM audit_log WHERE who=?) - ?",
                (ANONYMOUS, ANONYMOUS, UNAUTHENTICATED_KEEP),
            )

    def audit_log(self, limit: int = 100, since: float = 0.0) -> list[AuditRow]:
        """The newest entries first."""
        return [
            AuditRow(
                r["id"], r["ts"], r["token"], r["who"], r["role"], r["action"], r["target"], r["status"], r["result"]
            )
            for r in self.db.execute("SELECT * FROM audit_log WHERE ts>=? ORDER BY id DESC LIMIT ?", (since, limit))
        ]

    # ------------------------------------------------------------------ leases

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> int | None:
        """Take or renew lease ``name`` for ``ttl_s`` seconds. Returns its term (a number that
        grows each time the lease changes hands) if ``holder`` now holds it, else None. The
        check and the write are one statement, so two replicas never both win."""
        now = time.time()
        cur = self.db.execute(
            "INSERT INTO leases (name, holder, expires, term) VALUES (?,?,?,1) ON CONFLICT(name) DO UPDATE SET"
            " term=CASE WHEN leases.holder=excluded.holder THEN leases.term ELSE leases.term+1 END,"
            " holder=excluded.holder, expires=excluded.expires"
            " WHERE leases.holder=excluded.holder OR leases.expires<?",
            (name, holder, now + ttl_s, now),
        )
        if cur.rowcount != 1:
            return None
        r = self.db.execute("SELECT holder, term FROM leases WHERE name=?", (name,)).fetchone()
        return int(r["term"]) if r is not None and r["holder"] == holder else None

    def release_lease(self, name: str, holder: str) -> None:
        self.db.execute("UPDATE leases SET expires=0 WHERE name=? AND holder=?", (name, holder))

    def expired_leases(self, prefix: str, older_than_s: float) -> list[tuple[str, str]]:
        """``(name, holder)`` of leases named ``prefix...`` that ran out over ``older_than_s`` ago."""
        return [
            (r["name"], r["holder"])
            for r in self.db.execute(
                "SELECT name, holder FROM leases WHERE name LIKE ? AND expires < ? ORDER BY name",
                (prefix.replace("%", "") + "%", time.time() - older_than_s),
            )
        ]

    def forget_lease(self, name: str, holder: str) -> bool:
        """Delete a lease still held by ``holder`` and still run out."""
        return (
            self.db.execute(
                "DELETE FROM leases WHERE name=? AND holder=? AND expires < ?", (name, holder, time.time())
            ).rowcount
            == 1
        )

    def lease_holder(self, name: str) -> tuple[str, float, int] | None:
        """``(holder, expires, term)`` of a lease, expired or not."""
        r = self.db.execute("SELECT holder, expires, term FROM leases WHERE name=?", (name,)).fetchone()
        return (r["holder"], r["expires"], int(r["term"])) if r is not None else None


def _token(r: Any) -> TokenRow:
    return TokenRow(
        id=r["id"], name=r["name"], role=r["role"], created=r["created"], revoked=r["revoked"], last_used=r["last_used"]
    )
