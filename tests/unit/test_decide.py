"""decide(): the pure middle of the reconcile, on in-memory observations (no cluster, no API).

Every path, the error paths included: what status says, which Events, which children, when to look
again; and that the offline render is exactly what the reconcile applies once revision 1 serves.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from modeldeploy import api, cli
from modeldeploy.modeldeployment import builders, decide, rollout
from modeldeploy.modeldeployment.observe import Observation

T0 = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
UID = "00000000-0000-0000-0000-000000000000"
MODEL = {"format": "onnx", "storageUri": "s3://models/repo", "version": 1}


def md(spec: dict[str, Any], status: dict[str, Any] | None = None, **annotations: str) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {
            "name": "m",
            "namespace": "ns",
            "uid": UID,
            "generation": 3,
            "annotations": annotations,
        },
        "spec": spec,
        "status": status or {},
    }


def observe(
    body: dict[str, Any],
    *,
    now: datetime = T0,
    exists: dict[tuple[str, str, str], bool] | None = None,
    deployments: dict[str, dict[str, Any]] | None = None,
    pods: list[dict[str, Any]] | None = None,
    refused: dict[tuple[str, str], tuple[str, str, float]] | None = None,
) -> Observation:
    return Observation(
        md=body,
        now=now,
        spec=api.ModelDeploymentSpec.model_validate(body["spec"]),
        spec_error=None,
        old_status=api.ModelDeploymentStatus.model_validate(body["status"]),
        deployments=deployments or {},
        pods=pods or [],
        refused=refused or {},
        exists=exists or {},
    )


def ready_revision(
    obs: Observation, number: int, replicas: int
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """The Deployment and pods of revision ``number`` as the cluster shows them once all are ready."""
    assert obs.spec is not None
    rec = next(r for r in obs.old_status.history or [] if r.revision == number)
    name = builders.deployment_name(obs.owner, rec.hash, obs.spec.rollout.strategy)
    dep = {
        "metadata": {"name": name, "generation": 1},
        "spec": {"replicas": replicas},
        "status": {"observedGeneration": 1, "replicas": replicas, "updatedReplicas": replicas},
    }
    pods = [
        {
            "metadata": {"name": f"{name}-{i}", "labels": {builders.LABEL_REVISION: rec.hash}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        }
        for i in range(replicas)
    ]
    return {name: dep}, pods


def persisted(body: dict[str, Any], decision: decide.Decision) -> dict[str, Any]:
    """The ModelDeployment as the next reconcile sees it: with the status just decided."""
    return {**body, "status": decide.dump_status(decision.status)}


def condition(st: api.ModelDeploymentStatus, type_: str) -> api.Condition:
    return next(c for c in st.conditions or [] if c.type == type_)


# --------------------------------------------------------------------------- a first revision


def test_first_revision_is_recorded_and_created_at_full_size() -> None:
    d = decide.decide(observe(md({"model": MODEL, "replicas": 2})))
    assert d.status.rollout is not None
    assert (d.status.rollout.state, d.status.rollout.candidate_revision) == (rollout.PROMOTING, 1)
    assert [(r.revision, r.outcome, r.created) for r in d.status.history or []] == [
        (1, "Progressing", "2026-12-02T12:00:00Z")
    ]
    assert d.status.phase == "Pending" and d.status.ready == "0/2"
    # The pods wanted: those of the Deployment this decision creates (not 0 until it is seen, which
    # would take a second status write for the count alone).
    assert (d.status.replicas, d.status.ready_replicas) == (2, 0)
    assert d.events == [("Normal", "Creating", "revision 1 created")]
    assert d.children is not None
    deps = [c for c in d.children if c["kind"] == "Deployment"]
    assert len(deps) == 1 and deps[0]["spec"]["replicas"] == 2
    assert sorted(c["metadata"]["name"] for c in d.children if c["kind"] == "Service") == [
        "m",
        "m-canary",
        "m-stable",
    ]


def test_first_revision_becomes_ready_then_render_is_exactly_what_is_applied() -> None:
    spec = {
        "model": MODEL,
        "autoscaling": {"minReplicas": 2, "maxReplicas": 4, "targetCPUUtilization": 70},
        "podDisruptionBudget": {"minAvailable": 1},
    }
    first = decide.decide(observe(md(spec)))
    body = persisted(md(spec), first)
    deps, pods = ready_revision(observe(body), 1, 2)
    promoted = decide.decide(observe(body, now=T0 + timedelta(seconds=5), deployments=deps, pods=pods))
    assert promoted.status.phase == "Ready" and promoted.status.ready == "2/2"
    assert [e[1] for e in promoted.events] == ["Promoted"]
    rendered = cli.render(md(spec), namespace="ns")
    assert promoted.children == rendered  # the offline render cannot drift from the reconcile
    dep = next(c for c in rendered if c["kind"] == "Deployment")
    assert "replicas" not in dep["spec"]  # the HPA owns them once revision 1 is stable


def test_deciding_twice_gives_the_same_decision_and_leaves_the_observation_alone() -> None:
    body = md({"model": MODEL})
    obs = observe(body)
    before = copy.deepcopy(body)
    assert decide.decide(obs) == decide.decide(obs)
    assert body == before


# --------------------------------------------------------------------------- the error paths


def test_invalid_spec_fails_a_new_model_and_touches_no_children() -> None:
    body = md({"model": MODEL})
    obs = Observation(
        md=body,
        now=T0,
        spec=None,
        spec_error="spec.model.version: Input should be an integer",
        old_status=api.ModelDeploymentStatus(),
        deployments={},
        pods=[],
    )
    d = decide.decide(obs)
    assert d.children is None and d.requeue_after is None
    assert d.status.phase == "Failed"
    assert d.status.message == "spec.model.version: Input should be an integer"
    assert d.events == [("Warning", "InvalidSpec", "spec.model.version: Input should be an integer")]
    assert condition(d.status, "Ready").status == "False"
    assert condition(d.status, "Progressing").reason == "InvalidSpec"


def serving(spec: dict[str, Any]) -> dict[str, Any]:
    """A ModelDeployment whose revision 1 serves (status as the reconcile left it)."""
    first = decide.decide(observe(md(spec)))
    body = persisted(md(spec), first)
    deps, pods = ready_revision(observe(body), 1, 1)
    return persisted(body, decide.decide(observe(body, deployments=deps, pods=pods)))


def test_spec_error_on_a_serving_model_keeps_it_serving_and_reports_once() -> None:
    body = serving({"model": MODEL})
    assert body["status"]["phase"] == "Ready"
    body["spec"] = {"model": MODEL, "rollbackTo": {"revision": 7}}
    d = decide.decide(observe(body))
    assert d.children is None  # nothing that runs is touched
    assert d.status.phase == "Ready"
    assert d.status.message == (
        "spec.rollbackTo.revision 7 is not in status.history (known: 1); pick one of those or remove "
        "spec.rollbackTo"
    )
    assert [e[:2] for e in d.events] == [("Warning", "UnknownRevision")]
    again = decide.decide(observe(persisted(body, d)))
    assert again.events == [] and again.status == d.status  # reported once, not on every reconcile


@pytest.mark.parametrize(
    ("model", "missing", "reason", "requeue"),
    [
        (
            {"format": "onnx", "storageUri": "pvc://claim/repo", "version": 1},
            ("PersistentVolumeClaim", "ns", "claim"),
            "ClaimMissing",
            None,
        ),
        (
            {**MODEL, "credentialsSecret": "creds"},
            ("Secret", "ns", "creds"),
            "CredentialsSecretMissing",
            decide.MISSING_SECRET_RETRY_SECONDS,
        ),
    ],
)
def test_a_missing_reference_stops_a_new_revision_before_it_exists(
    model: dict[str, Any], missing: tuple[str, str, str], reason: str, requeue: float | None
) -> None:
    d = decide.decide(observe(md({"model": model}), exists={missing: False}))
    assert (d.status.phase, d.children, d.requeue_after) == ("Failed", None, requeue)
    assert d.status.history is None  # no revision recorded for what cannot run
    assert [e[:2] for e in d.events] == [("Warning", reason)]
    assert missing[2] in (d.status.message or "")
    present = decide.decide(observe(md({"model": model}), exists={missing: True}))
    assert present.children and present.status.phase == "Pending"


def test_a_model_config_triton_cannot_load_is_refused_with_its_field() -> None:
    # Accepted by the schema (CEL asks only for ensembleSteps), but Triton needs inputs/outputs.
    steps = [{"modelName": "pre", "inputMap": {"a": "b"}, "outputMap": {"c": "d"}}]
    model = {"format": "ensemble", "storageUri": "s3://m/r", "version": 1, "config": {"ensembleSteps": steps}}
    d = decide.decide(observe(md({"model": model})))
    assert d.children is None and d.status.phase == "Failed" and d.status.history is None
    assert [e[:2] for e in d.events] == [("Warning", "InvalidModelConfig")]
    assert "model.config.inputs" in condition(d.status, "Progressing").message


def test_children_the_api_server_refused_make_a_serving_model_degraded() -> None:
    body = serving({"model": MODEL})
    deps, pods = ready_revision(observe(body), 1, 1)
    refused = {("Service", "m-canary"): ("h", 'Service "m-canary" is invalid: boom', 0.0)}
    d = decide.decide(observe(body, deployments=deps, pods=pods, refused=refused))
    assert d.status.phase == "Degraded"
    assert d.status.message == (
        'serving revision 1; the API server refused Service m-canary: Service "m-canary" is invalid: boom'
    )
    degraded = condition(d.status, "Degraded")
    assert (degraded.status, degraded.reason) == ("True", "ChildRejected")
    assert d.children  # the rest is still applied


def test_a_refused_deployment_is_the_revisions_failure() -> None:
    body = persisted(md({"model": MODEL}), decide.decide(observe(md({"model": MODEL}))))
    obs = observe(body)
    rec = (obs.old_status.history or [])[0]
    name = builders.deployment_name(obs.owner, rec.hash, api.Strategy.canary)
    refused = {("Deployment", name): ("h", "spec.template: Invalid value", 0.0)}
    d = decide.decide(observe(body, refused=refused))
    assert d.status.phase == "Failed"
    assert "RejectedByAPIServer: Deployment" in (d.status.message or "")
    assert [e[:2] for e in d.events] == [("Warning", "RevisionFailed")]


def test_a_command_annotation_is_acted_on_once() -> None:
    spec = {"model": MODEL, "replicas": 1}
    body = serving(spec)
    body["spec"] = {"model": {**MODEL, "version": 2}, "replicas": 1}
    started = decide.decide(observe(body))
    assert [e[1] for e in started.events] == ["RolloutStarted"]
    body = persisted(body, started)
    body["metadata"]["annotations"] = {api.PROMOTE_ANNOTATION: "n1"}
    promoted = decide.decide(observe(body))
    assert [e[1] for e in promoted.events] == ["PromoteRequested"]
    assert promoted.status.rollout is not None and promoted.status.rollout.handled_promote == "n1"
    after = decide.decide(observe(persisted(body, promoted)))
    assert "PromoteRequested" not in [e[1] for e in after.events]
