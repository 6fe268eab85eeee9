"""The console's routes: pages rendered on the server from Jinja2 templates.

Reading works without JavaScript; the little there is (``static/console.js``)
polls a job's progress, selects every row, and asks before destructive
buttons. Every page is one round of queries on the indexes the CLI uses
(:mod:`consumer.parking.lot`, :mod:`consumer.records`); anything that takes
copies out of the parking queue runs as a background job
(:mod:`consumer.admin.jobs`), never inside the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import json
import math
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
import structlog
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web

from consumer.admin import audit
from consumer.admin.console.sessions import PATH, Session, Sessions, same_secret
from consumer.admin.jobs import LotJobs, selection_params
from consumer.admin.tokens import AdminToken, find_token
from consumer.errors import ConfigError, ErrorType
from consumer.gauges import backlog_ages, queue_depths
from consumer.logs import bound, mask_recipient, mask_tree
from consumer.parking.lot import (
    Lot,
    LotError,
    NotFound,
    Selection,
    count_parked,
    count_parked_codes,
    list_parked,
    parked_totals,
    resolve_ids,
    show,
)
from consumer.parking.passes import LotBusy
from consumer.parking.replay import Edit, ReplayOptions, edited_body, replay
from consumer.records import campaigns, escalations
from consumer.records.completion import completion_of, completions
from consumer.records.history import load_status
from consumer.records.stats import campaign_overview, recent_flow, statistics
from consumer.settings import Settings
from schemas import SendRequest
from schemas.parking import PARKED_CHANNELS
from schemas.send_request import CHANNELS

log = structlog.get_logger("herald.console")

PAGE_SIZE = 50
MAX_OFFSET = 1_000_000
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
StatusSource = Callable[[], dict[str, Any]]
_STATIC = {"console.css": "text/css", "console.js": "text/javascript"}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# The signed-in session of the request in hand (set by the guard middleware).
SESSION = web.RequestKey("herald_console_session", Session)
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class Refused(Exception):
    """A request the console answers with an error page (status, one line)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# -- small parsers (every byte from the browser is hostile) ------------------------------


def duration(text: str, name: str) -> timedelta:
    """``90m``, ``12h``, ``30d`` → a timedelta (LotError otherwise)."""
    match = _DURATION_RE.match(text or "")
    if not match:
        raise LotError(f"{name}: a duration such as 30m, 12h or 7d")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def moment(text: str | None, name: str, now: datetime) -> datetime | None:
    """A time from a filter: empty, a duration ago (``2h``), or an ISO time (UTC
    when it has no zone, as ``<input type=datetime-local>`` sends it)."""
    text = (text or "").strip()
    if not text:
        return None
    if _DURATION_RE.match(text):
        return now - duration(text, name)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise LotError(f"{name}: a time (2026-11-20T10:00, UTC) or an age (2h, 7d)") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _opt(value: str | None, limit: int = 200) -> str | None:
    value = (value or "").strip()
    if len(value) > limit:
        raise LotError(f"a filter value longer than {limit} characters")
    return value or None


def selection_from_form(data: Any, now: datetime) -> tuple[Selection, dict[str, str]]:
    """The filters of the parking lot page (query or form) as a selection, and
    as they were given (to put back into links and forms)."""
    given = {k: (data.get(k) or "").strip()[:200] for k in
             ("channel", "error_type", "error_code", "campaign", "recipient", "since", "until")}
    channel = _opt(given["channel"])
    if channel is not None and channel not in PARKED_CHANNELS:
        raise LotError(f"channel: one of {', '.join(PARKED_CHANNELS)}")
    error_types = tuple(t for t in (_opt(given["error_type"]) or "").split(",") if t)
    if any(t not in ErrorType.__members__.values() for t in error_types):
        raise LotError("error type: one of " + ", ".join(e.value for e in ErrorType))
    selection = Selection(
        channel=channel, error_types=error_types, error_code=_opt(given["error_code"]),
        campaign=_opt(given["campaign"]), recipient=_opt(given["recipient"]),
        since=moment(given["since"], "since", now), until=moment(given["until"], "until", now))
    return selection, {k: v for k, v in given.items() if v}


def _ids(data: Any) -> list[str]:
    values = [v.strip() for v in data.getall("id", []) if v.strip()]
    if len(values) > 1000:
        raise LotError("select at most 1000 rows (or use “everything matching”)")
    return values


