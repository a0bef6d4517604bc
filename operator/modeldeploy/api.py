"""The ModelDeployment API (modeldeploy.io/v1alpha1): the one source of truth.

The pydantic models below parse objects in the operator *and* generate the CRD's
openAPIV3Schema (see :mod:`modeldeploy.crdgen`). Every field has a description so
``kubectl explain modeldeployment.spec`` teaches the API. Cross-field rules are CEL
(``x-kubernetes-validations``) so the API server refuses bad input at admission with
a message that names the field and the fix.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict

GROUP = "modeldeploy.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ModelDeployment"
PLURAL = "modeldeployments"
SINGULAR = "modeldeployment"
SHORT_NAMES = ["md"]
#: The field manager of every write the operator makes, and the managed-by label of its children.
MANAGER = "modeldeploy-operator"
#: The label naming the ModelDeployment a child belongs to.
LABEL_NAME = f"{GROUP}/name"
#: What a BatchInference's Job, ConfigMap and pods carry instead of LABEL_NAME (its name).
LABEL_BATCH = f"{GROUP}/batch"

#: Manual rollout commands: annotations set to a fresh value (a nonce; ``kubectl modeldeploy promote``
#: writes one), each value acted on once and remembered in ``status.rollout.handled*``.
PROMOTE_ANNOTATION = f"{GROUP}/promote"
RESUME_ANNOTATION = f"{GROUP}/resume"
ABORT_ANNOTATION = f"{GROUP}/abort"
COMMAND_ANNOTATIONS = (PROMOTE_ANNOTATION, RESUME_ANNOTATION, ABORT_ANNOTATION)

#: The Triton image used when ``spec.server.image`` is not set: a pinned release.
DEFAULT_TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:25.10-py3"
DEFAULT_DRAIN_SECONDS = 10  # server.drainSeconds when unset

DURATION_PATTERN = r"^([0-9]+(ms|s|m|h))+$"
STORAGE_URI_PATTERN = r"^(s3|gs|as|pvc|https?)://[^\s]+$"
DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
QUANTITY_PATTERN = r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+|[KMGTPE]i?|[mkMGTPE])?$"


def cel(rule: str, message: str, field_path: str | None = None) -> JsonDict:
    """One ``x-kubernetes-validations`` entry."""
    out: JsonDict = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    return out


def parse_duration(value: str) -> float:
    """'1m30s' -> 90.0 seconds. Accepts the units ms, s, m, h."""
    if not re.fullmatch(DURATION_PATTERN, value):
        raise ValueError(f"invalid duration {value!r}: use e.g. 30s, 5m, 1h30m")
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * scale[u] for n, u in re.findall(r"([0-9]+)(ms|s|m|h)", value))


_QUANTITY_SUFFIX: dict[str, Decimal] = {
    "": Decimal(1),
    "m": Decimal("0.001"),
    **{s: Decimal(10) ** (3 * (i + 1)) for i, s in enumerate("kMGTPE")},
    **{s + "i": Decimal(2) ** (10 * (i + 1)) for i, s in enumerate("KMGTPE")},
}
_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eE][-+]?[0-9]+|[KMGTPE]i|[mkMGTPE])?$")


def parse_quantity(value: Any) -> Decimal | None:
    """A Kubernetes quantity as a number ("1500m" -> 1.5, "1Gi" -> 1073741824); None if it is none.
    The API server canonicalises quantities ("1000m" reads back as "1"), so they compare as numbers."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return Decimal(str(value))
    if not isinstance(value, str) or not (m := _QUANTITY.match(value)):
        return None
    try:
        number = Decimal(m.group(1))
    except InvalidOperation:
        return None
    suffix = m.group(2) or ""
    if suffix[:1] in ("e", "E"):
        return number * (Decimal(10) ** int(suffix[1:]))
    return number * _QUANTITY_SUFFIX[suffix]


def _with_rules(*rules: JsonDict) -> ConfigDict:
    """The common model settings plus CEL rules (``x-kubernetes-validations``) for the CRD."""
    return ConfigDict(
        extra="forbid",
        populate_by_name=True,
        alias_generator=to_camel,
        json_schema_extra={"x-kubernetes-validations": list(rules)},
    )


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", populate_by_name=True, alias_generator=to_camel, use_attribute_docstrings=False
    )


Name = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS1123_SUBDOMAIN)]
Duration = Annotated[str, Field(max_length=32, pattern=DURATION_PATTERN)]
Quantity = Annotated[str, Field(max_length=64, pattern=QUANTITY_PATTERN)]
ShortStr = Annotated[str, Field(max_length=256)]
LabelMap = Annotated[
    dict[Annotated[str, Field(max_length=317)], Annotated[str, Field(max_length=4096)]],
    Field(max_length=64),
]


# --------------------------------------------------------------------------- model


class ModelFormat(StrEnum):
    onnx = "onnx"
    pytorch = "pytorch"
    tensorflow = "tensorflow"
    tensorrt = "tensorrt"
    python = "python"
    ensemble = "ensemble"


