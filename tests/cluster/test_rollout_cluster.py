"""Progressive rollouts and automatic rollback, against the real local cluster with the operator
as a subprocess (issue: progressive rollouts and automatic rollback).

kwok stands in for the kubelets: pods labelled ``simulate: never-ready`` run but never become
Ready, ``simulate: crashloop`` ones sit in CrashLoopBackOff. A failing version sets the label
through ``spec.server.podLabels``, so only that revision's pods carry it.

Every rollout is watched continuously (:class:`Observer` polls the ModelDeployment, its
Deployments, the main Service's selector and its EndpointSlices, and the HPA) from the patch
that starts it until it ends, so the capacity and traffic assertions hold at every observation,
not just at the end. Timings go to stdout (``pytest -s`` shows them).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import figures
from conftest import MD, fresh_namespace, model_deployment, ready_on, running_operator
from kube import Cluster, hold_for, wait_for
from operator_proc import OperatorProcess

REV_LABEL = "modeldeploy.io/revision"
IMAGE = "nvcr.io/nvidia/tritonserver:25.10-py3"
VENV_BIN = Path(sys.executable).parent
TIMINGS: dict[str, float] = {}


@pytest.fixture(autouse=True)
def _needs_simulated_pods(cluster: Cluster) -> None:
    if not cluster.simulated:
        pytest.skip("needs kwok-simulated pods (never-ready/crashloop by label; no Triton image pulls)")


# --------------------------------------------------------------------------- observation


@dataclass
class Snap:
    """One observation of a ModelDeployment and what serves its traffic."""

    t: float
    status: dict[str, Any]
    spec: dict[str, Any]
    generation: int
    deps: dict[int, tuple[int, int]]  # revision -> (spec.replicas, readyReplicas)
    endpoints: dict[int, int]  # revision -> ready endpoints of the main Service (-1: unknown pod)
    main_rev: int | None  # revision pinned by the main Service's selector (None: every revision)
    preview_rev: int | None = None
    hpa: tuple[str, int] | None = None  # (scaleTargetRef.name, minReplicas)
    dep_names: dict[int, str] = field(default_factory=dict)

    @property
    def rollout(self) -> dict[str, Any]:
        return dict(self.status.get("rollout") or {})

    @property
    def state(self) -> str | None:
        return self.rollout.get("state")

    @property
    def stable(self) -> int | None:
        return self.status.get("stableRevision")

    @property
    def ready_endpoints(self) -> int:
        return sum(self.endpoints.values())

    def brief(self) -> str:
        ro = self.rollout
        return (
            f"t={self.t:.1f} phase={self.status.get('phase')} state={ro.get('state')} step={ro.get('step')} "
            f"weight={ro.get('weight')} stable={ro.get('stableRevision')} cand={ro.get('candidateRevision')} "
            f"deps={self.deps} endpoints={self.endpoints} main={self.main_rev} preview={self.preview_rev} "
            f"hpa={self.hpa} reason={ro.get('reason')!r}"
        )


class Observer:
    """Polls one ModelDeployment and keeps every observation (``snaps``)."""

    def __init__(self, md: MD, *, preview: bool = False, hpa: bool = False) -> None:
        self.md, self.preview, self.hpa = md, preview, hpa
        self.cluster: Cluster = md.cluster
        self.snaps: list[Snap] = []
        self.t0 = time.monotonic()

    def mark(self) -> None:
        """Start a new phase of observation: times are measured from here."""
        self.t0 = time.monotonic()
        self.snaps = []

    def _rev_of_hash(self, status: dict[str, Any]) -> dict[str, int]:
        return {h["hash"]: h["revision"] for h in status.get("history") or []}

    def _selector_hash(self, name: str) -> str | None:
        svc = self.cluster.core.read_namespaced_service(name, self.md.namespace)
        return (svc.spec.selector or {}).get(REV_LABEL)

    def snap(self) -> Snap:
        ns, name = self.md.namespace, self.md.name
        hpa = None
        if self.hpa:
            # Read before the status: the operator persists a transition's status first and applies
            # the HPA after it, so an HPA read first is never newer than the status read next (read
            # after, it could be the next state's HPA beside this state's status).
            h = self.cluster.autoscaling.read_namespaced_horizontal_pod_autoscaler(name, ns)
            hpa = (h.spec.scale_target_ref.name, h.spec.min_replicas)
        obj = self.md.get()
        status = dict(obj.get("status") or {})
        revs = self._rev_of_hash(status)
        deps: dict[int, tuple[int, int]] = {}
        dep_names: dict[int, str] = {}
        for d in self.md.deployments():
            if d.metadata.deletion_timestamp is not None:
                continue
            n = int((d.metadata.annotations or {}).get("modeldeploy.io/revision-number", -1))
            deps[n] = (d.spec.replicas, d.status.ready_replicas or 0)
            dep_names[n] = d.metadata.name
        pod_hash = {
            p.metadata.name: (p.metadata.labels or {}).get(REV_LABEL, "")
            for p in self.cluster.core.list_namespaced_pod(
                ns, label_selector=f"modeldeploy.io/name={name}"
            ).items
        }
        pods = {pod: revs.get(h, -1) for pod, h in pod_hash.items()}
        slices = self.cluster.discovery.list_namespaced_endpoint_slice(
            ns, label_selector=f"kubernetes.io/service-name={name}"
        )
        ready_pods: set[str] = set()
        for s in slices.items:
            for e in s.endpoints or []:
                if e.conditions and e.conditions.ready and e.target_ref is not None:
                    ready_pods.add(e.target_ref.name)
        endpoints: dict[int, int] = {}
        for pod in ready_pods:
            rev = pods.get(pod, -1)
            endpoints[rev] = endpoints.get(rev, 0) + 1
        main_hash = self._selector_hash(name)
        preview_hash = self._selector_hash(f"{name}-preview") if self.preview else None
        if any(h is not None and h not in revs for h in (main_hash, preview_hash)) or -1 in endpoints:
            # Written after the status we read (status is persisted first): map with the newer history.
            revs = self._rev_of_hash(self.md.status())
            endpoints = {}
            for pod in ready_pods:
                rev = pods.get(pod, -1)
                rev = rev if rev != -1 else revs.get(pod_hash.get(pod, ""), -1)
                endpoints[rev] = endpoints.get(rev, 0) + 1
        return Snap(
            t=time.monotonic() - self.t0,
            status=status,
            spec=obj["spec"],
            generation=obj["metadata"]["generation"],
            deps=deps,
            endpoints=endpoints,
            main_rev=None if main_hash is None else revs.get(main_hash, -1),
            preview_rev=None if preview_hash is None else revs.get(preview_hash, -1),
            hpa=hpa,
            dep_names=dep_names,
        )

    def until(
        self,
        pred: Callable[[Snap], object],
        timeout: float,
        what: str,
        *,
        every: Callable[[Snap], object] | None = None,
        interval: float = 0.15,
    ) -> Snap:
        """Poll until ``pred`` holds; ``every`` (an assertion) is checked on each observation."""
        found: list[Snap] = []

        def poll() -> bool:
            s = self.snap()
            self.snaps.append(s)
            if every is not None:
                every(s)
            if pred(s):
                found.append(s)
                return True
            return False

        def describe() -> str:
            return f"{what}; last observations:\n  " + "\n  ".join(s.brief() for s in self.snaps[-4:])

        wait_for(poll, timeout, interval=interval, message=describe)
        return found[0]


def strict(check: Callable[[Snap], None]) -> Callable[[Snap], None]:
    """An ``every`` check whose failures are real failures, not "not yet" (wait_for retries exceptions)."""

    def run(s: Snap) -> None:
        try:
            check(s)
        except AssertionError as e:
            raise _Violation(f"{e}\nat {s.brief()}") from None

    return run


class _Violation(BaseException):
    """Escapes wait_for (which retries on Exception) so an invariant breach fails the test at once."""


def record(name: str, seconds: float) -> None:
    TIMINGS[name] = seconds
    figures.figure("rollout timings", name, f"{seconds:.2f}s")


# --------------------------------------------------------------------------- helpers


def plugin(cluster: Cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``kubectl modeldeploy ...``: kubectl finds our plugin executable on PATH."""
    if not (VENV_BIN / "kubectl-modeldeploy").exists():
        pytest.fail("kubectl-modeldeploy is not installed: run .venv/bin/pip install -e .", pytrace=False)
    env = dict(cluster.env)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(
        [cluster.which("kubectl"), "modeldeploy", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"kubectl modeldeploy {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc


def history_rows(out: str) -> list[list[str]]:
    """The plugin's history table as rows of cells (columns are 3+ spaces apart)."""
    lines = out.splitlines()
    header = lines[0]
    cols = ["REVISION", "MODEL VERSION", "IMAGE", "CREATED", "OUTCOME", "REASON"]
    starts = [header.index(c) for c in cols]
    ends = [*starts[1:], None]
    return [[line[a:b].strip() for a, b in zip(starts, ends, strict=True)] for line in lines[1:]]


def events(md: MD, reason: str, contains: str = "") -> list[Any]:
    return [e for e in md.events() if e.reason == reason and contains in (e.message or "")]


def failing(version: int, simulate: str) -> dict[str, Any]:
    """A spec patch to a version whose pods misbehave (kwok Stage by pod label)."""
    return {"spec": {"model": {"version": version}, "server": {"podLabels": {"simulate": simulate}}}}


def canary(*steps: dict[str, Any], delay: int = 0, deadline: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"strategy": "Canary", "steps": list(steps), "scaleDownDelaySeconds": delay}
    if deadline is not None:
        out["progressDeadlineSeconds"] = deadline
    return out


def serving(obs: Observer, revision: int, pods: int, timeout: float = 30) -> Snap:
    """Wait until the main Service's ready endpoints are exactly ``pods`` pods of ``revision``
    (EndpointSlices trail pod readiness by a moment)."""
    return obs.until(
        lambda s: s.endpoints == {revision: pods}, timeout, f"{pods} endpoints of revision {revision}"
    )


# --------------------------------------------------------------------------- 1. canary steps


def test_canary_steps_split_replicas_and_endpoints_by_weight(md_factory: Any) -> None:
    md = md_factory(
        model_deployment(
            "walk",
            replicas=3,
            rollout=canary(
                {"weight": 25, "pause": {"duration": "4s"}},
                {"weight": 50, "pause": {"duration": "4s"}},
                {"weight": 100},
                delay=2,
            ),
        )
    )
    ready_on(md, 1)
    obs = Observer(md)
    serving(obs, 1, 3)
    obs.mark()
    md.patch({"spec": {"model": {"version": 2}}})

    def stable_full(s: Snap) -> None:
        # The stable revision keeps all its ready pods behind the main Service until the candidate
        # takes over: Promoting (persisted before the Services are switched, stableRevision still 1
        # until the next reconcile) is that take-over, so from then on the main Service may select
        # revision 2 alone (CI caught the moment in between once).
        if s.stable == 1 and s.state != "Promoting":
            assert s.endpoints.get(1, 0) == 3, "revision 1 lost ready endpoints mid-rollout"

    every = strict(stable_full)
    # replicas 3: weight 25 -> 1 candidate pod (1/4), weight 50 -> 3 (3/6).
    for step, weight, cand_pods in ((0, 25, 1), (1, 50, 3)):

        def at_step(s: Snap, step: int = step, cand_pods: int = cand_pods) -> bool:
            ro = s.rollout
            return (
                ro.get("state") == "Progressing"
                and ro.get("step") == step
                and s.deps.get(1) == (3, 3)
                and s.deps.get(2) == (cand_pods, cand_pods)
                and s.endpoints == {1: 3, 2: cand_pods}
            )

        s = obs.until(at_step, 60, f"step {step}: 3 stable + {cand_pods} candidate endpoints", every=every)
        assert s.status["canaryWeight"] == weight and s.status["currentStep"] == step
        assert round(100 * s.endpoints[2] / s.ready_endpoints) == weight
        assert s.main_rev is None, "during a canary the main Service spans both revisions"
        record(f"canary: patch -> step {step + 1} ({weight}%) observed", s.t)

    s = obs.until(
        lambda s: s.state == "Idle" and s.stable == 2 and s.endpoints == {2: 3},
        60,
        "revision 2 promoted and the only one behind the main Service",
        every=every,
    )
    record("canary: patch -> promoted (100%)", s.t)
    assert s.status["phase"] in ("Ready", "Progressing") and s.main_rev == 2
    s = obs.until(lambda s: set(s.deps) == {2}, 30, "revision 1 scaled down after the delay")
    # While revision 1 is kept (ready) for scaleDownDelaySeconds, it gets no traffic.
    kept = [x for x in obs.snaps if x.stable == 2 and x.deps.get(1, (0, 0))[1] == 3]
    assert kept, "revision 1 was kept for scaleDownDelaySeconds"
    assert all(x.endpoints.get(1, 0) == 0 for x in kept if x.main_rev == 2), [x.brief() for x in kept]
    assert any(x.main_rev == 2 and x.endpoints == {2: 3} for x in kept)
    st = ready_on(md, 2)
    assert st["servingVersion"] == 2 and st["ready"] == "3/3"
    assert [(h["revision"], h["outcome"]) for h in st["history"]] == [(1, "Superseded"), (2, "Serving")]
    seen_steps = [x.rollout.get("step") for x in obs.snaps if x.state == "Progressing"]
    assert seen_steps == sorted(seen_steps), "steps advance in order"
    wait_for(lambda: events(md, "Promoted", "revision 2"), 15, message="a Promoted Event for revision 2")
    wait_for(lambda: events(md, "ScaledDown", "revision 1"), 15, message="a ScaledDown Event for revision 1")


# --------------------------------------------------------------------------- 2/3. automatic rollback


@pytest.mark.parametrize("simulate", ["never-ready", "crashloop"])
def test_failing_candidate_is_rolled_back_automatically(md_factory: Any, simulate: str) -> None:
    md = md_factory(
        model_deployment(
            "fail",
            replicas=3,
            rollout=canary({"weight": 25, "pause": {"duration": "30s"}}, {"weight": 100}, deadline=10),
        )
    )
    ready_on(md, 1)
    obs = Observer(md)
    serving(obs, 1, 3)
    obs.mark()
    md.patch(failing(2, simulate))

    def stable_untouched(s: Snap) -> None:
        assert s.deps.get(1) == (3, 3), "the stable Deployment must keep all its ready replicas"
        assert s.endpoints.get(1, 0) == 3, "the stable revision must keep all its ready endpoints"
        assert s.endpoints.get(2, 0) == 0, "a failing candidate never serves"

    every = strict(stable_untouched)
    # A crash-looping candidate can be created, fail and be removed between two polls: seeing it
    # rolled back (history below names revision 2) proves it existed as well as seeing it does.
    s = obs.until(
        lambda s: 2 in s.deps or s.status.get("phase") == "RolledBack",
        30,
        "the candidate Deployment is created",
        every=every,
    )
    s = obs.until(lambda s: s.status.get("phase") == "RolledBack", 60, "rolled back", every=every)
    record(f"rollback ({simulate}): patch -> RolledBack", s.t)
    cond = next(c for c in s.status["conditions"] if c["type"] == "RolledBack")
    expected = "ProgressDeadlineExceeded" if simulate == "never-ready" else "CrashLoopBackOff"
    assert cond["status"] == "True" and cond["reason"] == "RolledBack"
    assert expected in cond["message"], cond
    assert expected in s.status["message"] and "serving revision 1" in s.status["message"]
    assert s.status["stableRevision"] == 1 and s.status["servingVersion"] == 1
    hist = {h["revision"]: h for h in s.status["history"]}
    assert hist[2]["outcome"] == "RolledBack" and expected in hist[2]["reason"]
    assert hist[1]["outcome"] == "Serving"
    if simulate == "never-ready":
        assert s.t >= 9, "not before the progress deadline"

    # The candidate goes away; the stable revision is untouched throughout.
    obs.until(lambda s: set(s.deps) == {1} and s.endpoints == {1: 3}, 30, "candidate removed", every=every)
    warn = wait_for(lambda: events(md, "RolledBack", "revision 2"), 15, message="a RolledBack Event")
    assert warn[0].type == "Warning" and expected in warn[0].message
    # GitOps-safe: the user's spec still says version 2 with the label; nothing rewrote it.
    obj = md.get()
    assert obj["spec"]["model"]["version"] == 2
    assert obj["spec"]["server"]["podLabels"] == {"simulate": simulate}
    assert obj["metadata"]["generation"] == obs.snaps[0].generation
    # ...and it stays rolled back, serving revision 1, until the spec changes.
    hold_for(
        lambda: (
            (st := md.status())["phase"] == "RolledBack"
            and st["stableRevision"] == 1
            and not [
                d
                for d in md.deployments()
                if d.metadata.annotations.get("modeldeploy.io/revision-number") == "2"
            ]
        ),
        4,
        message="stays rolled back",
    )
    assert md.condition("Ready")["status"] == "True"

    # A fixed version rolls out normally afterwards. The 10 s deadline above times the failing
    # candidate; a healthy one gets the default's room (a CI run on a busy machine had 2 of 3 healthy
    # pods Ready after 10 s and rolled the fixed version back).
    md.patch(
        {
            "spec": {
                "model": {"version": 3},
                "server": {"podLabels": None},
                "rollout": {"steps": [{"weight": 50}, {"weight": 100}], "progressDeadlineSeconds": 600},
            }
        }
    )
    st = ready_on(md, 3)
    assert not any(c["type"] == "RolledBack" and c["status"] == "True" for c in st["conditions"])


# --------------------------------------------------------------------------- 4. blue-green


def all_ready_before_flip(md: MD, *, revision: int) -> bool:
    """Every pod of ``revision`` turned Ready no later than the operator's last write of the main
    Service (its managedFields time; both have 1 s resolution)."""
    from modeldeploy.api import MANAGER

    core = md.cluster.core
    svc = core.read_namespaced_service(md.name, md.namespace)
    flip = max(m.time for m in svc.metadata.managed_fields or [] if m.manager == MANAGER)
    dep = next(
        d
        for d in md.deployments()
        if d.metadata.annotations.get("modeldeploy.io/revision-number") == str(revision)
    )
    selector = ",".join(f"{k}={v}" for k, v in dep.spec.selector.match_labels.items())
    pods = core.list_namespaced_pod(md.namespace, label_selector=selector).items
    ready_at = [
        next(c.last_transition_time for c in p.status.conditions if c.type == "Ready" and c.status == "True")
        for p in pods
        if any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
    ]
    return len(ready_at) == dep.spec.replicas and all(t <= flip for t in ready_at)


def test_blue_green_flips_the_main_service_and_back(md_factory: Any) -> None:
    md = md_factory(
        model_deployment(
            "bg",
            replicas=2,
            rollout={
                "strategy": "BlueGreen",
                "blueGreen": {"scaleDownDelaySeconds": 60},
                "progressDeadlineSeconds": 20,
            },
        )
    )
    ready_on(md, 1)
    obs = Observer(md, preview=True)
    assert serving(obs, 1, 2).main_rev == 1

    # v1 -> v2: the preview comes up at full size behind NAME-preview, then the main Service flips.
    obs.mark()
    md.patch({"spec": {"model": {"version": 2}}})

    def main_is_one_revision(s: Snap) -> None:
        assert s.main_rev is not None and len(s.endpoints) <= 1, "blue-green never mixes revisions"

    every = strict(main_is_one_revision)
    s = obs.until(lambda s: s.preview_rev == 2, 30, "preview Service selects revision 2", every=every)
    s = obs.until(lambda s: s.main_rev == 2, 60, "main Service flips to revision 2", every=every)
    flip = s.t
    before = [x for x in obs.snaps if x.main_rev == 1]
    assert before and all(x.endpoints in ({1: 2}, {}) for x in before)
    assert s.deps.get(2, (0, 0))[0] == 2, "the preview was at full size before the flip"
    # ...and Ready: the operator acts on the pods it watches, which the Deployment's readyReplicas can
    # trail by seconds on a busy machine, so the pods' own Ready times are compared with the flip's write.
    assert all_ready_before_flip(md, revision=2), "the preview's pods were all Ready before the flip"
    s = obs.until(lambda s: s.endpoints == {2: 2}, 30, "main endpoints are revision 2's", every=every)
    record("blue-green: patch -> main Service selector flipped", flip)
    record("blue-green: patch -> main endpoints all on the new revision", s.t)
    ready_on(md, 2)
    assert obs.snap().deps.get(1) == (2, 2), "the old revision is kept for scaleDownDelaySeconds"

    # rollbackTo the old revision, still kept: the main Service flips back in seconds.
    obs.mark()
    md.patch({"spec": {"rollbackTo": {"revision": 1}}})
    s = obs.until(lambda s: s.main_rev == 1, 30, "main Service flips back to revision 1", every=every)
    record("blue-green: rollbackTo patch -> main Service flipped back", s.t)
    assert s.t < 15, "flipping back to a kept revision takes seconds"
    s = obs.until(lambda s: s.endpoints == {1: 2}, 30, "main endpoints back on revision 1", every=every)
    record("blue-green: rollbackTo patch -> endpoints back on revision 1", s.t)
    st = ready_on(md, 1)
    assert st["servingVersion"] == 1

    # A failing v3: the main Service never leaves the stable revision; the preview returns to it.
    obs.mark()
    md.patch({"spec": {"rollbackTo": None, **failing(3, "crashloop")["spec"]}})
    s = obs.until(
        lambda s: s.status.get("phase") == "RolledBack",
        60,
        "blue-green v3 rolled back",
        every=strict(lambda s: (main_is_one_revision(s), _assert(s.main_rev == 1, "main stays on 1"))),
    )
    record("blue-green: failing v3 patch -> RolledBack", s.t)
    assert {x.preview_rev for x in obs.snaps} <= {1, 3}, "the preview shows v3 or, after the rollback, stable"
    obs.until(
        lambda s: s.preview_rev == 1 and s.endpoints == {1: 2} and 3 not in s.deps,
        30,
        "preview back on the stable revision, v3 removed",
    )
    cond = md.condition("RolledBack")
    assert cond is not None and cond["status"] == "True" and "CrashLoopBackOff" in cond["message"]
    assert TIMINGS["blue-green: patch -> main Service selector flipped"] < 60


def _assert(ok: bool, message: str) -> None:
    assert ok, message


# --------------------------------------------------------------------------- 5. rollbackTo via the plugin


def test_rollback_to_revision_and_history_through_the_plugin(cluster: Cluster, md_factory: Any) -> None:
    md = md_factory(model_deployment("rb", replicas=2, rollout=canary({"weight": 50}, {"weight": 100})))
    ready_on(md, 1)
    md.patch({"spec": {"model": {"version": 2}}})
    ready_on(md, 2)

    t0 = time.monotonic()
    out = plugin(cluster, "rollback", "rb", "--to-revision", "1", "-n", md.namespace).stdout
    assert "revision 1" in out
    st = ready_on(md, 1)
    record("rollbackTo via plugin: command -> Ready on revision 1", time.monotonic() - t0)
    assert st["servingVersion"] == 1
    obs = Observer(md)
    s = obs.until(lambda s: set(s.deps) == {1} and s.endpoints == {1: 2}, 30, "only revision 1 serves")
    dep = md.cluster.apps.read_namespaced_deployment(s.dep_names[1], md.namespace)
    probe = dep.spec.template.spec.containers[0].readiness_probe.http_get.path
    assert probe == "/v2/models/rb/versions/1/ready", "revision 1's model version is served again"
    spec = md.get()["spec"]
    assert spec["model"]["version"] == 2 and spec["rollbackTo"] == {"revision": 1}, "spec left as written"

    hist = plugin(cluster, "history", "rb", "-n", md.namespace).stdout
    rows = history_rows(hist)
    assert [r[0] for r in rows] == ["1 (stable)", "2"], hist
    assert [r[1] for r in rows] == ["1", "2"] and all(r[2] == IMAGE for r in rows)
    assert [r[4] for r in rows] == ["Serving", "Superseded"], hist
    status_out = plugin(cluster, "status", "rb", "-n", md.namespace).stdout
    assert "Phase:" in status_out and "Ready" in status_out
    assert "1 (model version 1" in status_out and "revision 1 (spec.rollbackTo)" in status_out

    # A missing object is a clear error, not a traceback.
    bad = plugin(cluster, "status", "nope", "-n", md.namespace, check=False)
    assert bad.returncode != 0 and "not found" in bad.stderr and "Traceback" not in bad.stderr


# --------------------------------------------------------------------------- promote / abort via the plugin


def test_plugin_promote_skips_the_remaining_steps(cluster: Cluster, md_factory: Any) -> None:
    md = md_factory(
        model_deployment(
            "prom",
            replicas=2,
            rollout=canary({"weight": 34, "pause": {}}, {"weight": 67, "pause": {}}, {"weight": 100}),
        )
    )
    ready_on(md, 1)
    obs = Observer(md)
    obs.mark()
    md.patch({"spec": {"model": {"version": 2}}})
    obs.until(
        lambda s: s.state == "Paused" and s.rollout.get("step") == 0, 60, "paused at step 1 for promote"
    )
    assert md.status()["phase"] == "Paused"
    out = plugin(cluster, "status", "prom", "-n", md.namespace).stdout
    assert "Paused" in out and "Step:" in out and "1/3" in out
    plugin(cluster, "promote", "prom", "-n", md.namespace)
    obs.until(lambda s: s.state == "Idle" and s.stable == 2, 60, "promoted")
    assert all(x.rollout.get("step") in (0, None) for x in obs.snaps if x.state != "Idle"), (
        "step 2 must be skipped"
    )
    st = ready_on(md, 2)
    assert [h["outcome"] for h in st["history"]] == ["Superseded", "Serving"]
    wait_for(lambda: events(md, "PromoteRequested", "revision 2"), 15, message="a PromoteRequested Event")
    # The nonce is acted on once: the next rollout is not promoted by the stale annotation.
    obs.mark()
    md.patch({"spec": {"model": {"version": 3}}})
    obs.until(
        lambda s: s.state == "Paused" and s.rollout.get("candidateRevision") == 3,
        60,
        "revision 3 pauses at its first step",
    )
    hold_for(lambda: md.status()["rollout"]["state"] == "Paused", 3, message="stale promote is ignored")


def test_plugin_abort_rolls_back_with_reason_aborted(cluster: Cluster, md_factory: Any) -> None:
    md = md_factory(
        model_deployment("abrt", replicas=2, rollout=canary({"weight": 50, "pause": {}}, {"weight": 100}))
    )
    ready_on(md, 1)
    obs = Observer(md)
    serving(obs, 1, 2)
    md.patch({"spec": {"model": {"version": 2}}})
    obs.until(lambda s: s.state == "Paused" and s.endpoints == {1: 2, 2: 2}, 60, "candidate up, paused")
    obs.mark()
    plugin(cluster, "abort", "abrt", "-n", md.namespace)
    s = obs.until(
        lambda s: s.status.get("phase") == "RolledBack",
        30,
        "aborted",
        every=strict(lambda s: _assert(s.endpoints.get(1, 0) == 2, "stable keeps serving")),
    )
    record("abort via plugin: command -> RolledBack", s.t)
    cond = next(c for c in s.status["conditions"] if c["type"] == "RolledBack")
    assert cond["status"] == "True" and cond["reason"] == "Aborted"
    assert s.rollout["state"] == "Aborted"
    hist = {h["revision"]: h["outcome"] for h in s.status["history"]}
    assert hist == {1: "Serving", 2: "Aborted"}
    obs.until(lambda s: set(s.deps) == {1} and s.endpoints == {1: 2}, 30, "candidate removed")
    ev = wait_for(lambda: events(md, "Aborted", "revision 2"), 15, message="an Aborted Event")
    assert ev[0].type == "Warning"
    assert md.get()["spec"]["model"]["version"] == 2


# --------------------------------------------------------------------------- Rolling


def test_rolling_updates_one_deployment_without_losing_gpu_capacity(md_factory: Any) -> None:
    md = md_factory(
        model_deployment(
            "roll",
            replicas=2,
            server={"image": IMAGE, "resources": {"limits": {"nvidia.com/gpu": "1"}}},
            rollout={"strategy": "Rolling"},
        )
    )
    ready_on(md, 1)
    obs = Observer(md)
    serving(obs, 1, 2)
    dep = md.deployments()[0]
    assert dep.metadata.name == "roll" and dep.spec.strategy.rolling_update.max_unavailable == 0
    obs.mark()
    md.patch({"spec": {"model": {"version": 2}}})
    s = obs.until(
        lambda s: s.state == "Idle" and s.stable == 2 and s.endpoints == {2: 2},
        60,
        "revision 2 serves from the same Deployment",
        every=strict(
            lambda s: _assert(s.ready_endpoints >= 2, "a GPU pod was taken down before its successor")
        ),
    )
    record("rolling: patch -> all pods on revision 2", s.t)
    assert [d.metadata.name for d in md.deployments()] == ["roll"]
    assert {x.rollout.get("state") for x in obs.snaps} <= {"Idle", "Promoting"}


# --------------------------------------------------------------------------- 8. HPA coherence


def test_hpa_floor_and_capacity_hold_through_a_rollout(cluster: Cluster, md_factory: Any) -> None:
    md = md_factory(
        model_deployment(
            "hpa",
            replicas=None,
            autoscaling={"minReplicas": 2, "maxReplicas": 6, "targetCPUUtilization": 60},
            rollout=canary({"weight": 50, "pause": {"duration": "2s"}}, {"weight": 100}, delay=2),
        )
    )
    ready_on(md, 1)
    obs = Observer(md, hpa=True)
    s = obs.snap()
    assert s.hpa == (s.dep_names[1], 2)
    # Stand in for the HPA having scaled up under load (no metrics pipeline here): stable at 3.
    cluster.kubectl("scale", "deployment", s.dep_names[1], "-n", md.namespace, "--replicas=3")
    obs.until(lambda s: s.deps.get(1) == (3, 3) and s.status.get("ready") == "3/3", 60, "stable at 3 pods")
    serving(obs, 1, 3)

    obs.mark()
    md.patch({"spec": {"model": {"version": 2}}})

    floor = [2]

    def coherent(s: Snap) -> None:
        assert s.ready_endpoints >= 3, "ready capacity behind the main Service dropped below 3"
        assert s.hpa is not None and s.hpa[1] >= 2, "HPA minReplicas below spec.autoscaling.minReplicas"
        if s.state in ("Progressing", "Promoting", "Paused"):
            # Status is persisted first, the HPA a moment later; from then on the floor only rises.
            assert s.hpa[1] >= floor[0], f"HPA minReplicas lowered mid-rollout (from {floor[0]})"
            floor[0] = max(floor[0], s.hpa[1])

    every = strict(coherent)
    obs.until(
        lambda s: s.state == "Progressing" and s.deps.get(2) == (3, 3),
        60,
        "candidate at 50%: 3 pods",
        every=every,
    )
    s = obs.until(lambda s: s.state == "Idle" and s.stable == 2, 60, "promoted", every=every)
    record("hpa canary: patch -> promoted", s.t)
    # After promotion: the HPA follows the new stable, keeps its size, and the old revision goes.
    s = obs.until(
        lambda s: set(s.deps) == {2} and s.hpa == (s.dep_names[2], 2) and s.endpoints == {2: 3},
        60,
        "HPA on revision 2, revision 1 gone",
        every=every,
    )
    hold_for(
        lambda: (coherent(x := obs.snap()), x.deps.get(2) == (3, 3))[1],
        5,
        message="revision 2 keeps 3 ready pods after the hand-over to the HPA",
    )
    dep = cluster.apps.read_namespaced_deployment(s.dep_names[2], md.namespace)
    for mf in dep.metadata.managed_fields:
        if mf.manager == "modeldeploy-operator":
            assert "f:replicas" not in str((mf.fields_v1 or {}).get("f:spec", {})), (
                "the operator must not own replicas of the HPA-managed Deployment"
            )
    assert floor[0] == 3, "mid-rollout the HPA floor was raised to the stable's size (3)"


# --------------------------------------------------------------------------- 6/7. restarts


@pytest.fixture(scope="module")
def restartable(
    cluster: Cluster, crd: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """An operator of our own (namespaces ``rk-*``), so killing it leaves the session operator alone."""
    with running_operator(tmp_path_factory.mktemp("restartable"), ["rk-*"]) as op:
        yield op


@pytest.fixture
def rk_ns(cluster: Cluster, restartable: OperatorProcess, request: pytest.FixtureRequest) -> Iterator[str]:
    with fresh_namespace(cluster, "rk-", request.node.name) as name:
        yield name


def _crash(op: OperatorProcess, kills: list[str], where: str) -> None:
    op.kill()
    kills.append(where)
    op.start()


def test_operator_killed_at_every_step_still_promotes_once(
    cluster: Cluster, restartable: OperatorProcess, rk_ns: str
) -> None:
    cluster.apply(
        model_deployment(
            "crash",
            replicas=6,
            rollout=canary(
                {"weight": 10, "pause": {"duration": "2s"}},
                {"weight": 25, "pause": {"duration": "2s"}},
                {"weight": 100},
                delay=1,
            ),
        ),
        namespace=rk_ns,
    )
    md = MD(cluster, rk_ns, "crash")
    ready_on(md, 1)
    kills: list[str] = []
    t0 = time.monotonic()

    # Killed right after the patch, before the operator may have seen it.
    md.patch({"spec": {"model": {"version": 2}}})
    _crash(restartable, kills, "after patch")

    def state() -> tuple[str, int]:
        ro = md.status().get("rollout") or {}
        return ro.get("state", ""), ro.get("step", -1)

    # Killed the moment each step is persisted (before its children may have been applied).
    for step in (0, 1):
        wait_for(
            lambda step=step: state() == ("Progressing", step),
            60,
            interval=0.05,
            message=lambda step=step: f"step {step}: {md.status().get('rollout')}",
        )
        _crash(restartable, kills, f"step {step} persisted")
    wait_for(
        lambda: state()[0] in ("Promoting", "Idle"),
        60,
        interval=0.05,
        message=lambda: f"promoting: {md.status().get('rollout')}",
    )
    where = state()[0]
    if where == "Idle":
        # Events are posted once, right after the status write: a crash in between loses that Event
        # (at most once, never twice). Here we test that a restart after the promotion does not promote
        # again, so let the Event land first.
        wait_for(lambda: events(md, "Promoted", "revision 2"), 15, message="Promoted Event for revision 2")
    _crash(restartable, kills, f"at {where}")

    st = ready_on(md, 2)
    record("operator killed 4 times: patch -> promoted", time.monotonic() - t0)
    print(f"killed: {kills}")
    assert restartable.starts >= 5 and len(kills) == 4, kills
    assert [(h["revision"], h["modelVersion"], h["outcome"]) for h in st["history"]] == [
        (1, 1, "Superseded"),
        (2, 2, "Serving"),
    ]
    wait_for(lambda: events(md, "Promoted", "revision 2"), 15, message="a Promoted Event for revision 2")
    hold_for(lambda: len(events(md, "Promoted", "revision 2")) == 1, 3, message="revision 2 promoted once")
    assert len(events(md, "Promoted", "revision 1")) == 1
    obs = Observer(md)
    obs.until(
        lambda s: set(s.deps) == {2} and s.deps[2] == (6, 6) and s.endpoints == {2: 6},
        30,
        "revision 2 alone at full size",
    )

    # A second rollout, killed mid-step and again right after promotion, also ends right.
    md.patch({"spec": {"model": {"version": 3}}})
    wait_for(lambda: state() == ("Progressing", 1), 60, interval=0.05, message="v3 at step 1")
    _crash(restartable, kills, "v3 step 1")
    wait_for(lambda: md.status().get("stableRevision") == 3, 60, interval=0.05, message="v3 promoted")
    wait_for(lambda: events(md, "Promoted", "revision 3"), 15, message="a Promoted Event for revision 3")
    _crash(restartable, kills, "v3 promoted")
    st = ready_on(md, 3)
    assert [(h["revision"], h["outcome"]) for h in st["history"]] == [
        (1, "Superseded"),
        (2, "Superseded"),
        (3, "Serving"),
    ]
    wait_for(lambda: events(md, "Promoted", "revision 3"), 15, message="a Promoted Event for revision 3")
    assert len(events(md, "Promoted", "revision 3")) == 1 and len(events(md, "Promoted", "revision 2")) == 1
    assert not restartable.errors_in_log(), restartable.errors_in_log()[:5]


def test_paused_rollout_stays_paused_across_a_restart(
    cluster: Cluster, restartable: OperatorProcess, rk_ns: str
) -> None:
    cluster.apply(
        model_deployment(
            "nap",
            replicas=3,
            rollout=canary(
                {"weight": 25, "pause": {}}, {"weight": 50, "pause": {"duration": "8s"}}, {"weight": 100}
            ),
        ),
        namespace=rk_ns,
    )
    md = MD(cluster, rk_ns, "nap")
    ready_on(md, 1)
    obs = Observer(md)
    md.patch({"spec": {"model": {"version": 2}}})

    # 1. A step without duration waits for promote/resume, across a restart.
    s = obs.until(
        lambda s: s.state == "Paused" and s.rollout.get("step") == 0 and s.deps.get(2) == (1, 1),
        60,
        "paused at the first step",
    )
    assert s.rollout["pauseReason"] == "WaitingForPromote"
    restartable.kill()
    restartable.start()
    hold_for(
        lambda: (
            (s := obs.snap()).state == "Paused"
            and s.rollout.get("step") == 0
            and s.deps.get(2) == (1, 1)
            and s.status["phase"] == "Paused"
        ),
        5,
        message="still paused at step 1 after the restart",
    )
    plugin(cluster, "resume", "nap", "-n", rk_ns)
    obs.until(lambda s: s.state == "Progressing" and s.rollout.get("step") == 1, 30, "resumed to step 2")

    # 2. spec.paused mid-step, across a restart.
    plugin(cluster, "pause", "nap", "-n", rk_ns)
    s = obs.until(lambda s: s.state == "Paused", 30, "paused by spec.paused")
    assert s.rollout["step"] == 1 and s.rollout["reason"] == "spec.paused" and s.spec["paused"] is True
    assert s.rollout["pauseReason"] == "SpecPaused"
    restartable.kill()
    restartable.start()
    hold_for(
        lambda: (
            (s := obs.snap()).state == "Paused"
            and s.rollout.get("step") == 1
            and 2 in s.deps
            and s.stable == 1
        ),
        5,
        message="still paused at step 2 after the restart",
    )
    plugin(cluster, "resume", "nap", "-n", rk_ns)
    st = ready_on(md, 2)
    assert md.get()["spec"]["paused"] is False
    assert [h["outcome"] for h in st["history"]] == ["Superseded", "Serving"]
