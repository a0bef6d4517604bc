"""Exact canary weights on Gateway API routes, with the real Gateway API CRDs (from their Go module)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import MD, model_deployment
from kube import Cluster, wait_for

REPO = Path(__file__).resolve().parents[2]


def _gateway_api_dir() -> Path:
    version = next(
        line.split("=", 1)[1].strip()
        for line in (REPO / "hack/versions.env").read_text().splitlines()
        if line.startswith("GATEWAY_API_VERSION=")
    )
    env = {**os.environ, "GOTOOLCHAIN": "local"}
    try:
        out = subprocess.run(
            ["go", "mod", "download", "-json", f"sigs.k8s.io/gateway-api@v{version}"],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            check=True,
            cwd="/",
        )
    except (OSError, subprocess.SubprocessError) as exc:
        if os.environ.get("MODELDEPLOY_REQUIRE_CLUSTER") == "1":
            pytest.fail(f"Gateway API CRDs unavailable from the Go module proxy: {exc}")
        pytest.skip(f"Gateway API CRDs unavailable: {exc}")
    return Path(json.loads(out.stdout)["Dir"]) / "config" / "crd" / "standard"


@pytest.fixture(scope="module")
def gateway_crds(cluster: Cluster) -> None:
    crd_dir = _gateway_api_dir()
    for kind in ("httproutes", "grpcroutes"):
        cluster.kubectl(
            "apply", "--server-side", "-f", str(crd_dir / f"gateway.networking.k8s.io_{kind}.yaml")
        )
        cluster.wait_crd_established(f"{kind}.gateway.networking.k8s.io")


def _weights(cluster: Cluster, ns: str, kind: str, name: str) -> dict[str, int] | None:
    res = cluster.kubectl("get", kind, name, "-n", ns, "-o", "json", check=False)
    if res.returncode != 0:
        return None
    route: dict[str, Any] = json.loads(res.stdout)
    return {b["name"]: b["weight"] for b in route["spec"]["rules"][0]["backendRefs"]}


def test_canary_weights_on_http_and_grpc_routes(
    cluster: Cluster, gateway_crds: None, md_factory: Any
) -> None:
    md: MD = md_factory(
        model_deployment(
            "gw",
            replicas=2,
            rollout={
                "steps": [{"weight": 30, "pause": {}}, {"weight": 100}],
                "scaleDownDelaySeconds": 0,
                "gateway": {
                    "parentRefs": [{"name": "inference-gateway"}],
                    "hostnames": ["gw.example"],
                    "grpc": True,
                },
            },
        )
    )
    md.wait_phase("Ready", timeout=90)
    ns = md.namespace
    wait_for(
        lambda: _weights(cluster, ns, "httproute", "gw") == {"gw-stable": 100, "gw-canary": 0},
        30,
        message=lambda: f"HTTPRoute all on stable: {_weights(cluster, ns, 'httproute', 'gw')}",
    )
    assert _weights(cluster, ns, "grpcroute", "gw-grpc") == {"gw-stable": 100, "gw-canary": 0}
    route = json.loads(cluster.kubectl("get", "httproute", "gw", "-n", ns, "-o", "json").stdout)
    assert route["spec"]["parentRefs"][0]["name"] == "inference-gateway"
    assert route["spec"]["hostnames"] == ["gw.example"]
    assert route["metadata"]["ownerReferences"][0]["name"] == "gw"

    md.patch({"spec": {"model": {"version": 2}}})
    md.wait_phase("Paused", timeout=60)
    for kind, name in (("httproute", "gw"), ("grpcroute", "gw-grpc")):
        wait_for(
            lambda k=kind, n=name: _weights(cluster, ns, k, n) == {"gw-stable": 70, "gw-canary": 30},
            30,
            message=lambda k=kind, n=name: f"{k} at 70/30: {_weights(cluster, ns, k, n)}",
        )

    md.patch({"metadata": {"annotations": {"modeldeploy.io/promote": str(time.time())}}})
    wait_for(
        lambda: md.status().get("servingVersion") == 2 and md.status().get("phase") == "Ready",
        60,
        message=lambda: f"promoted: {md.status()}",
    )
    wait_for(
        lambda: _weights(cluster, ns, "httproute", "gw") == {"gw-stable": 100, "gw-canary": 0},
        30,
        message=lambda: f"HTTPRoute back on (the new) stable: {_weights(cluster, ns, 'httproute', 'gw')}",
    )

    # Turning the gateway off removes the routes the operator created.
    md.patch({"spec": {"rollout": {"gateway": None}}})
    wait_for(
        lambda: (
            _weights(cluster, ns, "httproute", "gw") is None
            and _weights(cluster, ns, "grpcroute", "gw-grpc") is None
        ),
        60,
        message="routes removed",
    )
