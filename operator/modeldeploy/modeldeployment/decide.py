"""Decide: the pure middle of a reconcile, from an :class:`~.observe.Observation` to a
:class:`Decision` (the next status, the Events, the desired children, when to look again).

Nothing here does I/O or reads a clock: the same observation always gives the same decision, so
every path, the error paths included, is unit-tested with in-memory views.

In order: the spec must be usable (else status says why and nothing running is touched); the revision
the spec asks for is found in, or added to, ``status.history``; its references must exist; the rollout
state machine (:func:`.rollout.advance`) takes at most one step; the status follows from the
new state and what the pods show; the children follow from the new state (:mod:`.children`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import api
from . import builders, revision, rollout, status
from .children import desired_children
from .observe import Observation, references

Event = tuple[str, str, str]  # (type, reason, message)

#: Retry a spec whose credentials Secret is missing this often (Secrets are not watched).
MISSING_SECRET_RETRY_SECONDS = 30.0


@dataclass
class Decision:
    status: api.ModelDeploymentStatus
    events: list[Event] = field(default_factory=list)
    children: list[dict[str, Any]] | None = None  # None: leave the children as they are
    requeue_after: float | None = None
    #: The analysis windows of the candidate's current step go on (else they stop).
    analyse: bool = False


@dataclass(frozen=True)
class Problem:
    """A spec the API server accepted that cannot (or cannot yet) become a revision."""

    reason: str
    message: str


@dataclass(frozen=True)
class Target:
    """The revision the spec asks for, with the history that holds it."""

    record: api.RevisionRecord
    history: list[api.RevisionRecord]
    fast_track: bool  # rollbackTo: no steps, no analysis


def decide(obs: Observation, *, stager_image: str = builders.DEFAULT_STAGER_IMAGE) -> Decision:
    spec = obs.spec
    if spec is None:
        return refuse(obs, Problem("InvalidSpec", obs.spec_error or "spec is invalid"))
    target = usable(spec) or find_target(obs, spec)
    if isinstance(target, Problem):
        return refuse(obs, target)
    state, verdict = obs.old_status.rollout, obs.verdict
    by_number = {r.revision: r for r in target.history}
    revs = {n: obs.revision(by_number.get(n), spec.rollout.strategy) for n in live_revisions(state)}
    total = obs.total(spec, state, revs)
    tr = rollout.advance(
        state,
        target=target.record.revision,
        strategy=spec.rollout.strategy,
        steps=api.steps_of(spec),
        obs=revs,
        total=total,
        now=obs.now,
        progress_deadline=float(spec.rollout.progress_deadline_seconds),
        auto_rollback=spec.rollout.auto_rollback,
        commands=commands(obs.annotations, spec, state, fast_track=target.fast_track),
        analysis_verdict=verdict.verdict if verdict else None,
        analysis_reason=verdict.reason if verdict else "",
        scale_down_delay=scale_down_delay(spec),
        auto_promote=spec.rollout.blue_green.auto_promote if spec.rollout.blue_green else True,
    )
    history = record_outcomes(target.history, tr, spec.revision_history_limit)
    by_number = {r.revision: r for r in history}
    for n in live_revisions(tr.state):
        revs.setdefault(n, obs.revision(by_number.get(n), spec.rollout.strategy))
    new_status = status_of(obs, spec, tr.state, revs, total, history)
    events = list(tr.events)
    if new_status.phase == "Failed" and obs.old_status.phase != "Failed":
        # the first revision cannot start (what its pods say): an Event, once per failure
        events.append(("Warning", "RevisionFailed", new_status.message or "revision failed"))
    children = desired_children(
        obs.owner,
        spec,
        tr.state,
        by_number,
        total,
        stager_image=stager_image,
        route_kinds={kind for kind, crd in builders.ROUTE_CRDS.items() if obs.exists.get(_crd_key(crd))},
    )
    analyse = verdict is not None and state is not None and same_window(state, tr.state)
    return Decision(new_status, events, children, tr.requeue_after, analyse)


def same_window(old: api.RolloutState, new: api.RolloutState) -> bool:
    """The transition left the rollout analysing the same candidate at the same step of the same attempt."""
    return (new.state, new.candidate_revision, new.step, new.started_at) == (
        old.state,
        old.candidate_revision,
        old.step,
        old.started_at,
    )


def _crd_key(name: str) -> tuple[str, str, str]:
    return ("CustomResourceDefinition", "", name)


def route_crd_keys(spec: api.ModelDeploymentSpec) -> list[tuple[str, str, str]]:
    """The CRDs whose presence decides whether Gateway API routes are written."""
    return [_crd_key(crd) for crd in builders.ROUTE_CRDS.values()] if spec.rollout.gateway else []


def live_revisions(state: api.RolloutState | None) -> set[int]:
    if state is None:
        return set()
    numbers = (state.stable_revision, state.candidate_revision, state.scale_down_revision)
    return {n for n in numbers if n is not None}


def scale_down_delay(spec: api.ModelDeploymentSpec) -> float:
    bg = spec.rollout.blue_green
    if spec.rollout.strategy == api.Strategy.blue_green and bg:
        return float(bg.scale_down_delay_seconds)
    return float(spec.rollout.scale_down_delay_seconds)


# --------------------------------------------------------------------------- the spec and its revision


def usable(spec: api.ModelDeploymentSpec) -> Problem | None:
    """The builders serialise the whole spec (with_pod_shaping, the routes), not only the pod-shaping
    part the revision hash reads: a pass-through field nested deeper than pydantic serialises
    (rollout.gateway.parentRefs 300 deep) would raise in every reconcile's apply, forever."""
    try:
        spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    except (ValueError, RecursionError) as exc:
        return Problem("InvalidSpec", interpretation_error(exc))
    return None