def _rate(text: str | None) -> float | None:
    text = (text or "").strip()
    if not text:
        return None
    try:
        rate = float(text)
    except ValueError:
        raise LotError("rate: messages per second, a number") from None
    if not 0 < rate <= 100_000:
        raise LotError("rate: between 0 and 100000 messages per second (empty: no limit)")
    return rate


def _safe_next(value: str | None) -> str:
    """Where to go after signing in: a console page, nothing else."""
    if value and value.startswith(PATH) and not value.startswith("//") and "\\" not in value:
        return value
    return PATH


# -- presentation helpers (template filters) ---------------------------------------------


def _as_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    return None


def fmt_time(value: Any) -> str:
    when = _as_time(value)
    if when is None:
        return "—" if not value else str(value)
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt_ago(value: Any) -> str:
    when = _as_time(value)
    if when is None:
        return ""
    seconds = (datetime.now(UTC) - when).total_seconds()
    return fmt_age(seconds) + (" ago" if seconds >= 0 else " ahead")


def fmt_age(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}" if size != 86400 else f"{seconds / size:.1f} d"
    return f"{seconds:.0f} s"


def fmt_share(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


def fmt_num(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.2f}"
    return f"{int(value):,}"


def pretty(value: Any) -> str:
    """A body or headers as people read them: JSON indented, text as is."""
    if isinstance(value, str):
        return value
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False, default=str)


def describe(value: Any) -> str:
    """A job's summary or a selection as one readable line."""
    if isinstance(value, dict):
        return "; ".join(f"{k.replace('_', ' ')}: {describe(v)}" for k, v in value.items()
                         if v not in (None, [], {}, ""))
    if isinstance(value, list | tuple):
        return ", ".join(describe(v) for v in value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str) and len(value) > 19 and value[4:5] == "-" and value[10:11] == "T":
        return fmt_time(value)
    return str(value)


def body_text(body: Any, channel: str) -> str:
    """What the edit box shows for a request's ``body`` (the form sends it back)."""
    if isinstance(body, str) and channel != "http":
        return body
    return json.dumps(body, indent=2, ensure_ascii=False)


def line_diff(before: str, after: str) -> list[tuple[str, str]]:
    """(kind, line) pairs of a line diff: kind is ``same``, ``del`` or ``add``."""
    found = []
    for line in difflib.ndiff(before.splitlines(), after.splitlines()):
        tag, text = line[:2], line[2:]
        if tag == "? ":
            continue
        found.append(({"- ": "del", "+ ": "add"}.get(tag, "same"), text))
    return found


def query(given: dict[str, str], **changes: Any) -> str:
    """The parking lot's query string with some filters changed (None drops one)."""
    merged: dict[str, Any] = {**given}
    for key, value in changes.items():
        if value is None or value == "":
            merged.pop(key, None)
        else:
            merged[key] = value
    return urlencode(merged)


# -- the console -------------------------------------------------------------------------


