"""The init-container stager against real servers, its result loaded by a real tritonserver.

* s3://  : moto's S3 server (hack/s3server.py: PyPI package, private virtualenv, 127.0.0.1)
  with request authentication on: every request must carry a valid Signature V4 of the
  IAM user's key that boto3 created; the stager signs its own.
* http://: a tar.gz served by http.server from a thread on 127.0.0.1.
* pvc:// : a local directory standing in for the mounted claim.

Each time ``python -m modeldeploy stage`` runs as a subprocess (as in the init container),
the staged directory is served by tritonserver and answers an inference. Credentials
must never appear in the stager's output.
"""

from __future__ import annotations

import functools
import http.server
import io
import os
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient

from hack import s3server
from hackmods import unavailable
from modeldeploy import api
from modeldeploy.triton.config import render_config_pbtxt
from tritonmodels import scaler_py

pytestmark = pytest.mark.triton

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL = "staged"
FACTOR = 3

MODEL_PY = scaler_py(FACTOR)


def rendered_config() -> str:
    spec = api.ModelSpec.model_validate(
        {
            "format": "python",
            "storageUri": "s3://models/repo",
            "version": 1,
            "config": {
                "maxBatchSize": 4,
                "inputs": [{"name": "X", "dataType": "TYPE_FP32", "dims": [2]}],
                "outputs": [{"name": "Y", "dataType": "TYPE_FP32", "dims": [2]}],
            },
        }
    )
    return render_config_pbtxt(MODEL, spec)


def write_repo(root: Path, *, with_config: bool) -> Path:
    """A python-backend model repository: <root>/staged/{config.pbtxt,1/model.py}."""
    (root / MODEL / "1").mkdir(parents=True)
    (root / MODEL / "1" / "model.py").write_text(MODEL_PY)
    if with_config:
        (root / MODEL / "config.pbtxt").write_text(rendered_config())
    return root


def stage(
    uri: str, dest: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
    argv = [
        sys.executable,
        "-m",
        "modeldeploy",
        "stage",
        f"--uri={uri}",
        f"--dest={dest}",
        f"--model={MODEL}",
        "--version=1",
        *extra,
    ]
    return subprocess.run(
        argv, env={**base, **(env or {})}, capture_output=True, text=True, timeout=120, check=False
    )


def serve_and_infer(triton_server: Any, repo: Path) -> None:
    server = triton_server(repo)
    assert server.model_ready(MODEL, 1)
    client = httpclient.InferenceServerClient(server.http_address)
    try:
        x = np.array([[1.5, -2.0]], dtype=np.float32)
        inp = httpclient.InferInput("X", [1, 2], "FP32")
        inp.set_data_from_numpy(x)
        out = client.infer(MODEL, [inp], outputs=[httpclient.InferRequestedOutput("Y")])
        np.testing.assert_allclose(out.as_numpy("Y"), x * FACTOR)
    finally:
        client.close()


# --------------------------------------------------------------------------- s3


class S3:
    def __init__(self, server: Any, key: Any) -> None:
        self.server = server
        self.key = key

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.key.access_key,
            "AWS_SECRET_ACCESS_KEY": self.key.secret_key,
            "AWS_ENDPOINT_URL": self.server.endpoint,
            **extra,
        }

    def assert_no_secrets(self, proc: subprocess.CompletedProcess[str]) -> None:
        for secret in (self.key.access_key, self.key.secret_key):
            assert secret not in proc.stdout and secret not in proc.stderr


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3]:
    try:
        python = s3server.ensure_moto()
    except s3server.S3ServerUnavailable as err:
        unavailable(f"S3 server (moto) unavailable: {err}")
    work = tmp_path_factory.mktemp("s3")
    with s3server.S3Server.start(python, work / "server") as server:
        # the repository has no config.pbtxt: the stager installs the rendered one (why s3:// is staged)
        key = server.setup(
            bucket="models", upload=write_repo(work / "upload", with_config=False), prefix="repo"
        )
        server.enforce_auth()
        print(f"\nmoto S3 server ready in {server.ready_seconds:.2f}s at {server.endpoint}")
        yield S3(server, key)