def target_spec(
    spec: api.ModelDeploymentSpec, history: list[api.RevisionRecord]
) -> api.ModelDeploymentSpec | Problem:
    """The spec of the revision asked for: ``spec`` itself, or with rollbackTo a remembered revision's."""
    if spec.rollback_to is None:
        return spec
    rec = revision.find(history, number=spec.rollback_to.revision)
    if rec is None or rec.spec is None:
        known = ", ".join(str(r.revision) for r in history) or "none"
        return Problem(
            "UnknownRevision",
            f"spec.rollbackTo.revision {spec.rollback_to.revision} is not in status.history "
            f"(known: {known}); pick one of those or remove spec.rollbackTo",
        )
    try:
        return revision.with_pod_shaping(spec, rec.spec)
    except (ValueError, RecursionError) as exc:
        return Problem("InvalidSpec", interpretation_error(exc))


def find_target(obs: Observation, spec: api.ModelDeploymentSpec) -> Target | Problem:
    """The revision the spec asks for: found in status.history, or a new record for it. A new revision
    is checked before it exists (what is valid but cannot work is reported, the running one left alone)."""
    history = list(obs.old_status.history or [])
    want = target_spec(spec, history)
    if isinstance(want, Problem):
        return want
    try:
        want_hash = revision.revision_hash(want)
    except (ValueError, RecursionError) as exc:  # e.g. a pass-through field nested too deep to serialise
        return Problem("InvalidSpec", interpretation_error(exc))
    fast_track = spec.rollback_to is not None
    problem = preflight(obs, want)
    rec = revision.find(history, hash=want_hash)
    state = obs.old_status.rollout
    if rec is not None:
        if problem and (state is None or rec.revision != state.stable_revision):
            return problem
        return Target(rec, history, fast_track)
    if problem:
        return problem
    rec_or_problem = new_record(obs, want, want_hash, history)
    if isinstance(rec_or_problem, Problem):
        return rec_or_problem
    return Target(rec_or_problem, [*history, rec_or_problem], fast_track)


