"""How a rollout step advances: the persisted rollout state machine, as pure functions.

``advance()`` takes the persisted state, the revision the spec asks for and what is
observed in the cluster, and returns the next state: at most one transition per call.
``replicas_for()`` derives, from a state alone, how many pods each live revision gets.
The reconciler persists the new state in status *before* it acts on it, so an operator
killed at any moment resumes from the last persisted step: acting twice on the same
state is harmless, and no transition can happen twice.

The phases (``RolloutState.state``: Idle, Progressing, Paused, Promoting, RolledBack, Aborted)
and the reasons of a pause (``RolloutState.pause_reason``) are ``api.RolloutPhase`` and
``api.PauseReason``; what each one means is written once, in ``api.ROLLOUT_PHASES`` and
``api.PAUSE_REASONS``, which the CRD shows as well.

``advance()`` is a dispatcher. It asks the gates listed in ``GATES`` (at the end of this
module) in their order; the first that decides returns the transition, a gate that lets the
rollout through returns None. The order is the semantics: an abort beats everything after it,
no step is taken before the candidate's pods are ready, and so on. The gates are defined
below in that same order, one concern each.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from .. import api, timeutil

# The phases by their old names: the reconcile and the tests compare against these.
IDLE: Final = api.RolloutPhase.idle
PROGRESSING: Final = api.RolloutPhase.progressing
PAUSED: Final = api.RolloutPhase.paused
PROMOTING: Final = api.RolloutPhase.promoting
ROLLED_BACK: Final = api.RolloutPhase.rolled_back
ABORTED: Final = api.RolloutPhase.aborted

_IN_FLIGHT = (PROGRESSING, PAUSED, PROMOTING)  # the phases with a candidate to advance
_STOPPED = (IDLE, ROLLED_BACK, ABORTED)

CRASHLOOP_RESTARTS = 3

# Persisted timestamps (status.rollout.*At); the reconcile imports these names.
now_iso = timeutil.rfc3339
parse_time = timeutil.parse_rfc3339

Event = tuple[str, str, str]  # (type, reason, message), as posted on the ModelDeployment


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
    events: list[Event] = field(default_factory=list)
    outcomes: dict[int, tuple[str, str | None]] = field(default_factory=dict)  # revision -> (outcome, reason)
    requeue_after: float | None = None


def idle(stable: int | None) -> api.RolloutState:
    return api.RolloutState(state=IDLE, stable_revision=stable, weight=0)


# --------------------------------------------------------------------------- replica maths


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
    if cand is None or cand == stable or state.state in _STOPPED:
        if state.scale_down_revision is not None and state.scale_down_revision != stable:
            out[state.scale_down_revision] = total
        return out
    if strategy == api.Strategy.blue_green or state.state == PROMOTING or stable is None:
        out[cand] = total
    else:
        out[cand] = candidate_replicas(total, state.weight)
    return out


# --------------------------------------------------------------------------- one call's inputs


@dataclass(frozen=True)
class _Context:
    """The inputs of one ``advance()`` call, with the values several gates derive from them."""

    state: api.RolloutState
    target: int
    strategy: api.Strategy
    steps: list[api.CanaryStep]
    obs: dict[int, RevisionObservation]
    total: int
    now: datetime
    progress_deadline: float
    auto_rollback: bool
    commands: Commands
    analysis_verdict: str | None
    analysis_reason: str
    scale_down_delay: float
    auto_promote: bool

    @property
    def candidate(self) -> int:
        """The candidate revision: every gate after ``_stopped`` has one."""
        assert self.state.candidate_revision is not None
        return self.state.candidate_revision

    @property
    def pods(self) -> RevisionObservation:
        """What the cluster shows of the candidate's pods."""
        return self.obs.get(self.candidate, RevisionObservation())

    @property
    def stamp(self) -> str:
        return now_iso(self.now)

    @property
    def elapsed(self) -> float:
        """Seconds since the current step started."""
        started = parse_time(self.state.step_started_at) or self.now
        return (self.now - started).total_seconds()

    @property
    def scale_down_wait(self) -> float | None:
        """Seconds until a superseded revision's scale-down is due (None: none is waiting)."""
        due = parse_time(self.state.scale_down_at)
        if self.state.scale_down_revision is None or due is None or self.now >= due:
            return None
        return (due - self.now).total_seconds() + 0.1


