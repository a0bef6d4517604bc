"""config.pbtxt rendering, checked against Triton's own protobuf schema (inference.ModelConfig)."""

from __future__ import annotations

import re
from typing import Any

import pydantic
import pytest
from google.protobuf import text_format
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.grpc import model_config_pb2 as pb

from modeldeploy import api
from modeldeploy.triton.config import FORMAT_RUNTIME, ConfigRenderError, config_hash, render_config_pbtxt

DATA_TYPES = [
    "TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64", "TYPE_INT8", "TYPE_INT16",
    "TYPE_INT32", "TYPE_INT64", "TYPE_FP16", "TYPE_FP32", "TYPE_FP64", "TYPE_STRING", "TYPE_BF16",
]  # fmt: skip

ENSEMBLE_CONFIG: dict[str, Any] = {
    "maxBatchSize": 4,
    "inputs": [{"name": "RAW", "dataType": "TYPE_UINT8", "dims": [-1]}],
    "outputs": [{"name": "SCORES", "dataType": "TYPE_FP32", "dims": [1000]}],
    "ensembleSteps": [
        {
            "modelName": "preprocess",
            "inputMap": {"INPUT": "RAW"},
            "outputMap": {"OUTPUT": "pixels"},
        },
        {
            "modelName": "resnet50",
            "modelVersion": 3,
            "inputMap": {"data": "pixels"},
            "outputMap": {"prob": "SCORES", "features": "unused_features"},
        },
    ],
}


def spec(fmt: str, version: int = 1, config: dict[str, Any] | None = None) -> api.ModelSpec:
    data: dict[str, Any] = {"format": fmt, "storageUri": "s3://models/repo", "version": version}
    if config is not None:
        data["config"] = config
    return api.ModelSpec.model_validate(data)


def parse(text: str) -> Any:
    """Parse with Triton's schema; fails the test on anything Triton would refuse to parse."""
    return text_format.Parse(text, pb.ModelConfig())


def render(fmt: str, config: dict[str, Any] | None = None, version: int = 1, name: str = "m") -> Any:
    return parse(render_config_pbtxt(name, spec(fmt, version, config)))


def string_map(entries: Any) -> dict[str, str]:
    return dict(entries.items())


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", [f.value for f in api.ModelFormat])
def test_every_format_parses_with_its_platform_and_backend(fmt: str) -> None:
    config = ENSEMBLE_CONFIG if fmt == "ensemble" else None
    msg = render(fmt, config, version=7, name="resnet50")

    platform, backend = FORMAT_RUNTIME[api.ModelFormat(fmt)]
    assert msg.name == "resnet50"
    assert msg.platform == (platform or "")
    assert msg.backend == (backend or "")
    assert msg.WhichOneof("scheduling_choice") == ("ensemble_scheduling" if fmt == "ensemble" else None)
    assert msg.version_policy.WhichOneof("policy_choice") == "specific"
    assert list(msg.version_policy.specific.versions) == [7]


@pytest.mark.parametrize(
    ("fmt", "platform", "backend"),
    [
        ("onnx", "", "onnxruntime"),
        ("pytorch", "pytorch_libtorch", "pytorch"),
        ("tensorflow", "tensorflow_savedmodel", ""),
        ("tensorrt", "tensorrt_plan", ""),
        ("python", "", "python"),
        ("ensemble", "ensemble", ""),
    ],
)
def test_format_table_is_tritons_names(fmt: str, platform: str, backend: str) -> None:
    msg = render(fmt, ENSEMBLE_CONFIG if fmt == "ensemble" else None)
    assert (msg.platform, msg.backend) == (platform, backend)


def test_minimal_config_has_only_identity_batching_and_version() -> None:
    text = render_config_pbtxt("m", spec("onnx", 2))
    assert "max_batch_size: 0\n" in text  # explicit, though proto3 does not record a default
    msg = parse(text)
    assert msg.max_batch_size == 0
    assert [f.name for f, _ in msg.ListFields()] == ["name", "version_policy", "backend"]


@pytest.mark.parametrize("version", [1, 2, 42, 2_147_483_647])
def test_version_policy_pins_exactly_the_served_version(version: int) -> None:
    msg = render("python", {"maxBatchSize": 1}, version=version)
    assert msg.version_policy.WhichOneof("policy_choice") == "specific"
    assert list(msg.version_policy.specific.versions) == [version]


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize("max_batch_size", [0, 1, 8, 1_000_000])
def test_max_batch_size(max_batch_size: int) -> None:
    assert render("onnx", {"maxBatchSize": max_batch_size}).max_batch_size == max_batch_size


