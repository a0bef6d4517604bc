"""Run the real operator (``modeldeploy-operator run``) as a subprocess against a test cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from hack.procutil import free_port
from kube import wait_for

REPO = Path(__file__).resolve().parents[1]
CRD_FILE = REPO / "crds" / "modeldeploy.io_modeldeployments.yaml"
CRD_DIR = REPO / "crds"


class OperatorProcess:
    """One operator process. ``namespaces``: kopf namespace patterns (globs allowed)."""

    def __init__(
        self,
        log_dir: Path,
        namespaces: list[str],
        *,
        env: dict[str, str] | None = None,
        resync_seconds: float = 30,
        extra_args: list[str] | None = None,
        verbose: bool = True,
        python: str = sys.executable,
    ) -> None:
        self.log_dir = log_dir
        self.namespaces = namespaces
        self.resync_seconds = resync_seconds
        self.extra_args = extra_args or []
        self.extra_env = env or {}
        self.verbose = verbose
        # The interpreter that runs it: the test venv's by default (it has the test extras, whose
        # Kubernetes client kopf then imports too); make bench passes a runtime-only one.
        self.python = python
        self.proc: subprocess.Popen[bytes] | None = None
        self.metrics_port = 0
        self.health_port = 0
        self.starts = 0
        self.log_path = log_dir / "operator.log"

    def start(self, timeout: float = 60) -> None:
        assert self.proc is None or self.proc.poll() is not None, "operator already running"
        self.metrics_port, self.health_port = free_port(), free_port()
        env = {
            **os.environ,
            "MODELDEPLOY_METRICS_PORT": str(self.metrics_port),
            "MODELDEPLOY_METRICS_ADDR": "127.0.0.1",
            "MODELDEPLOY_RESYNC_SECONDS": str(self.resync_seconds),
            **self.extra_env,
        }
        args = [
            self.python,
            "-m",
            "modeldeploy",
            "operator",
            "--standalone",
            *(["--verbose"] if self.verbose else []),
            "--liveness",
            f"http://127.0.0.1:{self.health_port}/healthz",
            *self.extra_args,
        ]
        for ns in self.namespaces:
            args += ["--namespace", ns]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"\n==== start #{self.starts}: {' '.join(args)}\n".encode())
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        wait_for(self.healthy, timeout, message=lambda: f"operator healthy; log tail:\n{self.tail()}")

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            # Not a "not yet": fail the wait at once.
            raise SystemExit(f"operator exited ({self.proc and self.proc.returncode}):\n{self.tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        total = 0.0
        for line in self.metrics().splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            if head.split("{")[0] != name:
                continue
            if labels and not all(f'{k}="{v}"' in head for k, v in labels.items()):
                continue
            total += float(value)
        return total

    def kill(self) -> None:
        """SIGKILL: no cleanup, as a crash would."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def errors_in_log(self) -> list[str]:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return [ln for ln in text.splitlines() if "Traceback" in ln or "[ERROR" in ln]


def install_crd(cluster: Any) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_DIR))
    for plural in ("modeldeployments", "batchinferences"):
        cluster.wait_crd_established(f"{plural}.modeldeploy.io")
        # Discovery can lag Established by a moment: wait until the resource is served.
        wait_for(
            lambda plural=plural: cluster.kubectl("get", plural, "-A", check=False).returncode == 0,
            30,
            message=f"{plural} served",
        )


def time_since(t0: float) -> float:
    return time.monotonic() - t0
