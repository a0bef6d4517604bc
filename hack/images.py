#!/usr/bin/env python3
"""Container images for the local node, built without Docker and without a registry.

Three images, each from Debian packages and PyPI wheels only, written as OCI image archives that
``ctr -n k8s.io images import`` (containerd 2.2) loads:

* ``pause``: the pod sandbox, a static ``pause`` binary (``hack/images/pause.c``, ``gcc -static``)
  in a one-layer image, ``ENTRYPOINT ["/pause"]``, user 65535.
* ``triton``: a drop-in for ``nvcr.io/nvidia/tritonserver``: a Debian bookworm essential root with
  ``python3``, ``libpython3.11``, ``python3-numpy`` and ``libstdc++6`` plus the ``tritonserver`` of
  the installed ``nvidia-pytriton`` wheel (see ``hack/triton.py``) laid out as NGC does:
  ``/opt/tritonserver/{bin,lib,backends,caches}`` (tritonserver's default backend and cache
  directories), the wheel's bundled ``nvidia_pytriton.libs`` in ``lib`` (those no shipped binary
  loads are left out: the wheel's libpython 3.13 for the 3.13 stub), the python 3.11 backend stub
  next to ``libtriton_python.so``, ``tritonserver`` on ``PATH``,
  ``LD_LIBRARY_PATH=/opt/tritonserver/lib``, ``HOME=/tmp``, user ``triton-server`` 1000:1000,
  ``WORKDIR /tmp``. The operator's container command (``tritonserver --model-repository=...``)
  runs unchanged, with a read-only root filesystem.
* ``operator``: what the project's ``Dockerfile`` builds (the same venv ``/opt/modeldeploy`` with
  ``pip install '.[worker]'``, entry points, environment, user and working directory; a tools-tier test parses
  the Dockerfile and fails on drift), on Debian bookworm essential + ``python3``,
  ``python3-venv``, ``ca-certificates``, ``libstdc++6`` (for the batch worker's compiled
  libraries). pip inside the new root cannot reach PyPI (TLS is
  intercepted here and the host's CA bundle is not in the root), so the wheelhouse is built on
  the host (``pip wheel . -c <pins>``) and installed offline (``--no-index --find-links``). The
  pins are the versions installed in the running venv (the project's runtime requirements and
  theirs, and the worker extra's): the image runs the dependency set the tests ran.

Choices:

* **Cache key.** An image is rebuilt only when one of its inputs changes; the key is a SHA-256 over
  :func:`image_inputs`: the Debian suite, mirrors and package list, the source of the functions of
  this file that build that image (:data:`_RECIPES`), the pause source and the gcc version, the
  nvidia-pytriton version and RECORD digest, or the project's source files and the pinned
  dependency versions. The archive is ``$MODELDEPLOY_CACHE/images/<name>-<hash16>.oci.tar``,
  written to a temporary name and renamed into place when complete; its reference is
  ``modeldeploy.local/<name>:<hash12>`` (:func:`ref` needs no build). Debian package *versions* are
  not part of the key (as a Dockerfile's ``FROM debian:bookworm`` is not): a rebuild after
  removing the archive picks up the suite's updates.
* **Root filesystems** come from ``mmdebstrap --variant=essential`` (root, directory output); the
  steps inside the root (venv, offline ``pip install``, checks) run as mmdebstrap customize hooks,
  which have ``/proc`` and ``/dev`` mounted, with a clean environment (``env -i``). Man pages,
  docs (copyrights kept), locales and apt's lists and caches are left out; ``/etc/resolv.conf`` and
  ``/etc/hostname`` (copied from the host) are emptied, the runtime mounts its own.
* **Byte code.** The layer's mtimes are all 0, so timestamp-checked ``.pyc`` files would never
  match their sources and Python would recompile every module at each start (it cannot write
  them back on a read-only root). Every ``.pyc`` in the root is rewritten as an
  *unchecked-hash* pyc (PEP 552) by the image's own Python: valid whatever the mtimes, and
  deterministic.
* **OCI archive** (:func:`write_oci_archive`): one layer, a tar of the root with sorted entries,
  mtime 0, numeric owners from the root (names dropped), hard links kept, device nodes, FIFOs and
  sockets and whatever is under ``/dev``, ``/proc``, ``/sys`` left out (the runtime mounts those);
  gzip'd with mtime 0; the config (amd64/linux, Entrypoint, Cmd, Env, User, WorkingDir, ports,
  labels, diff_ids, no creation time), the manifest, ``index.json`` whose manifest descriptor
  carries ``io.containerd.image.name`` (the reference) and ``org.opencontainers.image.ref.name``
  (the tag), and ``oci-layout``, in a tar whose entries are sorted with mtime 0 too. The same
  root gives the same archive, byte for byte.
* **Import** (:func:`import_into`): ``ctr images import`` through containerd's transfer service
  (the default in containerd 2, no ``--local``), which names the image from the
  ``io.containerd.image.name`` annotation (a full reference overrides ctr's ``import-<date>``
  prefix) and unpacks it into the snapshotter (``--snapshotter overlayfs``, the CRI's).
* **Verification** (:func:`verify`, CLI ``verify``): the archive's layer is extracted and run with
  ``runc`` under the image's own user, environment and working directory, read-only root,
  no capabilities, host network: pause exits 0 on SIGTERM; tritonserver, started with the
  operator's arguments, serves a python-backend model from a read-only ``/models`` and answers
  ``/v2/health/ready`` and an inference; the operator's ``modeldeploy --version`` and
  ``modeldeploy-operator run --help`` run.

Building needs root (mmdebstrap, chroot), gcc with a static libc, mmdebstrap
(``hack/install-node-deps.sh``), network access to the Debian mirror and PyPI, and the running
Python's venv with the project's dependencies and nvidia-pytriton (``make venv``).

CLI::

    python -m hack.images build [all|pause|triton|operator]...   # ref, sizes, seconds, cached/built
    python -m hack.images ref NAME
    python -m hack.images verify [NAME...]                        # run the built images with runc
    python -m hack.images import --ctr PATH --address SOCK [--namespace k8s.io] NAME...
    python -m hack.images prune                                   # archives of stale inputs

Dependencies: the standard library, ``packaging`` (for the requirement markers) and, for the
triton image, ``hack/triton.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import importlib.metadata
import importlib.util
import inspect
import io
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import IO, Any

from hack.procutil import cache_dir, file_lock, free_ports, http_get, http_request, poll

REPO = Path(__file__).resolve().parent.parent
REGISTRY = "modeldeploy.local"
NAMES = ("pause", "triton", "operator")

SUITE = "bookworm"
DEBIAN_SOURCES = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
# Left out of every root (dpkg never unpacks them): docs (not copyrights), man pages, locales.
DPKG_EXCLUDES = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/lintian/*",
)
TRITON_PACKAGES = ("python3", "libpython3.11", "python3-numpy", "libstdc++6")
# libstdc++6: the worker extra's compiled parts (ml_dtypes under tritonclient, gevent)
OPERATOR_PACKAGES = ("python3", "python3-venv", "ca-certificates", "libstdc++6")
IMAGE_PYTHON = "3.11"  # bookworm's python3 (3.11.2): the stub version and the wheels' ABI

# What `pip install` gets in the operator image: the project and its batch worker's libraries
# (Dockerfile: `pip install '.[worker]'`)
OPERATOR_EXTRAS = ("worker",)
OPERATOR_INSTALL = f".[{','.join(OPERATOR_EXTRAS)}]"
OPERATOR_VENV = "/opt/modeldeploy"
TRITON_HOME = "/opt/tritonserver"
STUB_NAME = "triton_python_backend_stub"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
ANNOTATION_IMAGE_NAME = "io.containerd.image.name"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
GZIP_LEVEL = 6  # 9 takes twice as long for ~2% less
CHUNK = 1 << 20


class ImageBuildError(RuntimeError):
    """An image could not be built (the message ends with the failing command's output)."""


# --------------------------------------------------------------------------- image definitions


@dataclass(frozen=True)
class User:
    """A user (and its group of the same name and id) added to /etc/passwd and /etc/group."""

    name: str
    uid: int
    gid: int
    home: str
    shell: str


@dataclass(frozen=True)
class ImageConfig:
    """The OCI image config's ``config`` part (what a Dockerfile's ENTRYPOINT, CMD, ENV ... set)."""

    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    user: str = ""
    workdir: str = ""
    exposed_ports: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()

    def env_dict(self) -> dict[str, str]:
        return dict(self.env)

    def to_oci(self) -> dict[str, Any]:
        out: dict[str, Any] = {"Entrypoint": list(self.entrypoint)}
        if self.cmd:
            out["Cmd"] = list(self.cmd)
        if self.env:
            out["Env"] = [f"{k}={v}" for k, v in self.env]
        if self.user:
            out["User"] = self.user
        if self.workdir:
            out["WorkingDir"] = self.workdir
        if self.exposed_ports:
            out["ExposedPorts"] = {p: {} for p in self.exposed_ports}
        if self.labels:
            out["Labels"] = dict(self.labels)
        return out


PAUSE_CONFIG = ImageConfig(
    entrypoint=("/pause",),
    user="65535:65535",
    labels=(("org.opencontainers.image.title", "pause"),),
)

TRITON_USER = User("triton-server", 1000, 1000, "/tmp", "/bin/sh")
TRITON_CONFIG = ImageConfig(
    entrypoint=(),
    cmd=("tritonserver",),
    env=(
        ("PATH", f"{TRITON_HOME}/bin:{BASE_PATH}"),
        ("LD_LIBRARY_PATH", f"{TRITON_HOME}/lib"),
        ("HOME", "/tmp"),
        ("LANG", "C.UTF-8"),
    ),
    user=f"{TRITON_USER.uid}:{TRITON_USER.gid}",
    workdir="/tmp",
    exposed_ports=("8000/tcp", "8001/tcp", "8002/tcp"),
    labels=(
        ("org.opencontainers.image.title", "tritonserver"),
        ("org.opencontainers.image.description", "Triton Inference Server, CPU, from nvidia-pytriton"),
    ),
)

# The Dockerfile's final stage; tests/tools/test_images.py holds them equal.
OPERATOR_USER = User("nonroot", 65532, 65532, "/nonexistent", "/usr/sbin/nologin")
OPERATOR_CONFIG = ImageConfig(
    entrypoint=("modeldeploy",),
    cmd=("run", "--standalone", "--all-namespaces", "--liveness=http://0.0.0.0:8080/healthz"),
    env=(
        ("PATH", f"{OPERATOR_VENV}/bin:{BASE_PATH}"),
        ("PYTHONDONTWRITEBYTECODE", "1"),
        ("PYTHONUNBUFFERED", "1"),
        ("HOME", "/tmp"),
        ("LANG", "C.UTF-8"),
    ),
    user=f"{OPERATOR_USER.uid}:{OPERATOR_USER.gid}",
    workdir="/tmp",
    exposed_ports=("8080/tcp", "8383/tcp"),
    labels=(
        ("org.opencontainers.image.title", "modeldeploy-operator"),
        (
            "org.opencontainers.image.description",
            "Kubernetes operator deploying models on NVIDIA Triton with progressive rollouts",
        ),
        ("org.opencontainers.image.licenses", "Apache-2.0"),
    ),
)

CONFIGS = {"pause": PAUSE_CONFIG, "triton": TRITON_CONFIG, "operator": OPERATOR_CONFIG}


@dataclass(frozen=True)
class BuiltImage:
    name: str
    ref: str
    archive: Path
    size: int  # bytes of the archive (compressed layer + JSON)
    seconds: float
    cached: bool
    unpacked_size: int = 0  # bytes of the uncompressed layer (0 when unknown)

    def describe(self) -> str:
        unpacked = f", {self.unpacked_size / 1e6:.0f} MB unpacked" if self.unpacked_size else ""
        how = "cached" if self.cached else "built"
        return (
            f"{self.name}: {self.ref}  {self.size / 1e6:.1f} MB{unpacked}  "
            f"{self.seconds:.1f}s  {how}  {self.archive}"
        )


def images_dir() -> Path:
    """``$MODELDEPLOY_CACHE/images``."""
    return cache_dir() / "images"


# --------------------------------------------------------------------------- OCI archive


class _HashingWriter(io.RawIOBase):
    """A write-only stream that hashes and counts what goes through it to ``sink`` (or nowhere)."""

    def __init__(self, sink: IO[bytes] | gzip.GzipFile | None = None) -> None:
        super().__init__()
        self.sink = sink
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.sha256.update(view)
        self.size += view.nbytes
        if self.sink is not None:
            self.sink.write(view)
        return view.nbytes

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha256.hexdigest()


_SKIPPED_DIRS = ("dev", "proc", "sys")  # the runtime mounts these: only the empty directory goes in


def _walk(root: Path) -> Iterator[tuple[str, Path]]:
    """(archive name, path) of everything under ``root``, depth first, names sorted bytewise."""

    def walk(directory: Path, prefix: str) -> Iterator[tuple[str, Path]]:
        for name in sorted(os.listdir(directory), key=os.fsencode):
            path = directory / name
            arcname = prefix + name
            yield arcname, path
            if arcname in _SKIPPED_DIRS:
                continue
            if stat.S_ISDIR(os.lstat(path).st_mode):
                yield from walk(path, arcname + "/")

    yield from walk(root, "")


def write_layer(root: Path, out: IO[bytes]) -> tuple[str, str, int]:
    """Write the gzip'd layer tar of ``root`` to ``out``: (diff_id, digest, uncompressed size).

    Deterministic: sorted entries, mtime 0 everywhere (gzip header too), numeric owners only.
    """
    compressed = _HashingWriter(out)
    with gzip.GzipFile(filename="", mode="wb", fileobj=compressed, mtime=0, compresslevel=GZIP_LEVEL) as gz:
        plain = _HashingWriter(gz)
        buffered = io.BufferedWriter(plain, buffer_size=CHUNK)
        with tarfile.open(fileobj=buffered, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for arcname, path in _walk(root):
                mode = os.lstat(path).st_mode
                if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
                    continue  # device nodes, FIFOs, sockets
                info = tar.gettarinfo(str(path), arcname=arcname)
                info.mtime = 0
                info.uname = info.gname = ""
                if info.isreg():
                    with path.open("rb") as fh:
                        tar.addfile(info, fh)
                else:
                    tar.addfile(info)
        buffered.flush()
    return plain.digest, compressed.digest, plain.size


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _descriptor(media_type: str, data_digest: str, size: int, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": data_digest, "size": size, **extra}


def _tar_member(
    tar: tarfile.TarFile, name: str, *, data: bytes | None = None, path: Path | None = None
) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = 0
    info.uid = info.gid = 0
    if data is None and path is None:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tar.addfile(info)
        return
    info.mode = 0o644
    if path is not None:
        info.size = path.stat().st_size
        with path.open("rb") as fh:
            tar.addfile(info, fh)
    else:
        assert data is not None
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


@dataclass(frozen=True)
class OciArchive:
    """What :func:`write_oci_archive` wrote."""

    path: Path
    manifest_digest: str
    config_digest: str
    layer_digest: str
    diff_id: str
    layer_size: int  # compressed
    unpacked_size: int  # the uncompressed layer tar


def write_oci_archive(root: Path, config: ImageConfig, reference: str, dest: Path) -> OciArchive:
    """Write ``root`` as a one-layer OCI image archive named ``reference`` to ``dest``.

    ``dest`` appears only when complete (written next to it, then renamed).
    """
    tag = reference.rsplit(":", 1)[1] if ":" in reference.rsplit("/", 1)[-1] else "latest"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}-", dir=dest.parent) as tmpdir:
        tmp = Path(tmpdir)
        layer_path = tmp / "layer"
        with layer_path.open("wb") as fh:
            diff_id, layer_digest, unpacked = write_layer(root, fh)
        layer_size = layer_path.stat().st_size
        image_config = {
            "architecture": "amd64",
            "os": "linux",
            "config": config.to_oci(),
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created_by": "hack/images.py", "comment": reference}],
        }
        config_bytes = _json_bytes(image_config)
        config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": _descriptor(CONFIG_MEDIA_TYPE, config_digest, len(config_bytes)),
            "layers": [_descriptor(LAYER_MEDIA_TYPE, layer_digest, layer_size)],
        }
        manifest_bytes = _json_bytes(manifest)
        manifest_digest = "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
        index = {
            "schemaVersion": 2,
            "mediaType": INDEX_MEDIA_TYPE,
            "manifests": [
                _descriptor(
                    MANIFEST_MEDIA_TYPE,
                    manifest_digest,
                    len(manifest_bytes),
                    platform={"architecture": "amd64", "os": "linux"},
                    annotations={ANNOTATION_IMAGE_NAME: reference, ANNOTATION_REF_NAME: tag},
                )
            ],
        }
        blobs: dict[str, bytes | Path] = {
            config_digest: config_bytes,
            manifest_digest: manifest_bytes,
            layer_digest: layer_path,
        }
        partial = tmp / "archive.tar"
        with tarfile.open(partial, mode="w", format=tarfile.PAX_FORMAT) as tar:
            _tar_member(tar, "blobs")
            _tar_member(tar, "blobs/sha256")
            for blob_digest in sorted(blobs):
                blob = blobs[blob_digest]
                name = "blobs/sha256/" + blob_digest.split(":", 1)[1]
                if isinstance(blob, Path):
                    _tar_member(tar, name, path=blob)
                else:
                    _tar_member(tar, name, data=blob)
            _tar_member(tar, "index.json", data=_json_bytes(index))
            _tar_member(tar, "oci-layout", data=_json_bytes({"imageLayoutVersion": "1.0.0"}))
        partial.chmod(0o644)
        partial.rename(dest)
    return OciArchive(
        path=dest,
        manifest_digest=manifest_digest,
        config_digest=config_digest,
        layer_digest=layer_digest,
        diff_id=diff_id,
        layer_size=layer_size,
        unpacked_size=unpacked,
    )


def read_oci_archive(archive: Path) -> dict[str, Any]:
    """index, manifest and config of a one-manifest archive (for checks and tests)."""
    with tarfile.open(archive) as tar:

        def load(name: str) -> Any:
            fh = tar.extractfile(name)
            assert fh is not None, name
            return json.loads(fh.read())

        index = load("index.json")
        manifest = load("blobs/sha256/" + index["manifests"][0]["digest"].split(":", 1)[1])
        config = load("blobs/sha256/" + manifest["config"]["digest"].split(":", 1)[1])
    return {"index": index, "manifest": manifest, "config": config}


def extract_layer(archive: Path, dest: Path) -> None:
    """Unpack the (single) layer of ``archive`` into ``dest``, owners kept (needs root for that)."""
    meta = read_oci_archive(archive)
    layer_name = "blobs/sha256/" + meta["manifest"]["layers"][0]["digest"].split(":", 1)[1]
    with tarfile.open(archive) as outer:
        fh = outer.extractfile(layer_name)
        assert fh is not None
        with tarfile.open(fileobj=fh, mode="r|gz") as layer:
            layer.extractall(dest, numeric_owner=True, filter="fully_trusted")


# --------------------------------------------------------------------------- inputs and references


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _recipe_source(name: str) -> str:
    """The source of this file's functions that make image ``name`` (part of its cache key)."""
    return "\n".join(inspect.getsource(fn) for fn in (*_COMMON_RECIPE, *_RECIPES[name]))


def _gcc_version() -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        return "no gcc"
    out = subprocess.run([gcc, "--version"], capture_output=True, text=True, check=False, timeout=30)
    return out.stdout.splitlines()[0] if out.stdout else "unknown gcc"


def project_files(project: Path) -> list[Path]:
    """The files ``pip install .`` of the project reads: pyproject.toml, README.md, operator/."""
    files = [project / "pyproject.toml", project / "README.md"]
    for path in sorted((project / "operator").rglob("*")):
        rel = path.relative_to(project).parts
        if any(p == "__pycache__" or p.endswith(".egg-info") for p in rel) or path.suffix == ".pyc":
            continue
        if path.is_file():
            files.append(path)
    return files


def pinned_requirements(project: Path) -> list[str]:
    """``name==version`` of the project's runtime requirements and theirs (no extras), as
    installed in the running Python's environment: the image gets exactly the tested set."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    env = {k: str(v) for k, v in default_environment().items()}
    env.update(python_full_version="3.11.2", python_version=IMAGE_PYTHON)  # the image's python3
    pyproject = tomllib.loads((project / "pyproject.toml").read_text())
    queue: list[tuple[str, str]] = [(r, "") for r in pyproject["project"].get("dependencies", [])]
    optional = pyproject["project"].get("optional-dependencies", {})
    queue += [(r, extra) for extra in OPERATOR_EXTRAS for r in optional.get(extra, [])]
    pins: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()
    while queue:
        text, extra = queue.pop()
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({**env, "extra": extra}):
            continue
        name = canonicalize_name(req.name)
        for wanted in ("", *sorted(req.extras)):
            if (name, wanted) in seen:
                continue
            seen.add((name, wanted))
            try:
                dist = importlib.metadata.distribution(name)
            except importlib.metadata.PackageNotFoundError:
                raise ImageBuildError(
                    f"{req.name} (required by the project) is not installed in {sys.prefix}: make venv"
                ) from None
            pins[name] = dist.version
            queue.extend((r, wanted) for r in dist.requires or [])
    return [f"{n}=={v}" for n, v in sorted(pins.items())]


def _triton_module() -> ModuleType:
    """hack/triton.py, imported only where the triton image is built (it needs nvidia-pytriton)."""
    return importlib.import_module("hack.triton")


def _triton_wheel() -> Any:
    triton = _triton_module()
    try:
        return triton.find_wheel()
    except triton.TritonUnavailable as err:
        raise ImageBuildError(str(err)) from None


def image_inputs(name: str, project: Path = REPO) -> dict[str, str]:
    """Everything image ``name`` is made of, as strings; its cache key hashes these."""
    if name not in NAMES:
        raise ValueError(f"unknown image {name!r} (known: {', '.join(NAMES)})")
    inputs = {
        "image": name,
        "recipe": _RECIPE_HASHES[name],
        "scripts": hashlib.sha256(_SCRIPTS[name].encode()).hexdigest(),
        "config": json.dumps(CONFIGS[name].to_oci(), sort_keys=True),
    }
    if name == "pause":
        inputs["pause.c"] = _sha256_file(project / "hack" / "images" / "pause.c")
        inputs["gcc"] = _gcc_version()
        return inputs
    inputs["suite"] = SUITE
    inputs["sources"] = "\n".join(DEBIAN_SOURCES)
    inputs["dpkg"] = "\n".join(DPKG_EXCLUDES)
    if name == "triton":
        wheel = _triton_wheel()
        inputs["packages"] = ",".join(TRITON_PACKAGES)
        inputs["user"] = repr(TRITON_USER)
        inputs["nvidia-pytriton"] = f"{wheel.version} {wheel.record_digest}"
    else:
        inputs["packages"] = ",".join(OPERATOR_PACKAGES)
        inputs["user"] = repr(OPERATOR_USER)
        inputs["install"] = OPERATOR_INSTALL
        try:
            inputs["requirements"] = "\n".join(pinned_requirements(project))
        except ImportError as err:  # packaging: the venv has it (pip, pytest need it)
            raise ImageBuildError(f"{err}: run this with the project's venv Python (make venv)") from None
        inputs["project"] = "\n".join(
            f"{p.relative_to(project)} {_sha256_file(p)}" for p in project_files(project)
        )
    return inputs


def content_hash(inputs: dict[str, str]) -> str:
    return hashlib.sha256(_json_bytes(inputs)).hexdigest()


def ref(name: str, project: Path = REPO) -> str:
    """``modeldeploy.local/<name>:<hash12>``, computed from the inputs only (nothing is built)."""
    return _reference(name, content_hash(image_inputs(name, project)))


def _reference(name: str, digest: str) -> str:
    return f"{REGISTRY}/{name}:{digest[:12]}"


def archive_path(name: str, digest: str) -> Path:
    return images_dir() / f"{name}-{digest[:16]}.oci.tar"


# --------------------------------------------------------------------------- building


def _run(argv: Sequence[str], *, what: str, log: Path | None = None, **kwargs: Any) -> str:
    """Run ``argv``; its output (also appended to ``log``), or ImageBuildError with the output's tail."""
    proc = subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
    if log is not None:
        with log.open("a") as fh:
            fh.write(f"$ {shlex.join(argv)}\n{proc.stdout}\n")
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-60:])
        raise ImageBuildError(f"{what} failed (exit {proc.returncode}): {shlex.join(argv)}\n{tail}")
    return str(proc.stdout)


