"""Canary analysis on real Triton metrics from real pods (issue 12, behaviour 3, the analysis part).

No simulation labels: the candidate version really fails some requests, or really answers slowly,
inside real Triton pods on the real node, while a client (``traffic.py``) sends inference requests
through the ModelDeployment's main Service the whole time. The operator (a subprocess on the host)
judges the candidate on the Triton counters of the candidate's own pods, read either

* directly (``analysis.scrape: true``: ``GET http://<pod IP>:8002/metrics`` of each Ready pod of the
  revision; the host routes to the node's pod bridge), or
* through a real Prometheus (Debian package, a private process on the host) scraping the pods every
  second, with the target labels Kubernetes service discovery gives them (the pods'
  ``modeldeploy.io/revision`` label as ``modeldeploy_io_revision``, ``namespace``, ``pod``): Debian
  builds prometheus without ``kubernetes_sd_configs``, so :class:`PodTargets` lists the pods and
  writes them as a ``file_sd`` targets file (``analysis.prometheusUrl``).

A failing candidate is rolled back by itself: the reason (metric, value, limit) in status and in a
Warning Event, stable at full capacity and never failing a request. Too little traffic in a window
is ``Inconclusive`` in status, never a pass; past ``maxInconclusive`` windows the step fails.

Failing requests: a version whose ``execute`` *raises* on every other call. Triton counts that in
``nv_inference_request_failure{reason="BACKEND"}``; a version that instead *returns* an error response
(``models.py``'s ``errors``) fails the same requests for the client (HTTP 500) but Triton 2.51 counts
them in ``nv_inference_request_success``: its metrics cannot show those errors to any analysis
(checked against the wheel's tritonserver: 10 requests, 5 HTTP 500s, success 10, failure 0).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mdview import EVENT_LINES, MD_EVENTS, Model, describe, measure, serving, settled, wait_status
from models import MODEL, SPEC_CONFIG, write_repository
from realtier import figure, on_real_node, operator_process, s3_on_node, s3_secret, unavailable
from routed import routed
from traffic import Traffic, describe_failures, failures, versions

from hack import prometheus
from kube import Cluster, wait_for
from operator_proc import OperatorProcess, install_crd

NS_PREFIX = "analysis"
BUCKET = "analysis"
REPLICAS = 1  # stable; the canary step at 50 % adds one candidate pod: half the traffic each
RATE = 20.0  # requests per second sent through the main Service
SLOW_LIMIT_MS = 200  # maxP99LatencyMs for the slow version (it takes 500 ms per request)
CANDIDATE_ERROR = "bad answer (test)"  # what only the raising version answers

HEALTHY, RAISES, SLOW, HEALTHY_TOO = 1, 2, 3, 4  # the repository's versions


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, cluster: Cluster) -> Iterator[tuple[Any, Any]]:
    """moto on the node IP, bucket ``analysis``, prefix ``repo``: the ``versioned`` model with
    versions 1 and 4 answering, 2 raising on every other request, 3 answering in 500 ms."""
    work = tmp_path_factory.mktemp("s3")
    source = write_repository(
        work / "repo", {HEALTHY: "answer", RAISES: "errors", SLOW: "slow", HEALTHY_TOO: "answer"}
    )
    with s3_on_node(work / "server") as server:
        key = server.setup(bucket=BUCKET, upload=source, prefix="repo")
        server.enforce_auth()
        yield server, key


@pytest.fixture(scope="module")
def operator(
    cluster: Cluster, images: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    install_crd(cluster)
    with operator_process(tmp_path_factory.mktemp("operator"), [f"{NS_PREFIX}-*"], images["operator"]) as op:
        yield op


class PodTargets:
    """Service discovery of the Triton pods for Prometheus, written as a ``file_sd`` targets file
    (Debian's prometheus is built without ``kubernetes_sd_configs``): every pod of this module's
    namespaces that has an IP and the ``prometheus.io/scrape`` annotation, at ``<pod IP>:8002``, with
    the target labels Kubernetes service discovery and the usual relabelling give it: the pod's
    labels (``modeldeploy.io/revision`` -> ``modeldeploy_io_revision``), ``namespace`` and ``pod``.
    A thread lists the pods every half second and rewrites the file (atomically) when it changes;
    Prometheus watches the file."""

    def __init__(self, cluster: Cluster, path: Path) -> None:
        self.cluster, self.path = cluster, path
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pod-targets", daemon=True)
        self.written = ""
        self.errors = 0
        self._write([])

    def targets(self) -> list[dict[str, Any]]:
        out = []
        for pod in self.cluster.core.list_pod_for_all_namespaces(label_selector="modeldeploy.io/name").items:
            meta = pod.metadata
            if not meta.namespace.startswith(f"{NS_PREFIX}-") or not pod.status.pod_ip:
                continue
            if (meta.annotations or {}).get("prometheus.io/scrape") != "true":
                continue
            labels = {re.sub(r"[^a-zA-Z0-9_]", "_", k): v for k, v in (meta.labels or {}).items()}
            labels.update(namespace=meta.namespace, pod=meta.name)
            out.append({"targets": [f"{pod.status.pod_ip}:8002"], "labels": labels})
        return sorted(out, key=lambda t: t["labels"]["pod"])

    def _write(self, targets: list[dict[str, Any]]) -> None:
        text = json.dumps(targets, indent=1)
        if text != self.written:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(self.path)
            self.written = text

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._write(self.targets())
            except Exception:  # the API server busy for a moment: the next round catches up
                self.errors += 1
            self._stop.wait(0.5)

    def __enter__(self) -> PodTargets:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture(scope="module")
def prom(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    try:
        binary = prometheus.ensure_prometheus()
    except prometheus.PrometheusUnavailable as err:
        unavailable(f"prometheus: {err}")
    work = tmp_path_factory.mktemp("prometheus")
    job = {
        "job_name": "triton-pods",
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "file_sd_configs": [{"files": [str(work / "pods.json")], "refresh_interval": "1s"}],
    }
    with PodTargets(cluster, work / "pods.json"):
        server = prometheus.Prometheus.start(binary, work, [], scrape_configs=[job])
        figure("prometheus", f"{prometheus.version(binary)}, ready in {server.ready_seconds:.2f}s")
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def namespace(cluster: Cluster, repo: tuple[Any, Any]) -> Iterator[str]:
    server, key = repo
    ns = cluster.create_namespace(prefix=NS_PREFIX)
    s3_secret(cluster, ns, server, key)
    try:
        yield ns
    finally:
        cluster.delete_namespace(ns)


def manifest(name: str, image: str, analysis: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "modeldeploy.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {
                "name": MODEL,
                "format": "python",
                "storageUri": f"s3://{BUCKET}/repo",
                "version": HEALTHY,
                "credentialsSecret": "s3",
                "config": SPEC_CONFIG,
            },
            "replicas": REPLICAS,
            "server": on_real_node(
                {
                    "image": image,
                    "imagePullPolicy": "Never",
                    "shmSize": "64Mi",
                    # Triton's own p99 (nv_inference_request_summary_us), besides its counters
                    "args": ["--metrics-config=summary_latencies=true"],
                }
            ),
            "rollout": {
                # analysis runs through the pause: a bad window fails the step long before it ends
                "steps": [{"weight": 50, "pause": {"duration": "600s"}}, {"weight": 100}],
                "progressDeadlineSeconds": 600,
                "scaleDownDelaySeconds": 0,
                "analysis": analysis,
            },
        },
    }


def source(kind: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    if kind == "scrape":
        return {"scrape": True}
    return {"prometheusUrl": request.getfixturevalue("prom").url}


def start_stable(cluster: Cluster, namespace: str, name: str, image: str, analysis: dict[str, Any]) -> Model:
    cluster.apply(manifest(name, image, analysis), namespace=namespace)
    md = Model(cluster, namespace, name)
    serving(md, 1)
    routed(md, {1: REPLICAS}, 1)
    return md


def prometheus_sees(prom: Any, md: Model, revision: int) -> None:
    """Prometheus has found the revision's pods and scraped their Triton counters, labelled as the
    operator selects them (namespace, revision hash)."""
    rev_hash = {v: k for k, v in md.revision_of_hash().items()}[revision]
    query = (
        f'nv_inference_request_success{{model="{MODEL}",namespace="{md.namespace}",'
        f'modeldeploy_io_revision="{rev_hash}"}}'
    )
    wait_for(lambda: prom.query(query), 60, interval=0.5, message=lambda: f"{query}: {prom.targets()}")


def back_on_stable(md: Model) -> dict[str, Any]:
    """Rolled back and settled: revision 1 stable, the candidate's pods gone. The phase stays
    ``RolledBack`` (the spec still asks for the candidate) until the spec changes."""

    def done(st: dict[str, Any]) -> bool:
        return (
            st.get("phase") == "RolledBack"
            and st.get("stableRevision") == 1
            and set(md.pods_by_revision()) == {1}
        )

    return wait_status(md, done, 240, "revision 1 serving alone after the rollback")


def warning_events(cluster: Cluster, namespace: str) -> str:
    return cluster.kubectl(
        "get", "events", "-n", namespace, "--field-selector", f"{MD_EVENTS},type=Warning", "-o", EVENT_LINES
    ).stdout  # fmt: skip


FAILING = {
    # name: (metric source, candidate version, thresholds, what the verdict must name)
    "errors-scrape": ("scrape", RAISES, {"maxErrorRate": 0.05}, "errorRate"),
    "errors-prometheus": ("prometheus", RAISES, {"maxErrorRate": 0.05}, "errorRate"),
    "slow-prometheus": ("prometheus", SLOW, {"maxErrorRate": 0.05, "maxP99LatencyMs": SLOW_LIMIT_MS}, "p99"),
}


@pytest.mark.parametrize("case", list(FAILING))
def test_candidate_failing_analysis_on_real_metrics_is_rolled_back(
    cluster: Cluster,
    operator: OperatorProcess,
    images: dict[str, str],
    namespace: str,
    request: pytest.FixtureRequest,
    case: str,
) -> None:
    kind, candidate, thresholds, metric = FAILING[case]
    analysis = {**source(kind, request), "interval": "10s", "minRequests": 10, "thresholds": thresholds}
    md = start_stable(cluster, namespace, "canary", images["triton"], analysis)
    if kind == "prometheus":
        prometheus_sees(request.getfixturevalue("prom"), md, 1)
    host, port = md.service_address()
    stable_ready: list[int] = []
    analyses: dict[tuple[str, str], dict[str, Any]] = {}
    with Traffic(host, port, MODEL, rate=RATE) as traffic:
        origin = time.monotonic()
        t0, t1 = measure(traffic, 40)
        assert versions(traffic.outcomes(t0, t1)) == {1: len(traffic.outcomes(t0, t1))}

        md.patch({"spec": {"model": {"version": candidate}}})
        t_change = time.monotonic()
        canary_ready: list[float] = []

        def rolled_back(st: dict[str, Any]) -> bool:
            eps = md.endpoints_by_revision()
            stable_ready.append(eps.get(1, 0))
            if eps.get(2) and not canary_ready:
                canary_ready.append(time.monotonic())
            la = st.get("lastAnalysis") or {}
            if la.get("verdict"):
                analyses.setdefault((la["verdict"], la.get("time", "")), la)
            return (st.get("rollout") or {}).get("state") == "RolledBack"

        st = wait_status(md, rolled_back, 300, "candidate rolled back by analysis")
        t_back = time.monotonic()
        # The status records the decision before the operator acts on it (a restart resumes from
        # it); the data plane follows asynchronously: the scale-down, the EndpointSlice controller,
        # then kube-proxy's rules. From then on no new connection reaches the candidate.
        settled(md, {1: REPLICAS})
        t_away = time.monotonic()
        back_on_stable(md)
        routed(md, {1: REPLICAS}, 1)
        t0, t1 = measure(traffic, 40)
        after = traffic.outcomes(t0, t1)
        outcomes = traffic.stop()

    verdict = st.get("lastAnalysis") or {}
    reason = (st.get("rollout") or {}).get("reason") or ""
    values = verdict.get("values") or {}
    seen = sorted({v for v, _ in analyses})
    assert verdict.get("verdict") == "Fail", verdict
    assert "Pass" not in seen, analyses
    assert reason.startswith("analysis failed: ") and metric in reason, reason
    if metric == "errorRate":
        # every other request the candidate served raised: the window's failures are half its requests
        assert values["failures"] >= 1 and abs(values["failures"] - values["requests"] / 2) <= 1, values
    else:
        assert values["p99Ms"] >= 500 > SLOW_LIMIT_MS and values["latencyMs"] >= 500, values
    rolled = next(c for c in st.get("conditions") or [] if c["type"] == "RolledBack")
    assert rolled["status"] == "True" and metric in rolled["message"], rolled
    warnings = warning_events(cluster, namespace)
    assert "RolledBack: revision 2 rolled back: analysis failed: " in warnings, warnings
    assert md.get()["spec"]["model"]["version"] == candidate  # the user's spec is left as written
    history = {h["revision"]: h for h in md.status().get("history") or []}
    assert history[2]["outcome"] == "RolledBack" and history[1]["outcome"] == "Serving", history

    # The client: the candidate really served (and failed) part of the traffic; stable never failed
    # and kept all its pods; after the rollback only stable answers.
    got = versions(outcomes)
    assert got[candidate] > 0 and set(got) <= {1, candidate}, got
    bad = failures(outcomes)
    if candidate == RAISES:
        assert bad and all(CANDIDATE_ERROR in (o.error or "") for o in bad), describe_failures(bad, origin)
        assert all(o.start < t_away for o in bad), describe_failures(bad, origin)
    else:
        assert not bad, describe_failures(bad, origin)
    assert versions(after) == {1: len(after)} and not failures(after), describe_failures(after, origin)
    assert min(stable_ready) == REPLICAS, f"stable lost capacity during the rollout: {stable_ready}"
    assert canary_ready, f"the candidate never joined the Service{describe(cluster, namespace)}"
    # the rollback reaches the data plane in seconds, not at the next resync
    assert t_away - t_back < 15, f"candidate still routed {t_away - t_back:.1f}s after RolledBack"

    shown = ", ".join(f"{k} {values[k]}" for k in ("requests", "failures", "errorRate", "latencyMs", "p99Ms"))
    figure(
        f"analysis rollback ({case})",
        f"change -> rolled back {t_back - t_change:.1f}s (candidate in the Service -> rolled back "
        f"{t_back - canary_ready[0]:.1f}s, windows of {analysis['interval']}; rolled back -> candidate out "
        f"of kube-proxy's rules {t_away - t_back:.1f}s, {sum(o.start >= t_back for o in bad)} failed "
        f"requests sent meanwhile); verdicts {seen}; "
        f"failing window: {shown}; client: {len(outcomes)} requests, {dict(got)} answered per version, "
        f"{len(bad)} failed" + (" (all by the candidate's raising version)" if bad else ""),
    )


def test_too_little_traffic_is_inconclusive_never_a_pass(
    cluster: Cluster, operator: OperatorProcess, images: dict[str, str], namespace: str
) -> None:
    """A healthy candidate that gets a few requests per window, fewer than ``minRequests``: every
    window is Inconclusive in status, the rollout holds at its first step (never promoted), and after
    ``maxInconclusive`` such windows in a row the step fails and the candidate is rolled back."""
    min_requests, max_inconclusive = 100, 2
    analysis = {
        "scrape": True,
        "interval": "5s",
        "minRequests": min_requests,
        "maxInconclusive": max_inconclusive,
        "thresholds": {"maxErrorRate": 0.05},
    }
    md = start_stable(cluster, namespace, "quiet", images["triton"], analysis)
    host, port = md.service_address()
    analyses: dict[tuple[str, str], dict[str, Any]] = {}
    while_inconclusive: list[tuple[int | None, str | None]] = []
    with Traffic(host, port, MODEL, rate=4) as traffic:
        origin = time.monotonic()
        md.patch({"spec": {"model": {"version": HEALTHY_TOO}}})

        def rolled_back(st: dict[str, Any]) -> bool:
            la = st.get("lastAnalysis") or {}
            if la.get("verdict"):
                analyses.setdefault((la["verdict"], la.get("time", "")), la)
            ro = st.get("rollout") or {}
            if la.get("verdict") == "Inconclusive":
                while_inconclusive.append((st.get("stableRevision"), ro.get("state")))
            return ro.get("state") == "RolledBack"

        st = wait_status(md, rolled_back, 300, "rolled back after inconclusive windows")
        back_on_stable(md)
        outcomes = traffic.stop()

    judged = [
        la for (verdict, _), la in sorted(analyses.items(), key=lambda kv: kv[0][1]) if verdict != "Pending"
    ]
    verdicts = [la["verdict"] for la in judged]
    assert "Pass" not in verdicts, judged
    inconclusive = [la for la in judged if la["verdict"] == "Inconclusive"]
    assert inconclusive, f"status never showed an Inconclusive window: {judged}"
    for la in inconclusive:
        assert la["values"]["requests"] < min_requests, la
        assert f"fewer than minRequests {min_requests}" in la["reason"], la
    assert any(la["values"]["requests"] > 0 for la in inconclusive), inconclusive  # traffic, too little
    assert while_inconclusive and set(while_inconclusive) == {(1, "Progressing")}, while_inconclusive
    final = st["lastAnalysis"]
    reason = st["rollout"]["reason"]
    assert final["verdict"] == "Fail" and final["inconclusiveCount"] == max_inconclusive + 1, final
    assert reason.startswith(
        f"analysis failed: insufficient traffic: {max_inconclusive + 1} inconclusive windows in a row "
        f"(maxInconclusive {max_inconclusive})"
    ), reason
    assert "RolledBack: revision 2 rolled back: analysis failed: insufficient traffic" in warning_events(
        cluster, namespace
    )
    history = {h["revision"]: h for h in md.status().get("history") or []}
    assert history[2]["outcome"] == "RolledBack", history
    assert not failures(outcomes), describe_failures(outcomes, origin)
    assert versions(outcomes)[HEALTHY_TOO] > 0, versions(outcomes)
    figure(
        "too little traffic",
        f"windows {[(la['verdict'], la['values'].get('requests')) for la in judged]} "
        f"(minRequests {min_requests}, maxInconclusive {max_inconclusive}); client {len(outcomes)} requests, "
        f"{dict(versions(outcomes))} per version, 0 failed",
    )
