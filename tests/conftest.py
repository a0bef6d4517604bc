"""Shared fixtures: ``cluster`` (session) and ``namespace`` (per test).

See tests/kube.py for the :class:`Cluster` API and the backends
(``MODELDEPLOY_K8S_BACKEND=local|kind|auto|existing``, default ``local``).
When no cluster can be had, cluster tests are skipped with the reason --
unless ``MODELDEPLOY_REQUIRE_CLUSTER=1`` (CI), where they fail with it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# tests/ has no __init__.py: make `import kube` work from every test module and import mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import figures
import kube
from kube import Cluster, ClusterUnavailable

_report: list[str] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cluster_dir = Path(__file__).parent / "cluster"
    tools_dir = Path(__file__).parent / "tools"
    for item in items:
        if tools_dir in Path(item.path).parents:
            item.add_marker(pytest.mark.tools)
        fixtures = getattr(item, "fixturenames", ())
        if "cluster" in fixtures or "namespace" in fixtures or cluster_dir in Path(item.path).parents:
            item.add_marker(pytest.mark.cluster)


def _unavailable(reason: str) -> None:
    if kube.cluster_required():
        pytest.fail(f"cluster required ({kube.REQUIRE_ENV}=1) but unavailable: {reason}", pytrace=False)
    pytest.skip(f"no Kubernetes cluster: {reason}")


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The session's cluster; started once (local backend) and stopped at session end.

    While it is up, ``os.environ`` carries its KUBECONFIG and a PATH with our
    kubectl/helm first, so subprocesses and in-process operators use it.
    """
    handle: Cluster | None = None
    try:
        backend = kube.select_backend()
        if backend == "auto":
            backend = "kind" if kube.docker_available() else "local"
        if backend == "local":
            handle = kube.start_local(tmp_path_factory.mktemp("controlplane"))
        elif backend == "kind":
            if not kube.docker_available():
                raise ClusterUnavailable("backend kind: no Docker engine answers `docker info`")
            try:
                kind_cluster: Any = request.getfixturevalue("kind_cluster")
            except pytest.FixtureLookupError as e:
                raise ClusterUnavailable("backend kind: pytest-kind is not installed") from e
            handle = kube.attach_existing(str(kind_cluster.kubeconfig_path), "kind")
        else:
            handle = kube.attach_existing(None, "existing")
    except ClusterUnavailable as e:
        _unavailable(str(e))
    assert handle is not None
    restore_env = handle.export_env()
    try:
        yield handle
    finally:
        restore_env()
        handle.close()
        cp = handle.control_plane
        if cp is not None:
            _report.append(f"local control plane ({cp.workdir}): timings {cp.format_timings()}")
            _report.append(f"local control plane: {cp.format_memory()}")
            cp.stop()


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, uniquely named namespace (default ServiceAccount present); deleted afterwards."""
    name = cluster.create_namespace(prefix=request.node.name)
    try:
        yield name
    finally:
        if os.environ.get("MODELDEPLOY_KEEP_NAMESPACES") != "1":
            cluster.delete_namespace(name)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for line in [*_report, *figures.summary_lines()]:
        terminalreporter.write_line(line)
