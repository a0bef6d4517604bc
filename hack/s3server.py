#!/usr/bin/env python3
"""A real S3-compatible server on 127.0.0.1 for tests: moto's server, in its own virtualenv.

moto (PyPI) depends on botocore, which pins ``python-dateutil<3``, while the operator's
``kubernetes>=37`` client needs ``python-dateutil>=3``: the two cannot share the project's
virtualenv. So moto gets a private one, built once from PyPI into
``$MODELDEPLOY_CACHE/s3server/moto-<version>-py3.X`` (default cache ``~/.cache/modeldeploy``),
and runs as a subprocess (``python -m moto.server``). The operator's stager talks to it
over HTTP exactly as it would to AWS S3 or MinIO.

Buckets, an IAM user with an access key, and uploads are done by boto3 (the AWS SDK,
inside moto's virtualenv: an independent client), then :meth:`S3Server.enforce_auth`
turns on moto's request authentication, from then on every request must carry a valid
Signature Version 4 of that user's key (a wrong signature is answered 403).

Library use::

    python = ensure_moto()                                  # raises S3ServerUnavailable
    with S3Server.start(python, workdir) as s3:
        key = s3.setup(bucket="models", upload=Path("repo"), prefix="repo")
        s3.enforce_auth()
        # s3.endpoint, key.access_key, key.secret_key

CLI::

    python -m hack.s3server ensure                          # build the virtualenv; print its python
    python -m hack.s3server serve [--port 5000]             # run the server until interrupted

Dependencies: the standard library (boto3 only in the ``setup`` subcommand, which runs in
moto's virtualenv).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from hack.procutil import (
    ServerProcess,
    cache_dir,
    file_lock,
    free_port,
    interrupt_on_signals,
    start_with_port_retries,
)
from hack.procutil import http_request as http

MOTO_VERSION = "5.2.5"
#: moto's S3 and IAM backends and its server; not ``moto[server]``, which pulls every service's deps.
REQUIREMENTS = [f"moto[s3,iam]=={MOTO_VERSION}", "flask>=3", "flask-cors>=4"]
REGION = "us-east-1"


class S3ServerUnavailable(RuntimeError):
    """moto's virtualenv cannot be built here (no network to PyPI, no venv module...)."""


class S3ServerStartError(RuntimeError):
    """The server was started but did not answer; the message ends with its log tail."""


def cache_root() -> Path:
    return cache_dir(expand_user=False) / "s3server"


def ensure_moto(root: Path | None = None, *, log: Callable[[str], None] = print) -> Path:
    """The python of moto's private virtualenv; built once (about a minute), safe across processes."""
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    base = root or cache_root()
    venv = base / f"moto-{MOTO_VERSION}-py{pyver}"
    python = venv / "bin" / "python"
    stamp = venv / ".stamp"
    want = " ".join(REQUIREMENTS)
    base.mkdir(parents=True, exist_ok=True)
    with file_lock(base / ".lock"):
        if stamp.is_file() and stamp.read_text().strip() == want and python.exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        started = time.monotonic()
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *REQUIREMENTS],
        ]
        for argv in steps:
            log(f"ensure_moto: $ {' '.join(argv)}")
            try:
                out = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
            except subprocess.TimeoutExpired:
                shutil.rmtree(venv, ignore_errors=True)
                raise S3ServerUnavailable(f"{' '.join(argv)} timed out") from None
            if out.returncode != 0:
                shutil.rmtree(venv, ignore_errors=True)
                tail = "\n".join((out.stdout + out.stderr).splitlines()[-15:])
                raise S3ServerUnavailable(f"{' '.join(argv)} failed with code {out.returncode}:\n{tail}")
        stamp.write_text(want + "\n")
        log(f"ensure_moto: {venv} ready in {time.monotonic() - started:.0f}s")
    return python


@dataclass(frozen=True)
class AccessKey:
    access_key: str
    secret_key: str

    def __repr__(self) -> str:
        return "AccessKey(***)"


# --------------------------------------------------------------------------- the server