def _require_root() -> None:
    if os.geteuid() != 0:
        raise ImageBuildError("building images needs root (mmdebstrap and chroot)")


def _in_root(script: str) -> str:
    """An mmdebstrap customize hook running ``script`` (sh) in the new root, clean environment."""
    return (
        'chroot "$1" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 '
        f"/bin/sh -eu -c {shlex.quote(script)}"
    )


# Runs inside the new root with its Python: every .pyc becomes an unchecked-hash pyc (see the
# module docstring), written with the same optimization level as before.
_RECOMPILE_PYC = r"""
import importlib.util, os, py_compile, sys
done = 0
for top in sys.argv[1:]:
    for dirpath, _dirs, files in os.walk(top):
        if os.path.basename(dirpath) != "__pycache__":
            continue
        for pyc in files:
            parts = pyc.split(".")
            if not pyc.endswith(".pyc") or len(parts) < 3:
                continue
            opt = parts[-2][4:] if parts[-2].startswith("opt-") else ""
            src = os.path.join(os.path.dirname(dirpath), parts[0] + ".py")
            if not os.path.isfile(src):
                continue
            py_compile.compile(src, cfile=os.path.join(dirpath, pyc), doraise=True,
                               optimize=int(opt) if opt else 0,
                               invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
            done += 1
print(f"recompiled {done} pyc files as unchecked-hash")
"""

