"""The analysis windows on their own schedule, out of the reconcile.

One asyncio task per ModelDeployment under analysis measures windows of ``analysis.interval``
(:meth:`modeldeploy.triton.analysis.TritonAnalysis.measure`: the maths, verdict rules and inconclusive
counting) and after each one writes ``status.lastAnalysis`` and asks for a reconcile. The
reconcile never waits for metrics: it reads the persisted verdict with :func:`verdict_for`, and
tells the runner which window should run (:meth:`AnalysisRunner.ensure`) or that none should
(:meth:`AnalysisRunner.stop`).

Each result names what it judges (candidate hash, step, attempt = ``rollout.startedAt``) and the
window in progress (``windowStart``; with direct scraping also the counters it started from; with
Prometheus these are asked for at ``windowStart``). So after an operator restart the window in
progress ends at its persisted start + interval, measured from its persisted start counters: the
restart costs no analysis time. The runner is the only writer of ``status.lastAnalysis``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pydantic

from .. import api
from ..kube.client import ApiError
from ..triton.analysis import FAIL, Counters, HistorySource, Snapshot, TritonAnalysis, Window

log = logging.getLogger(__name__)

#: ``patch_status(namespace, name, status merge patch) -> the object written``
PatchStatus = Callable[[str, str, dict[str, Any]], Awaitable[dict[str, Any]]]
#: ``enqueue(namespace, name)``: reconcile that ModelDeployment soon.
Enqueue = Callable[[str, str], None]
Sleep = Callable[[float], Awaitable[None]]
#: What a window belongs to: candidate revision hash, canary step, attempt (rollout.startedAt).
Identity = tuple[str, int, str | None]
#: No window is shorter (a 0s interval would write status in a loop; the reconcile-driven windows
#: before the runner were bounded by the reconcile's 1 s requeue the same way).
MIN_WINDOW_SECONDS = 1.0


def verdict_for(
    last: api.AnalysisResult | None, state: api.RolloutState, candidate_hash: str
) -> api.AnalysisResult | None:
    """The persisted result if it judges this candidate at this step of this rollout attempt; else
    None (no verdict yet: Pending). A result of an earlier step, candidate or attempt is stale."""
    if last is None:
        return None
    if (last.candidate_hash, last.step, last.attempt) != (candidate_hash, state.step, state.started_at):
        return None
    return last


def _iso_ms(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _parse_time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _persisted_series(snap: Snapshot) -> list[api.SeriesCounters]:
    return [
        api.SeriesCounters(
            labels=dict(key),
            success=c.success,
            failure=c.failure,
            inferences=c.inferences,
            request_us=c.request_us,
            queue_us=c.queue_us,
        )
        for key, c in sorted(snap.series.items())
    ]


def _restored(series: list[api.SeriesCounters], at: float) -> Snapshot:
    return Snapshot(
        at=at,
        series={
            tuple(sorted(s.labels.items())): Counters(
                s.success, s.failure, s.inferences, s.request_us, s.queue_us
            )
            for s in series
        },
    )


def _last_analysis(md: Mapping[str, Any]) -> api.AnalysisResult | None:
    raw = (md.get("status") or {}).get("lastAnalysis")
    if not raw:
        return None
    try:
        return api.AnalysisResult.model_validate(raw)
    except pydantic.ValidationError:
        return None


@dataclass
class _Job:
    identity: Identity
    md: dict[str, Any]
    spec: api.ModelDeploymentSpec
    state: api.RolloutState
    stable: str
    task: asyncio.Task[None] | None = None
    written: api.AnalysisResult | None = None  # its last result in status


class AnalysisRunner:
    """One window task per ModelDeployment under analysis (see the module docstring).

    ``analysis.clock`` must give unix seconds (``time.time``): window starts are persisted and
    outlive the process. ``sleep`` is injectable for tests.
    """

    def __init__(
        self,
        analysis: TritonAnalysis,
        *,
        patch_status: PatchStatus,
        enqueue: Enqueue,
        sleep: Sleep = asyncio.sleep,
        retry_seconds: tuple[float, float] = (1.0, 30.0),
    ) -> None:
        self.analysis = analysis
        self._patch_status = patch_status
        self._enqueue = enqueue
        self._sleep = sleep
        self._retry_seconds = retry_seconds
        self._jobs: dict[tuple[str, str], _Job] = {}
        self._ending: dict[tuple[str, str], _Job] = {}  # stopped, its task maybe still writing

    # ---------------------------------------------------------------- API of the reconcile

    def ensure(
        self,
        md: dict[str, Any],
        spec: api.ModelDeploymentSpec,
        state: api.RolloutState,
        stable_hash: str,
        candidate_hash: str,
    ) -> None:
        """Have the window task of this (candidate, step, attempt) running; returns at once.

        Idempotent: the task already running for it only takes the newest ``md`` and ``spec`` (for
        its next window). A task of another candidate, step or attempt is replaced. A new task
        resumes the window that ``md``'s status shows for it, if any."""
        meta = md["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        if spec.rollout.analysis is None:
            self.stop(*key)
            return
        identity: Identity = (candidate_hash, state.step, state.started_at)
        job = self._jobs.get(key)
        if job is not None and job.identity == identity:
            job.md, job.spec, job.stable = md, spec, stable_hash
            return
        previous = job if job is not None else self._ending.pop(key, None)
        if previous is not None and previous.task is not None:
            previous.task.cancel()
        job = _Job(identity, md, spec, state, stable_hash)
        job.task = asyncio.create_task(self._run(key, job, previous), name=f"analysis {key[0]}/{key[1]}")
        job.task.add_done_callback(self._finished)
        self._jobs[key] = job

    def stop(self, namespace: str, name: str) -> None:
        """No window should run for this ModelDeployment (its rollout is not analysing, or it is gone)."""
        job = self._jobs.pop((namespace, name), None)
        if job is not None and job.task is not None and not job.task.done():
            job.task.cancel()
            self._ending[(namespace, name)] = job  # a later task waits for its last write

    def stop_all(self) -> None:
        """Stop every window (leadership lost, shutdown): another process may be writing them next."""
        for key in list(self._jobs):
            self.stop(*key)

    # ---------------------------------------------------------------- the task

    def _finished(self, task: asyncio.Task[None]) -> None:
        for key, ending in list(self._ending.items()):
            if ending.task is task:
                del self._ending[key]
        if not task.cancelled() and task.exception() is not None:
            log.error("%s ended by an error", task.get_name(), exc_info=task.exception())

    def _resumed(self, job: _Job, persisted: api.AnalysisResult | None) -> Window | None:
        """The window that status shows for this job (after an operator restart, or a stop while
        the candidate's pods were not ready), or None: start a first one."""
        last = verdict_for(persisted, job.state, job.identity[0])
        if last is None:
            return None
        started = _parse_time(last.window_start) if last.window_start else _parse_time(last.time)
        if started is None:
            return None
        counters = last.window_counters
        return Window(
            started=started,
            start_cand=_restored(counters.candidate, started) if counters is not None else None,
            start_stable=(
                _restored(counters.stable, started)
                if counters is not None and counters.stable is not None
                else None
            ),
            inconclusive=last.inconclusive_count,
            last=last,
            attempt=job.state.started_at,
            from_source=last.window_start is not None and counters is None,
        )

    def _stamped(
        self, win: Window, job: _Job, namespace: str, analysis: api.AnalysisSpec
    ) -> api.AnalysisResult:
        """The result as persisted: what it judges, and the window that follows it."""
        running = win.start_cand is not None and win.last.verdict != FAIL
        counters = None
        if (
            running
            and win.start_cand is not None
            and not isinstance(self.analysis.source_for(namespace, analysis), HistorySource)
        ):
            counters = api.WindowCounters(
                candidate=_persisted_series(win.start_cand),
                stable=_persisted_series(win.start_stable) if win.start_stable is not None else None,
            )
        return win.last.model_copy(
            update={
                "candidate_hash": job.identity[0],
                "step": job.identity[1],
                "attempt": job.identity[2],
                "window_start": _iso_ms(win.started) if running else None,
                "window_counters": counters,
            }
        )

    async def _run(self, key: tuple[str, str], job: _Job, previous: _Job | None) -> None:
        if previous is not None and previous.task is not None:
            await asyncio.gather(previous.task, return_exceptions=True)  # its last write lands before ours
        ns, name = key
        ta = self.analysis
        # What status shows: the previous task's last write is newer than an md read before it landed.
        written = previous.written if previous is not None and previous.written else _last_analysis(job.md)
        win = self._resumed(job, written)
        while True:
            analysis = job.spec.rollout.analysis
            if analysis is None:
                return
            if win is not None:
                now = ta.clock()
                left = ta.seconds_left(win, analysis, now)
                if left is None:
                    return  # Fail is final for the step
                left = max(left, win.started + MIN_WINDOW_SECONDS - now)
                if left > 0:
                    await self._sleep(left)
                    continue  # the interval may have changed meanwhile
            try:
                win = await ta.measure(
                    job.md, job.spec, analysis, job.state, job.stable, job.identity[0], win, ta.clock()
                )
            except Exception:  # a bug, not missing metrics (those are Inconclusive): keep the window
                log.exception("analysis of %s/%s: measuring failed; trying again in an interval", ns, name)
                await self._sleep(max(api.parse_duration(analysis.interval), MIN_WINDOW_SECONDS))
                continue
            result = self._stamped(win, job, ns, analysis)
            if not await self._write(ns, name, written, result):
                return
            written = job.written = result
            self._enqueue(ns, name)

    async def _write(
        self, namespace: str, name: str, before: api.AnalysisResult | None, result: api.AnalysisResult
    ) -> bool:
        """Merge-patch status.lastAnalysis from ``before`` to ``result`` (unset fields and values
        that are gone become null); retried until written. False: the object is gone."""
        body = result.model_dump(by_alias=True, mode="json")
        if before is not None:
            gone = before.values.keys() - result.values.keys()
            body["values"] = {**dict.fromkeys(gone), **body["values"]}
        delay, most = self._retry_seconds
        while True:
            try:
                await self._patch_status(namespace, name, {"lastAnalysis": body})
                return True
            except ApiError as exc:
                if exc.status == 404:
                    log.info("analysis of %s/%s: the object is gone", namespace, name)
                    return False
                log.warning("analysis of %s/%s: could not write the result: %s", namespace, name, exc)
            except Exception as exc:  # a connection error: the verdict must still reach status
                log.warning("analysis of %s/%s: could not write the result: %s", namespace, name, exc)
            await self._sleep(delay)
            delay = min(delay * 2, most)


__all__ = ["AnalysisRunner", "Enqueue", "PatchStatus", "verdict_for"]