def new_record(
    obs: Observation, spec: api.ModelDeploymentSpec, rev_hash: str, history: list[api.RevisionRecord]
) -> api.RevisionRecord | Problem:
    try:
        cm = builders.build_config_map(obs.owner, spec, "x")
    except (ValueError, RecursionError) as exc:  # ConfigRenderError: Triton cannot load it
        return Problem("InvalidModelConfig", interpretation_error(exc))
    rec = api.RevisionRecord(
        revision=revision.next_number(history),
        hash=rev_hash,
        model_version=spec.model.version,
        image=spec.server.image,
        config_hash=hashlib.sha256(cm["data"]["config.pbtxt"].encode()).hexdigest()[:16] if cm else "",
        created=rollout.now_iso(obs.now),
        outcome="Pending",
        spec=revision.pod_shaping(spec),
    )
    try:
        # status.history keeps the pod-shaping spec a few levels deeper than spec has it.
        dump_status(api.ModelDeploymentStatus(history=[rec]))
    except (ValueError, RecursionError) as exc:
        return Problem("InvalidSpec", interpretation_error(exc))
    return rec


def preflight(obs: Observation, spec: api.ModelDeploymentSpec) -> Problem | None:
    """Objects the model needs that do not exist (observed by :func:`.observe.references`;
    one not observed counts as present: its pods will say if it is not)."""
    ns = obs.owner.namespace
    for kind, name in references(spec):
        if obs.exists.get((kind, ns, name), True):
            continue
        if kind == "PersistentVolumeClaim":
            return Problem(
                "ClaimMissing",
                f"spec.model.storageUri: PersistentVolumeClaim {ns}/{name} not found; create it "
                "or point storageUri at an existing claim",
            )
        return Problem(
            "CredentialsSecretMissing",
            f"spec.model.credentialsSecret: Secret {ns}/{name} not found; create it (keys: "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for s3, service-account.json for gs, "
            "AZURE_STORAGE_ACCOUNT/AZURE_STORAGE_KEY for as) or remove the field",
        )
    return None


def interpretation_error(exc: BaseException) -> str:
    """A status message for a spec the API server accepted but the operator cannot turn into objects."""
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, RecursionError) or "depth" in text:
        return (
            "spec is nested too deeply to be processed: keep the pass-through fields (server.affinity, "
            "server.topologySpreadConstraints, autoscaling.behavior, rollout.gateway.parentRefs) to their "
            "Kubernetes shape"
        )
    return text if text.startswith(("spec.", "model.")) else f"spec cannot be processed: {text}"[:1024]


def refuse(obs: Observation, problem: Problem) -> Decision:
    """Status says what is wrong (Failed if nothing serves yet); the children are left as they are."""
    old, gen, now = obs.old_status, obs.generation, rollout.now_iso(obs.now)
    new = old.model_copy(deep=True)
    conditions = status.set_condition(
        list(old.conditions or []),
        status.PROGRESSING,
        False,
        problem.reason,
        problem.message,
        now=now,
        generation=gen,
    )
    if new.rollout is None or new.rollout.stable_revision is None:
        new.phase = "Failed"
        conditions = status.set_condition(
            conditions, status.READY, False, problem.reason, problem.message, now=now, generation=gen
        )
    new.message = problem.message
    new.conditions = conditions
    new.observed_generation = gen
    events = [("Warning", problem.reason, problem.message)] if new != old else []
    retry = MISSING_SECRET_RETRY_SECONDS if problem.reason == "CredentialsSecretMissing" else None
    return Decision(new, events, None, retry)


# --------------------------------------------------------------------------- commands and history


def commands(
    annotations: Mapping[str, str],
    spec: api.ModelDeploymentSpec,
    state: api.RolloutState | None,
    *,
    fast_track: bool,
) -> rollout.Commands:
    """Manual commands: spec.paused, and annotation nonces not acted on yet (remembered in status)."""
    return rollout.Commands(
        paused=spec.paused,
        promote=fresh(annotations, api.PROMOTE_ANNOTATION, state),
        resume=fresh(annotations, api.RESUME_ANNOTATION, state),
        abort=fresh(annotations, api.ABORT_ANNOTATION, state),
        fast_track=fast_track,
    )