# Runs inside the triton root: every library and program of tritonserver must load; the bundled
# libraries none of them loads are removed.
_TRITON_CHECK = r"""
import os, subprocess, sys
home = sys.argv[1]
lib = os.path.join(home, "lib")
objects = [
    os.path.join(home, "bin", "tritonserver"),
    os.path.join(home, "backends", "python", "triton_python_backend_stub"),
]
for sub in ("backends", "caches"):
    for dirpath, _dirs, files in os.walk(os.path.join(home, sub)):
        objects += [os.path.join(dirpath, f) for f in files if f.endswith(".so")]


def scan():
    used, missing = set(), []
    for obj in objects:
        out = subprocess.run(["ldd", obj], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if "not found" in line:
                missing.append(f"{obj}: {line.strip()}")
            elif "=>" in line and line.split("=>")[1].split():
                path = os.path.normpath(line.split("=>")[1].split()[0])
                if os.path.dirname(path) == lib:
                    used.add(os.path.basename(path))
    if missing:
        sys.exit("missing libraries:\n" + "\n".join(missing))
    return used


used = scan()
for name in sorted(os.listdir(lib)):
    if name not in used:
        print(f"removing {lib}/{name}: no tritonserver binary loads it")
        os.remove(os.path.join(lib, name))
scan()
import numpy
print(f"{len(objects)} objects load; {len(used)} bundled libraries kept; numpy {numpy.__version__}")
"""


