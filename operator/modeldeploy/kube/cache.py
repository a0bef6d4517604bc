"""The watch cache: every object the watches deliver, kept slim, indexed by owner.

Kept by hand rather than taken from a library: kopf has no shared informer cache, and what this one
does (drop other managers' managedFields and most of a Pod, index children by the ModelDeployment label,
ignore events older than our own write's response) is what makes a reconcile cost no API reads.
"""

from __future__ import annotations

import sys
from typing import Any

from .. import api

#: Pod fields the reconcile reads (readiness, crash loops, IPs for direct scraping): the rest of a Pod
#: (its spec, most of its metadata) is dropped before caching.
_POD_META = ("name", "namespace", "uid", "resourceVersion", "labels", "deletionTimestamp", "ownerReferences")
_POD_STATUS = ("phase", "conditions", "containerStatuses", "initContainerStatuses", "podIP")


#: What a reconcile reads of ``managedFields``: whether our apply owns a Deployment's replicas (to hand
#: them over to an HPA, :func:`owns_replicas`).
_OWNS_REPLICAS = {
    "manager": api.MANAGER,
    "operation": "Apply",
    "fieldsV1": {"f:spec": {"f:replicas": {}}},
}
_SHARED_MAX_CHARS = 40  # names, label values, image names, field values like "TCP"; not messages


def slim(obj: dict[str, Any]) -> dict[str, Any]:
    """What the cache keeps of an object (like controller-runtime's cache transforms), whether a watch
    event or the response to our own write brought it:

    - of ``managedFields`` (often a third of a body) only the one fact a reconcile reads there;
    - of a Pod only the fields the reconcile reads;
    - of what is kept, a copy whose dict keys and short strings are shared with every other cached
      object's (each decoded body brings its own copy of every key, "metadata", "f:containerPort", ...,
      and the cache keeps thousands of objects of the same few shapes).

    Measured with tracemalloc on 1000 Deployments and 3000 Services as the API server sends them:
    65 MiB as decoded, 40 MiB without managedFields, 21 MiB with shared strings too (about 0.1 ms per
    object). Never modifies ``obj``."""
    meta = obj.get("metadata") or {}
    if obj.get("kind") == "Pod":
        status = obj.get("status") or {}
        pod: dict[str, Any] = _shared(
            {
                "kind": "Pod",
                "metadata": {k: meta[k] for k in _POD_META if k in meta},
                "status": {k: status[k] for k in _POD_STATUS if k in status},
            }
        )
        return pod
    managed = meta.get("managedFields")
    if managed is not None:
        obj = {**obj, "metadata": {**meta, "managedFields": [_OWNS_REPLICAS] if owns_replicas(obj) else []}}
    shared: dict[str, Any] = _shared(obj)
    return shared


def owns_replicas(obj: dict[str, Any]) -> bool:
    """Whether our apply manager owns a Deployment's spec.replicas (so dropping it would reset it)."""
    for entry in obj["metadata"].get("managedFields") or []:
        if (
            entry.get("manager") == api.MANAGER
            and entry.get("operation") == "Apply"
            and "f:replicas" in ((entry.get("fieldsV1") or {}).get("f:spec") or {})
        ):
            return True
    return False


def _shared(value: Any) -> Any:
    """A copy of decoded JSON whose dict keys and short strings are the interned ones."""
    if isinstance(value, dict):
        return {sys.intern(k): _shared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shared(v) for v in value]
    if isinstance(value, str) and len(value) <= _SHARED_MAX_CHARS:
        return sys.intern(value)
    return value


class Cache:
    """Objects seen by the watches, indexed by (kind, namespace, owning ModelDeployment).
    Objects are kept :func:`slim`: everything a reconcile reads, nothing else."""

    def __init__(self) -> None:
        self._objs: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._by_owner: dict[tuple[str, str, str], set[str]] = {}
        #: A fact about the version held now (see :meth:`note`), forgotten with that version.
        self._notes: dict[tuple[str, str, str], str] = {}

    @staticmethod
    def _owner(obj: dict[str, Any]) -> str:
        """A ModelDeployment's children by its name label; a BatchInference's (its Job, ConfigMap and
        pods) as ``BatchInference/NAME``, from their batch label."""
        if obj.get("kind") == api.KIND:
            return str(obj["metadata"]["name"])
        labels = obj["metadata"].get("labels") or {}
        if api.LABEL_BATCH in labels:
            return f"BatchInference/{labels[api.LABEL_BATCH]}"
        return str(labels.get(api.LABEL_NAME, ""))

    def put(self, obj: dict[str, Any]) -> bool:
        """Keep ``obj``; False (and nothing changes) when the cache already holds this version of it or a
        newer one: the watch's echo of our own write, whose response was put first, or an older event
        arriving after that response."""
        meta = obj["metadata"]
        key = (obj["kind"], meta.get("namespace", ""), meta["name"])
        old = self._objs.get(key)
        if old is not None and (_rv(old) > _rv(obj) or _rv(old) == _rv(obj) > 0):
            return False
        if old is not None:
            self._by_owner.get((key[0], key[1], self._owner(old)), set()).discard(key[2])
            self._notes.pop(key, None)
        obj = slim(obj)
        self._objs[key] = obj
        self._by_owner.setdefault((key[0], key[1], self._owner(obj)), set()).add(key[2])
        return True

    def delete(self, kind: str, namespace: str, name: str) -> None:
        self._notes.pop((kind, namespace, name), None)
        old = self._objs.pop((kind, namespace, name), None)
        if old is not None:
            self._by_owner.get((kind, namespace, self._owner(old)), set()).discard(name)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self._objs.get((kind, namespace, name))

    def note(self, kind: str, namespace: str, name: str, fact: str) -> None:
        """Remember one fact about the version of the object held now (a reconcile's: "this version has
        every field of intent X", so the next one need not compare them again); it is forgotten as soon
        as another version is put, or the object deleted."""
        if (kind, namespace, name) in self._objs:
            self._notes[(kind, namespace, name)] = fact

    def noted(self, kind: str, namespace: str, name: str) -> str | None:
        return self._notes.get((kind, namespace, name))

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
