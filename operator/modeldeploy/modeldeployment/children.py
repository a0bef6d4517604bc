"""What a ModelDeployment becomes: its children, from the spec and the persisted rollout state.

:func:`desired_children` is the one answer, used by the reconcile (which applies it) and by
``modeldeploy render`` (which prints it), so the offline render cannot drift from what the operator
applies. The rest decides, per child, whether what is live already says what we want.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping
from typing import Any

from .. import api
from . import builders, revision, rollout

#: The kinds the operator creates, in the order they are applied (a Deployment's ConfigMap first).
APPLY_ORDER = (
    "ConfigMap",
    "Deployment",
    "Service",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
    "HTTPRoute",
    "GRPCRoute",
)
#: Kinds labelled as ours that the operator watches (their events wake the owner's reconcile).
WATCHED_KINDS = (
    "Deployment",
    "Pod",
    "Service",
    "ConfigMap",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
)
APPLIED_ANNOTATION = "modeldeploy.io/applied-hash"
#: Field manager that keeps a Deployment's replicas while their ownership passes from us to the HPA.
HANDOVER_MANAGER = "modeldeploy-hpa-handover"

_IN_ROLLOUT = (rollout.PROGRESSING, rollout.PROMOTING, rollout.PAUSED)


def _replica_plan(state: api.RolloutState, strategy: api.Strategy, total: int) -> dict[int, int]:
    """Revision number -> replicas. A Rolling update has one Deployment whose template moves."""
    if strategy != api.Strategy.rolling:
        return rollout.replicas_for(state, strategy, total)
    active = state.candidate_revision if state.state in _IN_ROLLOUT else state.stable_revision
    return {active: total} if active is not None else {}


def desired_children(
    owner: builders.Owner,
    spec: api.ModelDeploymentSpec,
    state: api.RolloutState,
    by_number: Mapping[int, api.RevisionRecord],
    total: int,
    *,
    stager_image: str = builders.DEFAULT_STAGER_IMAGE,
    route_kinds: Collection[str] | None = None,
) -> list[dict[str, Any]]:
    """Every child the ModelDeployment should have in ``state``, in apply order.

    ``route_kinds``: the Gateway API route kinds whose CRDs the cluster has (None: all of them)."""
    hpa_on = spec.autoscaling is not None
    out: list[dict[str, Any]] = []
    hpa_target = None
    for number, replicas in sorted(_replica_plan(state, spec.rollout.strategy, total).items()):
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
            stager_image=stager_image,
        )
        if is_stable:
            hpa_target = dep["metadata"]["name"]
        out.append(dep)
        cm = builders.build_config_map(owner, rev_spec, rec.hash)
        if cm is not None:
            out.append(cm)
    out.extend(_traffic(owner, spec, state, by_number, hpa_target, total))
    if spec.rollout.gateway is not None:
        # Exact weights on Gateway API routes, where their CRDs are installed (else: replica ratio).
        weight = state.weight if state.state in _IN_ROLLOUT else 0
        out.extend(
            route
            for route in builders.build_routes(owner, spec, weight=weight)
            if route_kinds is None or route["kind"] in route_kinds
        )
    out.sort(key=lambda o: APPLY_ORDER.index(o["kind"]))
    return out


def _traffic(
    owner: builders.Owner,
    spec: api.ModelDeploymentSpec,
    state: api.RolloutState,
    by_number: Mapping[int, api.RevisionRecord],
    hpa_target: str | None,
    total: int,
) -> list[dict[str, Any]]:
    """The Services, the HPA and the PDB."""
    out: list[dict[str, Any]] = []
    stable = by_number.get(state.stable_revision) if state.stable_revision else None
    cand = by_number.get(state.candidate_revision) if state.candidate_revision else None
    serving = stable or cand
    if serving is not None:
        # A first revision (no stable yet) is served alone: the Services select it exactly as they
        # will once it is promoted, so promotion rewrites none of them.
        splitting = cand is not None and stable is not None and state.state in _IN_ROLLOUT
        out.extend(
            builders.build_services(
                owner, spec, stable=serving.hash, candidate=cand.hash if splitting and cand else None
            )
        )
        if hpa_target is None and serving is cand:
            hpa_target = builders.deployment_name(owner, serving.hash, spec.rollout.strategy)
    if hpa_target is not None:
        rolling = state.state in _IN_ROLLOUT
        hpa = builders.build_hpa(owner, spec, target=hpa_target, min_replicas=total if rolling else None)
        if hpa is not None:
            out.append(hpa)
    pdb = builders.build_pdb(owner, spec)
    if pdb is not None:
        out.append(pdb)
    return out


# --------------------------------------------------------------------------- live vs desired

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
    a, b = api.parse_quantity(live), api.parse_quantity(desired)
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


def first_revision(
    owner: builders.Owner, spec: api.ModelDeploymentSpec, *, created: str = ""
) -> tuple[api.RolloutState, dict[int, api.RevisionRecord]]:
    """The state a new ModelDeployment settles in once its first revision serves (for ``render``)."""
    rec = api.RevisionRecord(
        revision=1,
        hash=revision.revision_hash(spec),
        model_version=spec.model.version,
        image=spec.server.image,
        created=created,
        outcome="Serving",
        spec=revision.pod_shaping(spec),
    )
    return rollout.idle(1), {1: rec}