def _mmdebstrap(root: Path, packages: Sequence[str], hooks: Sequence[str], log: Path, workdir: Path) -> None:
    """A Debian essential root with ``packages`` at ``root``; ``hooks`` are customize hooks."""
    recompile = workdir / "recompile_pyc.py"
    recompile.write_text(_RECOMPILE_PYC)
    argv = [
        "mmdebstrap",
        "--mode=root",
        "--variant=essential",
        "--format=directory",
        f"--include={','.join(packages)}",
        *(f"--dpkgopt={opt}" for opt in DPKG_EXCLUDES),
        "--aptopt=Acquire::Retries=3",
        *(f"--customize-hook={h}" for h in hooks),
        f'--customize-hook=cp {shlex.quote(str(recompile))} "$1/tmp/recompile_pyc.py"',
        "--customize-hook="
        + _in_root(
            "python3 /tmp/recompile_pyc.py /usr/lib/python3 /usr/lib/python3.11 /opt; "
            "rm /tmp/recompile_pyc.py"
        ),
        SUITE,
        str(root),
        *DEBIAN_SOURCES,
    ]
    _run(argv, what="mmdebstrap", log=log, stdin=subprocess.DEVNULL, timeout=1800)


def _add_user(root: Path, user: User) -> None:
    """Append ``user`` and its group (same name and id) to the root's passwd, group and shadow."""
    with (root / "etc/passwd").open("a") as fh:
        fh.write(f"{user.name}:x:{user.uid}:{user.gid}::{user.home}:{user.shell}\n")
    with (root / "etc/group").open("a") as fh:
        fh.write(f"{user.name}:x:{user.gid}:\n")
    with (root / "etc/shadow").open("a") as fh:
        fh.write(":".join([user.name, "!", *[""] * 7]) + "\n")
    with contextlib.suppress(FileNotFoundError), (root / "etc/gshadow").open("a") as fh:
        fh.write(f"{user.name}:!::\n")