# --------------------------------------------------------------------------- transitions the gates share


def _normal(reason: str, message: str) -> Event:
    return ("Normal", reason, message)


def _hold(ctx: _Context, requeue_after: float | None = None) -> Transition:
    """Nothing changes (no event): wait, and be called again after ``requeue_after`` if set."""
    return Transition(ctx.state, requeue_after=requeue_after)


def _moved(ctx: _Context, phase: api.RolloutPhase, **update: Any) -> api.RolloutState:
    """The state in ``phase`` (not Paused: a pause reason does not outlive its pause)."""
    return ctx.state.model_copy(update={"state": phase, "pause_reason": None, **update})


def _pause(ctx: _Context, why: api.PauseReason, reason: str, event: Event) -> Transition:
    st = ctx.state.model_copy(update={"state": PAUSED, "pause_reason": why, "reason": reason})
    return Transition(st, [event])


def _resume(ctx: _Context) -> Transition:
    st = _moved(ctx, PROGRESSING, step_started_at=ctx.stamp, reason=None)
    return Transition(st, [_normal("Resumed", f"rollout of revision {ctx.candidate} resumed")])


def _promoted_by_user(ctx: _Context, message: str) -> Transition:
    st = _moved(ctx, PROMOTING, weight=100, step_started_at=ctx.stamp, reason="promoted by user")
    return Transition(st, [_normal("PromoteRequested", f"revision {ctx.candidate}: {message}")])


def _wait_for_promote(ctx: _Context, message: str) -> Transition:
    if ctx.state.state == PAUSED:
        return _hold(ctx)
    return _pause(ctx, api.PauseReason.waiting_for_promote, "waiting for promote", _normal("Paused", message))


def _fail(ctx: _Context, reason: str) -> Transition:
    """The candidate failed: roll back, or with autoRollback off pause and leave it to the user."""
    if ctx.auto_rollback:
        return _stop(ctx, ROLLED_BACK, reason)
    event = ("Warning", "RolloutFailed", f"revision {ctx.candidate} failed: {reason}; paused")
    return _pause(ctx, api.PauseReason.candidate_failed, f"Failed: {reason} (autoRollback is off)", event)


def _stop(ctx: _Context, phase: api.RolloutPhase, reason: str) -> Transition:
    """Traffic back on the stable revision: RolledBack (the candidate failed) or Aborted (by the user)."""
    st, cand = ctx.state, ctx.candidate
    new = api.RolloutState(
        state=phase,
        stable_revision=st.stable_revision,
        candidate_revision=cand,
        step=st.step,
        weight=0,
        started_at=st.started_at,
        step_started_at=ctx.stamp,
        reason=reason,
        # A revision still kept for its scale-down delay stays kept: the failure is not its business.
        scale_down_revision=st.scale_down_revision,
        scale_down_at=st.scale_down_at,
    )
    verb = "aborted" if phase == ABORTED else "rolled back"
    message = f"revision {cand} {verb}: {reason}; traffic back on revision {st.stable_revision}"
    return Transition(new, [("Warning", phase.value, message)], {cand: (phase.value, reason)})


def _creating(target: int, now: datetime, outcomes: dict[int, tuple[str, str | None]]) -> Transition:
    """No stable revision to protect: the target comes up at full size at once."""
    st = api.RolloutState(
        state=PROMOTING,
        candidate_revision=target,
        weight=100,
        started_at=now_iso(now),
        step_started_at=now_iso(now),
    )
    return Transition(st, [_normal("Creating", f"revision {target} created")], outcomes)


# --------------------------------------------------------------------------- the gates, in order


def _scale_down_due(ctx: _Context) -> Transition | None:
    """A superseded revision kept for its scale-down delay is scaled down once the delay ran out."""
    st = ctx.state
    if st.scale_down_revision is None:
        return None
    due = parse_time(st.scale_down_at)
    if due is not None and ctx.now < due:
        return None
    new = st.model_copy(update={"scale_down_revision": None, "scale_down_at": None})
    return Transition(new, [_normal("ScaledDown", f"revision {st.scale_down_revision} scaled down")])


