"""Behaviour 2: ``helm install`` of the chart with the locally built operator image. The operator
runs as a real pod (two replicas with leader election) on the real node, in a namespace that
enforces Pod Security ``restricted``: non-root, read-only root filesystem, Ready by its own probe,
reaching the API server through ``kubernetes.default`` as on any cluster. It reconciles a
ModelDeployment, and ``helm test`` passes with a real test pod."""

from __future__ import annotations

import json
from typing import Any

from realtier import realnode

from kube import REPO_ROOT, Cluster, unique_name, wait_for

CHART = REPO_ROOT / "charts" / "modeldeploy-operator"
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}


def test_chart_installs_real_operator_pod_that_reconciles(cluster: Cluster, images: dict[str, str]) -> None:
    release_ns = cluster.create_namespace(prefix="chart-real", labels=RESTRICTED)
    workload_ns = cluster.create_namespace(prefix="chart-real-wl")
    repository, tag = images["operator"].rsplit(":", 1)
    values: dict[str, Any] = {
        "image.repository": repository,
        "image.tag": tag,
        "image.pullPolicy": "Never",
        "fullnameOverride": "mdop",
        "leaderElection.enabled": True,
        "nodeSelector": {realnode.NODE_LABEL[0]: realnode.NODE_LABEL[1]},
        "tolerations": [{**realnode.NODE_TAINT, "operator": "Equal"}],
    }
    args = [arg for k, v in values.items() for arg in ("--set-json", f"{k}={json.dumps(v)}")]
    try:
        cluster.helm(
            "install", "mdop", str(CHART), "-n", release_ns, "--wait", "--timeout", "180s", *args, timeout=240
        )
        pods = cluster.core.list_namespaced_pod(
            release_ns, label_selector="app.kubernetes.io/component=operator"
        ).items
        assert len(pods) == 2
        for pod in pods:
            assert pod.spec.node_name == realnode.NODE_NAME
            assert all(c.ready for c in pod.status.container_statuses)
            # the running process: non-root, and its root filesystem refuses writes
            uid = cluster.kubectl("exec", "-n", release_ns, pod.metadata.name, "--", "id", "-u").stdout
            assert uid.strip() == "65532"
            touch = cluster.kubectl(
                "exec", "-n", release_ns, pod.metadata.name, "--", "touch", "/opt/x", check=False
            )
            assert touch.returncode != 0 and "Read-only file system" in touch.stderr

        # One of them takes the Lease and reconciles a ModelDeployment (its pods on kwok's fakes).
        name = unique_name("md")
        cluster.apply(
            {
                "apiVersion": "modeldeploy.io/v1alpha1",
                "kind": "ModelDeployment",
                "metadata": {"name": name},
                "spec": {
                    "model": {"format": "onnx", "storageUri": "s3://models/repo", "version": 1},
                    "replicas": 1,
                },
            },
            namespace=workload_ns,
        )
        wait_for(
            lambda: _phase(cluster, workload_ns, name) == "Ready",
            120,
            message=lambda: f"{name} Ready from the in-cluster operator; logs:\n{_logs(cluster, release_ns)}",
        )
        test = cluster.helm("test", "mdop", "-n", release_ns, "--timeout", "120s", timeout=180)
        assert "Phase:          Succeeded" in test.stdout, test.stdout
    finally:
        cluster.helm("uninstall", "mdop", "-n", release_ns, "--wait", "--timeout", "60s", check=False)
        for ns in (workload_ns, release_ns):
            cluster.delete_namespace(ns)


def _phase(cluster: Cluster, namespace: str, name: str) -> str | None:
    obj = cluster.custom.get_namespaced_custom_object(
        "modeldeploy.io", "v1alpha1", namespace, "modeldeployments", name
    )
    return (obj.get("status") or {}).get("phase")


def _logs(cluster: Cluster, namespace: str) -> str:
    out = cluster.kubectl(
        "logs", "-n", namespace, "-l", "app.kubernetes.io/component=operator", "--tail=40", check=False
    )
    return out.stdout + out.stderr
