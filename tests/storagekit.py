"""Storage test kit shared by tests/triton/test_storage_schemes.py and tests/real/test_storage.py.

* :func:`write_repo`: a python-backend Triton repository (model ``staged``, Y = X * 3), with or
  without its config.pbtxt (without: the stager installs the one rendered from ``spec.model.config``);
* :class:`TlsFiles` / :func:`make_tls`: a throwaway CA and a server certificate for given IPs;
* :class:`ArchiveServer`: an HTTPS (or HTTP) server of tar.gz archives from a thread;
* :func:`service_account_key`: a Google service-account key file with a fresh RSA key;
* :func:`clean_env`: this process's environment without any cloud settings, so that a stager
  subprocess sees only what a test gives it.
"""

from __future__ import annotations

import datetime as dt
import functools
import http.server
import ipaddress
import json
import os
import ssl
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from modeldeploy import api
from modeldeploy.triton.config import render_config_pbtxt
from tritonmodels import scaler_py

MODEL = "staged"
FACTOR = 3
CLOUD_PREFIXES = ("AWS_", "S3_", "GOOGLE_", "STORAGE_EMULATOR_HOST", "AZURE_", "SSL_CERT")

MODEL_PY = scaler_py(FACTOR)

#: spec.model.config of the model (rendered into config.pbtxt when the repository has none)
MODEL_CONFIG = {
    "maxBatchSize": 4,
    "inputs": [{"name": "X", "dataType": "TYPE_FP32", "dims": [2]}],
    "outputs": [{"name": "Y", "dataType": "TYPE_FP32", "dims": [2]}],
    "instanceGroups": [{"kind": "KIND_CPU", "count": 1}],
}


def rendered_config() -> str:
    spec = api.ModelSpec.model_validate(
        {"format": "python", "storageUri": "s3://b/r", "version": 1, "config": MODEL_CONFIG}
    )
    return render_config_pbtxt(MODEL, spec)


def write_repo(root: Path, *, with_config: bool) -> Path:
    """``root/staged/1/model.py`` (+ ``root/staged/config.pbtxt`` when ``with_config``)."""
    (root / MODEL / "1").mkdir(parents=True, exist_ok=True)
    (root / MODEL / "1" / "model.py").write_text(MODEL_PY)
    if with_config:
        (root / MODEL / "config.pbtxt").write_text(rendered_config())
    return root


def write_archive(path: Path, repo: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(repo / MODEL, arcname=MODEL)
    return path


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLOUD_PREFIXES)}
    return {**env, **extra}


# --------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    cert: Path
    key: Path


def make_tls(workdir: Path, ips: list[str]) -> TlsFiles:
    """A CA (``ca.crt``) and a server certificate for ``ips`` signed by it, valid for a day."""
    workdir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("modeldeploy test CA"))
        .issuer_name(name("modeldeploy test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name(ips[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(workdir / "ca.crt", workdir / "server.crt", workdir / "server.key")
    files.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return files


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class ArchiveServer:
    """Serves ``directory`` over HTTPS (``tls``) or HTTP on ``host``, from a thread."""

    def __init__(self, directory: Path, *, host: str = "127.0.0.1", tls: TlsFiles | None = None) -> None:
        handler = functools.partial(_Quiet, directory=str(directory))
        self.httpd = http.server.ThreadingHTTPServer((host, 0), handler)
        self.scheme = "http"
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(tls.cert, tls.key)
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
            self.scheme = "https"
        self.host = host
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        return f"{self.scheme}://{self.host}:{self.port}/{name}"

    def __enter__(self) -> ArchiveServer:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


# --------------------------------------------------------------------------- Google


def service_account_key(email: str = "stager@modeldeploy-test.iam.gserviceaccount.com") -> str:
    """A Google service-account key file (JSON) holding a fresh RSA key (fake-gcs-server does not
    check signatures; Google would refuse this key: no such account)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return json.dumps(
        {
            "type": "service_account",
            "project_id": "modeldeploy-test",
            "private_key_id": os.urandom(20).hex(),
            "private_key": pem,
            "client_email": email,
            "client_id": "100000000000000000000",
            "token_uri": "https://oauth2.googleapis.com/token",
        }
    )
