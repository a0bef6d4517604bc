"""The rollout state machine, driven end to end as a pure simulation.

``Sim`` plays the reconciler and the cluster: it calls ``advance()`` with a fake clock and
observations derived from ``replicas_for()`` of the persisted state (pods become ready as
asked, unless a revision is made to never become ready or to crash-loop). After every call
it checks the contract of the state machine: deterministic, at most one transition per call,
and no transition happens twice when the persisted result is advanced again with the same
inputs (what an operator restarted right after persisting would do).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from modeldeploy import api
from modeldeploy.modeldeployment import rollout
from modeldeploy.modeldeployment.rollout import (
    ABORTED,
    IDLE,
    PAUSED,
    PROGRESSING,
    PROMOTING,
    ROLLED_BACK,
    Commands,
    RevisionObservation,
    Transition,
)

T0 = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
SPEC_PAUSED = api.PauseReason.spec_paused
WAITING_FOR_PROMOTE = api.PauseReason.waiting_for_promote
CANDIDATE_FAILED = api.PauseReason.candidate_failed
CANARY, BLUE_GREEN, ROLLING = api.Strategy.canary, api.Strategy.blue_green, api.Strategy.rolling


def make_steps(*steps: tuple[int, str | None] | int) -> list[api.CanaryStep]:
    """``(20, "60s")`` pauses 60 s, ``(20, "")`` pauses until promote, ``20`` does not pause."""
    out = []
    for s in steps:
        if isinstance(s, int):
            out.append(api.CanaryStep(weight=s))
        else:
            weight, duration = s
            out.append(api.CanaryStep(weight=weight, pause=api.Pause(duration=duration or None)))
    return out


STEPS_20_50_100 = make_steps((20, "60s"), (50, "30s"), 100)
NO_COMMANDS = Commands()


class Sim:
    def __init__(
        self,
        *,
        strategy: api.Strategy = CANARY,
        steps: list[api.CanaryStep] | None = None,
        total: int = 4,
        deadline: float = 600.0,
        auto_rollback: bool = True,
        scale_down_delay: float = 30.0,
        auto_promote: bool = True,
    ) -> None:
        self.strategy = strategy
        self.steps = steps if steps is not None else STEPS_20_50_100
        self.total = total
        self.deadline = deadline
        self.auto_rollback = auto_rollback
        self.scale_down_delay = scale_down_delay
        self.auto_promote = auto_promote
        self.now = T0
        self.state: api.RolloutState | None = None
        self.never_ready: set[int] = set()
        self.failing: dict[int, str] = {}
        self.changes: list[tuple[float, Transition]] = []  # (seconds since T0, transition that changed state)
        self.calls = 0

    # -- the cluster
    def plan(self, state: api.RolloutState | None = None) -> dict[int, int]:
        state = state or self.state
        return {} if state is None else rollout.replicas_for(state, self.strategy, self.total)

    def observe(self) -> dict[int, RevisionObservation]:
        out = {}
        for rev, n in self.plan().items():
            if rev in self.failing:
                out[rev] = RevisionObservation(desired=n, ready=0, updated=n, failure=self.failing[rev])
            elif rev in self.never_ready:
                out[rev] = RevisionObservation(desired=n, ready=0, updated=n)
            else:
                out[rev] = RevisionObservation(desired=n, ready=n, updated=n)
        return out

    @property
    def elapsed(self) -> float:
        return (self.now - T0).total_seconds()

    # -- the reconciler
    def call(
        self, target: int, commands: Commands = NO_COMMANDS, verdict: str | None = None, reason: str = ""
    ) -> Transition:
        kwargs: dict[str, Any] = dict(
            target=target,
            strategy=self.strategy,
            steps=self.steps,
            obs=self.observe(),
            total=self.total,
            now=self.now,
            progress_deadline=self.deadline,
            auto_rollback=self.auto_rollback,
            commands=commands,
            analysis_verdict=verdict,
            analysis_reason=reason,
            scale_down_delay=self.scale_down_delay,
            auto_promote=self.auto_promote,
        )
        tr = rollout.advance(self.state, **kwargs)
        self.calls += 1
        again = rollout.advance(self.state, **kwargs)
        assert (again.state, again.events, again.outcomes) == (tr.state, tr.events, tr.outcomes), (
            "not deterministic"
        )
        assert len(tr.events) <= 1, f"more than one transition in one call: {tr.events}"
        assert (tr.state.pause_reason is not None) == (tr.state.state == PAUSED), (
            f"a pause reason exactly while Paused: {tr.state}"
        )
        if tr.state != self.state:
            assert tr.events, f"silent transition {self.state} -> {tr.state}"
            if self.state is not None and self.state.candidate_revision == tr.state.candidate_revision:
                assert tr.state.step - self.state.step in (0, 1), "skipped a step in one call"
            # Restart right after persisting: the same inputs on the persisted state either keep it
            # or take the next single step; they never repeat the transition just made.
            nxt = rollout.advance(tr.state, **kwargs)
            assert len(nxt.events) <= 1
            assert not set(nxt.events) & set(tr.events), f"transition repeated: {tr.events}"
            self.changes.append((self.elapsed, tr))
        else:  # a call that keeps the state posts nothing (the reconciler would post it on every reconcile)
            assert not tr.events, f"events without a transition (posted on every reconcile): {tr.events}"
        self.state = tr.state
        return tr

    def run(
        self,
        target: int,
        until: Callable[[api.RolloutState], bool],
        *,
        commands: Commands = NO_COMMANDS,
        verdict: str | None = None,
        reason: str = "",
        max_calls: int = 400,
        tick: float = 5.0,
    ) -> None:
        """Reconcile until ``until(state)``; time passes only while nothing changes (requeue or resync)."""
        for _ in range(max_calls):
            before = self.state
            tr = self.call(target, commands, verdict, reason)
            if until(tr.state):
                return
            if tr.state == before:
                self.now += timedelta(seconds=tr.requeue_after if tr.requeue_after is not None else tick)
        raise AssertionError(f"not reached after {max_calls} calls; state: {self.state}")

    def wait(
        self, target: int, seconds: float, *, commands: Commands = NO_COMMANDS, verdict: str | None = None
    ) -> None:
        """Reconcile repeatedly (every 5 s) for ``seconds`` of fake time."""
        end = self.now + timedelta(seconds=seconds)
        while self.now < end:
            self.call(target, commands, verdict)
            self.now += timedelta(seconds=5)

    # -- reading the trace
    def reasons(self) -> list[str]:
        return [tr.events[0][1] for _, tr in self.changes]

    def outcomes(self) -> dict[int, str]:
        out: dict[int, str] = {}
        for _, tr in self.changes:
            out.update({rev: o for rev, (o, _r) in tr.outcomes.items()})
        return out

    def at(self, reason: str) -> list[float]:
        return [t for t, tr in self.changes if tr.events[0][1] == reason]


def is_idle_at(rev: int, *, scaled_down: bool = True) -> Callable[[api.RolloutState], bool]:
    return lambda s: (
        s.state == IDLE and s.stable_revision == rev and (not scaled_down or s.scale_down_revision is None)
    )


def state_is(name: str) -> Callable[[api.RolloutState], bool]:
    return lambda s: s.state == name


def serving_v1(sim: Sim) -> Sim:
    sim.run(1, is_idle_at(1))
    sim.changes.clear()
    return sim


# --------------------------------------------------------------------------- first revision


def test_first_revision_goes_promoting_then_idle() -> None:
    sim = Sim(total=3)
    tr = sim.call(1)
    assert tr.state.state == PROMOTING
    assert (tr.state.candidate_revision, tr.state.stable_revision, tr.state.weight) == (1, None, 100)
    assert sim.plan() == {1: 3}  # no stable to protect: full size at once
    assert tr.outcomes == {1: ("Progressing", None)}
    tr = sim.call(1)
    assert tr.state.state == IDLE
    assert (tr.state.stable_revision, tr.state.candidate_revision) == (1, None)
    assert tr.state.scale_down_revision is None
    assert tr.outcomes == {1: ("Serving", None)}
    assert sim.plan() == {1: 3}
    assert sim.reasons() == ["Creating", "Promoted"]


def test_first_revision_waits_for_its_pods() -> None:
    sim = Sim()
    sim.never_ready.add(1)
    sim.call(1)
    sim.wait(1, 3000)  # far past the deadline: nothing to roll back to, so it keeps waiting
    assert sim.state is not None and sim.state.state == PROMOTING
    assert sim.reasons() == ["Creating"]


def test_first_revision_replaced_before_it_is_ready() -> None:
    sim = Sim()
    sim.never_ready.add(1)
    sim.call(1)
    tr = sim.call(2)
    assert (
        tr.state.state == PROMOTING and tr.state.candidate_revision == 2 and tr.state.stable_revision is None
    )
    assert tr.outcomes[1][0] == "Superseded"
    assert sim.plan() == {2: 4}


def test_idle_is_a_fixed_point() -> None:
    sim = serving_v1(Sim())
    state = sim.state
    sim.wait(1, 600)
    assert sim.state == state and not sim.changes


# --------------------------------------------------------------------------- canary


def test_canary_walks_the_steps_in_order_and_promotes() -> None:
    sim = serving_v1(Sim(total=4))
    seen: list[tuple[str, int, dict[int, int]]] = []
    orig_call = sim.call

    def recording_call(*a: Any, **k: Any) -> Transition:
        tr = orig_call(*a, **k)
        snap = (tr.state.state, tr.state.weight, sim.plan())
        if not seen or seen[-1] != snap:
            seen.append(snap)
        return tr

    sim.call = recording_call  # type: ignore[method-assign]
    sim.run(2, is_idle_at(2))
    assert seen[0] == (PROGRESSING, 20, {1: 4, 2: 1})
    assert seen[1] == (PROGRESSING, 50, {1: 4, 2: 4})
    assert seen[2] == (PROMOTING, 100, {1: 4, 2: 4})
    assert seen[3] == (IDLE, 0, {2: 4, 1: 4})  # old revision kept for the scale-down delay
    assert seen[-1] == (IDLE, 0, {2: 4})
    assert [w for s, w, _ in seen if s == PROGRESSING] == [20, 50]
    assert sim.reasons() == [
        "RolloutStarted",
        "StepReady",
        "StepAdvanced",
        "StepReady",
        "Promoting",
        "Promoted",
        "ScaledDown",
    ]
    assert sim.outcomes() == {2: "Serving", 1: "Superseded"}


def test_canary_stable_keeps_full_capacity_throughout() -> None:
    sim = serving_v1(Sim(total=5))
    states: list[api.RolloutState] = []
    sim.run(2, lambda s: states.append(s) or is_idle_at(2)(s))
    for s in states:
        plan = sim.plan(s)
        serving = s.stable_revision
        assert serving is not None and plan[serving] == 5, (s, plan)
        if s.state in (PROGRESSING, PROMOTING):
            assert plan[1] == 5


def test_canary_pauses_for_the_step_durations() -> None:
    sim = serving_v1(Sim())
    sim.run(2, state_is(PROMOTING))
    ready, advanced = sim.at("StepReady"), sim.at("StepAdvanced")
    (promoting,) = sim.at("Promoting")
    assert len(ready) == 2 and len(advanced) == 1
    # persisted times have 1 s resolution
    assert 59 <= advanced[0] - ready[0] <= 61  # 60s pause after the 20% step, no longer
    assert 29 <= promoting - ready[1] <= 31  # 30s pause after the 50% step


def test_pause_asks_to_be_called_back_when_it_ends() -> None:
    sim = serving_v1(Sim())
    sim.call(2)  # start
    sim.call(2)  # step ready
    tr = sim.call(2)
    assert tr.state == sim.state and tr.state.state == PROGRESSING
    assert tr.requeue_after == pytest.approx(60, abs=1)
    sim.now += timedelta(seconds=tr.requeue_after)
    assert sim.call(2).events[0][1] == "StepAdvanced"


def test_old_revision_scaled_down_only_after_the_delay() -> None:
    sim = serving_v1(Sim(scale_down_delay=120))
    sim.run(2, is_idle_at(2, scaled_down=False))
    (promoted_at,) = sim.at("Promoted")
    promoted = sim.changes[-1][1]
    assert sim.state is not None and sim.state.scale_down_revision == 1
    assert promoted.requeue_after == pytest.approx(120, abs=1)
    assert sim.plan() == {2: 4, 1: 4}
    sim.run(2, is_idle_at(2))
    (scaled_at,) = sim.at("ScaledDown")
    assert 120 <= scaled_at - promoted_at <= 125
    assert sim.plan() == {2: 4}


def test_no_scale_down_delay_drops_the_old_revision_at_promotion() -> None:
    sim = serving_v1(Sim(scale_down_delay=0))
    sim.run(2, is_idle_at(2))
    assert sim.state is not None and sim.state.scale_down_revision is None
    assert sim.plan() == {2: 4}
    assert "ScaledDown" not in sim.reasons()


def test_steps_without_pauses_still_wait_for_ready_pods() -> None:
    sim = serving_v1(Sim(steps=make_steps(10, 30, 100), total=10))
    sim.never_ready.add(2)
    sim.call(2)
    sim.wait(2, 100)
    assert sim.state is not None and sim.state.weight == 10 and sim.state.state == PROGRESSING
    sim.never_ready.clear()
    sim.run(2, is_idle_at(2))
    assert sim.reasons()[:4] == ["RolloutStarted", "StepReady", "StepAdvanced", "StepReady"]


# --------------------------------------------------------------------------- replica maths


@pytest.mark.parametrize(
    ("total", "weight", "expected"),
    [
        (4, 20, 1),
        (4, 50, 4),
        (1, 50, 1),
        (10, 10, 1),
        (9, 10, 1),
        (3, 75, 9),
        (4, 100, 4),
        (1, 100, 1),
        (0, 50, 0),
        (0, 100, 0),
    ],
)
def test_candidate_replicas(total: int, weight: int, expected: int) -> None:
    assert rollout.candidate_replicas(total, weight) == expected


@pytest.mark.parametrize("total", range(1, 13))
def test_candidate_replicas_bracket_the_weight(total: int) -> None:
    """At least one pod; the realised share is one of the two achievable shares around the weight."""
    for weight in range(1, 100):
        c = rollout.candidate_replicas(total, weight)
        assert c >= 1
        exact = total * weight / (100 - weight)
        assert c in {max(1, int(exact)), int(exact) + 1}, (total, weight, c)


def test_candidate_replicas_realise_the_closest_share() -> None:
    worse = []
    for total in range(1, 21):
        for weight in range(1, 100):
            c = rollout.candidate_replicas(total, weight)
            lo = max(1, int(total * weight / (100 - weight)))
            best = min((lo, lo + 1), key=lambda n: abs(100 * n / (total + n) - weight))
            if abs(100 * c / (total + c) - weight) > abs(100 * best / (total + best) - weight) + 1e-9:
                worse.append((total, weight, c, best))
    assert not worse, worse[:5]


def test_actual_weight() -> None:
    assert rollout.actual_weight(4, 1) == 20
    assert rollout.actual_weight(4, 4) == 50
    assert rollout.actual_weight(0, 3) == 100
    assert rollout.actual_weight(0, 0) == 0
    assert rollout.actual_weight(2, 1) == 33


def test_replicas_for_each_state() -> None:
    def st(state: str, **kw: Any) -> api.RolloutState:
        return api.RolloutState(state=state, **kw)

    assert rollout.replicas_for(st(IDLE, stable_revision=1), CANARY, 3) == {1: 3}
    assert rollout.replicas_for(
        st(PROGRESSING, stable_revision=1, candidate_revision=2, weight=20), CANARY, 4
    ) == {1: 4, 2: 1}
    assert rollout.replicas_for(
        st(PROGRESSING, stable_revision=1, candidate_revision=2, weight=0), BLUE_GREEN, 4
    ) == {1: 4, 2: 4}
    assert rollout.replicas_for(
        st(PROMOTING, stable_revision=1, candidate_revision=2, weight=100), CANARY, 4
    ) == {1: 4, 2: 4}
    for stopped in (ROLLED_BACK, ABORTED):
        assert rollout.replicas_for(st(stopped, stable_revision=1, candidate_revision=2), CANARY, 4) == {1: 4}
    assert rollout.replicas_for(st(IDLE, stable_revision=2, scale_down_revision=1), CANARY, 4) == {2: 4, 1: 4}
    assert rollout.replicas_for(st(PROMOTING, candidate_revision=1, weight=100), CANARY, 2) == {1: 2}


# --------------------------------------------------------------------------- failures


def test_never_ready_candidate_rolls_back_after_the_progress_deadline() -> None:
    sim = serving_v1(Sim(deadline=120))
    sim.never_ready.add(2)
    sim.run(2, state_is(ROLLED_BACK))
    (started,) = sim.at("RolloutStarted")
    (rolled,) = sim.at("RolledBack")
    assert 120 < rolled - started <= 125
    assert sim.state is not None
    assert sim.state.reason is not None and sim.state.reason.startswith("ProgressDeadlineExceeded")
    assert "0/1 pods ready" in sim.state.reason
    assert sim.state.weight == 0 and sim.state.stable_revision == 1
    assert sim.plan() == {1: 4}  # traffic back on stable, candidate scaled down
    assert sim.outcomes()[2] == "RolledBack"
    assert sim.changes[-1][1].events[0][0] == "Warning"


def test_not_ready_candidate_requeues_for_the_deadline() -> None:
    sim = serving_v1(Sim(deadline=300))
    sim.never_ready.add(2)
    sim.call(2)
    tr = sim.call(2)
    assert tr.state == sim.state
    assert tr.requeue_after is not None and 300 <= tr.requeue_after <= 301


def test_crashloop_rolls_back_at_once() -> None:
    sim = serving_v1(Sim())
    sim.failing[2] = "CrashLoopBackOff: container triton of pod x restarted 5 times"
    sim.call(2)
    tr = sim.call(2)
    assert tr.state.state == ROLLED_BACK
    assert tr.state.reason is not None and tr.state.reason.startswith("CrashLoopBackOff")
    assert tr.outcomes == {2: ("RolledBack", tr.state.reason)}
    assert sim.elapsed == 0


def test_analysis_fail_rolls_back_with_its_reason() -> None:
    sim = serving_v1(Sim())
    sim.run(2, state_is(ROLLED_BACK), verdict="Fail", reason="error rate 0.31 > 0.05")
    assert sim.state is not None and sim.state.reason == "analysis failed: error rate 0.31 > 0.05"
    assert sim.elapsed == 0
    assert sim.outcomes()[2] == "RolledBack"
    assert "error rate 0.31" in sim.changes[-1][1].events[0][2]


def test_analysis_fail_at_a_later_step() -> None:
    sim = serving_v1(Sim())
    sim.run(2, lambda s: s.weight == 50)
    sim.run(2, state_is(ROLLED_BACK), verdict="Fail", reason="p99 900ms > 500ms")
    assert sim.plan() == {1: 4}
    assert sim.state is not None and sim.state.step == 1


def test_inconclusive_holds_then_fails_after_the_deadline() -> None:
    sim = serving_v1(Sim(deadline=60))
    sim.call(2, verdict="Inconclusive", reason="12 requests < minRequests 20")
    sim.wait(2, 55, verdict="Inconclusive")
    assert sim.state is not None and sim.state.state == PROGRESSING and sim.state.weight == 20
    assert "StepReady" not in sim.reasons()
    sim.run(2, state_is(ROLLED_BACK), verdict="Inconclusive", reason="12 requests < minRequests 20")
    (started,) = sim.at("RolloutStarted")
    assert sim.at("RolledBack")[0] - started > 60
    assert sim.state.reason is not None and "inconclusive" in sim.state.reason
    assert "12 requests" in sim.state.reason


def test_pending_analysis_also_holds() -> None:
    sim = serving_v1(Sim())
    sim.call(2)
    tr = sim.call(2, verdict="Pending")
    assert tr.state == sim.state and tr.requeue_after is not None


def test_analysis_pass_lets_the_steps_proceed() -> None:
    sim = serving_v1(Sim())
    sim.run(2, is_idle_at(2), verdict="Pass")
    assert sim.outcomes()[2] == "Serving"


# --------------------------------------------------------------------------- manual control


def test_promote_skips_the_remaining_steps() -> None:
    sim = serving_v1(Sim(steps=make_steps((10, "1h"), (30, "1h"), (60, "1h"), 100)))
    sim.run(2, lambda s: s.step_ready_at is not None)
    tr = sim.call(2, Commands(promote=True))
    assert tr.state.state == PROMOTING and tr.state.weight == 100
    assert tr.events[0][1] == "PromoteRequested"
    assert sim.plan() == {1: 4, 2: 4}
    sim.run(2, is_idle_at(2))
    assert sim.elapsed < 120
    assert "StepAdvanced" not in sim.reasons()


def test_promote_while_pods_start_is_not_lost() -> None:
    sim = serving_v1(Sim())
    sim.never_ready.add(2)
    sim.call(2)
    tr = sim.call(2, Commands(promote=True))  # the nonce is delivered exactly once
    assert tr.state.state == PROMOTING


def test_abort() -> None:
    sim = serving_v1(Sim())
    sim.run(2, lambda s: s.weight == 50)
    tr = sim.call(2, Commands(abort=True))
    assert tr.state.state == ABORTED
    assert tr.state.reason == "aborted by user"
    assert tr.outcomes[2][0] == "Aborted"
    assert tr.events[0][1] == "Aborted"
    assert sim.plan() == {1: 4}
    sim.wait(2, 1200)  # stays aborted while the spec still asks for revision 2
    assert sim.state is not None and sim.state.state == ABORTED


def test_abort_while_pods_start() -> None:
    sim = serving_v1(Sim())
    sim.never_ready.add(2)
    sim.call(2)
    assert sim.call(2, Commands(abort=True)).state.state == ABORTED


def test_paused_stays_paused_then_resumes() -> None:
    sim = serving_v1(Sim(deadline=120))
    sim.run(2, lambda s: s.step_ready_at is not None)
    tr = sim.call(2, Commands(paused=True))
    assert tr.state.state == PAUSED and tr.state.reason == "spec.paused"
    assert tr.state.pause_reason == SPEC_PAUSED
    paused = sim.state
    sim.wait(2, 3600, commands=Commands(paused=True))  # far past pause duration and progress deadline
    assert sim.state == paused
    assert sim.plan() == {1: 4, 2: 1}  # pods stay where they were
    tr = sim.call(2)
    assert tr.state.state == PROGRESSING and tr.events[0][1] == "Resumed"
    assert tr.state.pause_reason is None and tr.state.reason is None
    sim.run(2, is_idle_at(2))


def test_indefinite_pause_waits_for_resume() -> None:
    sim = serving_v1(Sim(steps=make_steps((10, ""), 100)))
    sim.run(2, state_is(PAUSED))
    assert sim.state is not None and sim.state.reason == "waiting for promote"
    assert sim.state.pause_reason == WAITING_FOR_PROMOTE
    paused = sim.state
    sim.wait(2, 7200)
    assert sim.state == paused
    tr = sim.call(2, Commands(resume=True))
    assert tr.state.state == PROMOTING
    sim.run(2, is_idle_at(2))


def test_indefinite_pause_between_steps_resumes_to_the_next_step() -> None:
    sim = serving_v1(Sim(steps=make_steps((10, ""), (40, ""), 100)))
    sim.run(2, state_is(PAUSED))
    tr = sim.call(2, Commands(resume=True))
    assert (tr.state.state, tr.state.step, tr.state.weight) == (PROGRESSING, 1, 40)
    sim.run(2, state_is(PAUSED))
    assert sim.state is not None and sim.state.weight == 40
    sim.call(2, Commands(promote=True))
    sim.run(2, is_idle_at(2))


def test_rollback_to_fast_tracks() -> None:
    sim = serving_v1(Sim())
    tr = sim.call(2, Commands(fast_track=True))
    assert tr.state.state == PROMOTING and tr.state.weight == 100
    sim.run(2, is_idle_at(2))
    assert "StepReady" not in sim.reasons()


# --------------------------------------------------------------------------- blue-green, rolling


def test_blue_green_preview_then_switch() -> None:
    sim = serving_v1(Sim(strategy=BLUE_GREEN, total=3))
    tr = sim.call(2)
    assert (tr.state.state, tr.state.weight) == (PROGRESSING, 0)
    assert sim.plan() == {1: 3, 2: 3}  # candidate fully scaled behind the preview Service
    tr = sim.call(2)
    assert (tr.state.state, tr.state.weight) == (PROMOTING, 100)
    sim.run(2, is_idle_at(2, scaled_down=False))
    assert sim.plan() == {2: 3, 1: 3}  # old revision kept for the delay
    sim.run(2, is_idle_at(2))
    assert sim.plan() == {2: 3}
    assert sim.outcomes() == {2: "Serving", 1: "Superseded"}


def test_blue_green_waits_for_the_preview_pods() -> None:
    sim = serving_v1(Sim(strategy=BLUE_GREEN, deadline=100))
    sim.never_ready.add(2)
    sim.call(2)
    sim.wait(2, 90)
    assert sim.state is not None and sim.state.state == PROGRESSING
    sim.run(2, state_is(ROLLED_BACK))
    assert sim.plan() == {1: 4}


def test_blue_green_manual_promotion() -> None:
    sim = serving_v1(Sim(strategy=BLUE_GREEN, auto_promote=False))
    sim.run(2, state_is(PAUSED))
    assert sim.state is not None and sim.state.weight == 0
    assert sim.state.pause_reason == WAITING_FOR_PROMOTE and sim.state.reason == "waiting for promote"
    sim.wait(2, 3600)
    assert sim.state.state == PAUSED
    assert sim.call(2, Commands(promote=True)).state.state == PROMOTING
    sim.run(2, is_idle_at(2))


def test_blue_green_analysis_fail_flips_back() -> None:
    sim = serving_v1(Sim(strategy=BLUE_GREEN))
    sim.run(2, state_is(ROLLED_BACK), verdict="Fail", reason="errors")
    assert sim.plan() == {1: 4}


def test_rolling_goes_straight_to_promoting() -> None:
    sim = serving_v1(Sim(strategy=ROLLING))
    tr = sim.call(2)
    assert (tr.state.state, tr.state.weight) == (PROMOTING, 100)
    sim.run(2, is_idle_at(2))
    assert "StepReady" not in sim.reasons()


# --------------------------------------------------------------------------- autoRollback off


def test_auto_rollback_off_pauses_instead() -> None:
    sim = serving_v1(Sim(auto_rollback=False, deadline=60))
    sim.never_ready.add(2)
    sim.run(2, state_is(PAUSED))
    assert sim.state is not None and sim.state.reason is not None
    assert sim.state.reason.startswith("Failed: ProgressDeadlineExceeded")
    assert sim.state.pause_reason == CANDIDATE_FAILED
    assert sim.changes[-1][1].events[0][:2] == ("Warning", "RolloutFailed")
    assert sim.plan() == {1: 4, 2: 1}  # nothing reverted: the user decides
    for _ in range(20):
        sim.now += timedelta(seconds=30)
        assert sim.call(2).state.state == PAUSED
        assert sim.plan() == {1: 4, 2: 1}
    assert sim.call(2, Commands(abort=True)).state.state == ABORTED


def test_auto_rollback_off_crashloop_pauses() -> None:
    sim = serving_v1(Sim(auto_rollback=False))
    sim.failing[2] = "CrashLoopBackOff: boom"
    sim.call(2)
    tr = sim.call(2)
    assert tr.state.state == PAUSED and "CrashLoopBackOff" in (tr.state.reason or "")
    assert tr.state.pause_reason == CANDIDATE_FAILED
    assert not tr.outcomes
    assert sim.plan() == {1: 4, 2: 1}


@pytest.mark.parametrize("failure", ["crashloop", "never-ready"])
def test_auto_rollback_off_failure_is_reported_once(failure: str) -> None:
    sim = serving_v1(Sim(auto_rollback=False, deadline=60))
    if failure == "crashloop":
        sim.failing[2] = "CrashLoopBackOff: boom"
    else:
        sim.never_ready.add(2)
    sim.run(2, state_is(PAUSED))
    failed = sim.state
    later = []
    for _ in range(3):
        sim.now += timedelta(seconds=30)
        later.append(sim.call(2))
    assert [tr.events for tr in later] == [[], [], []]
    assert all(tr.state == failed for tr in later)


def test_auto_rollback_off_analysis_failure_stays_paused() -> None:
    sim = serving_v1(Sim(auto_rollback=False))
    sim.call(2)
    tr = sim.call(2, verdict="Fail", reason="error rate 0.5")
    assert tr.state.state == PAUSED and tr.state.pause_reason == CANDIDATE_FAILED
    assert tr.state.reason == "Failed: analysis failed: error rate 0.5 (autoRollback is off)"
    sim.wait(2, 600)  # analysis is not run for a Paused rollout: no verdict
    assert sim.state is not None and sim.state.state == PAUSED
    assert sim.state.weight == 20


# --------------------------------------------------------------------------- spec changes


def test_new_target_mid_rollout_supersedes_the_candidate() -> None:
    sim = serving_v1(Sim())
    sim.run(2, lambda s: s.weight == 50)
    tr = sim.call(3)
    assert (tr.state.state, tr.state.candidate_revision, tr.state.stable_revision) == (PROGRESSING, 3, 1)
    assert (tr.state.step, tr.state.weight) == (0, 20)
    assert tr.outcomes == {3: ("Progressing", None), 2: ("Superseded", "replaced by revision 3 mid-rollout")}
    assert sim.plan() == {1: 4, 3: 1}
    sim.run(3, is_idle_at(3))
    assert sim.outcomes()[3] == "Serving"


def test_new_target_while_paused_supersedes_the_candidate() -> None:
    sim = serving_v1(Sim())
    sim.run(2, lambda s: s.step_ready_at is not None)
    sim.call(2, Commands(paused=True))
    tr = sim.call(3, Commands(paused=True))
    assert tr.state.candidate_revision == 3 and tr.outcomes[2][0] == "Superseded"


def test_spec_back_to_stable_mid_rollout_cancels() -> None:
    sim = serving_v1(Sim())
    sim.run(2, lambda s: s.weight == 50)
    tr = sim.call(1)
    assert tr.state.state == IDLE and tr.state.stable_revision == 1 and tr.state.candidate_revision is None
    assert tr.outcomes == {2: ("Superseded", "spec changed")}
    assert sim.plan() == {1: 4}


def test_rolled_back_stays_until_the_spec_changes_then_idles_on_stable() -> None:
    sim = serving_v1(Sim())
    sim.failing[2] = "CrashLoopBackOff: boom"
    sim.run(2, state_is(ROLLED_BACK))
    rolled = sim.state
    sim.wait(2, 3600)  # the spec still asks for 2: GitOps-safe, nothing rewritten, nothing retried
    assert sim.state == rolled
    tr = sim.call(1)  # the user reverts the spec
    assert tr.state.state == IDLE and tr.state.stable_revision == 1 and tr.state.candidate_revision is None
    assert sim.plan() == {1: 4}


def test_rolled_back_then_a_fixed_revision_rolls_out() -> None:
    sim = serving_v1(Sim())
    sim.failing[2] = "CrashLoopBackOff: boom"
    sim.run(2, state_is(ROLLED_BACK))
    tr = sim.call(3)
    assert (tr.state.state, tr.state.candidate_revision, tr.state.stable_revision) == (PROGRESSING, 3, 1)
    assert tr.state.reason is None
    sim.run(3, is_idle_at(3))


def test_aborted_then_spec_back_to_stable_idles() -> None:
    sim = serving_v1(Sim())
    sim.call(2)
    sim.call(2, Commands(abort=True))
    assert sim.call(1).state.state == IDLE


# --------------------------------------------------------------------------- persisted state


def test_time_helpers_round_trip() -> None:
    assert rollout.now_iso(T0) == "2025-01-01T12:00:00Z"
    assert rollout.parse_time("2025-01-01T12:00:00Z") == T0
    assert rollout.parse_time(None) is None and rollout.parse_time("") is None


def test_state_survives_a_status_round_trip_mid_rollout() -> None:
    """The reconciler persists the state as JSON in status; resuming from it changes nothing."""
    sim = serving_v1(Sim())
    sim.run(2, lambda s: s.weight == 50 and s.step_ready_at is not None)
    assert sim.state is not None
    stored = sim.state.model_dump(by_alias=True, exclude_none=True, mode="json")
    assert api.RolloutState.model_validate(stored) == sim.state
    sim.state = api.RolloutState.model_validate(stored)
    sim.run(2, is_idle_at(2))


def test_a_paused_state_survives_a_status_round_trip_with_its_pause_reason() -> None:
    sim = serving_v1(Sim(steps=make_steps((10, ""), 100)))
    sim.run(2, state_is(PAUSED))
    assert sim.state is not None
    stored = sim.state.model_dump(by_alias=True, exclude_none=True, mode="json")
    assert stored["state"] == "Paused" and stored["pauseReason"] == "WaitingForPromote"
    assert api.RolloutState.model_validate(stored) == sim.state


# --------------------------------------------------------------------------- pause reasons


def test_auto_rollback_off_failures_resume_or_promote_and_leave_the_pause() -> None:
    sim = serving_v1(Sim(auto_rollback=False))
    sim.failing[2] = "CrashLoopBackOff: boom"
    sim.run(2, state_is(PAUSED))
    assert sim.state is not None and sim.state.pause_reason == CANDIDATE_FAILED
    failed = sim.state
    tr = sim.call(2, Commands(resume=True))
    assert (tr.state.state, tr.state.pause_reason, tr.events[0][1]) == (PROGRESSING, None, "Resumed")
    sim.state = failed
    tr = sim.call(2, Commands(promote=True))
    assert (tr.state.state, tr.state.pause_reason, tr.state.reason) == (PROMOTING, None, "promoted by user")
    assert tr.events == [("Normal", "PromoteRequested", "revision 2: promoted by user")]


def test_spec_paused_does_not_replace_a_pause_that_waits_for_promote() -> None:
    sim = serving_v1(Sim(steps=make_steps((10, ""), 100)))
    sim.run(2, state_is(PAUSED))
    waiting = sim.state
    assert sim.call(2, Commands(paused=True)).state == waiting
    assert sim.call(2).state == waiting  # spec.paused cleared: it did not pause, so nothing resumes


def test_a_failure_while_paused_by_spec_becomes_a_failed_pause() -> None:
    sim = serving_v1(Sim(auto_rollback=False))
    sim.run(2, lambda s: s.step_ready_at is not None)
    sim.call(2, Commands(paused=True))
    sim.failing[2] = "CrashLoopBackOff: boom"
    tr = sim.call(2, Commands(paused=True))
    assert (tr.state.state, tr.state.pause_reason) == (PAUSED, CANDIDATE_FAILED)
    assert sim.call(2).state == tr.state  # spec.paused cleared: still failed, the user decides


# --------------------------------------------------------------------------- statuses of the older operator

#: status.rollout as the operator before pauseReason wrote it, for each kind of pause.
OLD_PAUSES = {
    CANDIDATE_FAILED: "Failed: CrashLoopBackOff: boom (autoRollback is off)",
    SPEC_PAUSED: "spec.paused",
    WAITING_FOR_PROMOTE: "waiting for promote",
}


def old_paused(reason: str, **fields: Any) -> dict[str, Any]:
    return {
        "state": "Paused",
        "stableRevision": 1,
        "candidateRevision": 2,
        "step": 0,
        "weight": 10,
        "startedAt": "2025-01-01T11:58:00Z",
        "stepStartedAt": "2025-01-01T11:58:00Z",
        "stepReadyAt": "2025-01-01T11:59:00Z",
        "reason": reason,
        **fields,
    }


@pytest.mark.parametrize("expected", list(OLD_PAUSES))
def test_a_pause_written_by_the_older_operator_reads_as_its_pause_reason(expected: api.PauseReason) -> None:
    old = old_paused(OLD_PAUSES[expected])
    state = api.RolloutState.model_validate(old)
    assert state.pause_reason == expected and state.reason == old["reason"]
    status = api.ModelDeploymentStatus.model_validate({"rollout": old})
    assert status.rollout is not None and status.rollout.pause_reason == expected


def test_only_a_pause_without_a_pause_reason_is_migrated() -> None:
    written_now = old_paused("spec.paused", pauseReason="WaitingForPromote")
    assert api.RolloutState.model_validate(written_now).pause_reason == WAITING_FOR_PROMOTE
    by_field_name = api.RolloutState(state=PAUSED, reason="spec.paused", pause_reason=CANDIDATE_FAILED)
    assert by_field_name.pause_reason == CANDIDATE_FAILED
    assert api.RolloutState.model_validate(old_paused("hand-written")).pause_reason is None
    not_paused = {**old_paused("spec.paused"), "state": "Progressing"}
    assert api.RolloutState.model_validate(not_paused).pause_reason is None


def advance_old(
    old: dict[str, Any], commands: Commands = NO_COMMANDS, steps: list[api.CanaryStep] | None = None
) -> Transition:
    """One call on a status the older operator wrote, its candidate's pods ready (canary at 10 %)."""
    return rollout.advance(
        api.RolloutState.model_validate(old),
        target=2,
        strategy=CANARY,
        steps=steps or make_steps((10, ""), 100),
        obs={1: RevisionObservation(4, 4, 4), 2: RevisionObservation(1, 1, 1)},
        total=4,
        now=T0,
        progress_deadline=600.0,
        auto_rollback=False,
        commands=commands,
    )