def _new_target(ctx: _Context) -> Transition | None:
    """The spec asks for another revision: start a rollout (idle, rolled back or mid-rollout: the
    candidate is then superseded), or cancel one when the spec went back to the stable revision."""
    st, target = ctx.state, ctx.target
    stable, cand = st.stable_revision, st.candidate_revision
    if target == stable and stable is not None and cand is not None and st.state in _IN_FLIGHT:
        return _cancel(ctx, stable, cand)
    if target in (cand, stable):
        return None
    outcomes: dict[int, tuple[str, str | None]] = {target: ("Progressing", None)}
    if cand is not None and st.state in _IN_FLIGHT:
        outcomes[cand] = ("Superseded", f"replaced by revision {target} mid-rollout")
    if stable is None:
        return _creating(target, ctx.now, outcomes)
    return _start(ctx, stable, outcomes)


def _cancel(ctx: _Context, stable: int, cand: int) -> Transition:
    st = idle(stable).model_copy(update={"reason": f"spec returned to revision {stable}"})
    message = f"spec returned to revision {stable}; revision {cand} dropped"
    return Transition(st, [_normal("RolloutCancelled", message)], {cand: ("Superseded", "spec changed")})


def _start(ctx: _Context, stable: int, outcomes: dict[int, tuple[str, str | None]]) -> Transition:
    """The first step of the strategy; rolling and rollbackTo's fast track go straight to Promoting."""
    strategy, target = ctx.strategy, ctx.target
    if strategy == api.Strategy.rolling or ctx.commands.fast_track:
        phase, weight = PROMOTING, 100
    else:
        phase, weight = PROGRESSING, 0 if strategy == api.Strategy.blue_green else ctx.steps[0].weight
    st = api.RolloutState(
        state=phase,
        stable_revision=stable,
        candidate_revision=target,
        step=0,
        weight=weight,
        started_at=ctx.stamp,
        step_started_at=ctx.stamp,
        scale_down_revision=ctx.state.scale_down_revision,
        scale_down_at=ctx.state.scale_down_at,
    )
    message = f"{strategy.value} rollout of revision {target} started (stable: {stable})"
    return Transition(st, [_normal("RolloutStarted", message)], outcomes)


def _stopped(ctx: _Context) -> Transition | None:
    """Idle, RolledBack or Aborted: nothing to advance. A rollout stopped while the spec still asks
    for its candidate stays stopped (GitOps-safe); once the spec is back at stable, it is Idle."""
    st = ctx.state
    if (
        st.state in (ROLLED_BACK, ABORTED)
        and ctx.target == st.stable_revision
        and st.candidate_revision is not None
    ):
        message = f"spec is back at stable revision {st.stable_revision}"
        return Transition(idle(st.stable_revision), [_normal("Idle", message)])
    if st.state in _STOPPED:
        return _hold(ctx, ctx.scale_down_wait)
    assert st.candidate_revision is not None, "a rollout in flight has a candidate"
    return None


def _abort_command(ctx: _Context) -> Transition | None:
    """The user's abort wins over everything after it."""
    return _stop(ctx, ABORTED, "aborted by user") if ctx.commands.abort else None


def _failed_pause(ctx: _Context) -> Transition | None:
    """Failed with autoRollback off: hold until the user decides (promote or resume; abort came first)."""
    st = ctx.state
    if st.state != PAUSED or st.pause_reason != api.PauseReason.candidate_failed:
        return None
    if ctx.commands.promote:
        return _promoted_by_user(ctx, "promoted by user")
    if ctx.commands.resume:
        return _resume(ctx)
    return _hold(ctx)


def _candidate_failure(ctx: _Context) -> Transition | None:
    """The candidate's pods show a failure (CrashLoopBackOff, ...): fail, when a stable can take over."""
    failure = ctx.pods.failure
    if failure and ctx.state.stable_revision is not None:
        return _fail(ctx, failure)
    return None


