"""Every manifest in examples/ applies to the local cluster and becomes Ready, on the nodes it asks for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import MD
from kube import Cluster, wait_for

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_becomes_ready(cluster: Cluster, md_ns: str, path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    cluster.kubectl("apply", "-n", md_ns, "-f", str(path))
    for doc in docs:
        if doc["kind"] != "ModelDeployment":
            continue
        md = MD(cluster, md_ns, doc["metadata"]["name"])
        st = md.wait_phase("Ready", timeout=120)
        spec: dict[str, Any] = doc["spec"]
        want = spec.get("replicas") or spec.get("autoscaling", {}).get("minReplicas") or 1
        assert st["ready"] == f"{want}/{want}"
        nodes = {p.spec.node_name for p in md.pods()}
        selector = spec.get("server", {}).get("nodeSelector", {})
        if selector.get("modeldeploy.io/pool") == "edge":
            assert nodes and all(n.startswith("edge-") for n in nodes), nodes
        elif "nvidia.com/gpu" in str(spec.get("server", {}).get("resources", {})):
            assert nodes and all(n.startswith("gpu-") for n in nodes), nodes
        else:
            assert not any(n.startswith("edge-") for n in nodes), (
                f"untolerated pods on the edge pool: {nodes}"
            )
        if spec.get("autoscaling"):
            wait_for(
                lambda n=doc["metadata"]["name"]: (
                    cluster.autoscaling.read_namespaced_horizontal_pod_autoscaler(n, md_ns)
                ),
                30,
                message="HPA exists",
            )
