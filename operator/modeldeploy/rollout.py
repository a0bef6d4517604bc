"""How a rollout step advances: the persisted rollout state machine, as pure functions.

``advance()`` takes the persisted state, the revision the spec asks for and what is
observed in the cluster, and returns the next state: at most one transition per call.
``replicas_for()`` derives, from a state alone, how many pods each live revision gets.
The reconciler persists the new state in status *before* it acts on it, so an operator
killed at any moment resumes from the last persisted step: acting twice on the same
state is harmless, and no transition can happen twice.

States (``RolloutState.state``):
  Idle         no rollout; ``stable`` serves.
  Progressing  ``candidate`` is at ``steps[step]``; waiting for pods, analysis or pause.
  Paused       stopped at a step (spec.paused, or a step pause without duration).
  Promoting    last step passed: candidate scaled to full capacity, then becomes stable.
  RolledBack   candidate failed (reason kept); stable serves until the spec changes.
  Aborted      stopped by the user; stable serves until the spec changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime

from . import api, timeutil

IDLE, PROGRESSING, PAUSED, PROMOTING, ROLLED_BACK, ABORTED = api.RolloutPhase

CRASHLOOP_RESTARTS = 3
FAILED_PAUSE = "Failed: "
WAITING = api.PauseReason.waiting_for_promote


# Persisted timestamps (status.rollout.*At); the reconcile imports these names.
now_iso = timeutil.rfc3339
parse_time = timeutil.parse_rfc3339


@dataclass(frozen=True)
class RevisionObservation:
    """What the cluster shows of one revision's pods."""

    desired: int = 0  # Deployment spec.replicas as observed
    ready: int = 0  # ready pods of this revision
    updated: int = 0  # pods of the current template
    failure: str | None = None  # CrashLoopBackOff, ProgressDeadlineExceeded, ... when visible


@dataclass(frozen=True)
class Commands:
    """Manual control, from spec and annotations (nonces already de-duplicated)."""

    paused: bool = False
    promote: bool = False  # skip the remaining steps
    resume: bool = False  # continue past an indefinite pause
    abort: bool = False
    fast_track: bool = False  # rollbackTo: no steps, no analysis


@dataclass
class Transition:
    state: api.RolloutState
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    outcomes: dict[int, tuple[str, str | None]] = field(default_factory=dict)  # revision -> (outcome, reason)
    requeue_after: float | None = None


def idle(stable: int | None) -> api.RolloutState:
    return api.RolloutState(state=IDLE, stable_revision=stable, weight=0)


def candidate_replicas(total: int, weight: int) -> int:
    """Candidate pods so that candidate/(stable+candidate) is as close to ``weight`` as possible
    while stable keeps all ``total`` pods (capacity never drops)."""
    if weight >= 100:
        return total
    if total == 0:
        return 0
    exact = total * weight / (100 - weight)
    lo = max(1, math.floor(exact))
    return min((lo, lo + 1), key=lambda c: (abs(100 * c / (total + c) - weight), c))


def actual_weight(stable_ready: int, candidate_ready: int) -> int:
    both = stable_ready + candidate_ready
    return 0 if both == 0 else math.floor(100 * candidate_ready / both + 0.5)


def replicas_for(state: api.RolloutState, strategy: api.Strategy, total: int) -> dict[int, int]:
    """Revision number -> replicas, for every revision that should have pods."""
    stable, cand = state.stable_revision, state.candidate_revision
    out: dict[int, int] = {}
    if stable is not None:
        out[stable] = total
    if cand is None or cand == stable or state.state in (ROLLED_BACK, ABORTED, IDLE):
        if state.scale_down_revision is not None and state.scale_down_revision != stable:
            out[state.scale_down_revision] = total
        return out
    if strategy == api.Strategy.blue_green or state.state == PROMOTING or stable is None:
        out[cand] = total
    else:
        out[cand] = candidate_replicas(total, state.weight)
    return out


