#!/usr/bin/env python3
"""Local stand-ins for Google Cloud Storage and Azure Blob Storage, for the storage tests.

* ``fake-gcs-server`` (Go module ``github.com/fsouza/fake-gcs-server``), the GCS JSON API over
  plain HTTP, preloaded from a directory (``<data>/<bucket>/<object path>``). It does not check
  credentials: a request signed with a service-account key is served like an unsigned one.
* Azurite (npm ``azurite``), Azure Blob Storage with SharedKey and SAS checks on, its
  well-known development account ``devstoreaccount1``. Containers, uploads and SAS tokens are
  made by Azure's JavaScript SDK (``@azure/storage-blob``, installed beside Azurite), a client
  independent of the stager.

Both are built once, pinned, into ``$MODELDEPLOY_CACHE`` by ``hack/storage-emulators.sh``.

Library use::

    gcs_bin = ensure("fake-gcs-server")          # raises EmulatorUnavailable
    with FakeGcsServer.start(gcs_bin, workdir, data=Path("gcsdata")) as gcs:
        gcs.endpoint                                # http://127.0.0.1:PORT
    with Azurite.start(ensure("azurite"), workdir) as az:
        sas = az.setup(container="models", upload=Path("repo"), prefix="repo")

CLI: ``python -m hack.storage_emulators ensure`` (build both; print their paths).

Dependencies: the standard library.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from hack.procutil import ServerProcess, free_port, http_request, start_with_port_retries

SCRIPT = Path(__file__).resolve().parent / "storage-emulators.sh"
AZURITE_ACCOUNT = "devstoreaccount1"
#: Azurite's published development key (not a secret: every Azurite has it).
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


class EmulatorUnavailable(RuntimeError):
    """The emulator cannot be built here (no Go toolchain, no npm, no network to the registry)."""


class EmulatorStartError(RuntimeError):
    """Started but did not answer; the message ends with its log tail."""


def ensure(target: str) -> Path:
    """Build ``target`` (``fake-gcs-server`` or ``azurite``) once; its executable."""
    try:
        out = subprocess.run([str(SCRIPT), target], capture_output=True, text=True, timeout=1200, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise EmulatorUnavailable(f"{SCRIPT.name} {target}: {err}") from None
    if out.returncode != 0 or not out.stdout.strip():
        tail = "\n".join(out.stderr.splitlines()[-15:])
        raise EmulatorUnavailable(f"{SCRIPT.name} {target} failed with code {out.returncode}:\n{tail}")
    path = Path(out.stdout.strip().splitlines()[-1])
    if not path.exists():
        raise EmulatorUnavailable(f"{SCRIPT.name} {target}: {path} missing after the build")
    return path


@dataclass
class FakeGcsServer(ServerProcess):
    label = "fake-gcs-server"
    tail_lines = 30

    binary: Path
    workdir: Path
    data: Path
    port: int
    host: str = "127.0.0.1"
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    ready_seconds: float | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    @classmethod
    def start(
        cls, binary: Path, workdir: Path, *, data: Path, host: str = "127.0.0.1", ready_timeout: float = 30.0
    ) -> FakeGcsServer:
        workdir.mkdir(parents=True, exist_ok=True)

        def launch() -> FakeGcsServer:
            server = cls(binary=binary, workdir=workdir, data=data, port=free_port(), host=host)
            argv = [
                str(binary),
                "-scheme=http",
                f"-host={host}",
                f"-port={server.port}",
                f"-public-host={host}:{server.port}",
                "-backend=memory",
                f"-data={data}",
                "-log-level=warn",
            ]
            server._launch(argv, cwd=workdir)
            return server

        return start_with_port_retries(
            launch, attempts=3, ready_timeout=ready_timeout, error=EmulatorStartError, port_in_use="in use"
        )

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "fake-gcs-server.log"

    def wait_ready(self, timeout: float) -> None:
        self._wait_ready(
            lambda: http_request("GET", f"{self.endpoint}/storage/v1/b")[0] == 200,
            timeout=timeout,
            what=f"fake-gcs-server {self.endpoint}",
            error=EmulatorStartError,
        )

    def stop(self, timeout: float = 10.0) -> int | None:
        return self._stop(timeout)


@dataclass
class Azurite(ServerProcess):
    label = "azurite-blob"
    tail_lines = 30

    binary: Path
    workdir: Path
    port: int
    host: str = "127.0.0.1"
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    ready_seconds: float | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    @classmethod
    def start(
        cls, binary: Path, workdir: Path, *, host: str = "127.0.0.1", ready_timeout: float = 60.0
    ) -> Azurite:
        workdir.mkdir(parents=True, exist_ok=True)

        def launch() -> Azurite:
            server = cls(binary=binary, workdir=workdir, port=free_port(), host=host)
            argv = [
                str(binary),
                f"--blobHost={host}",
                f"--blobPort={server.port}",
                "--inMemoryPersistence",
                "--skipApiVersionCheck",
                "--disableProductStyleUrl",
                f"--debug={workdir / 'azurite-debug.log'}",
            ]
            server._launch(argv, cwd=workdir, die_with_parent=True)
            return server

        return start_with_port_retries(
            launch,
            attempts=3,
            ready_timeout=ready_timeout,
            error=EmulatorStartError,
            port_in_use="EADDRINUSE",
        )

    @property
    def endpoint(self) -> str:
        """The blob endpoint of the development account (path style, as Azure's SDKs use it)."""
        return f"http://{self.host}:{self.port}/{AZURITE_ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint={self.endpoint};"
        )

    @property
    def log_path(self) -> Path:
        return self.workdir / "azurite.log"

    def wait_ready(self, timeout: float) -> None:
        # any HTTP answer (an unauthenticated request is refused) means it listens
        self._wait_ready(
            lambda: http_request("GET", f"{self.endpoint}?comp=list")[0] > 0,
            timeout=timeout,
            what=f"azurite {self.endpoint}",
            error=EmulatorStartError,
        )

    def setup(self, *, container: str, upload: Path | None = None, prefix: str = "") -> str:
        """Create ``container``, upload the files under ``upload`` to ``prefix/`` (Azure's JS SDK);
        returns an account SAS token allowing read and list for an hour."""
        node_modules = self.binary.parent.parent  # ensure() gives …/node_modules/.bin/azurite-blob
        env = {**os.environ, "NODE_PATH": str(node_modules)}
        argv = ["node", str(Path(__file__).resolve().parent / "azure-setup.js")]
        argv += [self.connection_string, container, str(upload or ""), prefix]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"azure-setup.js failed ({out.returncode}):\n{out.stderr[-3000:]}")
        return str(json.loads(out.stdout)["sas"])

    def stop(self, timeout: float = 10.0) -> int | None:
        return self._stop(timeout, term_group=True)


if __name__ == "__main__":
    if sys.argv[1:] != ["ensure"]:
        print(__doc__)
        sys.exit(2)
    for name in ("fake-gcs-server", "azurite"):
        print(ensure(name))
