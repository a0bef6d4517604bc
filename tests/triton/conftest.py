"""Triton tier: a real ``tritonserver`` from the nvidia-pytriton wheel (see ``hack/triton.py``).

Without the wheel, or where tritonserver cannot start, these tests are skipped with the
reason; with ``MODELDEPLOY_REQUIRE_TRITON=1`` (CI) they fail with it instead.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn, Protocol

import pytest

from hack import triton as launcher
from hackmods import unavailable as _unavailable

REPO_ROOT = Path(__file__).resolve().parents[2]
REQUIRE_ENV = "MODELDEPLOY_REQUIRE_TRITON"


def unavailable(reason: str) -> NoReturn:
    """Skip, or fail when the environment says Triton is required."""
    _unavailable(f"tritonserver unavailable: {reason}", (REQUIRE_ENV,))


@pytest.fixture(scope="session")
def triton_dist(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The prepared tritonserver, proven to start (empty repository) once per session."""
    try:
        dist = launcher.prepare()
    except launcher.TritonUnavailable as err:
        reason: str | None = str(err)
    else:
        reason = None
    if reason is not None:
        unavailable(reason)
    workdir = tmp_path_factory.mktemp("triton-smoke")
    empty_repo = workdir / "models"
    empty_repo.mkdir()
    try:
        server = launcher.TritonServer.start(
            dist, empty_repo, log_path=workdir / "tritonserver.log", ready_timeout=60
        )
    except launcher.TritonStartError as err:
        reason = f"tritonserver does not start: {err}"
    if reason is not None:
        unavailable(reason)
    try:
        print(
            f"\ntritonserver {server.server_version()} (nvidia-pytriton {dist.version}) ready in "
            f"{server.ready_seconds:.2f}s with an empty repository"
        )
    finally:
        server.stop()
    return dist


class ServerFactory(Protocol):
    def __call__(self, model_repository: Path, **kwargs: Any) -> Any: ...


@pytest.fixture
def triton_server(triton_dist: Any, tmp_path: Path) -> Iterator[ServerFactory]:
    """``triton_server(model_repo, **start_kwargs)`` starts a ready tritonserver; all stop at teardown.

    A server that fails here fails the test (the environment was proven by ``triton_dist``).
    """
    servers: list[Any] = []

    def start(model_repository: Path, **kwargs: Any) -> Any:
        log_path = tmp_path / f"tritonserver-{len(servers)}.log"
        kwargs.setdefault("ready_timeout", 120)
        server = launcher.TritonServer.start(triton_dist, model_repository, log_path=log_path, **kwargs)
        servers.append(server)
        print(f"\ntritonserver ready in {server.ready_seconds:.2f}s ({model_repository}), log {log_path}")
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def model_repo(tmp_path: Path) -> Path:
    """An empty Triton model repository directory."""
    repo = tmp_path / "model_repository"
    repo.mkdir()
    return repo


class ModelWriter(Protocol):
    def __call__(self, name: str, config_pbtxt: str, versions: Mapping[int, str | None]) -> Path: ...


@pytest.fixture
def write_model(model_repo: Path) -> ModelWriter:
    """``write_model(name, config_pbtxt, {version: model.py source or None})`` fills ``model_repo``."""

    def write(name: str, config_pbtxt: str, versions: Mapping[int, str | None]) -> Path:
        model_dir = model_repo / name
        if model_dir.exists():
            shutil.rmtree(model_dir)
        model_dir.mkdir(parents=True)
        (model_dir / "config.pbtxt").write_text(config_pbtxt)
        for version, source in versions.items():
            vdir = model_dir / str(version)
            vdir.mkdir()
            if source is not None:
                (vdir / "model.py").write_text(source)
        return model_dir

    return write


@pytest.fixture(scope="session")
def triton_launcher() -> ModuleType:
    """hack/triton.py (poll, http_get, TritonServer, ...)."""
    return launcher