def _promote_command(ctx: _Context) -> Transition | None:
    """The user's promote skips the remaining steps."""
    if ctx.commands.promote and ctx.state.state != PROMOTING:
        return _promoted_by_user(ctx, "remaining steps skipped")
    return None


def _pods_ready(ctx: _Context) -> Transition | None:
    """Every later gate needs the candidate's pods ready: wait for them, up to the progress deadline."""
    pods, deadline = ctx.pods, ctx.progress_deadline
    want = replicas_for(ctx.state, ctx.strategy, ctx.total).get(ctx.candidate, 0)
    if pods.ready >= want and pods.updated >= want:
        return None
    elapsed = ctx.elapsed
    if elapsed > deadline and ctx.state.stable_revision is not None:
        return _fail(
            ctx,
            f"ProgressDeadlineExceeded: {pods.ready}/{want} pods ready after "
            f"{int(elapsed)}s (progressDeadlineSeconds {int(deadline)})",
        )
    # Past the deadline without a stable revision (a first revision that never became ready) nothing is
    # left to time: pod and Deployment events wake the reconcile. Requeueing every second would spin.
    left = deadline - elapsed
    return _hold(ctx, max(1.0, left + 0.5) if left >= 0 else ctx.scale_down_wait)


def _promoting(ctx: _Context) -> Transition | None:
    """Promoting, and the candidate (pre-)scaled to full size is ready: it becomes stable. The old
    stable revision keeps its pods for the scale-down delay."""
    if ctx.state.state != PROMOTING:
        return None
    cand, stable, delay = ctx.candidate, ctx.state.stable_revision, ctx.scale_down_delay
    keep_old = stable is not None and delay > 0
    st = api.RolloutState(
        state=IDLE,
        stable_revision=cand,
        candidate_revision=None,
        weight=0,
        started_at=ctx.state.started_at,
        scale_down_revision=stable if keep_old else None,
        scale_down_at=now_iso(datetime.fromtimestamp(ctx.now.timestamp() + delay, UTC)) if keep_old else None,
    )
    outcomes: dict[int, tuple[str, str | None]] = {cand: ("Serving", None)}
    if stable is not None:
        outcomes[stable] = ("Superseded", f"replaced by revision {cand}")
    verb = "promoted" if stable is not None else "ready"
    event = _normal("Promoted", f"revision {cand} {verb}: serving all traffic")
    return Transition(st, [event], outcomes, requeue_after=delay + 0.5 if keep_old else None)


def _spec_pause(ctx: _Context) -> Transition | None:
    """spec.paused pauses the rollout where it is; clearing it resumes a rollout it paused."""
    st = ctx.state
    if ctx.commands.paused:
        if st.state == PAUSED:
            return _hold(ctx)
        event = _normal("Paused", f"rollout of revision {ctx.candidate} paused")
        return _pause(ctx, api.PauseReason.spec_paused, "spec.paused", event)
    if st.state == PAUSED and st.pause_reason == api.PauseReason.spec_paused:
        return _resume(ctx)
    return None


def _analysis(ctx: _Context) -> Transition | None:
    """The analysis verdict on the ready candidate: Fail fails it; Pending and Inconclusive hold it,
    up to the progress deadline."""
    verdict, why = ctx.analysis_verdict, ctx.analysis_reason
    if verdict == "Fail":
        return _fail(ctx, f"analysis failed: {why}")
    if verdict not in ("Pending", "Inconclusive"):
        return None
    if ctx.elapsed > ctx.progress_deadline:
        return _fail(ctx, f"analysis inconclusive past the deadline: {why}")
    return _hold(ctx, 1.0)


def _strategy_step(ctx: _Context) -> Transition:
    """The strategy's own step, which always decides: blue-green switches, canary walks its steps."""
    if ctx.strategy == api.Strategy.blue_green:
        return _blue_green_switch(ctx)
    return _canary_step(ctx)


def _blue_green_switch(ctx: _Context) -> Transition:
    """The preview is ready (and passed analysis): switch traffic, unless it waits for a promote."""
    cand = ctx.candidate
    if ctx.auto_promote or ctx.commands.resume:
        st = _moved(ctx, PROMOTING, weight=100, step_started_at=ctx.stamp, reason=None)
        return Transition(st, [_normal("Promoting", f"preview revision {cand} ready: switching traffic")])
    return _wait_for_promote(ctx, f"preview revision {cand} ready; waits for promote")


