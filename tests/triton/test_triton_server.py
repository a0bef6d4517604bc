"""Rendered config.pbtxt files load and serve in a real tritonserver, and Triton's metrics count it.

Every model repository here is written the way the operator writes one: the
``config.pbtxt`` comes from :func:`modeldeploy.triton.config.render_config_pbtxt`.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from hack.procutil import poll
from modeldeploy import api
from modeldeploy.triton.config import render_config_pbtxt
from tritonmodels import scaler_py

pytestmark = pytest.mark.triton

#: A + B + float(parameters["offset"]): proves inputs, outputs and parameters reach the model.
#: A request with NaN in A fails in the backend (nv_inference_request_failure{reason="BACKEND"}).
ADDER_PY = """
import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.offset = np.float32(config["parameters"]["offset"]["string_value"])

    def execute(self, requests):
        responses = []
        for request in requests:
            a = pb_utils.get_input_tensor_by_name(request, "A").as_numpy()
            b = pb_utils.get_input_tensor_by_name(request, "B").as_numpy()
            if np.isnan(a).any():
                # Raised, not returned: Triton 2.51 counts a response carrying an error as a
                # *success* in nv_inference_request_success; an exception fails the request.
                raise pb_utils.TritonModelException("A contains NaN")
            total = (a + b + self.offset).astype(np.float32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("SUM", total)]))
        return responses
"""

ADD_ONE_PY = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [
            pb_utils.InferenceResponse(
                [pb_utils.Tensor("Z", pb_utils.get_input_tensor_by_name(r, "Y").as_numpy() + np.float32(1))]
            )
            for r in requests
        ]
"""


def fp32(name: str, *dims: int) -> dict[str, Any]:
    return {"name": name, "dataType": "TYPE_FP32", "dims": list(dims)}


def model_spec(fmt: str, version: int, config: dict[str, Any]) -> api.ModelSpec:
    return api.ModelSpec.model_validate(
        {"format": fmt, "storageUri": "pvc://models/repository", "version": version, "config": config}
    )


def metric(server: Any, name: str, **labels: str) -> float | None:
    """Sum of the Triton metric samples carrying these labels (None: no such sample).

    Some metrics have more labels than model/version (nv_inference_request_failure has
    ``reason``: OTHER, BACKEND, CANCELED, REJECTED); they are summed over. prometheus_client's
    parser names counter samples ``<name>_total``; Triton's exposition does not.
    """
    values = [
        float(sample.value)
        for family in text_string_to_metric_families(server.metrics_text())
        for sample in family.samples
        if name in (sample.name, sample.name.removesuffix("_total"))
        and all(sample.labels.get(k) == v for k, v in labels.items())
    ]
    return sum(values) if values else None


def infer_http(
    server: Any, model: str, inputs: dict[str, np.ndarray[Any, Any]], output: str, version: str = ""
) -> Any:
    client = httpclient.InferenceServerClient(server.http_address)
    try:
        tensors = []
        for name, array in inputs.items():
            tensor = httpclient.InferInput(name, list(array.shape), "FP32")
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        result = client.infer(
            model, tensors, model_version=version, outputs=[httpclient.InferRequestedOutput(output)]
        )
        return result.as_numpy(output)
    finally:
        client.close()


def test_rendered_python_model_serves_and_is_counted(
    triton_server: Any, model_repo: Path, write_model: Any
) -> None:
    spec = model_spec(
        "python",
        1,
        {
            "maxBatchSize": 8,
            "dynamicBatching": {"preferredBatchSizes": [4], "maxQueueDelayMicroseconds": 500},
            "instanceGroups": [{"kind": "KIND_CPU", "count": 2}],
            "inputs": [fp32("A", 4), fp32("B", 4)],
            "outputs": [fp32("SUM", 4)],
            "parameters": {"offset": "0.5"},
        },
    )
    write_model("adder", render_config_pbtxt("adder", spec), {1: ADDER_PY})

    server = triton_server(model_repo)
    assert server.model_ready("adder", 1)
    assert server.server_version()

    # Triton's own view of the config: what we rendered is what it parsed
    grpc = grpcclient.InferenceServerClient(server.grpc_address)
    try:
        config = grpc.get_model_config("adder").config
    finally:
        grpc.close()
    assert config.backend == "python"
    assert config.max_batch_size == 8
    assert list(config.version_policy.specific.versions) == [1]
    assert list(config.dynamic_batching.preferred_batch_size) == [4]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert [(g.kind, g.count) for g in config.instance_group] == [(config.instance_group[0].KIND_CPU, 2)]
    assert [(t.name, list(t.dims)) for t in config.input] == [("A", [4]), ("B", [4])]
    assert [(t.name, list(t.dims)) for t in config.output] == [("SUM", [4])]
    assert config.parameters["offset"].string_value == "0.5"

    labels = {"model": "adder", "version": "1"}
    assert metric(server, "nv_inference_request_success", **labels) == 0

    requests = 5
    for i in range(requests):
        a = np.arange(8, dtype=np.float32).reshape(2, 4) + i
        b = np.full((2, 4), 10.0, dtype=np.float32)
        got = infer_http(server, "adder", {"A": a, "B": b}, "SUM")
        np.testing.assert_allclose(got, a + b + 0.5)

    poll(
        lambda: True if metric(server, "nv_inference_request_success", **labels) == requests else None,
        timeout=30,
        what=f"nv_inference_request_success{labels} == {requests}",
    )
    assert metric(server, "nv_inference_count", **labels) == 2 * requests  # batch of 2 per request
    assert metric(server, "nv_inference_request_failure", **labels) == 0
    assert (metric(server, "nv_inference_request_duration_us", **labels) or 0) > 0

    # a failing request is counted as a failure (reason BACKEND), not a success
    bad = np.full((1, 4), np.nan, dtype=np.float32)
    with pytest.raises(InferenceServerException, match="A contains NaN"):
        infer_http(server, "adder", {"A": bad, "B": bad}, "SUM")
    poll(
        lambda: (
            True if metric(server, "nv_inference_request_failure", **labels, reason="BACKEND") == 1 else None
        ),
        timeout=30,
        what="nv_inference_request_failure{reason=BACKEND} == 1",
    )
    assert metric(server, "nv_inference_request_failure", **labels) == 1
    assert metric(server, "nv_inference_request_success", **labels) == requests


