"""``modeldeploy render``: every object of a ModelDeployment, offline; bad manifests name the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from modeldeploy import cli, crdgen
from modeldeploy.modeldeployment import builders

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ROOT / ".venv" / "bin" / "python"
QUICKSTART = ROOT / "examples" / "quickstart.yaml"


def modeldeploy(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    python = str(PYTHON) if PYTHON.exists() else sys.executable
    return subprocess.run(
        [python, "-m", "modeldeploy", *args],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def manifest(tmp_path: Path, spec: dict[str, Any], *, name: str = "m", kind: str = "ModelDeployment") -> Path:
    path = tmp_path / "md.yaml"
    path.write_text(
        yaml.safe_dump(
            {"apiVersion": "modeldeploy.io/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec}
        )
    )
    return path


GOOD_MODEL = {"format": "onnx", "storageUri": "s3://models/repo", "version": 1}


@pytest.fixture(scope="module")
def quickstart() -> list[dict[str, Any]]:
    proc = modeldeploy("render", "-f", str(QUICKSTART))
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def test_render_quickstart_prints_a_deployment_and_three_services(quickstart: list[dict[str, Any]]) -> None:
    kinds = [o["kind"] for o in quickstart]
    assert kinds.count("Deployment") == 1
    assert kinds.count("Service") == 3
    assert set(kinds) == {"Deployment", "Service"}  # no config, no autoscaling, no PDB in the quickstart
    names = {o["metadata"]["name"] for o in quickstart if o["kind"] == "Service"}
    assert names == {"resnet50", "resnet50-stable", "resnet50-canary"}


def test_render_quickstart_deployment(quickstart: list[dict[str, Any]]) -> None:
    (dep,) = [o for o in quickstart if o["kind"] == "Deployment"]
    assert dep["apiVersion"] == "apps/v1"
    assert dep["metadata"]["name"].startswith("resnet50-")
    assert dep["metadata"]["namespace"] == "default"
    assert dep["spec"]["replicas"] == 2
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["requests"] == {"cpu": "2", "memory": "4Gi"}
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/models/resnet50/versions/1/ready"
    rev = dep["metadata"]["labels"][builders.LABEL_REVISION]
    assert dep["metadata"]["name"] == f"resnet50-{rev}"


def test_render_is_deterministic_and_takes_the_namespace(tmp_path: Path) -> None:
    first = modeldeploy("render", "-f", str(QUICKSTART), "-n", "ml")
    second = modeldeploy("render", "-f", "-", "-n", "ml", stdin=QUICKSTART.read_text())
    assert first.returncode == second.returncode == 0
    assert first.stdout == second.stdout
    assert all(o["metadata"]["namespace"] == "ml" for o in yaml.safe_load_all(first.stdout) if o)


def test_render_bad_manifest_exits_1_naming_the_field(tmp_path: Path) -> None:
    proc = modeldeploy("render", "-f", str(manifest(tmp_path, {"model": GOOD_MODEL, "replica": 2})))
    assert proc.returncode == 1
    assert "spec.replica" in proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"model": {**GOOD_MODEL, "storageUri": "ftp://x/y"}}, "spec.model.storageUri"),
        ({"model": {**GOOD_MODEL, "format": "keras"}}, "spec.model.format"),
        ({"model": {k: v for k, v in GOOD_MODEL.items() if k != "version"}}, "spec.model.version"),
        ({"model": GOOD_MODEL, "replicas": -3}, "spec.replicas"),
        ({"model": GOOD_MODEL, "rollout": {"steps": [{"weight": 150}]}}, "spec.rollout.steps.0.weight"),
        ({"model": GOOD_MODEL, "server": {"shmSize": "big"}}, "spec.server.shmSize"),
        ({"replicas": 1}, "spec.model"),
    ],
)
def test_render_bad_fields(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], spec: dict[str, Any], field: str
) -> None:
    rc = cli.main(["render", "-f", str(manifest(tmp_path, spec))])
    out, err = capsys.readouterr()
    assert rc == 1
    assert f"error: {field}:" in err
    assert out == ""


def test_render_wrong_kind_exits_1(tmp_path: Path) -> None:
    proc = modeldeploy("render", "-f", str(manifest(tmp_path, {"model": GOOD_MODEL}, kind="Deployment")))
    assert proc.returncode == 1
    assert "kind must be ModelDeployment" in proc.stderr


def test_render_missing_name_is_a_clean_error(tmp_path: Path) -> None:
    path = tmp_path / "md.yaml"
    path.write_text(yaml.safe_dump({"kind": "ModelDeployment", "spec": {"model": GOOD_MODEL}}))
    proc = modeldeploy("render", "-f", str(path))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "metadata.name" in proc.stderr


def test_render_everything_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = {
        "model": {**GOOD_MODEL, "config": {"maxBatchSize": 4}},
        "autoscaling": {"maxReplicas": 4, "pendingRequests": 8},
        "podDisruptionBudget": {},
    }
    assert cli.main(["render", "-f", str(manifest(tmp_path, spec))]) == 0
    objs = [o for o in yaml.safe_load_all(capsys.readouterr().out) if o]
    kinds = [o["kind"] for o in objs]
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "Service",
        "Service",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    ]
    (dep,) = [o for o in objs if o["kind"] == "Deployment"]
    assert "replicas" not in dep["spec"]  # the HPA owns them
    (hpa,) = [o for o in objs if o["kind"] == "HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]


def test_crd_command_prints_the_generated_crd(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["crd"]) == 0
    assert capsys.readouterr().out == crdgen.render_crd_yaml()