def fresh(annotations: Mapping[str, str], key: str, state: api.RolloutState | None) -> bool:
    """An annotation command counts once per value (its nonce is remembered in status.rollout)."""
    value = annotations.get(key)
    if not value or state is None:
        return False
    return bool(getattr(state, _nonce_field(key)) != value)


def _nonce_field(key: str) -> str:
    return "handled_" + key.rsplit("/", 1)[-1]


def remember_nonces(state: api.RolloutState, annotations: Mapping[str, str]) -> api.RolloutState:
    update = {_nonce_field(k): annotations[k] for k in api.COMMAND_ANNOTATIONS if annotations.get(k)}
    return state.model_copy(update=update) if update else state


def record_outcomes(
    history: list[api.RevisionRecord], tr: rollout.Transition, limit: int
) -> list[api.RevisionRecord]:
    """History with the transition's outcomes written, pruned to ``limit`` (live revisions kept)."""
    for number, (outcome, reason) in tr.outcomes.items():
        history = [
            r.model_copy(update={"outcome": outcome, "reason": reason}) if r.revision == number else r
            for r in history
        ]
    return revision.prune(history, limit, live_revisions(tr.state))


# --------------------------------------------------------------------------- status


def status_of(
    obs: Observation,
    spec: api.ModelDeploymentSpec,
    state: api.RolloutState,
    revs: Mapping[int, rollout.RevisionObservation],
    total: int,
    history: list[api.RevisionRecord],
) -> api.ModelDeploymentStatus:
    """The one status computation: phase, conditions and counts from the new state and the pods."""
    st = obs.old_status.model_copy()  # every field but lastAnalysis (the windows' to write) is set below
    empty = rollout.RevisionObservation()
    stable_n, cand_n = state.stable_revision, state.candidate_revision
    stable_obs = revs.get(stable_n, empty) if stable_n else None
    cand_obs = revs.get(cand_n, empty) if cand_n else None
    serving_obs = stable_obs if stable_obs is not None else cand_obs or empty
    phase, message = status.phase_of(
        state,
        stable_ready=serving_obs.ready,
        stable_desired=total,
        first_failure=cand_obs.failure if stable_n is None and cand_obs else None,
        spec_error=None,
        was_ready=_was_ready(obs.old_status),
    )
    rolling = state.state in (rollout.PROGRESSING, rollout.PROMOTING, rollout.PAUSED)
    ready = stable_obs is not None and stable_obs.ready >= total
    st.conditions = _conditions(
        obs,
        state,
        phase,
        message,
        ready=ready,
        ready_message=f"{serving_obs.ready}/{total} pods of the serving revision ready",
    )
    st.phase, st.message = phase, message
    st.observed_generation = obs.generation
    st.strategy = spec.rollout.strategy.value
    st.replicas = _desired_pods(obs, spec, state, revs, history, total)
    st.ready_replicas = sum(o.ready for o in revs.values())
    st.ready = f"{serving_obs.ready}/{total}"
    owner = obs.owner
    st.selector = f"{api.LABEL_NAME}={owner.name},{_COMPONENT}={builders.COMPONENT_SERVER}"
    by_number = {r.revision: r for r in history}
    serving = by_number.get(stable_n) if stable_n else None
    st.serving_version = serving.model_version if serving else None
    st.stable_revision = stable_n
    st.candidate_revision = cand_n if rolling else None
    st.current_step = state.step if rolling and spec.rollout.strategy == api.Strategy.canary else None
    st.canary_weight = state.weight if rolling else 0
    st.current_revision = cand_n if rolling else stable_n
    st.rollout = remember_nonces(state, obs.annotations)
    st.endpoints = api.Endpoints(**builders.endpoints(owner, spec))
    st.history = history
    return with_refusals(obs, st)


_COMPONENT = "app.kubernetes.io/component"