def _canary_step(ctx: _Context) -> Transition:
    """The step's pods are ready: note when, honour the step's pause, then take the next step."""
    st, steps = ctx.state, ctx.steps
    pause = steps[min(st.step, len(steps) - 1)].pause
    ready_at = parse_time(st.step_ready_at)
    if ready_at is None:
        message = f"revision {ctx.candidate} step {st.step + 1}/{len(steps)} at weight {st.weight}%"
        return Transition(st.model_copy(update={"step_ready_at": ctx.stamp}), [_normal("StepReady", message)])
    if pause is not None and pause.duration is None and not ctx.commands.resume:
        return _wait_for_promote(ctx, f"revision {ctx.candidate}: step {st.step + 1} waits for promote")
    if pause is not None and pause.duration is not None:
        left = api.parse_duration(pause.duration) - (ctx.now - ready_at).total_seconds()
        if left > 0:
            return _hold(ctx, left + 0.1)
    return _next_step(ctx)


def _next_step(ctx: _Context) -> Transition:
    """The next canary step, or Promoting after the last one (or at a step of weight 100)."""
    steps, nxt, cand = ctx.steps, ctx.state.step + 1, ctx.candidate
    moved = {"step_started_at": ctx.stamp, "step_ready_at": None, "reason": None}
    if nxt >= len(steps) or steps[nxt].weight >= 100:
        st = _moved(ctx, PROMOTING, step=min(nxt, len(steps) - 1), weight=100, **moved)
        return Transition(st, [_normal("Promoting", f"revision {cand}: final step, scaling to full size")])
    weight = steps[nxt].weight
    st = _moved(ctx, PROGRESSING, step=nxt, weight=weight, **moved)
    return Transition(
        st, [_normal("StepAdvanced", f"revision {cand}: step {nxt + 1}/{len(steps)}, weight {weight}%")]
    )


# --------------------------------------------------------------------------- the dispatcher

#: The gates of ``advance()``, in the order they are asked. The first that returns a transition decides.
GATES: Final[tuple[Callable[[_Context], Transition | None], ...]] = (
    _scale_down_due,  # a superseded revision's scale-down delay ran out: scale it down
    _new_target,  # the spec asks for another revision: start, restart or cancel a rollout
    _stopped,  # Idle, RolledBack, Aborted: hold (or Idle once the spec is back at stable)
    _abort_command,  # the user's abort: traffic back on stable
    _failed_pause,  # failed with autoRollback off: only promote or resume move on
    _candidate_failure,  # CrashLoopBackOff & co.: roll back (or pause)
    _promote_command,  # the user's promote: skip the remaining steps
    _pods_ready,  # wait for the candidate's pods, up to the progress deadline
    _promoting,  # full size and ready: the candidate becomes stable
    _spec_pause,  # spec.paused: pause here, or resume once it is cleared
    _analysis,  # Fail fails; Pending or Inconclusive hold until the deadline
    _strategy_step,  # blue-green switch, or the canary step's ready, pause and next step
)


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
    """One step of the rollout state machine. ``target`` is the revision the spec asks for.

    A first revision (no state, or no revision in it yet) is created at full size; any other
    state goes through ``GATES`` in order until one decides."""
    if state is None or (state.stable_revision is None and state.candidate_revision is None):
        return _creating(target, now, {target: ("Progressing", None)})
    ctx = _Context(
        state=state,
        target=target,
        strategy=strategy,
        steps=steps,
        obs=obs,
        total=total,
        now=now,
        progress_deadline=progress_deadline,
        auto_rollback=auto_rollback,
        commands=commands,
        analysis_verdict=analysis_verdict,
        analysis_reason=analysis_reason,
        scale_down_delay=scale_down_delay,
        auto_promote=auto_promote,
    )
    for gate in GATES:
        decided = gate(ctx)
        if decided is not None:
            return decided
    raise AssertionError("unreachable: the strategy step always decides")