@pytest.mark.parametrize(
    ("dynamic", "preferred", "delay"),
    [
        ({}, [], 0),
        ({"preferredBatchSizes": [4, 8]}, [4, 8], 0),
        ({"maxQueueDelayMicroseconds": 250}, [], 250),
        ({"preferredBatchSizes": [16], "maxQueueDelayMicroseconds": 0}, [16], 0),
    ],
)
def test_dynamic_batching(dynamic: dict[str, Any], preferred: list[int], delay: int) -> None:
    msg = render("onnx", {"maxBatchSize": 16, "dynamicBatching": dynamic})
    assert msg.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert list(msg.dynamic_batching.preferred_batch_size) == preferred
    assert msg.dynamic_batching.max_queue_delay_microseconds == delay


def test_no_dynamic_batching_unless_asked() -> None:
    assert not render("onnx", {"maxBatchSize": 16}).HasField("dynamic_batching")


@pytest.mark.parametrize(
    ("groups", "expected"),
    [
        ([{"kind": "KIND_CPU", "count": 2}], [(pb.ModelInstanceGroup.KIND_CPU, 2, [])]),
        ([{"kind": "KIND_GPU", "count": 1, "gpus": [0, 3]}], [(pb.ModelInstanceGroup.KIND_GPU, 1, [0, 3])]),
        ([{}], [(pb.ModelInstanceGroup.KIND_AUTO, 1, [])]),
        (
            [{"kind": "KIND_GPU", "count": 4}, {"kind": "KIND_CPU", "count": 1}],
            [(pb.ModelInstanceGroup.KIND_GPU, 4, []), (pb.ModelInstanceGroup.KIND_CPU, 1, [])],
        ),
    ],
)
def test_instance_groups(groups: list[dict[str, Any]], expected: list[tuple[int, int, list[int]]]) -> None:
    msg = render("onnx", {"instanceGroups": groups})
    assert [(g.kind, g.count, list(g.gpus)) for g in msg.instance_group] == expected


@pytest.mark.parametrize("data_type", DATA_TYPES)
def test_tensor_data_types_are_tritons_enum(data_type: str) -> None:
    msg = render(
        "onnx",
        {
            "maxBatchSize": 8,
            "inputs": [{"name": "in", "dataType": data_type, "dims": [3, -1, 224]}],
            "outputs": [{"name": "out", "dataType": data_type, "dims": [1]}],
        },
    )
    [inp] = msg.input
    [out] = msg.output
    assert (inp.name, pb.DataType.Name(inp.data_type), list(inp.dims)) == ("in", data_type, [3, -1, 224])
    assert (out.name, pb.DataType.Name(out.data_type), list(out.dims)) == ("out", data_type, [1])


def test_several_inputs_and_outputs_keep_their_order() -> None:
    names = ["INPUT__0", "input.1", "b", "a"]
    msg = render(
        "pytorch",
        {
            "inputs": [{"name": n, "dataType": "TYPE_FP32", "dims": [i + 1]} for i, n in enumerate(names)],
            "outputs": [{"name": f"OUTPUT__{i}", "dataType": "TYPE_INT64", "dims": [-1]} for i in range(3)],
        },
    )
    assert [(t.name, list(t.dims)) for t in msg.input] == [(n, [i + 1]) for i, n in enumerate(names)]
    assert [t.name for t in msg.output] == ["OUTPUT__0", "OUTPUT__1", "OUTPUT__2"]


@pytest.mark.parametrize("fmt", ["onnx", "tensorflow"])
@pytest.mark.parametrize("precision", ["FP32", "FP16", "INT8"])
@pytest.mark.parametrize("workspace", [None, 1 << 30])
def test_tensorrt_accelerator(fmt: str, precision: str, workspace: int | None) -> None:
    trt: dict[str, Any] = {"precision": precision}
    if workspace is not None:
        trt["maxWorkspaceSizeBytes"] = workspace
    msg = render(fmt, {"optimization": {"tensorrt": trt}})

    [acc] = msg.optimization.execution_accelerators.gpu_execution_accelerator
    assert acc.name == "tensorrt"
    expected = {"precision_mode": precision}
    if workspace is not None:
        expected["max_workspace_size_bytes"] = str(workspace)
    assert string_map(acc.parameters) == expected
    assert not msg.optimization.execution_accelerators.cpu_execution_accelerator
    assert not msg.optimization.HasField("cuda")


def test_tensorrt_precision_defaults_to_fp16() -> None:
    msg = render("onnx", {"optimization": {"tensorrt": {}}})
    [acc] = msg.optimization.execution_accelerators.gpu_execution_accelerator
    assert acc.parameters["precision_mode"] == "FP16"


