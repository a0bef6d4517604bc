"""Every storage scheme the API accepts, fetched by the real stager from a real server, then served.

Servers, all on 127.0.0.1 (built once, pinned, cached; see hack/storage-emulators.sh):

* ``s3://``: moto (hack/s3server.py) with request authentication on (every request must carry a valid
  Signature V4 of the IAM user boto3 created); a second moto, authentication off, for web identity:
  the stager exchanges the token with moto's STS (AssumeRoleWithWebIdentity), and moto refuses that
  unsigned call (an HTTP 500) once its authentication is on, so there S3 cannot also check the
  signature made with the STS-issued keys.
* ``gs://``: fake-gcs-server (Go module). It checks no credentials: the service-account key path is
  exercised up to the signed request, not verified by the server.
* ``as://``: Azurite (npm) with its SharedKey and SAS checks; containers, blobs and an account SAS
  made by Azure's JavaScript SDK.
* ``https://``: an archive server with a throwaway CA, trusted through ``ca.crt`` in the Secret.
* ``pvc://``: a directory standing in for the mounted claim.

Each case runs ``python -m modeldeploy stage`` as the init container does (settings from a
credentials directory laid out like the mounted Secret, or from the environment), with and without
``spec.model.config`` (a repository without config.pbtxt gets the rendered one), serves the result
with the real tritonserver and infers. Credentials never appear in the stager's output.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient

from hack import s3server
from hack import storage_emulators as emulators
from hackmods import unavailable
from storagekit import (
    FACTOR,
    MODEL,
    ArchiveServer,
    clean_env,
    make_tls,
    rendered_config,
    service_account_key,
    write_archive,
    write_repo,
)

pytestmark = pytest.mark.triton


FIGURES: list[str] = []


@dataclass
class Servers:
    """Every server, each holding ``full/`` (with config.pbtxt) and ``bare/`` (without) of the model."""

    work: Path
    s3: Any
    s3_key: Any
    s3_open: Any
    gcs: Any
    azure: Any
    azure_sas: str
    https: ArchiveServer
    tls: Any
    pvc_root: Path
    secrets: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    work = tmp_path_factory.mktemp("storage")
    upload = work / "upload"
    write_repo(upload / "full", with_config=True)
    write_repo(upload / "bare", with_config=False)
    try:
        python = s3server.ensure_moto()
        gcs_bin = emulators.ensure("fake-gcs-server")
        azurite_bin = emulators.ensure("azurite")
    except (s3server.S3ServerUnavailable, emulators.EmulatorUnavailable) as err:
        unavailable(f"storage emulator unavailable: {err}")
    gcs_data = work / "gcs-data" / "models"
    for variant in ("full", "bare"):
        write_repo(gcs_data / variant, with_config=variant == "full")
    archives = work / "archives"
    archives.mkdir()
    for variant in ("full", "bare"):
        write_archive(archives / f"{variant}.tar.gz", upload / variant)
    pvc_root = work / "pvc"
    for variant in ("full", "bare"):
        write_repo(pvc_root / variant, with_config=variant == "full")
    tls = make_tls(work / "tls", ["127.0.0.1"])
    with (
        s3server.S3Server.start(python, work / "moto") as s3,
        s3server.S3Server.start(python, work / "moto-open") as s3_open,
        emulators.FakeGcsServer.start(gcs_bin, work / "gcs", data=work / "gcs-data") as gcs,
        emulators.Azurite.start(azurite_bin, work / "azurite") as azure,
        ArchiveServer(archives, tls=tls) as https,
    ):
        key = s3.setup(bucket="models", upload=upload, prefix="")
        s3_open.setup(bucket="models", upload=upload, prefix="")
        s3.enforce_auth()
        sas = azure.setup(container="models", upload=upload, prefix="")
        print(
            f"\nready: moto {s3.ready_seconds:.2f}s, fake-gcs-server {gcs.ready_seconds:.2f}s, "
            f"azurite {azure.ready_seconds:.2f}s"
        )
        yield Servers(work, s3, key, s3_open, gcs, azure, sas, https, tls, pvc_root)
    for line in FIGURES:
        print(f"[figure] {line}")


@dataclass
class Case:
    """One way to reach the storage: URI, Secret files, environment."""

    uri: str
    files: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    secrets: list[str] = field(default_factory=list)
    how: str = ""  # expected in the stager's summary


def _s3_static(s: Servers, v: str) -> Case:
    k = s.s3_key
    files = {"AWS_ACCESS_KEY_ID": k.access_key, "AWS_SECRET_ACCESS_KEY": k.secret_key}
    files["AWS_ENDPOINT_URL"] = s.s3.endpoint
    return Case(f"s3://models/{v}", files, secrets=[k.secret_key], how="static keys from file")


def _s3_triton_form(s: Servers, v: str) -> Case:
    k = s.s3_key
    env = {"AWS_ACCESS_KEY_ID": k.access_key, "AWS_SECRET_ACCESS_KEY": k.secret_key, "S3_USE_HTTPS": "0"}
    uri = f"s3://{s.s3.host}:{s.s3.port}/models/{v}"
    return Case(uri, env=env, secrets=[k.secret_key], how="static keys from environment")


def _s3_profile(s: Servers, v: str) -> Case:
    k = s.s3_key
    creds = f"[models]\naws_access_key_id = {k.access_key}\naws_secret_access_key = {k.secret_key}\n"
    files = {"credentials": creds, "config": "[profile models]\nregion = us-east-1\n"}
    env = {"AWS_PROFILE": "models", "AWS_ENDPOINT_URL": s.s3.endpoint}
    return Case(f"s3://models/{v}", files, env, [k.secret_key], how="static keys from profile models")


def _s3_web_identity(s: Servers, v: str) -> Case:
    token = s.work / "eks-token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6bWw6c3RhZ2VyIn0.c2ln")
    env = {
        "AWS_WEB_IDENTITY_TOKEN_FILE": str(token),
        "AWS_ROLE_ARN": "arn:aws:iam::123456789012:role/model-reader",
        "AWS_ENDPOINT_URL": s.s3_open.endpoint,  # S3 and STS (the SDKs' shared endpoint variable)
    }
    return Case(f"s3://models/{v}", env=env, secrets=[token.read_text()], how="web identity")


def _gs_service_account(s: Servers, v: str) -> Case:
    sa = service_account_key()
    files = {"service-account.json": sa, "STORAGE_EMULATOR_HOST": s.gcs.endpoint}
    return Case(
        f"gs://models/{v}", files, secrets=[sa.split("PRIVATE KEY-----")[1][:64]], how="service account"
    )


def _gs_unsigned(s: Servers, v: str) -> Case:
    return Case(f"gs://models/{v}", env={"STORAGE_EMULATOR_HOST": s.gcs.endpoint}, how="unsigned")


def _as_key(s: Servers, v: str) -> Case:
    key = emulators.AZURITE_KEY
    files = {"AZURE_STORAGE_ACCOUNT_KEY": key, "AZURE_STORAGE_ENDPOINT": s.azure.endpoint}
    return Case(f"as://{emulators.AZURITE_ACCOUNT}/models/{v}", files, secrets=[key], how="account key")


def _as_connection_string(s: Servers, v: str) -> Case:
    files = {"AZURE_STORAGE_CONNECTION_STRING": s.azure.connection_string}
    uri = f"as://{emulators.AZURITE_ACCOUNT}/models/{v}"
    return Case(uri, files, secrets=[emulators.AZURITE_KEY], how="the connection string")


def _as_sas(s: Servers, v: str) -> Case:
    files = {"AZURE_STORAGE_SAS_TOKEN": s.azure_sas, "AZURE_STORAGE_ENDPOINT": s.azure.endpoint}
    sig = s.azure_sas.split("sig=")[1].split("&")[0]
    uri = f"as://{emulators.AZURITE_ACCOUNT}/models/{v}"
    return Case(uri, files, secrets=[s.azure_sas, sig], how="SAS token")


def _https(s: Servers, v: str) -> Case:
    return Case(s.https.url(f"{v}.tar.gz"), {"ca.crt": s.tls.ca_cert.read_text()}, how="unpacked")


def _pvc(s: Servers, v: str) -> Case:
    return Case(f"pvc://claim/{v}", how="copied")


CASES: dict[str, Callable[[Servers, str], Case]] = {
    "s3-static-secret": _s3_static,
    "s3-triton-host-port-uri": _s3_triton_form,
    "s3-profile": _s3_profile,
    "s3-web-identity-sts": _s3_web_identity,
    "gs-service-account": _gs_service_account,
    "gs-emulator-unsigned": _gs_unsigned,
    "as-account-key": _as_key,
    "as-connection-string": _as_connection_string,
    "as-sas": _as_sas,
    "https-private-ca": _https,
    "pvc": _pvc,
}


def stage(
    s: Servers, case: Case, dest: Path, *, with_config: bool, tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "modeldeploy", "stage", f"--uri={case.uri}", f"--dest={dest}"]
    argv += [f"--model={MODEL}", "--version=1", f"--pvc-root={s.pvc_root}"]
    if case.files:
        creds = tmp_path / "secret"
        creds.mkdir()
        for name, value in case.files.items():
            (creds / name).write_text(value)
        argv.append(f"--credentials-dir={creds}")
    if with_config:
        cfg = tmp_path / "config.pbtxt"
        cfg.write_text(rendered_config())
        argv.append(f"--config={cfg}")
    env = clean_env(HOME=str(tmp_path), **case.env)  # no ~/.aws of the machine
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180, check=False)


def infer(server: Any) -> None:
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


@pytest.mark.parametrize("with_config", [False, True], ids=["repo-config", "spec-model-config"])
@pytest.mark.parametrize("name", list(CASES))
def test_stage_then_serve(
    name: str, with_config: bool, servers: Servers, triton_server: Any, tmp_path: Path
) -> None:
    """``spec-model-config``: the repository has no config.pbtxt, the stager installs the rendered one;
    ``repo-config``: the repository brings its own (no spec.model.config)."""
    case = CASES[name](servers, "bare" if with_config else "full")
    dest = tmp_path / "models"
    t0 = time.monotonic()
    proc = stage(servers, case, dest, with_config=with_config, tmp_path=tmp_path)
    seconds = time.monotonic() - t0
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert case.how in proc.stdout, proc.stdout
    for secret in case.secrets:
        assert secret not in output
    assert (dest / MODEL / "config.pbtxt").read_text().strip()
    assert (dest / MODEL / "1" / "model.py").is_file()
    FIGURES.append(f"stage {name} ({'bare+config' if with_config else 'full'}): {seconds:.2f}s")
    print(f"\n{proc.stdout.strip()}\n(stager process {seconds:.2f}s)")
    infer(triton_server(dest))


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize(
    ("name", "break_it", "needles"),
    [
        (
            "s3-static-secret",
            lambda c: c.files.update(AWS_SECRET_ACCESS_KEY="wrongSECRETvalue0123456789"),
            ["403", "SignatureDoesNotMatch", "spec.model.credentialsSecret"],
        ),
        (
            "as-account-key",
            lambda c: c.files.update(AZURE_STORAGE_ACCOUNT_KEY="d3Jvbmd3cm9uZ3dyb25nd3Jvbmd3cm9uZw=="),
            ["403", "AuthorizationFailure", "spec.model.credentialsSecret"],
        ),
        (
            "as-sas",
            lambda c: c.files.update(AZURE_STORAGE_SAS_TOKEN=c.files["AZURE_STORAGE_SAS_TOKEN"] + "x"),
            ["403", "spec.model.credentialsSecret"],
        ),
        ("https-private-ca", lambda c: c.files.clear(), ["CERTIFICATE_VERIFY_FAILED", "ca.crt"]),
        (
            "gs-emulator-unsigned",
            lambda c: setattr(c, "uri", "gs://no-such-bucket/full"),
            # fake-gcs-server answers 500 where GCS answers 404; the message is the same
            ["gs://no-such-bucket/full", "no bucket named no-such-bucket", "spec.model.storageUri"],
        ),
        (
            "s3-web-identity-sts",
            lambda c: c.env.update(AWS_WEB_IDENTITY_TOKEN_FILE="/nonexistent/token"),
            ["/nonexistent/token does not exist", "AWS_WEB_IDENTITY_TOKEN_FILE"],
        ),
    ],
    ids=[
        "s3-wrong-secret",
        "as-wrong-key",
        "as-bad-sas",
        "https-untrusted-ca",
        "gs-no-bucket",
        "s3-no-token",
    ],
)
def test_failures_say_what_to_fix_and_never_show_credentials(
    name: str, break_it: Callable[[Case], None], needles: list[str], servers: Servers, tmp_path: Path
) -> None:
    case = CASES[name](servers, "full")
    secrets = [*case.secrets, *case.files.values()]
    break_it(case)
    secrets += [v for k, v in case.files.items() if "KEY" in k or "TOKEN" in k]
    proc = stage(servers, case, tmp_path / "models", with_config=False, tmp_path=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    for secret in secrets:
        if len(secret) >= 8 and "://" not in secret and "\n" not in secret.strip():
            assert secret not in proc.stdout + proc.stderr, f"a credential leaked: {proc.stderr}"
