"""Status by the Kubernetes conventions: phase, conditions (lastTransitionTime moved only
on change), replica counts. Pure functions."""

from __future__ import annotations

from typing import Any

from .. import api
from . import rollout

READY, PROGRESSING, DEGRADED, ROLLED_BACK = "Ready", "Progressing", "Degraded", "RolledBack"


def set_condition(
    conditions: list[api.Condition],
    type_: str,
    status: bool | str,
    reason: str,
    message: str,
    *,
    now: str,
    generation: int | None,
) -> list[api.Condition]:
    """Return ``conditions`` with ``type_`` set; lastTransitionTime changes only when status does."""
    value = status if isinstance(status, str) else ("True" if status else "False")
    old = next((c for c in conditions if c.type == type_), None)
    new = api.Condition(
        type=type_,
        status=value,
        reason=reason,
        message=message,
        last_transition_time=old.last_transition_time if old is not None and old.status == value else now,
        observed_generation=generation,
    )
    if old is None:
        return [*conditions, new]
    return [new if c.type == type_ else c for c in conditions]


def phase_of(
    state: api.RolloutState,
    *,
    stable_ready: int,
    stable_desired: int,
    first_failure: str | None,
    spec_error: str | None,
    was_ready: bool,
) -> tuple[str, str]:
    """(phase, message) from the rollout state and what the stable revision shows."""
    if state.state in (rollout.ROLLED_BACK, rollout.ABORTED):
        return (
            "RolledBack",
            f"revision {state.candidate_revision} {state.state.lower()}: {state.reason}; "
            f"serving revision {state.stable_revision}",
        )
    if state.stable_revision is None:
        if first_failure:
            return "Failed", f"revision {state.candidate_revision} cannot become ready: {first_failure}"
        if spec_error:
            return "Failed", spec_error
        return "Pending", f"waiting for revision {state.candidate_revision} to become ready"
    if state.state == rollout.PAUSED:
        return "Paused", f"rollout of revision {state.candidate_revision} paused: {state.reason}"
    if state.state in (rollout.PROGRESSING, rollout.PROMOTING):
        return (
            "Progressing",
            f"rolling out revision {state.candidate_revision} "
            f"(step {state.step + 1}, weight {state.weight}%)",
        )
    if stable_ready < stable_desired:
        if was_ready:
            return (
                "Degraded",
                f"{stable_ready}/{stable_desired} pods of revision {state.stable_revision} ready",
            )
        return "Pending", f"waiting for pods: {stable_ready}/{stable_desired} ready"
    return "Ready", f"serving revision {state.stable_revision}"


#: Status fields derived from one observation of the pods: they always travel together.
SUMMARY_FIELDS = ("phase", "message", "ready", "readyReplicas", "replicas", "conditions")


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