@pytest.mark.parametrize("graphs", [True, False])
def test_cuda_graphs(graphs: bool) -> None:
    msg = render("tensorrt", {"maxBatchSize": 8, "optimization": {"cudaGraphs": graphs}})
    assert msg.optimization.HasField("cuda")
    assert msg.optimization.cuda.graphs is graphs
    assert not msg.optimization.HasField("execution_accelerators")


def test_empty_optimization_renders_nothing() -> None:
    assert not render("onnx", {"optimization": {}}).HasField("optimization")


def test_parameters_are_string_values() -> None:
    params = {"EXECUTION_ENV_PATH": "$$TRITON_MODEL_DIRECTORY/env.tar.gz", "intra_op_thread_count": "4"}
    msg = render("python", {"parameters": params})
    assert {k: v.string_value for k, v in msg.parameters.items()} == params


@pytest.mark.parametrize(
    "value",
    [
        'say "hi"',
        "back\\slash",
        "line\nbreak\ttab\rcr",
        "héllo wörld ✓ 模型",
        "",
        "{ braces } [ brackets ] # not a comment",
        "\x00\x01\x7f",
    ],
)
def test_strings_are_escaped(value: str) -> None:
    tensor = {"name": value or "x", "dataType": "TYPE_FP32", "dims": [1]}
    msg = render("python", {"parameters": {"k": value}, "inputs": [tensor]})
    assert msg.parameters["k"].string_value == value
    assert msg.input[0].name == (value or "x")


@settings(max_examples=200, deadline=None)
@given(
    params=st.dictionaries(st.text(max_size=40), st.text(max_size=200), max_size=6),
    name=st.from_regex(r"[A-Za-z0-9_.-]{1,40}", fullmatch=True),
)
def test_any_text_round_trips(params: dict[str, str], name: str) -> None:
    msg = parse(render_config_pbtxt(name, spec("python", 1, {"parameters": params})))
    assert msg.name == name
    assert {k: v.string_value for k, v in msg.parameters.items()} == params


def test_ensemble_steps() -> None:
    msg = render("ensemble", ENSEMBLE_CONFIG, version=5)
    steps = msg.ensemble_scheduling.step
    assert [(s.model_name, s.model_version) for s in steps] == [("preprocess", -1), ("resnet50", 3)]
    assert string_map(steps[0].input_map) == {"INPUT": "RAW"}
    assert string_map(steps[0].output_map) == {"OUTPUT": "pixels"}
    assert string_map(steps[1].input_map) == {"data": "pixels"}
    assert string_map(steps[1].output_map) == {"prob": "SCORES", "features": "unused_features"}
    assert [t.name for t in msg.input] == ["RAW"]
    assert [t.name for t in msg.output] == ["SCORES"]
    assert not msg.instance_group


def test_everything_at_once() -> None:
    config = {
        "maxBatchSize": 32,
        "dynamicBatching": {"preferredBatchSizes": [8, 16, 32], "maxQueueDelayMicroseconds": 100},
        "instanceGroups": [{"kind": "KIND_GPU", "count": 2, "gpus": [0]}],
        "inputs": [{"name": "input", "dataType": "TYPE_FP32", "dims": [3, 224, 224]}],
        "outputs": [{"name": "output", "dataType": "TYPE_FP32", "dims": [1000]}],
        "optimization": {"tensorrt": {"precision": "FP16", "maxWorkspaceSizeBytes": 1 << 31}},
        "parameters": {"cudnn_conv_algo_search": "1"},
    }
    msg = render("onnx", config, version=3, name="resnet50")
    expected = text_format.Parse(
        """
        name: "resnet50" backend: "onnxruntime" max_batch_size: 32
        version_policy { specific { versions: 3 } }
        input { name: "input" data_type: TYPE_FP32 dims: [3, 224, 224] }
        output { name: "output" data_type: TYPE_FP32 dims: 1000 }
        dynamic_batching { preferred_batch_size: [8, 16, 32] max_queue_delay_microseconds: 100 }
        instance_group { kind: KIND_GPU count: 2 gpus: 0 }
        optimization { execution_accelerators { gpu_execution_accelerator {
            name: "tensorrt"
            parameters { key: "precision_mode" value: "FP16" }
            parameters { key: "max_workspace_size_bytes" value: "2147483648" }
        } } }
        parameters { key: "cudnn_conv_algo_search" value { string_value: "1" } }
        """,
        pb.ModelConfig(),
    )
    assert msg == expected


