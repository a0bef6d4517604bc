"""Smoke tests of the cluster the test suite runs against.

They check that the pieces later tests rely on actually work: CRDs, the
controllers, the scheduler with the fake node pools, kwok's simulated pod
behaviours, the audit log, the pinned tool versions and an apiserver restart.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

import pytest
import urllib3
from kubernetes.client.exceptions import ApiException

from hack import localcluster
from kube import Cluster, condition, hold_for, pod_is_ready, unique_name, wait_for

pytestmark = pytest.mark.cluster

IMAGE = "registry.invalid/smoke/app:1"  # never pulled: kwok runs no containers


def _pod(name: str, labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"containers": [{"name": "app", "image": IMAGE}], **spec},
    }


def _deployment(name: str, replicas: int, labels: dict[str, str] | None = None) -> dict[str, Any]:
    pod_labels = {"app": name, **(labels or {})}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "containers": [
                        {
                            "name": "app",
                            "image": IMAGE,
                            "ports": [{"containerPort": 8000}],
                            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
                        }
                    ]
                },
            },
        },
    }


def _gone(read: Any, *args: Any) -> bool:
    try:
        read(*args)
    except ApiException as e:
        if e.status == 404:
            return True
        raise
    return False


def _require_simulated(cluster: Cluster) -> None:
    if not cluster.simulated:
        pytest.skip("needs kwok-simulated nodes and pods (local backend)")


def _require_local(cluster: Cluster) -> localcluster.LocalControlPlane:
    if cluster.control_plane is None:
        pytest.skip(f"needs the local control plane, not backend {cluster.backend}")
    return cluster.control_plane


# --------------------------------------------------------------------------------------------------


def test_crd_installs_and_is_served(cluster: Cluster, namespace: str) -> None:
    group = f"{unique_name('t')}.smoke.modeldeploy.io"
    crd: dict[str, Any] = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "required": ["size"],
                                    "properties": {"size": {"type": "integer", "minimum": 1}},
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    cluster.apiextensions.create_custom_resource_definition(crd)
    try:

        def established() -> bool:
            obj = cluster.apiextensions.read_custom_resource_definition(crd["metadata"]["name"])
            cond = condition(obj, "Established")
            return cond is not None and cond.status == "True"

        wait_for(established, 30, message="CRD Established")

        body = {
            "apiVersion": f"{group}/v1",
            "kind": "Widget",
            "metadata": {"name": "w1"},
            "spec": {"size": 3},
        }
        cluster.custom.create_namespaced_custom_object(group, "v1", namespace, "widgets", body)
        got = cluster.custom.get_namespaced_custom_object(group, "v1", namespace, "widgets", "w1")
        assert got["spec"] == {"size": 3}
        assert got["metadata"]["uid"]

        # The structural schema is enforced by the apiserver.
        bad = {**body, "metadata": {"name": "w2"}, "spec": {"size": 0}}
        with pytest.raises(ApiException) as err:
            cluster.custom.create_namespaced_custom_object(group, "v1", namespace, "widgets", bad)
        assert err.value.status == 422

        # kubectl discovers it too.
        out = cluster.kubectl("get", f"widgets.{group}", "-n", namespace, "-o", "name").stdout.split()
        assert out == [f"widget.{group}/w1"]
    finally:
        cluster.apiextensions.delete_custom_resource_definition(crd["metadata"]["name"])


def test_deployment_pods_become_ready_and_service_gets_endpoints(cluster: Cluster, namespace: str) -> None:
    cluster.apps.create_namespaced_deployment(namespace, _deployment("web", 3))
    cluster.core.create_namespaced_service(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8000}]},
        },
    )

    def available() -> bool:
        dep = cluster.apps.read_namespaced_deployment_status("web", namespace)
        cond = condition(dep, "Available")
        return dep.status.ready_replicas == 3 and cond is not None and cond.status == "True"

    wait_for(available, 60, message="deployment web: 3 ready replicas and Available")
    cluster.kubectl("rollout", "status", "deployment/web", "-n", namespace, "--timeout=30s")

    pods = cluster.core.list_namespaced_pod(namespace, label_selector="app=web").items
    assert len(pods) == 3
    for pod in pods:
        assert pod.status.phase == "Running"
        assert pod_is_ready(pod)
        assert pod.status.pod_ip, f"{pod.metadata.name} has no podIP"
        assert pod.spec.node_name
        if cluster.simulated:
            assert not pod.spec.node_name.startswith("edge-"), "untolerated pod landed on a tainted edge node"
    pod_ips = {p.status.pod_ip for p in pods}

    def ready_endpoints() -> set[str]:
        slices = cluster.discovery.list_namespaced_endpoint_slice(
            namespace, label_selector="kubernetes.io/service-name=web"
        ).items
        return {
            addr
            for s in slices
            for ep in s.endpoints or []
            if ep.conditions and ep.conditions.ready
            for addr in ep.addresses
        }

    wait_for(lambda: ready_endpoints() == pod_ips, 30, message=lambda: f"EndpointSlices {pod_ips}")
    endpoints = cluster.core.read_namespaced_endpoints("web", namespace)
    assert {a.ip for subset in endpoints.subsets or [] for a in subset.addresses or []} == pod_ips


def test_never_ready_pod_runs_but_stays_not_ready(cluster: Cluster, namespace: str) -> None:
    _require_simulated(cluster)
    cluster.core.create_namespaced_pod(namespace, _pod("stuck", {"simulate": "never-ready"}))

    def read() -> Any:
        return cluster.core.read_namespaced_pod("stuck", namespace)

    wait_for(lambda: read().status.phase == "Running", 30, message="never-ready pod Running")

    def running_not_ready() -> bool:
        pod = read()
        ready = condition(pod, "Ready")
        containers_ready = condition(pod, "ContainersReady")
        (status,) = pod.status.container_statuses
        return (
            pod.status.phase == "Running"
            and ready is not None
            and ready.status == "False"
            and containers_ready is not None
            and containers_ready.status == "False"
            and status.ready is False
            and status.state.running is not None
        )

    polls = hold_for(
        running_not_ready, 4.0, interval=0.25, message="never-ready pod Running with Ready=False"
    )
    assert polls >= 10


def test_crashloop_pod_shows_crashloopbackoff(cluster: Cluster, namespace: str) -> None:
    _require_simulated(cluster)
    cluster.core.create_namespaced_pod(namespace, _pod("crashy", {"simulate": "crashloop"}))

    def crashing() -> Any:
        pod = cluster.core.read_namespaced_pod("crashy", namespace)
        statuses = pod.status.container_statuses or []
        waiting = statuses[0].state.waiting if statuses else None
        return pod if waiting is not None and waiting.reason == "CrashLoopBackOff" else None

    pod = wait_for(crashing, 30, message="container waiting in CrashLoopBackOff")
    (status,) = pod.status.container_statuses
    assert status.restart_count > 0
    assert status.ready is False
    assert status.last_state.terminated.exit_code == 1
    assert status.last_state.terminated.reason == "Error"
    assert pod.status.phase == "Running"
    assert not pod_is_ready(pod)


def test_normal_pod_deletion_completes(cluster: Cluster, namespace: str) -> None:
    cluster.core.create_namespaced_pod(namespace, _pod("short"))
    wait_for(
        lambda: pod_is_ready(cluster.core.read_namespaced_pod("short", namespace)), 30, message="pod Ready"
    )
    cluster.core.delete_namespaced_pod("short", namespace)  # default 30 s grace: someone must finish it
    wait_for(lambda: _gone(cluster.core.read_namespaced_pod, "short", namespace), 20, message="pod removed")


def test_deleting_owner_garbage_collects_children(cluster: Cluster, namespace: str) -> None:
    owner = cluster.core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "owner"}, "data": {"k": "v"}}
    )
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    cluster.core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "child", "ownerReferences": [ref]}, "data": {}}
    )
    cluster.core.delete_namespaced_config_map("owner", namespace, propagation_policy="Background")
    wait_for(
        lambda: _gone(cluster.core.read_namespaced_config_map, "child", namespace),
        30,
        message="child ConfigMap garbage-collected",
    )


def test_deleting_deployment_removes_replicasets_and_pods(cluster: Cluster, namespace: str) -> None:
    cluster.apps.create_namespaced_deployment(namespace, _deployment("gc", 2))
    wait_for(
        lambda: cluster.apps.read_namespaced_deployment_status("gc", namespace).status.ready_replicas == 2,
        60,
        message="deployment gc ready",
    )
    assert cluster.apps.list_namespaced_replica_set(namespace, label_selector="app=gc").items
    cluster.apps.delete_namespaced_deployment("gc", namespace, propagation_policy="Foreground")
    wait_for(
        lambda: (
            not cluster.apps.list_namespaced_replica_set(namespace, label_selector="app=gc").items
            and not cluster.core.list_namespaced_pod(namespace, label_selector="app=gc").items
            and _gone(cluster.apps.read_namespaced_deployment, "gc", namespace)
        ),
        60,
        message="deployment, replicasets and pods gone",
    )


def test_job_pods_complete(cluster: Cluster, namespace: str) -> None:
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "once"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {"restartPolicy": "Never", "containers": [{"name": "job", "image": IMAGE}]},
            },
        },
    }
    cluster.batch.create_namespaced_job(namespace, job)

    def complete() -> bool:
        j = cluster.batch.read_namespaced_job_status("once", namespace)
        cond = condition(j, "Complete")
        return j.status.succeeded == 1 and cond is not None and cond.status == "True"

    wait_for(complete, 60, message="job Complete")


def test_hpa_v2_is_accepted_and_reconciled(cluster: Cluster, namespace: str) -> None:
    cluster.apps.create_namespaced_deployment(namespace, _deployment("scaled", 1))
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "scaled"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "scaled"},
            "minReplicas": 1,
            "maxReplicas": 4,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
                }
            ],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 30}},
        },
    }
    cluster.autoscaling.create_namespaced_horizontal_pod_autoscaler(namespace, hpa)
    got = cluster.autoscaling.read_namespaced_horizontal_pod_autoscaler("scaled", namespace)
    assert got.spec.max_replicas == 4
    assert got.spec.metrics[0].resource.target.average_utilization == 70
    assert got.spec.behavior.scale_down.stabilization_window_seconds == 30

    # The HPA controller picks it up (no metrics API here, so it reports why it cannot scale).
    def reconciled() -> Any:
        status = cluster.autoscaling.read_namespaced_horizontal_pod_autoscaler_status("scaled", namespace)
        types = {c.type for c in status.status.conditions or []}
        return types if "ScalingActive" in types and "AbleToScale" in types else None

    wait_for(reconciled, 60, interval=0.5, message="HPA conditions set by the controller")


def test_tool_versions_are_the_pinned_ones(cluster: Cluster) -> None:
    versions = localcluster.read_versions()
    kubectl = cluster.which("kubectl")
    helm = cluster.which("helm")
    if cluster.control_plane is not None:
        # Ours come first on PATH even though a system kubectl may exist.
        assert kubectl == str(cluster.control_plane.bin_path / "kubectl")
        assert helm == str(cluster.control_plane.bin_path / "helm")
        assert shutil.which("kubectl") == kubectl, "os.environ PATH is exported by the cluster fixture"

    assert (
        cluster.helm("version", "--template", "{{.Version}}").stdout.strip() == f"v{versions['HELM_VERSION']}"
    )
    info = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert info["clientVersion"]["gitVersion"] == f"v{versions['K8S_VERSION']}"
    if cluster.control_plane is not None:
        assert info["serverVersion"]["gitVersion"] == f"v{versions['K8S_VERSION']}"


def test_fake_node_pools(cluster: Cluster) -> None:
    _require_simulated(cluster)
    nodes = {n.metadata.name: n for n in cluster.core.list_node(label_selector="type=kwok").items}
    assert set(nodes) == {n.name for n in localcluster.FAKE_NODES}
    for spec in localcluster.FAKE_NODES:
        node = nodes[spec.name]
        ready = condition(node, "Ready")
        assert ready is not None and ready.status == "True"
        assert node.status.allocatable.get("nvidia.com/gpu", "0") == str(spec.gpus)
        assert bool(node.spec.taints) == (spec.pool == "edge")


def test_gpu_and_edge_scheduling(cluster: Cluster, namespace: str) -> None:
    _require_simulated(cluster)
    gpu = _pod("gpu")
    gpu["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "1"}}
    edge = _pod(
        "edge",
        nodeSelector={"modeldeploy.io/pool": "edge"},
        tolerations=[
            {"key": "modeldeploy.io/edge", "operator": "Equal", "value": "true", "effect": "NoSchedule"}
        ],
    )
    untolerated = _pod("edge-untolerated", nodeSelector={"modeldeploy.io/pool": "edge"})
    for body in (gpu, edge, untolerated):
        cluster.core.create_namespaced_pod(namespace, body)

    def ready(name: str) -> Any:
        pod = cluster.core.read_namespaced_pod(name, namespace)
        return pod if pod_is_ready(pod) else None

    assert wait_for(lambda: ready("gpu"), 30, message="gpu pod Ready").spec.node_name.startswith("gpu-")
    assert wait_for(lambda: ready("edge"), 30, message="edge pod Ready").spec.node_name.startswith("edge-")

    def unschedulable() -> bool:
        pod = cluster.core.read_namespaced_pod("edge-untolerated", namespace)
        cond = condition(pod, "PodScheduled")
        return cond is not None and cond.status == "False" and cond.reason == "Unschedulable"

    wait_for(unschedulable, 30, message="untolerated edge pod Unschedulable")
    assert cluster.core.read_namespaced_pod("edge-untolerated", namespace).spec.node_name is None


def test_audit_log_records_each_write_once(cluster: Cluster, namespace: str) -> None:
    _require_local(cluster)
    name = unique_name("audited")
    cluster.core.create_namespaced_config_map(namespace, {"metadata": {"name": name}})
    cluster.core.patch_namespaced_config_map(name, namespace, {"data": {"a": "1"}})
    cluster.core.read_namespaced_config_map(name, namespace)  # reads are not audited
    cluster.core.delete_namespaced_config_map(name, namespace)

    def mine() -> list[dict[str, Any]]:
        return [
            e
            for e in cluster.audit_events()
            if (e.get("objectRef") or {}).get("name") == name
            and e["objectRef"].get("resource") == "configmaps"
        ]

    wait_for(lambda: len(mine()) >= 3, 10, message="3 audit events")
    events = mine()
    assert [e["verb"] for e in events] == ["create", "patch", "delete"]
    assert {e["stage"] for e in events} == {"ResponseComplete"}
    assert {e["user"]["username"] for e in events} == {localcluster.ADMIN_USER}
    assert {e["level"] for e in events} == {"Metadata"}
    # Components write under their own names, so per-user counts are meaningful.
    users = {e["user"]["username"] for e in cluster.audit_events()}
    assert "system:kube-scheduler" in users
    assert "system:kwok" in users


def test_deleting_namespace_with_pods_completes(cluster: Cluster) -> None:
    ns = cluster.create_namespace(prefix="doomed")
    cluster.core.create_namespaced_pod(ns, _pod("p"))
    wait_for(lambda: pod_is_ready(cluster.core.read_namespaced_pod("p", ns)), 30, message="pod Ready")
    cluster.delete_namespace(ns, wait=True, timeout=60)


# Keep last: it takes the API away for a moment.
def test_apiserver_restart_keeps_objects(cluster: Cluster, namespace: str) -> None:
    cp = _require_local(cluster)
    before = cluster.core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "keep"}, "data": {"a": "1"}}
    )

    cp.stop_apiserver()
    with pytest.raises(urllib3.exceptions.HTTPError):  # connection refused (after urllib3's retries)
        cluster.core.read_namespaced_config_map("keep", namespace, _request_timeout=2)
    cp.start_apiserver()

    after = cluster.core.read_namespaced_config_map("keep", namespace)
    assert after.metadata.uid == before.metadata.uid
    assert after.data == {"a": "1"}
    # Controllers, scheduler and kwok reconnect: a new Deployment still becomes ready.
    cluster.apps.create_namespaced_deployment(namespace, _deployment("after-restart", 2))
    wait_for(
        lambda: (
            cluster.apps.read_namespaced_deployment_status("after-restart", namespace).status.ready_replicas
            == 2
        ),
        90,
        interval=0.5,
        message="deployment ready after apiserver restart",
    )
