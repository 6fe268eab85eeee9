"""Console sign-in: server-side sessions in PostgreSQL, cookies, CSRF tokens.

Why server-side sessions rather than signed cookies: signing needs a key
shared by every gateway replica (one more secret to configure and rotate),
and a signed cookie stays valid until it expires whatever happens. A row in
``console_sessions`` ends when the person signs out, when it expires, and
when the admin token that opened it is removed from (or changed in)
``HERALD_ADMIN_TOKEN``; every replica sees the same rows. The price is one
indexed lookup per page, next to the queries the page makes anyway.

- The cookie holds 32 random bytes; the table only their SHA-256.
- It is ``HttpOnly``, ``SameSite=Strict``, scoped to ``/console/``, and
  ``Secure`` (named ``__Secure-herald_console``) when ``HERALD_PUBLIC_URL``
  is https.
- A session lasts :data:`SESSION_TTL` at most, and ends after
  :data:`IDLE_TIMEOUT` without a request.
- Every form carries the session's CSRF token (the sign-in form a token of
  its own, double-submitted in a short-lived cookie); a POST without the
  right one is refused before anything runs.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg
from aiohttp import web

from consumer.admin.tokens import OPERATOR, AdminToken

SESSION_TTL = timedelta(hours=8)
IDLE_TIMEOUT = timedelta(hours=1)
LOGIN_TTL = timedelta(minutes=30)
# seen_at is written at most this often (not on every request).
_TOUCH_EVERY = timedelta(minutes=1)
PATH = "/console/"


@dataclass(frozen=True)
class Session:
    """Who is signed in, with what role, and the CSRF token of their forms."""

    label: str
    role: str
    csrf: str
    expires_at: datetime

    @property
    def can_act(self) -> bool:
        return self.role == OPERATOR


def _hash(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


def same_secret(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a presented token with the expected one."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


class Sessions:
    """The console's sessions (see the module's docstring)."""

    def __init__(self, pool: asyncpg.Pool, tokens: list[AdminToken], *, secure: bool,
                 ttl: timedelta = SESSION_TTL, idle: timedelta = IDLE_TIMEOUT) -> None:
        self.pool = pool
        self.tokens = {t.label: t for t in tokens}
        self.secure = secure
        self.ttl = ttl
        self.idle = idle

    @property
    def cookie(self) -> str:
        return "__Secure-herald_console" if self.secure else "herald_console"

    @property
    def login_cookie(self) -> str:
        return "__Secure-herald_login" if self.secure else "herald_login"

    async def open(self, token: AdminToken, remote: str | None) -> tuple[str, Session]:
        """A new session for ``token``: (cookie value, session)."""
        value = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        async with self.pool.acquire() as conn:
            await conn.execute("DELETE FROM console_sessions WHERE expires_at < now()")
            expires = await conn.fetchval(
                """INSERT INTO console_sessions (session_hash, label, role, token_fingerprint,
                       csrf, expires_at, remote)
                   VALUES ($1, $2, $3, $4, $5, now() + $6::interval, $7)
                   RETURNING expires_at""",
                _hash(value), token.label, token.role, token.fingerprint, csrf, self.ttl,
                (remote or "")[:100])
        return value, Session(token.label, token.role, csrf, expires)

    async def find(self, value: str | None) -> Session | None:
        """The live session a cookie names, or None (unknown, expired, idle too
        long, or its token is no longer configured as it was)."""
        if not value or len(value) > 100:
            return None
        row = await self.pool.fetchrow(
            """SELECT label, role, token_fingerprint, csrf, expires_at,
                      seen_at < now() - $2::interval AS stale,
                      seen_at < now() - $3::interval AS touch
                 FROM console_sessions
                WHERE session_hash = $1 AND expires_at > now()""",
            _hash(value), self.idle, _TOUCH_EVERY)
        if row is None or row["stale"]:
            return None
        token = self.tokens.get(row["label"])
        if token is None or token.role != row["role"] or not hmac.compare_digest(
                token.fingerprint, bytes(row["token_fingerprint"])):
            return None
        if row["touch"]:
            await self.pool.execute(
                "UPDATE console_sessions SET seen_at = now() WHERE session_hash = $1",
                _hash(value))
        return Session(row["label"], row["role"], row["csrf"], row["expires_at"])

    async def close(self, value: str | None) -> None:
        if value:
            await self.pool.execute("DELETE FROM console_sessions WHERE session_hash = $1",
                                    _hash(value))

    def set_cookie(self, response: web.StreamResponse, value: str) -> None:
        response.set_cookie(self.cookie, value, path=PATH, httponly=True, samesite="Strict",
                            secure=self.secure, max_age=int(self.ttl.total_seconds()))

    def clear_cookie(self, response: web.StreamResponse) -> None:
        response.del_cookie(self.cookie, path=PATH)

    def login_token(self, response: web.StreamResponse) -> str:
        """A fresh CSRF token for the sign-in form, double-submitted in a cookie."""
        value = secrets.token_urlsafe(24)
        response.set_cookie(self.login_cookie, value, path=PATH, httponly=True,
                            samesite="Strict", secure=self.secure,
                            max_age=int(LOGIN_TTL.total_seconds()))
        return value
