"""Observe: everything one reconcile decides from, read before any decision (the cache, and a few
existence checks against the API with a short memory), gathered into one immutable :class:`Observation`.

Also the pure readings of the pods and Deployments of one revision (:func:`observe_revision`,
:func:`pod_failure`), which the rollout's gates use.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from .. import api
from ..timeutil import rfc3339
from ..triton.analysis import PENDING
from . import builders, rollout
from .analysis_runner import verdict_for

# A container waiting for one of these will not start without a change to the spec or the node.
_STUCK_WAITING = frozenset(
    {
        "ErrImageNeverPull",
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "CreateContainerConfigError",
    }
)
_MESSAGE_CHARS = 400


def _last_lines(text: str, limit: int = _MESSAGE_CHARS) -> str:
    """The end of a termination message (kubelet keeps the log tail there with
    FallbackToLogsOnError): where a stager or Triton says why it stopped."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    out = ""
    for line in reversed(lines):
        candidate = f"{line} | {out}" if out else line
        if len(candidate) > limit:
            break
        out = candidate
    return out or (lines[-1][-limit:] if lines else "")


def pod_failure(pod: dict[str, Any]) -> str | None:
    """Why this pod's revision cannot become ready, read from the running pod: an init container
    (the model stager) or the server crash-looping, with the reason the process gave on its way
    out, or a container whose image or configuration cannot be used. None while it may still come
    up."""
    pstatus = pod.get("status") or {}
    name = pod["metadata"]["name"]
    for key, kind in (("initContainerStatuses", "init container"), ("containerStatuses", "container")):
        for cs in pstatus.get(key) or []:
            state = cs.get("state") or {}
            waiting = state.get("waiting") or {}
            restarts = cs.get("restartCount", 0)
            if waiting.get("reason") in _STUCK_WAITING:
                detail = _last_lines(waiting.get("message") or "")
                return f"{waiting['reason']}: {kind} {cs.get('name')} of pod {name}" + (
                    f": {detail}" if detail else ""
                )
            crashloop = waiting.get("reason") == "CrashLoopBackOff" or (
                restarts >= rollout.CRASHLOOP_RESTARTS and not cs.get("ready")
            )
            if not crashloop:
                continue
            last = (cs.get("lastState") or {}).get("terminated") or state.get("terminated") or {}
            detail = _last_lines(last.get("message") or "")
            exit_code = last.get("exitCode")
            return (
                f"CrashLoopBackOff: {kind} {cs.get('name')} of pod {name} restarted {restarts} times"
                + (f" (exit code {exit_code})" if exit_code is not None else "")
                + (f": {detail}" if detail else "")
            )
    return None


def observe_revision(
    dep: dict[str, Any] | None, pods: Iterable[dict[str, Any]]
) -> rollout.RevisionObservation:
    if dep is None:
        return rollout.RevisionObservation()
    dstatus = dep.get("status") or {}
    failure = None
    for cond in dstatus.get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            failure = f"ProgressDeadlineExceeded: {cond.get('message', '')}".strip()
    ready = live = 0
    for pod in pods:
        if pod["metadata"].get("deletionTimestamp"):
            continue
        live += 1
        pstatus = pod.get("status") or {}
        if any(
            c.get("type") == "Ready" and c.get("status") == "True" for c in pstatus.get("conditions") or []
        ):
            ready += 1
        failure = pod_failure(pod) or failure
    desired = (dep.get("spec") or {}).get("replicas", 1)
    generation_seen = dstatus.get("observedGeneration", 0) >= dep["metadata"].get("generation", 0)
    if generation_seen and dstatus.get("updatedReplicas", 0) >= dstatus.get("replicas", 0):
        # The Deployment controller has seen the current template, and when it last looked no pod of an
        # older one was left: every pod of this revision is of the current template. Count them from the
        # pods we watch rather than wait for its next status write, which lags them by seconds, and
        # after an API server restart on a busy machine by over a minute (a rollout step stood still).
        return rollout.RevisionObservation(desired=desired, ready=ready, updated=live, failure=failure)
    # Pods of an older template may still be among them (or the new one is not seen yet): only the
    # Deployment controller can tell them apart. Its status omits a zero readyReplicas; a Deployment it
    # has not written a status for yet (created a moment ago; kwok can make the pod ready first) has none
    # it vouches for either, and counts ready once it has (with the promotion, in the same status write).
    return rollout.RevisionObservation(
        desired=desired,
        ready=min(ready, dstatus.get("readyReplicas", 0)),
        updated=dstatus.get("updatedReplicas", 0) if generation_seen else 0,
        failure=failure,
    )


