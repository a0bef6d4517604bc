"""The BatchInference API: one model source, data URIs, the failure budget."""

from __future__ import annotations

import pydantic
import pytest

from modeldeploy import crdgen
from modeldeploy.batch import api as bapi

MODEL = {"format": "python", "storageUri": "s3://models/m", "version": 1}


def spec(**over: object) -> dict[str, object]:
    return {
        "model": {"inline": {"model": MODEL}},
        "input": {"uri": "s3://data/in/"},
        "output": {"uri": "s3://data/out/"},
        **over,
    }


def test_defaults() -> None:
    s = bapi.BatchInferenceSpec.model_validate(spec())
    assert (s.parallelism, s.shard_size, s.concurrency, s.batch_size) == (1, "64Mi", 4, 32)
    assert s.input.format == bapi.InputFormat.jsonl and s.max_failed_records == "0"


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"model": {}}, "exactly one of model.modelDeploymentRef and model.inline"),
        (
            {"model": {"inline": {"model": MODEL}, "modelDeploymentRef": {"name": "m"}}},
            "exactly one of model.modelDeploymentRef and model.inline",
        ),
        ({"input": {"uri": "pvc://claim/in"}}, "input.uri"),
        ({"maxFailedRecords": "five"}, "maxFailedRecords"),
        ({"maxFailedRecords": "101.5%%"}, "maxFailedRecords"),
        ({"parallelism": 0}, "parallelism"),
    ],
)
def test_bad_specs_name_the_field(over: dict[str, object], needle: str) -> None:
    with pytest.raises(pydantic.ValidationError) as err:
        bapi.BatchInferenceSpec.model_validate(spec(**over))
    text = str(err.value)
    assert needle in text or needle.split(".")[-1] in text


def test_failure_budget() -> None:
    assert bapi.failure_budget("0", 10_000) == 0
    assert bapi.failure_budget("25", 10_000) == 25
    assert bapi.failure_budget("0.5%", 10_000) == 50
    assert bapi.failure_budget("100%", 7) == 7


def test_the_spec_schema_is_structural_with_its_rules() -> None:
    schema = crdgen.schema_of(bapi.BatchInferenceSpec)
    assert "$ref" not in str(schema) and "anyOf" not in str(schema)
    rules = [r["rule"] for r in schema["properties"]["model"]["x-kubernetes-validations"]]
    assert rules == ["has(self.modelDeploymentRef) != has(self.inline)"]
