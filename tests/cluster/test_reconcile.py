"""The ModelDeployment API and the core reconcile, against the real local cluster with the
operator running as a subprocess (issue: API and core reconcile)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from conftest import MD, model_deployment
from kube import Cluster, hold_for, unique_name, wait_for
from operator_proc import OperatorProcess

FAST_CANARY = {"steps": [{"weight": 50}, {"weight": 100}], "scaleDownDelaySeconds": 0}


def _deployment(md: MD) -> Any:
    deps = md.deployments()
    assert len(deps) == 1, [d.metadata.name for d in deps]
    return deps[0]


def _wait_single_deployment(md: MD, pred: Any, timeout: float = 60) -> Any:
    def check() -> Any:
        deps = md.deployments()
        return deps[0] if len(deps) == 1 and pred(deps[0]) else None

    return wait_for(
        check,
        timeout,
        message=lambda: (
            f"deployments of {md.name}: {[(d.metadata.name, d.spec.replicas) for d in md.deployments()]}"
        ),
    )


def test_create_makes_children_and_becomes_ready(cluster: Cluster, md_factory: Any) -> None:
    md = md_factory(
        model_deployment(
            "resnet",
            replicas=2,
            server={
                "image": "nvcr.io/nvidia/tritonserver:25.10-py3",
                "args": ["--log-verbose=1"],
                "resources": {"requests": {"cpu": "1", "memory": "2Gi"}},
            },
        )
    )
    st = md.wait_phase("Ready", timeout=90)
    assert st["ready"] == "2/2" and st["servingVersion"] == 1 and st["strategy"] == "Canary"
    assert st["observedGeneration"] == md.get()["metadata"]["generation"]
    assert st["endpoints"]["http"] == f"http://resnet.{md.namespace}.svc:8000"
    assert st["history"][0]["revision"] == 1 and st["history"][0]["outcome"] == "Serving"

    dep = _deployment(md)
    owner = dep.metadata.owner_references[0]
    assert (owner.kind, owner.name, owner.controller) == ("ModelDeployment", "resnet", True)
    labels = dep.metadata.labels
    for key in ("name", "instance", "version", "component", "managed-by"):
        assert f"app.kubernetes.io/{key}" in labels
    assert labels["modeldeploy.io/name"] == "resnet" and labels["modeldeploy.io/revision"]
    c = dep.spec.template.spec.containers[0]
    assert [p.container_port for p in c.ports] == [8000, 8001, 8002]
    assert c.readiness_probe.http_get.path == "/v2/models/resnet/versions/1/ready"
    assert c.startup_probe is not None and c.liveness_probe.http_get.path == "/v2/health/live"
    assert "--log-verbose=1" in c.args and c.security_context.allow_privilege_escalation is False
    assert c.security_context.capabilities.drop == ["ALL"]
    pod_sc = dep.spec.template.spec.security_context
    assert pod_sc.run_as_non_root is True and pod_sc.seccomp_profile.type == "RuntimeDefault"
    shm = next(v for v in dep.spec.template.spec.volumes if v.name == "dshm")
    assert shm.empty_dir.medium == "Memory"

    services = {s.metadata.name: s for s in cluster.core.list_namespaced_service(md.namespace).items}
    assert set(services) == {"resnet", "resnet-stable", "resnet-canary"}
    for svc in services.values():
        assert [p.port for p in svc.spec.ports] == [8000, 8001, 8002]
        assert svc.metadata.owner_references[0].uid == md.get()["metadata"]["uid"]

    # The main Service has the ready pods as endpoints.
    def endpoints() -> int:
        slices = client.DiscoveryV1Api(cluster.api_client).list_namespaced_endpoint_slice(
            md.namespace, label_selector="kubernetes.io/service-name=resnet"
        )
        return sum(1 for s in slices.items for e in s.endpoints or [] if e.conditions and e.conditions.ready)

    wait_for(lambda: endpoints() == 2, 30, message="2 ready endpoints on Service resnet")

    # kubectl wait and kubectl get work as a user expects.
    cluster.kubectl("wait", "-n", md.namespace, "--for=condition=Ready", "md/resnet", "--timeout=30s")
    out = cluster.kubectl("get", "md", "-n", md.namespace).stdout.splitlines()
    assert out[0].split()[:6] == ["NAME", "READY", "VERSION", "STRATEGY", "PHASE", "WEIGHT"]
    assert out[1].split()[:6] == ["resnet", "2/2", "1", "Canary", "Ready", "0"]
    # Events are posted after the status write they tell of (in the background): wait for it
    wait_for(lambda: any(e.reason == "Promoted" for e in md.events()), 30, message="a Promoted Event")


def test_updates_reach_children(cluster: Cluster, md_factory: Any) -> None:
    md = md_factory(model_deployment("upd", replicas=1, rollout=FAST_CANARY))
    md.wait_phase("Ready", timeout=90)
    first = _deployment(md).metadata.name

    md.patch({"spec": {"replicas": 3}})
    dep = _wait_single_deployment(md, lambda d: d.spec.replicas == 3 and (d.status.ready_replicas or 0) == 3)
    assert dep.metadata.name == first, "a replica change must not create a new revision"
    md.wait_phase("Ready")

    md.patch(
        {
            "spec": {
                "server": {
                    "args": ["--log-info=true"],
                    "resources": {"requests": {"cpu": "2"}, "limits": {"memory": "4Gi"}},
                }
            }
        }
    )

    def rolled(d: Any) -> bool:
        c = d.spec.template.spec.containers[0]
        return d.metadata.name != first and "--log-info=true" in c.args and c.resources.requests["cpu"] == "2"

    dep = _wait_single_deployment(md, rolled, timeout=120)
    assert dep.spec.replicas == 3
    st = md.wait_phase("Ready")
    assert [h["outcome"] for h in st["history"]] == ["Superseded", "Serving"]


def test_hand_edits_and_deletions_are_restored(cluster: Cluster, md_factory: Any) -> None:
    md = md_factory(model_deployment("drift", replicas=1))
    md.wait_phase("Ready", timeout=90)
    dep = _deployment(md)
    name = dep.metadata.name
    good_args = list(dep.spec.template.spec.containers[0].args)

    cluster.kubectl(
        "patch",
        "deployment",
        name,
        "-n",
        md.namespace,
        "--type=json",
        "-p",
        json.dumps(
            [
                {
                    "op": "replace",
                    "path": "/spec/template/spec/containers/0/args",
                    "value": ["tritonserver", "--model-repository=/tmp/evil"],
                }
            ]
        ),
    )
    wait_for(
        lambda: (
            cluster.apps.read_namespaced_deployment(name, md.namespace).spec.template.spec.containers[0].args
            == good_args
        ),
        30,
        message="container args restored",
    )

    cluster.kubectl("delete", "service", "drift-canary", "-n", md.namespace)
    wait_for(
        lambda: any(
            s.metadata.name == "drift-canary"
            for s in cluster.core.list_namespaced_service(md.namespace).items
        ),
        30,
        message="Service drift-canary recreated",
    )

    cluster.kubectl("delete", "deployment", name, "-n", md.namespace, "--wait=false")
    wait_for(
        lambda: any(
            d.metadata.name == name
            and d.metadata.deletion_timestamp is None
            and (d.status.ready_replicas or 0) == 1
            for d in md.deployments()
        ),
        60,
        message=f"Deployment {name} recreated and ready",
    )


def _operator_writes(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    """Write requests (create/update/patch/delete) the operator sent for objects in ``namespace``."""
    out = []
    for ev in cluster.audit_events():
        ref = ev.get("objectRef") or {}
        agent = ev.get("userAgent", "")
        if ref.get("namespace") == namespace and (agent.startswith("kopf") or "modeldeploy" in agent):
            out.append(ev)
    return out


@pytest.mark.slow
def test_steady_state_writes_nothing(cluster: Cluster, md_factory: Any, operator: OperatorProcess) -> None:
    if cluster.control_plane is None:
        pytest.skip("needs the local backend's audit log")
    md = md_factory(model_deployment("quiet", replicas=2))
    md.wait_phase("Ready", timeout=90)
    # Let the status settle (Ready is written with the last change): the count stops moving.
    seen: list[int] = []

    def settled() -> bool:
        seen.append(len(_operator_writes(cluster, md.namespace)))
        return len(seen) > 15 and seen[-1] > 0 and len(set(seen[-15:])) == 1

    wait_for(settled, 30, message=lambda: f"write count to settle: {seen[-20:]}")
    baseline = seen[-1]
    # Creation costs one write per child: the first revision's Services already select it as they will
    # once it is promoted, so nothing is written twice on the way to Ready.
    per_child = Counter(
        (e["objectRef"]["resource"], e["objectRef"].get("name"))
        for e in _operator_writes(cluster, md.namespace)
        if e["objectRef"]["resource"] in ("deployments", "services", "configmaps")
    )
    assert len(per_child) == 4 and set(per_child.values()) == {1}, per_child

    # Two resync periods (the session operator resyncs every 10 s): reconciles run, nothing is written.
    reconciles_before = operator.metric("modeldeploy_reconciles_total")
    hold_for(
        lambda: len(_operator_writes(cluster, md.namespace)) == baseline,
        25,
        message=lambda: (
            f"no writes at steady state; new: {_operator_writes(cluster, md.namespace)[baseline:]}"
        ),
    )
    assert operator.metric("modeldeploy_reconciles_total") >= reconciles_before + 2, "resync reconciles ran"

    # An operator restart re-reconciles everything from scratch and still writes nothing.
    operator.restart()
    hold_for(
        lambda: len(_operator_writes(cluster, md.namespace)) == baseline,
        15,
        message=lambda: f"no writes after restart; new: {_operator_writes(cluster, md.namespace)[baseline:]}",
    )
    assert operator.metric("modeldeploy_reconciles_total") >= 1


def test_scale_subresource_and_hpa(cluster: Cluster, md_factory: Any) -> None:
    md = md_factory(model_deployment("scaly", replicas=1))
    md.wait_phase("Ready", timeout=90)
    cluster.kubectl("scale", "md/scaly", "-n", md.namespace, "--replicas=3")
    _wait_single_deployment(md, lambda d: d.spec.replicas == 3 and (d.status.ready_replicas or 0) == 3)
    wait_for(
        lambda: md.status().get("replicas") == 3 and md.status().get("ready") == "3/3",
        30,
        message=lambda: f"status replicas 3: {md.status()}",
    )
    scale = cluster.kubectl(
        "get",
        "--raw",
        f"/apis/modeldeploy.io/v1alpha1/namespaces/{md.namespace}/modeldeployments/scaly/scale",
    )
    assert json.loads(scale.stdout)["status"]["replicas"] == 3

    auto = md_factory(
        model_deployment(
            "auto",
            replicas=None,
            autoscaling={
                "minReplicas": 2,
                "maxReplicas": 5,
                "targetCPUUtilization": 70,
                "queueTimeMicroseconds": 500,
            },
        )
    )
    auto.wait_phase("Ready", timeout=90)
    hpa = cluster.autoscaling.read_namespaced_horizontal_pod_autoscaler("auto", md.namespace)
    dep = _deployment(auto)
    assert hpa.spec.scale_target_ref.name == dep.metadata.name
    assert (hpa.spec.min_replicas, hpa.spec.max_replicas) == (2, 5)
    assert {m.type for m in hpa.spec.metrics} == {"Resource", "Pods"}

    # The first revision is created with replicas (the HPA's floor, so it starts at full size) and handed
    # over to the HPA right after Ready is persisted (status first, then children): wait for that apply,
    # and the hand-over must keep the size (dropping the field would default it to 1).
    def operator_owns_replicas(d: Any) -> bool:
        return any(
            mf.manager == "modeldeploy-operator"
            and "f:replicas" in json.dumps((mf.fields_v1 or {}).get("f:spec", {}))
            for mf in d.metadata.managed_fields
        )

    _wait_single_deployment(auto, lambda d: not operator_owns_replicas(d), timeout=30)
    hold_for(
        lambda: (d := _deployment(auto)).spec.replicas == 2 and not operator_owns_replicas(d),
        3,
        message="the HPA-managed Deployment keeps 2 replicas, and the operator does not take them back",
    )
    # And the scale subresource refuses replicas while autoscaling is on (CEL: replicas xor autoscaling).
    res = cluster.kubectl("scale", "md/auto", "-n", md.namespace, "--replicas=4", check=False)
    assert res.returncode != 0 and "autoscaling" in res.stderr


def test_delete_removes_every_child(cluster: Cluster, md_factory: Any) -> None:
    md = md_factory(
        model_deployment(
            "gone",
            replicas=2,
            podDisruptionBudget={"maxUnavailable": 1},
            model={
                "format": "python",
                "storageUri": "https://models.example/repo.tar.gz",
                "version": 1,
                "config": {"maxBatchSize": 8},
            },
        )
    )
    md.wait_phase("Ready", timeout=90)
    ns = md.namespace
    assert cluster.core.list_namespaced_config_map(ns, label_selector="modeldeploy.io/name=gone").items
    cluster.kubectl("delete", "md/gone", "-n", ns, "--timeout=60s")

    def leftovers() -> list[str]:
        sel = "modeldeploy.io/name=gone"
        found = [
            d.metadata.name for d in cluster.apps.list_namespaced_deployment(ns, label_selector=sel).items
        ]
        found += [s.metadata.name for s in cluster.core.list_namespaced_service(ns, label_selector=sel).items]
        found += [
            c.metadata.name for c in cluster.core.list_namespaced_config_map(ns, label_selector=sel).items
        ]
        found += [p.metadata.name for p in cluster.core.list_namespaced_pod(ns, label_selector=sel).items]
        pdbs = client.PolicyV1Api(cluster.api_client).list_namespaced_pod_disruption_budget(ns)
        found += [p.metadata.name for p in pdbs.items]
        return found

    wait_for(lambda: leftovers() == [], 60, message=lambda: f"no children left; still: {leftovers()}")


INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("unknown format", {"model": {"format": "caffe"}}, "spec.model.format"),
    ("negative replicas", {"replicas": -1}, "spec.replicas"),
    (
        "min > max",
        {"replicas": None, "autoscaling": {"minReplicas": 5, "maxReplicas": 2, "targetCPUUtilization": 50}},
        "minReplicas",
    ),
    ("unknown field", {"modle": {}}, "modle"),
    ("bad storage scheme", {"model": {"storageUri": "ftp://x/y"}}, "spec.model.storageUri"),
    ("falling weights", {"rollout": {"steps": [{"weight": 50}, {"weight": 20}]}}, "spec.rollout.steps"),
    ("weight > 100", {"rollout": {"steps": [{"weight": 120}]}}, "weight"),
    ("weight 0", {"rollout": {"steps": [{"weight": 0}]}}, "weight"),
    ("unknown strategy", {"rollout": {"strategy": "Shadow"}}, "spec.rollout.strategy"),
    (
        "replicas and autoscaling",
        {"autoscaling": {"maxReplicas": 3, "targetCPUUtilization": 50}},
        "spec.replicas or spec.autoscaling",
    ),
    ("version zero", {"model": {"version": 0}}, "spec.model.version"),
    ("missing model", {"model": None}, "spec.model"),
    (
        "bad duration",
        {"rollout": {"steps": [{"weight": 10, "pause": {"duration": "ten minutes"}}]}},
        "duration",
    ),
    ("autoscaling without target", {"replicas": None, "autoscaling": {"maxReplicas": 3}}, "autoscaling"),
    ("steps with BlueGreen", {"rollout": {"strategy": "BlueGreen", "steps": [{"weight": 10}]}}, "steps"),
    ("error rate > 1", {"rollout": {"analysis": {"thresholds": {"maxErrorRate": 2}}}}, "maxErrorRate"),
    (
        "prometheus and scrape",
        {"rollout": {"analysis": {"prometheusUrl": "http://p:9090", "scrape": True}}},
        "prometheusUrl",
    ),
    ("ensemble without steps", {"model": {"format": "ensemble"}}, "ensembleSteps"),
    ("bad instance kind", {"model": {"config": {"instanceGroups": [{"kind": "KIND_TPU"}]}}}, "kind"),
    ("bad shm size", {"server": {"shmSize": "lots"}}, "shmSize"),
    ("wrong type", {"replicas": "two"}, "spec.replicas"),
]


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


@pytest.mark.parametrize(("case", "patch", "needle"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_manifests_are_refused(
    cluster: Cluster, crd: None, case: str, patch: dict[str, Any], needle: str
) -> None:
    body = model_deployment("bad", replicas=1)
    body["spec"] = _merge(body["spec"], patch)
    res = cluster.kubectl(
        "apply", "--dry-run=server", "-n", "default", "-f", "-", input=json.dumps(body), check=False
    )
    assert res.returncode != 0, f"{case}: accepted:\n{res.stdout}"
    assert needle in res.stderr, f"{case}: message does not name {needle!r}:\n{res.stderr}"


def test_missing_credentials_secret_is_reported_and_running_pods_untouched(
    cluster: Cluster, md_factory: Any
) -> None:
    md = md_factory(model_deployment("creds", replicas=2))
    md.wait_phase("Ready", timeout=90)
    dep = _deployment(md)
    pods_before = sorted(p.metadata.name for p in md.pods())

    md.patch({"spec": {"model": {"credentialsSecret": "s3-creds"}}})
    wait_for(
        lambda: (md.condition("Progressing") or {}).get("reason") == "CredentialsSecretMissing",
        30,
        message=lambda: f"CredentialsSecretMissing condition: {md.status().get('conditions')}",
    )
    cond = md.condition("Progressing")
    assert cond is not None and "s3-creds" in cond["message"] and "credentialsSecret" in cond["message"]
    wait_for(
        lambda: any(e.reason == "CredentialsSecretMissing" for e in md.events()),
        15,
        message="a CredentialsSecretMissing Event",
    )
    after = _deployment(md)
    assert after.metadata.name == dep.metadata.name
    assert (
        after.metadata.resource_version == dep.metadata.resource_version
        or after.metadata.generation == dep.metadata.generation
    )
    assert sorted(p.metadata.name for p in md.pods()) == pods_before
    assert md.status()["phase"] == "Ready" and md.condition("Ready")["status"] == "True"

    # Creating the Secret lets the rollout proceed.
    cluster.kubectl(
        "create",
        "secret",
        "generic",
        "s3-creds",
        "-n",
        md.namespace,
        "--from-literal=AWS_ACCESS_KEY_ID=AKIAEXAMPLE",
        "--from-literal=AWS_SECRET_ACCESS_KEY=secret",
    )
    wait_for(
        lambda: len(md.status().get("history") or []) == 2,
        60,
        message=lambda: f"a second revision once the Secret exists: {md.status()}",
    )


def test_operator_ignores_other_namespaces(cluster: Cluster, crd: None, tmp_path: Path) -> None:
    watched = cluster.create_namespace(unique_name("iso-a"))
    other = cluster.create_namespace(unique_name("iso-b"))
    op = OperatorProcess(tmp_path, [watched])
    op.start()
    try:
        for ns in (watched, other):
            cluster.apply(model_deployment("iso", replicas=1), namespace=ns)
        MD(cluster, watched, "iso").wait_phase("Ready", timeout=90)
        untouched = MD(cluster, other, "iso")
        hold_for(
            lambda: not untouched.get().get("status") and not untouched.deployments(),
            5,
            message="the ModelDeployment in the unwatched namespace is untouched",
        )
    finally:
        op.stop()
        cluster.delete_namespace(watched)
        cluster.delete_namespace(other)