@dataclass
class S3Server(ServerProcess):
    """moto's server on ``host`` (default 127.0.0.1; the real node's IP for pods to reach it):<port>,
    logging to ``workdir/moto.log``."""

    label = "moto server"
    tail_lines = 30

    python: Path
    workdir: Path
    port: int
    host: str = "127.0.0.1"
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    ready_seconds: float | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    @classmethod
    def start(
        cls, python: Path, workdir: Path, *, ready_timeout: float = 60.0, host: str = "127.0.0.1"
    ) -> S3Server:
        workdir.mkdir(parents=True, exist_ok=True)

        def launch() -> S3Server:
            server = cls(python=python, workdir=workdir, port=free_port(), host=host)
            server._spawn()
            return server

        return start_with_port_retries(
            launch,
            attempts=3,
            ready_timeout=ready_timeout,
            error=S3ServerStartError,
            port_in_use="Address already in use",
        )

    def _spawn(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MOTO_"))}
        env["PYTHONUNBUFFERED"] = "1"
        argv = [str(self.python), "-m", "moto.server", "-H", self.host, "-p", str(self.port)]
        self._launch(argv, cwd=self.workdir, env=env, header=False)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "moto.log"

    def wait_ready(self, timeout: float) -> None:
        self._wait_ready(
            lambda: http("GET", f"{self.endpoint}/moto-api/data.json")[0] == 200,
            timeout=timeout,
            what=f"moto server {self.endpoint}",
            error=S3ServerStartError,
            name_log=False,
        )

    def setup(
        self, *, bucket: str, upload: Path | None = None, prefix: str = "", user: str = "stager"
    ) -> AccessKey:
        """Create ``bucket``, upload the files under ``upload`` to ``prefix/``, and an IAM user
        allowed to read it; returns the user's access key. boto3 does it, from moto's venv."""
        argv = [
            str(self.python),
            "-m",
            "hack.s3server",
            "setup",
            "--endpoint",
            self.endpoint,
            "--bucket",
            bucket,
            "--prefix",
            prefix,
            "--user",
            user,
        ]
        if upload is not None:
            argv += ["--upload", str(upload)]
        # moto's venv runs this module too: the repository root on its path makes ``hack`` importable.
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, env=env)
        if out.returncode != 0:
            raise RuntimeError(f"s3server setup failed ({out.returncode}):\n{out.stderr[-3000:]}")
        doc = json.loads(out.stdout)
        return AccessKey(doc["access_key"], doc["secret_key"])

    def store(self, key: AccessKey, bucket: str, prefix: str = "") -> Any:
        """An obstore S3 store of ``bucket``/``prefix`` on this server, signed with ``key``."""
        from obstore.store import S3Store

        return S3Store(
            bucket,
            prefix=prefix or None,
            endpoint=self.endpoint,
            access_key_id=key.access_key,
            secret_access_key=key.secret_key,
            region=REGION,
            client_options={"allow_http": True},
        )

    def enforce_auth(self) -> None:
        """From now on every request must be signed by a known access key (moto's IAM auth)."""
        status, body = http("POST", f"{self.endpoint}/moto-api/reset-auth", b"0")
        if status != 200:
            raise RuntimeError(f"moto reset-auth answered {status}: {body[:200]!r}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the process group, SIGKILL after ``timeout``."""
        self._stop(timeout, term_group=True)


# --------------------------------------------------------------------------- setup (runs in moto's venv)


def _setup(args: argparse.Namespace) -> int:  # pragma: no cover - runs under moto's interpreter
    import boto3  # type: ignore[import-not-found]

    admin: dict[str, Any] = {
        "endpoint_url": args.endpoint,
        "region_name": REGION,
        "aws_access_key_id": "setup",
        "aws_secret_access_key": "setup",
    }
    iam = boto3.client("iam", **admin)
    iam.create_user(UserName=args.user)
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": ["s3:*"], "Resource": ["*"]}],
    }
    iam.put_user_policy(UserName=args.user, PolicyName="read-models", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=args.user)["AccessKey"]
    s3 = boto3.client("s3", **admin)
    s3.create_bucket(Bucket=args.bucket)
    count = 0
    if args.upload:
        root = Path(args.upload)
        prefix = args.prefix.strip("/")
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(root).as_posix()
            s3.upload_file(str(path), args.bucket, f"{prefix}/{rel}" if prefix else rel)
            count += 1
    print(
        json.dumps(
            {"access_key": key["AccessKeyId"], "secret_key": key["SecretAccessKey"], "uploaded": count}
        )
    )
    return 0


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("ensure", help="build moto's virtualenv (once); print its python")
    serve = sub.add_parser("serve", help="run the S3 server in the foreground")
    serve.add_argument("--workdir", type=Path, default=Path("s3server"))
    setup = sub.add_parser("setup", help="(inside moto's venv) bucket, IAM user, uploads; prints the key")
    setup.add_argument("--endpoint", required=True)
    setup.add_argument("--bucket", required=True)
    setup.add_argument("--prefix", default="")
    setup.add_argument("--upload", default=None)
    setup.add_argument("--user", default="stager")
    args = parser.parse_args(argv)
    if args.cmd == "setup":
        return _setup(args)
    try:
        python = ensure_moto(log=lambda m: print(m, file=sys.stderr))
    except S3ServerUnavailable as err:
        print(f"s3 server unavailable: {err}", file=sys.stderr)
        return 2
    if args.cmd == "ensure":
        print(python)
        return 0

    interrupt_on_signals()
    server = S3Server.start(python, args.workdir.resolve())
    return server.serve(f"moto S3 server ready in {server.ready_seconds:.2f}s at {server.endpoint}")


if __name__ == "__main__":
    sys.exit(_main())
