"""What clients see while versions change, on real Triton pods (issue 12, behaviours 1 and 2).

A client (``traffic.py``) sends inference requests through the ModelDeployment's main Service the
whole time, one new connection per request, no retries; the model answers with its own version
number (``models.py``). The tests assert the share each version got at each canary step, measured
from the answers, and that no request failed across promotion, flip, rollback and scale-down.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from mdview import EVENT_LINES, MD_EVENTS, Model, measure, serving, settled, wait_status
from models import MODEL, SPEC_CONFIG, write_repository
from realtier import figure, on_real_node, operator_process, s3_on_node, s3_secret
from traffic import Traffic, describe_failures, failures, split_tolerance, versions

from kube import Cluster
from operator_proc import OperatorProcess, install_crd

REPLICAS = 3
SPLIT_REQUESTS = 800  # per step: the 5-sigma band is +-8.8 points at 50 %, +-7.7 at 25 %


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, cluster: Cluster) -> Iterator[tuple[Any, Any]]:
    """S3 on the node IP, bucket ``models``: the ``versioned`` model with versions 1 and 2
    answering and 3 failing to load."""
    work = tmp_path_factory.mktemp("s3")
    source = write_repository(work / "repo", {1: "answer", 2: "answer", 3: "fail_load"})
    with s3_on_node(work / "server") as server:
        key = server.setup(bucket="models", upload=source, prefix="repo")
        server.enforce_auth()
        yield server, key


@pytest.fixture(scope="module")
def operator(
    cluster: Cluster, images: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    install_crd(cluster)
    with operator_process(tmp_path_factory.mktemp("operator"), ["traffic-*"], images["operator"]) as op:
        yield op


@pytest.fixture
def namespace(cluster: Cluster, repo: tuple[Any, Any]) -> Iterator[str]:
    server, key = repo
    ns = cluster.create_namespace(prefix="traffic")
    s3_secret(cluster, ns, server, key)
    try:
        yield ns
    finally:
        cluster.delete_namespace(ns)


def manifest(name: str, image: str, rollout: dict[str, Any], version: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "modeldeploy.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {
                "name": MODEL,
                "format": "python",
                "storageUri": "s3://models/repo",
                "version": version,
                "credentialsSecret": "s3",
                "config": SPEC_CONFIG,
            },
            "replicas": REPLICAS,
            "server": on_real_node({"image": image, "imagePullPolicy": "Never", "shmSize": "64Mi"}),
            "rollout": rollout,
        },
    }


def test_canary_split_measured_and_no_request_fails(
    cluster: Cluster, operator: OperatorProcess, images: dict[str, str], namespace: str
) -> None:
    """Canary 1 -> 2 at 25 % and 50 % (each held until resumed), then promotion and the old
    revision's scale-down, under continuous traffic."""
    rollout = {
        "steps": [{"weight": 25, "pause": {}}, {"weight": 50, "pause": {}}, {"weight": 100}],
        "scaleDownDelaySeconds": 0,
    }
    cluster.apply(manifest("split", images["triton"], rollout), namespace=namespace)
    md = Model(cluster, namespace, "split")
    serving(md, 1)
    host, port = md.service_address()
    settled(md, {1: REPLICAS})
    rows: list[str] = []
    with Traffic(host, port, MODEL, rate=60) as traffic:
        origin = time.monotonic()
        t0, t1 = measure(traffic, 100)
        assert versions(traffic.outcomes(t0, t1)) == {1: len(traffic.outcomes(t0, t1))}

        md.patch({"spec": {"model": {"version": 2}}})
        for step, weight in enumerate((25, 50)):
            wait_status(
                md,
                lambda st, step=step: (
                    (st.get("rollout") or {}).get("state") == "Paused"
                    and (st.get("rollout") or {}).get("step") == step
                ),
                180,
                f"step {step + 1} ({weight} %) held",
            )
            canary = len(md.pods_by_revision().get(2, []))
            settled(md, {1: REPLICAS, 2: canary})
            expected = canary / (REPLICAS + canary)
            t0, t1 = measure(traffic, SPLIT_REQUESTS)
            window = traffic.outcomes(t0, t1)
            got = versions(window)
            share = got[2] / sum(got.values())
            tol = split_tolerance(expected, len(window))
            rows.append(
                f"weight {weight}%: {canary}/{REPLICAS + canary} pods, expected {expected:.0%}, "
                f"measured {share:.1%} of {len(window)} requests (tolerance +-{tol:.1%})"
            )
            assert not failures(window), describe_failures(window, origin)
            assert abs(share - expected) <= tol, rows[-1]
            md.resume()

        serving(md, 2)
        settled(md, {2: REPLICAS})
        t0, t1 = measure(traffic, 200)
        after = traffic.outcomes(t0, t1)
        rows.append(
            f"promoted: measured {versions(after)[2] / len(after):.0%} of {len(after)} requests on v2"
        )
        assert versions(after) == {2: len(after)}, versions(after)
        all_outcomes = traffic.stop()
    assert not failures(all_outcomes), describe_failures(all_outcomes, origin)
    figure("canary split (weight asked: share measured)", "; ".join(rows))
    figure(
        "canary 1 -> 2 under traffic",
        f"{len(all_outcomes)} requests, {len(failures(all_outcomes))} failed, "
        f"{dict(versions(all_outcomes))} answered per version",
    )


