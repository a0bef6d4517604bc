#!/usr/bin/env python3
"""Run a real Prometheus (Debian package ``prometheus``) as a private process for tests.

The Debian package installs ``/usr/bin/prometheus`` and, where an init system runs, a
system service on :9090. That service is never used: each :class:`Prometheus` here is
its own process on ``127.0.0.1:<free port>`` with a private ``--storage.tsdb.path`` and a
generated configuration of static scrape targets (``scrape_interval`` 1s by default),
each target carrying the labels it is given (e.g. ``modeldeploy_io_revision`` and
``namespace``, the labels Kubernetes service discovery relabelling gives pod targets).

Library use::

    binary = ensure_prometheus()       # installs the Debian package when missing and root
    with Prometheus.start(binary, workdir, [ScrapeTarget("127.0.0.1:8002", {"job": "triton"})]) as prom:
        prom.wait_targets_up()
        prom.query('nv_inference_request_success')

CLI::

    python -m hack.prometheus ensure                 # install if needed, print the binary and version
    python -m hack.prometheus serve --target 127.0.0.1:8002 [--label revision=abc] [--port 9091]

Dependencies: the standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from hack.procutil import (
    ServerProcess,
    free_port,
    http_get,
    interrupt_on_signals,
    poll,
    start_with_port_retries,
)

DEFAULT_BINARY = "/usr/bin/prometheus"
DEBIAN_PACKAGE = "prometheus"
DEFAULT_READY_TIMEOUT = 60.0


class PrometheusUnavailable(RuntimeError):
    """No prometheus binary, and it cannot be installed here."""


class PrometheusStartError(RuntimeError):
    """prometheus was started but did not become ready; the message ends with its log tail."""


# --------------------------------------------------------------------------- install


def find_binary() -> Path | None:
    env = os.environ.get("MODELDEPLOY_PROMETHEUS")
    for candidate in (env, shutil.which("prometheus"), DEFAULT_BINARY):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def ensure_prometheus(*, install: bool = True, log: Callable[[str], None] = print) -> Path:
    """The prometheus binary; installs the Debian package with apt-get when it is missing and
    this process runs as root (each step is printed). Raises :class:`PrometheusUnavailable`."""
    found = find_binary()
    if found is not None:
        return found
    apt = shutil.which("apt-get")
    why = []
    if not install:
        why.append("installation not allowed here")
    if apt is None:
        why.append("apt-get is not available (not a Debian-based system)")
    if os.geteuid() != 0:
        why.append("not running as root")
    if why:
        raise PrometheusUnavailable(
            f"prometheus is not installed ({'; '.join(why)}): install the Debian package "
            f"'{DEBIAN_PACKAGE}' (apt-get install -y {DEBIAN_PACKAGE}) or set MODELDEPLOY_PROMETHEUS "
            "to a prometheus binary"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (
        [str(apt), "update", "-qq"],
        [str(apt), "install", "-y", "-qq", "--no-install-recommends", DEBIAN_PACKAGE],
    ):
        log(f"ensure_prometheus: $ {' '.join(argv)}")
        try:
            out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900, check=False)
        except subprocess.TimeoutExpired:
            raise PrometheusUnavailable(f"{' '.join(argv)} timed out") from None
        if out.returncode != 0:
            tail = "\n".join((out.stdout + out.stderr).splitlines()[-15:])
            raise PrometheusUnavailable(f"{' '.join(argv)} failed with code {out.returncode}:\n{tail}")
    found = find_binary()
    if found is None:
        raise PrometheusUnavailable(f"apt-get installed {DEBIAN_PACKAGE} but no prometheus binary was found")
    log(f"ensure_prometheus: installed {found} ({version(found)})")
    return found


def version(binary: Path) -> str:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False)
    first = (out.stdout or out.stderr).splitlines()[:1]
    return first[0].strip() if first else "unknown"


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ScrapeTarget:
    """One static target (``host:port``) and the labels its series get."""

    address: str
    labels: Mapping[str, str] = field(default_factory=dict)
    job: str | None = None  # default: one job per target, named target-<index>
    metrics_path: str = "/metrics"


def render_config(
    targets: Sequence[ScrapeTarget],
    *,
    scrape_interval: str = "1s",
    scrape_configs: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """Prometheus configuration (as a dict; JSON is valid YAML) with one job per target,
    so the same address may appear twice with different labels, then ``scrape_configs``
    as given (jobs of the caller's own, e.g. ``kubernetes_sd_configs``)."""
    jobs = []
    for i, target in enumerate(targets):
        jobs.append(
            {
                "job_name": target.job or f"target-{i}",
                "metrics_path": target.metrics_path,
                "scrape_interval": scrape_interval,
                "scrape_timeout": scrape_interval,
                "static_configs": [{"targets": [target.address], "labels": dict(target.labels)}],
            }
        )
    jobs.extend(dict(job) for job in scrape_configs)
    return {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": jobs,
    }


# --------------------------------------------------------------------------- the server


@dataclass
class Prometheus(ServerProcess):
    """One prometheus process on 127.0.0.1, logging to ``workdir/prometheus.log``."""

    label = "prometheus"
    tail_lines = 40

    binary: Path
    workdir: Path
    port: int
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    ready_seconds: float | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    @classmethod
    def start(
        cls,
        binary: Path,
        workdir: Path,
        targets: Sequence[ScrapeTarget],
        *,
        scrape_interval: str = "1s",
        ready_timeout: float = DEFAULT_READY_TIMEOUT,
        port: int | None = None,
        scrape_configs: Sequence[Mapping[str, Any]] = (),
    ) -> Prometheus:
        """Start prometheus and wait until ``/-/ready`` answers 200.
        Raises :class:`PrometheusStartError` with the log tail when it exits or times out."""
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "prometheus.yml"
        rendered = render_config(targets, scrape_interval=scrape_interval, scrape_configs=scrape_configs)
        config.write_text(json.dumps(rendered, indent=2))
        data = workdir / "data"
        data.mkdir(exist_ok=True)

        def launch() -> Prometheus:
            chosen = port or free_port()
            argv = [
                str(binary),
                f"--config.file={config}",
                f"--storage.tsdb.path={data}",
                f"--web.listen-address=127.0.0.1:{chosen}",
                "--storage.tsdb.retention.time=1h",
                # hidden flag (default 5s): how often new targets reach the scrape manager
                "--scrape.discovery-reload-interval=200ms",
                "--log.level=info",
            ]
            prom = cls(binary=binary, workdir=workdir, port=chosen, argv=argv)
            prom._spawn()
            return prom

        return start_with_port_retries(
            launch,
            attempts=1 if port is not None else 3,
            ready_timeout=ready_timeout,
            error=PrometheusStartError,
            port_in_use="address already in use",
            tail_lines=50,
        )

    def _spawn(self) -> None:
        self._launch(self.argv, cwd=self.workdir)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "prometheus.log"

    def wait_ready(self, timeout: float = DEFAULT_READY_TIMEOUT) -> None:
        self._wait_ready(
            lambda: http_get(f"{self.url}/-/ready", timeout=2.0)[0] == 200,
            timeout=timeout,
            what=f"prometheus {self.url}/-/ready",
            error=PrometheusStartError,
        )

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        status, body = http_get(url)
        if status != 200:
            raise RuntimeError(f"GET {url} answered {status}: {body[:300]!r}")
        doc = json.loads(body)
        if doc.get("status") != "success":
            raise RuntimeError(f"GET {url}: {doc}")
        return doc["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query now: the result vector."""
        result: list[dict[str, Any]] = self.api("query", query=promql)["result"]
        return result

    def targets(self) -> list[dict[str, Any]]:
        active: list[dict[str, Any]] = self.api("targets")["activeTargets"]
        return active

    def wait_targets_up(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Until every target has been scraped successfully at least once."""

        def check() -> list[dict[str, Any]] | None:
            active = self.targets()
            return active if active and all(t.get("health") == "up" for t in active) else None

        return poll(check, timeout=timeout, interval=0.2, what="all prometheus targets up", abort=self.exited)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (prometheus flushes and exits), SIGKILL to its group after ``timeout``."""
        return self._stop(timeout)


# --------------------------------------------------------------------------- CLI


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("ensure", help="install the Debian package if needed; print the binary and version")
    serve = sub.add_parser("serve", help="run prometheus in the foreground until interrupted")
    serve.add_argument("--target", action="append", required=True, help="host:port to scrape (repeatable)")
    serve.add_argument("--label", action="append", default=[], help="k=v label for every target")
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--workdir", type=Path, default=Path("prometheus-data"))
    serve.add_argument("--scrape-interval", default="1s")
    args = parser.parse_args(argv)
    try:
        binary = ensure_prometheus(log=lambda m: print(m, file=sys.stderr))
    except PrometheusUnavailable as err:
        print(f"prometheus unavailable: {err}", file=sys.stderr)
        return 2
    if args.cmd == "ensure":
        print(f"{binary}: {version(binary)}")
        return 0
    labels = dict(item.split("=", 1) for item in args.label)
    targets = [ScrapeTarget(t, labels) for t in args.target]

    interrupt_on_signals()
    prom = Prometheus.start(
        binary, args.workdir.resolve(), targets, scrape_interval=args.scrape_interval, port=args.port
    )
    return prom.serve(f"prometheus ready in {prom.ready_seconds:.2f}s at {prom.url}, log {prom.log_path}")


if __name__ == "__main__":
    sys.exit(_main())
