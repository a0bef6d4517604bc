"""The one level-triggered reconcile.

``Reconciler.reconcile(namespace, name)`` runs for every event of a ModelDeployment or of
one of its children, and on a periodic resync. It computes the desired state from the
current spec, the persisted status and the observed children (from the watch cache,
so it costs no API reads), persists the next rollout state in status, then applies
only the children that differ from what is live. A reconcile that changes nothing
writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol

import pydantic

from . import api, builders, revision, rollout, staging, status
from .analysis import PENDING
from .analysis_runner import verdict_for
from .kube import ApiError, Kube, path_for

log = logging.getLogger(__name__)

APPLIED_ANNOTATION = "modeldeploy.io/applied-hash"
PROMOTE_ANNOTATION = "modeldeploy.io/promote"
RESUME_ANNOTATION = "modeldeploy.io/resume"
ABORT_ANNOTATION = "modeldeploy.io/abort"
#: Field manager that keeps a Deployment's replicas while their ownership passes from us to the HPA.
HANDOVER_MANAGER = "modeldeploy-hpa-handover"
CHILD_KINDS = ("Deployment", "Pod", "Service", "ConfigMap", "HorizontalPodAutoscaler", "PodDisruptionBudget")
APPLY_ORDER = (
    "ConfigMap",
    "Deployment",
    "Service",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
    "HTTPRoute",
    "GRPCRoute",
)
#: A child the API server refused is sent again when it changes, or after this long (admission can change).
REJECTED_RETRY_SECONDS = 300.0


# --------------------------------------------------------------------------- cache


#: Pod fields the reconcile reads (readiness, crash loops, IPs for direct scraping): the rest of a Pod
#: (its spec, most of its metadata) is dropped before caching.
_POD_META = ("name", "namespace", "uid", "resourceVersion", "labels", "deletionTimestamp", "ownerReferences")
_POD_STATUS = ("phase", "conditions", "containerStatuses", "initContainerStatuses", "podIP")


def slim(obj: dict[str, Any]) -> dict[str, Any]:
    """What the cache keeps of an object (like controller-runtime's cache transforms): never other
    managers' ``managedFields`` (often a third of a body; only our own Apply entry is read, to hand a
    Deployment's replicas over to an HPA), and of a Pod only the fields the reconcile reads.
    Never modifies ``obj``: a trimmed object is a new top-level dict sharing the nested values, and an
    object with nothing to trim is returned as it is."""
    meta = obj.get("metadata") or {}
    if obj.get("kind") == "Pod":
        status = obj.get("status") or {}
        return {
            "kind": "Pod",
            "metadata": {k: meta[k] for k in _POD_META if k in meta},
            "status": {k: status[k] for k in _POD_STATUS if k in status},
        }
    managed = meta.get("managedFields")
    if managed is None:
        return obj
    ours = [m for m in managed if m.get("manager") == builders.MANAGER and m.get("operation") == "Apply"]
    return {**obj, "metadata": {**meta, "managedFields": ours}}


class Cache:
    """Objects seen by the watches, indexed by (kind, namespace, owning ModelDeployment).
    Objects are kept :func:`slim`: everything a reconcile reads, nothing else."""

    def __init__(self) -> None:
        self._objs: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._by_owner: dict[tuple[str, str, str], set[str]] = {}

    @staticmethod
    def _owner(obj: dict[str, Any]) -> str:
        if obj.get("kind") == api.KIND:
            return str(obj["metadata"]["name"])
        return str((obj["metadata"].get("labels") or {}).get(builders.LABEL_NAME, ""))

    def put(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        key = (obj["kind"], meta.get("namespace", ""), meta["name"])
        old = self._objs.get(key)
        if old is not None and _rv(old) > _rv(obj):
            return  # an older event arriving after our own write's response
        if old is not None:
            self._by_owner.get((key[0], key[1], self._owner(old)), set()).discard(key[2])
        obj = slim(obj)
        self._objs[key] = obj
        self._by_owner.setdefault((key[0], key[1], self._owner(obj)), set()).add(key[2])

    def delete(self, kind: str, namespace: str, name: str) -> None:
        old = self._objs.pop((kind, namespace, name), None)
        if old is not None:
            self._by_owner.get((kind, namespace, self._owner(old)), set()).discard(name)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self._objs.get((kind, namespace, name))

    def owned(self, kind: str, namespace: str, owner: str) -> list[dict[str, Any]]:
        names = self._by_owner.get((kind, namespace, owner), set())
        return [self._objs[(kind, namespace, n)] for n in sorted(names) if (kind, namespace, n) in self._objs]

    def keys(self, kind: str) -> list[tuple[str, str]]:
        return [(ns, name) for (k, ns, name) in self._objs if k == kind]

    def __len__(self) -> int:
        return len(self._objs)


def _rv(obj: dict[str, Any]) -> int:
    try:
        return int(obj["metadata"].get("resourceVersion") or 0)
    except ValueError:
        return 0


# --------------------------------------------------------------------------- comparison

_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eE][-+]?[0-9]+|[KMGTPE]i|[mkMGTPE])?$")
_SUFFIX: dict[str, Decimal | int] = {
    "": 1,
    "m": Decimal("0.001"),
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


def _quantity(value: Any) -> Decimal | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return Decimal(str(value))
    if not isinstance(value, str):
        return None
    m = _QUANTITY.match(value)
    if not m:
        return None
    try:
        number = Decimal(m.group(1))
    except InvalidOperation:
        return None
    suffix = m.group(2) or ""
    if suffix[:1] in ("e", "E"):
        return number * (Decimal(10) ** int(suffix[1:]))
    return number * Decimal(_SUFFIX[suffix])


_QUANTITY_KEYS = {"resources", "requests", "limits", "sizeLimit", "averageValue"}


def contains(live: Any, desired: Any, quantity: bool = False) -> bool:
    """Whether every field we want is present in ``live`` with an equal value
    (fields the API server defaulted, or others own, are ignored). Values under
    resource-like keys compare as quantities ("1000m" == "1"), which the API server
    canonicalises."""
    if isinstance(desired, dict):
        return isinstance(live, dict) and all(
            k in live and contains(live[k], v, quantity or k in _QUANTITY_KEYS) for k, v in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(live, list)
            and len(live) == len(desired)
            and all(contains(a, b, quantity) for a, b in zip(live, desired, strict=True))
        )
    if live == desired:
        return True
    if not quantity:
        return False
    a, b = _quantity(live), _quantity(desired)
    return a is not None and a == b


def applied_hash(obj: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def with_applied_hash(obj: dict[str, Any]) -> dict[str, Any]:
    meta = dict(obj["metadata"])
    meta["annotations"] = {**meta.get("annotations", {}), APPLIED_ANNOTATION: applied_hash(obj)}
    return {**obj, "metadata": meta}


def needs_apply(live: dict[str, Any] | None, desired: dict[str, Any]) -> bool:
    if live is None:
        return True
    if (live["metadata"].get("annotations") or {}).get(APPLIED_ANNOTATION) != desired["metadata"][
        "annotations"
    ][APPLIED_ANNOTATION]:
        return True  # our intent changed (perhaps a field was dropped): re-apply
    body = {k: v for k, v in desired.items() if k not in ("apiVersion", "kind")}
    return not contains(live, body)


# --------------------------------------------------------------------------- observation


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
    # Deployment controller can tell them apart.
    return rollout.RevisionObservation(
        desired=desired,
        ready=min(ready, dstatus.get("readyReplicas", ready)),
        updated=dstatus.get("updatedReplicas", 0) if generation_seen else 0,
        failure=failure,
    )


class AnalysisWindows(Protocol):
    """The analysis windows, run out of the reconcile (:class:`.analysis_runner.AnalysisRunner`)."""

    def ensure(
        self,
        md: dict[str, Any],
        spec: api.ModelDeploymentSpec,
        state: api.RolloutState,
        stable_hash: str,
        candidate_hash: str,
    ) -> None: ...

    def stop(self, namespace: str, name: str) -> None: ...


# --------------------------------------------------------------------------- reconciler


@dataclass
class Outcome:
    writes: int = 0
    requeue_after: float | None = None
    events: list[tuple[str, str, str]] = field(default_factory=list)


def _now() -> datetime:
    return datetime.now(UTC)


class Reconciler:
    def __init__(
        self,
        kube: Kube,
        cache: Cache,
        *,
        post_event: Callable[[dict[str, Any], str, str, str], Awaitable[None]],
        analysis: AnalysisWindows | None = None,
        stager_image: str = builders.DEFAULT_STAGER_IMAGE,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self.kube = kube
        self.cache = cache
        self.post_event = post_event
        self.analysis = analysis
        self.stager_image = stager_image
        self.clock = clock
        self._seen: dict[tuple[str, str, str], tuple[float, bool]] = {}
        self._primed: set[str] = set()
        # Children the API server refused, per ModelDeployment: (kind, name) -> (applied hash, message, when).
        self._rejected: dict[tuple[str, str], dict[tuple[str, str], tuple[str, str, float]]] = {}

    async def _exists(self, kind: str, namespace: str, name: str) -> bool:
        """Existence of a referenced object (a read, cached for 10 s; values are never kept)."""
        key = (kind, namespace, name)
        seen = self._seen.get(key)
        if seen and time.monotonic() - seen[0] < 10:
            return seen[1]
        exists = await self.kube.exists(kind, namespace, name)
        self._seen[key] = (time.monotonic(), exists)
        return exists

    async def _prime(self, namespace: str) -> None:
        """Fill the cache with the namespace's children once, before the first reconcile there:
        right after a start the watches may not have listed everything yet, and a reconcile
        working from a partial view would write what is already there."""
        selector = f"app.kubernetes.io/managed-by={builders.MANAGER}"
        for kind in CHILD_KINDS:
            for obj in await self.kube.list(kind, namespace, selector):
                obj.setdefault("kind", kind)
                self.cache.put(obj)
        self._primed.add(namespace)

    async def reconcile(self, namespace: str, name: str) -> Outcome:
        md = self.cache.get(api.KIND, namespace, name)
        if md is None or md["metadata"].get("deletionTimestamp"):
            self._rejected.pop((namespace, name), None)
            return Outcome()
        if namespace not in self._primed:
            await self._prime(namespace)
        writes_before = self.kube.writes
        try:
            out = await self._reconcile(md)
        except ApiError as e:
            if e.status == 404 and await self._gone(namespace, name):
                # Deleted while it was being reconciled (the status write found no object): the watch
                # brings the deletion; nothing to retry, nothing to report.
                log.info("%s/%s was deleted during its reconcile", namespace, name)
                return Outcome(writes=self.kube.writes - writes_before)
            raise
        out.writes = self.kube.writes - writes_before
        return out

    async def _gone(self, namespace: str, name: str) -> bool:
        """The ModelDeployment no longer exists (the cache may not have seen its deletion yet: asked)."""
        return not await self.kube.exists(api.KIND, namespace, name)

    async def _reconcile(self, md: dict[str, Any]) -> Outcome:
        meta = md["metadata"]
        ns, name, generation = meta["namespace"], meta["name"], meta.get("generation")
        owner = builders.Owner(name=name, namespace=ns, uid=meta["uid"])
        now = self.clock()
        now_s = rollout.now_iso(now)
        try:
            old_status = api.ModelDeploymentStatus.model_validate(md.get("status") or {})
        except pydantic.ValidationError:
            old_status = api.ModelDeploymentStatus()
        new_status = old_status.model_copy(deep=True)
        conditions = list(old_status.conditions or [])
        events: list[tuple[str, str, str]] = []

        # 1. Parse the spec. Invalid input touches nothing that runs.
        try:
            spec = api.ModelDeploymentSpec.model_validate(md.get("spec") or {})
        except pydantic.ValidationError as exc:
            msg = "; ".join(
                f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]
            )
            return await self._report_spec_error(md, new_status, conditions, "InvalidSpec", msg, now_s)
        try:
            # The builders serialise the whole spec (with_pod_shaping, the routes), not only the pod-shaping
            # part the revision hash reads: a pass-through field nested deeper than pydantic serialises
            # (rollout.gateway.parentRefs 300 deep) would raise in every reconcile's apply, forever.
            spec.model_dump(by_alias=True, exclude_none=True, mode="json")
        except (ValueError, RecursionError) as exc:
            return await self._report_spec_error(
                md, new_status, conditions, "InvalidSpec", _interpretation_error(exc), now_s
            )

        history = list(old_status.history or [])
        state = old_status.rollout

        # 2. The revision the spec asks for (rollbackTo picks a remembered one).
        fast_track = False
        target_spec = spec
        if spec.rollback_to is not None:
            rec = revision.find(history, number=spec.rollback_to.revision)
            if rec is None or rec.spec is None:
                known = ", ".join(str(r.revision) for r in history) or "none"
                return await self._report_spec_error(
                    md,
                    new_status,
                    conditions,
                    "UnknownRevision",
                    f"spec.rollbackTo.revision {spec.rollback_to.revision} is not in status.history "
                    f"(known: {known}); pick one of those or remove spec.rollbackTo",
                    now_s,
                )
            try:
                target_spec = revision.with_pod_shaping(spec, rec.spec)
            except (ValueError, RecursionError) as exc:
                return await self._report_spec_error(
                    md, new_status, conditions, "InvalidSpec", _interpretation_error(exc), now_s
                )
            fast_track = True
        try:
            target_hash = revision.revision_hash(target_spec)
        except (ValueError, RecursionError) as exc:  # e.g. a pass-through field nested too deep to serialise
            return await self._report_spec_error(
                md, new_status, conditions, "InvalidSpec", _interpretation_error(exc), now_s
            )
        target_rec = revision.find(history, hash=target_hash)
        if target_rec is None:
            # Preflight before a new revision exists: what is valid but cannot work is reported,
            # and the running revision is left alone.
            problem = await self._preflight(ns, target_spec)
            if problem:
                return await self._report_spec_error(
                    md, new_status, conditions, problem[0], problem[1], now_s
                )
            try:
                config_hash = _config_hash(owner, target_spec)
            except (ValueError, RecursionError) as exc:  # ConfigRenderError: Triton cannot load it
                return await self._report_spec_error(
                    md, new_status, conditions, "InvalidModelConfig", _interpretation_error(exc), now_s
                )
            target_rec = api.RevisionRecord(
                revision=revision.next_number(history),
                hash=target_hash,
                model_version=target_spec.model.version,
                image=target_spec.server.image,
                config_hash=config_hash,
                created=now_s,
                outcome="Pending",
                spec=revision.pod_shaping(target_spec),
            )
            try:
                # status.history keeps the pod-shaping spec a few levels deeper than spec has it.
                _dump(api.ModelDeploymentStatus(history=[target_rec]))
            except (ValueError, RecursionError) as exc:
                return await self._report_spec_error(
                    md, new_status, conditions, "InvalidSpec", _interpretation_error(exc), now_s
                )
            history.append(target_rec)
        else:
            problem = await self._preflight(ns, target_spec)
            if problem and (state is None or target_rec.revision != state.stable_revision):
                return await self._report_spec_error(
                    md, new_status, conditions, problem[0], problem[1], now_s
                )
        by_number = {r.revision: r for r in history}

        # 3. Observe the live revisions.
        strategy = spec.rollout.strategy
        deployments = {d["metadata"]["name"]: d for d in self.cache.owned("Deployment", ns, name)}
        pods = self.cache.owned("Pod", ns, name)

        refused = self._rejected.get((ns, name), {})

        def obs_for(number: int) -> rollout.RevisionObservation:
            rec = by_number.get(number)
            if rec is None:
                return rollout.RevisionObservation()
            dep = deployments.get(builders.deployment_name(owner, rec.hash, strategy))
            rev_pods = [
                p
                for p in pods
                if (p["metadata"].get("labels") or {}).get(builders.LABEL_REVISION) == rec.hash
            ]
            seen = observe_revision(dep, rev_pods)
            # A revision whose Deployment or ConfigMap the API server refuses can never become ready:
            # that is its failure (a candidate is rolled back, a first revision Failed), not a retry loop.
            for key in (
                ("Deployment", builders.deployment_name(owner, rec.hash, strategy)),
                ("ConfigMap", builders.config_map_name(owner, rec.hash)),
            ):
                if key in refused:
                    return replace(seen, failure=f"RejectedByAPIServer: {key[0]} {key[1]}: {refused[key][1]}")
            return seen

        live_numbers = {
            n
            for n in (
                state.stable_revision if state else None,
                state.candidate_revision if state else None,
                state.scale_down_revision if state else None,
            )
            if n is not None
        }
        obs = {n: obs_for(n) for n in live_numbers}
        total = spec.effective_replicas
        if spec.autoscaling is not None and state is not None and state.stable_revision is not None:
            stable_obs = obs.get(state.stable_revision)
            if stable_obs and stable_obs.desired:
                total = max(
                    spec.autoscaling.min_replicas, min(stable_obs.desired, spec.autoscaling.max_replicas)
                )

        # 4. Manual commands: annotation nonces handled once (remembered in status).
        annotations = meta.get("annotations") or {}
        commands = rollout.Commands(
            paused=spec.paused,
            promote=_fresh(annotations, PROMOTE_ANNOTATION, state),
            resume=_fresh(annotations, RESUME_ANNOTATION, state),
            abort=_fresh(annotations, ABORT_ANNOTATION, state),
            fast_track=fast_track,
        )

        # 5. Analysis gate for the candidate, once its pods are ready: the verdict its windows persisted.
        verdict, verdict_reason = None, ""
        analysed: tuple[str, str] | None = None  # (stable hash, candidate hash) while the gate holds
        if (
            state is not None
            and state.candidate_revision is not None
            and state.stable_revision is not None
            and state.state == rollout.PROGRESSING
            and spec.rollout.analysis is not None
            and self.analysis is not None
            and not fast_track
        ):
            cobs = obs.get(state.candidate_revision, rollout.RevisionObservation())
            want = rollout.replicas_for(state, strategy, total).get(state.candidate_revision, 0)
            if cobs.ready >= want > 0:
                analysed = (by_number[state.stable_revision].hash, by_number[state.candidate_revision].hash)
                result = verdict_for(old_status.last_analysis, state, analysed[1])
                verdict = result.verdict if result is not None else PENDING
                verdict_reason = result.reason if result is not None else "the first window has not started"

        # 6. One step of the state machine.
        auto_promote = spec.rollout.blue_green.auto_promote if spec.rollout.blue_green else True
        delay = float(
            spec.rollout.blue_green.scale_down_delay_seconds
            if strategy == api.Strategy.blue_green and spec.rollout.blue_green
            else spec.rollout.scale_down_delay_seconds
        )
        tr = rollout.advance(
            state,
            target=target_rec.revision,
            strategy=strategy,
            steps=api.steps_of(spec),
            obs=obs,
            total=total,
            now=now,
            progress_deadline=float(spec.rollout.progress_deadline_seconds),
            auto_rollback=spec.rollout.auto_rollback,
            commands=commands,
            analysis_verdict=verdict,
            analysis_reason=verdict_reason,
            scale_down_delay=delay,
            auto_promote=auto_promote,
        )
        new_state = tr.state
        events.extend(tr.events)
        for number, (outcome, reason) in tr.outcomes.items():
            history = [
                r.model_copy(update={"outcome": outcome, "reason": reason}) if r.revision == number else r
                for r in history
            ]
        keep = {
            n
            for n in (new_state.stable_revision, new_state.candidate_revision, new_state.scale_down_revision)
            if n is not None
        }
        history = revision.prune(history, spec.revision_history_limit, keep)
        by_number = {r.revision: r for r in history}

        # 7. Status, persisted before acting on the new state.
        for n in keep:
            obs.setdefault(n, obs_for(n))
        self._fill_status(
            new_status,
            conditions,
            owner,
            spec,
            new_state,
            obs,
            total,
            now_s,
            generation,
            history,
            annotations,
        )
        if refused:
            detail = "; ".join(f"{k} {n}: {m}" for (k, n), (_, m, _) in sorted(refused.items()))
            # Set on top of what _fill_status derived, so keep the transition time it had (no flapping).
            was = next((c for c in old_status.conditions or [] if c.type == status.DEGRADED), None)
            new_status.conditions = status.set_condition(
                new_status.conditions or [],
                status.DEGRADED,
                True,
                "ChildRejected",
                f"the API server refused {detail}"[:2048],
                now=was.last_transition_time if was is not None and was.status == "True" else now_s,
                generation=generation,
            )
            if new_status.phase == "Ready":
                new_status.phase = "Degraded"
                new_status.message = (
                    f"serving revision {new_state.stable_revision}; the API server refused {detail}"[:2048]
                )
        if new_status.phase == "Failed" and old_status.phase != "Failed":
            # the first revision cannot start (what its pods say): an Event, once per failure
            events.append(("Warning", "RevisionFailed", new_status.message or "revision failed"))
        if new_status != old_status:
            changed = [
                k for k in type(new_status).model_fields if getattr(new_status, k) != getattr(old_status, k)
            ]
            log.debug("%s/%s: status changes: %s", ns, name, ", ".join(changed))
            written = await self.kube.patch_status(
                api.KIND, ns, name, status_patch(_dump(old_status), _dump(new_status))
            )
            self._remember_own_write(written)
        for ev in events:
            await self.post_event(md, *ev)
        if self.analysis is not None:
            if analysed is not None and state is not None and _same_window(state, new_state):
                self.analysis.ensure(md, spec, state, *analysed)
            else:
                self.analysis.stop(ns, name)

        # 8. Children derived from the persisted state.
        rejected = await self._apply_children(owner, spec, new_state, by_number, total, refused)
        requeue = tr.requeue_after
        if rejected != refused:
            if rejected:
                self._rejected[(ns, name)] = rejected
            else:
                self._rejected.pop((ns, name), None)
            for key, (_, message, _) in sorted(rejected.items()):
                if key not in refused:
                    ev = ("Warning", "ChildRejected", f"the API server refused {key[0]} {key[1]}: {message}")
                    events.append(ev)
                    await self.post_event(md, *ev)
            requeue = 0.5  # once more, so that status (and the rollout) reflect what was refused
        return Outcome(requeue_after=requeue, events=events)

    async def _hand_over_replicas(self, live: dict[str, Any]) -> None:
        """A Deployment whose replicas we wrote becomes the HPA's (a promoted candidate, or the first
        revision). Applying without ``replicas`` would *remove* the field, and the API server would
        default it to 1: capacity would collapse until the HPA noticed. So first the current value is
        applied under a second field manager (the documented server-side-apply hand-over); our apply then
        drops our claim, the value stays, and the HPA's next scale takes the field over."""
        meta = live["metadata"]
        replicas = (live.get("spec") or {}).get("replicas")
        if replicas is None:
            return
        body = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
            "spec": {"replicas": replicas},
        }
        await self.kube.request(
            "PATCH",
            path_for("Deployment", meta["namespace"], meta["name"]),
            kind="Deployment",
            params={"fieldManager": HANDOVER_MANAGER, "force": "true"},
            body=body,
            content_type="application/apply-patch+yaml",
        )

    def _remember_own_write(self, obj: dict[str, Any] | None) -> None:
        """Put the object our status write returned into the cache at once. Until the watch delivers it,
        a reconcile (e.g. triggered by a child's event) would otherwise start from the previous status and
        could take the same transition twice (a second promotion, a second Event)."""
        if obj and obj.get("metadata"):
            obj.setdefault("kind", api.KIND)
            self.cache.put(obj)

    async def _preflight(self, namespace: str, spec: api.ModelDeploymentSpec) -> tuple[str, str] | None:
        if (
            spec.model.config is not None
            and spec.model.scheme in builders.NATIVE_SCHEMES
            and spec.model.scheme not in staging.SUPPORTED_SCHEMES
        ):
            return (
                "StorageNotSupported",
                f"spec.model.config with {spec.model.scheme}:// needs the init-container stager, which "
                "cannot "
                f"fetch {spec.model.scheme}:// yet: put config.pbtxt into the repository and remove "
                "spec.model.config, or serve the repository from pvc:// or https://",
            )
        claim = builders.pvc_claim(spec)
        if claim and not await self._exists("PersistentVolumeClaim", namespace, claim[0]):
            return (
                "ClaimMissing",
                f"spec.model.storageUri: PersistentVolumeClaim {namespace}/{claim[0]} not found; create it "
                "or point storageUri at an existing claim",
            )
        secret = spec.model.credentials_secret
        if secret and not await self._exists("Secret", namespace, secret):
            return (
                "CredentialsSecretMissing",
                f"spec.model.credentialsSecret: Secret {namespace}/{secret} not found; create it (keys: "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for s3, service-account.json for gs, "
                "AZURE_STORAGE_ACCOUNT/AZURE_STORAGE_KEY for as) or remove the field",
            )
        return None

    async def _report_spec_error(
        self,
        md: dict[str, Any],
        new_status: api.ModelDeploymentStatus,
        conditions: list[api.Condition],
        reason: str,
        message: str,
        now_s: str,
    ) -> Outcome:
        meta = md["metadata"]
        gen = meta.get("generation")
        old = new_status.model_copy(deep=True)
        conditions = status.set_condition(
            conditions, status.PROGRESSING, False, reason, message, now=now_s, generation=gen
        )
        if new_status.rollout is None or new_status.rollout.stable_revision is None:
            new_status.phase = "Failed"
            conditions = status.set_condition(
                conditions, status.READY, False, reason, message, now=now_s, generation=gen
            )
        new_status.message = message
        new_status.conditions = conditions
        new_status.observed_generation = gen
        if new_status != old:
            result = await self.kube.patch_status(
                api.KIND, meta["namespace"], meta["name"], status_patch(_dump(old), _dump(new_status))
            )
            self._remember_own_write(result)
            await self.post_event(md, "Warning", reason, message)
        return Outcome(requeue_after=30.0 if reason == "CredentialsSecretMissing" else None)

    def _fill_status(
        self,
        st: api.ModelDeploymentStatus,
        conditions: list[api.Condition],
        owner: builders.Owner,
        spec: api.ModelDeploymentSpec,
        state: api.RolloutState,
        obs: dict[int, rollout.RevisionObservation],
        total: int,
        now_s: str,
        gen: int | None,
        history: list[api.RevisionRecord],
        annotations: dict[str, str],
    ) -> None:
        stable_n, cand_n = state.stable_revision, state.candidate_revision
        stable_obs = obs.get(stable_n, rollout.RevisionObservation()) if stable_n else None
        cand_obs = obs.get(cand_n, rollout.RevisionObservation()) if cand_n else None
        serving_obs = stable_obs if stable_obs is not None else cand_obs or rollout.RevisionObservation()
        by_number = {r.revision: r for r in history}
        was_ready = any(c.type == status.READY and c.status == "True" for c in conditions) or st.phase in (
            "Ready",
            "Degraded",
            "Progressing",
            "Paused",
            "RolledBack",
        )
        first_failure = cand_obs.failure if stable_n is None and cand_obs else None
        phase, message = status.phase_of(
            state,
            stable_ready=serving_obs.ready,
            stable_desired=total,
            first_failure=first_failure,
            spec_error=None,
            was_ready=was_ready,
        )
        ready = stable_obs is not None and stable_obs.ready >= total
        rolling = state.state in (rollout.PROGRESSING, rollout.PROMOTING, rollout.PAUSED)
        conditions = status.set_condition(
            conditions,
            status.READY,
            ready,
            "AllReplicasReady" if ready else "ReplicasNotReady",
            f"{serving_obs.ready}/{total} pods of the serving revision ready",
            now=now_s,
            generation=gen,
        )
        conditions = status.set_condition(
            conditions,
            status.PROGRESSING,
            rolling,
            {
                rollout.PAUSED: "RolloutPaused",
                rollout.PROGRESSING: "RolloutInProgress",
                rollout.PROMOTING: "Promoting",
            }.get(state.state, "RolloutComplete" if state.state == rollout.IDLE else "RolloutStopped"),
            message,
            now=now_s,
            generation=gen,
        )
        degraded = phase in ("Degraded", "Failed")
        conditions = status.set_condition(
            conditions,
            status.DEGRADED,
            degraded,
            phase if degraded else "Healthy",
            message if degraded else "",
            now=now_s,
            generation=gen,
        )
        rolled_back = state.state in (rollout.ROLLED_BACK, rollout.ABORTED)
        conditions = status.set_condition(
            conditions,
            status.ROLLED_BACK,
            rolled_back,
            ("Aborted" if state.state == rollout.ABORTED else "RolledBack")
            if rolled_back
            else "NotRolledBack",
            state.reason or "" if rolled_back else "",
            now=now_s,
            generation=gen,
        )
        st.conditions = conditions
        st.phase, st.message = phase, message
        st.observed_generation = gen
        st.strategy = spec.rollout.strategy.value
        st.replicas = sum(o.desired for o in obs.values())
        st.ready_replicas = sum(o.ready for o in obs.values())
        st.ready = f"{serving_obs.ready}/{total}"
        st.selector = (
            f"{builders.LABEL_NAME}={owner.name},app.kubernetes.io/component={builders.COMPONENT_SERVER}"
        )
        serving = by_number.get(stable_n) if stable_n else None
        st.serving_version = serving.model_version if serving else None
        st.stable_revision = stable_n
        st.candidate_revision = cand_n if rolling else None
        st.current_step = state.step if rolling and spec.rollout.strategy == api.Strategy.canary else None
        st.canary_weight = state.weight if rolling else 0
        st.current_revision = cand_n if rolling else stable_n
        st.rollout = _remember_nonces(state, annotations)
        st.endpoints = api.Endpoints(**builders.endpoints(owner, spec))
        st.history = history

    async def _apply_children(
        self,
        owner: builders.Owner,
        spec: api.ModelDeploymentSpec,
        state: api.RolloutState,
        by_number: dict[int, api.RevisionRecord],
        total: int,
        refused: dict[tuple[str, str], tuple[str, str, float]] | None = None,
    ) -> dict[tuple[str, str], tuple[str, str, float]]:
        """Apply what differs; returns the children the API server refused (see ``ApiError.invalid``)."""
        refused = refused or {}
        rejected: dict[tuple[str, str], tuple[str, str, float]] = {}
        strategy = spec.rollout.strategy
        hpa_on = spec.autoscaling is not None
        plan = rollout.replicas_for(state, strategy, total)
        if strategy == api.Strategy.rolling:
            active = (
                state.candidate_revision
                if state.state in (rollout.PROGRESSING, rollout.PROMOTING, rollout.PAUSED)
                else state.stable_revision
            )
            plan = {active: total} if active is not None else {}
        desired: list[dict[str, Any]] = []
        stable_rec = by_number.get(state.stable_revision) if state.stable_revision else None
        cand_rec = by_number.get(state.candidate_revision) if state.candidate_revision else None
        hpa_target = None
        for number, replicas in sorted(plan.items()):
            rec = by_number.get(number)
            if rec is None or rec.spec is None:
                continue
            rev_spec = revision.with_pod_shaping(spec, rec.spec)
            is_stable = number == state.stable_revision
            # With autoscaling the HPA owns the stable Deployment's replicas; we never write them.
            dep = builders.build_deployment(
                owner,
                rev_spec,
                rec.hash,
                revision_number=number,
                replicas=None if hpa_on and is_stable else replicas,
                stager_image=self.stager_image,
            )
            if is_stable:
                hpa_target = dep["metadata"]["name"]
            desired.append(dep)
            cm = builders.build_config_map(owner, rev_spec, rec.hash)
            if cm is not None:
                desired.append(cm)
        serving = stable_rec or cand_rec
        if serving is not None:
            # A first revision (no stable yet) is served alone: the Services select it exactly as they
            # will once it is promoted, so promotion rewrites none of them.
            candidate_hash = (
                cand_rec.hash
                if cand_rec
                and stable_rec is not None
                and state.state not in (rollout.ROLLED_BACK, rollout.ABORTED, rollout.IDLE)
                else None
            )
            services = builders.build_services(owner, spec, stable=serving.hash, candidate=candidate_hash)
            desired.extend(services)
            if hpa_target is None and serving is cand_rec:
                hpa_target = builders.deployment_name(owner, serving.hash, strategy)
        if hpa_target is not None:
            rolling = state.state in (rollout.PROGRESSING, rollout.PROMOTING, rollout.PAUSED)
            hpa = builders.build_hpa(owner, spec, target=hpa_target, min_replicas=total if rolling else None)
            if hpa is not None:
                desired.append(hpa)
        pdb = builders.build_pdb(owner, spec)
        if pdb is not None:
            desired.append(pdb)
        if spec.rollout.gateway is not None:
            # Exact weights on Gateway API routes, where their CRDs are installed (else: replica ratio).
            in_rollout = state.state in (rollout.PROGRESSING, rollout.PAUSED, rollout.PROMOTING)
            for route in builders.build_routes(owner, spec, weight=state.weight if in_rollout else 0):
                if await self._exists("CustomResourceDefinition", "", builders.ROUTE_CRDS[route["kind"]]):
                    desired.append(route)

        desired.sort(key=lambda o: APPLY_ORDER.index(o["kind"]))
        wanted: set[tuple[str, str]] = set()
        for obj in desired:
            obj = with_applied_hash(obj)
            key = (obj["kind"], obj["metadata"]["name"])
            wanted.add(key)
            intent = obj["metadata"]["annotations"][APPLIED_ANNOTATION]
            before = refused.get(key)
            if (
                before is not None
                and before[0] == intent
                and time.monotonic() - before[2] < REJECTED_RETRY_SECONDS
            ):
                rejected[key] = before  # refused as it is: sent again only once it changes (or after a while)
                continue
            # The namespace was primed (listed) before its first reconcile, and every write's response
            # goes into the cache: a miss means the child does not exist (or lacks our labels).
            live = self.cache.get(obj["kind"], owner.namespace, obj["metadata"]["name"])
            if needs_apply(live, obj):
                if (
                    obj["kind"] == "Deployment"
                    and "replicas" not in obj["spec"]
                    and live is not None
                    and _owns_replicas(live)
                ):
                    await self._hand_over_replicas(live)
                try:
                    result = await self.kube.apply(obj)
                except ApiError as exc:
                    if exc.status == 403 and "being terminated" in exc.body:
                        return rejected  # the namespace is going away, and everything in it
                    if not exc.invalid:
                        raise
                    log.warning(
                        "%s/%s: the API server refused %s %s: %s",
                        owner.namespace,
                        owner.name,
                        *key,
                        exc.message,
                    )
                    rejected[key] = (intent, exc.message, time.monotonic())
                    continue
                self.cache.put(result)
        # Children we own that are no longer wanted (superseded revisions, disabled HPA/PDB).
        for kind in APPLY_ORDER:
            for live in self.cache.owned(kind, owner.namespace, owner.name):
                lmeta = live["metadata"]
                if (kind, lmeta["name"]) in wanted or lmeta.get("deletionTimestamp"):
                    continue
                if not any(ref.get("uid") == owner.uid for ref in lmeta.get("ownerReferences") or []):
                    continue
                try:
                    await self.kube.delete(kind, owner.namespace, lmeta["name"])
                except ApiError as exc:
                    if exc.status != 409:
                        raise
                self.cache.delete(kind, owner.namespace, lmeta["name"])
        return rejected


