"""BatchInference orchestration on the local control plane (kwok fake nodes).

kwok runs no containers: a Job pod that starts ends as a worker would, with its annotations
``simulate.modeldeploy.io/termination-message`` (the worker's report) and ``.../exit-code`` as its
worker container's termination message and exit code (hack/kwok/stages.yaml). The annotations come
from the model's ``server.podAnnotations``, which the Job's pod template carries. What is tested is
the operator's side: the Job it creates, the status it derives from the Job and the reports, the
conditions ``kubectl wait`` reads, Events, waiting for what is missing, deletion. What a worker does
on a real node with real Triton and S3 is tested in the real-node tier.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from conftest import CustomObject, model_deployment, ready_on
from kube import Cluster, CommandError, hold_for, wait_for

pytestmark = pytest.mark.cluster

GROUP, VERSION, PLURAL = "modeldeploy.io", "v1alpha1", "batchinferences"
MODEL = {"format": "onnx", "storageUri": "s3://models/repo", "version": 4}
REPORT = "simulate.modeldeploy.io/termination-message"


def batch(name: str, *, model: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "BatchInference",
        "metadata": {"name": name},
        "spec": {
            "model": model or {"inline": {"model": MODEL}},
            "input": {"uri": "s3://data/in/"},
            "output": {"uri": "s3://data/out/"},
            **spec,
        },
    }


def reporting(report: dict[str, Any], *, labels: dict[str, str] | None = None, **ann: str) -> dict[str, Any]:
    """An inline model whose worker pods end with ``report`` as their termination message."""
    server: dict[str, Any] = {"podAnnotations": {REPORT: json.dumps(report), **ann}}
    if labels:
        server["podLabels"] = labels
    return {"inline": {"model": MODEL, "server": server}}


class BI(CustomObject):
    plural, kind = PLURAL, "BatchInference"

    def wait(self, check: Any, what: str, timeout: float = 60) -> dict[str, Any]:
        def once() -> dict[str, Any] | None:
            st = self.status()
            return st if check(st) else None

        return wait_for(once, timeout, message=lambda: f"{self.name}: {what}; status: {self.status()}")

    def job(self) -> Any:
        jobs = self.cluster.batch.list_namespaced_job(
            self.namespace, label_selector=f"modeldeploy.io/batch={self.name}"
        ).items
        return jobs[0] if jobs else None

    def reasons(self) -> list[tuple[str, str]]:
        return [(e.type, e.reason) for e in self.events()]

    def wait_event(self, type_: str, reason: str) -> None:
        """Events are posted after the status write they tell of, in the background."""
        wait_for(
            lambda: (type_, reason) in self.reasons(),
            30,
            message=lambda: f"{type_} {reason} in {self.reasons()}",
        )


@pytest.fixture
def bi_factory(cluster: Cluster, md_ns: str) -> Any:
    def create(body: dict[str, Any]) -> BI:
        cluster.apply(body, namespace=md_ns)
        return BI(cluster, md_ns, body["metadata"]["name"])

    return create


def test_a_batch_runs_as_an_indexed_job_and_succeeds_with_the_workers_counts(
    cluster: Cluster, md_ns: str, bi_factory: Any
) -> None:
    report = {"plan": 6, "shards": 3, "records": 300, "failed": 1}
    bi = bi_factory(batch("score", model=reporting(report), parallelism=2, concurrency=8, batchSize=16))

    # `kubectl wait --for=condition=Complete` is how a pipeline waits for it
    cluster.kubectl("wait", "--for=condition=Complete", "bi/score", "-n", md_ns, "--timeout=90s", timeout=100)
    st = bi.status()
    assert st["phase"] == "Succeeded", st
    assert (st["progress"], st["records"], st["recordsFailed"]) == ("6/6", 600, 2)
    assert st["startTime"] and st["completionTime"] and st["modelRevision"]
    assert (bi.condition("Failed") or {}).get("status") == "False"

    job = bi.job()
    assert (job.spec.completion_mode, job.spec.completions, job.spec.parallelism) == ("Indexed", 2, 2)
    owner = job.metadata.owner_references[0]
    assert (owner.kind, owner.name, owner.uid) == ("BatchInference", "score", bi.get()["metadata"]["uid"])
    pod = job.spec.template.spec
    [worker] = pod.containers
    assert (
        "--concurrency=8" in worker.args and "--batch-size=16" in worker.args and "--workers=2" in worker.args
    )
    assert [c.name for c in pod.init_containers] == ["preflight", "stage-model", "triton"]
    assert pod.init_containers[2].restart_policy == "Always"
    bi.wait_event("Normal", "Succeeded")

    # the printer columns
    table = cluster.kubectl("get", "bi", "score", "-n", md_ns).stdout.split()
    assert table[:5] == ["NAME", "PHASE", "PROGRESS", "RECORDS", "FAILED"]
    assert table[6:10] == ["score", "Succeeded", "6/6", "600"]


def test_a_worker_that_stops_the_job_fails_it_with_its_reason(
    cluster: Cluster, md_ns: str, bi_factory: Any
) -> None:
    report = {
        "reason": "TooManyFailedRecords",
        "message": "41 records failed so far, more than maxFailedRecords 40",
    }
    model = reporting(report, labels={"simulate": "job-fails"}, **{"simulate.modeldeploy.io/exit-code": "3"})
    bi = bi_factory(batch("doomed", model=model, parallelism=2, maxFailedRecords="40"))

    st = bi.wait(lambda s: s.get("phase") == "Failed", "phase Failed", timeout=90)
    failed = bi.condition("Failed") or {}
    assert (failed["status"], failed["reason"]) == ("True", "TooManyFailedRecords"), st
    assert "more than maxFailedRecords 40" in st["message"]
    bi.wait_event("Warning", "TooManyFailedRecords")
    # the pod failure policy failed the Job at the first such exit: no pod was started again
    job = bi.job()
    assert any(c.type == "Failed" and c.reason == "PodFailurePolicy" for c in job.status.conditions or [])
    cluster.kubectl("wait", "--for=condition=Failed", "bi/doomed", "-n", md_ns, "--timeout=5s")


def test_a_missing_model_deployment_or_secret_waits_with_the_reason_and_creates_nothing(
    cluster: Cluster, md_ns: str, bi_factory: Any, md_factory: Any
) -> None:
    bi = bi_factory(batch("by-ref", model={"modelDeploymentRef": {"name": "ranker"}}))
    st = bi.wait(
        lambda s: (bi.condition("Complete") or {}).get("reason") == "ModelDeploymentNotFound", "waiting"
    )
    assert st["phase"] == "Pending" and "ranker" in st["message"]
    secret = bi_factory(batch("no-creds", input={"uri": "s3://data/in/", "credentialsSecret": "nope"}))
    st = secret.wait(
        lambda s: (secret.condition("Complete") or {}).get("reason") == "CredentialsSecretNotFound", "wait"
    )
    assert "spec.input.credentialsSecret" in st["message"] and "'nope'" in st["message"]
    secret.wait_event("Warning", "CredentialsSecretNotFound")
    hold_for(lambda: bi.job() is None and secret.job() is None, 3, message="no Job while waiting")

    # the ModelDeployment appears and serves: the job scores with its stable revision's model version
    md = md_factory(model_deployment("ranker", version=7, replicas=1))
    ready_on(md, 1)
    bi.wait(lambda s: s.get("phase") in ("Running", "Succeeded"), "started", timeout=60)
    [worker] = bi.job().spec.template.spec.containers
    assert "--version=7" in worker.args
    assert bi.status()["modelRevision"] == md.status()["history"][0]["hash"]


def test_spec_is_immutable_and_deletion_removes_the_job(
    cluster: Cluster, md_ns: str, bi_factory: Any
) -> None:
    bi = bi_factory(
        batch("gone", model=reporting({"plan": 1, "shards": 1}, labels={"simulate": "never-ready"}))
    )
    wait_for(lambda: bi.job(), 30, message="the Job")
    with pytest.raises(CommandError) as refused:
        cluster.kubectl(
            "patch", "bi", "gone", "-n", md_ns, "--type=merge", "-p", '{"spec":{"parallelism":3}}'
        )
    assert "spec is immutable once created" in str(refused.value)
    uid = bi.job().metadata.uid
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, md_ns, PLURAL, "gone")
    wait_for(
        lambda: not any(j.metadata.uid == uid for j in cluster.batch.list_namespaced_job(md_ns).items),
        60,
        message="the Job garbage-collected",
    )
    wait_for(
        lambda: not cluster.core.list_namespaced_pod(md_ns, label_selector="modeldeploy.io/batch=gone").items,
        60,
        message="its pods gone",
    )
