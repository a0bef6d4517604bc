"""kopf entry points: thin. They translate kopf's callbacks into the reconciler's terms.

Design: kopf does the watching, login, health probe, peering and Event posting. Each
watch event (of a ModelDeployment or of a child we label) lands in a watch cache and
enqueues the owning ModelDeployment into a coalescing work queue; a periodic resync
enqueues every ModelDeployment. The reconcile itself is level-triggered and lives in
:mod:`modeldeploy.modeldeployment.reconcile`. We use ``on.event`` handlers only, so kopf keeps no
per-object state of its own (no finalizers, no diff-base annotations): deleting a
ModelDeployment never waits for the operator, and garbage collection removes the
children through their ownerReferences.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

import kopf

from . import api, metrics
from .batch import api as bapi
from .batch import builders as batch_builders
from .batch.controller import BatchReconciler
from .kube import kopfpatch
from .kube.cache import Cache
from .kube.client import EventSink, Kube
from .kube.leader import LeaderElector
from .kube.workqueue import GONE, WorkQueue
from .modeldeployment import builders
from .modeldeployment.analysis_runner import AnalysisRunner
from .modeldeployment.reconcile import Reconciler
from .triton.analysis import TritonAnalysis

log = logging.getLogger("modeldeploy")

MANAGED = {"app.kubernetes.io/managed-by": api.MANAGER}
CHILD_RESOURCES = [
    ("apps", "v1", "deployments"),
    ("", "v1", "pods"),
    ("", "v1", "services"),
    ("", "v1", "configmaps"),
    ("autoscaling", "v2", "horizontalpodautoscalers"),
    ("policy", "v1", "poddisruptionbudgets"),
    ("batch", "v1", "jobs"),
]


class Operator:
    """Process-wide state: created at startup, torn down at cleanup."""

    def __init__(self) -> None:
        self.cache = Cache()
        self.kube: Kube | None = None
        self.events: EventSink | None = None
        self.reconciler: Reconciler | None = None
        self.queue: WorkQueue | None = None
        self.resync_task: asyncio.Task[None] | None = None
        self.resync_seconds = float(os.environ.get("MODELDEPLOY_RESYNC_SECONDS", "60"))
        self.leader = True  # without leader election this process always acts
        self.election_task: asyncio.Task[None] | None = None
        self.analysis: AnalysisRunner | None = None
        self.batch: BatchReconciler | None = None
        self.batch_queue: WorkQueue | None = None


OP = Operator()

# Before kopf starts observing namespaces (this module is loaded by ``kopf run -m``).
kopfpatch.serve_namespaces_of_initial_listing()


class _NoDiffBase(kopf.AnnotationsDiffBaseStorage):
    """kopf builds a deep-copied "essence" of every object on every event for change detection. We
    register ``on.event`` handlers only, which never look at it: skip the copy (a sixth of the
    operator's CPU during a burst of creations, measured with py-spy)."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> Any:
        return None

    def fetch(self, *, body: kopf.Body) -> Any:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: Any) -> None:
        return None


async def _login(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo:
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)
    if info is None:
        raise kopf.LoginError("no credentials: neither in-cluster service account nor kubeconfig found")
    return info


@kopf.on.login()
async def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo:
    return await _login(settings)


async def _post_event(body: dict[str, Any], type_: str, reason: str, message: str) -> None:
    """Queued, not awaited: posting Events is best-effort (the status carries the same facts), and a
    reconcile need not wait for it."""
    metrics.observe_event(body, reason)
    assert OP.events is not None
    OP.events.post(body, type_, reason, message)


def _pod_ips(namespace: str, revision_hash: str) -> list[str]:
    """Ready pods of one revision, from the watch cache (for direct metric scraping)."""
    ips = []
    for ns, name in OP.cache.keys("Pod"):
        pod = OP.cache.get("Pod", ns, name)
        if ns != namespace or pod is None:
            continue
        labels = pod["metadata"].get("labels") or {}
        status = pod.get("status") or {}
        conditions = status.get("conditions") or []
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
        if labels.get(builders.LABEL_REVISION) == revision_hash and ready and status.get("podIP"):
            ips.append(status["podIP"])
    return ips


