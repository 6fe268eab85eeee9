"""Background jobs on the parking lot: replay, reject and purge, off the HTTP request.

The console (and the admin API's background replays) write a row to
``lot_jobs`` and return at once; :class:`LotJobs`, a component of the
gateway process, runs the jobs one at a time with the same functions the CLI
uses (:func:`consumer.parking.replay.replay`, :func:`~consumer.parking.lot.reject`,
:func:`~consumer.parking.lot.purge`), as the label of the token that asked.
While a job runs its row carries its progress (``done`` of ``total``, the
report so far) and a heartbeat, so any operator on any gateway sees it, and
a reload loses nothing.

- **Cancel**: a queued job is cancelled at once; a running replay stops
  between two publishes (what was replayed stays replayed). Reject and purge
  mark their rows in one statement and cannot be stopped half-way.
- **A dead process**: the runner holds a session advisory lock on the job it
  runs. A job still ``running`` whose lock anyone can take lost its process,
  and is marked ``interrupted`` by the next runner that looks (at start-up
  and every few seconds). Replay is idempotent: running it again is safe.
- **A busy lot**: one pass at a time per lot (:func:`~consumer.parking.passes.lot_lock`);
  a job that finds the lot busy (a CLI replay, another gateway's job) waits
  queued and is tried again.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import structlog

from consumer.admin import audit
from consumer.parking.lot import Lot, LotError, Selection, SweepReport, purge, reject
from consumer.parking.passes import LotBusy
from consumer.parking.replay import Edit, ReplayOptions, ReplayReport, replay

log = structlog.get_logger("herald.jobs")

KINDS = ("replay", "reject", "purge")
ACTIVE = ("queued", "running")
FINAL = ("done", "failed", "cancelled", "interrupted")

# The advisory lock a runner holds on its job: (this key in the schema, job id).
_LOCK = "hashtext('herald.lot_job:' || current_schema())"


def selection_params(selection: Selection) -> dict[str, Any]:
    """A selection as JSON, complete (recipients in clear): what a job runs."""
    return {
        "ids": [str(i) for i in selection.ids], "channel": selection.channel,
        "error_types": list(selection.error_types), "error_code": selection.error_code,
        "campaign": selection.campaign, "recipient": selection.recipient,
        "since": selection.since.isoformat() if selection.since else None,
        "until": selection.until.isoformat() if selection.until else None,
        "all": selection.all,
    }


def selection_from(doc: Mapping[str, Any]) -> Selection:
    """The selection :func:`selection_params` wrote."""

    def when(key: str) -> datetime | None:
        value = doc.get(key)
        return datetime.fromisoformat(value) if value else None

    return Selection(
        ids=tuple(uuid.UUID(i) for i in doc.get("ids") or ()), channel=doc.get("channel"),
        error_types=tuple(doc.get("error_types") or ()), error_code=doc.get("error_code"),
        campaign=doc.get("campaign"), recipient=doc.get("recipient"),
        since=when("since"), until=when("until"), all=bool(doc.get("all")))


@dataclass(frozen=True)
class Job:
    """One row of ``lot_jobs``."""

    id: int
    kind: str
    state: str
    params: dict[str, Any]
    summary: dict[str, Any]
    created_by: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    cancel_requested_by: str | None
    total: int | None
    done: int
    report: dict[str, Any]
    error: str | None
    audit_id: int | None

    @classmethod
    def from_record(cls, r: asyncpg.Record) -> Job:
        return cls(**{k: r[k] for k in cls.__dataclass_fields__})

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def cancellable(self) -> bool:
        return self.state == "queued" or (self.state == "running" and self.kind == "replay"
                                          and self.cancel_requested_by is None)

    @property
    def percent(self) -> int | None:
        """How far the job is, 0–100, or None while not known."""
        if self.state == "done":
            return 100
        if not self.total:
            return None
        return min(100, int(100 * self.done / self.total))

    def to_json(self) -> dict[str, Any]:
        """The job as people may see it (the summary, never the raw params)."""

        def iso(value: datetime | None) -> str | None:
            return value.isoformat() if value else None

        return {"id": self.id, "kind": self.kind, "state": self.state,
                "summary": self.summary, "created_by": self.created_by,
                "created_at": iso(self.created_at), "started_at": iso(self.started_at),
                "finished_at": iso(self.finished_at),
                "cancel_requested_by": self.cancel_requested_by, "total": self.total,
                "done": self.done, "percent": self.percent, "report": self.report,
                "error": self.error}


class LotJobs:
    """The jobs table and its runner (a component of the gateway process)."""

    name = "lot_jobs"

    def __init__(self, lot: Lot, *, poll_s: float = 2.0, heartbeat_s: float = 0.5) -> None:
        self.lot = lot
        self.pool = lot.pool
        self.poll_s = poll_s
        self.heartbeat_s = heartbeat_s
        self.runner_id = uuid.uuid4().hex[:12]
        self._wake = asyncio.Event()
        self._closing = False
        self._closed = asyncio.Event()
        self._cancel = False
        self._task: asyncio.Task[None] | None = None
        self._report: ReplayReport | None = None

    # -- the table ------------------------------------------------------------------

    async def submit(self, kind: str, params: dict[str, Any], summary: dict[str, Any],
                     actor: str, audit_id: int | None) -> Job:
        """Queue a job; the runner takes it within moments."""
        if kind not in KINDS:
            raise LotError(f"unknown job kind {kind!r}")
        row = await self.pool.fetchrow(
            """INSERT INTO lot_jobs (kind, params, summary, created_by, audit_id)
               VALUES ($1, $2, $3, $4, $5) RETURNING *""",
            kind, params, summary, actor, audit_id)
        assert row is not None
        self._wake.set()
        job = Job.from_record(row)
        log.info("job.queued", job=job.id, kind=kind, actor=actor)
        return job

    async def get(self, job_id: int) -> Job | None:
        row = await self.pool.fetchrow("SELECT * FROM lot_jobs WHERE id = $1", job_id)
        return Job.from_record(row) if row is not None else None

    async def recent(self, limit: int = 50) -> list[Job]:
        """Active jobs first (oldest first), then the latest finished ones."""
        rows = await self.pool.fetch(
            """(SELECT * FROM lot_jobs WHERE state IN ('queued', 'running') ORDER BY id)
               UNION ALL
               (SELECT * FROM lot_jobs WHERE state NOT IN ('queued', 'running')
                 ORDER BY id DESC LIMIT $1)""", limit)
        return [Job.from_record(r) for r in rows]

    async def request_cancel(self, job_id: int, actor: str) -> Job | None:
        """Cancel a queued job, or ask a running replay to stop; returns the job
        as it is now (None when there is no such job)."""
        row = await self.pool.fetchrow(
            """UPDATE lot_jobs SET state = 'cancelled', finished_at = now(),
                      cancel_requested_by = $2, cancel_requested_at = now()
                WHERE id = $1 AND state = 'queued' RETURNING *""", job_id, actor)
        if row is not None:
            job = Job.from_record(row)
            if job.audit_id is not None:
                await audit.finish(self.pool, job.audit_id, affected=0, outcome="cancelled")
            return job
        row = await self.pool.fetchrow(
            """UPDATE lot_jobs SET cancel_requested_by = $2, cancel_requested_at = now()
                WHERE id = $1 AND state = 'running' AND kind = 'replay'
                  AND cancel_requested_at IS NULL RETURNING *""", job_id, actor)
        if row is None:
            return await self.get(job_id)
        return Job.from_record(row)

    # -- the runner -----------------------------------------------------------------

    async def start(self) -> None:
        await self.sweep_dead()
        self._task = asyncio.create_task(self._loop(), name="herald-lot-jobs")

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop taking jobs; a running replay stops between publishes and is
        marked interrupted (a reject or purge is given ``grace_s`` to end)."""
        self._closing = True
        self._closed.set()
        self._wake.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace_s)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None

    async def _loop(self) -> None:
        while not self._closing:
            claimed = None
            try:
                await self.sweep_dead()
                claimed = await self._claim()
            except Exception as exc:
                log.warning("job.poll_failed", error=repr(exc)[:300])
            if claimed is None:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_s)
                continue
            job, holder = claimed
            try:
                await self._run(job, holder)
            finally:
                with contextlib.suppress(Exception):
                    await holder.execute(f"SELECT pg_advisory_unlock({_LOCK}, $1::int)", job.id)
                await self.pool.release(holder)

    async def sweep_dead(self) -> int:
        """Mark ``interrupted`` the running jobs whose runner is gone (see the
        module's docstring); returns how many."""
        found = 0
        ended: list[int] = []
        async with self.pool.acquire() as conn:
            for row in await conn.fetch(
                    "SELECT id, audit_id FROM lot_jobs WHERE state = 'running'"):
                if not await conn.fetchval(
                        f"SELECT pg_try_advisory_lock({_LOCK}, $1::int)", row["id"]):
                    continue  # its runner is alive
                try:
                    done = await conn.fetchval(
                        """UPDATE lot_jobs SET state = 'interrupted', finished_at = now(),
                                  error = 'the process running it stopped; replay is'
                                          ' idempotent: run it again to finish'
                            WHERE id = $1 AND state = 'running' RETURNING id""", row["id"])
                finally:
                    await conn.execute(f"SELECT pg_advisory_unlock({_LOCK}, $1::int)",
                                       row["id"])
                if done is not None:
                    found += 1
                    log.warning("job.interrupted", job=row["id"])
                    if row["audit_id"] is not None:
                        ended.append(row["audit_id"])
        # Not while holding a connection: never two at once from this pool.
        for audit_id in ended:
            await audit.finish(self.pool, audit_id, affected=0,
                               outcome="interrupted: its process stopped")
        return found

    async def _claim(self) -> tuple[Job, Any] | None:
        """The oldest queued job, now 'running' and locked by a held connection."""
        # Releasing a connection to the pool also drops its advisory locks
        # (asyncpg resets it), so every path that gives it back unlocks the job.
        holder = await self.pool.acquire()
        claimed = None
        try:
            async with holder.transaction():
                row = await holder.fetchrow(
                    """SELECT id FROM lot_jobs WHERE state = 'queued'
                        ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED""")
                if row is not None and await holder.fetchval(
                        f"SELECT pg_try_advisory_lock({_LOCK}, $1::int)", row["id"]):
                    claimed = await holder.fetchrow(
                        """UPDATE lot_jobs SET state = 'running', runner = $2, error = NULL,
                                  started_at = COALESCE(started_at, now()),
                                  heartbeat_at = now()
                            WHERE id = $1 RETURNING *""", row["id"], self.runner_id)
        except BaseException:
            await self.pool.release(holder)
            raise
        if claimed is None:
            await self.pool.release(holder)
            return None
        return Job.from_record(claimed), holder

    def _stopping(self) -> bool:
        return self._closing or self._cancel

    def _progress(self, report: ReplayReport) -> None:
        self._report = report

    async def _beat(self, job: Job, holder: Any, stop: asyncio.Event) -> None:
        """Write the progress and the heartbeat; learn about a cancel request.
        Stopped by ``stop`` between two writes (never cancelled mid-query: the
        connection is used again after)."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.heartbeat_s)
            if stop.is_set():
                return
            total, done, report = _replay_figures(self._report)
            try:
                cancel = await holder.fetchval(
                    """UPDATE lot_jobs SET heartbeat_at = now(), total = COALESCE($2, total),
                              done = $3, report = $4
                        WHERE id = $1 RETURNING cancel_requested_at IS NOT NULL""",
                    job.id, total, done, report)
            except Exception as exc:
                log.warning("job.heartbeat_failed", job=job.id, error=repr(exc)[:200])
                continue
            if cancel:
                self._cancel = True

    async def _run(self, job: Job, holder: Any) -> None:
        self._cancel = False
        self._report = None
        log.info("job.started", job=job.id, kind=job.kind, actor=job.created_by)
        stop_beat = asyncio.Event()
        beat = asyncio.create_task(self._beat(job, holder, stop_beat),
                                   name=f"herald-job-{job.id}")

        async def end_beat() -> None:
            stop_beat.set()
            with contextlib.suppress(Exception):
                await beat

        state, error, affected = "done", None, 0
        total: int | None = None
        done = 0
        report: dict[str, Any] = {}
        try:
            if job.kind == "replay":
                result = await self._replay(job)
                total, done, report = _replay_figures(result)
                affected = result.replayed
                if result.interrupted:
                    state = "cancelled" if self._cancel else "interrupted"
            else:
                sweep = await self._sweep(job)
                total = done = sweep.marked
                affected = sweep.marked
                report = sweep.to_json()
        except LotBusy:
            await end_beat()
            await holder.execute(
                """UPDATE lot_jobs SET state = 'queued', runner = NULL,
                          error = 'waiting: another replay, reject, purge or sync is running'
                    WHERE id = $1""", job.id)
            log.info("job.waiting", job=job.id)
            # Not at once: whatever holds the lot needs time.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), self.poll_s)
            return
        except asyncio.CancelledError:
            stop_beat.set()
            beat.cancel()
            raise  # the row stays 'running'; the next sweep marks it interrupted
        except LotError as exc:
            state, error = "failed", str(exc)
        except Exception as exc:
            state, error = "failed", f"{type(exc).__name__}: {exc}"[:1000]
            log.exception("job.failed", job=job.id)
        await end_beat()
        await holder.execute(
            """UPDATE lot_jobs SET state = $2, finished_at = now(), heartbeat_at = now(),
                      total = COALESCE($3, total), done = $4, report = $5, error = $6
                WHERE id = $1""", job.id, state, total, done, report, error)
        if job.audit_id is not None:
            outcome = "ok" if state == "done" else (f"error: {error}" if error else state)
            await audit.finish(self.pool, job.audit_id, affected=affected, outcome=outcome)
        log.info("job.finished", job=job.id, state=state, affected=affected)

    async def _replay(self, job: Job) -> ReplayReport:
        p = job.params
        edit = Edit(body=p["set_body"]) if p.get("set_body") is not None else None
        options = ReplayOptions(
            selection_from(p["selection"]), rate=p.get("rate"),
            reset_attempts=p.get("reset_attempts", True), edit=edit)
        return await replay(self.lot, options, job.created_by, stopping=self._stopping,
                            progress=self._progress)

    async def _sweep(self, job: Job) -> SweepReport:
        p = job.params
        if job.kind == "reject":
            ids = [uuid.UUID(i) for i in p["ids"]]
            return await reject(self.lot, ids, p["reason"], job.created_by)
        return await purge(self.lot, timedelta(seconds=float(p["older_than_s"])),
                           job.created_by)


def _replay_figures(report: ReplayReport | None) -> tuple[int | None, int, dict[str, Any]]:
    """(total, done, report) of a replay as it stands."""
    if report is None:
        return None, 0, {}
    done = report.replayed + report.already_delivered + len(report.skipped)
    shown = {k: v for k, v in report.to_json().items() if k != "items"}
    shown["skipped"] = report.skipped[:50]
    return report.selected, done, shown
