"""A BatchInference's status from what the cluster shows: its Job and the worker pods' reports.
Pure functions.

The operator holds no storage credentials, so it never reads the output location. Each worker
writes a :class:`.run.Report` as its container's termination message; the pod status carries it
here. While it runs, a worker serves its report so far on its progress port, which the operator
reads (``live``). Per completion index the latest report counts (a worker started again reports
the shards done before it too, from their done markers). The worker that finds every shard done
writes the manifest and reports the job's totals, which then replace the sums.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..modeldeployment.status import set_condition
from ..timeutil import parse_rfc3339, rfc3339
from . import api as bapi
from . import shards
from .builders import PREFLIGHT_CONTAINER, WORKER_CONTAINER

COMPLETE, FAILED = "Complete", "Failed"
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"


@dataclass(frozen=True)
class Reports:
    """What the workers said, per completion index: the latest report of each."""

    by_index: dict[int, dict[str, Any]] = field(default_factory=dict)
    #: The last failure a worker reported (reason, message), for a failed Job's status.
    failure: tuple[str, str] | None = None


def worker_report(pod: dict[str, Any]) -> dict[str, Any] | None:
    """The worker container's termination message as a report, if it ended and wrote one; or the
    preflight init container's, if it failed (its success says nothing the worker will not)."""
    st = pod.get("status") or {}
    statuses = [
        *(cs for cs in st.get("initContainerStatuses") or [] if cs.get("name") == PREFLIGHT_CONTAINER
          and ((cs.get("state") or {}).get("terminated") or {}).get("exitCode")),
        *(cs for cs in st.get("containerStatuses") or [] if cs.get("name") == WORKER_CONTAINER),
    ]  # fmt: skip
    for cs in statuses:
        term = (cs.get("state") or {}).get("terminated") or {}
        text = (term.get("message") or "").strip()
        if not text:
            return None
        try:
            report = json.loads(text.splitlines()[-1])
        except ValueError:
            return {"reason": "WorkerError", "message": text[-512:]}
        return report if isinstance(report, dict) else None
    return None


def collect(pods: list[dict[str, Any]], live: Sequence[dict[str, Any]] = ()) -> Reports:
    """The ended workers' reports (termination messages) and the running ones' reports so far
    (``live``): per completion index, the one with the most shards done. Only an ended worker's
    reason is the job's failure."""
    by_index: dict[int, dict[str, Any]] = {}
    failure = None
    seen: list[tuple[dict[str, Any] | None, Any, bool]] = [
        (worker_report(pod), (pod["metadata"].get("labels") or {}).get(INDEX_LABEL), True) for pod in pods
    ]
    seen += [(report, None, False) for report in live]
    for report, label, ended in seen:
        if report is None:
            continue
        if report.get("reason") and ended:
            failure = (str(report["reason"]), str(report.get("message") or ""))
        try:
            index = int(str(report.get("worker", label)))
        except (TypeError, ValueError):
            continue
        best = by_index.get(index)
        if best is None or int(report.get("shards") or 0) >= int(best.get("shards") or 0):
            by_index[index] = report
    return Reports(by_index, failure)


