"""Kubernetes access for the cluster-tier tests.

The session fixture ``cluster`` (tests/conftest.py) yields a :class:`Cluster`;
this module holds that class, the backend selection and the polling helpers.

Backends (env ``MODELDEPLOY_K8S_BACKEND``):

* ``local`` (default): :class:`localcluster.LocalControlPlane` from ``hack/`` --
  etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok built
  from their Go modules; fake nodes ``localcluster.FAKE_NODES``; pods simulated
  by kwok (label ``simulate: never-ready|crashloop``). ``simulated`` is True.
* ``kind``: pytest-kind's ``kind_cluster`` fixture (needs Docker).
* ``auto``: ``kind`` when ``docker info`` answers within a few seconds, else ``local``.
* ``existing``: whatever ``KUBECONFIG`` (or ~/.kube/config) points at.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

from hack import localcluster, realnode
from hack.localcluster import (
    FAKE_NODES,
    BinariesMissing,
    ControlPlaneError,
    FakeNode,
    LocalControlPlane,
)
from hack.procutil import poll

REPO_ROOT = Path(__file__).resolve().parents[1]


__all__ = [
    "BACKENDS",
    "FAKE_NODES",
    "BinariesMissing",
    "Cluster",
    "ClusterUnavailable",
    "CommandError",
    "ControlPlaneError",
    "FakeNode",
    "LocalControlPlane",
    "condition",
    "docker_available",
    "hold_for",
    "pod_is_ready",
    "select_backend",
    "unique_name",
    "wait_for",
]

BACKEND_ENV = "MODELDEPLOY_K8S_BACKEND"
REQUIRE_ENV = "MODELDEPLOY_REQUIRE_CLUSTER"
BACKENDS = ("local", "kind", "auto", "existing")

T = TypeVar("T")


class ClusterUnavailable(RuntimeError):
    """No cluster can be provided (binaries missing, start failed, Docker absent...)."""


class CommandError(subprocess.CalledProcessError):
    """A kubectl/helm call failed; the message carries its output."""

    def __str__(self) -> str:
        out = (self.stderr or "").strip() or (self.output or "").strip()
        return f"{' '.join(map(str, self.cmd))} exited {self.returncode}: {out[-2000:]}"


# --------------------------------------------------------------------------------------------------
# Polling


def _describe(message: str | Callable[[], str]) -> str:
    return message() if callable(message) else message


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.2,
    message: str | Callable[[], str] = "condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Exceptions raised by ``predicate`` count as "not yet" (the last one is
    reported). On timeout raises AssertionError naming ``message`` (a string or
    a callable producing one, e.g. a dump of the object being waited on).
    The test-side face of the one polling loop, :func:`hack.procutil.poll`.
    """
    last: T | None = None
    last_exc: BaseException | None = None

    def once() -> T | None:
        nonlocal last, last_exc
        try:
            last = predicate()
            last_exc = None
        except Exception as e:
            last_exc = e
            return None
        return last if last else None

    try:
        return poll(once, timeout=timeout, interval=interval)
    except TimeoutError:
        detail = f"last error: {last_exc!r}" if last_exc is not None else f"last value: {last!r}"
        raise AssertionError(
            f"timed out after {timeout:g}s waiting for {_describe(message)} ({detail})"
        ) from None


def hold_for(
    predicate: Callable[[], object],
    duration: float,
    interval: float = 0.2,
    message: str | Callable[[], str] = "condition",
) -> int:
    """Assert that ``predicate`` stays truthy for ``duration`` seconds (polled); returns the poll count."""
    deadline = time.monotonic() + duration
    polls = 0
    while True:
        value = predicate()
        polls += 1
        if not value:
            raise AssertionError(
                f"{_describe(message)} stopped holding after {polls} polls (value: {value!r})"
            )
        if time.monotonic() >= deadline:
            return polls
        time.sleep(interval)


def unique_name(prefix: str, max_len: int = 63) -> str:
    """A DNS-1123 label: sanitized ``prefix`` plus a random suffix."""
    base = re.sub(r"[^a-z0-9-]+", "-", prefix.lower()).strip("-")[: max_len - 7].rstrip("-") or "t"
    return f"{base}-{uuid.uuid4().hex[:6]}"


# --------------------------------------------------------------------------------------------------
# The cluster handle