class Console:
    def __init__(self, *, settings: Settings, lot: Lot, connection: AbstractRobustConnection,
                 status: StatusSource, tokens: list[AdminToken], jobs: LotJobs) -> None:
        self.settings = settings
        self.lot = lot
        self.pool = lot.pool
        self.connection = connection
        self.service_status = status
        self.tokens = tokens
        self.jobs = jobs
        self.sessions = Sessions(lot.pool, tokens,
                                 secure=settings.public_url.startswith("https://"))
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("consumer.admin.console", "templates"),
            autoescape=True, trim_blocks=True,
            lstrip_blocks=True)
        self.env.filters.update(time=fmt_time, ago=fmt_ago, age=fmt_age, share=fmt_share,
                                num=fmt_num, pretty=pretty, mask=mask_recipient,
                                describe=describe)
        self.env.globals.update(base=PATH.rstrip("/"), query=query, quote=quote)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard, self._errors],
                              client_max_size=256 * 1024)
        r = app.router
        r.add_get("/", self.overview)
        r.add_get("/login", self.login_form)
        r.add_post("/login", self.login)
        r.add_post("/logout", self.logout)
        r.add_get("/static/{name}", self.static)
        r.add_get("/find", self.find)
        r.add_get("/parked", self.parked)
        r.add_post("/parked/preview", self.preview)
        r.add_post("/parked/reject", self.reject_preview)
        r.add_post("/parked/purge", self.purge_preview)
        r.add_get(r"/parked/{id}", self.message)
        r.add_post(r"/parked/{id}/reveal", self.reveal)
        r.add_post(r"/parked/{id}/edit", self.edit_preview)
        r.add_get(r"/messages/{message_id}", self.message_status)
        r.add_get("/jobs", self.jobs_page)
        r.add_post("/jobs", self.job_create)
        r.add_get(r"/jobs/{id:\d+}", self.job_page)
        r.add_get(r"/jobs/{id:\d+}.json", self.job_json)
        r.add_post(r"/jobs/{id:\d+}/cancel", self.job_cancel)
        r.add_post(r"/jobs/{id:\d+}/rerun", self.job_rerun)
        r.add_get("/campaigns", self.campaigns_page)
        r.add_get(r"/campaigns/{id}", self.campaign_page)
        r.add_post(r"/campaigns/{id}/targets", self.campaign_targets)
        r.add_get("/escalations", self.escalations_page)
        r.add_post("/escalations", self.escalation_add)
        r.add_post(r"/escalations/{id}/remove", self.escalation_remove)
        return app

    # -- plumbing ------------------------------------------------------------------------

    def render(self, request: web.Request, template: str, *, status: int = 200,
               **context: Any) -> web.Response:
        session: Session | None = request.get(SESSION)
        html = self.env.get_template(template).render(
            session=session, csrf=session.csrf if session else "", path=request.path,
            **context)
        return web.Response(text=html, content_type="text/html", status=status)

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Security headers on every answer; a live session for every page but the
        sign-in form and static files; the session's CSRF token on every POST."""
        response = await self._guarded(request, handler)
        for name, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    async def _guarded(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        open_route = request.path == f"{PATH}login" or request.path.startswith(
            f"{PATH}static/")
        if request.method == "POST" and not self._same_origin(request):
            log.warning("console.cross_origin", path=request.path,
                        origin=request.headers.get("Origin", "")[:100])
            return self._refusal(request, 403, "refused: this form was not sent by the console")
        if open_route:
            return await handler(request)
        session = await self.sessions.find(request.cookies.get(self.sessions.cookie))
        if session is None:
            if request.method == "GET" and not request.path.endswith(".json"):
                target = request.path_qs if request.path != PATH else PATH
                raise web.HTTPSeeOther(f"{PATH}login?next={quote(target)}")
            return self._refusal(request, 401, "sign in first (the session ended)")
        request[SESSION] = session
        if request.method == "POST":
            form = await request.post()
            given = form.get("csrf")
            if not same_secret(given if isinstance(given, str) else None, session.csrf):
                log.warning("console.csrf_refused", path=request.path, actor=session.label)
                return self._refusal(request, 403, "refused: the form's CSRF token is missing"
                                     " or wrong (reload the page and try again)")
        with bound(console=session.label):
            return await handler(request)

    def _same_origin(self, request: web.Request) -> bool:
        # SameSite=Strict already keeps the cookie off cross-site POSTs; an Origin
        # header that names another site is refused as well.
        origin = request.headers.get("Origin")
        if origin is None or origin == "null":
            return origin is None
        return origin.split("://", 1)[-1] == request.host

    def _refusal(self, request: web.Request, status: int, message: str) -> web.Response:
        return self.render(request, "error.html", status=status, message=message)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except Refused as exc:
            return self._refusal(request, exc.status, str(exc))
        except NotFound as exc:
            return self._refusal(request, 404, str(exc))
        except LotBusy as exc:
            return self._refusal(request, 409, str(exc))
        except (LotError, ConfigError) as exc:
            return self._refusal(request, 400, str(exc))

    def _operator(self, request: web.Request) -> Session:
        session: Session = request[SESSION]
        if not session.can_act:
            log.warning("console.forbidden", path=request.path, actor=session.label)
            raise Refused(403, f"forbidden: {session.label} signed in as {session.role},"
                               " which may only read")
        return session

    async def _form(self, request: web.Request) -> Any:
        return await request.post()

    # -- sign-in -------------------------------------------------------------------------

    async def login_form(self, request: web.Request, *, error: str | None = None,
                         status: int = 200) -> web.Response:
        session = await self.sessions.find(request.cookies.get(self.sessions.cookie))
        target = _safe_next(request.query.get("next"))
        if session is not None and error is None:
            raise web.HTTPSeeOther(target)
        token = secrets.token_urlsafe(24)
        response = self.render(request, "login.html", status=status, login_csrf=token,
                               next=target, error=error)
        response.set_cookie(self.sessions.login_cookie, token, path=PATH, httponly=True,
                            samesite="Strict", secure=self.sessions.secure, max_age=1800)
        return response

    async def login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        given, expected = form.get("csrf"), request.cookies.get(self.sessions.login_cookie)
        if not (isinstance(given, str) and expected and same_secret(given, expected)):
            log.warning("console.csrf_refused", path=request.path)
            return await self.login_form(
                request, status=403,
                error="The sign-in form expired or was not sent by the console: try again.")
        presented = form.get("token")
        token = find_token(presented.strip(), self.tokens) if isinstance(presented, str) else None
        if token is None:
            log.warning("console.sign_in_failed", remote=request.remote)
            # Slows guessing down; tokens are long enough that this is all it needs.
            await asyncio.sleep(0.3)
            return await self.login_form(request, status=401, error="That token is not valid.")
        value, _ = await self.sessions.open(token, request.remote)
        await audit.record(self.pool, source="console", actor=token.label,
                           action="console.sign_in", params={"role": token.role}, affected=0)
        log.info("console.signed_in", actor=token.label, role=token.role)
        next_page = form.get("next")
        response = web.HTTPSeeOther(_safe_next(next_page if isinstance(next_page, str)
                                               else None))
        self.sessions.set_cookie(response, value)
        response.del_cookie(self.sessions.login_cookie, path=PATH)
        raise response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        await self.sessions.close(request.cookies.get(self.sessions.cookie))
        response = web.HTTPSeeOther(f"{PATH}login")
        self.sessions.clear_cookie(response)
        raise response

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in _STATIC:
            raise web.HTTPNotFound()
        data = (resources.files("consumer.admin.console") / "static" / name).read_bytes()
        return web.Response(body=data, content_type=_STATIC[name],
                            headers={"Cache-Control": "public, max-age=300"})

    # -- overview ------------------------------------------------------------------------

    async def overview(self, request: web.Request) -> web.Response:
        snapshot = self.service_status()
        try:
            queues: dict[str, dict[str, int]] | None = await asyncio.wait_for(
                queue_depths(self.connection, self.lot.names), 5)
        except Exception as exc:
            log.warning("console.queues_unavailable", error=repr(exc)[:200])
            queues = None
        flow = await recent_flow(self.pool)
        ages = await backlog_ages(self.pool)
        async with self.pool.acquire() as conn:
            parked_by_channel = await parked_totals(conn, "channel")
            parked_by_type = await parked_totals(conn, "error_type")
        oldest = await list_parked(self.pool, Selection(), limit=1)
        names = self.lot.names
        channels = []
        for channel in sorted(set(CHANNELS) | set(flow) | set(parked_by_channel)):
            state = snapshot.get("channels", {}).get(channel)
            lanes = [q for q in (queues or {}) if q == names.send_queue(channel)
                     or q.startswith(names.send_queue(channel) + ".")]
            channels.append({
                "name": channel, "state": state,
                "flow": flow.get(channel, {"sent": 0, "retrying": 0, "parked": 0}),
                "parked": parked_by_channel.get(channel, 0),
                "oldest_due_s": ages.get(channel),
                "queues": [(q, (queues or {})[q]) for q in sorted(lanes)],
            })
        delay = sum(v["messages"] for q, v in (queues or {}).items()
                    if q.startswith(f"{names.prefix}.delay."))
        active_jobs = [j for j in await self.jobs.recent(limit=5) if j.active]
        return self.render(request, "overview.html", snapshot=snapshot, channels=channels,
                           queues=queues, delayed=delay, parked_by_type=parked_by_type,
                           oldest=oldest.rows[0] if oldest.rows else None,
                           parked_total=oldest.total, parked_queue=(queues or {}).get(
                               names.parked, {}).get("messages"), jobs=active_jobs)

    async def find(self, request: web.Request) -> web.StreamResponse:
        text = (request.query.get("q") or "").strip()[:200]
        if not text:
            raise web.HTTPSeeOther(PATH)
        try:
            (parked_id,) = await resolve_ids(self.pool, [text])
        except LotError:
            raise web.HTTPSeeOther(f"{PATH}messages/{quote(text, safe='')}") from None
        raise web.HTTPSeeOther(f"{PATH}parked/{parked_id}")

    # -- the parking lot -----------------------------------------------------------------

    async def parked(self, request: web.Request) -> web.Response:
        now = datetime.now(UTC)
        selection, given = selection_from_form(request.query, now)
        try:
            page = max(0, int(request.query.get("page", "0") or 0))
        except ValueError:
            raise LotError("page: a whole number") from None
        if page * PAGE_SIZE > MAX_OFFSET:
            raise LotError("page: too far; narrow the filters instead")
        newest = request.query.get("order") == "newest"
        listing = await list_parked(self.pool, selection, limit=PAGE_SIZE,
                                    offset=page * PAGE_SIZE, newest_first=newest)
        # Badges count what the other filters select, whatever the error type and code.
        async with self.pool.acquire() as conn:
            badges = (listing.by_error_code if not (selection.error_types
                                                    or selection.error_code)
                      else await count_parked_codes(
                          conn, replace(selection, error_types=(), error_code=None)))
            campaigns_parked = await parked_totals(conn, "campaign_id")
        if newest:
            given["order"] = "newest"
        return self.render(
            request, "parked.html", listing=listing, given=given, page=page,
            page_size=PAGE_SIZE, badges=badges,
            badge_totals={t: sum(c.values()) for t, c in badges.items()},
            channels=PARKED_CHANNELS, error_types=[e.value for e in ErrorType],
            campaign_ids=[c for c in campaigns_parked if c][:200],
            described=selection.describe(), now=now)

    async def preview(self, request: web.Request) -> web.Response:
        """A dry run of the replay the operator asked for, and the form that starts it."""
        session = self._operator(request)
        form = await self._form(request)
        now = datetime.now(UTC)
        selection, given = selection_from_form(form, now)
        scope = form.get("scope")
        if scope == "selected":
            ids = await resolve_ids(self.pool, _ids(form))
            if not ids:
                raise LotError("select at least one row, or replay everything matching")
            selection = Selection(ids=ids)
        elif selection.empty:
            selection = Selection(all=True)
        # What is parked now: copies parked after this preview are not part of it.
        if selection.until is None or selection.until > now:
            selection = replace(selection, until=now)
        report = await replay(self.lot, ReplayOptions(selection, dry_run=True), session.label)
        items = [i | {"id_short": i["id"][:8]} for i in report.items[:20]]
        return self.render(request, "preview.html", report=report, items=items,
                           selection=selection, described=selection.describe(),
                           fields=_selection_fields(selection), given=given)

    async def reject_preview(self, request: web.Request) -> web.Response:
        self._operator(request)
        form = await self._form(request)
        ids = await resolve_ids(self.pool, _ids(form))
        if not ids:
            raise LotError("select the rows to reject")
        reason = (form.get("reason") or "").strip()
        if not reason:
            raise LotError("a reason is required to reject messages")
        listing = await list_parked(self.pool, Selection(ids=ids), limit=len(ids))
        return self.render(request, "reject.html", rows=listing.rows, reason=reason[:500],
                           ids=[str(i) for i in ids])

    async def purge_preview(self, request: web.Request) -> web.Response:
        self._operator(request)
        form = await self._form(request)
        older = duration(form.get("older_than") or "", "older than")
        cutoff = datetime.now(UTC) - older
        async with self.pool.acquire() as conn:
            counts = await count_parked(conn, Selection(until=cutoff))
        return self.render(request, "purge.html", older_than=form.get("older_than"),
                           seconds=older.total_seconds(), cutoff=cutoff, counts=counts,
                           total=sum(counts.values()))

    # -- one message ---------------------------------------------------------------------

    async def message(self, request: web.Request, *, reveal: bool = False,
                      edit: dict[str, Any] | None = None) -> web.Response:
        (parked_id,) = await resolve_ids(self.pool, [request.match_info["id"]])
        doc = await show(self.pool, parked_id, reveal=reveal)
        edit_text = None
        if request[SESSION].can_act and doc["parked"]["state"] == "parked":
            # The edit box starts from the request as it would be replayed, unmasked:
            # a masked value sent back would replace the real one.
            raw = await self.pool.fetchval(
                "SELECT COALESCE(replay_body, body) FROM parked_messages WHERE parked_id = $1",
                parked_id)
            with contextlib.suppress(ValueError, UnicodeDecodeError, RecursionError):
                current = json.loads(bytes(raw))
                if isinstance(current, dict) and "body" in current:
                    edit_text = body_text(current["body"], doc["parked"]["channel"])
        return self.render(
            request, "message.html", doc=doc, parked=doc["parked"], revealed=reveal,
            editable=edit_text is not None, edit_text=edit_text or "", edit=edit,
            history=doc["history"])

    async def reveal(self, request: web.Request) -> web.Response:
        session = self._operator(request)
        parked_id = request.match_info["id"][:64]
        audit_id = await audit.begin(self.pool, source="console", actor=session.label,
                                     action="parked.reveal", params={"parked_id": parked_id})
        try:
            response = await self.message(request, reveal=True)
        except Exception as exc:
            await audit.finish(self.pool, audit_id, affected=0, outcome=f"error: {exc}")
            raise
        await audit.finish(self.pool, audit_id, affected=1)
        return response

    async def edit_preview(self, request: web.Request) -> web.Response:
        """The change an edit makes (before and after), and the form that replays it."""
        self._operator(request)
        form = await self._form(request)
        text = form.get("body")
        if not isinstance(text, str) or len(text) > 200_000:
            raise LotError("body: the new body, as text (at most 200000 characters)")
        (parked_id,) = await resolve_ids(self.pool, [request.match_info["id"]])
        row = await self.pool.fetchrow(
            "SELECT channel, body, replay_body, state FROM parked_messages WHERE parked_id = $1",
            parked_id)
        if row is None:
            raise NotFound(f"no parked message with id {parked_id}")
        if row["state"] != "parked":
            raise LotError(f"{parked_id} is not parked (state {row['state']})")
        before_bytes = bytes(row["replay_body"] or row["body"])
        after_bytes = edited_body(Edit(body=text), before_bytes, row["channel"])
        try:
            # Through the model as the edit went, so that only real changes show.
            shown: Any = SendRequest.model_validate_json(before_bytes).model_dump(
                mode="json", exclude_none=True)
        except ValueError:
            shown = json.loads(before_bytes)
        before = pretty(shown)
        after = pretty(json.loads(after_bytes))
        return self.render(request, "edit.html", parked_id=str(parked_id), text=text,
                           before=before, after=after, diff=line_diff(before, after),
                           changed=before != after)

    async def message_status(self, request: web.Request) -> web.Response:
        message_id = request.match_info["message_id"][:200]
        async with self.pool.acquire() as conn:
            status = await load_status(conn, message_id)
        if status is None:
            raise NotFound(f"Herald knows no message {message_id!r}")
        doc = status.to_json(reveal=False)
        return self.render(request, "status.html", doc=doc, message_id=message_id)

    # -- jobs ----------------------------------------------------------------------------

    async def job_create(self, request: web.Request) -> web.StreamResponse:
        session = self._operator(request)
        form = await self._form(request)
        kind = form.get("kind")
        now = datetime.now(UTC)
        if kind == "replay":
            ids = await resolve_ids(self.pool, _ids(form))
            if ids:
                selection = Selection(ids=ids, until=moment(form.get("until"), "until", now))
            else:
                selection, _ = selection_from_form(form, now)
                if form.get("all") == "1":
                    selection = replace(selection, all=True)
            if selection.empty or selection == Selection(until=selection.until):
                raise LotError("say what to replay: rows, filters, or everything")
            set_body = form.get("set_body")
            set_body = set_body if isinstance(set_body, str) and form.get("edit") == "1" else None
            if set_body is not None and len(selection.ids) != 1:
                raise LotError("an edit applies to exactly one message")
            rate = _rate(form.get("rate"))
            reset = form.get("reset_attempts") == "1"
            params = {"selection": selection_params(selection), "rate": rate,
                      "reset_attempts": reset, "set_body": set_body}
            summary = {"selection": selection.describe(), "rate": rate,
                       "reset_attempts": reset, "edited": set_body is not None}
            action = "parked.replay"
        elif kind == "reject":
            ids = await resolve_ids(self.pool, _ids(form))
            reason = (form.get("reason") or "").strip()[:500]
            if not ids or not reason:
                raise LotError("reject: select rows and give a reason")
            params = {"ids": [str(i) for i in ids], "reason": reason}
            summary = {"ids": params["ids"][:20], "count": len(ids), "reason": reason}
            action = "parked.reject"
        elif kind == "purge":
            if form.get("confirm") != "yes":
                raise LotError("purge: confirm it first")
            older = duration(form.get("older_than") or "", "older than")
            params = {"older_than_s": older.total_seconds()}
            summary = {"older_than": form.get("older_than"), "older_than_s":
                       older.total_seconds()}
            action = "parked.purge"
        else:
            raise LotError("unknown action")
        audit_id = await audit.begin(self.pool, source="console", actor=session.label,
                                     action=action, params=summary | {"job": True})
        job = await self.jobs.submit(kind, params, summary, session.label, audit_id)
        raise web.HTTPSeeOther(f"{PATH}jobs/{job.id}")

    async def jobs_page(self, request: web.Request) -> web.Response:
        return self.render(request, "jobs.html", jobs=await self.jobs.recent())

    async def _job(self, request: web.Request) -> Any:
        job = await self.jobs.get(int(request.match_info["id"]))
        if job is None:
            raise NotFound(f"no job {request.match_info['id']}")
        return job

    async def job_page(self, request: web.Request) -> web.Response:
        return self.render(request, "job.html", job=await self._job(request))

    async def job_json(self, request: web.Request) -> web.Response:
        return web.json_response((await self._job(request)).to_json())

    async def job_cancel(self, request: web.Request) -> web.StreamResponse:
        session = self._operator(request)
        job = await self._job(request)
        audit_id = await audit.begin(self.pool, source="console", actor=session.label,
                                     action="job.cancel", params={"job": job.id})
        after = await self.jobs.request_cancel(job.id, session.label)
        await audit.finish(self.pool, audit_id, affected=1 if after and after.cancel_requested_by
                           else 0, outcome="ok" if after and after.cancel_requested_by
                           else f"not cancellable (state {job.state})")
        raise web.HTTPSeeOther(f"{PATH}jobs/{job.id}")

    async def job_rerun(self, request: web.Request) -> web.StreamResponse:
        session = self._operator(request)
        job = await self._job(request)
        if job.kind != "replay" or job.active:
            raise LotError("only a finished replay can be run again")
        summary = job.summary | {"rerun_of": job.id}
        audit_id = await audit.begin(self.pool, source="console", actor=session.label,
                                     action="parked.replay", params=summary | {"job": True})
        new = await self.jobs.submit("replay", job.params, summary, session.label, audit_id)
        raise web.HTTPSeeOther(f"{PATH}jobs/{new.id}")

    # -- campaigns -----------------------------------------------------------------------

    async def campaigns_page(self, request: web.Request) -> web.Response:
        ids = await campaigns.known_ids(self.pool)
        figures = await campaign_overview(self.pool, ids)
        usage = await campaigns.usage_today(self.pool, ids)
        limits = await campaigns.targets(self.pool, ids)
        async with self.pool.acquire() as conn:
            parked = await parked_totals(conn, "campaign_id")
        done = await completions(self.pool, ids)
        rows = [{"id": c, "figures": figures[c], "usage": usage.get(c),
                 "targets": limits.get(c), "verdict": campaigns.judge(figures[c], limits.get(c)),
                 "parked": parked.get(c, 0), "done": done.get(c)} for c in ids]
        return self.render(request, "campaigns.html", rows=rows)

    async def campaign_page(self, request: web.Request) -> web.Response:
        campaign_id = request.match_info["id"][:200]
        figures = await statistics(self.pool, self.settings, campaign_id)
        overview = (await campaign_overview(self.pool, [campaign_id]))[campaign_id]
        usage = (await campaigns.usage_today(self.pool, [campaign_id])).get(campaign_id)
        limits = (await campaigns.targets(self.pool, [campaign_id])).get(campaign_id)
        row = await campaigns.get(self.pool, campaign_id)
        figures["recent_errors"] = mask_tree(figures["recent_errors"])
        return self.render(request, "campaign.html", campaign_id=campaign_id, row=row,
                           stats=figures, overview=overview, usage=usage, targets=limits,
                           verdict=campaigns.judge(overview, limits),
                           done=await completion_of(self.pool, campaign_id))

    async def escalations_page(self, request: web.Request, *, given: Any = None,
                               error: str | None = None, status: int = 200) -> web.Response:
        """Who is told about parked messages, and the latest digests; an operator adds
        and removes rules here as with ``herald escalation`` or the admin API."""
        found = await escalations.listing(self.pool)
        return self.render(request, "escalations.html", status=status, rules=found["rules"],
                           digests=found["digests"], channels=CHANNELS,
                           error_types=escalations.ERROR_TYPES, given=given or {},
                           error=error)

    async def escalation_add(self, request: web.Request) -> web.StreamResponse:
        session = self._operator(request)
        form = await self._form(request)

        def field(name: str) -> str | None:
            value = form.get(name)
            return value.strip() or None if isinstance(value, str) else None

        try:
            # Whole seconds, rounded up as the CLI does (a window is never shorter).
            window = math.ceil(duration(field("window") or "5m", "window").total_seconds())
            spec = escalations.EscalationSpec(
                name=field("name") or "", target_channel=field("to_channel") or "",
                target=field("to") or "", window_s=window, channel=field("channel"),
                error_type=field("error_type"), campaign_id=field("campaign"))
            spec.check()
        except (ConfigError, LotError) as exc:
            # The form comes back filled in (but for the target, which may be a secret).
            kept = {k: v for k in ("name", "to_channel", "window", "channel", "error_type",
                                   "campaign") if isinstance(v := form.get(k), str)}
            return await self.escalations_page(request, given=kept, error=str(exc),
                                               status=400)
        params = {"name": spec.name, "to_channel": spec.target_channel,
                  "to": escalations.shown_target(spec.target_channel, spec.target),
                  "window_s": spec.window_s, "channel": spec.channel,
                  "error_type": spec.error_type, "campaign": spec.campaign_id}
        audit_id = await audit.begin(self.pool, source="console", actor=session.label,
                                     action="escalation.create", params=params)
        try:
            await escalations.add(self.pool, spec, session.label)
        except Exception as exc:
            await audit.finish(self.pool, audit_id, affected=0, outcome=f"error: {exc}")
            if isinstance(exc, ConfigError):
                return await self.escalations_page(request, given=params, error=str(exc),
                                                   status=400)
            raise
        await audit.finish(self.pool, audit_id, affected=1)
        raise web.HTTPSeeOther(f"{PATH}escalations")

    async def escalation_remove(self, request: web.Request) -> web.StreamResponse:
        session = self._operator(request)
        ref = request.match_info["id"][:200]
        audit_id = await audit.begin(self.pool, source="console", actor=session.label,
                                     action="escalation.remove", params={"rule": ref})
        try:
            await escalations.remove(self.pool, ref)
        except escalations.EscalationNotFound as exc:
            await audit.finish(self.pool, audit_id, affected=0, outcome=f"error: {exc}")
            raise NotFound(str(exc)) from None
        except Exception as exc:
            await audit.finish(self.pool, audit_id, affected=0, outcome=f"error: {exc}")
            raise
        await audit.finish(self.pool, audit_id, affected=1)
        raise web.HTTPSeeOther(f"{PATH}escalations")

    async def campaign_targets(self, request: web.Request) -> web.StreamResponse:
        session = self._operator(request)
        campaign_id = request.match_info["id"][:200]
        form = await self._form(request)
        values: dict[str, float | None] = {}
        for name, percent in (("min_delivered_share", True),
                              ("min_retry_success_share", True),
                              ("max_average_attempts", False)):
            text = (form.get(name) or "").strip()
            if not text:
                values[name] = None
                continue
            try:
                number = float(text)
            except ValueError:
                raise LotError(f"{name}: a number") from None
            values[name] = number / 100 if percent else number
        audit_id = await audit.begin(self.pool, source="console", actor=session.label,
                                     action="campaign.targets",
                                     params={"campaign": campaign_id, **values})
        try:
            await campaigns.save_targets(self.pool, campaign_id, values, session.label)
        except Exception as exc:
            await audit.finish(self.pool, audit_id, affected=0, outcome=f"error: {exc}")
            raise
        await audit.finish(self.pool, audit_id, affected=1)
        raise web.HTTPSeeOther(f"{PATH}campaigns/{quote(campaign_id, safe='')}")


def _selection_fields(selection: Selection) -> list[tuple[str, str]]:
    """Hidden form fields that carry a selection to the job form."""
    fields: list[tuple[str, str]] = [("id", str(i)) for i in selection.ids]
    if selection.channel:
        fields.append(("channel", selection.channel))
    if selection.error_types:
        fields.append(("error_type", ",".join(selection.error_types)))
    for key in ("error_code", "campaign", "recipient"):
        value = getattr(selection, key)
        if value:
            fields.append((key, value))
    for key in ("since", "until"):
        value = getattr(selection, key)
        if value is not None:
            fields.append((key, value.isoformat()))
    if selection.all:
        fields.append(("all", "1"))
    return fields


def add_console_routes(app: web.Application, *, settings: Settings, lot: Lot,
                       connection: AbstractRobustConnection, status: StatusSource,
                       tokens: list[AdminToken], jobs: LotJobs) -> None:
    """Mount the console at /console/."""
    console = Console(settings=settings, lot=lot, connection=connection, status=status,
                      tokens=tokens, jobs=jobs)
    app.add_subapp(PATH, console.app())

    async def to_console(_: web.Request) -> web.StreamResponse:
        raise web.HTTPPermanentRedirect(PATH)

    app.router.add_get(PATH.rstrip("/"), to_console)
