"""hack/images.py without building anything: the OCI archive writer, the operator image against the
Dockerfile (no drift), and the references computed from the inputs."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import tarfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from hackmods import REPO_ROOT


@pytest.fixture(scope="module")
def images() -> ModuleType:
    from hack import images

    return images


# --------------------------------------------------------------------------- OCI archive writer


def _tiny_root(base: Path) -> Path:
    root = base / "rootfs"
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "dev").mkdir()
    (root / "tmp").mkdir(mode=0o1777)
    (root / "tmp").chmod(0o1777)
    (root / "usr" / "bin" / "hello").write_text("#!/bin/sh\necho hello\n")
    (root / "usr" / "bin" / "hello").chmod(0o755)
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (root / "etc" / "zz-last").write_text("z\n")
    (root / "etc" / "a-first").write_text("a\n")
    os.link(root / "etc" / "passwd", root / "etc" / "passwd-hardlink")
    (root / "bin").symlink_to("usr/bin")
    (root / "dev" / "null-ish").write_text("under /dev: left out\n")
    os.mkfifo(root / "etc" / "fifo")
    if os.geteuid() == 0:
        os.chown(root / "etc" / "zz-last", 1234, 5678, follow_symlinks=False)
    return root


def _blob(layout: Path, digest: str) -> bytes:
    algo, hexdigest = digest.split(":", 1)
    assert algo == "sha256"
    data = (layout / "blobs" / "sha256" / hexdigest).read_bytes()
    assert hashlib.sha256(data).hexdigest() == hexdigest, f"blob {digest} does not match its name"
    return data


def test_oci_archive_is_a_valid_deterministic_layout(images: ModuleType, tmp_path: Path) -> None:
    root = _tiny_root(tmp_path)
    config = images.ImageConfig(
        entrypoint=("/usr/bin/hello",),
        cmd=("--loud",),
        env=(("PATH", "/usr/bin:/bin"), ("HOME", "/tmp")),
        user="1000:1000",
        workdir="/tmp",
        exposed_ports=("8080/tcp",),
        labels=(("org.opencontainers.image.title", "tiny"),),
    )
    reference = "modeldeploy.local/tiny:0123456789ab"
    first = images.write_oci_archive(root, config, reference, tmp_path / "one.oci.tar")
    os.utime(root / "etc" / "passwd", (1_000_000, 1_000_000))  # mtimes do not matter
    second = images.write_oci_archive(root, config, reference, tmp_path / "two.oci.tar")
    one, two = (tmp_path / "one.oci.tar").read_bytes(), (tmp_path / "two.oci.tar").read_bytes()
    assert one == two, "the same root gave two different archives"
    assert first.manifest_digest == second.manifest_digest
    assert not list(tmp_path.glob(".one.oci.tar-*")), "temporary files left behind"

    layout = tmp_path / "layout"
    with tarfile.open(tmp_path / "one.oci.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == sorted(m.name for m in members)
        assert all(m.mtime == 0 and m.uid == 0 for m in members)
        tar.extractall(layout, filter="data")
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_text())
    assert index["schemaVersion"] == 2
    assert index["mediaType"] == images.INDEX_MEDIA_TYPE
    [desc] = index["manifests"]
    assert desc["annotations"] == {
        "io.containerd.image.name": reference,
        "org.opencontainers.image.ref.name": "0123456789ab",
    }
    assert desc["platform"] == {"architecture": "amd64", "os": "linux"}
    manifest_bytes = _blob(layout, desc["digest"])
    assert len(manifest_bytes) == desc["size"]
    manifest = json.loads(manifest_bytes)
    assert manifest["mediaType"] == images.MANIFEST_MEDIA_TYPE
    config_bytes = _blob(layout, manifest["config"]["digest"])
    assert len(config_bytes) == manifest["config"]["size"]
    image_config = json.loads(config_bytes)
    assert image_config["architecture"] == "amd64" and image_config["os"] == "linux"
    assert image_config["config"] == {
        "Entrypoint": ["/usr/bin/hello"],
        "Cmd": ["--loud"],
        "Env": ["PATH=/usr/bin:/bin", "HOME=/tmp"],
        "User": "1000:1000",
        "WorkingDir": "/tmp",
        "ExposedPorts": {"8080/tcp": {}},
        "Labels": {"org.opencontainers.image.title": "tiny"},
    }
    [layer_desc] = manifest["layers"]
    assert layer_desc["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    layer_gz = _blob(layout, layer_desc["digest"])
    assert len(layer_gz) == layer_desc["size"]
    assert layer_gz[4:8] == b"\0\0\0\0", "gzip header mtime must be 0"
    layer = gzip.decompress(layer_gz)
    assert image_config["rootfs"] == {
        "type": "layers",
        "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()],
    }
    assert first.unpacked_size == len(layer)

    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        entries = {m.name: m for m in tar.getmembers()}
        names = [m.name for m in tar.getmembers()]
    assert names == [
        "bin",
        "dev",
        "etc",
        "etc/a-first",
        "etc/passwd",
        "etc/passwd-hardlink",
        "etc/zz-last",
        "tmp",
        "usr",
        "usr/bin",
        "usr/bin/hello",
    ]
    assert all(m.mtime == 0 and m.uname == "" and m.gname == "" for m in entries.values())
    assert entries["bin"].issym() and entries["bin"].linkname == "usr/bin"
    assert entries["etc/passwd-hardlink"].islnk() and entries["etc/passwd-hardlink"].linkname == "etc/passwd"
    assert entries["usr/bin/hello"].mode & 0o777 == 0o755
    assert entries["tmp"].mode & 0o7777 == 0o1777
    if os.geteuid() == 0:
        assert (entries["etc/zz-last"].uid, entries["etc/zz-last"].gid) == (1234, 5678)


def test_oci_archive_changes_with_content(images: ModuleType, tmp_path: Path) -> None:
    root = _tiny_root(tmp_path)
    config = images.ImageConfig(entrypoint=("/usr/bin/hello",))
    first = images.write_oci_archive(root, config, "modeldeploy.local/t:1", tmp_path / "a.tar")
    (root / "etc" / "a-first").write_text("b\n")
    second = images.write_oci_archive(root, config, "modeldeploy.local/t:1", tmp_path / "b.tar")
    assert first.diff_id != second.diff_id
    assert first.manifest_digest != second.manifest_digest


# --------------------------------------------------------------------------- Dockerfile drift


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of every stage, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for raw in (REPO_ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, rest = current.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    return instructions


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in _dockerfile_instructions():
        if keyword == "FROM":
            stages.append([])
        elif stages:
            stages[-1].append((keyword, rest))
    return stages


def _kv_pairs(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in shlex.split(text))


def _one(stage: list[tuple[str, str]], keyword: str) -> str:
    values = [rest for kw, rest in stage if kw == keyword]
    assert len(values) == 1, f"{keyword}: {values}"
    return values[0]


def _run_commands(stage: list[tuple[str, str]]) -> list[list[str]]:
    commands: list[list[str]] = []
    for kw, rest in stage:
        if kw == "RUN":
            commands += [shlex.split(part) for part in rest.split("&&")]
    return commands


def test_operator_image_matches_the_dockerfile(images: ModuleType) -> None:
    build_stage, final = _stages()
    config: Any = images.OPERATOR_CONFIG
    assert json.loads(_one(final, "ENTRYPOINT")) == list(config.entrypoint)
    assert json.loads(_one(final, "CMD")) == list(config.cmd)
    assert _one(final, "USER") == config.user
    assert _one(final, "WORKDIR") == config.workdir
    assert sorted(f"{p}/tcp" for p in _one(final, "EXPOSE").split()) == sorted(config.exposed_ports)
    assert _kv_pairs(_one(final, "LABEL")) == dict(config.labels)

    docker_env = _kv_pairs(_one(final, "ENV"))
    image_env = config.env_dict()
    for key, value in docker_env.items():
        assert key in image_env, f"ENV {key} of the Dockerfile is not in the image"
        if value.endswith(":$PATH"):
            assert image_env[key].startswith(value.removesuffix("$PATH")), (key, image_env[key])
        else:
            assert image_env[key] == value, key
    # LANG=C.UTF-8 comes with the Dockerfile's python base image
    assert set(image_env) - set(docker_env) <= {"LANG"}

    # the same venv, the project installed with the batch worker's extra only
    commands = _run_commands(build_stage)
    assert ["python", "-m", "venv", images.OPERATOR_VENV] in commands
    installs = [c for c in commands if c[:2] == [f"{images.OPERATOR_VENV}/bin/pip", "install"]]
    assert [c[2:] for c in installs] == [[images.OPERATOR_INSTALL]]
    assert images.OPERATOR_INSTALL == ".[worker]"  # the project and the worker's libraries, no others
    assert any(c[0].endswith("/modeldeploy") and c[1:] == ["--version"] for c in commands)

    # the same user and group
    user: Any = images.OPERATOR_USER
    final_commands = _run_commands(final)
    [groupadd] = [c for c in final_commands if c[0] == "groupadd"]
    [useradd] = [c for c in final_commands if c[0] == "useradd"]
    assert groupadd[groupadd.index("--gid") + 1] == str(user.gid) and groupadd[-1] == user.name
    assert useradd[-1] == user.name
    assert useradd[useradd.index("--uid") + 1] == str(user.uid)
    assert useradd[useradd.index("--gid") + 1] == str(user.gid)
    assert useradd[useradd.index("--home-dir") + 1] == user.home
    assert useradd[useradd.index("--shell") + 1] == user.shell
    assert config.user == f"{user.uid}:{user.gid}"


def test_triton_image_is_an_ngc_drop_in(images: ModuleType) -> None:
    config: Any = images.TRITON_CONFIG
    env = config.env_dict()
    assert env["PATH"].split(":")[0] == "/opt/tritonserver/bin"
    assert env["LD_LIBRARY_PATH"] == "/opt/tritonserver/lib"
    assert env["HOME"] == "/tmp" and config.workdir == "/tmp"
    assert config.user == "1000:1000"  # the operator's pods run as 1000 (builders.RESTRICTED_POD_SECURITY)
    assert not config.entrypoint, "the operator's command starts with tritonserver itself"
    assert {"libstdc++6", "python3", "libpython3.11", "python3-numpy"} <= set(images.TRITON_PACKAGES)


# --------------------------------------------------------------------------- references


def _fake_project(base: Path) -> Path:
    project = base / "project"
    (project / "hack" / "images").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "hack" / "images" / "pause.c", project / "hack" / "images" / "pause.c")
    shutil.copy(REPO_ROOT / "pyproject.toml", project / "pyproject.toml")
    (project / "README.md").write_text("readme\n")
    (project / "operator" / "modeldeploy").mkdir(parents=True)
    (project / "operator" / "modeldeploy" / "__init__.py").write_text('__version__ = "0.1.0"\n')
    (project / "operator" / "modeldeploy" / "__pycache__").mkdir()
    (project / "operator" / "modeldeploy" / "__pycache__" / "x.pyc").write_bytes(b"junk")
    return project


REF = re.compile(r"^modeldeploy\.local/(pause|triton|operator):[0-9a-f]{12}$")


def test_ref_is_stable_and_follows_the_inputs(
    images: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = _fake_project(tmp_path)
    pause, operator = images.ref("pause", project), images.ref("operator", project)
    assert REF.match(pause) and REF.match(operator)
    assert pause.startswith("modeldeploy.local/pause:") and operator.startswith("modeldeploy.local/operator:")
    assert images.ref("pause", project) == pause and images.ref("operator", project) == operator

    # byte code and other build leftovers are no input
    (project / "operator" / "modeldeploy" / "__pycache__" / "x.pyc").write_bytes(b"other junk")
    assert images.ref("operator", project) == operator

    (project / "operator" / "modeldeploy" / "cli.py").write_text("print('new')\n")
    changed = images.ref("operator", project)
    assert changed != operator
    assert images.ref("pause", project) == pause, "the pause image does not depend on the project's code"

    with (project / "hack" / "images" / "pause.c").open("a") as fh:
        fh.write("/* changed */\n")
    assert images.ref("pause", project) != pause

    monkeypatch.setattr(images, "OPERATOR_PACKAGES", (*images.OPERATOR_PACKAGES, "curl"))
    assert images.ref("operator", project) != changed

    monkeypatch.setattr(images, "SUITE", "trixie")
    assert images.ref("operator", project) not in (operator, changed)


def test_ref_follows_the_pinned_requirements(
    images: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = _fake_project(tmp_path)
    pins = images.pinned_requirements(project)
    assert any(p.startswith("kopf==") for p in pins) and any(p.startswith("pydantic-core==") for p in pins)
    assert not any(p.startswith(("pytest==", "ruff==", "nvidia-pytriton==")) for p in pins), "no test extras"
    before = images.ref("operator", project)
    monkeypatch.setattr(images, "pinned_requirements", lambda _project: [*pins, "extra-pkg==1.0"])
    assert images.ref("operator", project) != before


def test_the_operator_image_has_no_kubernetes_client_library(images: ModuleType) -> None:
    # kopf imports whichever of these is installed (10 MiB of RSS at start for the official client); the
    # operator uses none, and only the plugin's and the tests' extras bring one.
    pins = images.pinned_requirements(REPO_ROOT)
    names = {p.split("==")[0] for p in pins}
    assert "kopf" in names
    assert not names & {"kubernetes", "kubernetes-asyncio", "pykube-ng", "pykube"}, pins
    # the batch worker's client is there (the operator process never imports it)
    assert {"tritonclient", "numpy"} <= names, pins


def test_ref_follows_the_recipe(images: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = _fake_project(tmp_path)
    assert "def _build_operator_root" in images._recipe_source("operator")
    assert "def write_layer" in images._recipe_source("pause")
    before = images.ref("operator", project)
    monkeypatch.setitem(images._SCRIPTS, "operator", images._SCRIPTS["operator"] + "\n# changed\n")
    assert images.ref("operator", project) != before


def test_triton_ref_follows_its_packages(images: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        before = images.ref("triton")
    except images.ImageBuildError as err:
        pytest.skip(f"nvidia-pytriton is not installed: {err}")
    assert REF.match(before) and images.ref("triton") == before
    monkeypatch.setattr(images, "TRITON_PACKAGES", (*images.TRITON_PACKAGES, "curl"))
    assert images.ref("triton") != before


def test_archive_path_and_reference_share_the_hash(images: ModuleType, tmp_path: Path) -> None:
    project = _fake_project(tmp_path)
    digest = images.content_hash(images.image_inputs("pause", project))
    assert images.ref("pause", project).endswith(":" + digest[:12])
    assert images.archive_path("pause", digest).name == f"pause-{digest[:16]}.oci.tar"
