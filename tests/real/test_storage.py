"""Behaviour 5 on the real node: one ModelDeployment per storage scheme, each fetched by the real
stager init container (the operator image) from a real server and served by the real Triton,
answering an inference through its Service.

The servers listen on the node IP (``realnode.NODE_IP``), which pods reach: moto for ``s3://``
(request authentication on; a repository *with* config.pbtxt and no ``spec.model.config``, the
case Triton was once left to read itself), fake-gcs-server for ``gs://`` (service-account key
from the Secret, with ``spec.model.config``), Azurite for ``as://`` (account key from the Secret,
no config), an HTTPS archive server with a private CA (``ca.crt`` in the Secret, with config), and
a real PersistentVolume on ``real-0`` (a ``local`` volume of a host directory, bound to its claim)
for ``pvc://``. Every pod runs under the restricted security context, and the Secret is mounted
only into the stager: Triton's container (which runs the model's code) has no credentials.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
from realtier import figure, on_real_node, realnode, unavailable

from hack import s3server
from hack import storage_emulators as emulators
from kube import Cluster, wait_for
from operator_proc import OperatorProcess, install_crd
from storagekit import (
    FACTOR,
    MODEL,
    MODEL_CONFIG,
    ArchiveServer,
    make_tls,
    service_account_key,
    write_archive,
    write_repo,
)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, cluster: Cluster) -> Iterator[dict[str, Any]]:
    """Every server on the node IP, each holding ``full/`` (with config.pbtxt) and ``bare/`` (without)."""
    try:
        python = s3server.ensure_moto()
        gcs_bin = emulators.ensure("fake-gcs-server")
        azurite_bin = emulators.ensure("azurite")
    except (s3server.S3ServerUnavailable, emulators.EmulatorUnavailable) as err:
        unavailable(f"storage emulator: {err}")
    work = tmp_path_factory.mktemp("storage")
    upload = work / "upload"
    for variant in ("full", "bare"):
        write_repo(upload / variant, with_config=variant == "full")
    gcs_data = work / "gcs-data" / "models"
    for variant in ("full", "bare"):
        write_repo(gcs_data / variant, with_config=variant == "full")
    archives = work / "archives"
    archives.mkdir()
    for variant in ("full", "bare"):
        write_archive(archives / f"{variant}.tar.gz", upload / variant)
    tls = make_tls(work / "tls", [realnode.NODE_IP])
    ip = realnode.NODE_IP
    with (
        s3server.S3Server.start(python, work / "moto", host=ip) as s3,
        emulators.FakeGcsServer.start(gcs_bin, work / "gcs", data=work / "gcs-data", host=ip) as gcs,
        emulators.Azurite.start(azurite_bin, work / "azurite", host=ip) as azure,
        ArchiveServer(archives, host=ip, tls=tls) as https,
    ):
        key = s3.setup(bucket="models", upload=upload, prefix="")
        s3.enforce_auth()
        azure.setup(container="models", upload=upload, prefix="")
        yield {"s3": s3, "s3_key": key, "gcs": gcs, "azure": azure, "https": https, "tls": tls}


@pytest.fixture(scope="module")
def host_volume() -> Iterator[Path]:
    """A host directory readable by the pods' uid 1000 (pytest's temp dirs are 0700), holding the
    repository under ``full/``; backs the PersistentVolume."""
    root = Path(tempfile.mkdtemp(prefix="modeldeploy-pv-"))
    try:
        write_repo(root / "full", with_config=True)
        for path in [root, *root.rglob("*")]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        yield root
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def operator(
    cluster: Cluster, images: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    install_crd(cluster)
    op = OperatorProcess(
        tmp_path_factory.mktemp("operator"),
        ["storage-*"],
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


def secret(name: str, data: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": data}


def model_deployment(
    name: str, image: str, uri: str, secret_name: str | None, with_config: bool
) -> dict[str, Any]:
    model: dict[str, Any] = {"name": MODEL, "format": "python", "storageUri": uri, "version": 1}
    if secret_name:
        model["credentialsSecret"] = secret_name
    if with_config:
        model["config"] = MODEL_CONFIG
    server = on_real_node({"image": image, "imagePullPolicy": "Never"})
    return {
        "apiVersion": "modeldeploy.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {"model": model, "replicas": 1, "server": {**server, "shmSize": "64Mi"}},
    }


def persistent_volume(name: str, path: Path, claim: str, namespace: str) -> dict[str, Any]:
    """A ``local`` PersistentVolume of ``path`` on real-0, pre-bound to ``namespace/claim``."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadOnlyMany"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "local": {"path": str(path)},
            "claimRef": {"namespace": namespace, "name": claim},
            "nodeAffinity": {
                "required": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {
                                    "key": "kubernetes.io/hostname",
                                    "operator": "In",
                                    "values": [realnode.NODE_NAME],
                                }
                            ]
                        }
                    ]
                }
            },
        },
    }


def claim(name: str, volume: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name},
        "spec": {
            "accessModes": ["ReadOnlyMany"],
            "storageClassName": "",
            "volumeName": volume,
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }


def _status(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    obj = cluster.custom.get_namespaced_custom_object(
        "modeldeploy.io", "v1alpha1", namespace, "modeldeployments", name
    )
    return obj.get("status") or {}


def _describe(cluster: Cluster, namespace: str) -> str:
    out = cluster.kubectl("get", "pods,md,pvc", "-n", namespace, "-o", "wide", check=False).stdout
    events = cluster.kubectl("get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False).stdout
    return f"\n{out}\n{events[-4000:]}"


def _infer(address: str) -> list[list[float]] | None:
    """Y for X through ``address``; None (or an exception, reported by wait_for) until it answers."""
    client = httpclient.InferenceServerClient(address)
    try:
        if not client.is_model_ready(MODEL, "1"):
            return None
        x = np.array([[1.5, -2.0]], dtype=np.float32)
        inp = httpclient.InferInput("X", [1, 2], "FP32")
        inp.set_data_from_numpy(x)
        got: list[list[float]] = client.infer(MODEL, [inp], model_version="1").as_numpy("Y").tolist()
        return got  # a list: wait_for tests truthiness, which an array cannot answer
    finally:
        client.close()


def test_every_scheme_staged_served_and_answering(
    cluster: Cluster,
    operator: OperatorProcess,
    images: dict[str, str],
    servers: dict[str, Any],
    host_volume: Path,
) -> None:
    namespace = cluster.create_namespace(prefix="storage")
    pv_name = f"{namespace}-models"
    s3, key, gcs, azure, https = (servers[k] for k in ("s3", "s3_key", "gcs", "azure", "https"))
    sa = service_account_key()
    objects: list[dict[str, Any]] = [
        secret(
            "s3-creds",
            {
                "AWS_ACCESS_KEY_ID": key.access_key,
                "AWS_SECRET_ACCESS_KEY": key.secret_key,
                "AWS_ENDPOINT_URL": s3.endpoint,
            },
        ),
        secret("gcs-creds", {"service-account.json": sa, "STORAGE_EMULATOR_HOST": gcs.endpoint}),
        secret(
            "azure-creds",
            {"AZURE_STORAGE_ACCOUNT_KEY": emulators.AZURITE_KEY, "AZURE_STORAGE_ENDPOINT": azure.endpoint},
        ),
        secret("web-ca", {"ca.crt": servers["tls"].ca_cert.read_text()}),
        claim("models", pv_name),
    ]
    image = images["triton"]
    cases = {
        # name: (storageUri, Secret, spec.model.config?)
        "s3-noconfig": ("s3://models/full", "s3-creds", False),
        "gs-config": ("gs://models/bare", "gcs-creds", True),
        "as-noconfig": (f"as://{emulators.AZURITE_ACCOUNT}/models/full", "azure-creds", False),
        "pvc-noconfig": ("pvc://models/full", None, False),
        "https-config": (https.url("bare.tar.gz"), "web-ca", True),
    }
    t0 = time.monotonic()
    try:
        cluster.apply(persistent_volume(pv_name, host_volume, "models", namespace))
        cluster.apply(objects, namespace=namespace)
        for name, (uri, secret_name, with_config) in cases.items():
            md = model_deployment(f"storage-{name}", image, uri, secret_name, with_config)
            # as JSON: kubectl's YAML reads the output name Y, unquoted by PyYAML, as a boolean
            cluster.apply(json.dumps(md), namespace=namespace)
        ready: dict[str, float] = {}

        def all_ready() -> bool:
            for name in cases:
                if (
                    name not in ready
                    and _status(cluster, namespace, f"storage-{name}").get("phase") == "Ready"
                ):
                    ready[name] = time.monotonic() - t0
            return len(ready) == len(cases)

        wait_for(
            all_ready,
            240,
            interval=1,
            message=lambda: (
                f"every storage ModelDeployment Ready (ready: {sorted(ready)}); "
                f"{_describe(cluster, namespace)}"
            ),
        )
        pvc = cluster.core.read_namespaced_persistent_volume_claim("models", namespace)
        assert pvc.status.phase == "Bound" and pvc.spec.volume_name == pv_name

        answered: dict[str, float] = {}
        for name in cases:
            md = f"storage-{name}"
            pods = cluster.core.list_namespaced_pod(
                namespace, label_selector=f"modeldeploy.io/name={md}"
            ).items
            assert pods and all(p.spec.node_name == realnode.NODE_NAME for p in pods)
            pod = pods[0]
            (stager,) = pod.status.init_container_statuses
            assert stager.state.terminated and stager.state.terminated.exit_code == 0
            triton = pod.spec.containers[0]
            assert "--model-repository=/models" in triton.args  # staged, whatever the scheme
            assert not triton.env_from and all(
                m.mount_path != "/var/run/secrets/modeldeploy/storage" for m in triton.volume_mounts
            )
            logs = cluster.kubectl("logs", "-n", namespace, pod.metadata.name, "-c", "stage-model").stdout
            for value in (key.secret_key, key.access_key, emulators.AZURITE_KEY, sa.split("-----")[2][:64]):
                assert value not in logs, f"{md}: a credential in the stager's log"
            stage_seconds = (
                stager.state.terminated.finished_at - stager.state.terminated.started_at
            ).total_seconds()
            figure(
                f"storage {name}: stager",
                f"{stage_seconds:.0f}s (kubelet, 1 s resolution): {logs.splitlines()[0]}",
            )

            svc = cluster.core.read_namespaced_service(md, namespace)
            port = {p.name: p.port for p in svc.spec.ports}["http"]
            got = wait_for(
                lambda svc=svc, port=port: _infer(f"{svc.spec.cluster_ip}:{port}"),
                60,
                message=lambda md=md: f"{md} answers through its Service; {_describe(cluster, namespace)}",
            )
            np.testing.assert_allclose(got, np.array([[1.5, -2.0]], dtype=np.float32) * FACTOR)
            answered[name] = time.monotonic() - t0
        figure(
            "storage: apply -> Ready / -> answered through the Service, per scheme (all applied together)",
            ", ".join(
                f"{n} {s:.0f}s/{answered[n]:.0f}s" for n, s in sorted(ready.items(), key=lambda kv: kv[1])
            ),
        )
    finally:
        cluster.delete_namespace(namespace)
        cluster.kubectl("delete", "pv", pv_name, "--ignore-not-found", "--wait=false", check=False)