def _finish_root(root: Path) -> None:
    """Leave out what a container needs not and the host's leftovers; deterministic files only."""
    for pattern in (
        "var/cache/apt/*",
        "var/lib/apt/lists/*",
        "var/log/*",
        "var/cache/debconf/*-old",
        "var/lib/dpkg/*-old",
        "var/cache/ldconfig/aux-cache",
        "tmp/*",
        "var/tmp/*",
        "root/.cache",
    ):
        for path in root.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    # copied from the host by mmdebstrap; the runtime mounts its own over them
    for name in ("etc/resolv.conf", "etc/hostname"):
        (root / name).unlink(missing_ok=True)
        (root / name).write_text("")
    (root / "etc/hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")


def _build_pause_root(root: Path, project: Path, log: Path, workdir: Path) -> None:
    del workdir
    root.mkdir()
    _run(
        [
            "gcc",
            "-static",
            "-O2",
            "-s",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-o",
            str(root / "pause"),
            str(project / "hack" / "images" / "pause.c"),
        ],
        what="gcc",
        log=log,
    )
    _run([str(root / "pause"), "-v"], what="pause -v", log=log)


def _build_triton_root(root: Path, project: Path, log: Path, workdir: Path) -> None:
    del project
    wheel = _triton_wheel()
    stub = wheel.stub(IMAGE_PYTHON)
    if not stub.is_file():
        raise ImageBuildError(
            f"nvidia-pytriton {wheel.version} has no python backend stub for {IMAGE_PYTHON}"
        )
    stage = workdir / "stage"
    home = stage / TRITON_HOME.lstrip("/")
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(wheel.server_dir / "bin", home / "bin", ignore=ignore)
    shutil.copytree(wheel.server_dir / "backends", home / "backends", ignore=ignore)
    shutil.copytree(wheel.server_dir / "caches", home / "caches", ignore=ignore)
    shutil.copytree(wheel.libs_dir, home / "lib", ignore=ignore)
    shutil.copy2(stub, home / "backends" / "python" / STUB_NAME)
    for path in [home, *home.rglob("*")]:
        if path.is_dir() or path.parent.name == "bin" or path.name == STUB_NAME:
            path.chmod(0o755)
        else:
            path.chmod(0o644)
    check = workdir / "triton_check.py"
    check.write_text(_TRITON_CHECK)
    hooks = [
        f'cp -a {shlex.quote(str(stage))}/. "$1/"',
        f'cp {shlex.quote(str(check))} "$1/tmp/triton_check.py"',
        _in_root(
            f"LD_LIBRARY_PATH={TRITON_HOME}/lib python3 /tmp/triton_check.py {TRITON_HOME}; "
            "rm /tmp/triton_check.py"
        ),
    ]
    _mmdebstrap(root, TRITON_PACKAGES, hooks, log, workdir)
    _add_user(root, TRITON_USER)