class Cluster:
    """What cluster tests get: kubeconfig, env, kubectl/helm runners and API clients."""

    def __init__(
        self,
        kubeconfig: Path,
        env: Mapping[str, str],
        *,
        backend: str,
        simulated: bool,
        control_plane: LocalControlPlane | None = None,
    ) -> None:
        self.kubeconfig = Path(kubeconfig)
        self.env: dict[str, str] = dict(env)
        self.backend = backend
        self.simulated = simulated
        self.control_plane = control_plane
        self._audit_offset = 0
        self._audit_cache: list[dict[str, Any]] = []

    def __repr__(self) -> str:
        return f"Cluster(backend={self.backend!r}, kubeconfig={str(self.kubeconfig)!r})"

    # ---- command-line tools ----------------------------------------------------------------------

    def which(self, tool: str) -> str:
        found = shutil.which(tool, path=self.env.get("PATH"))
        if found is None:
            raise FileNotFoundError(f"{tool} not found on PATH={self.env.get('PATH')}")
        return found

    def run(
        self,
        tool: str,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        cmd = [self.which(tool), *map(str, args)]
        proc = subprocess.run(
            cmd, input=input, capture_output=True, text=True, env=self.env, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise CommandError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run our kubectl against this cluster (text mode; CommandError on failure when ``check``)."""
        return self.run("kubectl", *args, input=input, check=check, timeout=timeout)

    def wait_crd_established(self, name: str, timeout: float = 60) -> None:
        """Wait for a CRD's Established condition. Right after creation it may have no conditions at
        all, which `kubectl wait` reports as an error rather than "not yet"."""
        wait_for(
            lambda: (
                self.kubectl(
                    "wait", "--for=condition=Established", "--timeout=10s", f"crd/{name}", check=False
                ).returncode
                == 0
            ),
            timeout,
            message=f"CRD {name} Established",
        )

    def helm(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        """Run our helm against this cluster (isolated HELM_*_HOME for the local backend)."""
        return self.run("helm", *args, input=input, check=check, timeout=timeout)

    def apply(
        self, manifest: str | Mapping[str, Any] | Sequence[Mapping[str, Any]], namespace: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``kubectl apply -f -`` of YAML text or of object(s)."""
        import yaml

        if isinstance(manifest, str):
            text = manifest
        elif isinstance(manifest, Mapping):
            text = yaml.safe_dump(dict(manifest))
        else:
            text = yaml.safe_dump_all([dict(m) for m in manifest])
        args = ["apply", "-f", "-"] + (["-n", namespace] if namespace else [])
        return self.kubectl(*args, input=text)

    # ---- official Python client ------------------------------------------------------------------

    @cached_property
    def api_client(self) -> Any:
        """A ``kubernetes.client.ApiClient`` for this cluster (own configuration, not the global one)."""
        from kubernetes import config

        return config.new_client_from_config(  # type: ignore[no-untyped-call,unused-ignore]
            config_file=str(self.kubeconfig)
        )

    @cached_property
    def core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.api_client)

    @cached_property
    def apps(self) -> Any:
        from kubernetes import client

        return client.AppsV1Api(self.api_client)

    @cached_property
    def batch(self) -> Any:
        from kubernetes import client

        return client.BatchV1Api(self.api_client)

    @cached_property
    def autoscaling(self) -> Any:
        from kubernetes import client

        return client.AutoscalingV2Api(self.api_client)

    @cached_property
    def custom(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self.api_client)

    @cached_property
    def apiextensions(self) -> Any:
        from kubernetes import client

        return client.ApiextensionsV1Api(self.api_client)

    @cached_property
    def discovery(self) -> Any:
        from kubernetes import client

        return client.DiscoveryV1Api(self.api_client)

    def close(self) -> None:
        if "api_client" in self.__dict__:
            self.api_client.close()
            del self.__dict__["api_client"]
            for name in ("core", "apps", "batch", "autoscaling", "custom", "apiextensions", "discovery"):
                self.__dict__.pop(name, None)

    # ---- namespaces ------------------------------------------------------------------------------

    def create_namespace(
        self,
        name: str | None = None,
        *,
        prefix: str = "t",
        labels: Mapping[str, str] | None = None,
        timeout: float = 30,
    ) -> str:
        """Create a namespace (``unique_name(prefix)`` unless ``name``) with its ``default`` SA.

        ServiceAccount admission is on in every backend, so pods are rejected until ``default``
        exists. The controller-manager creates it, but on a busy machine its client rate limit
        can hold that write back for tens of seconds behind a namespace-deletion backlog (CI once
        waited over 30 s): the SA is not what the tests examine, so after ``timeout`` seconds
        without it the test creates it itself, as an admin would (the controller then finds it).
        """
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        name = name or unique_name(prefix)
        meta = client.V1ObjectMeta(name=name, labels={"modeldeploy.io/test": "true", **(labels or {})})
        self.core.create_namespace(client.V1Namespace(metadata=meta))
        try:
            self.wait_for_service_account(name, "default", timeout=timeout)
        except AssertionError:
            try:
                sa = client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="default"))
                self.core.create_namespaced_service_account(name, sa)
            except ApiException as e:
                if e.status != 409:
                    raise
        return name

    def wait_for_service_account(self, namespace: str, name: str = "default", timeout: float = 30) -> None:
        wait_for(
            lambda: self.core.read_namespaced_service_account(name, namespace),
            timeout,
            message=f"serviceaccount {namespace}/{name}",
        )

    def delete_namespace(self, name: str, *, wait: bool = False, timeout: float = 120) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.delete_namespace(name, propagation_policy="Background")
        except ApiException as e:
            if e.status != 404:
                raise
            return
        if wait:
            wait_for(
                lambda: not self.namespace_exists(name),
                timeout,
                interval=0.5,
                message=f"namespace {name} gone",
            )

    def namespace_exists(self, name: str) -> bool:
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.read_namespace(name)
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        return True

    # ---- local-backend extras --------------------------------------------------------------------

    def audit_events(self) -> list[dict[str, Any]]:
        """Write-request audit events so far, oldest first (local backend only).

        The apiserver logs each create/update/patch/delete/deletecollection once
        (stage ResponseComplete, level Metadata: user, userAgent, verb, objectRef,
        responseStatus). The file is read incrementally, so polling this is cheap.
        """
        if self.control_plane is None:
            raise RuntimeError(f"audit log is only available on the local backend, not {self.backend}")
        path = self.control_plane.audit_log
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self._audit_offset:  # a new log (fresh control plane): start over
            self._audit_offset, self._audit_cache = 0, []
        if size > self._audit_offset:
            with path.open("rb") as f:
                f.seek(self._audit_offset)
                chunk = f.read(size - self._audit_offset)
            complete = chunk[: chunk.rfind(b"\n") + 1]  # leave a half-written last line for next time
            self._audit_offset += len(complete)
            self._audit_cache.extend(json.loads(line) for line in complete.splitlines() if line.strip())
        return list(self._audit_cache)

    def export_env(self) -> Callable[[], None]:
        """Put this cluster's KUBECONFIG and PATH into ``os.environ`` (for subprocesses and in-process
        operators); returns a function restoring the previous values."""
        saved = {k: os.environ.get(k) for k in ("KUBECONFIG", "PATH")}
        os.environ["KUBECONFIG"] = str(self.kubeconfig)
        os.environ["PATH"] = self.env["PATH"]

        def restore() -> None:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

        return restore