@pytest.mark.parametrize(("served", "other"), [(2, 1), (1, 2)], ids=["latest", "rollback-to-older"])
def test_only_the_pinned_version_is_served(
    triton_server: Any, model_repo: Path, write_model: Any, served: int, other: int
) -> None:
    """The repository holds versions 1 and 2; the rendered policy serves spec.model.version only,
    including when it is the older one (Triton's default policy would serve 2)."""
    spec = model_spec(
        "python", served, {"maxBatchSize": 4, "inputs": [fp32("X", 2)], "outputs": [fp32("Y", 2)]}
    )
    write_model("scaler", render_config_pbtxt("scaler", spec), {1: scaler_py(2), 2: scaler_py(3)})

    server = triton_server(model_repo)
    assert server.model_ready("scaler", served)
    assert not server.model_ready("scaler", other)

    client = httpclient.InferenceServerClient(server.http_address)
    try:
        assert client.get_model_metadata("scaler")["versions"] == [str(served)]
    finally:
        client.close()

    x = np.array([[1.0, 2.0]], dtype=np.float32)
    factor = {1: 2, 2: 3}[served]
    np.testing.assert_allclose(infer_http(server, "scaler", {"X": x}, "Y"), x * factor)
    np.testing.assert_allclose(infer_http(server, "scaler", {"X": x}, "Y", version=str(served)), x * factor)
    with pytest.raises(InferenceServerException, match=r"unavailable|not found|is not ready"):
        infer_http(server, "scaler", {"X": x}, "Y", version=str(other))

    assert metric(server, "nv_inference_request_success", model="scaler", version=str(served)) == 2
    assert metric(server, "nv_inference_request_success", model="scaler", version=str(other)) is None


def test_pinned_version_missing_from_repository_fails_loudly(
    triton_server: Any, model_repo: Path, write_model: Any, triton_launcher: ModuleType, tmp_path: Path
) -> None:
    """A version that is not in the repository is never replaced by another one: Triton refuses."""
    spec = model_spec("python", 3, {"maxBatchSize": 4, "inputs": [fp32("X", 2)], "outputs": [fp32("Y", 2)]})
    write_model("scaler", render_config_pbtxt("scaler", spec), {1: scaler_py(2), 2: scaler_py(3)})

    with pytest.raises(triton_launcher.TritonStartError, match="exited with code"):
        triton_server(model_repo, ready_timeout=60)
    log = (tmp_path / "tritonserver-0.log").read_text()
    assert "version 3 is specified for model 'scaler', but the version directory is not present" in log


def test_rendered_ensemble_runs_its_steps(triton_server: Any, model_repo: Path, write_model: Any) -> None:
    step_config = {"maxBatchSize": 4, "instanceGroups": [{"kind": "KIND_CPU", "count": 1}]}
    double = model_spec("python", 1, {**step_config, "inputs": [fp32("X", 3)], "outputs": [fp32("Y", 3)]})
    add_one = model_spec("python", 1, {**step_config, "inputs": [fp32("Y", 3)], "outputs": [fp32("Z", 3)]})
    pipeline = model_spec(
        "ensemble",
        1,
        {
            "maxBatchSize": 4,
            "inputs": [fp32("IN", 3)],
            "outputs": [fp32("OUT", 3)],
            "ensembleSteps": [
                {"modelName": "double", "inputMap": {"X": "IN"}, "outputMap": {"Y": "doubled"}},
                {
                    "modelName": "add_one",
                    "modelVersion": 1,
                    "inputMap": {"Y": "doubled"},
                    "outputMap": {"Z": "OUT"},
                },
            ],
        },
    )
    write_model("double", render_config_pbtxt("double", double), {1: scaler_py(2)})
    write_model("add_one", render_config_pbtxt("add_one", add_one), {1: ADD_ONE_PY})
    write_model("pipeline", render_config_pbtxt("pipeline", pipeline), {1: None})

    server = triton_server(model_repo)
    assert server.model_ready("pipeline", 1)

    x = np.array([[1.0, -2.0, 0.25], [3.0, 4.0, 5.0]], dtype=np.float32)
    np.testing.assert_allclose(infer_http(server, "pipeline", {"IN": x}, "OUT"), x * 2 + 1)

    poll(
        lambda: (
            True
            if metric(server, "nv_inference_request_success", model="pipeline", version="1") == 1
            else None
        ),
        timeout=30,
        what="the ensemble's request in nv_inference_request_success",
    )
    assert metric(server, "nv_inference_request_success", model="double", version="1") == 1
    assert metric(server, "nv_inference_request_success", model="add_one", version="1") == 1