async def _patch_status(namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
    """The analysis windows' status write; the object written goes into the cache at once, as the
    reconcile's own writes do, so that no reconcile reads a verdict older than the one written."""
    assert OP.kube is not None
    written = await OP.kube.patch_status(api.KIND, namespace, name, patch)
    if written.get("metadata"):
        written.setdefault("kind", api.KIND)
        OP.cache.put(written)
    return written


def _enqueue(namespace: str, name: str) -> None:
    if OP.queue is not None:
        OP.queue.add((namespace, name))


async def _reconcile(namespace: str, name: str) -> object:
    assert OP.reconciler is not None and OP.queue is not None
    if not OP.leader:
        return None  # a standby keeps its cache warm and acts only once it holds the lease
    with metrics.RECONCILE_SECONDS.time():
        try:
            outcome = await OP.reconciler.reconcile(namespace, name)
        except Exception:
            metrics.RECONCILE_ERRORS.inc()
            raise
    metrics.RECONCILES.inc()
    md = OP.cache.get(api.KIND, namespace, name)
    if md is None:
        return GONE
    metrics.observe_status(md)
    if outcome.requeue_after is not None:
        OP.queue.add((namespace, name), delay=outcome.requeue_after)
    return None


async def _reconcile_batch(namespace: str, name: str) -> object:
    assert OP.batch is not None and OP.batch_queue is not None
    if not OP.leader:
        return None
    try:
        again = await OP.batch.reconcile(namespace, name)
    except Exception:
        metrics.RECONCILE_ERRORS.inc()
        raise
    bi = OP.cache.get(bapi.KIND, namespace, name)
    if bi is None:
        return GONE
    metrics.observe_batch(bi)
    if again is not None:
        OP.batch_queue.add((namespace, name), delay=again)
    return None


async def _resync() -> None:
    while True:
        await asyncio.sleep(OP.resync_seconds)
        assert OP.queue is not None and OP.batch_queue is not None
        for key in OP.cache.keys(api.KIND):
            OP.queue.add(key)
        for key in OP.cache.keys(bapi.KIND):
            OP.batch_queue.add(key)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Our own prefixes; kopf keeps no business state (we only use on.event handlers).
    settings.persistence.finalizer = f"{api.GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=f"kopf.{api.GROUP}")
    settings.persistence.diffbase_storage = _NoDiffBase(prefix=f"kopf.{api.GROUP}")
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # Without --verbose/--debug: no "Handler 'watch-pods' succeeded." line per watch event (a
        # line per pod status change in a busy cluster). Warnings and errors still show.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    # Explicit timeouts: watch stalls behind load balancers are a known kopf pitfall (#204, #698).
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = 30
    settings.posting.level = logging.INFO
    settings.batching.worker_limit = None
    # kopf runs a worker per watched object, which holds that object's last event until it has been
    # idle this long (default 5 s): in a burst, thousands of full bodies at once. 400 ModelDeployments
    # at once: operator peak RSS 111 -> 99 MiB, CPU and time unchanged within noise.
    settings.queueing.idle_timeout = 0.5
    select_children_on_the_server(settings)
    if os.environ.get("MODELDEPLOY_DISABLE_CLUSTER_SCANNING", "").lower() in ("1", "true", "yes"):
        settings.scanning.disabled = True  # namespaced RBAC: no namespace listing, no CRD watch
    OP.kube = Kube(await _login(settings), relogin=lambda: _login(settings))
    OP.events = EventSink(OP.kube.post_event)
    OP.analysis = analysis = AnalysisRunner(
        TritonAnalysis(
            pods_for=_pod_ips,
            default_prometheus_url=os.environ.get("MODELDEPLOY_PROMETHEUS_URL") or None,
            clock=time.time,  # window starts are persisted: unix time
        ),
        patch_status=_patch_status,
        enqueue=_enqueue,
    )
    OP.reconciler = Reconciler(
        OP.kube,
        OP.cache,
        post_event=_post_event,
        analysis=analysis,
        stager_image=os.environ.get("MODELDEPLOY_STAGER_IMAGE", builders.DEFAULT_STAGER_IMAGE),
    )
    OP.queue = WorkQueue(
        _reconcile,
        workers=int(os.environ.get("MODELDEPLOY_WORKERS", "32")),
        new_at_once=int(os.environ.get("MODELDEPLOY_NEW_AT_ONCE", "4")),
    )
    OP.queue.start()
    stager_image = os.environ.get("MODELDEPLOY_STAGER_IMAGE", builders.DEFAULT_STAGER_IMAGE)
    OP.batch = BatchReconciler(
        OP.kube,
        OP.cache,
        post_event=_post_event,
        stager_image=stager_image,
        worker_image=os.environ.get("MODELDEPLOY_WORKER_IMAGE") or stager_image,
    )
    OP.batch_queue = WorkQueue(
        _reconcile_batch, workers=int(os.environ.get("MODELDEPLOY_BATCH_WORKERS", "4"))
    )
    OP.batch_queue.start()
    if os.environ.get("MODELDEPLOY_LEADER_ELECTION", "").lower() in ("1", "true", "yes"):
        OP.leader = False
        metrics.LEADER.set(0)
        elector = LeaderElector(
            OP.kube,
            namespace=os.environ.get("MODELDEPLOY_LEASE_NAMESPACE")
            or os.environ.get("POD_NAMESPACE")
            or "default",
            name=os.environ.get("MODELDEPLOY_LEASE_NAME", "modeldeploy-operator"),
            identity=f"{socket.gethostname()}-{os.getpid()}",
            lease_seconds=float(os.environ.get("MODELDEPLOY_LEASE_SECONDS", "15")),
            on_started=_became_leader,
            on_lost=_lost_leadership,
        )
        OP.election_task = asyncio.create_task(elector.run())
    OP.resync_task = asyncio.create_task(_resync())
    metrics.start_server()


def select_children_on_the_server(settings: kopf.OperatorSettings) -> None:
    """The child watches ask the API server for our objects only. A handler's ``labels=`` filter is
    applied by kopf after each event arrived: every Pod, Service and ConfigMap of a served namespace,
    other teams' included, would be sent, decoded and dropped."""
    selector = ",".join(f"{k}={v}" for k, v in MANAGED.items())
    for group, version, plural in CHILD_RESOURCES:
        settings.watching.label_selectors[_where(group, version, plural)] = selector


def _where(group: str, version: str, plural: str) -> tuple[str, str] | tuple[str, str, str]:
    """A child resource as kopf's handler and selector keys name it."""
    return (group, version, plural) if group else (version, plural)


def _became_leader() -> None:
    OP.leader = True
    metrics.LEADER.set(1)
    assert OP.queue is not None and OP.batch_queue is not None
    for key in OP.cache.keys(api.KIND):
        OP.queue.add(key)
    for key in OP.cache.keys(bapi.KIND):
        OP.batch_queue.add(key)


def _lost_leadership() -> None:
    OP.leader = False
    if OP.analysis is not None:
        OP.analysis.stop_all()  # the next leader writes the windows (and resumes them from status)
    metrics.LEADER.set(0)


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    if OP.resync_task is not None:
        OP.resync_task.cancel()
    if OP.election_task is not None:
        OP.election_task.cancel()
    if OP.analysis is not None:
        OP.analysis.stop_all()
    if OP.queue is not None:
        await OP.queue.stop()
    if OP.batch_queue is not None:
        await OP.batch_queue.stop()
    if OP.events is not None:
        await OP.events.close()
    if OP.kube is not None:
        await OP.kube.close()


def for_cache(body: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """A watched object as the watch cache gets it: a plain dict with ``kind`` (kopf's bodies carry
    none); :meth:`.Cache.put` keeps only what a reconcile reads (:func:`.cache.slim`)."""
    obj = dict(body)
    obj.setdefault("kind", kind)
    return obj


@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL)
async def modeldeployment_event(
    event: kopf.RawEvent, body: kopf.Body, namespace: str | None, name: str, **_: Any
) -> None:
    assert namespace is not None  # ModelDeployments are namespaced
    if event.get("type") == "DELETED":
        OP.cache.delete(api.KIND, namespace, name)
        metrics.forget(namespace, name)
        if OP.queue is not None:
            OP.queue.forget((namespace, name))
        if OP.analysis is not None:
            OP.analysis.stop(namespace, name)
        return
    OP.cache.put(for_cache(body, api.KIND))
    if OP.queue is not None:
        OP.queue.add((namespace, name))


@kopf.on.event(api.GROUP, api.VERSION, bapi.PLURAL)
async def batchinference_event(
    event: kopf.RawEvent, body: kopf.Body, namespace: str | None, name: str, **_: Any
) -> None:
    assert namespace is not None
    if event.get("type") == "DELETED":
        OP.cache.delete(bapi.KIND, namespace, name)
        metrics.forget_batch(namespace, name)
        if OP.batch_queue is not None:
            OP.batch_queue.forget((namespace, name))
        return
    OP.cache.put(for_cache(body, bapi.KIND))
    if OP.batch_queue is not None:
        OP.batch_queue.add((namespace, name))


def _register_child(group: str, version: str, plural: str) -> None:
    kind = {
        "deployments": "Deployment",
        "pods": "Pod",
        "services": "Service",
        "configmaps": "ConfigMap",
        "horizontalpodautoscalers": "HorizontalPodAutoscaler",
        "poddisruptionbudgets": "PodDisruptionBudget",
        "jobs": "Job",
    }[plural]

    async def child_event(
        event: kopf.RawEvent, body: kopf.Body, namespace: str | None, name: str, **_: Any
    ) -> None:
        assert namespace is not None
        if event.get("type") == "DELETED":
            OP.cache.delete(kind, namespace, name)
        elif not OP.cache.put(for_cache(body, kind)):
            # The echo of our own write (its response is in the cache already), or a relist's copy of a
            # version we hold: nothing the last reconcile did not see. In a burst of 1000, 4 of the about
            # 15 child events per ModelDeployment (its Deployment and 3 Services, applied by us).
            return
        labels = body.get("metadata", {}).get("labels") or {}
        owner = labels.get(api.LABEL_NAME)
        if owner and OP.queue is not None:
            OP.queue.add((namespace, owner))
        batch = labels.get(batch_builders.LABEL_BATCH)
        if batch and OP.batch_queue is not None:
            OP.batch_queue.add((namespace, batch))

    kopf.on.event(*_where(group, version, plural), labels=MANAGED, id=f"watch-{plural}")(child_event)


for _group, _version, _plural in CHILD_RESOURCES:
    _register_child(_group, _version, _plural)
