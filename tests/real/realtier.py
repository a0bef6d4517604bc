"""Helpers of the real tier (a module of its own: test modules import it by name, which a second
``conftest`` module could shadow)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import figures
from hack import realnode
from hackmods import unavailable as _unavailable

REQUIRED_BY = ("MODELDEPLOY_REQUIRE_CLUSTER", "MODELDEPLOY_REQUIRE_REAL_NODE")


def figure(name: str, value: str) -> None:
    """A measurement of the real tier, printed in the terminal summary (and at once with -s)."""
    figures.figure("real node", name, value)


def unavailable(reason: str) -> None:
    _unavailable(f"real node unavailable: {reason}", REQUIRED_BY)


on_real_node = realnode.on_node


RESTRICTED_CONTAINER: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


@contextlib.contextmanager
def operator_process(workdir: Path, namespaces: list[str], stager_image: str) -> Iterator[Any]:
    """The operator as a host process (the chart test runs it as a pod) watching ``namespaces``
    (patterns allowed), staging with the locally built operator image. With
    ``MODELDEPLOY_SHOW_OPERATOR_LOG`` set its log tail is printed afterwards."""
    from operator_proc import OperatorProcess

    op = OperatorProcess(
        workdir, namespaces, resync_seconds=10, env={"MODELDEPLOY_STAGER_IMAGE": stager_image}
    )
    op.start()
    try:
        yield op
    finally:
        op.stop()
        if os.environ.get("MODELDEPLOY_SHOW_OPERATOR_LOG"):
            print(op.tail(200))


@contextlib.contextmanager
def s3_on_node(workdir: Path) -> Iterator[Any]:
    """A real S3 server (moto) on the node IP, where pods reach it; the tier's reason when moto
    cannot be had."""
    from hack import s3server

    try:
        python = s3server.ensure_moto()
    except s3server.S3ServerUnavailable as err:
        unavailable(f"S3 server (moto): {err}")
    with s3server.S3Server.start(python, workdir, host=realnode.NODE_IP) as server:
        yield server


def s3_secret(cluster: Any, namespace: str, server: Any, key: Any, name: str = "s3") -> None:
    """The Secret a ModelDeployment's ``credentialsSecret`` names: ``key`` and ``server``'s endpoint."""
    cluster.kubectl(
        "create", "secret", "generic", name, "-n", namespace,
        f"--from-literal=AWS_ACCESS_KEY_ID={key.access_key}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={key.secret_key}",
        f"--from-literal=AWS_ENDPOINT_URL={server.endpoint}",
    )  # fmt: skip
