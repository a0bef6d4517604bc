"""Cluster-tier fixtures: the CRD installed once, a session operator watching ``md-*``
namespaces, and helpers to drive ModelDeployments."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from kube import Cluster, unique_name, wait_for
from operator_proc import OperatorProcess, install_crd

GROUP, VERSION, PLURAL = "modeldeploy.io", "v1alpha1", "modeldeployments"


@pytest.fixture(scope="session")
def crd(cluster: Cluster) -> None:
    install_crd(cluster)


@pytest.fixture(scope="session")
def operator(
    cluster: Cluster, crd: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """One operator for the session, watching every ``md-*`` namespace."""
    with running_operator(tmp_path_factory.mktemp("operator"), ["md-*"]) as op:
        yield op


@pytest.fixture
def md_ns(cluster: Cluster, operator: OperatorProcess, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace the session operator watches."""
    with fresh_namespace(cluster, "md-", request.node.name) as name:
        yield name


@contextmanager
def running_operator(log_dir: Path, namespaces: list[str], **options: Any) -> Iterator[OperatorProcess]:
    """An operator subprocess for the ``with`` block (a resync every 10 s unless told otherwise).
    Tests that kill or restart one use their own, so the session operator is left alone."""
    op = OperatorProcess(log_dir, namespaces, **{"resync_seconds": 10, **options})
    op.start()
    try:
        yield op
    finally:
        op.stop()
        if os.environ.get("MODELDEPLOY_SHOW_OPERATOR_LOG"):
            print(op.tail(200))


@contextmanager
def fresh_namespace(cluster: Cluster, prefix: str, test_name: str) -> Iterator[str]:
    """A namespace named after the test, deleted afterwards (kept with MODELDEPLOY_KEEP_NAMESPACES=1)."""
    name = cluster.create_namespace(unique_name(prefix + test_name.removeprefix("test_")[:28]))
    try:
        yield name
    finally:
        if os.environ.get("MODELDEPLOY_KEEP_NAMESPACES") != "1":
            cluster.delete_namespace(name)


def model_deployment(name: str, *, version: int = 1, replicas: int | None = 2, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {"format": "onnx", "storageUri": "s3://models/repo", "version": version},
            "server": {"image": "nvcr.io/nvidia/tritonserver:25.10-py3"},
        },
    }
    if replicas is not None:
        body["spec"]["replicas"] = replicas
    for key, value in spec.items():
        body["spec"][key] = copy.deepcopy(value)
    return body


class CustomObject:
    """Read helpers for one object of ours (``plural`` says which kind)."""

    plural, kind = PLURAL, "ModelDeployment"

    def __init__(self, cluster: Cluster, namespace: str, name: str) -> None:
        self.cluster, self.namespace, self.name = cluster, namespace, name

    def get(self) -> dict[str, Any]:
        obj: dict[str, Any] = self.cluster.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, self.plural, self.name
        )
        return obj

    def status(self) -> dict[str, Any]:
        return dict(self.get().get("status") or {})

    def condition(self, type_: str) -> dict[str, Any] | None:
        return next((c for c in self.status().get("conditions") or [] if c["type"] == type_), None)

    def events(self) -> list[Any]:
        """Events about this object (any kind of ours of this name)."""
        return [
            e
            for e in self.cluster.core.list_namespaced_event(self.namespace).items
            if e.involved_object.name == self.name and e.involved_object.kind == self.kind
        ]


class MD(CustomObject):
    """Read helpers for one ModelDeployment."""

    def patch(self, patch: dict[str, Any]) -> None:
        self.cluster.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, self.name, patch
        )

    def wait_phase(self, phase: str, timeout: float = 60) -> dict[str, Any]:
        """The first status in ``phase``: the very status whose phase was checked (one read). Reading it
        again to return it handed callers a later status, which need not be in ``phase`` any more."""

        def in_phase() -> dict[str, Any] | None:
            st = self.status()
            return st if st.get("phase") == phase else None

        return wait_for(
            in_phase, timeout, message=lambda: f"{self.name} phase {phase}; status: {self.status()}"
        )

    def deployments(self) -> list[Any]:
        return list(
            self.cluster.apps.list_namespaced_deployment(
                self.namespace, label_selector=f"modeldeploy.io/name={self.name}"
            ).items
        )

    def pods(self, revision: str | None = None) -> list[Any]:
        sel = f"modeldeploy.io/name={self.name}"
        if revision:
            sel += f",modeldeploy.io/revision={revision}"
        return [
            p
            for p in self.cluster.core.list_namespaced_pod(self.namespace, label_selector=sel).items
            if p.metadata.deletion_timestamp is None
        ]


@pytest.fixture
def md_factory(cluster: Cluster, md_ns: str) -> Any:
    def create(body: dict[str, Any]) -> MD:
        cluster.apply(body, namespace=md_ns)
        return MD(cluster, md_ns, body["metadata"]["name"])

    return create


def operator_log_dir(tmp: Path) -> Path:
    return tmp / "operator"


def ready_on(md: MD, revision: int, timeout: float = 90) -> dict[str, Any]:
    """Phase Ready with ``revision`` stable and no rollout going on."""
    return wait_for(
        lambda: (
            st
            if (st := md.status()).get("phase") == "Ready"
            and st.get("stableRevision") == revision
            and (st.get("rollout") or {}).get("state") == "Idle"
            else None
        ),
        timeout,
        message=lambda: f"{md.name} Ready on revision {revision}: {md.status()}",
    )