def _fail(
    state: api.RolloutState, reason: str, now: datetime, *, auto_rollback: bool, aborted: bool = False
) -> Transition:
    cand = state.candidate_revision
    if not auto_rollback and not aborted:
        st = state.model_copy(
            update={
                "state": PAUSED,
                "pause_reason": api.PauseReason.candidate_failed,
                "reason": f"{FAILED_PAUSE}{reason} (autoRollback is off)",
            }
        )
        return Transition(
            st,
            [("Warning", "RolloutFailed", f"revision {cand} failed: {reason}; paused")],
            requeue_after=None,
        )
    new = api.RolloutState(
        state=ABORTED if aborted else ROLLED_BACK,
        stable_revision=state.stable_revision,
        candidate_revision=cand,
        step=state.step,
        weight=0,
        started_at=state.started_at,
        step_started_at=now_iso(now),
        reason=reason,
        # A revision still kept for its scale-down delay stays kept: the failure is not its business.
        scale_down_revision=state.scale_down_revision,
        scale_down_at=state.scale_down_at,
    )
    outcome = "Aborted" if aborted else "RolledBack"
    verb = "aborted" if aborted else "rolled back"
    events = [
        (
            "Warning",
            "RolledBack" if not aborted else "Aborted",
            f"revision {cand} {verb}: {reason}; traffic back on revision {state.stable_revision}",
        )
    ]
    return Transition(new, events, {cand: (outcome, reason)} if cand is not None else {})