def answered_only(traffic: Traffic, origin: float, allowed: set[int]) -> list[Any]:
    """Every request so far answered, by the ``allowed`` versions only."""
    outcomes = traffic.stop()
    assert not failures(outcomes), describe_failures(outcomes, origin)
    assert set(versions(outcomes)) <= allowed, versions(outcomes)
    return outcomes


def only_version(md: Model, traffic: Traffic, version: int, n: int = 100) -> None:
    """The next ``n`` requests all answered by ``version``."""
    t0, t1 = measure(traffic, n)
    window = traffic.outcomes(t0, t1)
    assert versions(window) == {version: len(window)}, versions(window)


def test_blue_green_promotion_and_flip_back_lose_no_request(
    cluster: Cluster, operator: OperatorProcess, images: dict[str, str], namespace: str
) -> None:
    rollout = {"strategy": "BlueGreen", "blueGreen": {"scaleDownDelaySeconds": 5}}
    cluster.apply(manifest("bg", images["triton"], rollout), namespace=namespace)
    md = Model(cluster, namespace, "bg")
    serving(md, 1)
    host, port = md.service_address()
    settled(md, {1: REPLICAS})
    with Traffic(host, port, MODEL, rate=60) as traffic:
        origin = time.monotonic()
        md.patch({"spec": {"model": {"version": 2}}})
        serving(md, 2)  # flipped, and revision 1 scaled down after the delay
        settled(md, {2: REPLICAS})
        only_version(md, traffic, 2)
        md.patch({"spec": {"rollbackTo": {"revision": 1}}})
        serving(md, 1)
        settled(md, {1: REPLICAS})
        only_version(md, traffic, 1)
    outcomes = answered_only(traffic, origin, {1, 2})
    figure(
        "blue-green 1 -> 2, flip back to 1, both scale-downs, under traffic",
        f"{len(outcomes)} requests, {len(failures(outcomes))} failed, {dict(versions(outcomes))} per version",
    )


def test_rolling_update_loses_no_request(
    cluster: Cluster, operator: OperatorProcess, images: dict[str, str], namespace: str
) -> None:
    rollout = {"strategy": "Rolling"}  # the defaults: what users get
    cluster.apply(manifest("rolling", images["triton"], rollout), namespace=namespace)
    md = Model(cluster, namespace, "rolling")
    serving(md, 1)
    host, port = md.service_address()
    settled(md, {1: REPLICAS})
    with Traffic(host, port, MODEL, rate=60) as traffic:
        origin = time.monotonic()
        md.patch({"spec": {"model": {"version": 2}}})
        serving(md, 2)
        settled(md, {2: REPLICAS})
        only_version(md, traffic, 2)
    outcomes = answered_only(traffic, origin, {1, 2})
    figure(
        "rolling 1 -> 2 under traffic",
        f"{len(outcomes)} requests, {len(failures(outcomes))} failed, {dict(versions(outcomes))} per version",
    )


ROLLBACK_CASES = {
    # version 3's initialize raises: Triton runs, the model never becomes ready
    "model fails to load": ({"model": {"version": 3}}, "corrupt (test)"),
    # tritonserver refuses an unknown argument and exits: the container crash-loops
    "server exits at start": ({"model": {"version": 2}, "server": {"args": ["--no-such-flag=1"]}}, "crash"),
}


@pytest.mark.parametrize("case", list(ROLLBACK_CASES))
def test_broken_version_rolls_back_by_itself_and_no_request_fails(
    cluster: Cluster, operator: OperatorProcess, images: dict[str, str], namespace: str, case: str
) -> None:
    """A canary whose pods never become ready: rolled back automatically, the reason in status and a
    Warning Event, stable at full capacity and answering every request throughout."""
    change, reason = ROLLBACK_CASES[case]
    rollout = {
        "steps": [{"weight": 50, "pause": {"duration": "5s"}}, {"weight": 100}],
        "progressDeadlineSeconds": 60,
    }
    cluster.apply(manifest("broken", images["triton"], rollout), namespace=namespace)
    md = Model(cluster, namespace, "broken")
    serving(md, 1)
    host, port = md.service_address()
    settled(md, {1: REPLICAS})
    stable_ready: list[int] = []
    with Traffic(host, port, MODEL, rate=60) as traffic:
        origin = time.monotonic()
        md.patch({"spec": change})

        def rolled_back(st: dict[str, Any]) -> bool:
            stable_ready.append(md.endpoints_by_revision().get(1, 0))
            return (st.get("rollout") or {}).get("state") == "RolledBack"

        st = wait_status(md, rolled_back, 300, "rolled back")
        t_back = time.monotonic() - origin
        serving(md, 1, after_rollback=True)
        only_version(md, traffic, 1)
    outcomes = answered_only(traffic, origin, {1})
    assert min(stable_ready) == REPLICAS, f"stable lost capacity during the rollout: {stable_ready}"
    text = f"{st.get('message')} {(st.get('rollout') or {}).get('reason')}"
    assert reason in text.lower() or reason in text, text
    warnings = cluster.kubectl(
        "get", "events", "-n", namespace, "--field-selector", f"{MD_EVENTS},type=Warning", "-o", EVENT_LINES
    ).stdout  # fmt: skip
    assert "RolledBack: " in warnings, warnings
    figure(
        f"automatic rollback ({case})",
        f"rolled back {t_back:.1f}s after the change; {len(outcomes)} requests, "
        f"{len(failures(outcomes))} failed, all answered by revision 1; stable ready endpoints "
        f"min {min(stable_ready)}/{REPLICAS}",
    )
