"""Canary analysis against a real tritonserver, scraped by a real Prometheus (and directly).

One tritonserver serves model ``canary`` in three versions, told apart by Triton's
``version`` label (the single-server stand-in for three revisions):

* version 1: healthy and fast;
* version 2: raises in ``execute`` for every 4th request (Triton counts a raised exception
  as ``nv_inference_request_failure{reason="BACKEND"}``; a response carrying an error would
  count as a success);
* version 3: healthy but sleeps 200 ms per request.

Traffic is a bounded loop of tritonclient HTTP requests on 127.0.0.1. Each verdict comes
from :class:`modeldeploy.triton.analysis.TritonAnalysis` (the windows the operator's
:class:`modeldeploy.modeldeployment.analysis_runner.AnalysisRunner` runs), once through Prometheus (Debian
package, private process, 1 s scrape interval) and once by scraping the server's metrics port
directly; the last test runs the runner itself across a restart.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from hack import prometheus
from hack.procutil import poll
from hackmods import unavailable
from modeldeploy import api
from modeldeploy.triton.analysis import PrometheusSource, ScrapeSource, Target, TritonAnalysis, window
from tritonmodels import flaky_py

pytestmark = pytest.mark.triton

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL = "canary"
FAIL_EVERY = 4
SLOW_SECONDS = 0.2

CONFIG = f"""
name: "{MODEL}"
backend: "python"
max_batch_size: 0
version_policy: {{ all {{ }} }}
input [ {{ name: "X" data_type: TYPE_FP32 dims: [ 1 ] }} ]
output [ {{ name: "Y" data_type: TYPE_FP32 dims: [ 1 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""

VERSIONS = {
    1: flaky_py(),
    2: flaky_py(fail_every=FAIL_EVERY),
    3: flaky_py(sleep=SLOW_SECONDS),
}

MD: dict[str, Any] = {
    "metadata": {"namespace": "ns", "name": MODEL},
    "status": {"history": [{"hash": f"r{v}", "modelVersion": v} for v in VERSIONS]},
}
STATE = api.RolloutState(state="Progressing", step=0, stable_revision=1, candidate_revision=2)


class ManualClock:
    """The provider's window gate; the metric timestamps stay real."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Stack:
    server: Any
    prom: Any
    sent: int = 0
    client: httpclient.InferenceServerClient = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpclient.InferenceServerClient(self.server.http_address)

    def infer(self, version: int, count: int) -> int:
        """Send ``count`` requests to ``version``; returns how many failed."""
        failed = 0
        for i in range(count):
            x = httpclient.InferInput("X", [1], "FP32")
            x.set_data_from_numpy(np.array([float(i)], dtype=np.float32))
            try:
                out = self.client.infer(MODEL, [x], model_version=str(version))
                assert out.as_numpy("Y")[0] == 2.0 * i
            except InferenceServerException as err:
                assert "fails on purpose" in str(err)
                failed += 1
            finally:
                self.sent += 1
        return failed

    def _live_total(self) -> float:
        return sum(
            v
            for name, labels, v in _rows(self.server.metrics_text())
            if labels.get("model") == MODEL
            and (
                name.startswith("nv_inference_request_success")
                or (name.startswith("nv_inference_request_failure") and labels.get("reason") != "CANCELED")
            )
        )

    def _prom_total(self) -> float:
        q = (
            f'sum(nv_inference_request_success{{model="{MODEL}"}}) + '
            f'sum(nv_inference_request_failure{{model="{MODEL}",reason!="CANCELED"}})'
        )
        result = self.prom.query(q)
        return float(result[0]["value"][1]) if result else -1.0

    def sync(self, kind: str) -> None:
        """Until every request sent is counted by Triton (and, for Prometheus, scraped)."""
        poll(
            lambda: True if self._live_total() == self.sent else None,
            timeout=30,
            what=f"tritonserver to count {self.sent} requests",
        )
        if kind == "prometheus":
            poll(
                lambda: True if self._prom_total() == self.sent else None,
                timeout=30,
                interval=0.2,
                what=f"prometheus to have scraped {self.sent} requests",
            )


def _rows(text: str) -> list[tuple[str, dict[str, str], float]]:
    from modeldeploy.triton.analysis import parse_exposition

    return parse_exposition(text)


@pytest.fixture(scope="module")
def prometheus_binary() -> Path:
    try:
        binary: Path = prometheus.ensure_prometheus()
    except prometheus.PrometheusUnavailable as err:
        unavailable(f"prometheus unavailable: {err}")
    return binary


@pytest.fixture(scope="module")
def stack(
    triton_dist: Any,
    triton_launcher: ModuleType,
    prometheus_binary: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("analysis")
    model_dir = work / "models" / MODEL
    model_dir.mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(CONFIG)
    for version, source in VERSIONS.items():
        (model_dir / str(version)).mkdir()
        (model_dir / str(version) / "model.py").write_text(source)
    server = triton_launcher.TritonServer.start(
        triton_dist,
        work / "models",
        log_path=work / "tritonserver.log",
        extra_args=["--metrics-config=summary_latencies=true"],
        ready_timeout=120,
    )
    prom = None
    try:
        started = time.monotonic()
        prom = prometheus.Prometheus.start(
            prometheus_binary,
            work / "prometheus",
            [prometheus.ScrapeTarget(f"127.0.0.1:{server.metrics_port}", {"namespace": "ns"}, job="triton")],
        )
        prom.wait_targets_up(timeout=30)
        print(
            f"\n{prometheus.version(prometheus_binary)}: ready in {prom.ready_seconds:.2f}s, target up after "
            f"{time.monotonic() - started:.2f}s; tritonserver ready in {server.ready_seconds:.2f}s"
        )
        s = Stack(server, prom)
        for version in VERSIONS:  # first requests are slow (backend warm-up): before any window
            s.infer(version, 1)
        yield s
    finally:
        if prom is not None:
            prom.stop()
        server.stop()


def spec_for(candidate: int, kind: str, stack: Stack, **analysis: Any) -> api.ModelDeploymentSpec:
    analysis.setdefault("interval", "30s")
    if kind == "prometheus":
        analysis["prometheusUrl"] = stack.prom.url
    else:
        analysis["scrape"] = True
    return api.ModelDeploymentSpec.model_validate(
        {
            "model": {"format": "python", "storageUri": "pvc://models/repo", "version": candidate},
            "rollout": {"analysis": analysis},
        }
    )


def provider(stack: Stack, clock: ManualClock) -> TritonAnalysis:
    # One server holds every "revision": select by Triton's version label (not by pods/revision labels).
    return TritonAnalysis(
        pods_for=lambda _ns, _rev: ["127.0.0.1"],
        metrics_port=stack.server.metrics_port,
        select_by_revision=False,
        clock=clock,
    )


def call(
    ta: TritonAnalysis, spec: api.ModelDeploymentSpec, stable: int, candidate: int
) -> api.AnalysisResult:
    res = asyncio.run(ta(MD, spec, STATE, f"r{stable}", f"r{candidate}"))
    assert res is not None
    return res


def one_window(
    stack: Stack,
    kind: str,
    spec: api.ModelDeploymentSpec,
    *,
    candidate: int,
    traffic: dict[int, int],
    stable: int = 1,
) -> api.AnalysisResult:
    clock = ManualClock()
    ta = provider(stack, clock)
    stack.sync(kind)
    first = call(ta, spec, stable, candidate)
    assert first.verdict == "Pending" and first.reason.startswith("window started"), first
    for version, count in traffic.items():
        stack.infer(version, count)
    stack.sync(kind)
    clock.t += 31
    res = call(ta, spec, stable, candidate)
    print(f"\n[{kind}] candidate v{candidate}: {res.verdict}: {res.reason}\n  values {res.values}")
    return res


KINDS = ["prometheus", "scrape"]


@pytest.mark.parametrize("kind", KINDS)
def test_healthy_version_passes(stack: Stack, kind: str) -> None:
    spec = spec_for(1, kind, stack, minRequests=20, thresholds={"maxErrorRate": 0.05, "maxP99LatencyMs": 150})
    res = one_window(stack, kind, spec, candidate=1, traffic={1: 40})
    assert res.verdict == "Pass", res.reason
    assert res.values["requests"] == 40 and res.values["failures"] == 0 and res.values["errorRate"] == 0
    assert 0 < res.values["p99Ms"] < 150
    assert res.reason.startswith("within limits: 40 requests, errorRate 0%, p99 latency")


@pytest.mark.parametrize("kind", KINDS)
def test_failing_version_fails_naming_error_rate(stack: Stack, kind: str) -> None:
    spec = spec_for(2, kind, stack, minRequests=20, thresholds={"maxErrorRate": 0.05, "maxP99LatencyMs": 150})
    res = one_window(stack, kind, spec, candidate=2, traffic={2: 40})
    assert res.verdict == "Fail"
    assert res.values["requests"] == 40 and res.values["failures"] == 40 / FAIL_EVERY
    assert res.reason.startswith("errorRate 25% > maxErrorRate 5% (10 of 40 requests failed)"), res.reason


@pytest.mark.parametrize("kind", KINDS)
def test_slow_version_fails_naming_p99_latency(stack: Stack, kind: str) -> None:
    spec = spec_for(3, kind, stack, minRequests=20, thresholds={"maxErrorRate": 0.05, "maxP99LatencyMs": 150})
    res = one_window(stack, kind, spec, candidate=3, traffic={3: 20})
    assert res.verdict == "Fail"
    assert res.values["p99Ms"] >= SLOW_SECONDS * 1000 and res.values["latencyMs"] >= SLOW_SECONDS * 1000
    assert res.reason.startswith("p99 latency ") and "ms > maxP99LatencyMs 150" in res.reason, res.reason


@pytest.mark.parametrize("kind", KINDS)
def test_failing_version_fails_against_stable(stack: Stack, kind: str) -> None:
    spec = spec_for(2, kind, stack, minRequests=20, thresholds={"maxErrorRateVsStable": 2})
    res = one_window(stack, kind, spec, candidate=2, stable=1, traffic={1: 40, 2: 40})
    assert res.verdict == "Fail"
    assert res.values["stableRequests"] == 40 and res.values["stableErrorRate"] == 0
    assert "errorRate 25% > 2 x stable 0% (maxErrorRateVsStable" in res.reason, res.reason


@pytest.mark.parametrize("kind", KINDS)
def test_low_traffic_is_inconclusive_then_fails(stack: Stack, kind: str) -> None:
    spec = spec_for(1, kind, stack, minRequests=20, maxInconclusive=1, thresholds={"maxErrorRate": 0.05})
    clock = ManualClock()
    ta = provider(stack, clock)
    stack.sync(kind)
    assert call(ta, spec, 1, 1).verdict == "Pending"
    stack.infer(1, 5)
    stack.sync(kind)
    clock.t += 31
    res = call(ta, spec, 1, 1)
    print(f"\n[{kind}] low traffic: {res.verdict}: {res.reason}")
    assert res.verdict == "Inconclusive" and res.inconclusive_count == 1
    assert res.values["requests"] == 5
    assert res.reason.startswith("5 requests in the ") and "fewer than minRequests 20" in res.reason
    clock.t += 31  # a window without any traffic
    res = call(ta, spec, 1, 1)
    print(f"[{kind}] no traffic: {res.verdict}: {res.reason}")
    assert res.verdict == "Fail" and res.inconclusive_count == 2
    assert res.reason.startswith("insufficient traffic: 2 inconclusive windows in a row (maxInconclusive 1)")
    assert "0 requests" in res.reason


def test_sources_agree_and_prometheus_selects_by_revision_label(
    stack: Stack, prometheus_binary: Path, tmp_path: Path
) -> None:
    """Scraping and Prometheus see the same window; a Prometheus whose targets carry the
    pods' revision label (as Kubernetes service discovery relabelling gives them) selects a
    revision by that label alone: here the same server scraped as two revisions."""
    addr = f"127.0.0.1:{stack.server.metrics_port}"
    targets = [
        prometheus.ScrapeTarget(addr, {"modeldeploy_io_revision": rev, "namespace": "ns"}, job=f"rev-{rev}")
        for rev in ("aaa", "bbb")
    ]
    with prometheus.Prometheus.start(prometheus_binary, tmp_path / "prom", targets) as prom:
        prom.wait_targets_up(timeout=30)
        by_rev = PrometheusSource(prom.url)
        by_version = PrometheusSource(stack.prom.url, revision_label=None, namespace_label=None)
        scrape = ScrapeSource([addr])

        def in_sync() -> bool | None:
            q = f'nv_inference_request_success{{model="{MODEL}",version="2",modeldeploy_io_revision="bbb"}}'
            res = prom.query(q)
            live = stack._live_total()
            return True if res and stack._prom_total() == live == stack.sent else None

        async def snaps() -> list[Any]:
            return list(
                await asyncio.gather(
                    scrape.snapshot(Target(MODEL, "2")),
                    by_version.snapshot(Target(MODEL, "2")),
                    by_rev.snapshot(Target(MODEL, "2", revision="bbb", namespace="ns")),
                    by_rev.snapshot(Target(MODEL, None, revision="aaa", namespace="ns")),
                )
            )

        poll(in_sync, timeout=30, interval=0.2, what="both prometheus instances in sync")
        start = asyncio.run(snaps())
        stack.infer(2, 12)
        stack.sync("prometheus")
        poll(in_sync, timeout=30, interval=0.2, what="both prometheus instances in sync")

        def all_caught_up() -> list[Any] | None:
            # The revision-labelled Prometheus scrapes on its own schedule: poll until it has the last scrape.
            snap = asyncio.run(snaps())
            got = [window(s, e).requests for s, e in zip(start[:3], snap[:3], strict=True)]
            return snap if len(set(got)) == 1 else None

        end = poll(all_caught_up, timeout=30, interval=0.5, what="all sources see it")

    assert len(end[2].series) == 1  # revision bbb, version 2: one series though the server is scraped twice
    assert len(end[3].series) == len(VERSIONS)  # revision aaa, every version
    windows = [window(s, e) for s, e in zip(start[:3], end[:3], strict=True)]
    assert [(w.requests, w.failures) for w in windows] == [(12, 3)] * 3
    assert windows[0].request_us == windows[1].request_us == windows[2].request_us


# --------------------------------------------------------------------------- windows across a restart


def _merged(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386, as the API server applies the runner's status merge patch."""
    out = dict(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict):
            out[key] = _merged(out.get(key) if isinstance(out.get(key), dict) else {}, value)
        else:
            out[key] = value
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_a_window_resumed_after_a_restart_counts_from_its_persisted_start(stack: Stack, kind: str) -> None:
    """The operator's window runner stops (a restart) a few seconds into a window, a new one takes
    over from status: the window ends at its persisted start + interval, not an interval after the
    restart, and counts the requests of the whole window (scraping: from the start counters kept in
    status; Prometheus: asked for them at windowStart). Real clock, real server, real Prometheus."""
    from modeldeploy.modeldeployment.analysis_runner import AnalysisRunner

    interval = 10.0
    spec = spec_for(1, kind, stack, interval="10s", minRequests=20, thresholds={"maxErrorRate": 0.05})
    status: dict[str, Any] = dict(MD["status"])
    writes: asyncio.Queue[api.AnalysisResult] = asyncio.Queue()

    async def patch_status(namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        nonlocal status
        status = _merged(status, patch)
        await writes.put(api.AnalysisResult.model_validate(status["lastAnalysis"]))
        return {"metadata": MD["metadata"], "status": status}

    def runner() -> AnalysisRunner:
        ta = TritonAnalysis(
            pods_for=lambda _ns, _rev: ["127.0.0.1"],
            metrics_port=stack.server.metrics_port,
            select_by_revision=False,
            clock=time.time,
        )
        return AnalysisRunner(ta, patch_status=patch_status, enqueue=lambda ns, name: None)

    def md() -> dict[str, Any]:
        return {"metadata": MD["metadata"], "status": status}

    async def scenario() -> tuple[api.AnalysisResult, api.AnalysisResult, float, float]:
        stack.sync(kind)  # blocking calls in the loop: tritonclient's gevent stays on one thread
        before = runner()
        before.ensure(md(), spec, STATE, "r3", "r1")
        started = await asyncio.wait_for(writes.get(), 30)
        stack.infer(1, 20)
        task = before._jobs[("ns", MODEL)].task
        before.stop_all()  # the process ends
        assert task is not None
        await asyncio.gather(task, return_exceptions=True)
        stack.infer(1, 20)
        stack.sync(kind)
        after = runner()
        restarted = time.time()
        after.ensure(md(), spec, STATE, "r3", "r1")
        res = await asyncio.wait_for(writes.get(), 3 * interval)
        judged = time.time()
        after.stop_all()
        return started, res, restarted, judged

    started, res, restarted, judged = asyncio.run(scenario())
    print(f"\n[{kind}] resumed window: {res.verdict}: {res.reason}\n  values {res.values}")
    assert started.verdict == "Pending" and started.window_start is not None
    assert (started.window_counters is None) == (kind == "prometheus")  # Prometheus keeps the history
    window_start = datetime.fromisoformat(started.window_start.replace("Z", "+00:00")).timestamp()
    assert restarted < window_start + interval, "the restart came after the window's end: nothing shown"
    assert window_start + interval <= judged < restarted + interval  # its original end, not a new window's
    assert res.verdict == "Pass", res.reason
    assert res.values["requests"] == 40 and res.values["failures"] == 0  # before and after the restart
    assert interval <= res.values["windowSeconds"] < interval + 2