class TensorSpec(_Model):
    """One model input or output tensor."""

    name: str = Field(min_length=1, max_length=128, description="Tensor name as the model declares it.")
    data_type: Literal[
        "TYPE_BOOL",
        "TYPE_UINT8",
        "TYPE_UINT16",
        "TYPE_UINT32",
        "TYPE_UINT64",
        "TYPE_INT8",
        "TYPE_INT16",
        "TYPE_INT32",
        "TYPE_INT64",
        "TYPE_FP16",
        "TYPE_FP32",
        "TYPE_FP64",
        "TYPE_STRING",
        "TYPE_BF16",
    ] = Field(description="Triton data type, e.g. TYPE_FP32.")
    dims: list[Annotated[int, Field(ge=-1)]] = Field(
        min_length=1, max_length=16, description="Shape without the batch dimension; -1 for a variable size."
    )


class DynamicBatching(_Model):
    """Triton dynamic batcher settings."""

    preferred_batch_sizes: list[Annotated[int, Field(ge=1, le=1_000_000)]] | None = Field(
        default=None, max_length=16, description="Batch sizes the batcher tries to form."
    )
    max_queue_delay_microseconds: int | None = Field(
        default=None, ge=0, le=60_000_000, description="How long a request may wait to be batched."
    )


class InstanceGroup(_Model):
    """Where and how many copies of the model run in each Triton server."""

    model_config = _with_rules(
        cel(
            "!has(self.gpus) || (has(self.kind) && self.kind == 'KIND_GPU')",
            "instanceGroups[].gpus applies only to kind KIND_GPU",
        )
    )

    kind: Literal["KIND_CPU", "KIND_GPU", "KIND_AUTO"] = Field(
        default="KIND_AUTO", description="KIND_CPU, KIND_GPU or KIND_AUTO."
    )
    count: int = Field(default=1, ge=1, le=64, description="Model instances per device.")
    gpus: list[Annotated[int, Field(ge=0, le=63)]] | None = Field(
        default=None, max_length=64, description="GPU indexes for KIND_GPU (default: all visible GPUs)."
    )

    @model_validator(mode="after")
    def _gpus_need_gpu_kind(self) -> InstanceGroup:
        if self.gpus is not None and self.kind != "KIND_GPU":
            raise ValueError("instanceGroups[].gpus applies only to kind KIND_GPU")
        return self


class TensorRTOptimization(_Model):
    """TensorRT execution accelerator (for ONNX/TensorFlow models on GPU)."""

    precision: Literal["FP32", "FP16", "INT8"] = Field(
        default="FP16", description="Precision of the TensorRT engine."
    )
    max_workspace_size_bytes: int | None = Field(
        default=None, ge=1, description="Upper bound of TensorRT workspace memory."
    )


class Optimization(_Model):
    """Model optimization settings rendered into config.pbtxt."""

    tensorrt: TensorRTOptimization | None = Field(
        default=None, description="Enable the TensorRT GPU execution accelerator."
    )
    cuda_graphs: bool | None = Field(default=None, description="Use CUDA graphs (TensorRT models).")


class EnsembleStep(_Model):
    """One step of an ensemble pipeline."""

    model_name: str = Field(min_length=1, max_length=128, description="Model run by this step.")
    model_version: int = Field(default=-1, ge=-1, description="Version of that model; -1 for latest.")
    input_map: dict[Annotated[str, Field(max_length=128)], Annotated[str, Field(max_length=128)]] = Field(
        max_length=32, description="Step model input name -> ensemble tensor name."
    )
    output_map: dict[Annotated[str, Field(max_length=128)], Annotated[str, Field(max_length=128)]] = Field(
        max_length=32, description="Step model output name -> ensemble tensor name."
    )


class ModelConfig(_Model):
    """Triton model configuration, rendered into config.pbtxt when the repository has none."""

    max_batch_size: int = Field(default=0, ge=0, le=1_000_000, description="0 disables batching.")
    dynamic_batching: DynamicBatching | None = Field(
        default=None, description="Enable Triton's dynamic batcher (needs maxBatchSize > 0)."
    )
    instance_groups: list[InstanceGroup] | None = Field(
        default=None, max_length=8, description="Model instances (CPU/GPU, count)."
    )
    inputs: list[TensorSpec] | None = Field(default=None, max_length=64, description="Model inputs.")
    outputs: list[TensorSpec] | None = Field(default=None, max_length=64, description="Model outputs.")
    optimization: Optimization | None = Field(default=None, description="Execution accelerators.")
    parameters: dict[Annotated[str, Field(max_length=128)], Annotated[str, Field(max_length=1024)]] | None = (
        Field(default=None, max_length=32, description="Backend parameters (key -> string value).")
    )
    ensemble_steps: list[EnsembleStep] | None = Field(
        default=None,
        min_length=1,
        max_length=32,
        description="Pipeline steps; required (at least one) for the ensemble format.",
    )


