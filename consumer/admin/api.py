"""The admin HTTP API under ``/admin/`` (gateway role, ``HERALD_ADMIN_TOKEN``).

Every request needs ``Authorization: Bearer <token>``; a missing or wrong
token is answered 401 and nothing else happens. Without a configured token
the API is not mounted at all.

``HERALD_ADMIN_TOKEN`` holds one token, or several separated by commas, each
optionally labelled ``label:token`` (label: a letter, then letters, digits,
``_ . -``, up to 64). An unlabelled token's label is ``sha256:`` and the first
8 hex digits of its SHA-256. The audit log names the label, never the token.
Tokens are compared as SHA-256 digests with :func:`hmac.compare_digest`, each
configured token every time, so the answer's timing says nothing about them.

Routes (JSON in and out):

- ``GET  /admin/status``: consumers per channel, paused channels and why,
  in-flight messages, queue depths, the parking lot's size;
- ``GET  /admin/parked``: list (query: channel, error_type (repeatable or
  comma-separated), campaign, recipient, since, until, limit, offset,
  newest_first); ``GET /admin/parked/{id}``: show (``?reveal=true`` unmasks);
- ``POST /admin/parked/replay``: ``{"ids": [...]}`` or filters
  (``error_types``, ``channel``, ``campaign``, ``recipient``, ``since``,
  ``until``) or ``{"all": true}``; options ``dry_run``, ``rate``,
  ``reset_attempts`` (default true), ``set_body`` (one id);
- ``POST /admin/parked/reject``: ``{"ids": [...], "reason": "..."}``;
- ``GET  /admin/stats`` (``?campaign=ID``), ``GET /admin/campaigns/{id}``;
- ``GET  /admin/openapi.json``: the OpenAPI document of these routes
  (:mod:`consumer.admin.openapi`), behind the token like the rest.

Replay and reject are written to ``audit_log`` (when, what, which token
label, how many messages), also when they fail.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import structlog
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web

from consumer.admin import audit
from consumer.admin.openapi import document as openapi_document
from consumer.errors import ConfigError
from consumer.parking.lot import (
    Lot,
    LotError,
    NotFound,
    Selection,
    list_parked,
    reject,
    resolve_ids,
    show,
)
from consumer.parking.passes import LotBusy
from consumer.parking.replay import Edit, ReplayOptions, replay
from consumer.records import campaigns
from consumer.records.stats import statistics
from consumer.settings import Settings
from consumer.topology import Names, Topology

log = structlog.get_logger("herald.admin")

_LABEL_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
# The label of the token the request in hand presented (set by the auth middleware).
_caller: contextvars.ContextVar[str] = contextvars.ContextVar("herald_admin_caller")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class AdminToken:
    label: str
    digest: bytes


def parse_tokens(raw: str) -> list[AdminToken]:
    """The tokens of ``HERALD_ADMIN_TOKEN`` (see the module's docstring)."""
    tokens = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        label, sep, secret = item.partition(":")
        if not (sep and _LABEL_RE.fullmatch(label) and secret):
            secret = item
            label = "sha256:" + hashlib.sha256(item.encode()).hexdigest()[:8]
        tokens.append(AdminToken(label, hashlib.sha256(secret.encode()).digest()))
    if not tokens:
        raise ConfigError("HERALD_ADMIN_TOKEN: holds no token")
    if len({t.label for t in tokens}) != len(tokens):
        raise ConfigError("HERALD_ADMIN_TOKEN: two tokens share a label")
    return tokens


def authenticate(header: str | None, tokens: list[AdminToken]) -> str | None:
    """The label of the token a request presents, or None."""
    scheme, _, presented = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return None
    digest = hashlib.sha256(presented.strip().encode()).digest()
    found = None
    for token in tokens:  # every one, whatever matched: constant work per request
        if hmac.compare_digest(digest, token.digest):
            found = token.label
    return found


def _problem(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


# The running service's own part of /admin/status (channels, in flight, roles).
StatusSource = Callable[[], dict[str, Any]]


class AdminApi:
    def __init__(self, *, settings: Settings, pool: asyncpg.Pool, names: Names,
                 connection: AbstractRobustConnection, status: StatusSource,
                 tokens: list[AdminToken]) -> None:
        self.settings = settings
        self.names = names
        self.connection = connection
        self.service_status = status
        self.tokens = tokens
        self.lot = Lot(pool, settings.amqp_url, names)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth, self._errors])
        app.router.add_get("/status", self.status)
        app.router.add_get("/parked", self.parked_list)
        app.router.add_post("/parked/replay", self.parked_replay)
        app.router.add_post("/parked/reject", self.parked_reject)
        app.router.add_get("/parked/{id}", self.parked_show)
        app.router.add_get("/stats", self.stats)
        app.router.add_get("/campaigns/{id}", self.campaign)
        app.router.add_get("/openapi.json", self.openapi)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        label = authenticate(request.headers.get("Authorization"), self.tokens)
        if label is None:
            log.warning("admin.unauthorized", method=request.method, path=request.path,
                        remote=request.remote)
            return web.json_response({"error": "unauthorized"}, status=401,
                                     headers={"WWW-Authenticate": 'Bearer realm="herald"'})
        token = _caller.set(label)
        try:
            with structlog.contextvars.bound_contextvars(admin=label):
                return await handler(request)
        finally:
            _caller.reset(token)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # PostgreSQL cannot store a NUL character in text: refuse it before any query.
        if _holds_nul([*request.query.values(), *request.match_info.values()]):
            return _problem(400, "a parameter holds a NUL character")
        try:
            return await handler(request)
        except NotFound as exc:
            return _problem(404, str(exc))
        except LotBusy as exc:
            return _problem(409, str(exc))
        except (LotError, ConfigError) as exc:
            return _problem(400, str(exc))

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (ValueError, RecursionError):
            raise LotError("the request body is not JSON (or is nested too deeply)") from None
        if not isinstance(body, dict):
            raise LotError("the request body must be a JSON object")
        if _holds_nul(body):
            raise LotError("the request body holds a NUL character")
        return body

    async def _audited(self, request: web.Request, action: str, params: dict[str, Any],
                       work: Callable[[], Awaitable[tuple[int, dict[str, Any]]]]
                       ) -> web.Response:
        """Run a mutating call and write its audit row, whether it worked or not."""
        label = _caller.get()
        try:
            affected, answer = await work()
        except Exception as exc:
            await audit.record(self.lot.pool, source="api", actor=label, action=action,
                               params=params, affected=0, outcome=f"error: {exc}")
            raise
        await audit.record(self.lot.pool, source="api", actor=label, action=action,
                           params=params, affected=affected)
        log.info("admin.action", action=action, actor=label, affected=affected)
        return web.json_response(answer)

    # -- reading -------------------------------------------------------------------

    async def openapi(self, _: web.Request) -> web.Response:
        return web.json_response(openapi_document())

    async def status(self, _: web.Request) -> web.Response:
        answer = self.service_status()
        queues = await self._queue_depths()
        listing = await list_parked(self.lot.pool, Selection(), limit=0)
        paused = {name: ch["paused"] for name, ch in answer["channels"].items() if ch["paused"]}
        return web.json_response(answer | {
            "paused": paused,
            "queues": queues,
            "parked": {"queue": queues.get(self.names.parked, {}).get("messages"),
                       "index": listing.total, "by_error_type": listing.by_error_type},
        })

    async def _queue_depths(self) -> dict[str, dict[str, int]]:
        found: dict[str, dict[str, int]] = {}
        channel = await self.connection.channel()
        try:
            # The underlying channel: a robust channel would answer from its cache.
            underlay = await channel.get_underlay_channel()
            for queue in Topology(self.names).queues:
                result = await underlay.queue_declare(queue["name"], passive=True, timeout=10)
                found[queue["name"]] = {"messages": int(result.message_count or 0),
                                        "consumers": int(result.consumer_count or 0)}
        finally:
            await channel.close()
        return found

    async def parked_list(self, request: web.Request) -> web.Response:
        q = request.query
        selection = Selection(
            channel=q.get("channel"),
            error_types=tuple(t for v in q.getall("error_type", []) for t in v.split(",") if t),
            campaign=q.get("campaign"), recipient=q.get("recipient"),
            since=_time(q.get("since"), "since"), until=_time(q.get("until"), "until"))
        limit = _int(q.get("limit"), "limit", 50, 1000)
        offset = _int(q.get("offset"), "offset", 0, 10**9)
        listing = await list_parked(self.lot.pool, selection, limit=limit, offset=offset,
                                    newest_first=q.get("newest_first") in ("1", "true"))
        return web.json_response(listing.to_json())

    async def parked_show(self, request: web.Request) -> web.Response:
        (parked_id,) = await resolve_ids(self.lot.pool, [request.match_info["id"]])
        reveal = request.query.get("reveal") in ("1", "true")
        return web.json_response(await show(self.lot.pool, parked_id, reveal=reveal))

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(await statistics(
            self.lot.pool, self.settings, request.query.get("campaign") or None))

    async def campaign(self, request: web.Request) -> web.Response:
        campaign_id = request.match_info["id"]
        row = await campaigns.get(self.lot.pool, campaign_id)
        figures = await statistics(self.lot.pool, self.settings, campaign_id)
        return web.json_response({"campaign": row, "stats": figures})

    # -- changing --------------------------------------------------------------------

    async def parked_replay(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        ids = await resolve_ids(self.lot.pool, _strings(body.get("ids"), "ids"))
        selection = Selection(
            ids=ids, channel=_opt_str(body, "channel"),
            error_types=tuple(_strings(body.get("error_types"), "error_types")),
            campaign=_opt_str(body, "campaign"), recipient=_opt_str(body, "recipient"),
            since=_time(_opt_str(body, "since"), "since"),
            until=_time(_opt_str(body, "until"), "until"), all=body.get("all") is True)
        rate = body.get("rate")
        if rate is not None and (not isinstance(rate, int | float) or rate <= 0):
            raise LotError("rate: a positive number of messages per second")
        set_body = _opt_str(body, "set_body")
        options = ReplayOptions(
            selection, dry_run=body.get("dry_run") is True,
            rate=float(rate) if rate is not None else None,
            reset_attempts=body.get("reset_attempts") is not False,
            edit=Edit(body=set_body) if set_body is not None else None)
        label = _caller.get()
        params = {"selection": selection.describe(), "dry_run": options.dry_run,
                  "rate": options.rate, "reset_attempts": options.reset_attempts,
                  "edited": set_body is not None}

        async def work() -> tuple[int, dict[str, Any]]:
            report = await replay(self.lot, options, label)
            return report.replayed, report.to_json()

        if options.dry_run:
            return web.json_response((await work())[1])
        return await self._audited(request, "parked.replay", params, work)

    async def parked_reject(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        ids = await resolve_ids(self.lot.pool, _strings(body.get("ids"), "ids"))
        if not ids:
            raise LotError("ids: name at least one parked message")
        reason = _opt_str(body, "reason") or ""
        label = _caller.get()

        async def work() -> tuple[int, dict[str, Any]]:
            report = await reject(self.lot, ids, reason, label)
            return report.marked, report.to_json()

        return await self._audited(
            request, "parked.reject", {"ids": [str(i) for i in ids], "reason": reason}, work)


def _holds_nul(value: Any) -> bool:
    """Whether a NUL character is in any string of a parsed JSON value (keys too)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _strings(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise LotError(f"{name}: a list of strings")
    return list(value)


def _opt_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise LotError(f"{name}: a string")
    return value


def _time(value: str | None, name: str) -> datetime | None:
    if not value:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise LotError(f"{name}: an ISO-8601 time with a zone") from None
    if when.tzinfo is None:
        raise LotError(f"{name}: an ISO-8601 time with a zone")
    return when


def _int(value: str | None, name: str, default: int, high: int) -> int:
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise LotError(f"{name}: a whole number") from None
    if not 0 <= number <= high:
        raise LotError(f"{name}: between 0 and {high}")
    return number


def add_admin_routes(app: web.Application, *, settings: Settings, pool: asyncpg.Pool,
                     names: Names, connection: AbstractRobustConnection,
                     status: StatusSource) -> None:
    """Mount the admin API at /admin/ (the caller checked that a token is set)."""
    assert settings.admin_token
    tokens = parse_tokens(settings.admin_token)
    api = AdminApi(settings=settings, pool=pool, names=names, connection=connection,
                   status=status, tokens=tokens)
    app.add_subapp("/admin/", api.app())
    log.info("admin.enabled", tokens=[t.label for t in tokens])
