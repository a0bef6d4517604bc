"""End to end: a canary whose analysis reads real Triton metrics through a real Prometheus
promotes a healthy version and rolls back a failing one by itself (issue: canary analysis
on the local cluster).

On the local cluster the pods are kwok fakes, so the metrics come from one real
``tritonserver`` on 127.0.0.1 (nvidia-pytriton wheel, see ``hack/triton.py``) serving the
model's versions side by side:

* versions 1 and 2: healthy;
* version 3: raises in ``execute`` for every ``FAIL_EVERY``-th request (Triton counts that
  as ``nv_inference_request_failure{reason="BACKEND"}``).

A real Prometheus (``hack/prometheus.py``, 1 s scrape interval) scrapes that server's
metrics port once per revision, each job carrying the labels Kubernetes service discovery
would give the revision's pods: ``modeldeploy_io_revision=<revision hash>`` and
``namespace=<test namespace>``. Revision hashes are deterministic
(:func:`modeldeploy.modeldeployment.revision.revision_hash`), so they are computed before the spec is
applied. The operator selects each revision's series by model, Triton ``version`` (from
``status.history[].modelVersion``) and those two labels: exactly what it would select in a
real cluster.

A bounded background thread sends tritonclient HTTP requests (loopback) to the versions a
rollout concerns: the stable's and the candidate's, as the canary split would.

The story: version 1 Ready; patch to 2 -> a Pass window -> promoted; patch to 3 -> a Fail
window naming the error rate -> rolled back by itself (spec left at 3, version 2 serving,
a Warning Event); back to 2 and to 3 again -> the retry is measured afresh (a new window,
not the first attempt's verdict) and rolled back again.

Without tritonserver or Prometheus the test is skipped with the reason; with
``MODELDEPLOY_REQUIRE_TRITON=1`` or ``MODELDEPLOY_REQUIRE_CLUSTER=1`` it fails instead.
Timings and every analysis verdict the operator wrote go to stdout (``pytest -s``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest

from conftest import MD, model_deployment
from hack import prometheus
from hack import triton as triton_launcher
from hackmods import unavailable as _unavailable
from kube import Cluster, hold_for, wait_for
from modeldeploy import api
from modeldeploy.modeldeployment import revision
from tritonmodels import flaky_py

pytestmark = pytest.mark.triton

REPO_ROOT = Path(__file__).resolve().parents[2]
NAME = "e2e-canary"  # ModelDeployment name = Triton model name (spec.model.name defaults to it)
FAIL_EVERY = 3  # version 3: every 3rd request raises -> error rate 1/3
HEALTHY, FAILING = (1, 2), 3
MAX_ERROR_RATE = 0.05
MIN_REQUESTS = 10
INTERVAL = "3s"
TRAFFIC_RATE = 20.0  # rounds per second; one request per version per round
TRAFFIC_MAX_SECONDS = 420.0
TRAFFIC_MAX_REQUESTS = 40_000

CONFIG = f"""
name: "{NAME}"
backend: "python"
max_batch_size: 0
version_policy: {{ specific {{ versions: [ 1, 2, 3 ] }} }}
input [ {{ name: "X" data_type: TYPE_FP32 dims: [ 1 ] }} ]
output [ {{ name: "Y" data_type: TYPE_FP32 dims: [ 1 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""

VERSIONS = {
    1: flaky_py(),
    2: flaky_py(),
    3: flaky_py(fail_every=FAIL_EVERY),
}


# --------------------------------------------------------------------------- environment


def unavailable(reason: str) -> NoReturn:
    _unavailable(reason, ("MODELDEPLOY_REQUIRE_TRITON", "MODELDEPLOY_REQUIRE_CLUSTER"))


def log(msg: str) -> None:
    print(msg, flush=True)


@pytest.fixture(autouse=True)
def _needs_simulated_pods(cluster: Cluster) -> None:
    if not cluster.simulated:
        pytest.skip("needs kwok-simulated pods (the model's storageUri is not real; Triton runs on loopback)")


@pytest.fixture(scope="module")
def tritonserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One real tritonserver serving model NAME in versions 1, 2 (healthy) and 3 (failing)."""
    try:
        dist = triton_launcher.prepare()
    except triton_launcher.TritonUnavailable as err:
        unavailable(f"tritonserver unavailable: {err}")
    work = tmp_path_factory.mktemp("e2e-triton")
    model_dir = work / "models" / NAME
    model_dir.mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(CONFIG)
    for version, source in VERSIONS.items():
        (model_dir / str(version)).mkdir()
        (model_dir / str(version) / "model.py").write_text(source)
    try:
        server = triton_launcher.TritonServer.start(
            dist, work / "models", log_path=work / "tritonserver.log", ready_timeout=180
        )
    except triton_launcher.TritonStartError as err:
        unavailable(f"tritonserver does not start: {err}")
    try:
        log(f"\ntritonserver ready in {server.ready_seconds:.2f}s, metrics {server.metrics_url}")
        for version in VERSIONS:
            assert server.model_ready(NAME, version), f"version {version} not ready:\n{server.log_tail()}"
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def prometheus_binary() -> Path:
    try:
        binary: Path = prometheus.ensure_prometheus()
    except prometheus.PrometheusUnavailable as err:
        unavailable(f"prometheus unavailable: {err}")
    return binary


# --------------------------------------------------------------------------- traffic


@dataclass
class Tally:
    sent: int = 0
    failed: int = 0


class Traffic:
    """Bounded background inference traffic (tritonclient HTTP, loopback only).

    Each round sends one request to each version in :attr:`versions` (switchable while it
    runs), ``rate`` rounds a second; it stops by itself after ``max_seconds`` or
    ``max_requests``, and at :meth:`stop`. Failures other than the failing version's
    on-purpose ones are kept in :attr:`unexpected`.
    """

    def __init__(self, address: str, *, rate: float, max_seconds: float, max_requests: int) -> None:
        self.address = address
        self.rate = rate
        self.max_seconds = max_seconds
        self.max_requests = max_requests
        self.versions: tuple[int, ...] = ()
        self.tally: dict[int, Tally] = {}
        self.unexpected: list[str] = []
        self.ended: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="e2e-traffic", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def send_to(self, *versions: int) -> None:
        with self._lock:
            self.versions = tuple(versions)

    def counts(self) -> dict[int, tuple[int, int]]:
        with self._lock:
            return {v: (t.sent, t.failed) for v, t in sorted(self.tally.items())}

    def _run(self) -> None:
        import numpy as np
        import tritonclient.http as httpclient
        from tritonclient.utils import InferenceServerException

        client = httpclient.InferenceServerClient(self.address, connection_timeout=10, network_timeout=10)
        deadline = time.monotonic() + self.max_seconds
        total = 0
        try:
            while not self._stop.is_set():
                if time.monotonic() > deadline:
                    self.ended = f"time bound {self.max_seconds:.0f}s reached"
                    return
                if total >= self.max_requests:
                    self.ended = f"request bound {self.max_requests} reached"
                    return
                with self._lock:
                    versions = self.versions
                for version in versions:
                    x = httpclient.InferInput("X", [1], "FP32")
                    x.set_data_from_numpy(np.array([float(total)], dtype=np.float32))
                    failed = False
                    try:
                        out = client.infer(NAME, [x], model_version=str(version))
                        y = out.as_numpy("Y")
                        if y is None or float(y[0]) != 2.0 * total:
                            self.unexpected.append(f"v{version}: wrong answer {y!r} for {total}")
                    except InferenceServerException as err:
                        failed = True
                        if version != FAILING or "fails on purpose" not in str(err):
                            self.unexpected.append(f"v{version}: {err}")
                    except Exception as err:  # connection trouble: note it, keep going
                        failed = True
                        self.unexpected.append(f"v{version}: {type(err).__name__}: {err}")
                    total += 1
                    with self._lock:
                        t = self.tally.setdefault(version, Tally())
                        t.sent += 1
                        t.failed += failed
                self._stop.wait(1.0 / self.rate)
            self.ended = "stopped"
        finally:
            client.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "traffic thread did not stop"


# --------------------------------------------------------------------------- observation


@dataclass
class Watch:
    """Polls one ModelDeployment; keeps each distinct status.lastAnalysis and phase change."""

    md: MD
    t0: float = field(default_factory=time.monotonic)
    analyses: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    phases: list[tuple[float, str | None, str | None]] = field(default_factory=list)
    last: dict[str, Any] = field(default_factory=dict)
    seen: dict[str, Any] | None = None  # the last lastAnalysis polled (across marks)

    def mark(self) -> None:
        """Start a new phase: times from here; analyses already seen are not recorded again."""
        self.t0 = time.monotonic()
        self.analyses, self.phases = [], []

    def poll(self) -> dict[str, Any]:
        obj = self.md.get()
        st = dict(obj.get("status") or {})
        t = time.monotonic() - self.t0
        la = st.get("lastAnalysis")
        if la and la != self.seen:
            self.seen = la
            self.analyses.append((t, la))
            vals = la.get("values") or {}
            brief = {k: vals[k] for k in ("requests", "failures", "errorRate", "stableRequests") if k in vals}
            log(f"  t={t:5.1f}s analysis {la.get('verdict')}: {la.get('reason')}  {brief}")
        ro = st.get("rollout") or {}
        key = (st.get("phase"), ro.get("state"))
        if not self.phases or self.phases[-1][1:] != key:
            self.phases.append((t, *key))
            log(
                f"  t={t:5.1f}s phase={key[0]} state={key[1]} step={ro.get('step')} weight={ro.get('weight')}"
            )
        self.last = {**st, "_spec": obj.get("spec") or {}}
        return self.last

    def until(self, pred: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            st = self.poll()
            return st if pred(st) else None

        found = wait_for(check, timeout, interval=0.25, message=lambda: f"{what}; last status: {self.last}")
        assert found is not None
        return found

    def first(self, verdict: str) -> tuple[float, dict[str, Any]] | None:
        return next(((t, a) for t, a in self.analyses if a.get("verdict") == verdict), None)


def ready_on(st: dict[str, Any], number: int, version: int) -> bool:
    return (
        st.get("phase") == "Ready"
        and st.get("stableRevision") == number
        and st.get("servingVersion") == version
        and (st.get("rollout") or {}).get("state") == "Idle"
    )


def spec_at(body: dict[str, Any], version: int) -> dict[str, Any]:
    return {**body["spec"], "model": {**body["spec"]["model"], "version": version}}


def rev_hash(body: dict[str, Any], version: int) -> str:
    return revision.revision_hash(api.ModelDeploymentSpec.model_validate(spec_at(body, version)))


# --------------------------------------------------------------------------- the test


def test_canary_analysis_promotes_healthy_and_rolls_back_failing(
    cluster: Cluster,
    md_ns: str,
    md_factory: Any,
    tritonserver: Any,
    prometheus_binary: Path,
    tmp_path: Path,
) -> None:
    t_start = time.monotonic()
    body = model_deployment(NAME, version=1, replicas=2)
    body["spec"]["model"]["format"] = "python"
    # Prometheus is known only once started: fill prometheusUrl below.
    hashes = {v: rev_hash(body, v) for v in VERSIONS}
    assert len(set(hashes.values())) == len(VERSIONS), hashes
    log(f"\nnamespace {md_ns}; revision hashes by model version: {hashes}")

    addr = f"127.0.0.1:{tritonserver.metrics_port}"
    targets = [
        prometheus.ScrapeTarget(addr, {"modeldeploy_io_revision": h, "namespace": md_ns}, job=f"rev-v{v}")
        for v, h in hashes.items()
    ]
    traffic = Traffic(
        tritonserver.http_address,
        rate=TRAFFIC_RATE,
        max_seconds=TRAFFIC_MAX_SECONDS,
        max_requests=TRAFFIC_MAX_REQUESTS,
    )
    prom = prometheus.Prometheus.start(prometheus_binary, tmp_path / "prometheus", targets)
    try:
        prom.wait_targets_up(timeout=60)
        log(f"prometheus {prom.url} ready in {prom.ready_seconds:.2f}s, {len(targets)} targets up")

        # Every version's series exists under its own revision's labels before anything is judged.
        traffic.send_to(*VERSIONS)
        traffic.start()

        def series_present() -> bool:
            for v, h in hashes.items():
                q = (
                    f'nv_inference_request_success{{model="{NAME}",version="{v}",'
                    f'modeldeploy_io_revision="{h}",namespace="{md_ns}"}}'
                )
                if not prom.query(q):
                    return False
            return True

        wait_for(series_present, 60, interval=0.5, message="each revision's Triton series in Prometheus")
        traffic.send_to()

        body["spec"]["rollout"] = {
            "strategy": "Canary",
            "steps": [{"weight": 50}, {"weight": 100}],
            "scaleDownDelaySeconds": 0,
            "progressDeadlineSeconds": 120,
            "analysis": {
                "prometheusUrl": prom.url,
                "interval": INTERVAL,
                "minRequests": MIN_REQUESTS,
                "maxInconclusive": 5,
                "thresholds": {"maxErrorRate": MAX_ERROR_RATE},
            },
        }
        assert rev_hash(body, 1) == hashes[1]  # the rollout settings do not shape pods
        md = md_factory(body)
        watch = Watch(md)
        st = watch.until(lambda s: ready_on(s, 1, 1), 120, "revision 1 Ready")
        history = {r["modelVersion"]: r["hash"] for r in st["history"]}
        assert history == {1: hashes[1]}, f"operator's revision hash differs from the computed one: {history}"
        log(f"[timing] apply -> Ready on version 1: {time.monotonic() - watch.t0:.1f}s")

        # ---- 1. healthy version 2: analysis passes, promoted by itself
        traffic.send_to(1, 2)  # stable and candidate both take traffic, as the canary split does
        watch.mark()
        md.patch({"spec": {"model": {"version": 2}}})
        st = watch.until(lambda s: ready_on(s, 2, 2), 150, "version 2 promoted")
        t_promoted = time.monotonic() - watch.t0
        log(f"[timing] patch version 2 -> promoted: {t_promoted:.1f}s")
        promote_analyses = list(watch.analyses)
        sent = traffic.counts()

        first_pass = watch.first("Pass")
        assert first_pass is not None, f"promoted without an observed Pass: {promote_analyses}"
        assert not any(a["verdict"] == "Fail" for _, a in promote_analyses), promote_analyses
        la = st["lastAnalysis"]
        assert la["verdict"] == "Pass", la
        assert la["reason"].startswith("within limits: "), la
        vals = la["values"]
        assert vals["requests"] >= MIN_REQUESTS and vals["failures"] == 0 and vals["errorRate"] == 0, vals
        assert vals["stableRequests"] >= 1 and vals["stableErrorRate"] == 0, vals  # stable v1 selected too
        assert vals["windowSeconds"] >= api.parse_duration(INTERVAL) - 0.5, vals
        # Each of the 3 jobs scrapes the same server: a selection ignoring the revision label
        # would count every request 3 times, more than were ever sent.
        assert vals["requests"] <= sent[2][0] and vals["stableRequests"] <= sent[1][0], (vals, sent)
        by_rev = {r["revision"]: r for r in st["history"]}
        assert by_rev[2]["hash"] == hashes[2] and by_rev[2]["outcome"] == "Serving", by_rev
        assert by_rev[1]["outcome"] == "Superseded", by_rev
        # Events are posted after the status write they tell of (in the background): wait for it
        promoted = wait_for(
            lambda: [e for e in md.events() if e.reason == "Promoted" and "revision 2 promoted" in e.message],
            30,
            message="a Promoted Event",
        )
        assert promoted[0].type == "Normal"
        wait_for(
            lambda: {p.metadata.labels["modeldeploy.io/revision"] for p in md.pods()} == {hashes[2]},
            60,
            message=lambda: f"only revision 2 pods left: {[p.metadata.name for p in md.pods()]}",
        )

        # ---- 2. failing version 3: analysis fails, rolled back by itself
        traffic.send_to(2, 3)
        watch.mark()
        md.patch({"spec": {"model": {"version": 3}}})
        st = watch.until(
            lambda s: (
                s.get("phase") == "RolledBack" and (s.get("rollout") or {}).get("state") == "RolledBack"
            ),
            150,
            "version 3 rolled back",
        )
        t_rolled_back = time.monotonic() - watch.t0
        log(f"[timing] patch version 3 -> rolled back: {t_rolled_back:.1f}s")
        fail_t = watch.first("Fail")
        assert fail_t is not None, watch.analyses
        la = st["lastAnalysis"]
        assert la["verdict"] == "Fail", la
        vals = la["values"]
        assert vals["errorRate"] > MAX_ERROR_RATE and vals["failures"] > 0, vals
        assert abs(vals["errorRate"] - 1 / FAIL_EVERY) < 0.15, vals  # about every 3rd request failed
        assert vals["stableErrorRate"] == 0 and vals["stableRequests"] >= 1, vals  # stable: version 2
        assert la["reason"].startswith("errorRate ") and "> maxErrorRate 5%" in la["reason"], la
        sent = traffic.counts()
        assert vals["requests"] <= sent[3][0] and vals["failures"] <= sent[3][1], (vals, sent)

        assert st["_spec"]["model"]["version"] == 3  # the spec is left as written
        assert st["servingVersion"] == 2 and st["stableRevision"] == 2, st
        reason = st["rollout"]["reason"]
        assert reason.startswith("analysis failed: errorRate ") and "maxErrorRate 5%" in reason, reason
        assert st["message"].startswith("revision 3 rolledback: analysis failed: errorRate"), st["message"]
        conds = {c["type"]: c for c in st["conditions"]}
        assert conds["RolledBack"]["status"] == "True" and "errorRate" in conds["RolledBack"]["message"]
        assert conds["Ready"]["status"] == "True", conds
        by_rev = {r["revision"]: r for r in st["history"]}
        assert by_rev[3]["hash"] == hashes[3] and by_rev[3]["outcome"] == "RolledBack", by_rev
        assert "errorRate" in (by_rev[3].get("reason") or ""), by_rev[3]
        assert by_rev[2]["outcome"] == "Serving", by_rev
        warnings = wait_for(
            lambda: [e for e in md.events() if e.reason == "RolledBack" and e.type == "Warning"],
            30,
            message="a Warning RolledBack Event",
        )
        message = warnings[0].message
        assert "revision 3 rolled back: analysis failed: errorRate" in message, message
        assert "traffic back on revision 2" in message, message
        wait_for(
            lambda: (
                {p.metadata.labels["modeldeploy.io/revision"] for p in md.pods()} == {hashes[2]}
                and len(md.pods()) == 2
            ),
            60,
            message=lambda: (
                f"candidate pods gone, 2 of revision 2 left: {[p.metadata.name for p in md.pods()]}"
            ),
        )
        # It stays rolled back while the spec still says 3 (no retry loop), for a few windows.
        hold_for(
            lambda: watch.poll().get("phase") == "RolledBack" and watch.last.get("servingVersion") == 2,
            3 * api.parse_duration(INTERVAL),
            interval=0.5,
            message=lambda: f"RolledBack on version 2: {watch.last}",
        )
        first_fail, first_started_at = st["lastAnalysis"], st["rollout"]["startedAt"]

        # ---- 3. back to version 2, then version 3 again: the retry is measured afresh, not
        # judged by the earlier attempt's verdict (same candidate hash, same step).
        watch.mark()
        md.patch({"spec": {"model": {"version": 2}}})
        watch.until(lambda s: ready_on(s, 2, 2), 60, "back on version 2")
        watch.mark()
        md.patch({"spec": {"model": {"version": 3}}})
        st = watch.until(
            lambda s: (
                s.get("phase") == "RolledBack"
                and (s.get("rollout") or {}).get("state") == "RolledBack"
                and s["rollout"].get("startedAt") != first_started_at
            ),
            150,
            "version 3 rolled back again",
        )
        t_retry = time.monotonic() - watch.t0
        log(f"[timing] patch version 3 again -> rolled back: {t_retry:.1f}s")
        verdicts = [a["verdict"] for _, a in watch.analyses]
        assert verdicts[:1] == ["Pending"] and "Fail" in verdicts, watch.analyses
        assert st["lastAnalysis"] != first_fail and st["lastAnalysis"]["verdict"] == "Fail", st[
            "lastAnalysis"
        ]
        assert st["lastAnalysis"]["values"]["errorRate"] > MAX_ERROR_RATE, st["lastAnalysis"]
    finally:
        traffic.stop()
        prom.stop()
    counts = traffic.counts()
    log(f"traffic: {counts} (sent, failed) per version; ended: {traffic.ended}")
    assert traffic.ended == "stopped", traffic.ended
    assert not traffic.unexpected, traffic.unexpected[:5]
    assert counts[FAILING][1] > 0 and all(counts[v][1] == 0 for v in HEALTHY), counts
    log(
        f"[timing] promoted {t_promoted:.1f}s after the patch (first Pass at {first_pass[0]:.1f}s), "
        f"rolled back {t_rolled_back:.1f}s after the patch (first Fail at {fail_t[0]:.1f}s); "
        f"test {time.monotonic() - t_start:.1f}s"
    )