class ModelSpec(_Model):
    """The model to serve."""

    model_config = _with_rules(
        cel(
            "self.format != 'ensemble' || (has(self.config) && has(self.config.ensembleSteps))",
            "model.config.ensembleSteps is required when model.format is ensemble",
        ),
        cel(
            "!has(self.config) || !has(self.config.dynamicBatching) || (has(self.config.maxBatchSize) && self.config.maxBatchSize > 0)",
            "model.config.dynamicBatching needs model.config.maxBatchSize > 0",
        ),
        cel(
            "!has(self.config) || !has(self.config.dynamicBatching) || self.format != 'ensemble'",
            "model.config.dynamicBatching does not apply to an ensemble; remove it",
        ),
        cel(
            "!has(self.config) || !has(self.config.instanceGroups) || self.format != 'ensemble'",
            "model.config.instanceGroups does not apply to an ensemble; remove it",
        ),
        cel(
            "!has(self.config) || !has(self.config.ensembleSteps) || self.format == 'ensemble'",
            "model.config.ensembleSteps applies only to model.format ensemble",
        ),
        cel(
            "!has(self.config) || !has(self.config.optimization) || !has(self.config.optimization.tensorrt)"
            " || self.format in ['onnx', 'tensorflow']",
            "model.config.optimization.tensorrt applies only to onnx and tensorflow models",
        ),
        cel(
            "!has(self.config) || !has(self.config.optimization) || !has(self.config.optimization.cudaGraphs)"
            " || !self.config.optimization.cudaGraphs || self.format == 'tensorrt'",
            "model.config.optimization.cudaGraphs applies only to tensorrt models",
        ),
    )

    name: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Triton model name (default: metadata.name).",
    )
    format: ModelFormat = Field(
        description=(
            "Model format; picks the Triton backend: onnx, pytorch (TorchScript), tensorflow "
            "(SavedModel), tensorrt, python, ensemble."
        )
    )
    storage_uri: str = Field(
        max_length=2048,
        pattern=STORAGE_URI_PATTERN,
        description=(
            "Where the model repository lives: s3://bucket/path, gs://bucket/path, as://account/container/path, "
            "pvc://claim/path, or http(s)://host/archive.tar.gz."
        ),
    )
    version: int = Field(
        ge=1,
        le=2_147_483_647,
        description="Model version (the numbered directory in the repository) to serve. Changing it starts a rollout.",
    )
    config: ModelConfig | None = Field(
        default=None,
        description="Triton model config, rendered into config.pbtxt when the repository has none.",
    )
    credentials_secret: Name | None = Field(
        default=None,
        description="Secret (same namespace) holding storage credentials. Referenced, never copied.",
    )

    @model_validator(mode="after")
    def _cross_fields(self) -> ModelSpec:  # mirrors the CEL rules, for offline use (render)
        if self.format == ModelFormat.ensemble and (self.config is None or not self.config.ensemble_steps):
            raise ValueError("model.config.ensembleSteps is required when model.format is ensemble")
        cfg = self.config
        if cfg is None:
            return self
        ensemble = self.format == ModelFormat.ensemble
        if cfg.dynamic_batching is not None and cfg.max_batch_size <= 0:
            raise ValueError("model.config.dynamicBatching needs model.config.maxBatchSize > 0")
        if cfg.dynamic_batching is not None and ensemble:
            raise ValueError("model.config.dynamicBatching does not apply to an ensemble; remove it")
        if cfg.instance_groups and ensemble:
            raise ValueError("model.config.instanceGroups does not apply to an ensemble; remove it")
        if cfg.ensemble_steps and not ensemble:
            raise ValueError("model.config.ensembleSteps applies only to model.format ensemble")
        opt = cfg.optimization
        if opt and opt.tensorrt and self.format not in (ModelFormat.onnx, ModelFormat.tensorflow):
            raise ValueError("model.config.optimization.tensorrt applies only to onnx and tensorflow models")
        if opt and opt.cuda_graphs and self.format != ModelFormat.tensorrt:
            raise ValueError("model.config.optimization.cudaGraphs applies only to tensorrt models")
        return self

    @property
    def scheme(self) -> str:
        return self.storage_uri.split("://", 1)[0]


# --------------------------------------------------------------------------- server


class SecretKeySelector(_Model):
    """A key in a Secret or ConfigMap."""

    name: Name = Field(description="Object name.")
    key: str = Field(min_length=1, max_length=253, description="Key within the object.")
    optional: bool | None = Field(default=None, description="Whether the object or key may be missing.")


class FieldSelector(_Model):
    """A field of the pod."""

    field_path: str = Field(max_length=256, description="e.g. metadata.name.")


class EnvVarSource(_Model):
    """Where an environment variable's value comes from."""

    secret_key_ref: SecretKeySelector | None = Field(default=None, description="A key of a Secret.")
    config_map_key_ref: SecretKeySelector | None = Field(default=None, description="A key of a ConfigMap.")
    field_ref: FieldSelector | None = Field(default=None, description="A field of the pod.")


class EnvVar(_Model):
    """An environment variable for the Triton container."""

    name: str = Field(
        min_length=1, max_length=256, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$", description="Name."
    )
    value: str | None = Field(default=None, max_length=32768, description="Literal value.")
    value_from: EnvVarSource | None = Field(
        default=None, description="Value from a Secret, ConfigMap or field."
    )


class Resources(_Model):
    """Compute resources of the Triton container (e.g. cpu, memory, nvidia.com/gpu)."""

    requests: dict[Annotated[str, Field(max_length=253)], Quantity] | None = Field(
        default=None, max_length=16, description="Requested resources."
    )
    limits: dict[Annotated[str, Field(max_length=253)], Quantity] | None = Field(
        default=None, max_length=16, description="Resource limits."
    )