def test_an_old_failed_pause_still_holds_until_the_user_decides() -> None:
    old = old_paused(OLD_PAUSES[CANDIDATE_FAILED])
    held = advance_old(old)
    assert held.state == api.RolloutState.model_validate(old) and not held.events
    resumed = advance_old(old, Commands(resume=True))
    assert (resumed.state.state, resumed.state.pause_reason, resumed.events[0][1]) == (
        PROGRESSING,
        None,
        "Resumed",
    )
    promoted = advance_old(old, Commands(promote=True))
    assert (promoted.state.state, promoted.events[0][1]) == (PROMOTING, "PromoteRequested")


def test_an_old_spec_pause_resumes_once_spec_paused_is_cleared() -> None:
    old = old_paused(OLD_PAUSES[SPEC_PAUSED])
    assert advance_old(old, Commands(paused=True)).events == []
    tr = advance_old(old)
    assert (tr.state.state, tr.state.pause_reason, tr.state.reason) == (PROGRESSING, None, None)
    assert tr.events == [("Normal", "Resumed", "rollout of revision 2 resumed")]


def test_an_old_wait_for_promote_continues_on_resume() -> None:
    old = old_paused(OLD_PAUSES[WAITING_FOR_PROMOTE])
    assert advance_old(old).events == []
    tr = advance_old(old, Commands(resume=True))
    assert (tr.state.state, tr.state.pause_reason, tr.state.weight) == (PROMOTING, None, 100)