def advance(
    state: api.RolloutState | None,
    *,
    target: int,
    strategy: api.Strategy,
    steps: list[api.CanaryStep],
    obs: dict[int, RevisionObservation],
    total: int,
    now: datetime,
    progress_deadline: float,
    auto_rollback: bool,
    commands: Commands,
    analysis_verdict: str | None = None,
    analysis_reason: str = "",
    scale_down_delay: float = 0.0,
    auto_promote: bool = True,
) -> Transition:
    """One step of the rollout state machine. ``target`` is the revision the spec asks for."""
    if state is None or (state.stable_revision is None and state.candidate_revision is None):
        # First revision ever: no stable to protect; it comes up at full size.
        st = api.RolloutState(
            state=PROMOTING,
            stable_revision=None,
            candidate_revision=target,
            step=0,
            weight=100,
            started_at=now_iso(now),
            step_started_at=now_iso(now),
        )
        return Transition(
            st, [("Normal", "Creating", f"revision {target} created")], {target: ("Progressing", None)}
        )

    # Delayed scale-down of a superseded revision.
    scale_down_wait: float | None = None
    if state.scale_down_revision is not None:
        due = parse_time(state.scale_down_at)
        if due is None or now >= due:
            st = state.model_copy(update={"scale_down_revision": None, "scale_down_at": None})
            return Transition(
                st, [("Normal", "ScaledDown", f"revision {state.scale_down_revision} scaled down")]
            )
        scale_down_wait = (due - now).total_seconds() + 0.1

    stable, cand = state.stable_revision, state.candidate_revision

    # A new target while idle, rolled back or mid-rollout: start (or restart) a rollout.
    if (target != cand and target != stable) or (
        target == stable
        and cand is not None
        and state.state in (PROGRESSING, PAUSED, PROMOTING)
        and stable is not None
    ):
        if target == stable:
            # The spec went back to the stable revision mid-rollout: the candidate is dropped.
            st = idle(stable).model_copy(update={"reason": f"spec returned to revision {stable}"})
            return Transition(
                st,
                [
                    (
                        "Normal",
                        "RolloutCancelled",
                        f"spec returned to revision {stable}; revision {cand} dropped",
                    )
                ],
                {cand: ("Superseded", "spec changed")} if cand is not None else {},
            )
        outcomes: dict[int, tuple[str, str | None]] = {target: ("Progressing", None)}
        if cand is not None and state.state in (PROGRESSING, PAUSED, PROMOTING):
            outcomes[cand] = ("Superseded", f"replaced by revision {target} mid-rollout")
        if stable is None:
            st = api.RolloutState(
                state=PROMOTING,
                candidate_revision=target,
                weight=100,
                started_at=now_iso(now),
                step_started_at=now_iso(now),
            )
            return Transition(st, [("Normal", "Creating", f"revision {target} created")], outcomes)
        first_state = PROMOTING if strategy == api.Strategy.rolling or commands.fast_track else PROGRESSING
        weight = (
            100 if first_state == PROMOTING else 0 if strategy == api.Strategy.blue_green else steps[0].weight
        )
        st = api.RolloutState(
            state=first_state,
            stable_revision=stable,
            candidate_revision=target,
            step=0,
            weight=weight,
            started_at=now_iso(now),
            step_started_at=now_iso(now),
            scale_down_revision=state.scale_down_revision,
            scale_down_at=state.scale_down_at,
        )
        return Transition(
            st,
            [
                (
                    "Normal",
                    "RolloutStarted",
                    f"{strategy.value} rollout of revision {target} started (stable: {stable})",
                )
            ],
            outcomes,
        )

    if state.state in (ROLLED_BACK, ABORTED) and target == stable and cand is not None:
        return Transition(idle(stable), [("Normal", "Idle", f"spec is back at stable revision {stable}")])
    if state.state in (IDLE, ROLLED_BACK, ABORTED):
        return Transition(state, requeue_after=scale_down_wait)

    assert cand is not None
    cobs = obs.get(cand, RevisionObservation())
    step_started = parse_time(state.step_started_at) or now
    elapsed = (now - step_started).total_seconds()

    if commands.abort:
        return _fail(state, "aborted by user", now, auto_rollback=True, aborted=True)
    if state.state == PAUSED and state.pause_reason == api.PauseReason.candidate_failed:
        # Failed with autoRollback off: hold until the user decides (promote, resume or abort).
        if commands.promote:
            st = state.model_copy(
                update={
                    "state": PROMOTING,
                    "pause_reason": None,
                    "weight": 100,
                    "step_started_at": now_iso(now),
                    "reason": "promoted by user",
                }
            )
            return Transition(st, [("Normal", "PromoteRequested", f"revision {cand}: promoted by user")])
        if commands.resume:
            st = state.model_copy(
                update={
                    "state": PROGRESSING,
                    "pause_reason": None,
                    "step_started_at": now_iso(now),
                    "reason": None,
                }
            )
            return Transition(st, [("Normal", "Resumed", f"rollout of revision {cand} resumed")])
        return Transition(state)
    if cobs.failure and stable is not None:
        return _fail(state, cobs.failure, now, auto_rollback=auto_rollback)
    if commands.promote and state.state != PROMOTING:
        st = state.model_copy(
            update={
                "state": PROMOTING,
                "pause_reason": None,
                "weight": 100,
                "step_started_at": now_iso(now),
                "reason": "promoted by user",
            }
        )
        return Transition(st, [("Normal", "PromoteRequested", f"revision {cand}: remaining steps skipped")])

    want = replicas_for(state, strategy, total).get(cand, 0)
    pods_ready = cobs.ready >= want and cobs.updated >= want
    if not pods_ready:
        if elapsed > progress_deadline and stable is not None:
            return _fail(
                state,
                f"ProgressDeadlineExceeded: {cobs.ready}/{want} pods ready after "
                f"{int(elapsed)}s (progressDeadlineSeconds {int(progress_deadline)})",
                now,
                auto_rollback=auto_rollback,
            )
        # Past the deadline without a stable revision (a first revision that never became ready) nothing is
        # left to time: pod and Deployment events wake the reconcile. Requeueing every second would spin.
        left = progress_deadline - elapsed
        return Transition(state, requeue_after=max(1.0, left + 0.5) if left >= 0 else scale_down_wait)

    if state.state == PROMOTING:
        # Candidate (pre-)scaled to full size and ready: it becomes stable.
        delay_at = now.timestamp() + scale_down_delay
        st = api.RolloutState(
            state=IDLE,
            stable_revision=cand,
            candidate_revision=None,
            weight=0,
            started_at=state.started_at,
            scale_down_revision=stable if stable is not None and scale_down_delay > 0 else None,
            scale_down_at=now_iso(datetime.fromtimestamp(delay_at, UTC))
            if stable and scale_down_delay > 0
            else None,
        )
        outcomes = {cand: ("Serving", None)}
        if stable is not None:
            outcomes[stable] = ("Superseded", f"replaced by revision {cand}")
        verb = "promoted" if stable is not None else "ready"
        return Transition(
            st,
            [("Normal", "Promoted", f"revision {cand} {verb}: serving all traffic")],
            outcomes,
            requeue_after=scale_down_delay + 0.5 if stable and scale_down_delay > 0 else None,
        )

    if commands.paused:
        if state.state != PAUSED:
            st = state.model_copy(
                update={"state": PAUSED, "pause_reason": api.PauseReason.spec_paused, "reason": "spec.paused"}
            )
            return Transition(st, [("Normal", "Paused", f"rollout of revision {cand} paused")])
        return Transition(state)

    if state.state == PAUSED and state.pause_reason == api.PauseReason.spec_paused:
        st = state.model_copy(
            update={
                "state": PROGRESSING,
                "pause_reason": None,
                "reason": None,
                "step_started_at": now_iso(now),
            }
        )
        return Transition(st, [("Normal", "Resumed", f"rollout of revision {cand} resumed")])

    # Strategy gates: analysis once pods are ready.
    if analysis_verdict == "Fail":
        return _fail(state, f"analysis failed: {analysis_reason}", now, auto_rollback=auto_rollback)
    if analysis_verdict in ("Pending", "Inconclusive"):
        if elapsed > progress_deadline:
            return _fail(
                state,
                f"analysis inconclusive past the deadline: {analysis_reason}",
                now,
                auto_rollback=auto_rollback,
            )
        return Transition(state, requeue_after=1.0)

    if strategy == api.Strategy.blue_green:
        # Preview is ready (and passed analysis): flip, unless waiting for a manual promote.
        if auto_promote or commands.resume:
            st = state.model_copy(
                update={
                    "state": PROMOTING,
                    "pause_reason": None,
                    "weight": 100,
                    "step_started_at": now_iso(now),
                    "reason": None,
                }
            )
            return Transition(
                st, [("Normal", "Promoting", f"preview revision {cand} ready: switching traffic")]
            )
        if state.state != PAUSED:
            st = state.model_copy(
                update={"state": PAUSED, "pause_reason": WAITING, "reason": "waiting for promote"}
            )
            return Transition(st, [("Normal", "Paused", f"preview revision {cand} ready; waits for promote")])
        return Transition(state)

    step = steps[min(state.step, len(steps) - 1)]
    ready_at = parse_time(state.step_ready_at)
    if ready_at is None:
        st = state.model_copy(update={"step_ready_at": now_iso(now)})
        return Transition(
            st,
            [
                (
                    "Normal",
                    "StepReady",
                    f"revision {cand} step {state.step + 1}/{len(steps)} at weight {state.weight}%",
                )
            ],
        )
    if step.pause is not None:
        if step.pause.duration is None:
            if not commands.resume:
                if state.state != PAUSED:
                    st = state.model_copy(
                        update={"state": PAUSED, "pause_reason": WAITING, "reason": "waiting for promote"}
                    )
                    return Transition(
                        st,
                        [("Normal", "Paused", f"revision {cand}: step {state.step + 1} waits for promote")],
                    )
                return Transition(state)
        else:
            left = api.parse_duration(step.pause.duration) - (now - ready_at).total_seconds()
            if left > 0:
                return Transition(state, requeue_after=left + 0.1)
    nxt = state.step + 1
    if nxt >= len(steps) or steps[nxt].weight >= 100:
        st = state.model_copy(
            update={
                "state": PROMOTING,
                "pause_reason": None,
                "step": min(nxt, len(steps) - 1),
                "weight": 100,
                "step_started_at": now_iso(now),
                "step_ready_at": None,
                "reason": None,
            }
        )
        return Transition(st, [("Normal", "Promoting", f"revision {cand}: final step, scaling to full size")])
    st = state.model_copy(
        update={
            "state": PROGRESSING,
            "pause_reason": None,
            "step": nxt,
            "weight": steps[nxt].weight,
            "step_started_at": now_iso(now),
            "step_ready_at": None,
            "reason": None,
        }
    )
    return Transition(
        st,
        [
            (
                "Normal",
                "StepAdvanced",
                f"revision {cand}: step {nxt + 1}/{len(steps)}, weight {steps[nxt].weight}%",
            )
        ],
    )