def _owns_replicas(dep: dict[str, Any]) -> bool:
    """Whether our apply manager owns a Deployment's spec.replicas (so dropping it would reset it)."""
    for entry in dep["metadata"].get("managedFields") or []:
        if (
            entry.get("manager") == builders.MANAGER
            and entry.get("operation") == "Apply"
            and "f:replicas" in ((entry.get("fieldsV1") or {}).get("f:spec") or {})
        ):
            return True
    return False


def _interpretation_error(exc: BaseException) -> str:
    """A status message for a spec the API server accepted but the operator cannot turn into objects."""
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, RecursionError) or "depth" in text:
        return (
            "spec is nested too deeply to be processed: keep the pass-through fields (server.affinity, "
            "server.topologySpreadConstraints, autoscaling.behavior, rollout.gateway.parentRefs) to their "
            "Kubernetes shape"
        )
    return text if text.startswith(("spec.", "model.")) else f"spec cannot be processed: {text}"[:1024]


def _dump(st: api.ModelDeploymentStatus) -> dict[str, Any]:
    return st.model_dump(by_alias=True, exclude_none=True, mode="json")


#: Status fields derived from one observation of the pods: they always travel together.
SUMMARY_FIELDS = ("phase", "message", "ready", "readyReplicas", "replicas", "conditions")