#: A child the API server refused: (kind, name) -> (the applied hash refused, its message, monotonic time).
Refusals = Mapping[tuple[str, str], tuple[str, str, float]]


@dataclass(frozen=True)
class Observation:
    """One ModelDeployment and what surrounds it, as seen at the start of a reconcile."""

    md: Mapping[str, Any]  # the ModelDeployment from the cache
    now: datetime
    spec: api.ModelDeploymentSpec | None  # None: spec_error says why
    spec_error: str | None
    old_status: api.ModelDeploymentStatus
    deployments: Mapping[str, dict[str, Any]]  # owned Deployments by name
    pods: list[dict[str, Any]]  # owned Pods
    refused: Refusals = field(default_factory=dict)
    #: Existence of objects the spec refers to (PVCs, Secrets, route CRDs): (kind, namespace, name) -> bool.
    exists: Mapping[tuple[str, str, str], bool] = field(default_factory=dict)
    #: (stable hash, candidate hash) while the analysis gate holds (candidate's pods at this step ready).
    analysed: tuple[str, str] | None = None

    @property
    def verdict(self) -> api.AnalysisResult | None:
        """The analysis verdict the gate reads: what the candidate's windows persisted for this step of
        this attempt, Pending until the first window ends; None while the gate does not hold."""
        state = self.old_status.rollout
        if self.analysed is None or state is None:
            return None
        result = verdict_for(self.old_status.last_analysis, state, self.analysed[1])
        return result or api.AnalysisResult(
            verdict=PENDING, reason="the first window has not started", time=rfc3339(self.now)
        )

    @property
    def owner(self) -> builders.Owner:
        meta = self.md["metadata"]
        return builders.Owner(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])

    @property
    def generation(self) -> int | None:
        gen = self.md["metadata"].get("generation")
        return int(gen) if gen is not None else None

    @property
    def annotations(self) -> Mapping[str, str]:
        return self.md["metadata"].get("annotations") or {}

    @staticmethod
    def total(
        spec: api.ModelDeploymentSpec,
        state: api.RolloutState | None,
        revs: Mapping[int, rollout.RevisionObservation],
    ) -> int:
        """Pods the serving revision should have: spec.replicas, or with autoscaling what the HPA last
        set on the stable Deployment (within its bounds)."""
        total = spec.effective_replicas
        if spec.autoscaling is not None and state is not None and state.stable_revision is not None:
            stable = revs.get(state.stable_revision)
            if stable and stable.desired:
                total = max(spec.autoscaling.min_replicas, min(stable.desired, spec.autoscaling.max_replicas))
        return total

    def revision(self, rec: api.RevisionRecord | None, strategy: api.Strategy) -> rollout.RevisionObservation:
        """What the cluster shows of one revision's pods."""
        if rec is None:
            return rollout.RevisionObservation()
        owner = self.owner
        dep_name = builders.deployment_name(owner, rec.hash, strategy)
        rev_pods = [
            p
            for p in self.pods
            if (p["metadata"].get("labels") or {}).get(builders.LABEL_REVISION) == rec.hash
        ]
        seen = observe_revision(self.deployments.get(dep_name), rev_pods)
        # A revision whose Deployment or ConfigMap the API server refuses can never become ready:
        # that is its failure (a candidate is rolled back, a first revision Failed), not a retry loop.
        for key in (("Deployment", dep_name), ("ConfigMap", builders.config_map_name(owner, rec.hash))):
            if key in self.refused:
                return replace(
                    seen, failure=f"RejectedByAPIServer: {key[0]} {key[1]}: {self.refused[key][1]}"
                )
        return seen


def _labels(obj: Mapping[str, Any]) -> Mapping[str, str]:
    labels: Mapping[str, str] = obj["metadata"].get("labels") or {}
    return labels


def references(spec: api.ModelDeploymentSpec) -> list[tuple[str, str]]:
    """(kind, name) of the namespaced objects a spec's model needs to exist: its claim, its Secret."""
    out = []
    claim = builders.pvc_claim(spec)
    if claim:
        out.append(("PersistentVolumeClaim", claim[0]))
    if spec.model.credentials_secret:
        out.append(("Secret", spec.model.credentials_secret))
    return out
