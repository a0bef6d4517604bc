"""Every example this machine's Triton can serve runs on the real node (issue 12, behaviour 7).

The Triton here is the ``tritonserver`` of the nvidia-pytriton wheel: CPU only, with the python
backend alone. ``examples/python-backend.yaml`` is applied as written except for what ties it to
a place: its storage URI points at an HTTPS archive server on this machine (a private CA, given
to the stager in a Secret as ``ca.crt``), the image is the locally built one, and the pods ask for
the real node. The archive holds a tokenizer that answers a string's UTF-8 bytes as its IDS.

The other examples need backends this build does not have (ONNX Runtime, PyTorch, TensorFlow,
TensorRT, a GPU): ``tests/cluster/test_examples.py`` renders and validates them on every run, and
the test below checks, in the running Triton, that their backend is indeed absent.
"""

from __future__ import annotations

import copy
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
import yaml
from realtier import figure, on_real_node, operator_process, realnode

from kube import Cluster, wait_for
from operator_proc import OperatorProcess, install_crd
from storagekit import ArchiveServer, make_tls

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# example -> what it needs that the CPU build of Triton from the nvidia-pytriton wheel lacks
NOT_SERVABLE = {
    "autoscaling-queue-time.yaml": "tensorflow",
    "blue-green.yaml": "pytorch",
    "canary-analysis.yaml": "onnxruntime",
    "edge.yaml": "onnxruntime",
    "ensemble.yaml": "onnxruntime",  # its encoder step is an ONNX model
    "gpu.yaml": "tensorrt",  # and an nvidia.com/gpu
    "quickstart.yaml": "onnxruntime",
    "rolling.yaml": "pytorch",
    "batch-inference.yaml": "onnxruntime",  # scores with quickstart.yaml's model
}
SERVABLE = {"python-backend.yaml"}

TOKENIZER_PY = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            texts = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy()
            ids = np.frombuffer(texts.reshape(-1)[0], dtype=np.uint8).astype(np.int64).reshape(1, -1)
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("IDS", ids)]))
        return out
"""


def test_every_example_is_either_served_here_or_says_why_not() -> None:
    assert {p.name for p in EXAMPLES.glob("*.yaml")} == SERVABLE | set(NOT_SERVABLE)


@pytest.fixture(scope="module")
def operator(
    cluster: Cluster, images: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    install_crd(cluster)
    with operator_process(tmp_path_factory.mktemp("operator"), ["example-*"], images["operator"]) as op:
        yield op


def localised(example: dict[str, Any], uri: str, image: str) -> dict[str, Any]:
    """The example with only its place changed: storage here, the local image, the real node."""
    md = copy.deepcopy(example)
    md["spec"]["model"]["storageUri"] = uri
    md["spec"]["model"]["credentialsSecret"] = "web-ca"
    md["spec"]["server"] = on_real_node(
        {**md["spec"].get("server", {}), "image": image, "imagePullPolicy": "Never"}
    )
    return md


def test_python_backend_example_answers_on_the_real_node(
    cluster: Cluster, operator: OperatorProcess, images: dict[str, str], tmp_path: Path
) -> None:
    example = yaml.safe_load((EXAMPLES / "python-backend.yaml").read_text())
    name = example["metadata"]["name"]
    model = example["spec"]["model"].get("name") or name
    repo = tmp_path / "repo"
    (repo / model / "1").mkdir(parents=True)
    (repo / model / "1" / "model.py").write_text(TOKENIZER_PY)
    served = tmp_path / "served" / "tokenizer"
    served.mkdir(parents=True)
    with tarfile.open(served / "repository.tar.gz", "w:gz") as tar:
        tar.add(repo / model, arcname=model)
    tls = make_tls(tmp_path / "tls", [realnode.NODE_IP])
    namespace = cluster.create_namespace(prefix="example-python")
    try:
        with ArchiveServer(tmp_path / "served", host=realnode.NODE_IP, tls=tls) as https:
            cluster.kubectl(
                "create", "secret", "generic", "web-ca", "-n", namespace, f"--from-file=ca.crt={tls.ca_cert}"
            )
            md = localised(example, https.url("tokenizer/repository.tar.gz"), images["triton"])
            cluster.apply(md, namespace=namespace)
            replicas = example["spec"]["replicas"]

            def ready() -> dict[str, Any] | None:
                obj = cluster.custom.get_namespaced_custom_object(
                    "modeldeploy.io", "v1alpha1", namespace, "modeldeployments", name
                )
                st = obj.get("status") or {}
                return st if st.get("phase") == "Ready" and st.get("readyReplicas") == replicas else None

            wait_for(ready, 240, message=lambda: cluster.kubectl("get", "md,pods", "-n", namespace).stdout)

            svc = cluster.core.read_namespaced_service(name, namespace)
            port = next(p.port for p in svc.spec.ports if p.name == "http")
            client = httpclient.InferenceServerClient(f"{svc.spec.cluster_ip}:{port}")
            try:
                wait_for(lambda: _model_ready(client, model), 30, message="the Service answers")
                text = "Triton on a real node"
                inp = httpclient.InferInput("TEXT", [1, 1], "BYTES")
                inp.set_data_from_numpy(np.array([[text.encode()]], dtype=object))
                ids = client.infer(model, [inp]).as_numpy("IDS")
            finally:
                client.close()
            assert ids.tolist() == [list(text.encode())]

            # The examples this build cannot serve: their backend is indeed absent from the running Triton.
            pod = cluster.core.list_namespaced_pod(
                namespace, label_selector=f"modeldeploy.io/name={name}"
            ).items[0]
            backends = cluster.kubectl(
                "exec",
                "-n",
                namespace,
                pod.metadata.name,
                "-c",
                "triton",
                "--",
                "ls",
                "/opt/tritonserver/backends",
            ).stdout.split()
            assert "python" in backends, backends
            missing = {ex: b for ex, b in NOT_SERVABLE.items() if b not in backends}
            assert missing == NOT_SERVABLE, (
                f"backends present: {backends}; serve these examples here: {set(NOT_SERVABLE) - set(missing)}"
            )
            figure(
                "examples on the real node",
                f"{sorted(SERVABLE)} answered; Triton's backends here: {backends}",
            )
    finally:
        cluster.delete_namespace(namespace)


def _model_ready(client: Any, model: str) -> bool:
    try:
        return bool(client.is_model_ready(model))
    except Exception:  # connection refused while kube-proxy programs the Service
        return False
