"""Exact versions (issue 12, behaviour 4): a repository that holds several versions of a model serves
exactly the version a ModelDeployment asks for, proven by the answers.

The ``versioned`` model (``models.py``) multiplies its input by its own version number, so every
answer names the version directory Triton served. Two repositories in S3 (moto on the node IP),
each with versions 1 and 2:

* ``own``: the repository carries its own ``config.pbtxt`` (no ``version_policy``: Triton's default
  is the latest version) and the ModelDeployment has no ``spec.model.config``;
* ``rendered``: no ``config.pbtxt``; ``spec.model.config`` is rendered by the operator.

For each: deploy version 1, roll out to 2, ``rollbackTo`` revision 1, under continuous traffic through
the main Service. After each change settles, every answer is the asked version's, and Triton's model
metadata (``GET /v2/models/versioned``) lists that version alone: the other one is not loaded.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from mdview import Model, measure, serving
from models import MODEL, SPEC_CONFIG, write_repository
from realtier import figure, on_real_node, operator_process, s3_on_node, s3_secret
from routed import routed
from traffic import Traffic, describe_failures, failures, versions

from kube import Cluster
from operator_proc import OperatorProcess, install_crd

NS_PREFIX = "versions"
REPLICAS = 1
CASES = {
    # case: (bucket, the repository has config.pbtxt, spec.model.config)
    "own-config-pbtxt": ("own", True, None),
    "spec-model-config": ("rendered", False, SPEC_CONFIG),
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, cluster: Cluster) -> Iterator[tuple[Any, Any]]:
    """moto on the node IP: bucket ``own`` (versions 1 and 2 and their config.pbtxt) and bucket
    ``rendered`` (versions 1 and 2 only), each under prefix ``repo``."""
    work = tmp_path_factory.mktemp("s3")
    with s3_on_node(work / "server") as server:
        key = None
        for bucket, with_config, _ in CASES.values():
            source = write_repository(work / bucket, {1: "answer", 2: "answer"}, with_config=with_config)
            key = server.setup(bucket=bucket, upload=source, prefix="repo", user=bucket)
        server.enforce_auth()
        yield server, key


@pytest.fixture(scope="module")
def operator(
    cluster: Cluster, images: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    install_crd(cluster)
    with operator_process(tmp_path_factory.mktemp("operator"), [f"{NS_PREFIX}-*"], images["operator"]) as op:
        yield op


@pytest.fixture
def namespace(cluster: Cluster, repo: tuple[Any, Any]) -> Iterator[str]:
    server, key = repo
    ns = cluster.create_namespace(prefix=NS_PREFIX)
    s3_secret(cluster, ns, server, key)
    try:
        yield ns
    finally:
        cluster.delete_namespace(ns)


def manifest(bucket: str, config: dict[str, Any] | None, image: str) -> dict[str, Any]:
    model: dict[str, Any] = {
        "name": MODEL,
        "format": "python",
        "storageUri": f"s3://{bucket}/repo",
        "version": 1,
        "credentialsSecret": "s3",
    }
    if config is not None:
        model["config"] = config
    return {
        "apiVersion": "modeldeploy.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": bucket},
        "spec": {
            "model": model,
            "replicas": REPLICAS,
            "server": on_real_node({"image": image, "imagePullPolicy": "Never", "shmSize": "64Mi"}),
            "rollout": {
                "steps": [{"weight": 50, "pause": {"duration": "2s"}}, {"weight": 100}],
                "scaleDownDelaySeconds": 0,
            },
        },
    }


def loaded_versions(host: str, port: int) -> list[str]:
    """The model's ready versions, from Triton's model metadata (one pod behind the Service)."""
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", f"/v2/models/{MODEL}", headers={"Connection": "close"})
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200, (resp.status, body[:300])
        found: list[str] = json.loads(body)["versions"]
        return found
    finally:
        conn.close()


def serves_exactly(md: Model, traffic: Traffic, version: int) -> int:
    """``version`` alone serves: the next 100 answers are all its own, and every pod behind the
    Service has only it loaded. Returns how many requests were checked."""
    t0, t1 = measure(traffic, 100)
    window = traffic.outcomes(t0, t1)
    assert versions(window) == {version: len(window)}, (version, versions(window))
    host, port = md.service_address()
    for _ in range(REPLICAS * 4):  # one new connection each: kube-proxy picks a pod per connection
        assert loaded_versions(host, port) == [str(version)]
    return len(window)


# Without the stager keeping only the version asked for, Triton's default version policy (the
# repository's config.pbtxt has none) loaded the latest: deploying version 1 loaded version 2 only,
# and the startup probe on /v2/models/versioned/versions/1/ready answered 400 for good.
@pytest.mark.parametrize("case", CASES)
def test_each_revision_serves_exactly_its_version(
    cluster: Cluster, operator: OperatorProcess, images: dict[str, str], namespace: str, case: str
) -> None:
    bucket, _, config = CASES[case]
    cluster.apply(manifest(bucket, config, images["triton"]), namespace=namespace)
    md = Model(cluster, namespace, bucket)
    t = time.monotonic()
    serving(md, 1)
    routed(md, {1: REPLICAS}, 1)
    rows = [f"v1 ready {time.monotonic() - t:.1f}s after apply"]
    host, port = md.service_address()
    with Traffic(host, port, MODEL, rate=20) as traffic:
        origin = time.monotonic()
        checked = serves_exactly(md, traffic, 1)

        t = time.monotonic()
        md.patch({"spec": {"model": {"version": 2}}})
        serving(md, 2)
        routed(md, {2: REPLICAS}, 2)
        rows.append(f"rolled out to v2 in {time.monotonic() - t:.1f}s")
        checked += serves_exactly(md, traffic, 2)

        t = time.monotonic()
        md.patch({"spec": {"rollbackTo": {"revision": 1}}})
        serving(md, 1)
        routed(md, {1: REPLICAS}, 1)
        rows.append(f"rollbackTo revision 1 in {time.monotonic() - t:.1f}s")
        checked += serves_exactly(md, traffic, 1)
        outcomes = traffic.stop()

    assert not failures(outcomes), describe_failures(outcomes, origin)
    assert set(versions(outcomes)) == {1, 2}, versions(outcomes)
    history = {h["revision"]: h["modelVersion"] for h in md.status()["history"]}
    assert history == {1: 1, 2: 2}, history
    figure(
        f"exact versions ({case})",
        f"{'; '.join(rows)}; {len(outcomes)} requests, 0 failed, {dict(versions(outcomes))} per version, "
        f"{checked} checked after each change settled",
    )
