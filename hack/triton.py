#!/usr/bin/env python3
"""Run a real Triton Inference Server on a CPU-only Linux machine, from the ``nvidia-pytriton`` wheel.

The wheel (``pip install nvidia-pytriton``, the ``triton`` extra of this project)
ships a complete ``tritonserver`` build with the python backend::

    site-packages/
      pytriton/tritonserver/bin/tritonserver          the server (RPATH -> ../../../nvidia_pytriton.libs)
      pytriton/tritonserver/backends/python/          libtriton_python.so + triton_python_backend_utils.py
      pytriton/tritonserver/caches/local/             libtritoncache_local.so (response cache)
      pytriton/tritonserver/python_backend_stubs/3.X/triton_python_backend_stub   one per Python version
      nvidia_pytriton.libs/                           auditwheel-bundled libs (libtritonserver, cudart, ...)

What it takes to run it (what :func:`prepare` and :class:`TritonServer` do):

* The python backend starts ``backends/python/triton_python_backend_stub``, which the
  wheel does not ship there: the stub for the running Python is copied next to
  ``libtriton_python.so``. The site-packages tree is left untouched; the backends
  directory is copied once into ``$MODELDEPLOY_CACHE/triton/<pytriton version>/py3.X-<id>/``
  (default cache ``~/.cache/modeldeploy``) and passed as ``--backend-directory``.
* The copied ``libtriton_python.so`` and the stub find their bundled libraries through
  ``LD_LIBRARY_PATH=<site-packages>/nvidia_pytriton.libs`` (their ``$ORIGIN`` RPATH no
  longer points there from the copy).
* The stub embeds ``libpython3.X.so.1.0``. A symlink to the *running* interpreter's
  shared libpython goes into ``<cache>/.../lib`` at the head of ``LD_LIBRARY_PATH`` so
  the stub does not pick up a distribution libpython of another patch release. With
  a static Python the system ``libpython3.X`` (Debian: ``libpython3.X``) must exist.
* The embedded interpreter finds its ``sys.prefix`` by looking up ``python3`` on
  ``PATH``: the running interpreter's ``bin`` directory goes first on ``PATH`` so
  ``model.py`` runs in this virtualenv (numpy, which the stub needs, included).
* Each server gets its own python-backend shared-memory prefix, so several servers
  can run at once, and binds 127.0.0.1 only.

Library use::

    dist = prepare()                                  # raises TritonUnavailable
    with TritonServer.start(dist, Path("models"), log_path=Path("triton.log")) as server:
        print(server.http_url, server.metrics_url)    # ready: /v2/health/ready answered 200

CLI::

    python -m hack.triton info                        # wheel layout, cache, env (JSON)
    python -m hack.triton serve --model-repository DIR [--http-port 8000 ...]

Dependencies: the standard library (and the nvidia-pytriton wheel, located through
``importlib.metadata``; ``pytriton`` itself is never imported).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from hack.procutil import (
    ServerProcess,
    cache_dir,
    file_lock,
    free_ports,
    http_get,
    interrupt_on_signals,
    start_with_port_retries,
)

DIST_NAME = "nvidia-pytriton"
STUB_NAME = "triton_python_backend_stub"
DEFAULT_READY_TIMEOUT = 120.0
DEFAULT_STOP_TIMEOUT = 30.0
PORT_RETRIES = 3


class TritonUnavailable(RuntimeError):
    """tritonserver cannot run here (wheel missing, unsupported Python, missing library)."""


class TritonStartError(RuntimeError):
    """tritonserver was started but did not become ready; the message ends with its log tail."""


def cache_root() -> Path:
    """``$MODELDEPLOY_CACHE/triton`` (default ``~/.cache/modeldeploy/triton``)."""
    return cache_dir(expand_user=False) / "triton"


# --------------------------------------------------------------------------- the wheel


@dataclass(frozen=True)
class Wheel:
    """Where the installed nvidia-pytriton wheel keeps tritonserver."""

    version: str
    server_dir: Path  # pytriton/tritonserver
    libs_dir: Path  # nvidia_pytriton.libs
    record_digest: str  # identifies the installed files (cache key)

    @property
    def binary(self) -> Path:
        return self.server_dir / "bin" / "tritonserver"

    def stub(self, python_version: str) -> Path:
        return self.server_dir / "python_backend_stubs" / python_version / STUB_NAME

    def stub_versions(self) -> list[str]:
        root = self.server_dir / "python_backend_stubs"
        return sorted(p.parent.name for p in root.glob(f"*/{STUB_NAME}")) if root.is_dir() else []


def find_wheel() -> Wheel:
    """Locate the installed nvidia-pytriton wheel. Raises :class:`TritonUnavailable`."""
    try:
        dist = importlib.metadata.distribution(DIST_NAME)
    except importlib.metadata.PackageNotFoundError:
        raise TritonUnavailable(
            f"{DIST_NAME} is not installed in {sys.prefix}: "
            f"pip install -e '.[triton]' (or pip install {DIST_NAME})"
        ) from None
    server_dir = Path(str(dist.locate_file("pytriton/tritonserver"))).resolve()
    libs_dir = Path(str(dist.locate_file("nvidia_pytriton.libs"))).resolve()
    if not (server_dir / "bin" / "tritonserver").is_file():
        raise TritonUnavailable(f"{DIST_NAME} {dist.version} has no tritonserver binary under {server_dir}")
    if not libs_dir.is_dir():
        # an editable pytriton checkout keeps them elsewhere
        libs_dir = server_dir / "external_libs"
    record = dist.read_text("RECORD") or dist.version
    # Only the files inside site-packages: console scripts ("../../../bin/...") carry the venv's
    # absolute path in their shebang, so their hashes differ between two checkouts of the same tree.
    inside = "\n".join(line for line in record.splitlines() if not line.startswith(".."))
    digest = hashlib.sha256(inside.encode()).hexdigest()[:12]
    return Wheel(version=dist.version, server_dir=server_dir, libs_dir=libs_dir, record_digest=digest)


# --------------------------------------------------------------------------- prepared copy


@dataclass(frozen=True)
class TritonDist:
    """A runnable tritonserver: the wheel's binary plus a backends directory with the stub."""

    wheel: Wheel
    root: Path  # the prepared directory in the cache
    python_version: str
    python_bin_dir: Path
    libpython: Path | None  # the running interpreter's shared libpython, if it has one

    @property
    def version(self) -> str:
        """The nvidia-pytriton version (the tritonserver release is :meth:`TritonServer.server_version`)."""
        return self.wheel.version

    @property
    def binary(self) -> Path:
        return self.wheel.binary

    @property
    def backends_dir(self) -> Path:
        return self.root / "backends"

    @property
    def caches_dir(self) -> Path:
        return self.wheel.server_dir / "caches"

    @property
    def stub(self) -> Path:
        return self.backends_dir / "python" / STUB_NAME

    @property
    def lib_dirs(self) -> list[Path]:
        return [self.root / "lib", self.wheel.libs_dir]

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment tritonserver (and the python stub it spawns) needs."""
        env = dict(os.environ if base is None else base)
        libs = [str(p) for p in self.lib_dirs]
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
        env["PATH"] = os.pathsep.join([str(self.python_bin_dir), env.get("PATH", os.defpath)])
        env.pop("PYTHONHOME", None)
        return env

    def describe(self) -> dict[str, Any]:
        env = self.env({})
        return {
            "pytriton_version": self.version,
            "binary": str(self.binary),
            "backend_directory": str(self.backends_dir),
            "cache_directory": str(self.caches_dir),
            "stub": str(self.stub),
            "python": self.python_version,
            "libpython": str(self.libpython) if self.libpython else None,
            "stub_versions_in_wheel": self.wheel.stub_versions(),
            "env": {"LD_LIBRARY_PATH": env["LD_LIBRARY_PATH"], "PATH (prefix)": str(self.python_bin_dir)},
        }


def _running_libpython() -> Path | None:
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return None
    libdir = sysconfig.get_config_var("LIBDIR")
    name = sysconfig.get_config_var("INSTSONAME") or sysconfig.get_config_var("LDLIBRARY")
    if not libdir or not name:
        return None
    path = Path(libdir) / name
    return path.resolve() if path.exists() else None


def prepare(root: Path | None = None) -> TritonDist:
    """Make tritonserver runnable for the running Python; idempotent, safe across processes.

    Raises :class:`TritonUnavailable` with the reason when it cannot be.
    """
    if not sys.platform.startswith("linux"):
        raise TritonUnavailable(f"tritonserver from {DIST_NAME} runs on Linux only (this is {sys.platform})")
    wheel = find_wheel()
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub_src = wheel.stub(pyver)
    if not stub_src.is_file():
        raise TritonUnavailable(
            f"{DIST_NAME} {wheel.version} has no python backend stub for Python {pyver} "
            f"(it has: {', '.join(wheel.stub_versions()) or 'none'})"
        )
    libpython = _running_libpython()
    interp_id = hashlib.sha256(f"{sys.base_prefix}|{wheel.record_digest}".encode()).hexdigest()[:8]
    base = (root or cache_root()) / wheel.version
    target = base / f"py{pyver}-{interp_id}"
    base.mkdir(parents=True, exist_ok=True)
    with file_lock(base / ".lock"):
        if not (target / ".stamp").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=".prep-", dir=base))
            tmp.chmod(0o755)
            try:
                shutil.copytree(wheel.server_dir / "backends", tmp / "backends", ignore=_ignore_pycache)
                shutil.copy2(stub_src, tmp / "backends" / "python" / STUB_NAME)
                (tmp / "lib").mkdir()
                if libpython is not None:
                    (tmp / "lib" / libpython.name).symlink_to(libpython)
                (tmp / ".stamp").write_text(f"{wheel.version} {wheel.record_digest} {sys.base_prefix}\n")
                shutil.rmtree(target, ignore_errors=True)
                tmp.rename(target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    dist = TritonDist(
        wheel=wheel,
        root=target,
        python_version=pyver,
        python_bin_dir=Path(sys.executable).parent,
        libpython=libpython,
    )
    _check_libraries(dist)
    return dist


def _ignore_pycache(_dir: str, names: list[str]) -> set[str]:
    return {n for n in names if n == "__pycache__"}


def _check_libraries(dist: TritonDist) -> None:
    """Every shared library of the server, the python backend and the stub must resolve."""
    ldd = shutil.which("ldd")
    if ldd is None:
        return
    env = dist.env()
    for obj in (dist.binary, dist.backends_dir / "python" / "libtriton_python.so", dist.stub):
        out = subprocess.run(
            [ldd, str(obj)], env=env, capture_output=True, text=True, timeout=60, check=False
        )
        missing = sorted({line.split()[0] for line in out.stdout.splitlines() if "not found" in line})
        if missing:
            hint = ""
            if any(m.startswith("libpython") for m in missing):
                hint = (
                    f" (the python backend stub needs a shared libpython{dist.python_version}: use a "
                    f"Python built with --enable-shared, or install the distribution's "
                    f"libpython{dist.python_version})"
                )
            raise TritonUnavailable(f"{obj} cannot load {', '.join(missing)}{hint}")


# --------------------------------------------------------------------------- the server


@dataclass
class TritonServer(ServerProcess):
    """One tritonserver process on 127.0.0.1, in its own process group, logging to ``log_path``."""

    label = "tritonserver"
    tail_lines = 60

    dist: TritonDist
    model_repository: Path
    log_path: Path
    http_port: int
    grpc_port: int
    metrics_port: int
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    ready_seconds: float | None = None  # start -> /v2/health/ready answered 200
    _log: IO[bytes] | None = field(default=None, repr=False)

    # ---------------------------------------------------------------- construction

    @classmethod
    def start(
        cls,
        dist: TritonDist,
        model_repository: Path,
        *,
        log_path: Path,
        extra_args: Sequence[str] = (),
        model_control_mode: str = "none",
        ready_timeout: float = DEFAULT_READY_TIMEOUT,
        exit_timeout_secs: int = 10,
        ports: tuple[int, int, int] | None = None,
        env: Mapping[str, str] | None = None,
        wait: bool = True,
    ) -> TritonServer:
        """Start tritonserver and (by default) wait for ``/v2/health/ready``.

        Free ports are picked unless ``ports`` (http, grpc, metrics) is given; a port
        taken by someone else between picking and binding is retried with new ports.
        Raises :class:`TritonStartError` (with the log tail) when it exits or times out.
        """

        def launch() -> TritonServer:
            http_port, grpc_port, metrics_port = ports or tuple(free_ports(3))
            argv = [
                str(dist.binary),
                f"--model-repository={model_repository}",
                f"--backend-directory={dist.backends_dir}",
                f"--cache-directory={dist.caches_dir}",
                "--http-address=127.0.0.1",
                f"--http-port={http_port}",
                "--grpc-address=127.0.0.1",
                f"--grpc-port={grpc_port}",
                "--metrics-address=127.0.0.1",
                f"--metrics-port={metrics_port}",
                f"--model-control-mode={model_control_mode}",
                f"--exit-timeout-secs={exit_timeout_secs}",
                f"--backend-config=python,shm-region-prefix-name=modeldeploy-{uuid.uuid4().hex[:12]}",
                *extra_args,
            ]
            server = cls(
                dist=dist,
                model_repository=model_repository,
                log_path=log_path,
                http_port=http_port,
                grpc_port=grpc_port,
                metrics_port=metrics_port,
                argv=argv,
            )
            server._spawn(env)
            return server

        if not wait:
            return launch()
        return start_with_port_retries(
            launch,
            attempts=1 if ports is not None else PORT_RETRIES,
            ready_timeout=ready_timeout,
            error=TritonStartError,
            port_in_use="already in use",
            tail_lines=200,
        )

    def _spawn(self, env: Mapping[str, str] | None) -> None:
        self._launch(self.argv, cwd=self.log_path.parent, env=self.dist.env(env), die_with_parent=True)

    # ---------------------------------------------------------------- endpoints

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def http_address(self) -> str:
        """host:port, as tritonclient.http wants it."""
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def is_ready(self) -> bool:
        return http_get(f"{self.http_url}/v2/health/ready", timeout=2.0)[0] == 200

    def model_ready(self, model: str, version: int | str | None = None) -> bool:
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version is not None else "") + "/ready"
        return http_get(self.http_url + path, timeout=2.0)[0] == 200

    def server_metadata(self) -> dict[str, Any]:
        status, body = http_get(f"{self.http_url}/v2")
        if status != 200:
            raise RuntimeError(f"GET /v2 answered {status}: {body[:200]!r}")
        data: dict[str, Any] = json.loads(body)
        return data

    def server_version(self) -> str:
        return str(self.server_metadata()["version"])

    def metrics_text(self) -> str:
        status, body = http_get(self.metrics_url)
        if status != 200:
            raise RuntimeError(f"GET {self.metrics_url} answered {status}")
        return body.decode()

    # ---------------------------------------------------------------- lifecycle

    def wait_ready(self, timeout: float = DEFAULT_READY_TIMEOUT) -> None:
        self._wait_ready(
            self.is_ready,
            timeout=timeout,
            what=f"tritonserver {self.http_url}/v2/health/ready",
            error=TritonStartError,
        )

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> int | None:
        """SIGTERM (Triton unloads models, then exits), SIGKILL to the group after ``timeout``."""
        # python backend stubs live in the server's process group; none may outlive it
        return self._stop(timeout, reap_group=True)


# --------------------------------------------------------------------------- CLI


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="prepare tritonserver and print its layout and environment as JSON")
    serve = sub.add_parser("serve", help="run tritonserver in the foreground until interrupted")
    serve.add_argument("--model-repository", type=Path, required=True)
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument("--log", type=Path, default=Path("tritonserver.log"))
    serve.add_argument("extra", nargs="*", help="extra tritonserver arguments (after --)")
    args = parser.parse_args(argv)
    try:
        dist = prepare()
    except TritonUnavailable as err:
        print(f"tritonserver unavailable: {err}", file=sys.stderr)
        return 2
    if args.cmd == "info":
        print(json.dumps(dist.describe(), indent=2))
        return 0

    interrupt_on_signals()
    server = TritonServer.start(
        dist,
        args.model_repository.resolve(),
        log_path=args.log.resolve(),
        extra_args=args.extra,
        ports=(args.http_port, args.grpc_port, args.metrics_port),
        wait=False,
    )
    try:
        server.wait_ready()
        print(
            f"tritonserver {server.server_version()} ready in {server.ready_seconds:.1f}s: "
            f"http {server.http_url}  grpc {server.grpc_address}  metrics {server.metrics_url}  "
            f"log {server.log_path}",
            flush=True,
        )
        assert server.process is not None
        return server.process.wait()
    except KeyboardInterrupt:
        return 0
    except TritonStartError as err:
        print(err, file=sys.stderr)
        return 1
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(_main())