def test_s3_stage_with_env_credentials_then_serve(
    s3: S3, triton_server: Any, tmp_path: Path, triton_launcher: ModuleType
) -> None:
    config = tmp_path / "config.pbtxt"
    config.write_text(rendered_config())
    dest = tmp_path / "models"
    proc = stage("s3://models/repo", dest, f"--config={config}", env=s3.env())
    assert proc.returncode == 0, proc.stderr
    s3.assert_no_secrets(proc)
    assert "2 objects" not in proc.stdout  # config.pbtxt was not in the bucket
    assert "1 objects" in proc.stdout and "static keys from environment AWS_SECRET_ACCESS_KEY" in proc.stdout
    assert (dest / MODEL / "config.pbtxt").read_text() == rendered_config()
    serve_and_infer(triton_server, dest)


def test_s3_stage_with_credentials_dir_and_triton_style_uri(
    s3: S3, triton_server: Any, tmp_path: Path
) -> None:
    creds = tmp_path / "secret"
    creds.mkdir()
    (creds / "AWS_ACCESS_KEY_ID").write_text(s3.key.access_key)
    (creds / "AWS_SECRET_ACCESS_KEY").write_text(s3.key.secret_key)
    config = tmp_path / "config.pbtxt"
    config.write_text(rendered_config())
    dest = tmp_path / "models"
    host_port = s3.server.endpoint.removeprefix("http://")
    proc = stage(
        f"s3://{host_port}/models/repo",
        dest,
        f"--config={config}",
        f"--credentials-dir={creds}",
        env={"S3_USE_HTTPS": "0"},
    )
    assert proc.returncode == 0, proc.stderr
    s3.assert_no_secrets(proc)
    assert "static keys from file AWS_SECRET_ACCESS_KEY of the credentials Secret" in proc.stdout
    serve_and_infer(triton_server, dest)


def test_s3_wrong_secret_is_refused_without_leaking_it(s3: S3, tmp_path: Path) -> None:
    wrong = "wrongSECRETvalue0123456789"
    proc = stage("s3://models/repo", tmp_path / "models", env=s3.env(AWS_SECRET_ACCESS_KEY=wrong))
    assert proc.returncode == 1
    assert "403" in proc.stderr and "SignatureDoesNotMatch" in proc.stderr, proc.stderr
    assert wrong not in proc.stdout + proc.stderr
    s3.assert_no_secrets(proc)
    assert "Traceback" not in proc.stderr


def test_s3_empty_prefix_is_an_error(s3: S3, tmp_path: Path) -> None:
    proc = stage("s3://models/nothing-here", tmp_path / "a", env=s3.env())
    assert proc.returncode == 1 and "no objects under the prefix" in proc.stderr
    s3.assert_no_secrets(proc)


# --------------------------------------------------------------------------- http(s) archive


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A directory served on http://127.0.0.1:<port>/ from a thread."""
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root))
    )
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def test_http_archive_stage_then_serve(
    http_dir: tuple[Path, str], triton_server: Any, tmp_path: Path
) -> None:
    www, base = http_dir
    repo = write_repo(tmp_path / "repo", with_config=True)
    with tarfile.open(www / "repo.tar.gz", "w:gz") as tar:
        tar.add(repo / MODEL, arcname=MODEL)
    dest = tmp_path / "models"
    proc = stage(f"{base}/repo.tar.gz", dest)
    assert proc.returncode == 0, proc.stderr
    assert "unpacked 4 archive members" in proc.stdout  # staged/, staged/1/, model.py, config.pbtxt
    serve_and_infer(triton_server, dest)


def test_http_archive_with_path_traversal_is_refused(http_dir: tuple[Path, str], tmp_path: Path) -> None:
    www, base = http_dir
    with tarfile.open(www / "evil.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo(f"{MODEL}/../../escaped.txt")
        payload = b"owned"
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    dest = tmp_path / "deep" / "models"
    proc = stage(f"{base}/evil.tar.gz", dest)
    assert proc.returncode == 1
    assert "'..' leaves the repository" in proc.stderr
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "deep" / "escaped.txt").exists()


def test_http_missing_archive(http_dir: tuple[Path, str], tmp_path: Path) -> None:
    _www, base = http_dir
    proc = stage(f"{base}/missing.tar.gz", tmp_path / "models")
    assert proc.returncode == 1 and "answered 404" in proc.stderr


# --------------------------------------------------------------------------- pvc


def test_pvc_stage_then_serve(triton_server: Any, tmp_path: Path) -> None:
    pvc_root = tmp_path / "claim"
    write_repo(pvc_root / "repositories" / "v1", with_config=True)
    dest = tmp_path / "models"
    proc = stage("pvc://model-claim/repositories/v1", dest, f"--pvc-root={pvc_root}")
    assert proc.returncode == 0, proc.stderr
    serve_and_infer(triton_server, dest)
