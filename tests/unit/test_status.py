"""Status by the conventions: conditions (lastTransitionTime moved only on change) and phase."""

from __future__ import annotations

from typing import Any

import pytest

from modeldeploy import api
from modeldeploy.modeldeployment import rollout, status

T1, T2, T3 = "2025-01-01T00:00:00Z", "2025-01-01T00:05:00Z", "2025-01-01T00:10:00Z"


def cond(conds: list[api.Condition], type_: str) -> api.Condition:
    (c,) = [c for c in conds if c.type == type_]
    return c


def test_set_condition_adds_a_new_condition() -> None:
    conds = status.set_condition([], status.READY, True, "AllReplicasReady", "2/2", now=T1, generation=3)
    assert conds == [
        api.Condition(
            type="Ready",
            status="True",
            reason="AllReplicasReady",
            message="2/2",
            last_transition_time=T1,
            observed_generation=3,
        )
    ]


def test_set_condition_keeps_last_transition_time_when_status_is_unchanged() -> None:
    conds = status.set_condition([], status.READY, True, "AllReplicasReady", "2/2", now=T1, generation=1)
    conds = status.set_condition(conds, status.READY, True, "StillReady", "3/3", now=T2, generation=2)
    c = cond(conds, "Ready")
    assert c.last_transition_time == T1
    # reason, message and generation still follow the latest reconcile
    assert (c.reason, c.message, c.observed_generation) == ("StillReady", "3/3", 2)


def test_set_condition_moves_last_transition_time_on_change() -> None:
    conds = status.set_condition([], status.READY, True, "AllReplicasReady", "", now=T1, generation=1)
    conds = status.set_condition(conds, status.READY, False, "ReplicasNotReady", "1/2", now=T2, generation=1)
    assert cond(conds, "Ready").status == "False"
    assert cond(conds, "Ready").last_transition_time == T2
    conds = status.set_condition(conds, status.READY, "Unknown", "Lost", "", now=T3, generation=1)
    assert cond(conds, "Ready").status == "Unknown"
    assert cond(conds, "Ready").last_transition_time == T3


def test_set_condition_leaves_other_conditions_alone_and_keeps_order() -> None:
    conds = status.set_condition([], status.READY, True, "R", "", now=T1, generation=1)
    conds = status.set_condition(conds, status.PROGRESSING, True, "P", "", now=T1, generation=1)
    before = cond(conds, "Ready")
    conds = status.set_condition(conds, status.PROGRESSING, False, "Done", "", now=T2, generation=1)
    assert [c.type for c in conds] == ["Ready", "Progressing"]
    assert cond(conds, "Ready") == before
    assert len(conds) == 2


def test_set_condition_does_not_mutate_its_input() -> None:
    original = status.set_condition([], status.READY, True, "R", "", now=T1, generation=1)
    snapshot = [c.model_copy() for c in original]
    status.set_condition(original, status.READY, False, "X", "", now=T2, generation=2)
    assert original == snapshot


def st(state: str, **kw: Any) -> api.RolloutState:
    return api.RolloutState(state=state, **kw)


def phase(
    state: api.RolloutState,
    *,
    ready: int = 2,
    desired: int = 2,
    first_failure: str | None = None,
    spec_error: str | None = None,
    was_ready: bool = True,
) -> tuple[str, str]:
    return status.phase_of(
        state,
        stable_ready=ready,
        stable_desired=desired,
        first_failure=first_failure,
        spec_error=spec_error,
        was_ready=was_ready,
    )


