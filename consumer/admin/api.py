"""The admin HTTP API under ``/admin/`` (gateway role, ``HERALD_ADMIN_TOKEN``).

Every request needs ``Authorization: Bearer <token>``; a missing or wrong
token is answered 401 and nothing else happens. Without a configured token
neither this API nor the console (:mod:`consumer.admin.console`) is mounted.
Token format, labels and roles: :mod:`consumer.admin.tokens`. A ``viewer``
token may only read (recipients masked): a POST, or ``?reveal=true``, is
answered 403 and written to the audit log as refused.

Routes (JSON in and out):

- ``GET  /admin/status``: consumers per channel, paused channels and why,
  in-flight messages, queue depths, the parking lot's size;
- ``GET  /admin/parked``: list (query: channel, error_type (repeatable or
  comma-separated), error_code, campaign, recipient, since, until, limit,
  offset, newest_first); ``GET /admin/parked/{id}``: show (``?reveal=true``
  unmasks: operators only, audited);
- ``POST /admin/parked/replay``: ``{"ids": [...]}`` or filters
  (``error_types``, ``error_code``, ``channel``, ``campaign``, ``recipient``,
  ``since``, ``until``) or ``{"all": true}``; options ``dry_run``, ``rate``,
  ``reset_attempts`` (default true), ``set_body`` (one id), ``background``
  (queue it as a job and answer 202 with the job at once);
- ``POST /admin/parked/reject``: ``{"ids": [...], "reason": "..."}``;
- ``GET  /admin/jobs``, ``GET /admin/jobs/{id}``, ``POST /admin/jobs/{id}/cancel``:
  background jobs (:mod:`consumer.admin.jobs`), the console's too;
- ``GET  /admin/stats`` (``?campaign=ID``), ``GET /admin/campaigns/{id}`` (with the
  campaign's completion);
- ``GET  /admin/retry-rules`` (``?campaign=ID``): the retry rules in the database and
  the shipped ones (:mod:`consumer.records.retry_rules`);
- ``GET  /admin/escalations``, ``POST /admin/escalations`` (``{"name", "to_channel",
  "to", "window_s", "channel", "error_type", "campaign"}``), ``DELETE
  /admin/escalations/{id}``: who is told about parked messages
  (:mod:`consumer.records.escalations`);
- ``GET  /admin/openapi.json``: the OpenAPI document of these routes
  (:mod:`consumer.admin.openapi`), behind the token like the rest.

Every replay, reject, cancel and reveal is written to ``audit_log`` (when,
what, which token label) *before* it runs, with outcome ``started``; the
outcome and how many messages it touched are filled in after, also when it
fails.
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import structlog
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web

from consumer.admin import audit
from consumer.admin.console import add_console_routes
from consumer.admin.jobs import LotJobs, selection_params
from consumer.admin.openapi import document as openapi_document
from consumer.admin.tokens import AdminToken, authenticate, parse_tokens
from consumer.errors import ConfigError
from consumer.gauges import queue_depths
from consumer.logs import bound
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
from consumer.records import campaigns, escalations, retry_rules
from consumer.records.stats import statistics
from consumer.settings import Settings
from consumer.topology import Names

log = structlog.get_logger("herald.admin")

# The token the request in hand presented (set by the auth middleware).
_caller: contextvars.ContextVar[AdminToken] = contextvars.ContextVar("herald_admin_caller")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Re-exported: the CLI's tests and older callers import them from here.
__all__ = ["AdminApi", "add_admin_routes", "authenticate", "parse_tokens"]


def _problem(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


# The running service's own part of /admin/status (channels, in flight, roles).
StatusSource = Callable[[], dict[str, Any]]


class AdminApi:
    def __init__(self, *, settings: Settings, pool: asyncpg.Pool, names: Names,
                 connection: AbstractRobustConnection, status: StatusSource,
                 tokens: list[AdminToken], jobs: LotJobs | None = None) -> None:
        self.settings = settings
        self.names = names
        self.connection = connection
        self.service_status = status
        self.tokens = tokens
        self.lot = Lot(pool, settings.amqp_url, names)
        self.jobs = jobs or LotJobs(self.lot)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth, self._errors])
        app.router.add_get("/status", self.status)
        app.router.add_get("/parked", self.parked_list)
        app.router.add_post("/parked/replay", self.parked_replay)
        app.router.add_post("/parked/reject", self.parked_reject)
        app.router.add_get("/parked/{id}", self.parked_show)
        app.router.add_get("/jobs", self.jobs_list)
        app.router.add_get("/jobs/{id}", self.job_show)
        app.router.add_post("/jobs/{id}/cancel", self.job_cancel)
        app.router.add_get("/stats", self.stats)
        app.router.add_get("/campaigns/{id}", self.campaign)
        app.router.add_get("/retry-rules", self.retry_rules)
        app.router.add_get("/escalations", self.escalations_list)
        app.router.add_post("/escalations", self.escalation_add)
        app.router.add_delete("/escalations/{id}", self.escalation_remove)
        app.router.add_get("/openapi.json", self.openapi)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        caller = authenticate(request.headers.get("Authorization"), self.tokens)
        if caller is None:
            log.warning("admin.unauthorized", method=request.method, path=request.path,
                        remote=request.remote)
            return web.json_response({"error": "unauthorized"}, status=401,
                                     headers={"WWW-Authenticate": 'Bearer realm="herald"'})
        wants_reveal = request.query.get("reveal") in ("1", "true")
        if not caller.can_act and (request.method != "GET" or wants_reveal):
            log.warning("admin.forbidden", method=request.method, path=request.path,
                        actor=caller.label, role=caller.role)
            await audit.record(self.lot.pool, source="api", actor=caller.label,
                               action="refused", params={"method": request.method,
                                                         "path": request.path[:200],
                                                         "role": caller.role},
                               affected=0, outcome=f"refused: role {caller.role}")
            return _problem(403, f"forbidden: the token {caller.label!r} has role"
                                 f" {caller.role!r}, which may only read")
        token = _caller.set(caller)
        try:
            with bound(admin=caller.label):
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
        except (NotFound, escalations.EscalationNotFound) as exc:
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
                       work: Callable[[], Awaitable[tuple[int, dict[str, Any]]]],
                       *, status: int = 200) -> web.Response:
        """Write the audit row, run the call, then record its outcome, whether it
        worked or not."""
        label = _caller.get().label
        audit_id = await audit.begin(self.lot.pool, source="api", actor=label, action=action,
                                     params=params)
        try:
            affected, answer = await work()
        except Exception as exc:
            await audit.finish(self.lot.pool, audit_id, affected=0, outcome=f"error: {exc}")
            raise
        await audit.finish(self.lot.pool, audit_id, affected=affected)
        log.info("admin.action", action=action, actor=label, affected=affected)
        return web.json_response(answer, status=status)

    # -- reading -------------------------------------------------------------------

    async def openapi(self, _: web.Request) -> web.Response:
        return web.json_response(openapi_document())

    async def status(self, _: web.Request) -> web.Response:
        answer = self.service_status()
        queues = await queue_depths(self.connection, self.names)
        listing = await list_parked(self.lot.pool, Selection(), limit=0)
        paused = {name: ch["paused"] for name, ch in answer["channels"].items() if ch["paused"]}
        return web.json_response(answer | {
            "paused": paused,
            "queues": queues,
            "parked": {"queue": queues.get(self.names.parked, {}).get("messages"),
                       "index": listing.total, "by_error_type": listing.by_error_type},
        })

    async def parked_list(self, request: web.Request) -> web.Response:
        q = request.query
        selection = Selection(
            channel=q.get("channel"),
            error_types=tuple(t for v in q.getall("error_type", []) for t in v.split(",") if t),
            error_code=q.get("error_code") or None, campaign=q.get("campaign"),
            recipient=q.get("recipient"),
            since=_time(q.get("since"), "since"), until=_time(q.get("until"), "until"))
        limit = _int(q.get("limit"), "limit", 50, 1000)
        offset = _int(q.get("offset"), "offset", 0, 10**9)
        listing = await list_parked(self.lot.pool, selection, limit=limit, offset=offset,
                                    newest_first=q.get("newest_first") in ("1", "true"))
        return web.json_response(listing.to_json())

    async def parked_show(self, request: web.Request) -> web.Response:
        (parked_id,) = await resolve_ids(self.lot.pool, [request.match_info["id"]])
        if request.query.get("reveal") in ("1", "true"):  # operators only (see _auth)

            async def work() -> tuple[int, dict[str, Any]]:
                return 1, await show(self.lot.pool, parked_id, reveal=True)

            return await self._audited(request, "parked.reveal",
                                       {"parked_id": str(parked_id)}, work)
        return web.json_response(await show(self.lot.pool, parked_id, reveal=False))

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(await statistics(
            self.lot.pool, self.settings, request.query.get("campaign") or None))

    async def campaign(self, request: web.Request) -> web.Response:
        campaign_id = request.match_info["id"]
        row = await campaigns.get(self.lot.pool, campaign_id)
        figures = await statistics(self.lot.pool, self.settings, campaign_id)
        return web.json_response({"campaign": row, "stats": figures})

    async def retry_rules(self, request: web.Request) -> web.Response:
        return web.json_response(await retry_rules.listing(
            self.lot.pool, campaign_id=request.query.get("campaign") or None,
            builtin=self.settings.retry_rules == "builtin"))

    async def escalations_list(self, _: web.Request) -> web.Response:
        return web.json_response(await escalations.listing(self.lot.pool))

    # -- changing --------------------------------------------------------------------

    async def escalation_add(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        window = body.get("window_s", 300)
        if isinstance(window, bool) or not isinstance(window, int):
            raise LotError("window_s: a whole number of seconds")
        spec = escalations.EscalationSpec(
            name=_opt_str(body, "name") or "", target_channel=_opt_str(body, "to_channel") or "",
            target=_opt_str(body, "to") or "", window_s=window,
            channel=_opt_str(body, "channel"), error_type=_opt_str(body, "error_type"),
            campaign_id=_opt_str(body, "campaign"))
        spec.check()
        label = _caller.get().label

        async def work() -> tuple[int, dict[str, Any]]:
            return 1, await escalations.add(self.lot.pool, spec, label)

        shown = {"name": spec.name, "to_channel": spec.target_channel,
                 "to": escalations.shown_target(spec.target_channel, spec.target),
                 "window_s": spec.window_s, "channel": spec.channel,
                 "error_type": spec.error_type, "campaign": spec.campaign_id}
        return await self._audited(request, "escalation.create", shown, work, status=201)

    async def escalation_remove(self, request: web.Request) -> web.Response:
        ref = request.match_info["id"]

        async def work() -> tuple[int, dict[str, Any]]:
            return 1, await escalations.remove(self.lot.pool, ref)

        return await self._audited(request, "escalation.remove", {"rule": ref[:200]}, work)


    async def parked_replay(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        ids = await resolve_ids(self.lot.pool, _strings(body.get("ids"), "ids"))
        selection = Selection(
            ids=ids, channel=_opt_str(body, "channel"),
            error_types=tuple(_strings(body.get("error_types"), "error_types")),
            error_code=_opt_str(body, "error_code"), campaign=_opt_str(body, "campaign"),
            recipient=_opt_str(body, "recipient"),
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
        label = _caller.get().label
        params = {"selection": selection.describe(), "dry_run": options.dry_run,
                  "rate": options.rate, "reset_attempts": options.reset_attempts,
                  "edited": set_body is not None}
        if body.get("background") is True and not options.dry_run:
            if selection.empty:
                raise LotError("say what to replay: ids, filters, or all")
            return await self._background_replay(selection, options, set_body, params)

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
        label = _caller.get().label

        async def work() -> tuple[int, dict[str, Any]]:
            report = await reject(self.lot, ids, reason, label)
            return report.marked, report.to_json()

        return await self._audited(
            request, "parked.reject", {"ids": [str(i) for i in ids], "reason": reason}, work)

    async def _background_replay(self, selection: Selection, options: ReplayOptions,
                                 set_body: str | None, params: dict[str, Any]) -> web.Response:
        label = _caller.get().label
        if set_body is not None and len(selection.ids) != 1:
            raise LotError("an edit (set_body) applies to exactly one id")
        # What is parked now, not what is parked by the time the job runs.
        now = datetime.now(UTC)
        if selection.until is None or selection.until > now:
            selection = dataclasses.replace(selection, until=now)
        job_params = {"selection": selection_params(selection), "rate": options.rate,
                      "reset_attempts": options.reset_attempts, "set_body": set_body}
        audit_id = await audit.begin(self.lot.pool, source="api", actor=label,
                                     action="parked.replay", params=params | {"job": True})
        job = await self.jobs.submit("replay", job_params, params, label, audit_id)
        return web.json_response(job.to_json(), status=202)

    async def jobs_list(self, _: web.Request) -> web.Response:
        return web.json_response({"jobs": [j.to_json() for j in await self.jobs.recent()]})

    async def job_show(self, request: web.Request) -> web.Response:
        job = await self.jobs.get(_job_id(request))
        if job is None:
            raise NotFound(f"no job {request.match_info['id']}")
        return web.json_response(job.to_json())

    async def job_cancel(self, request: web.Request) -> web.Response:
        job_id = _job_id(request)
        label = _caller.get().label

        async def work() -> tuple[int, dict[str, Any]]:
            job = await self.jobs.request_cancel(job_id, label)
            if job is None:
                raise NotFound(f"no job {job_id}")
            return 1, job.to_json()

        return await self._audited(request, "job.cancel", {"job": job_id}, work)


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


def _job_id(request: web.Request) -> int:
    try:
        return int(request.match_info["id"])
    except ValueError:
        raise NotFound(f"no job {request.match_info['id']!r}") from None


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
    """Mount the admin API at /admin/ and the console at /console/ (the caller
    checked that a token is set), with the runner of their background jobs,
    which starts and stops with ``app``."""
    assert settings.admin_token
    tokens = parse_tokens(settings.admin_token)
    lot = Lot(pool, settings.amqp_url, names)
    jobs = LotJobs(lot)
    api = AdminApi(settings=settings, pool=pool, names=names, connection=connection,
                   status=status, tokens=tokens, jobs=jobs)
    app.add_subapp("/admin/", api.app())
    add_console_routes(app, settings=settings, lot=lot, connection=connection,
                       status=status, tokens=tokens, jobs=jobs)

    async def start_jobs(_: web.Application) -> None:
        await jobs.start()

    async def stop_jobs(_: web.Application) -> None:
        await jobs.stop()

    app.on_startup.append(start_jobs)
    app.on_cleanup.append(stop_jobs)
    log.info("admin.enabled", tokens=[f"{t.label} ({t.role})" for t in tokens])
