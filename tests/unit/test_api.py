"""The typed ModelDeployment API: parsing, defaults and the small helpers on it."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest

from modeldeploy import api

MODEL = {"format": "onnx", "storageUri": "s3://models/repo", "version": 3}


def parse(**spec: Any) -> api.ModelDeploymentSpec:
    return api.ModelDeploymentSpec.model_validate({"model": dict(MODEL), **spec})


def error_locs(exc: pytest.ExceptionInfo[pydantic.ValidationError]) -> list[str]:
    return [".".join(str(p) for p in e["loc"]) for e in exc.value.errors()]


# --------------------------------------------------------------------------- parsing


def test_camel_case_aliases_parse_into_snake_case_fields() -> None:
    spec = api.ModelDeploymentSpec.model_validate(
        {
            "model": {
                "name": "resnet",
                "format": "onnx",
                "storageUri": "s3://models/repo",
                "version": 7,
                "credentialsSecret": "s3-creds",
                "config": {"maxBatchSize": 8, "dynamicBatching": {"maxQueueDelayMicroseconds": 100}},
            },
            "server": {"shmSize": "2Gi", "imagePullPolicy": "IfNotPresent", "nodeSelector": {"gpu": "a100"}},
            "autoscaling": {
                "minReplicas": 2,
                "maxReplicas": 5,
                "targetCPUUtilization": 70,
                "queueTimeMicroseconds": 500,
            },
            "rollout": {
                "strategy": "BlueGreen",
                "progressDeadlineSeconds": 120,
                "autoRollback": False,
                "blueGreen": {"autoPromote": False, "scaleDownDelaySeconds": 5},
            },
            "revisionHistoryLimit": 4,
            "podDisruptionBudget": {"minAvailable": 1},
        }
    )
    assert spec.model.storage_uri == "s3://models/repo"
    assert spec.model.credentials_secret == "s3-creds"
    assert spec.model.config is not None and spec.model.config.max_batch_size == 8
    assert spec.model.config.dynamic_batching is not None
    assert spec.model.config.dynamic_batching.max_queue_delay_microseconds == 100
    assert spec.server.shm_size == "2Gi"
    assert spec.server.image_pull_policy == "IfNotPresent"
    assert spec.server.node_selector == {"gpu": "a100"}
    assert spec.autoscaling is not None
    assert (spec.autoscaling.min_replicas, spec.autoscaling.max_replicas) == (2, 5)
    assert spec.autoscaling.target_cpu_utilization == 70  # explicit alias targetCPUUtilization
    assert spec.autoscaling.queue_time_microseconds == 500
    assert spec.rollout.strategy is api.Strategy.blue_green
    assert spec.rollout.progress_deadline_seconds == 120
    assert spec.rollout.auto_rollback is False
    assert spec.rollout.blue_green is not None and spec.rollout.blue_green.auto_promote is False
    assert spec.revision_history_limit == 4
    assert spec.pod_disruption_budget is not None and spec.pod_disruption_budget.min_available == 1


def test_dump_by_alias_round_trips() -> None:
    spec = parse(
        replicas=2, rollout={"steps": [{"weight": 10, "pause": {"duration": "1m"}}, {"weight": 100}]}
    )
    dumped = spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    assert dumped["model"]["storageUri"] == "s3://models/repo"
    assert "storage_uri" not in dumped["model"]
    assert api.ModelDeploymentSpec.model_validate(dumped) == spec


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"model": {**MODEL, "bogus": 1}}, "model.bogus"),
        ({"model": MODEL, "replica": 2}, "replica"),
        ({"model": MODEL, "server": {"shm": "1Gi"}}, "server.shm"),
        ({"model": MODEL, "rollout": {"steps": [{"weight": 10, "wait": "1m"}]}}, "rollout.steps.0.wait"),
        ({"model": MODEL, "autoscaling": {"maxReplicas": 2, "targetCpu": 50}}, "autoscaling.targetCpu"),
    ],
)
def test_unknown_fields_are_rejected_naming_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(pydantic.ValidationError) as exc:
        api.ModelDeploymentSpec.model_validate(spec)
    assert field in error_locs(exc)
    assert any(e["type"] == "extra_forbidden" for e in exc.value.errors())


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"model": {**MODEL, "format": "keras"}}, "model.format"),
        ({"model": {**MODEL, "storageUri": "ftp://host/x"}}, "model.storageUri"),
        ({"model": {**MODEL, "version": 0}}, "model.version"),
        ({"replicas": -1}, "replicas"),
        ({"rollout": {"steps": [{"weight": 101}]}}, "rollout.steps.0.weight"),
        (
            {"rollout": {"steps": [{"weight": 10, "pause": {"duration": "soon"}}]}},
            "rollout.steps.0.pause.duration",
        ),
        ({"rollout": {"strategy": "Shadow"}}, "rollout.strategy"),
        ({"server": {"shmSize": "lots"}}, "server.shmSize"),
    ],
)
def test_invalid_values_are_rejected_naming_the_field(patch: dict[str, Any], field: str) -> None:
    with pytest.raises(pydantic.ValidationError) as exc:
        api.ModelDeploymentSpec.model_validate({"model": MODEL, **patch})
    assert field in error_locs(exc)


def test_model_is_required() -> None:
    with pytest.raises(pydantic.ValidationError) as exc:
        api.ModelDeploymentSpec.model_validate({"replicas": 1})
    assert "model" in error_locs(exc)


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(
            {"replicas": 2, "autoscaling": {"maxReplicas": 4, "targetCPUUtilization": 50}},
            id="replicas-and-autoscaling",
        ),
        pytest.param(
            {"autoscaling": {"minReplicas": 5, "maxReplicas": 2, "targetCPUUtilization": 50}},
            id="min-above-max",
        ),
        pytest.param({"rollout": {"steps": [{"weight": 50}, {"weight": 20}]}}, id="falling-weights"),
    ],
)
def test_parsing_refuses_what_the_cel_rules_refuse(spec: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        api.ModelDeploymentSpec.model_validate({"model": MODEL, **spec})


# --------------------------------------------------------------------------- defaults


def test_defaults() -> None:
    spec = parse()
    assert spec.server.image == api.DEFAULT_TRITON_IMAGE
    assert ":" in spec.server.image and not spec.server.image.endswith(":latest")  # a pinned release
    assert spec.server.shm_size == "1Gi"
    assert spec.rollout.strategy is api.Strategy.canary
    assert spec.rollout.auto_rollback is True
    assert spec.rollout.progress_deadline_seconds == 600
    assert spec.paused is False
    assert spec.replicas is None and spec.autoscaling is None
    assert (spec.service.ports.http, spec.service.ports.grpc, spec.service.ports.metrics) == (
        True,
        True,
        True,
    )


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({}, 1),
        ({"replicas": 3}, 3),
        ({"replicas": 0}, 0),
        ({"autoscaling": {"minReplicas": 2, "maxReplicas": 6, "targetCPUUtilization": 50}}, 2),
        ({"autoscaling": {"maxReplicas": 6, "pendingRequests": 4}}, 1),
    ],
)
def test_effective_replicas(spec: dict[str, Any], expected: int) -> None:
    assert parse(**spec).effective_replicas == expected


def test_steps_of_default_is_20_50_100_with_pauses() -> None:
    steps = api.steps_of(parse())
    assert [s.weight for s in steps] == [20, 50, 100]
    assert all(s.pause is not None and s.pause.duration for s in steps[:-1])


def test_steps_of_appends_a_100_percent_step() -> None:
    steps = api.steps_of(parse(rollout={"steps": [{"weight": 10}, {"weight": 40, "pause": {}}]}))
    assert [s.weight for s in steps] == [10, 40, 100]
    assert steps[1].pause is not None and steps[1].pause.duration is None  # indefinite pause kept


def test_steps_of_keeps_an_explicit_final_100_step() -> None:
    steps = api.steps_of(parse(rollout={"steps": [{"weight": 25}, {"weight": 100}]}))
    assert [s.weight for s in steps] == [25, 100]


def test_steps_of_does_not_mutate_the_spec() -> None:
    spec = parse(rollout={"steps": [{"weight": 10}]})
    api.steps_of(spec)
    api.steps_of(spec)
    assert spec.rollout.steps is not None and [s.weight for s in spec.rollout.steps] == [10]
    default = [s.weight for s in api.DEFAULT_CANARY_STEPS]
    api.steps_of(parse())
    assert [s.weight for s in api.DEFAULT_CANARY_STEPS] == default


# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        ("1h2m3s", 3723.0),
        ("250ms", 0.25),
        ("0s", 0.0),
    ],
)
def test_parse_duration(value: str, seconds: float) -> None:
    assert api.parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "30", "s", "1d", "-5s", "1.5m", "5 m", "m5"])
def test_parse_duration_rejects_garbage(value: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        api.parse_duration(value)


@pytest.mark.parametrize(
    ("resources", "gpus"),
    [
        (None, 0),
        ({"requests": {"cpu": "2"}}, 0),
        ({"limits": {"nvidia.com/gpu": "1"}}, 1),
        ({"requests": {"nvidia.com/gpu": "2"}}, 2),
        ({"limits": {"nvidia.com/gpu": "4"}, "requests": {"nvidia.com/gpu": "4"}}, 4),
    ],
)
def test_gpu_count(resources: dict[str, Any] | None, gpus: int) -> None:
    server = {} if resources is None else {"resources": resources}
    assert parse(server=server).gpu_count == gpus


def test_storage_scheme() -> None:
    assert parse().model.scheme == "s3"
    spec = api.ModelDeploymentSpec.model_validate({"model": {**MODEL, "storageUri": "pvc://claim/sub/dir"}})
    assert spec.model.scheme == "pvc"
