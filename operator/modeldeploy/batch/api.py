"""The typed BatchInference API (``modeldeploy.io/v1alpha1``, kind BatchInference, short name ``bi``).

Its model and server parts are the ModelDeployment's own types, so a model that serves online scores
offline with the same spec; or it names a ModelDeployment and scores with exactly its stable revision.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field, model_validator

from ..api import (
    Condition,
    ModelSpec,
    Name,
    Quantity,
    ServerSpec,
    _Model,
    _with_rules,
    cel,
)

KIND = "BatchInference"
PLURAL = "batchinferences"
SINGULAR = "batchinference"
SHORT_NAMES = ("bi",)

#: Where records are read from and results written to: object storage only (a PVC or an HTTP archive
#: is not a data set the workers can split and write next to).
DATA_URI_PATTERN = r"^(s3|gs|as)://[^/\s]+(/[^\s]*)?$"


class InputFormat(StrEnum):
    jsonl = "jsonl"
    npy = "npy"


class ModelDeploymentRef(_Model):
    """A ModelDeployment in the same namespace: scoring uses exactly its stable revision."""

    name: Name = Field(description="Name of the ModelDeployment.")


class InlineModel(_Model):
    """A model and server spec of the same types a ModelDeployment uses."""

    model: ModelSpec = Field(description="The model to score with.")
    server: ServerSpec = Field(
        default_factory=ServerSpec, description="The Triton sidecar of each worker pod."
    )


class BatchModel(_Model):
    """Which model scores the records: a ModelDeployment's stable revision, or one written here."""

    model_config = _with_rules(
        cel(
            "has(self.modelDeploymentRef) != has(self.inline)",
            "set exactly one of model.modelDeploymentRef and model.inline",
        )
    )

    model_deployment_ref: ModelDeploymentRef | None = Field(
        default=None,
        description="Score with this ModelDeployment's stable revision (same image, version, config).",
    )
    inline: InlineModel | None = Field(default=None, description="Score with this model and server spec.")

    @model_validator(mode="after")
    def _one(self) -> BatchModel:
        if (self.model_deployment_ref is None) == (self.inline is None):
            raise ValueError("set exactly one of model.modelDeploymentRef and model.inline")
        return self


class DataLocation(_Model):
    """An object-storage prefix and the Secret holding its credentials."""

    uri: str = Field(
        max_length=2048,
        pattern=DATA_URI_PATTERN,
        description="s3://bucket/prefix, gs://bucket/prefix or as://account/container/prefix.",
    )
    credentials_secret: Name | None = Field(
        default=None,
        description="Secret (same namespace) with storage credentials, as for a model; not copied.",
    )


class InputSpec(DataLocation):
    """The records: every object under the prefix, in key order."""

    format: InputFormat = Field(
        default=InputFormat.jsonl,
        description=(
            "jsonl: one record per line, a JSON object naming the model's inputs (KServe v2 tensors "
            '{"inputs": [{"name", "datatype", "shape", "data"}]} or one field per input). '
            "npy: NumPy .npy arrays (C order, numbers or booleans) for a model with one input: each row "
            "along the first axis is a record; results name each record's row."
        ),
    )


class OutputSpec(DataLocation):
    """Where results go: results/part-NNNNN.jsonl per shard, errors/part-NNNNN.jsonl, _manifest.json."""


FailedRecords = Annotated[str, Field(max_length=16, pattern=r"^([0-9]{1,12}|[0-9]{1,3}(\.[0-9]{1,4})?%)$")]


class BatchInferenceSpec(_Model):
    """Desired state of a BatchInference: score every record under input.uri, results under output.uri."""

    model_config = _with_rules(
        cel("self.input.uri != self.output.uri", "output.uri must differ from input.uri"),
        cel(
            "self == oldSelf",
            "spec is immutable once created (its Job is): delete the BatchInference and create a new one; "
            "shards already done under the same output.uri are not scored again",
        ),
    )

    model: BatchModel = Field(description="The model that scores the records.")
    input: InputSpec = Field(description="The records.")
    output: OutputSpec = Field(description="Where results, errors and the manifest go.")
    parallelism: int = Field(default=1, ge=1, le=1000, description="Worker pods at once.")
    shard_size: Quantity = Field(
        default="64Mi", description="Bytes of input per shard (a record belongs to the shard it starts in)."
    )
    concurrency: int = Field(default=4, ge=1, le=256, description="Requests in flight per worker pod.")
    batch_size: int = Field(default=32, ge=1, le=65_536, description="Records per inference request.")
    max_failed_records: FailedRecords = Field(
        default="0",
        description='Failed records before the job fails: a count ("100") or a share of records ("0.5%").',
    )
    retries_per_shard: int = Field(default=3, ge=0, le=100, description="Tries of a shard after its first.")
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, le=30 * 24 * 3600, description="Fail the job if it runs longer than this."
    )
    node_selector: dict[str, str] | None = Field(
        default=None, description="Node selector of the worker pods."
    )
    worker_image: str | None = Field(
        default=None, max_length=512, description="The worker's image (default: the operator's image)."
    )


class BatchPhase(StrEnum):
    pending = "Pending"
    running = "Running"
    succeeded = "Succeeded"
    failed = "Failed"


class BatchInferenceStatus(_Model):
    """Observed state, written by the operator only."""

    observed_generation: int | None = Field(default=None, description="Last metadata.generation acted on.")
    phase: Literal["Pending", "Running", "Succeeded", "Failed"] | None = Field(
        default=None, description="Phase."
    )
    message: str | None = Field(default=None, max_length=4096, description="Summary of the phase.")
    conditions: list[Condition] | None = Field(
        default=None, max_length=16, description="Complete, Failed, ..."
    )
    shards: int | None = Field(default=None, ge=0, description="Shards in the plan.")
    shards_succeeded: int | None = Field(default=None, ge=0, description="Shards whose results are written.")
    shards_failed: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Shards that failed every try in a worker pod (retries per shard); the Job tries the "
            "pod's index again (up to 3 times), and a shard stops counting once a later try gets past it."
        ),
    )
    progress: str | None = Field(default=None, max_length=64, description="Shards done/total.")
    records: int | None = Field(default=None, ge=0, description="Records scored.")
    records_failed: int | None = Field(default=None, ge=0, description="Records in the errors files.")
    records_per_second: float | None = Field(default=None, ge=0, description="Throughput so far.")
    start_time: str | None = Field(default=None, description="When the first worker started (RFC 3339).")
    completion_time: str | None = Field(default=None, description="When it succeeded or failed (RFC 3339).")
    model_revision: str | None = Field(
        default=None,
        max_length=64,
        description="Hash of the model revision scoring (a ModelDeployment's stable one when the job began).",
    )
    manifest: str | None = Field(
        default=None, max_length=2048, description="URI of the manifest, once written."
    )


def failure_budget(max_failed_records: str, records: int) -> int:
    """How many failed records a job of ``records`` records tolerates (it fails at one more)."""
    if max_failed_records.endswith("%"):
        return int(records * float(max_failed_records[:-1]) / 100)
    return int(max_failed_records)
