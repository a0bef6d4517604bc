"""Revisions: the hash of everything that shapes the pods, and the history kept in status."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from modeldeploy import api
from modeldeploy.modeldeployment import revision

BASE: dict[str, Any] = {
    "model": {
        "format": "onnx",
        "storageUri": "s3://models/repo",
        "version": 3,
        "config": {"maxBatchSize": 8, "dynamicBatching": {"preferredBatchSizes": [4, 8]}},
    },
    "server": {
        "args": ["--log-verbose=1"],
        "resources": {"requests": {"cpu": "2", "memory": "4Gi"}},
        "env": [{"name": "A", "value": "1"}],
    },
    "replicas": 2,
}


def spec_of(data: dict[str, Any]) -> api.ModelDeploymentSpec:
    return api.ModelDeploymentSpec.model_validate(data)


def h(data: dict[str, Any]) -> str:
    return revision.revision_hash(spec_of(data))


def edited(path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    *parents, leaf = path.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return data


def test_hash_is_short_hex_and_deterministic() -> None:
    a, b = h(BASE), h(copy.deepcopy(BASE))
    assert a == b
    assert len(a) == revision.HASH_LENGTH
    int(a, 16)


def test_hash_is_stable_under_key_order() -> None:
    def reverse(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: reverse(node[k]) for k in reversed(list(node))}
        if isinstance(node, list):
            return [reverse(v) for v in node]
        return node

    shuffled = reverse(BASE)
    assert list(shuffled["model"]) != list(BASE["model"])
    assert h(shuffled) == h(BASE)


def test_hash_is_stable_when_defaults_are_written_out() -> None:
    explicit = copy.deepcopy(BASE)
    explicit["server"].update({"image": api.DEFAULT_TRITON_IMAGE, "shmSize": "1Gi"})
    explicit["model"]["config"]["instanceGroups"] = None
    assert h(explicit) == h(BASE)


def test_hash_ignores_snake_vs_camel_input() -> None:
    snake = copy.deepcopy(BASE)
    snake["model"]["storage_uri"] = snake["model"].pop("storageUri")
    snake["server"]["shm_size"] = "1Gi"
    assert h(snake) == h(BASE)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("model.version", 4),
        ("model.storageUri", "s3://models/other"),
        ("model.format", "pytorch"),
        ("model.config", {"maxBatchSize": 16}),
        ("model.credentialsSecret", "creds"),
        ("server.image", "nvcr.io/nvidia/tritonserver:24.01-py3"),
        ("server.args", ["--log-verbose=2"]),
        ("server.args", []),
        ("server.env", [{"name": "A", "value": "2"}]),
        ("server.resources", {"requests": {"cpu": "4", "memory": "4Gi"}}),
        ("server.shmSize", "2Gi"),
        ("server.nodeSelector", {"pool": "gpu"}),
        ("server.podLabels", {"team": "ml"}),
    ],
)
def test_hash_changes_with_pod_shaping_fields(path: str, value: Any) -> None:
    assert h(edited(path, value)) != h(BASE)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("replicas", 7),
        ("rollout.strategy", "BlueGreen"),
        ("rollout.steps", [{"weight": 5}, {"weight": 100}]),
        ("rollout.progressDeadlineSeconds", 60),
        ("rollout.autoRollback", False),
        ("paused", True),
        ("revisionHistoryLimit", 3),
        ("service.type", "NodePort"),
        ("monitoring.serviceMonitor", True),
        ("podDisruptionBudget", {"minAvailable": 1}),
    ],
)
def test_hash_ignores_scaling_rollout_and_service_settings(path: str, value: Any) -> None:
    assert h(edited(path, value)) == h(BASE)


def test_hash_ignores_autoscaling() -> None:
    data = copy.deepcopy(BASE)
    del data["replicas"]
    data["autoscaling"] = {"minReplicas": 1, "maxReplicas": 9, "targetCPUUtilization": 50}
    assert h(data) == h(BASE)


def test_with_pod_shaping_restores_a_remembered_revision() -> None:
    old = spec_of(BASE)
    new = spec_of(edited("model.version", 9) | {"replicas": 5})
    restored = revision.with_pod_shaping(new, revision.pod_shaping(old))
    assert revision.revision_hash(restored) == revision.revision_hash(old)
    assert restored.model.version == 3
    assert restored.replicas == 5  # only the pod-shaping part is replaced


def record(n: int, outcome: str = "Superseded") -> api.RevisionRecord:
    return api.RevisionRecord(
        revision=n,
        hash=f"h{n}",
        model_version=n,
        image="img",
        created="2025-01-01T00:00:00Z",
        outcome=outcome,
    )


def test_find_by_number_and_hash() -> None:
    history = [record(1), record(2), record(3)]
    found_by_number = revision.find(history, number=2)
    found_by_hash = revision.find(history, hash="h3")
    assert found_by_number is not None and found_by_number.revision == 2
    assert found_by_hash is not None and found_by_hash.revision == 3
    assert revision.find(history, number=9) is None
    assert revision.find(history, hash="nope") is None


def test_next_number() -> None:
    assert revision.next_number([]) == 1
    assert revision.next_number([record(1), record(4), record(2)]) == 5


def test_prune_drops_oldest_first() -> None:
    history = [record(n) for n in range(1, 6)]
    assert [r.revision for r in revision.prune(history, 3, keep=set())] == [3, 4, 5]


def test_prune_never_drops_kept_revisions() -> None:
    history = [record(n) for n in range(1, 7)]
    pruned = revision.prune(history, 3, keep={1, 2})
    assert [r.revision for r in pruned] == [1, 2, 6]


def test_prune_may_exceed_the_limit_to_keep_live_revisions() -> None:
    history = [record(n) for n in range(1, 5)]
    assert [r.revision for r in revision.prune(history, 2, keep={1, 2, 3})] == [1, 2, 3]


def test_prune_under_the_limit_is_a_no_op_and_does_not_mutate() -> None:
    history = [record(n) for n in range(1, 4)]
    assert revision.prune(history, 10, keep=set()) == history
    revision.prune(history, 1, keep=set())
    assert len(history) == 3