class Toleration(_Model):
    """A pod toleration."""

    key: str | None = Field(default=None, max_length=317, description="Taint key.")
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Exists or Equal.")
    value: str | None = Field(default=None, max_length=63, description="Taint value.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect."
    )
    toleration_seconds: int | None = Field(default=None, description="For NoExecute: how long to stay bound.")


class ServerSpec(_Model):
    """The Triton server pods."""

    image: str = Field(
        default=DEFAULT_TRITON_IMAGE,
        min_length=1,
        max_length=512,
        description="Triton image (pinned release).",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        default=None, description="Image pull policy."
    )
    args: list[Annotated[str, Field(max_length=1024)]] = Field(
        default_factory=list, max_length=64, description="Extra tritonserver arguments."
    )
    resources: Resources | None = Field(
        default=None, description="Container resources, incl. nvidia.com/gpu."
    )
    env: list[EnvVar] = Field(
        default_factory=list, max_length=128, description="Extra environment variables."
    )
    node_selector: LabelMap | None = Field(default=None, description="Node selector for Triton pods.")
    tolerations: list[Toleration] | None = Field(default=None, max_length=32, description="Pod tolerations.")
    affinity: dict[str, Any] | None = Field(
        default=None,
        description="Pod affinity (core/v1 Affinity), passed through as written.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True, "type": "object"},
    )
    topology_spread_constraints: list[dict[str, Any]] | None = Field(
        default=None,
        max_length=8,
        description="core/v1 TopologySpreadConstraints, passed through as written.",
    )
    service_account_name: Name | None = Field(default=None, description="ServiceAccount of Triton pods.")
    image_pull_secrets: list[Name] | None = Field(default=None, max_length=16, description="Pull Secrets.")
    pod_labels: LabelMap | None = Field(default=None, description="Extra labels on Triton pods.")
    pod_annotations: LabelMap | None = Field(default=None, description="Extra annotations on Triton pods.")
    shm_size: Quantity = Field(default="1Gi", description="Size of /dev/shm (the python backend needs it).")
    drain_seconds: int | None = Field(
        default=None,
        ge=0,
        le=600,
        description=(
            "Seconds a terminating Triton pod keeps serving before Triton is told to stop (a preStop "
            "sleep), so that Services and load balancers stop sending it new requests first. Unset: 10. "
            "The pod's termination grace period is this plus 30 s for Triton's own shutdown."
        ),
    )


# --------------------------------------------------------------------------- scaling