def _desired_pods(
    obs: Observation,
    spec: api.ModelDeploymentSpec,
    state: api.RolloutState,
    revs: Mapping[int, rollout.RevisionObservation],
    history: list[api.RevisionRecord],
    total: int,
) -> int:
    """Pods wanted across the live revisions: each Deployment's spec.replicas, and for a Deployment this
    reconcile creates, the replicas it is created with (a new ModelDeployment's first status says 1 of 1,
    not 0 and then 1 in a second write once the Deployment is seen)."""
    strategy = spec.rollout.strategy
    applying = rollout.replicas_for(state, strategy, total)
    hashes = {r.revision: r.hash for r in history}
    out = 0
    for number, seen in revs.items():
        name = builders.deployment_name(obs.owner, hashes[number], strategy) if number in hashes else None
        out += seen.desired if name is None or name in obs.deployments else applying.get(number, 0)
    return out


def _was_ready(old: api.ModelDeploymentStatus) -> bool:
    return any(c.type == status.READY and c.status == "True" for c in old.conditions or []) or old.phase in (
        "Ready",
        "Degraded",
        "Progressing",
        "Paused",
        "RolledBack",
    )


_PROGRESS_REASON = {
    rollout.PAUSED: "RolloutPaused",
    rollout.PROGRESSING: "RolloutInProgress",
    rollout.PROMOTING: "Promoting",
}


def _conditions(
    obs: Observation,
    state: api.RolloutState,
    phase: str,
    message: str,
    *,
    ready: bool,
    ready_message: str,
) -> list[api.Condition]:
    """Ready, Progressing, Degraded and RolledBack (lastTransitionTime moves only on a change)."""
    now, gen = rollout.now_iso(obs.now), obs.generation
    conditions = status.set_condition(
        list(obs.old_status.conditions or []),
        status.READY,
        ready,
        "AllReplicasReady" if ready else "ReplicasNotReady",
        ready_message,
        now=now,
        generation=gen,
    )
    rolling = state.state in _PROGRESS_REASON
    default_reason = "RolloutComplete" if state.state == rollout.IDLE else "RolloutStopped"
    conditions = status.set_condition(
        conditions,
        status.PROGRESSING,
        rolling,
        _PROGRESS_REASON.get(state.state, default_reason),
        message,
        now=now,
        generation=gen,
    )
    degraded = phase in ("Degraded", "Failed")
    conditions = status.set_condition(
        conditions,
        status.DEGRADED,
        degraded,
        phase if degraded else "Healthy",
        message if degraded else "",
        now=now,
        generation=gen,
    )
    stopped = state.state in (rollout.ROLLED_BACK, rollout.ABORTED)
    return status.set_condition(
        conditions,
        status.ROLLED_BACK,
        stopped,
        ("Aborted" if state.state == rollout.ABORTED else "RolledBack") if stopped else "NotRolledBack",
        state.reason or "" if stopped else "",
        now=now,
        generation=gen,
    )


def with_refusals(obs: Observation, st: api.ModelDeploymentStatus) -> api.ModelDeploymentStatus:
    """Children the API server refused make the ModelDeployment Degraded, saying which and why."""
    if not obs.refused:
        return st
    detail = "; ".join(f"{k} {n}: {m}" for (k, n), (_, m, _) in sorted(obs.refused.items()))
    # Set on top of the derived conditions, so keep the transition time it had (no flapping).
    was = next((c for c in obs.old_status.conditions or [] if c.type == status.DEGRADED), None)
    now = rollout.now_iso(obs.now)
    st.conditions = status.set_condition(
        st.conditions or [],
        status.DEGRADED,
        True,
        "ChildRejected",
        f"the API server refused {detail}"[:2048],
        now=was.last_transition_time if was is not None and was.status == "True" else now,
        generation=obs.generation,
    )
    if st.phase == "Ready":
        st.phase = "Degraded"
        stable = st.rollout.stable_revision if st.rollout else None
        st.message = f"serving revision {stable}; the API server refused {detail}"[:2048]
    return st


def dump_status(st: api.ModelDeploymentStatus) -> dict[str, Any]:
    return st.model_dump(by_alias=True, exclude_none=True, mode="json")