@pytest.mark.parametrize(
    ("state", "kwargs", "expected"),
    [
        (st(rollout.IDLE, stable_revision=1), {}, "Ready"),
        (st(rollout.IDLE, stable_revision=1), {"ready": 1}, "Degraded"),
        (st(rollout.IDLE, stable_revision=1), {"ready": 1, "was_ready": False}, "Pending"),
        (st(rollout.IDLE, stable_revision=1), {"ready": 3}, "Ready"),
        (st(rollout.PROMOTING, candidate_revision=1), {"ready": 0, "was_ready": False}, "Pending"),
        (
            st(rollout.PROMOTING, candidate_revision=1),
            {"ready": 0, "first_failure": "CrashLoopBackOff: x"},
            "Failed",
        ),
        (st(rollout.PROMOTING, candidate_revision=1), {"ready": 0, "spec_error": "bad"}, "Failed"),
        (st(rollout.PROGRESSING, stable_revision=1, candidate_revision=2, weight=20), {}, "Progressing"),
        (st(rollout.PROMOTING, stable_revision=1, candidate_revision=2, weight=100), {}, "Progressing"),
        *(
            (st(rollout.PAUSED, stable_revision=1, candidate_revision=2, pause_reason=why), {}, "Paused")
            for why in api.PauseReason
        ),
        (st(rollout.ROLLED_BACK, stable_revision=1, candidate_revision=2, reason="boom"), {}, "RolledBack"),
        (
            st(rollout.ABORTED, stable_revision=1, candidate_revision=2, reason="aborted by user"),
            {},
            "RolledBack",
        ),
    ],
)
def test_phase_of(state: api.RolloutState, kwargs: dict[str, Any], expected: str) -> None:
    assert phase(state, **kwargs)[0] == expected


def test_phase_messages_say_what_happens() -> None:
    assert phase(st(rollout.IDLE, stable_revision=4))[1] == "serving revision 4"
    msg = phase(
        st(rollout.ROLLED_BACK, stable_revision=1, candidate_revision=2, reason="analysis failed: x")
    )[1]
    assert "revision 2" in msg and "analysis failed: x" in msg and "serving revision 1" in msg
    msg = phase(st(rollout.PROGRESSING, stable_revision=1, candidate_revision=2, step=1, weight=50))[1]
    assert "revision 2" in msg and "step 2" in msg and "50%" in msg
    msg = phase(st(rollout.IDLE, stable_revision=3), ready=1, desired=3)[1]
    assert "1/3" in msg
    msg = phase(st(rollout.PROMOTING, candidate_revision=1), ready=0, first_failure="CrashLoopBackOff: y")[1]
    assert "CrashLoopBackOff: y" in msg


def test_phases_are_the_documented_ones() -> None:
    documented = {"Pending", "Progressing", "Ready", "Paused", "Degraded", "RolledBack", "Failed"}
    states = [
        st(s, stable_revision=1, candidate_revision=2)
        for s in (
            rollout.IDLE,
            rollout.PROGRESSING,
            rollout.PAUSED,
            rollout.PROMOTING,
            rollout.ROLLED_BACK,
            rollout.ABORTED,
        )
    ]
    for s in states:
        for ready in (0, 2):
            for was_ready in (True, False):
                assert phase(s, ready=ready, was_ready=was_ready)[0] in documented


def _apply_merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386, as the API server applies a status merge patch."""
    out = dict(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _apply_merge_patch(out[key], value)
        else:
            out[key] = value
    return out


def test_status_patch_never_mixes_two_observations() -> None:
    # The server already holds "Pending, 1/2" (a write the cache has not seen yet: behind it by one write),
    # the cache still an older "Pending, 2/2"; this reconcile observed 2/2 and promoted: "Ready, 2/2".
    # A plain diff against the cache leaves ready out, and the server would say "Ready" beside "1/2".
    server = {"phase": "Pending", "ready": "1/2", "readyReplicas": 1, "replicas": 2, "message": "waiting"}
    cache = {"phase": "Pending", "ready": "2/2", "readyReplicas": 2, "replicas": 2, "message": "waiting"}
    new = {
        "phase": "Ready",
        "ready": "2/2",
        "readyReplicas": 2,
        "replicas": 2,
        "message": "serving revision 1",
    }
    written = _apply_merge_patch(server, status.status_patch(cache, new))
    assert (written["phase"], written["ready"], written["readyReplicas"]) == ("Ready", "2/2", 2), written


def test_status_patch_sends_nothing_when_nothing_changed() -> None:
    st = {"phase": "Ready", "ready": "2/2", "readyReplicas": 2, "replicas": 2, "history": [{"revision": 1}]}
    assert status.status_patch(st, dict(st)) == {}
    assert status.status_patch(st, {**st, "history": []}) == {"history": []}