# --------------------------------------------------------------------------- text and hash


def test_text_is_readable_and_commented() -> None:
    config = {"maxBatchSize": 2, "instanceGroups": [{"kind": "KIND_CPU"}]}
    text = render_config_pbtxt("m", spec("python", 4, config))
    assert text.startswith("# Generated by modeldeploy")
    assert text.endswith("\n")
    assert 'name: "m"\n' in text
    assert "versions: [ 4 ]" in text
    assert "kind: KIND_CPU" in text


def test_rendering_is_deterministic_whatever_the_map_order() -> None:
    a = spec("python", 1, {"parameters": {"a": "1", "b": "2", "c": "3"}})
    b = spec("python", 1, {"parameters": {"c": "3", "a": "1", "b": "2"}})
    assert render_config_pbtxt("m", a) == render_config_pbtxt("m", b)
    steps = ENSEMBLE_CONFIG["ensembleSteps"]
    reordered = {
        **ENSEMBLE_CONFIG,
        "ensembleSteps": [{**s, "outputMap": dict(reversed(list(s["outputMap"].items())))} for s in steps],
    }
    assert render_config_pbtxt("e", spec("ensemble", 1, ENSEMBLE_CONFIG)) == render_config_pbtxt(
        "e", spec("ensemble", 1, reordered)
    )


def test_config_hash() -> None:
    text = render_config_pbtxt("m", spec("onnx", 1))
    h = config_hash(text)
    assert re.fullmatch(r"[0-9a-f]{16}", h)
    assert config_hash(text) == h
    assert config_hash(render_config_pbtxt("m", spec("onnx", 2))) != h
    assert config_hash(render_config_pbtxt("other", spec("onnx", 1))) != h
    assert config_hash(render_config_pbtxt("m", spec("onnx", 1, {"maxBatchSize": 1}))) != h
    assert config_hash("") == "e3b0c44298fc1c14"  # sha256 of nothing


# --------------------------------------------------------------------------- refusals


def ensemble(**changes: Any) -> dict[str, Any]:
    """ENSEMBLE_CONFIG with keys replaced (value None: removed)."""
    out = {**ENSEMBLE_CONFIG, **changes}
    return {k: v for k, v in out.items() if v is not None}


@pytest.mark.parametrize(
    ("fmt", "config", "field"),
    [
        ("onnx", {"maxBatchSize": 0, "dynamicBatching": {}}, "model.config.dynamicBatching"),
        ("ensemble", ensemble(dynamicBatching={}), "model.config.dynamicBatching"),
        ("ensemble", {"maxBatchSize": 1}, "model.config.ensembleSteps"),
        ("ensemble", ensemble(inputs=None), "model.config.inputs"),
        ("ensemble", ensemble(outputs=None), "model.config.outputs"),
        ("ensemble", ensemble(instanceGroups=[{"kind": "KIND_CPU"}]), "model.config.instanceGroups"),
        ("python", {"ensembleSteps": ENSEMBLE_CONFIG["ensembleSteps"]}, "model.config.ensembleSteps"),
        ("onnx", {"instanceGroups": [{"kind": "KIND_GPU"}, {"kind": "KIND_CPU", "gpus": [0]}]},
            "gpus applies only to kind KIND_GPU"),
        ("onnx", {"instanceGroups": [{"gpus": [1]}]}, "gpus applies only to kind KIND_GPU"),
        ("pytorch", {"optimization": {"tensorrt": {}}}, "model.config.optimization.tensorrt"),
        ("tensorrt", {"optimization": {"tensorrt": {}}}, "model.config.optimization.tensorrt"),
        ("python", {"optimization": {"tensorrt": {}}}, "model.config.optimization.tensorrt"),
        ("ensemble", ensemble(optimization={"tensorrt": {}}), "model.config.optimization.tensorrt"),
        ("onnx", {"optimization": {"cudaGraphs": True}}, "model.config.optimization.cudaGraphs"),
        ("python", {"optimization": {"cudaGraphs": True}}, "model.config.optimization.cudaGraphs"),
    ],
)  # fmt: skip
def test_refuses_what_triton_refuses_or_ignores(fmt: str, config: dict[str, Any], field: str) -> None:
    # Refused when the spec is parsed (mirroring the CRD's CEL rules) or, at the latest, when rendered.
    with pytest.raises((ConfigRenderError, pydantic.ValidationError), match=re.escape(field)):
        render_config_pbtxt("m", spec(fmt, 1, config))


def test_render_error_is_a_value_error() -> None:
    assert issubclass(ConfigRenderError, ValueError)