# --------------------------------------------------------------------------------------------------
# Backends


def select_backend(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    backend = env.get(BACKEND_ENV, "local").strip().lower() or "local"
    if backend not in BACKENDS:
        raise ClusterUnavailable(f"{BACKEND_ENV}={backend!r} is not one of {', '.join(BACKENDS)}")
    return backend


def cluster_required(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return env.get(REQUIRE_ENV, "").strip().lower() in ("1", "true", "yes")


def docker_available(timeout: float = 5.0) -> bool:
    """True when a Docker engine answers (``docker --version`` answers even without one)."""
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        return (
            subprocess.run([docker, "info"], capture_output=True, timeout=timeout, check=False).returncode
            == 0
        )
    except (subprocess.TimeoutExpired, OSError):
        return False


def tools_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default os.environ) with the cached kubectl/helm first on PATH when they are built."""
    env = dict(os.environ if base is None else base)
    try:
        binaries = localcluster.Binaries.locate()
    except BinariesMissing:
        return env
    dirs = [str(binaries.kubectl.parent), str(binaries.helm.parent)]
    env["PATH"] = os.pathsep.join([*dirs, env.get("PATH", os.defpath)])
    return env


def start_local(workdir: Path, *, real_node: bool = False) -> Cluster:
    """The local control plane; with ``real_node`` also a real node (kubelet, containerd) beside the
    fake ones (``hack/realnode.py``)."""
    cp = LocalControlPlane(workdir, real_node=real_node)
    try:
        cp.start()
    except (BinariesMissing, ControlPlaneError, realnode.RealNodeUnavailable, realnode.RealNodeError) as e:
        raise ClusterUnavailable(str(e)) from e
    return Cluster(cp.kubeconfig, cp.env(), backend="local", simulated=not real_node, control_plane=cp)


def attach_existing(kubeconfig: str | None, backend: str, timeout: float = 20) -> Cluster:
    env = tools_env()
    if kubeconfig:
        env["KUBECONFIG"] = kubeconfig
    path = env.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    first = path.split(os.pathsep)[0]
    if not Path(first).is_file():
        raise ClusterUnavailable(f"backend {backend}: kubeconfig {first} does not exist")
    cluster = Cluster(Path(first), env, backend=backend, simulated=False)
    try:
        proc = cluster.kubectl("get", "--raw=/readyz", check=False, timeout=timeout)
    except (FileNotFoundError, subprocess.TimeoutExpired) as e:
        raise ClusterUnavailable(f"backend {backend}: {e}") from e
    if proc.returncode != 0:
        raise ClusterUnavailable(f"backend {backend}: API server not ready: {proc.stderr.strip()}")
    nodes = cluster.kubectl("get", "nodes", "-o", "jsonpath={.items[*].metadata.annotations}", check=False)
    cluster.simulated = localcluster.FAKE_NODE_ANNOTATION in nodes.stdout
    return cluster


def condition(obj: Any, type_: str) -> Any | None:
    """The status condition of ``type_`` on an API model object (pod, deployment, CRD...), or None."""
    for cond in (getattr(obj.status, "conditions", None) or []) if obj.status else []:
        if cond.type == type_:
            return cond
    return None


def pod_is_ready(pod: Any) -> bool:
    cond = condition(pod, "Ready")
    return cond is not None and cond.status == "True"