def job_condition(job: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return dict(c)
    return None


def derive(
    old: bapi.BatchInferenceStatus,
    *,
    generation: int | None,
    now: datetime,
    job: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    live: list[dict[str, Any]] | None = None,
    waiting: tuple[str, str] | None = None,
    invalid: str | None = None,
    model_revision: str | None = None,
    output_uri: str = "",
) -> bapi.BatchInferenceStatus:
    """The new status. ``waiting``: (reason, message) why no Job exists yet; ``invalid``: a spec the
    operator cannot run (the job fails at once)."""
    at = rfc3339(now)
    conditions = list(old.conditions or [])
    st = old.model_copy()
    st.observed_generation = generation
    if model_revision is not None:
        st.model_revision = model_revision
    if invalid is not None:
        return _ended(st, conditions, FAILED, "InvalidSpec", invalid, at, generation)
    if job is None:
        reason, message = waiting or ("Creating", "creating the Job")
        st.phase, st.message = bapi.BatchPhase.pending.value, message
        conditions = set_condition(
            conditions, COMPLETE, False, reason, message, now=at, generation=generation
        )
        st.conditions = set_condition(
            conditions, FAILED, False, reason, message, now=at, generation=generation
        )
        return st

    reports = collect(pods, live or [])
    _counts(st, reports, output_uri)
    jst = job.get("status") or {}
    st.start_time = st.start_time or jst.get("startTime")
    started = parse_rfc3339(st.start_time)
    done = job_condition(job, "Complete")
    failed = job_condition(job, "Failed")
    if done is not None:
        end = jst.get("completionTime") or done.get("lastTransitionTime") or at
        _throughput(st, started, parse_rfc3339(end) or now)
        st.completion_time = st.completion_time or end
        message = f"{st.records or 0} records scored, {st.records_failed or 0} failed"
        return _ended(st, conditions, COMPLETE, "Succeeded", message, at, generation)
    if failed is not None:
        st.completion_time = st.completion_time or failed.get("lastTransitionTime") or at
        _throughput(st, started, parse_rfc3339(st.completion_time) or now)
        if reports.failure is not None:
            reason, message = reports.failure
        else:
            reason = str(failed.get("reason") or "JobFailed")
            message = str(failed.get("message") or "the Job failed")
        return _ended(st, conditions, FAILED, reason, message, at, generation)
    if st.records != old.records:  # not on every pass: a status that changes with the clock alone
        _throughput(st, started, now)  # is written on every pass, and each write brings another
    active, ready = int(jst.get("active") or 0), int(jst.get("ready") or 0)
    if active or jst.get("succeeded") or jst.get("failed"):
        st.phase = bapi.BatchPhase.running.value
        st.message = f"{ready} of {active} worker pods scoring" if active else "workers finishing"
        reason = "Running"
    else:
        st.phase, st.message, reason = bapi.BatchPhase.pending.value, "waiting for worker pods", "Starting"
    conditions = set_condition(conditions, COMPLETE, False, reason, st.message, now=at, generation=generation)
    st.conditions = set_condition(
        conditions, FAILED, False, reason, st.message, now=at, generation=generation
    )
    return st


def _ended(
    st: bapi.BatchInferenceStatus,
    conditions: list[Any],
    which: str,
    reason: str,
    message: str,
    at: str,
    generation: int | None,
) -> bapi.BatchInferenceStatus:
    st.phase = bapi.BatchPhase.succeeded.value if which == COMPLETE else bapi.BatchPhase.failed.value
    st.message = message if which == COMPLETE else f"{reason}: {message}"
    st.completion_time = st.completion_time or at
    other = FAILED if which == COMPLETE else COMPLETE
    conditions = set_condition(conditions, which, True, reason, message, now=at, generation=generation)
    st.conditions = set_condition(conditions, other, False, reason, message, now=at, generation=generation)
    return st


def _counts(st: bapi.BatchInferenceStatus, reports: Reports, output_uri: str) -> None:
    """Shards, records and the manifest from the reports (the manifest's totals once written)."""
    if not reports.by_index:
        return
    # A shard that failed every try in a worker counts until a later try of its index gets further
    # (the latest report per index is the one with the most shards done).
    st.shards_failed = len({int(n) for r in reports.by_index.values() for n in r.get("failed_shards") or []})
    plan = max(int(r.get("plan") or 0) for r in reports.by_index.values())
    totals = next((r["totals"] for r in reports.by_index.values() if r.get("totals")), None)
    if totals:
        st.shards_succeeded, st.records, st.records_failed = (
            int(totals["shards"]),
            int(totals["records"]),
            int(totals["failed"]),
        )
        st.manifest = output_uri.rstrip("/") + "/" + shards.MANIFEST
        st.shards_failed = 0
    else:
        st.shards_succeeded = sum(int(r.get("shards") or 0) for r in reports.by_index.values())
        st.records = sum(int(r.get("records") or 0) for r in reports.by_index.values())
        st.records_failed = sum(int(r.get("failed") or 0) for r in reports.by_index.values())
    if plan:
        st.shards = plan
        st.progress = f"{st.shards_succeeded}/{plan}"


def _throughput(st: bapi.BatchInferenceStatus, started: datetime | None, until: datetime) -> None:
    if started is None or not st.records:
        return
    seconds = (until - started).total_seconds()
    if seconds > 0:
        st.records_per_second = round(st.records / seconds, 1)
