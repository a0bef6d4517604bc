"""A BatchInference's status from its Job and its workers' reports (pure), and which model scores."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from modeldeploy import api
from modeldeploy.batch import api as bapi
from modeldeploy.batch import controller, status
from modeldeploy.modeldeployment import revision

NOW = datetime(2026, 12, 3, 12, 0, 10, tzinfo=UTC)


def pod(index: int, report: dict[str, Any] | None, name: str = "") -> dict[str, Any]:
    term = {"exitCode": 0, "message": json.dumps(report)} if report is not None else None
    cs = {"name": "worker", "state": {"terminated": term} if term else {"running": {}}}
    return {
        "metadata": {"name": name or f"bi-{index}", "labels": {status.INDEX_LABEL: str(index)}},
        "status": {"containerStatuses": [cs]},
    }


def job(*conditions: tuple[str, str], **st: Any) -> dict[str, Any]:
    return {
        "status": {
            "startTime": "2026-12-03T12:00:00Z",
            "conditions": [
                {"type": t, "status": "True", "reason": r, "lastTransitionTime": "2026-12-03T12:00:05Z"}
                for t, r in conditions
            ],
            **st,
        }
    }


def derive(job_: dict[str, Any] | None, pods: list[dict[str, Any]], **kw: Any) -> bapi.BatchInferenceStatus:
    return status.derive(
        bapi.BatchInferenceStatus(),
        generation=1,
        now=NOW,
        job=job_,
        pods=pods,
        output_uri="s3://b/out/",
        **kw,
    )


def cond(st: bapi.BatchInferenceStatus, type_: str) -> api.Condition:
    return next(c for c in st.conditions or [] if c.type == type_)


def test_no_job_yet_is_pending_with_the_reason_it_waits() -> None:
    st = derive(None, [], waiting=("ModelDeploymentNotFound", "spec.model.modelDeploymentRef: ..."))
    assert st.phase == "Pending"
    assert (cond(st, "Complete").status, cond(st, "Complete").reason) == ("False", "ModelDeploymentNotFound")


def test_running_progress_sums_each_workers_latest_report() -> None:
    pods = [
        pod(0, {"worker": 0, "plan": 8, "shards": 2, "records": 200, "failed": 1}, "a"),
        pod(0, {"worker": 0, "plan": 8, "shards": 3, "records": 300, "failed": 1}, "b"),  # the retry
        pod(1, None),
    ]
    st = derive(job(active=1, ready=1), pods)
    assert st.phase == "Running" and st.progress == "3/8"
    assert (st.records, st.records_failed, st.shards) == (300, 1, 8)
    assert st.records_per_second == 30.0  # 300 records in the 10 s since the Job started


def test_complete_job_succeeds_with_the_manifests_totals() -> None:
    totals = {"shards": 8, "records": 1000, "failed": 2}
    pods = [
        pod(0, {"worker": 0, "plan": 8, "shards": 4, "records": 500, "failed": 1}),
        pod(1, {"worker": 1, "plan": 8, "shards": 4, "records": 498, "failed": 1, "totals": totals}),
    ]
    st = derive(job(("Complete", "CompletionsReached"), completionTime="2026-12-03T12:00:05Z"), pods)
    assert st.phase == "Succeeded" and st.progress == "8/8" and st.records == 1000
    assert st.manifest == "s3://b/out/_manifest.json"
    assert cond(st, "Complete").status == "True" and cond(st, "Failed").status == "False"
    assert st.completion_time == "2026-12-03T12:00:05Z" and st.records_per_second == 200.0


def test_failed_job_reports_the_workers_reason() -> None:
    report = {"worker": 0, "reason": "TooManyFailedRecords", "message": "12 records failed so far"}
    st = derive(job(("Failed", "PodFailurePolicy")), [pod(0, report)])
    assert st.phase == "Failed"
    assert (cond(st, "Failed").status, cond(st, "Failed").reason) == ("True", "TooManyFailedRecords")
    assert "12 records failed" in (st.message or "")
    ev = controller.events(bapi.BatchInferenceStatus(phase="Running"), st)
    assert ev == [("Warning", "TooManyFailedRecords", st.message)]


def test_failed_job_without_a_report_says_the_jobs_reason() -> None:
    st = derive(job(("Failed", "DeadlineExceeded")), [pod(0, None)])
    assert cond(st, "Failed").reason == "DeadlineExceeded"


def test_an_invalid_spec_fails_at_once() -> None:
    st = derive(None, [], invalid="spec.parallelism: must be at least 1")
    assert st.phase == "Failed" and cond(st, "Failed").reason == "InvalidSpec"


def test_a_worker_message_that_is_not_json_is_kept_as_the_reason() -> None:
    p = pod(0, None)
    p["status"]["containerStatuses"][0]["state"] = {"terminated": {"exitCode": 1, "message": "Traceback ..."}}
    assert status.collect([p]).failure == ("WorkerError", "Traceback ...")


SPEC = {"model": {"format": "python", "storageUri": "s3://models/m", "version": 3}}


def md(status_: dict[str, Any] | None) -> dict[str, Any]:
    return {"metadata": {"name": "m"}, "spec": SPEC, "status": status_ or {}}


def bi(ref: str | None = "m") -> bapi.BatchInferenceSpec:
    model = {"modelDeploymentRef": {"name": ref}} if ref else {"inline": SPEC}
    return bapi.BatchInferenceSpec.model_validate(
        {"model": model, "input": {"uri": "s3://d/in"}, "output": {"uri": "s3://d/out"}}
    )


def test_a_model_deployment_scores_with_its_stable_revision_not_its_spec() -> None:
    stable = api.ModelDeploymentSpec.model_validate({**SPEC, "model": {**SPEC["model"], "version": 2}})
    rec = {"revision": 1, "modelVersion": 2, "image": "t", "created": "x", "outcome": "Serving"}
    history = [{**rec, "hash": revision.revision_hash(stable), "spec": revision.pod_shaping(stable)}]
    got = controller.resolve_model(bi(), md({"stableRevision": 1, "history": history}))
    assert isinstance(got, controller.Model)
    assert got.spec.model.version == 2 and got.revision == revision.revision_hash(stable)


def test_a_model_deployment_without_a_stable_revision_or_missing_waits() -> None:
    assert controller.resolve_model(bi(), md(None))[0] == "NoStableRevision"  # type: ignore[index]
    assert controller.resolve_model(bi(), None)[0] == "ModelDeploymentNotFound"  # type: ignore[index]


def test_an_inline_model_scores_as_written() -> None:
    got = controller.resolve_model(bi(None), None)
    assert isinstance(got, controller.Model) and got.spec.model.version == 3


def test_running_workers_progress_counts_until_their_final_report() -> None:
    live = [
        {"worker": 0, "plan": 8, "shards": 1, "records": 100, "failed": 0},
        {"worker": 1, "plan": 8, "shards": 2, "records": 200, "failed": 1, "reason": "ignored while running"},
    ]
    st = derive(job(active=2, ready=2), [pod(0, None), pod(1, None)], live=live)
    assert (st.phase, st.progress, st.records, st.records_failed) == ("Running", "3/8", 300, 1)
    ended = [pod(0, {"worker": 0, "plan": 8, "shards": 4, "records": 400, "failed": 0}), pod(1, None)]
    st = derive(job(active=1, ready=1), ended, live=live)
    assert (st.progress, st.records) == ("6/8", 600)


def test_progress_is_read_from_pods_whose_worker_runs() -> None:
    running = pod(0, None)
    running["status"]["podIP"] = "10.0.0.7"
    waiting = pod(1, None)
    waiting["status"].update(
        podIP="10.0.0.8", containerStatuses=[{"name": "worker", "state": {"waiting": {}}}]
    )
    assert controller.running_workers([running, waiting, pod(2, {"shards": 1})]) == ["http://10.0.0.7:8090/"]


def test_a_failed_preflight_is_the_jobs_reason() -> None:
    p = pod(0, None)
    message = json.dumps({"worker": 0, "reason": "OutputNotWritable", "message": "403 Forbidden"})
    p["status"]["initContainerStatuses"] = [
        {"name": "preflight", "state": {"terminated": {"exitCode": 2, "message": message}}}
    ]
    p["status"]["containerStatuses"] = [
        {"name": "worker", "state": {"waiting": {"reason": "PodInitializing"}}}
    ]
    st = derive(job(("Failed", "PodFailurePolicy")), [p])
    assert cond(st, "Failed").reason == "OutputNotWritable" and "403 Forbidden" in (st.message or "")
    passed = pod(1, None)
    passed["status"]["initContainerStatuses"] = [
        {"name": "preflight", "state": {"terminated": {"exitCode": 0, "message": '{"worker": 1, "plan": 4}'}}}
    ]
    assert status.collect([passed]).by_index == {}  # a preflight that passed reports nothing


def test_a_shard_that_failed_every_try_counts_until_a_later_try_gets_further() -> None:
    report = {"worker": 1, "plan": 8, "shards": 1, "records": 100, "failed_shards": [5]}
    failed = pod(1, {**report, "reason": "WorkerError", "message": "ConnectionError: triton went away"}, "a")
    st = derive(job(active=1, ready=1, failed=1), [failed, pod(1, None, "b")])
    assert st.shards_failed == 1 and st.progress == "1/8"
    retry = pod(1, {"worker": 1, "plan": 8, "shards": 4, "records": 400}, "b")
    st = derive(job(("Complete", "CompletionsReached"), failed=1), [failed, retry])
    assert st.shards_failed == 0 and st.progress == "4/8"
    gave_up = derive(job(("Failed", "FailedIndexes"), failed=4), [failed])
    assert gave_up.shards_failed == 1 and cond(gave_up, "Failed").reason == "WorkerError"


def test_a_running_status_does_not_change_with_the_clock_alone() -> None:
    """Each status write is a watch event and another pass: a status that changed with the time
    alone (records per second over a growing span) was written on every pass, without end."""
    live = [{"worker": 0, "plan": 8, "shards": 2, "records": 200}]
    first = derive(job(active=1, ready=1), [pod(0, None)], live=live)
    later = status.derive(
        first, generation=1, now=NOW + timedelta(seconds=7), job=job(active=1, ready=1),
        pods=[pod(0, None)], live=live, output_uri="s3://b/out/",
    )  # fmt: skip
    assert later == first
    more = [{"worker": 0, "plan": 8, "shards": 3, "records": 340}]
    moved = status.derive(
        first, generation=1, now=NOW + timedelta(seconds=7), job=job(active=1, ready=1),
        pods=[pod(0, None)], live=more, output_uri="s3://b/out/",
    )  # fmt: skip
    assert (moved.records, moved.records_per_second) == (340, 20.0)


def test_workers_are_asked_for_progress_at_most_every_few_seconds() -> None:
    asked: list[str] = []
    clock = [100.0]

    async def progress(url: str) -> dict[str, Any]:
        asked.append(url)
        return {"worker": 0, "plan": 8, "shards": len(asked)}

    rec = controller.BatchReconciler(
        None, None, post_event=None, progress=progress, monotonic=lambda: clock[0]
    )  # type: ignore[arg-type]
    running = pod(0, None)
    running["status"]["podIP"] = "10.0.0.7"

    def ask() -> list[dict[str, Any]]:
        return asyncio.run(rec.live_reports("ns", "bi", [running]))

    assert ask() == [{"worker": 0, "plan": 8, "shards": 1}]
    clock[0] += controller.PROGRESS_POLL_SECONDS - 0.5
    assert ask() == [{"worker": 0, "plan": 8, "shards": 1}] and len(asked) == 1  # the last answer
    clock[0] += 1
    assert ask()[0]["shards"] == 2 and len(asked) == 2
    assert controller.PROGRESS_POLL_SECONDS < controller.RUNNING_RESYNC_SECONDS  # each resync asks
