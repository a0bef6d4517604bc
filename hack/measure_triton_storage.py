#!/usr/bin/env python3
"""Measure whether the tritonserver of the nvidia-pytriton wheel (the one in our Triton image) reads
s3://, gs:// and as:// model repositories itself, against local servers on 127.0.0.1.

Prints one line per attempt: the repository URI, the environment given, and whether the model
became ready (and when) or what happened instead. docs/storage.md quotes its results; they are
why every scheme is staged by the init container (builders.repository_path).

Usage: .venv/bin/python -m hack.measure_triton_storage [--wait 40]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hack import s3server, storage_emulators, triton
from hack.procutil import free_port, http_get, log_tail

CONFIG = """backend: "python"
max_batch_size: 0
input [{name: "X" data_type: TYPE_FP32 dims: [1]}]
output [{name: "Y" data_type: TYPE_FP32 dims: [1]}]
"""
MODEL_PY = """import triton_python_backend_utils as pb
class TritonPythonModel:
    def execute(self, requests):
        return [pb.InferenceResponse([pb.Tensor("Y", pb.get_input_tensor_by_name(r, "X").as_numpy())])
                for r in requests]
"""


def attempt(dist: triton.TritonDist, uri: str, env: dict[str, str], wait: float, work: Path) -> str:
    port = free_port()
    argv = [
        str(dist.binary),
        f"--model-repository={uri}",
        f"--backend-directory={dist.backends_dir}",
        "--model-control-mode=explicit",
        "--load-model=m",
        f"--http-port={port}",
        f"--grpc-port={free_port()}",
        f"--metrics-port={free_port()}",
        "--exit-on-error=true",
    ]
    log = work / f"triton-{port}.log"
    t0 = time.monotonic()
    with log.open("wb") as fh:
        proc = subprocess.Popen(argv, env={**dist.env(), **env}, stdout=fh, stderr=subprocess.STDOUT)
        try:
            while time.monotonic() - t0 < wait and proc.poll() is None:
                if http_get(f"http://127.0.0.1:{port}/v2/models/m/ready", timeout=2)[0] == 200:
                    return f"model ready after {time.monotonic() - t0:.1f}s"
                time.sleep(0.2)
            if proc.poll() is not None:
                tail = " | ".join(log_tail(log, 3).splitlines())
                took = time.monotonic() - t0
                return f"tritonserver exited with {proc.returncode} after {took:.1f}s: {tail}"
            return f"not ready after {wait:.0f}s"
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    parser.add_argument("--wait", type=float, default=40.0, help="seconds to wait for the model")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="measure-triton-storage-"))
    try:
        repo = work / "repo"
        (repo / "m" / "1").mkdir(parents=True)
        (repo / "m" / "config.pbtxt").write_text(CONFIG)
        (repo / "m" / "1" / "model.py").write_text(MODEL_PY)
        gcs_data = work / "gcs" / "models"
        shutil.copytree(repo, gcs_data / "repo")
        dist = triton.prepare()
        python = s3server.ensure_moto()
        gcs_bin = storage_emulators.ensure("fake-gcs-server")
        with (
            s3server.S3Server.start(python, work / "moto") as s3,
            storage_emulators.FakeGcsServer.start(gcs_bin, work / "fgcs", data=work / "gcs") as gcs,
        ):
            key = s3.setup(bucket="models", upload=repo, prefix="repo")
            keys = {"AWS_ACCESS_KEY_ID": key.access_key, "AWS_SECRET_ACCESS_KEY": key.secret_key}
            keys["AWS_DEFAULT_REGION"] = "us-east-1"
            azure = {"AZURE_STORAGE_ACCOUNT": "acct", "AZURE_STORAGE_KEY": storage_emulators.AZURITE_KEY}
            attempts = [
                (f"s3://127.0.0.1:{s3.port}/models/repo", keys, "keys"),
                ("s3://models/repo", {**keys, "AWS_ENDPOINT_URL": s3.endpoint}, "keys, AWS_ENDPOINT_URL"),
                ("gs://models/repo", {"CLOUD_STORAGE_EMULATOR_ENDPOINT": gcs.endpoint}, "emulator endpoint"),
                ("as://acct/models/repo", azure, "account, key"),
            ]
            print(f"tritonserver of nvidia-pytriton {dist.version}")
            for uri, env, what in attempts:
                print(f"{uri} [{what}]: {attempt(dist, uri, env, args.wait, work)}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