def _same_window(old: api.RolloutState, new: api.RolloutState) -> bool:
    """The transition left the rollout analysing the same candidate at the same step of the same attempt."""
    return (new.state, new.candidate_revision, new.step, new.started_at) == (
        old.state,
        old.candidate_revision,
        old.step,
        old.started_at,
    )


def status_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The merge patch of status from ``old`` (the cache's, possibly behind the server) to ``new``.

    A plain diff leaves out every field ``old`` already shows as ``new`` has it; if the server's differs
    (the cache behind it), the server ends up with one observation's phase beside another's ready count
    ("phase Ready, ready 1/2"). So when any summary field changes, all of them are sent."""
    patch = merge_patch(old, new)
    if any(k in patch for k in SUMMARY_FIELDS):
        for k in SUMMARY_FIELDS:
            patch[k] = new.get(k)
    return patch


def merge_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386 merge patch turning ``old`` into ``new`` (removed keys become null)."""
    patch: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            sub = merge_patch(before, value)
            if sub:
                patch[key] = sub
        elif value != before:
            patch[key] = value
    return patch


def _config_hash(owner: builders.Owner, spec: api.ModelDeploymentSpec) -> str:
    cm = builders.build_config_map(owner, spec, "x")
    if cm is None:
        return ""
    return hashlib.sha256(cm["data"]["config.pbtxt"].encode()).hexdigest()[:16]


def _fresh(annotations: dict[str, str], key: str, state: api.RolloutState | None) -> bool:
    """An annotation command counts once per value (its nonce is remembered in status.rollout)."""
    value = annotations.get(key)
    if not value or state is None:
        return False
    return bool(getattr(state, _nonce_field(key)) != value)


def _nonce_field(key: str) -> str:
    return "handled_" + key.rsplit("/", 1)[-1]


def _remember_nonces(state: api.RolloutState, annotations: dict[str, str]) -> api.RolloutState:
    update = {
        _nonce_field(k): annotations[k]
        for k in (PROMOTE_ANNOTATION, RESUME_ANNOTATION, ABORT_ANNOTATION)
        if annotations.get(k)
    }
    return state.model_copy(update=update) if update else state
