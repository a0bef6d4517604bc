"""Behaviour 3: a ModelDeployment whose pods run on the real node. A python-backend model
repository is held in a real S3 server (moto, bound to the node IP so pods reach it), fetched by
the real stager init container (the operator image) with credentials from a Secret, and loaded
by the real Triton (``tritonserver`` of the nvidia-pytriton wheel, in the locally built image).
The ModelDeployment is Ready only once the kubelet's probe sees the model *version's* ready
endpoint; inference through the main Service answers correctly over HTTP and gRPC."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from realtier import figure, on_real_node, realnode, unavailable

from hack import s3server
from kube import Cluster, pod_is_ready, wait_for
from operator_proc import OperatorProcess, install_crd
from tritonmodels import broken_py, scaler_py

MODEL = "doubler"
FACTOR = 2.0
MODEL_PY = scaler_py(FACTOR, output="OUT")
BROKEN_MODEL_PY = broken_py("weights file is corrupt (test)")


def write_model(root: Any, source: str) -> Any:
    (root / MODEL / "1").mkdir(parents=True)
    (root / MODEL / "1" / "model.py").write_text(source)
    return root


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory, cluster: Cluster) -> Iterator[tuple[Any, Any, Any]]:
    """moto on the node IP (pods reach it): bucket ``models`` with the repository under ``repo/``,
    bucket ``broken`` with a model whose ``initialize`` raises; an access key for each."""
    try:
        python = s3server.ensure_moto()
    except s3server.S3ServerUnavailable as err:
        unavailable(f"S3 server (moto): {err}")
    work = tmp_path_factory.mktemp("s3")
    with s3server.S3Server.start(python, work / "server", host=realnode.NODE_IP) as server:
        key = server.setup(bucket="models", upload=write_model(work / "good", MODEL_PY), prefix="repo")
        broken = server.setup(
            bucket="broken", upload=write_model(work / "bad", BROKEN_MODEL_PY), prefix="repo", user="stager2"
        )
        server.enforce_auth()
        yield server, key, broken


@pytest.fixture(scope="module")
def operator(
    cluster: Cluster, images: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """The operator (a host process here; the chart test runs it as a pod) staging with the
    locally built operator image."""
    install_crd(cluster)
    op = OperatorProcess(
        tmp_path_factory.mktemp("operator"),
        ["triton-*"],
        resync_seconds=10,
        env={"MODELDEPLOY_STAGER_IMAGE": images["operator"]},
    )
    op.start()
    try:
        yield op
    finally:
        op.stop()
        if os.environ.get("MODELDEPLOY_SHOW_OPERATOR_LOG"):
            print(op.tail(200))


def model_deployment(name: str, image: str, secret: str, bucket: str = "models") -> dict[str, Any]:
    server = on_real_node({"image": image, "imagePullPolicy": "Never"})
    return {
        "apiVersion": "modeldeploy.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {
                "name": MODEL,
                "format": "python",
                "storageUri": f"s3://{bucket}/repo",
                "version": 1,
                "credentialsSecret": secret,
                "config": {
                    "maxBatchSize": 8,
                    "inputs": [{"name": "X", "dataType": "TYPE_FP32", "dims": [3]}],
                    "outputs": [{"name": "OUT", "dataType": "TYPE_FP32", "dims": [3]}],
                    "instanceGroups": [{"kind": "KIND_CPU", "count": 1}],
                },
            },
            "replicas": 1,
            "server": {**server, "shmSize": "64Mi"},
        },
    }


def test_model_from_s3_staged_loaded_and_served(
    cluster: Cluster, operator: OperatorProcess, images: dict[str, str], s3: tuple[Any, Any, Any]
) -> None:
    server, key, _ = s3
    namespace = cluster.create_namespace(prefix="triton-s3")
    t0 = time.monotonic()
    try:
        create_secret(cluster, namespace, "s3-creds", key.access_key, key.secret_key, server.endpoint)
        md = model_deployment("doubler", images["triton"], "s3-creds")
        cluster.apply(md, namespace=namespace)
        status = wait_for(
            lambda: _ready_status(cluster, namespace, "doubler"),
            240,
            message=lambda: f"ModelDeployment doubler Ready; {_describe(cluster, namespace)}",
        )
        ready_after = time.monotonic() - t0
        assert status["readyReplicas"] == 1, status

        pods = cluster.core.list_namespaced_pod(namespace, label_selector="modeldeploy.io/name=doubler").items
        assert pods and all(p.spec.node_name == realnode.NODE_NAME for p in pods)
        pod = pods[0]
        assert pod_is_ready(pod)
        triton = pod.spec.containers[0]
        assert triton.readiness_probe.http_get.path == f"/v2/models/{MODEL}/versions/1/ready"
        stager = pod.status.init_container_statuses[0]
        assert stager.state.terminated and stager.state.terminated.exit_code == 0
        logs = cluster.kubectl("logs", "-n", namespace, pod.metadata.name, "-c", "stage-model").stdout
        assert key.secret_key not in logs and key.access_key not in logs

        # Behaviour 4: what the builders generate holds in the running container.
        checks = cluster.kubectl(
            "exec",
            "-n",
            namespace,
            pod.metadata.name,
            "-c",
            "triton",
            "--",
            "sh",
            "-c",
            "id -u; grep ' /dev/shm ' /proc/mounts; "
            "touch /opt/x 2>/dev/null && echo root-writable; "
            "touch /tmp/x && echo tmp-writable; "
            "touch /models/x 2>/dev/null && echo models-writable; "
            "ls /models/doubler",
        ).stdout.splitlines()
        assert checks[0] == "1000", checks  # the restricted pod security context, non-root
        assert checks[1].startswith("tmpfs /dev/shm tmpfs") and "size=65536k" in checks[1], checks
        assert "root-writable" not in checks and "models-writable" not in checks, checks
        assert "tmp-writable" in checks, checks  # Triton's scratch space, an emptyDir
        assert {"1", "config.pbtxt"} <= set(checks[3:]), checks  # staged, with the rendered config

        svc = cluster.core.read_namespaced_service("doubler", namespace)
        ports = {p.name: p.port for p in svc.spec.ports}
        x = np.array([[1.0, -2.5, 4.0]], dtype=np.float32)

        http = httpclient.InferenceServerClient(f"{svc.spec.cluster_ip}:{ports['http']}")
        try:
            # Ready pods reach the ClusterIP's rules one hop later: the EndpointSlice controller, then
            # kube-proxy (until it has, the Service has no endpoints and kube-proxy rejects connections).
            wait_for(
                lambda: _answers(http),
                30,
                message=lambda: f"the Service {svc.spec.cluster_ip} answers; {_describe(cluster, namespace)}",
            )
            inp = httpclient.InferInput("X", [1, 3], "FP32")
            inp.set_data_from_numpy(x)
            got = http.infer(MODEL, [inp], model_version="1").as_numpy("OUT")
            answered_after = time.monotonic() - t0
            np.testing.assert_allclose(got, x * FACTOR)
        finally:
            http.close()
        grpc = grpcclient.InferenceServerClient(f"{svc.spec.cluster_ip}:{ports['grpc']}")
        try:
            ginp = grpcclient.InferInput("X", [1, 3], "FP32")
            ginp.set_data_from_numpy(x)
            got = grpc.infer(MODEL, [ginp], model_version="1").as_numpy("OUT")
            np.testing.assert_allclose(got, x * FACTOR)
        finally:
            grpc.close()
        figure(
            "ModelDeployment apply -> Ready / -> first answered inference (HTTP) through the Service",
            f"{ready_after:.1f}s / {answered_after:.1f}s",
        )
        figure("where the pod's time went (kubelet timestamps, 1 s resolution)", pod_timeline(pod))
    finally:
        cluster.delete_namespace(namespace)


def create_secret(
    cluster: Cluster, namespace: str, name: str, key_id: str, secret: str, endpoint: str
) -> None:
    cluster.kubectl(
        "create",
        "secret",
        "generic",
        name,
        "-n",
        namespace,
        f"--from-literal=AWS_ACCESS_KEY_ID={key_id}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={secret}",
        f"--from-literal=AWS_ENDPOINT_URL={endpoint}",
    )


# --------------------------------------------------------------------------- behaviour 5


def failed_with(cluster: Cluster, namespace: str, name: str, *needles: str) -> dict[str, Any]:
    """Wait until the ModelDeployment is Failed with a message holding every needle; returns status."""

    def check() -> dict[str, Any] | None:
        obj = cluster.custom.get_namespaced_custom_object(
            "modeldeploy.io", "v1alpha1", namespace, "modeldeployments", name
        )
        status = obj.get("status") or {}
        message = str(status.get("message", ""))
        return status if status.get("phase") == "Failed" and all(n in message for n in needles) else None

    return wait_for(
        check, 180, message=lambda: f"{name} Failed with {needles}; {_describe(cluster, namespace)}"
    )


def warning_events(cluster: Cluster, namespace: str, name: str) -> str:
    out = cluster.kubectl(
        "get",
        "events",
        "-n",
        namespace,
        "--field-selector",
        f"involvedObject.kind=ModelDeployment,involvedObject.name={name},type=Warning",
        "-o",
        'jsonpath={range .items[*]}{.reason}: {.message}{"\\n"}{end}',
    )
    return out.stdout


def test_stager_that_cannot_read_storage_is_reported_from_the_pod(
    cluster: Cluster, operator: OperatorProcess, images: dict[str, str], s3: tuple[Any, Any, Any]
) -> None:
    """A valid spec whose credential the storage refuses: the init container's own error line
    reaches status and an Event; nothing is left silently in Init:CrashLoopBackOff."""
    server, key, _ = s3
    namespace = cluster.create_namespace(prefix="triton-badcred")
    try:
        create_secret(
            cluster, namespace, "s3-creds", key.access_key, "wrongSECRETvalue0123456789", server.endpoint
        )
        cluster.apply(model_deployment("badcred", images["triton"], "s3-creds"), namespace=namespace)
        status = failed_with(
            cluster, namespace, "badcred", "init container stage-model", "SignatureDoesNotMatch"
        )
        assert "wrongSECRETvalue0123456789" not in str(status)
        events = wait_for(
            lambda: warning_events(cluster, namespace, "badcred") or None,
            60,
            message="a Warning Event on the ModelDeployment",
        )
        assert "stage-model" in events
    finally:
        cluster.delete_namespace(namespace)


def test_model_that_fails_to_load_is_reported_with_tritons_reason(
    cluster: Cluster, operator: OperatorProcess, images: dict[str, str], s3: tuple[Any, Any, Any]
) -> None:
    server, _, broken = s3
    namespace = cluster.create_namespace(prefix="triton-broken")
    try:
        create_secret(cluster, namespace, "s3-creds", broken.access_key, broken.secret_key, server.endpoint)
        cluster.apply(
            model_deployment("broken", images["triton"], "s3-creds", bucket="broken"), namespace=namespace
        )
        failed_with(cluster, namespace, "broken", "container triton", "weights file is corrupt (test)")
        events = wait_for(
            lambda: warning_events(cluster, namespace, "broken") or None, 60, message="a Warning Event"
        )
        assert "weights file is corrupt" in events
    finally:
        cluster.delete_namespace(namespace)


def _answers(client: Any) -> bool:
    try:
        return bool(client.is_model_ready(MODEL, "1"))
    except Exception:  # connection refused / reset while the Service's rules are being programmed
        return False


def pod_timeline(pod: Any) -> str:
    """created -> scheduled -> stager start/end -> Triton start -> Ready, from the pod's status."""
    created = pod.metadata.creation_timestamp
    conditions = {c.type: c.last_transition_time for c in pod.status.conditions}
    stager = pod.status.init_container_statuses[0].state.terminated
    triton = pod.status.container_statuses[0].state.running
    marks = [
        ("scheduled", conditions["PodScheduled"]),
        ("stager started", stager.started_at),
        ("stager done", stager.finished_at),
        ("triton started", triton.started_at),
        ("ready", conditions["Ready"]),
    ]
    return ", ".join(f"{what} +{(when - created).total_seconds():.0f}s" for what, when in marks)


def _ready_status(cluster: Cluster, namespace: str, name: str) -> dict[str, Any] | None:
    obj = cluster.custom.get_namespaced_custom_object(
        "modeldeploy.io", "v1alpha1", namespace, "modeldeployments", name
    )
    status = obj.get("status") or {}
    return status if status.get("phase") == "Ready" else None


def _describe(cluster: Cluster, namespace: str) -> str:
    pods = cluster.kubectl("get", "pods,md", "-n", namespace, "-o", "wide", check=False).stdout
    events = cluster.kubectl("get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False).stdout
    return f"\n{pods}\n{events[-3000:]}"
