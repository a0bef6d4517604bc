"""Revisions: the hash of everything that shapes the pods, and the history kept in status."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .. import api

HASH_LENGTH = 10


def pod_shaping(spec: api.ModelDeploymentSpec) -> dict[str, Any]:
    """The part of the spec that ends up in the pod template (model + server)."""
    server = spec.server.model_dump(by_alias=True, exclude_none=True, mode="json")
    if server.get("drainSeconds") == api.DEFAULT_DRAIN_SECONDS:  # a field added with a default later:
        del server["drainSeconds"]  # unset and explicit hash alike, as before the field existed
    return {"model": spec.model.model_dump(by_alias=True, exclude_none=True, mode="json"), "server": server}


def revision_hash(spec: api.ModelDeploymentSpec) -> str:
    """Stable short hash of the pod-shaping spec. Defaults are applied before hashing,
    so writing a default value explicitly does not start a rollout."""
    canonical = json.dumps(pod_shaping(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:HASH_LENGTH]


def with_pod_shaping(spec: api.ModelDeploymentSpec, shaping: dict[str, Any]) -> api.ModelDeploymentSpec:
    """``spec`` with its model/server replaced by a remembered revision's (for rollbackTo)."""
    data = spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    data.update(shaping)
    return api.ModelDeploymentSpec.model_validate(data)


def find(
    history: list[api.RevisionRecord], *, number: int | None = None, hash: str | None = None
) -> api.RevisionRecord | None:
    for rec in history:
        if (number is not None and rec.revision == number) or (hash is not None and rec.hash == hash):
            return rec
    return None


def next_number(history: list[api.RevisionRecord]) -> int:
    return max((r.revision for r in history), default=0) + 1


def prune(history: list[api.RevisionRecord], limit: int, keep: set[int]) -> list[api.RevisionRecord]:
    """Keep at most ``limit`` records (oldest dropped first), never dropping those in ``keep``."""
    out = list(history)
    while len(out) > limit:
        victim = next((r for r in out if r.revision not in keep), None)
        if victim is None:
            break
        out.remove(victim)
    return out