class AutoscalingSpec(_Model):
    """Horizontal autoscaling of the stable revision. Mutually exclusive with spec.replicas."""

    model_config = _with_rules(
        cel(
            "!has(self.minReplicas) || self.minReplicas <= self.maxReplicas",
            "autoscaling.minReplicas must be <= autoscaling.maxReplicas",
            ".minReplicas",
        ),
        cel(
            "has(self.targetCPUUtilization) || has(self.queueTimeMicroseconds) || "
            "has(self.pendingRequests) || has(self.gpuUtilization)",
            "autoscaling needs at least one target: targetCPUUtilization, queueTimeMicroseconds, "
            "pendingRequests or gpuUtilization",
        ),
    )

    min_replicas: int = Field(default=1, ge=1, le=10_000, description="Lower bound of replicas.")
    max_replicas: int = Field(ge=1, le=10_000, description="Upper bound of replicas.")
    target_cpu_utilization: int | None = Field(
        default=None,
        alias="targetCPUUtilization",
        ge=1,
        le=1000,
        description="Target average CPU utilisation (%).",
    )
    queue_time_microseconds: int | None = Field(
        default=None,
        ge=1,
        description="Target Triton queue time per request (Pods metric avg_time_queue_us, via Prometheus Adapter).",
    )
    pending_requests: int | None = Field(
        default=None,
        ge=1,
        description="Target pending requests per pod (Pods metric nv_inference_pending_request_count).",
    )
    gpu_utilization: int | None = Field(
        default=None,
        ge=1,
        le=100,
        description="Target GPU utilisation % averaged per pod (External metric nv_gpu_utilization).",
    )
    behavior: dict[str, Any] | None = Field(
        default=None,
        description="autoscaling/v2 HorizontalPodAutoscalerBehavior, passed through as written.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True, "type": "object"},
    )

    @model_validator(mode="after")
    def _cross_fields(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError("autoscaling.minReplicas must be <= autoscaling.maxReplicas")
        if not any(
            v is not None
            for v in (
                self.target_cpu_utilization,
                self.queue_time_microseconds,
                self.pending_requests,
                self.gpu_utilization,
            )
        ):
            raise ValueError(
                "autoscaling needs at least one target: targetCPUUtilization, "
                "queueTimeMicroseconds, pendingRequests or gpuUtilization"
            )
        return self


class PDBSpec(_Model):
    """Optional PodDisruptionBudget for the serving pods."""

    model_config = _with_rules(
        cel(
            "!(has(self.minAvailable) && has(self.maxUnavailable))",
            "set only one of podDisruptionBudget.minAvailable and podDisruptionBudget.maxUnavailable",
        )
    )

    enabled: bool = Field(default=True, description="Create the PodDisruptionBudget.")
    min_available: int | None = Field(default=None, ge=0, description="Pods that must stay available.")
    max_unavailable: int | None = Field(default=None, ge=0, description="Pods that may be unavailable.")

    @model_validator(mode="after")
    def _cross_fields(self) -> PDBSpec:
        if self.min_available is not None and self.max_unavailable is not None:
            raise ValueError(
                "set only one of podDisruptionBudget.minAvailable and podDisruptionBudget.maxUnavailable"
            )
        return self


# --------------------------------------------------------------------------- rollout


class Strategy(StrEnum):
    canary = "Canary"
    blue_green = "BlueGreen"
    rolling = "Rolling"


class Pause(_Model):
    """A pause after a step. Without a duration it waits for promote (or resume)."""

    duration: Duration | None = Field(default=None, description="e.g. 60s, 5m. Empty: wait for promote.")


class CanaryStep(_Model):
    """One canary step: move this share of traffic to the candidate, then optionally pause."""

    weight: int = Field(ge=1, le=100, description="Percent of traffic on the candidate at this step (1-100).")
    pause: Pause | None = Field(default=None, description="Pause after reaching the weight.")


class Thresholds(_Model):
    """Limits the candidate must stay within. Unset limits are not checked."""

    max_error_rate: float | None = Field(
        default=None, ge=0, le=1, description="Max failed/total request ratio (0-1)."
    )
    max_p99_latency_ms: float | None = Field(
        default=None, alias="maxP99LatencyMs", ge=0, description="Max p99 request latency in ms."
    )
    max_queue_time_ms: float | None = Field(
        default=None, ge=0, description="Max average queue time per request in ms."
    )
    max_error_rate_vs_stable: float | None = Field(
        default=None, ge=1, description="Max candidate/stable error-rate ratio (e.g. 1.5)."
    )
    max_latency_vs_stable: float | None = Field(
        default=None, ge=1, description="Max candidate/stable latency ratio (e.g. 1.2)."
    )


class AnalysisSpec(_Model):
    """Metric analysis gating each canary step."""

    model_config = _with_rules(
        cel(
            "!(has(self.prometheusUrl) && has(self.scrape) && self.scrape)",
            "set analysis.prometheusUrl or analysis.scrape: true, not both",
        )
    )

    prometheus_url: str | None = Field(
        default=None, max_length=2048, pattern=r"^https?://[^\s]+$", description="Prometheus base URL."
    )
    scrape: bool = Field(
        default=False, description="Scrape candidate pods' :8002/metrics directly (no Prometheus)."
    )
    interval: Duration = Field(default="30s", description="Length of each analysis window.")
    min_requests: int = Field(
        default=20, ge=0, description="Below this many requests in a window the verdict is Inconclusive."
    )
    max_inconclusive: int = Field(
        default=3,
        ge=0,
        le=100,
        description="Consecutive inconclusive windows tolerated before the step fails.",
    )
    thresholds: Thresholds = Field(default_factory=Thresholds, description="Limits checked each window.")

    @model_validator(mode="after")
    def _cross_fields(self) -> AnalysisSpec:
        if self.prometheus_url is not None and self.scrape:
            raise ValueError("set analysis.prometheusUrl or analysis.scrape: true, not both")
        return self


class BlueGreenSpec(_Model):
    """Blue-green settings."""

    auto_promote: bool = Field(
        default=True, description="Flip traffic as soon as the preview is ready and healthy."
    )
    scale_down_delay_seconds: int = Field(
        default=30, ge=0, le=86400, description="Keep the old revision this long after promotion."
    )


class GatewaySpec(_Model):
    """Exact traffic weights through a Gateway API HTTPRoute (and GRPCRoute)."""

    parent_refs: list[dict[str, Any]] = Field(
        min_length=1, max_length=16, description="Gateway API parentRefs of the routes."
    )
    hostnames: list[Annotated[str, Field(max_length=253)]] | None = Field(
        default=None, max_length=16, description="Route hostnames."
    )
    grpc: bool = Field(default=False, description="Also create a GRPCRoute for port 8001.")


class RolloutSpec(_Model):
    """How a new revision replaces the stable one."""

    model_config = _with_rules(
        cel(
            "!has(self.steps) || size(self.steps) < 2 || self.steps.map(s, s.weight).isSorted()",
            "rollout.steps weights must rise from step to step",
            ".steps",
        ),
        cel(
            "!has(self.steps) || self.steps.all(s, self.steps.filter(t, t.weight == s.weight).size() == 1)",
            "rollout.steps weights must be distinct and rising",
            ".steps",
        ),
        cel(
            "!has(self.steps) || !has(self.strategy) || self.strategy == 'Canary'",
            "rollout.steps apply only to strategy Canary",
            ".steps",
        ),
    )

    strategy: Strategy = Field(default=Strategy.canary, description="Canary (default), BlueGreen or Rolling.")
    steps: list[CanaryStep] | None = Field(
        default=None,
        max_length=20,
        description="Canary steps (default: 20%, 50%, 100% with 30s pauses).",
    )
    analysis: AnalysisSpec | None = Field(default=None, description="Metric analysis gating each step.")
    progress_deadline_seconds: int = Field(
        default=600, ge=10, le=86400, description="A step not done within this time fails the rollout."
    )
    auto_rollback: bool = Field(default=True, description="Revert to stable by itself when a rollout fails.")
    scale_down_delay_seconds: int = Field(
        default=30, ge=0, le=86400, description="Keep the old revision this long after promotion."
    )
    blue_green: BlueGreenSpec | None = Field(default=None, description="BlueGreen settings.")
    max_surge: int | None = Field(default=None, ge=0, description="Rolling: extra pods during an update.")
    max_unavailable: int | None = Field(
        default=None, ge=0, description="Rolling: pods that may be unavailable (default 0 with GPUs)."
    )
    gateway: GatewaySpec | None = Field(default=None, description="Exact weights via Gateway API routes.")

    @model_validator(mode="after")
    def _cross_fields(self) -> RolloutSpec:
        if self.steps:
            weights = [s.weight for s in self.steps]
            if weights != sorted(set(weights)):
                raise ValueError("rollout.steps weights must be distinct and rising")
            if "strategy" in self.model_fields_set and self.strategy != Strategy.canary:
                raise ValueError("rollout.steps apply only to strategy Canary")
        return self


class RollbackTo(_Model):
    """Declarative rollback."""

    revision: int = Field(ge=1, description="Revision number (see status.history) to serve.")


class ServicePorts(_Model):
    """Which Triton ports the Services expose."""

    http: bool = Field(default=True, description="HTTP/REST, port 8000.")
    grpc: bool = Field(default=True, description="gRPC, port 8001.")
    metrics: bool = Field(default=True, description="Prometheus metrics, port 8002.")


class ServiceSpec(_Model):
    """The Services in front of Triton."""

    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field(
        default="ClusterIP", description="Service type."
    )
    annotations: LabelMap | None = Field(default=None, description="Annotations on the main Service.")
    ports: ServicePorts = Field(default_factory=ServicePorts, description="Exposed ports.")


class MonitoringSpec(_Model):
    """Prometheus Operator integration."""

    service_monitor: bool = Field(
        default=False, description="Create a ServiceMonitor (only when its CRD is installed)."
    )
    interval: Duration = Field(default="15s", description="Scrape interval.")


class ModelDeploymentSpec(_Model):
    """Desired state of a ModelDeployment: one model served by Triton, rolled out progressively."""

    model_config = _with_rules(
        cel(
            "!(has(self.replicas) && has(self.autoscaling))",
            "set spec.replicas or spec.autoscaling, not both (with autoscaling the HPA owns replicas)",
        ),
    )

    model: ModelSpec = Field(description="The model to serve.")
    server: ServerSpec = Field(default_factory=ServerSpec, description="The Triton server pods.")
    replicas: int | None = Field(
        default=None, ge=0, le=10_000, description="Fixed replica count when autoscaling is off (default 1)."
    )
    autoscaling: AutoscalingSpec | None = Field(default=None, description="Horizontal autoscaling.")
    rollout: RolloutSpec = Field(default_factory=RolloutSpec, description="Rollout strategy and gates.")
    rollback_to: RollbackTo | None = Field(default=None, description="Serve this earlier revision.")
    paused: bool = Field(default=False, description="Pause an ongoing rollout where it is.")
    revision_history_limit: int = Field(
        default=10, ge=1, le=100, description="Revisions remembered in status."
    )
    service: ServiceSpec = Field(default_factory=ServiceSpec, description="Services.")
    monitoring: MonitoringSpec = Field(default_factory=MonitoringSpec, description="ServiceMonitor.")
    pod_disruption_budget: PDBSpec | None = Field(default=None, description="Optional PodDisruptionBudget.")

    @model_validator(mode="after")
    def _cross_fields(self) -> ModelDeploymentSpec:
        if self.replicas is not None and self.autoscaling is not None:
            raise ValueError(
                "set spec.replicas or spec.autoscaling, not both (with autoscaling the HPA owns replicas)"
            )
        return self

    @property
    def effective_replicas(self) -> int:
        if self.autoscaling is not None:
            return self.autoscaling.min_replicas
        return 1 if self.replicas is None else self.replicas

    @property
    def gpu_count(self) -> int:
        res = self.server.resources
        if res is None:
            return 0
        raw = (res.limits or {}).get("nvidia.com/gpu") or (res.requests or {}).get("nvidia.com/gpu") or "0"
        try:
            return int(float(raw))
        except ValueError:
            return 0


DEFAULT_CANARY_STEPS = [
    CanaryStep(weight=20, pause=Pause(duration="30s")),
    CanaryStep(weight=50, pause=Pause(duration="30s")),
    CanaryStep(weight=100),
]


def steps_of(spec: ModelDeploymentSpec) -> list[CanaryStep]:
    """The effective canary steps; the last one always reaches 100%."""
    steps = list(spec.rollout.steps or DEFAULT_CANARY_STEPS)
    if steps[-1].weight != 100:
        steps.append(CanaryStep(weight=100))
    return steps


# --------------------------------------------------------------------------- status
# Written by the operator only. Typed so `kubectl explain` documents it and the CRD
# keeps a structural schema; every field optional.


class Condition(_Model):
    """A Kubernetes-convention condition."""

    type: str = Field(max_length=64, description="Ready, Progressing, Degraded or RolledBack.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(max_length=128, description="CamelCase reason.")
    message: str = Field(default="", max_length=4096, description="Human-readable detail.")
    last_transition_time: str = Field(description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(default=None, description="metadata.generation this reflects.")


class RevisionRecord(_Model):
    """One revision of the pod template, as remembered in status.history."""

    revision: int = Field(ge=1, description="Revision number, increasing.")
    hash: str = Field(max_length=64, description="Hash of everything that shapes the pods.")
    model_version: int = Field(description="spec.model.version of this revision.")
    image: str = Field(max_length=512, description="Triton image.")
    config_hash: str = Field(default="", max_length=64, description="Hash of the rendered config.pbtxt.")
    created: str = Field(description="When the revision was first seen (RFC 3339).")
    outcome: str = Field(
        max_length=32, description="Pending, Progressing, Serving, Superseded, RolledBack, Aborted or Failed."
    )
    reason: str | None = Field(default=None, max_length=1024, description="Why it ended as it did.")
    spec: dict[str, Any] | None = Field(
        default=None,
        description="The pod-shaping part of the spec of this revision (for rollbackTo).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True, "type": "object"},
    )


class SeriesCounters(_Model):
    """Cumulative Triton counters of one series (one pod's model version) at a window's start."""

    labels: dict[str, str] = Field(description="What names the series: scraped URL, model, version.")
    success: float = Field(default=0.0, description="nv_inference_request_success.")
    failure: float = Field(default=0.0, description="nv_inference_request_failure, except reason CANCELED.")
    inferences: float = Field(default=0.0, description="nv_inference_count.")
    request_us: float = Field(default=0.0, description="nv_inference_request_duration_us.")
    queue_us: float = Field(default=0.0, description="nv_inference_queue_duration_us.")


class WindowCounters(_Model):
    """The counters a window started from, per series, when the pods are scraped directly."""

    candidate: list[SeriesCounters] = Field(default_factory=list, description="The candidate's series.")
    stable: list[SeriesCounters] | None = Field(
        default=None, description="The stable revision's series (unset: its metrics were unavailable)."
    )


class AnalysisResult(_Model):
    """The last analysis verdict and the values it was based on. Written by the analysis windows,
    which run on their own schedule; the reconcile reads it."""

    verdict: str = Field(max_length=32, description="Pending, Pass, Fail or Inconclusive.")
    reason: str = Field(default="", max_length=1024, description="Which metric decided, and its value.")
    time: str = Field(description="When (RFC 3339).")
    values: dict[str, float] = Field(default_factory=dict, description="Metric name -> measured value.")
    inconclusive_count: int = Field(default=0, description="Consecutive inconclusive windows.")
    candidate_hash: str | None = Field(
        default=None, max_length=64, description="Revision hash of the candidate this result judges."
    )
    step: int | None = Field(default=None, description="The canary step (rollout.step) it belongs to.")
    attempt: str | None = Field(
        default=None,
        description="The rollout it belongs to (rollout.startedAt): a retried candidate is measured afresh.",
    )
    window_start: str | None = Field(
        default=None,
        description=(
            "When the window in progress began (RFC 3339, milliseconds); it ends one analysis.interval "
            "later, also across an operator restart. Unset after an attempt that could not read metrics: "
            "the next attempt, an interval after time, starts a new window."
        ),
    )
    window_counters: WindowCounters | None = Field(
        default=None,
        description=(
            "The counters the window in progress started from, when the pods are scraped directly "
            "(with Prometheus, it is asked for them at windowStart)."
        ),
    )


class RolloutPhase(StrEnum):
    """Phase of the rollout state machine (``status.rollout.state``); see :mod:`modeldeploy.modeldeployment.rollout`."""

    idle = "Idle"
    progressing = "Progressing"
    paused = "Paused"
    promoting = "Promoting"
    rolled_back = "RolledBack"
    aborted = "Aborted"


#: What each phase means: the one text for the CRD's description and the code's documentation.
ROLLOUT_PHASES: dict[RolloutPhase, str] = {
    RolloutPhase.idle: "no rollout; the stable revision serves.",
    RolloutPhase.progressing: "the candidate is at a canary step or in the blue-green preview, "
    "waiting for its pods, its analysis or the step's pause.",
    RolloutPhase.paused: "stopped at a step until the user acts; pauseReason says why.",
    RolloutPhase.promoting: "the last step passed (or promote was asked): the candidate is scaled to full "
    "capacity, then becomes stable.",
    RolloutPhase.rolled_back: "the candidate failed (reason says why); the stable revision serves until "
    "the spec changes.",
    RolloutPhase.aborted: "stopped by the user; the stable revision serves until the spec changes.",
}


class PauseReason(StrEnum):
    """Why a rollout is Paused (``status.rollout.pauseReason``)."""

    spec_paused = "SpecPaused"
    waiting_for_promote = "WaitingForPromote"
    candidate_failed = "CandidateFailed"


#: What each pause reason means, and what ends the pause.
PAUSE_REASONS: dict[PauseReason, str] = {
    PauseReason.spec_paused: "spec.paused is true; setting it to false resumes.",
    PauseReason.waiting_for_promote: "a canary step without a pause duration, or a blue-green preview with "
    "autoPromote off; resume or promote continues.",
    PauseReason.candidate_failed: "the candidate failed and autoRollback is off; its pods stay as they are "
    "until promote, resume or abort.",
}


def _meanings(intro: str, meanings: dict[RolloutPhase, str] | dict[PauseReason, str]) -> str:
    return " ".join([intro, *(f"{value.value}: {text}" for value, text in meanings.items())])


def _legacy_pause_reason(reason: object) -> PauseReason | None:
    """The pause reason an operator from before ``pauseReason`` kept only in the human ``reason``.

    These are the texts it wrote then, frozen here: the messages written now may change."""
    if not isinstance(reason, str):
        return None
    if reason.startswith("Failed: "):
        return PauseReason.candidate_failed
    return {
        "spec.paused": PauseReason.spec_paused,
        "waiting for promote": PauseReason.waiting_for_promote,
    }.get(reason)


class RolloutState(_Model):
    """The persisted rollout state machine. Written before each action."""

    state: RolloutPhase = Field(description=_meanings("Phase of the rollout.", ROLLOUT_PHASES))
    stable_revision: int | None = Field(default=None, description="Revision serving before this rollout.")
    candidate_revision: int | None = Field(default=None, description="Revision being rolled out.")
    step: int = Field(default=0, description="Index of the current canary step.")
    weight: int = Field(default=0, description="Traffic percent on the candidate.")
    step_started_at: str | None = Field(default=None, description="When the current step began.")
    started_at: str | None = Field(default=None, description="When the rollout began.")
    step_ready_at: str | None = Field(default=None, description="When the current step's pods became ready.")
    pause_reason: PauseReason | None = Field(
        default=None, description=_meanings("Why the rollout is Paused (only then).", PAUSE_REASONS)
    )
    reason: str | None = Field(
        default=None,
        max_length=1024,
        description="Why it is in this state, in words (state and pauseReason are for programs).",
    )
    scale_down_at: str | None = Field(
        default=None, description="When the superseded revision scales to zero."
    )
    scale_down_revision: int | None = Field(default=None, description="Revision awaiting scale-down.")
    handled_promote: str | None = Field(
        default=None, description="Last modeldeploy.io/promote value acted on."
    )
    handled_resume: str | None = Field(default=None, description="Last modeldeploy.io/resume value acted on.")
    handled_abort: str | None = Field(default=None, description="Last modeldeploy.io/abort value acted on.")

    @model_validator(mode="before")
    @classmethod
    def _pause_reason_of_older_operators(cls, data: Any) -> Any:
        """A Paused status written before ``pauseReason`` existed: its reason text says which pause."""
        if not isinstance(data, dict) or data.get("state") != RolloutPhase.paused:
            return data
        if data.get("pauseReason") is not None or data.get("pause_reason") is not None:
            return data
        why = _legacy_pause_reason(data.get("reason"))
        return data if why is None else {**data, "pauseReason": why.value}


class Endpoints(_Model):
    """In-cluster URLs of the main Service."""

    http: str | None = Field(default=None, description="HTTP/REST URL (port 8000).")
    grpc: str | None = Field(default=None, description="gRPC address (port 8001).")
    metrics: str | None = Field(default=None, description="Metrics URL (port 8002).")


class ModelDeploymentStatus(_Model):
    """Observed state, written by the operator."""

    observed_generation: int | None = Field(default=None, description="Last metadata.generation acted on.")
    phase: str | None = Field(
        default=None, description="Pending, Progressing, Ready, Paused, Degraded, RolledBack or Failed."
    )
    message: str | None = Field(default=None, max_length=4096, description="Summary of the phase.")
    conditions: list[Condition] | None = Field(
        default=None, description="Ready, Progressing, Degraded, RolledBack."
    )
    replicas: int | None = Field(default=None, description="Pods of all revisions.")
    ready_replicas: int | None = Field(default=None, description="Ready pods of all revisions.")
    ready: str | None = Field(
        default=None, description="Ready/desired pods of the serving revision, e.g. 2/2."
    )
    selector: str | None = Field(default=None, description="Label selector of the pods (scale subresource).")
    strategy: str | None = Field(default=None, description="Effective rollout strategy.")
    serving_version: int | None = Field(default=None, description="Model version of the stable revision.")
    current_revision: int | None = Field(default=None, description="Revision the spec asks for.")
    stable_revision: int | None = Field(default=None, description="Revision serving stable traffic.")
    candidate_revision: int | None = Field(default=None, description="Revision being rolled out.")
    current_step: int | None = Field(default=None, description="Canary step index (0-based).")
    canary_weight: int | None = Field(default=None, description="Percent of traffic on the candidate.")
    rollout: RolloutState | None = Field(default=None, description="Persisted rollout state machine.")
    last_analysis: AnalysisResult | None = Field(default=None, description="Last analysis verdict.")
    endpoints: Endpoints | None = Field(default=None, description="Service URLs.")
    history: list[RevisionRecord] | None = Field(default=None, description="Revisions, oldest first.")