def _build_operator_root(root: Path, project: Path, log: Path, workdir: Path) -> None:
    # The wheel is built from a copy of exactly the files the cache key hashed: setuptools builds
    # in the source tree (a build/ directory in the checkout, where a deleted module would linger).
    source = workdir / "source"
    for path in project_files(project):
        target = source / path.relative_to(project)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    wheels = workdir / "wheels"
    constraints = workdir / "constraints.txt"
    constraints.write_text("\n".join(pinned_requirements(project)) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in ("PIP_CERT",)}
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--disable-pip-version-check",
            "--constraint",
            str(constraints),
            "--wheel-dir",
            str(wheels),
            OPERATOR_INSTALL,
        ],
        what="pip wheel",
        log=log,
        cwd=source,
        env=env,
        timeout=1800,
    )
    venv = OPERATOR_VENV
    inside = (
        f"python3 -m venv {venv}; "
        f"PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 {venv}/bin/pip install --quiet --no-index "
        f"--find-links /tmp/wheels 'modeldeploy[{','.join(OPERATOR_EXTRAS)}]'; "
        f"{venv}/bin/python -c 'import numpy, tritonclient.http.aio'; "
        f"test \"$({venv}/bin/python -c 'import sys; print(sys.version.split()[0])')\" = "
        f"\"$(/usr/bin/python3 -c 'import sys; print(sys.version.split()[0])')\"; "
        f"{venv}/bin/modeldeploy --version; "
        f"{venv}/bin/modeldeploy-operator run --help >/dev/null; "
        "rm -rf /tmp/wheels"
    )
    hooks = [
        f'cp -a {shlex.quote(str(wheels))} "$1/tmp/wheels"',
        _in_root(inside),
    ]
    _mmdebstrap(root, OPERATOR_PACKAGES, hooks, log, workdir)
    _add_user(root, OPERATOR_USER)


_COMMON_RECIPE: tuple[Callable[..., Any], ...] = (
    _walk,
    write_layer,
    write_oci_archive,
    _tar_member,
)
_DEBIAN_RECIPE: tuple[Callable[..., Any], ...] = (_in_root, _mmdebstrap, _add_user, _finish_root)
_RECIPES: dict[str, tuple[Callable[..., Any], ...]] = {
    "pause": (_build_pause_root,),
    "triton": (*_DEBIAN_RECIPE, _build_triton_root),
    "operator": (*_DEBIAN_RECIPE, _build_operator_root, pinned_requirements),
}
_BUILDERS: dict[str, Callable[[Path, Path, Path, Path], None]] = {
    "pause": _build_pause_root,
    "triton": _build_triton_root,
    "operator": _build_operator_root,
}
# the scripts run inside the roots are part of the recipes too
_SCRIPTS = {"triton": _TRITON_CHECK + _RECOMPILE_PYC, "operator": _RECOMPILE_PYC, "pause": ""}
# Read now, with the code just compiled: inspect reads the file lazily, and a process that
# imported an older version of this file would otherwise hash the new text at the old line numbers.
_RECIPE_HASHES = {name: hashlib.sha256(_recipe_source(name).encode()).hexdigest() for name in NAMES}


def build(name: str, project: Path = REPO, *, progress: Callable[[str], None] | None = None) -> BuiltImage:
    """Build image ``name`` (or find it in the cache): the archive and its reference."""
    started = time.monotonic()
    inputs = image_inputs(name, project)
    digest = content_hash(inputs)
    reference = _reference(name, digest)
    dest = archive_path(name, digest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    meta = dest.with_suffix(".json")  # <name>-<hash16>.oci.json: sizes, for cached answers
    with file_lock(dest.parent / f".{name}.lock"):
        if dest.is_file():
            unpacked = 0
            with contextlib.suppress(OSError, ValueError, KeyError):
                unpacked = int(json.loads(meta.read_text())["unpacked_size"])
            return BuiltImage(
                name, reference, dest, dest.stat().st_size, time.monotonic() - started, True, unpacked
            )
        if name != "pause":
            _require_root()
        say = progress or (lambda _msg: None)
        with tempfile.TemporaryDirectory(prefix=f".build-{name}-", dir=dest.parent) as tmpdir:
            workdir = Path(tmpdir)
            root = workdir / "rootfs"
            log = dest.parent / f"{name}-{digest[:16]}.log"
            log.write_text(f"inputs: {json.dumps(inputs, indent=1)}\n")
            say(f"{name}: building the root filesystem (log {log})")
            _BUILDERS[name](root, project, log, workdir)
            if name != "pause":
                _finish_root(root)
            say(f"{name}: writing {dest.name}")
            partial = workdir / "image.oci.tar"
            written = write_oci_archive(root, CONFIGS[name], reference, partial)
            seconds = time.monotonic() - started
            meta.write_text(
                json.dumps(
                    {
                        "ref": reference,
                        "manifest": written.manifest_digest,
                        "unpacked_size": written.unpacked_size,
                        "layer_size": written.layer_size,
                        "build_seconds": round(seconds, 1),
                    },
                    indent=1,
                )
                + "\n"
            )
            partial.rename(dest)
    seconds = time.monotonic() - started  # with the clean-up of the root
    return BuiltImage(
        name, reference, dest, dest.stat().st_size, seconds, False, unpacked_size=written.unpacked_size
    )


def build_all(project: Path = REPO, *, progress: Callable[[str], None] | None = None) -> list[BuiltImage]:
    """Build (or find cached) every image, in :data:`NAMES` order."""
    return [build(name, project, progress=progress) for name in NAMES]


def prune(project: Path = REPO) -> list[Path]:
    """Remove the cached archives (and their logs and sizes) of inputs that are no longer current.

    Not while another process may still import one of those (nothing locks an archive after its build).
    """
    current = {f"{name}-{content_hash(image_inputs(name, project))[:16]}" for name in NAMES}
    removed = []
    for path in sorted(images_dir().glob("*-*.*")):
        stem = path.name.split(".", 1)[0]
        if stem.rsplit("-", 1)[0] in NAMES and stem not in current:
            path.unlink()
            removed.append(path)
    return removed


# --------------------------------------------------------------------------- containerd


def import_into(
    ctr: Path, address: Path, archive: Path, namespace: str = "k8s.io", *, snapshotter: str = "overlayfs"
) -> None:
    """``ctr images import`` ``archive`` into the containerd at ``address``, unpacked for
    ``snapshotter``, named by the archive's ``io.containerd.image.name``. Raises
    ImageBuildError with ctr's output on failure."""
    _run(
        [
            str(ctr),
            "--address",
            str(address),
            "--namespace",
            namespace,
            "images",
            "import",
            "--snapshotter",
            snapshotter,
            "--platform",
            "linux/amd64",
            str(archive),
        ],
        what="ctr images import",
        timeout=600,
    )


def is_imported(ctr: Path, address: Path, reference: str, namespace: str = "k8s.io") -> bool:
    """Whether containerd at ``address`` has an image named ``reference`` in ``namespace``."""
    out = _run(
        [str(ctr), "--address", str(address), "--namespace", namespace, "images", "ls", "--quiet"],
        what="ctr images ls",
        timeout=60,
    )
    return reference in out.split()


# --------------------------------------------------------------------------- verification with runc

_TEST_MODEL_CONFIG = """name: "add_one"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ 4 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 4 ] } ]
"""
_TEST_MODEL_PY = """import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", (x + 1).astype(np.float32))]))
        return out
"""


@dataclass
class Container:
    """One runc container from an image's root: the image's user, env and cwd, read-only root,
    no capabilities, no new privileges, host network, tmpfs /tmp and /dev/shm."""

    bundle: Path
    config: ImageConfig
    args: list[str]
    mounts: list[tuple[Path, str]] = field(default_factory=list)  # read-only binds (host, container)
    id: str = ""
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.id = self.id or f"md-verify-{os.getpid()}-{self.bundle.name[-8:]}"

    @property
    def state_dir(self) -> Path:
        return self.bundle / "runc-state"

    @property
    def log_path(self) -> Path:
        return self.bundle / "container.log"

    def spec(self) -> dict[str, Any]:
        uid, _, gid = self.config.user.partition(":")
        tmpfs = ["nosuid", "nodev", "mode=1777"]
        mounts: list[dict[str, Any]] = [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": [*tmpfs, "size=268435456"],
            },
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"],
            },
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": tmpfs},
        ]
        for host, dest in self.mounts:
            mounts.append(
                {"destination": dest, "type": "bind", "source": str(host), "options": ["rbind", "ro"]}
            )
        return {
            "ociVersion": "1.0.2",
            "process": {
                "terminal": False,
                "user": {"uid": int(uid or 0), "gid": int(gid or uid or 0)},
                "args": self.args,
                "env": [f"{k}={v}" for k, v in self.config.env],
                "cwd": self.config.workdir or "/",
                "capabilities": {"bounding": [], "effective": [], "permitted": [], "ambient": []},
                "noNewPrivileges": True,
            },
            "root": {"path": "rootfs", "readonly": True},
            "hostname": "verify",
            "mounts": mounts,
            "linux": {
                "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")],
                "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
                "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
            },
        }

    def start(self) -> None:
        (self.bundle / "config.json").write_text(json.dumps(self.spec(), indent=1))
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                ["runc", "--root", str(self.state_dir), "run", "--bundle", str(self.bundle), self.id],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def kill(self, signal_name: str = "TERM") -> None:
        subprocess.run(
            ["runc", "--root", str(self.state_dir), "kill", self.id, signal_name],
            capture_output=True,
            check=False,
            timeout=30,
        )

    def remove(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill("KILL")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)
        subprocess.run(
            ["runc", "--root", str(self.state_dir), "delete", "--force", self.id],
            capture_output=True,
            check=False,
            timeout=30,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def run_once(rootfs_bundle: Path, config: ImageConfig, args: list[str], timeout: float = 120) -> str:
    """Run ``args`` in a container of the bundle to completion; its output, or ImageBuildError."""
    container = Container(rootfs_bundle, config, args)
    container.log_path.unlink(missing_ok=True)
    container.start()
    try:
        code = container.wait(timeout)
    finally:
        container.remove()
    if code != 0:
        raise ImageBuildError(f"{shlex.join(args)} exited {code} in the container:\n{container.output()}")
    return container.output()


def _verify_pause(bundle: Path, config: ImageConfig) -> str:
    container = Container(bundle, config, [*config.entrypoint])
    container.start()
    try:
        time.sleep(1.0)
        if container.process is not None and container.process.poll() is not None:
            raise ImageBuildError(f"pause exited early: {container.output()}")
        sent = time.monotonic()
        container.kill("TERM")
        code = container.wait(10)
    finally:
        container.remove()
    if code != 0:
        raise ImageBuildError(f"pause exited {code} on SIGTERM: {container.output()}")
    return f"pause ran as {config.user} and exited 0 on SIGTERM in {time.monotonic() - sent:.2f}s"


def _verify_triton(bundle: Path, config: ImageConfig) -> str:
    models = bundle / "models"
    (models / "add_one" / "1").mkdir(parents=True)
    (models / "add_one" / "config.pbtxt").write_text(_TEST_MODEL_CONFIG)
    (models / "add_one" / "1" / "model.py").write_text(_TEST_MODEL_PY)
    for path in [models, *models.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    http, grpc, metrics = free_ports(3)
    # the operator's container command (builders.triton_args), on free host ports
    args = [
        "tritonserver",
        "--model-repository=/models",
        "--model-control-mode=explicit",
        "--load-model=add_one",
        "--strict-readiness=true",
        "--exit-on-error=true",
        f"--http-port={http}",
        f"--grpc-port={grpc}",
        f"--metrics-port={metrics}",
        "--allow-metrics=true",
    ]
    container = Container(bundle, config, args, mounts=[(models, "/models")])
    container.start()
    url = f"http://127.0.0.1:{http}"
    started = time.monotonic()
    try:

        def exited() -> str | None:
            code = container.process.poll() if container.process else None
            return None if code is None else f"tritonserver exited {code}:\n{container.output()[-4000:]}"

        try:
            poll(
                lambda: True if http_get(f"{url}/v2/health/ready", timeout=2)[0] == 200 else None,
                timeout=120,
                interval=0.2,
                what="/v2/health/ready",
                abort=exited,
            )
        except (TimeoutError, RuntimeError) as err:
            raise ImageBuildError(f"{err}\n{container.output()[-4000:]}") from None
        ready = time.monotonic() - started
        if http_get(f"{url}/v2/models/add_one/versions/1/ready")[0] != 200:
            raise ImageBuildError("model add_one version 1 is not ready")
        body = json.dumps(
            {"inputs": [{"name": "INPUT0", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
        ).encode()
        status, answer = http_request("POST", f"{url}/v2/models/add_one/infer", body, timeout=30)
        if status != 200:
            raise ImageBuildError(f"inference answered {status}: {answer[:300]!r}")
        outputs = json.loads(answer)["outputs"][0]["data"]
        if outputs != [2, 3, 4, 5]:
            raise ImageBuildError(f"inference answered {outputs}, expected [2, 3, 4, 5]")
        version = json.loads(http_get(f"{url}/v2")[1])["version"]
        metrics_ok = http_get(f"http://127.0.0.1:{metrics}/metrics")[0] == 200
        container.kill("TERM")
        code = container.wait(60)
    finally:
        container.remove()
    return (
        f"tritonserver {version} as {config.user}, read-only root: ready in {ready:.1f}s, "
        f"add_one([1,2,3,4]) = {outputs}, metrics {'200' if metrics_ok else 'unavailable'}, "
        f"exit {code} on SIGTERM"
    )


def _verify_operator(bundle: Path, config: ImageConfig) -> str:
    version = run_once(bundle, config, [*config.entrypoint, "--version"]).strip()
    run_once(bundle, config, ["modeldeploy-operator", "run", "--help"])
    python = run_once(
        bundle, config, ["python", "-c", "import sys; print(sys.executable, sys.version.split()[0])"]
    )
    return (
        f"modeldeploy --version: {version!r}; modeldeploy-operator run --help: ok; python: {python.strip()}"
    )


_VERIFIERS: dict[str, Callable[[Path, ImageConfig], str]] = {
    "pause": _verify_pause,
    "triton": _verify_triton,
    "operator": _verify_operator,
}


def verify(image: BuiltImage) -> str:
    """Run the built image with runc (see the module docstring); what was seen, or ImageBuildError."""
    _require_root()
    if shutil.which("runc") is None:
        raise ImageBuildError("runc is not installed (hack/install-node-deps.sh)")
    with tempfile.TemporaryDirectory(prefix=f".verify-{image.name}-", dir=images_dir()) as tmpdir:
        bundle = Path(tmpdir)
        bundle.chmod(0o755)
        extract_layer(image.archive, bundle / "rootfs")
        config = CONFIGS[image.name]
        return _VERIFIERS[image.name](bundle, config)


# --------------------------------------------------------------------------- CLI


def _names(values: Sequence[str]) -> list[str]:
    if not values or "all" in values:
        return list(NAMES)
    unknown = [v for v in values if v not in NAMES]
    if unknown:
        raise SystemExit(f"unknown image(s) {', '.join(unknown)}; known: all, {', '.join(NAMES)}")
    return list(dict.fromkeys(values))


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_build = sub.add_parser("build", help="build (or find cached) images; prints ref, size, seconds")
    p_build.add_argument("names", nargs="*", metavar="NAME", help="all (default), pause, triton, operator")
    p_ref = sub.add_parser("ref", help="print an image's reference (computed from its inputs, no build)")
    p_ref.add_argument("name", choices=NAMES)
    p_verify = sub.add_parser("verify", help="build if needed, then run the images with runc")
    p_verify.add_argument("names", nargs="*", metavar="NAME")
    p_import = sub.add_parser("import", help="build if needed, then ctr images import into containerd")
    p_import.add_argument("--ctr", type=Path, required=True)
    p_import.add_argument("--address", type=Path, required=True)
    p_import.add_argument("--namespace", default="k8s.io")
    p_import.add_argument("names", nargs="+", metavar="NAME")
    sub.add_parser("prune", help="remove cached archives of inputs that are no longer current")
    args = parser.parse_args(argv)

    def progress(msg: str) -> None:
        print(f"[images] {msg}", file=sys.stderr, flush=True)

    try:
        if args.cmd == "ref":
            print(ref(args.name))
            return 0
        if args.cmd == "prune":
            for path in prune():
                print(f"removed {path}")
            return 0
        for name in _names(args.names):
            image = build(name, progress=progress)
            print(image.describe(), flush=True)
            if args.cmd == "verify":
                print(f"  verified: {verify(image)}", flush=True)
            elif args.cmd == "import":
                started = time.monotonic()
                import_into(args.ctr, args.address, image.archive, args.namespace)
                if not is_imported(args.ctr, args.address, image.ref, args.namespace):
                    raise ImageBuildError(f"{image.ref} is not listed after the import")
                took = time.monotonic() - started
                print(f"  imported into {args.address} ({args.namespace}) in {took:.1f}s")
    except ImageBuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main())
