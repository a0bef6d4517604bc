"""The BatchInference reconcile: observe, decide, act, as the ModelDeployment's.

1. **observe**: the BatchInference, its Job and worker pods from the watch cache; for a
   ``modelDeploymentRef``, that ModelDeployment from the cache (its stable revision's spec is in its
   ``status.history``); the existence of the credentials Secrets the spec names.
2. **decide** (:func:`.status.derive`, pure): the status, and whether the Job is to be created.
3. **act**: the Job (and the rendered model config it mounts) is created once, the status written,
   Events posted on phase changes.

The Job is created once and never changed (a Job's pod template is immutable, and so is a
BatchInference's spec): the model revision scoring is pinned when the job begins, whatever the
ModelDeployment rolls out meanwhile. Everything it creates carries an ownerReference to it, so
deleting it stops the pods and removes the Job and ConfigMap; the outputs written stay.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import KW_ONLY, dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pydantic

from .. import api
from ..kube.cache import Cache
from ..kube.client import ApiError, Kube
from ..modeldeployment import builders as md_builders
from ..modeldeployment import revision
from . import api as bapi
from . import builders, status

log = logging.getLogger(__name__)

#: How often a BatchInference waiting for something (its ModelDeployment, a Secret) looks again.
WAIT_SECONDS = 10.0
#: While running: how often the workers' progress is read and the status brought up to date.
RUNNING_RESYNC_SECONDS = 10.0
#: A worker's progress answer is a few hundred bytes on the pod network: one that takes longer is
#: skipped this round (its last report stays in status), so that a reconcile never waits on it long.
PROGRESS_TIMEOUT_SECONDS = 1.0
#: Reconciles an event brings (a pod's status, the operator's own status write) within this long of
#: the last progress read reuse it: the workers' cores are for scoring (the status write of a
#: reconcile is itself an event; asking the workers on each one kept them answering, measured).
PROGRESS_POLL_SECONDS = 5.0
TERMINAL = (bapi.BatchPhase.succeeded.value, bapi.BatchPhase.failed.value)


def owner_key(name: str) -> str:
    """The cache's owner index of a BatchInference's Job, ConfigMap and pods."""
    return f"{bapi.KIND}/{name}"


def _now() -> datetime:
    return datetime.now(UTC)


async def fetch_progress(url: str) -> dict[str, Any] | None:
    """A running worker's report so far (``GET`` on its progress port), or None."""
    timeout = aiohttp.ClientTimeout(total=PROGRESS_TIMEOUT_SECONDS)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url) as resp,
        ):
            if resp.status != 200:
                return None
            report = json.loads(await resp.read())
    except (aiohttp.ClientError, TimeoutError, ValueError, OSError):
        return None
    return report if isinstance(report, dict) else None


def running_workers(pods: list[dict[str, Any]]) -> list[str]:
    """The progress URLs of the pods whose worker container runs."""
    urls = []
    for pod in pods:
        st = pod.get("status") or {}
        ip = st.get("podIP")
        for cs in st.get("containerStatuses") or []:
            if cs.get("name") == builders.WORKER_CONTAINER and "running" in (cs.get("state") or {}) and ip:
                host = f"[{ip}]" if ":" in ip else ip
                urls.append(f"http://{host}:{builders.PROGRESS_PORT}/")
    return urls


@dataclass(frozen=True)
class Model:
    """What scores: a ModelDeployment spec (inline or a ModelDeployment's stable revision) and its hash."""

    spec: api.ModelDeploymentSpec
    revision: str


def resolve_model(spec: bapi.BatchInferenceSpec, md: dict[str, Any] | None) -> Model | tuple[str, str]:
    """The model to score with, or (reason, message) why there is none yet."""
    if spec.model.inline is not None:
        scoring = builders.scoring_spec(spec.model.inline)
        return Model(scoring, revision.revision_hash(scoring))
    assert spec.model.model_deployment_ref is not None
    ref = spec.model.model_deployment_ref.name
    if md is None:
        return (
            "ModelDeploymentNotFound",
            f"spec.model.modelDeploymentRef: ModelDeployment {ref!r} does not exist in this namespace; "
            "create it or name another",
        )
    try:
        md_spec = api.ModelDeploymentSpec.model_validate(md.get("spec") or {})
        md_status = api.ModelDeploymentStatus.model_validate(md.get("status") or {})
    except pydantic.ValidationError:
        return ("ModelDeploymentInvalid", f"ModelDeployment {ref!r} has a spec the operator cannot read")
    stable = revision.find(list(md_status.history or []), number=md_status.stable_revision)
    if md_status.stable_revision is None or stable is None or stable.spec is None:
        return (
            "NoStableRevision",
            f"ModelDeployment {ref!r} has no stable revision yet: scoring starts once one serves",
        )
    try:
        scoring = revision.with_pod_shaping(md_spec, stable.spec)
    except (ValueError, RecursionError):
        return ("ModelDeploymentInvalid", f"ModelDeployment {ref!r}: its stable revision cannot be read")
    return Model(scoring, stable.hash)


@dataclass(eq=False)
class BatchReconciler:
    kube: Kube
    cache: Cache
    _: KW_ONLY
    post_event: Callable[[dict[str, Any], str, str, str], Awaitable[None]]
    stager_image: str = md_builders.DEFAULT_STAGER_IMAGE
    worker_image: str = md_builders.DEFAULT_STAGER_IMAGE
    clock: Callable[[], datetime] = _now
    #: Reads a running worker's report so far (tests give their own).
    progress: Callable[[str], Awaitable[dict[str, Any] | None]] = fetch_progress
    monotonic: Callable[[], float] = time.monotonic
    #: Per running BatchInference: when its workers were last asked, and what they said.
    _live: dict[tuple[str, str], tuple[float, list[dict[str, Any]]]] = field(
        default_factory=dict, init=False, repr=False
    )

    async def reconcile(self, namespace: str, name: str) -> float | None:
        """One pass; returns when to look again without an event (None: on events only)."""
        bi = self.cache.get(bapi.KIND, namespace, name)
        if bi is None or bi["metadata"].get("deletionTimestamp"):
            self._live.pop((namespace, name), None)
            return None
        try:
            return await self._reconcile(bi)
        except ApiError as e:
            if e.status == 404 and not await self.kube.exists(bapi.KIND, namespace, name):
                return None  # deleted meanwhile: its watch event brings the deletion
            raise

    async def _reconcile(self, bi: dict[str, Any]) -> float | None:
        meta = bi["metadata"]
        ns, name, generation = meta["namespace"], meta["name"], meta.get("generation")
        try:
            old = bapi.BatchInferenceStatus.model_validate(bi.get("status") or {})
        except pydantic.ValidationError:
            old = bapi.BatchInferenceStatus()
        if old.phase in TERMINAL:
            self._live.pop((ns, name), None)
            return None  # done: the Job is kept (its pods' logs) until the BatchInference is deleted
        now = self.clock()
        try:
            spec = bapi.BatchInferenceSpec.model_validate(bi.get("spec") or {})
        except pydantic.ValidationError as exc:
            invalid = "; ".join(
                f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]
            )
            new = status.derive(old, generation=generation, now=now, job=None, pods=[], invalid=invalid)
            await self._write(bi, old, new)
            return None
        job = self.cache.get("Job", ns, builders.job_name(name)) or await self._get_job(ns, name)
        waiting, model_revision = None, None
        if job is None:
            model = resolve_model(spec, self._md(ns, spec))
            if isinstance(model, tuple):
                waiting = model
            else:
                waiting = await self._missing_secret(ns, spec)
            if waiting is None:
                assert isinstance(model, Model)
                job = await self._create(bi, spec, model)
                model_revision = model.revision
        pods = self.cache.owned("Pod", ns, owner_key(name))
        live = await self.live_reports(ns, name, pods) if job is not None else []
        new = status.derive(
            old,
            generation=generation,
            now=now,
            job=job,
            pods=pods,
            live=live,
            waiting=waiting,
            model_revision=model_revision,
            output_uri=spec.output.uri,
        )
        await self._write(bi, old, new)
        if waiting is not None:
            return WAIT_SECONDS
        return RUNNING_RESYNC_SECONDS if new.phase not in TERMINAL else None

    async def live_reports(self, ns: str, name: str, pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The running workers' reports so far: asked at most every PROGRESS_POLL_SECONDS."""
        at = self.monotonic()
        last = self._live.get((ns, name))
        if last is not None and at - last[0] < PROGRESS_POLL_SECONDS:
            return last[1]
        urls = running_workers(pods)
        live = [r for r in await asyncio.gather(*(self.progress(u) for u in urls)) if r is not None]
        self._live[(ns, name)] = (at, live)
        return live

    def _md(self, ns: str, spec: bapi.BatchInferenceSpec) -> dict[str, Any] | None:
        ref = spec.model.model_deployment_ref
        return self.cache.get(api.KIND, ns, ref.name) if ref is not None else None

    async def _get_job(self, ns: str, name: str) -> dict[str, Any] | None:
        """A Job the cache has not seen (the operator just started): read once before creating one."""
        job = await self.kube.get("Job", ns, builders.job_name(name))
        if job is not None:
            job.setdefault("kind", "Job")
            self.cache.put(job)
        return job

    async def _missing_secret(self, ns: str, spec: bapi.BatchInferenceSpec) -> tuple[str, str] | None:
        for field_path, secret in (
            ("spec.input.credentialsSecret", spec.input.credentials_secret),
            ("spec.output.credentialsSecret", spec.output.credentials_secret),
        ):
            if secret and not await self.kube.exists_recently("Secret", ns, secret):
                return (
                    "CredentialsSecretNotFound",
                    f"{field_path}: Secret {secret!r} does not exist in this namespace; create it",
                )
        return None

    async def _create(
        self, bi: dict[str, Any], spec: bapi.BatchInferenceSpec, model: Model
    ) -> dict[str, Any]:
        meta = bi["metadata"]
        ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
        owner = md_builders.Owner(name=name, namespace=ns, uid=uid)
        config = md_builders.build_config_map(owner, model.spec, model.revision)
        if config is not None:
            config["metadata"]["labels"] = builders.labels(name)
            config["metadata"]["ownerReferences"] = [builders.owner_reference(name, uid)]
            self.cache.put(await self.kube.apply(config))
        job = builders.build_job(
            name,
            ns,
            uid,
            spec,
            model.spec,
            revision=model.revision,
            stager_image=self.stager_image,
            worker_image=spec.worker_image or self.worker_image,
        )
        created = await self.kube.apply(job)
        created.setdefault("kind", "Job")
        self.cache.put(created)
        log.info(
            "%s/%s: created Job %s (model revision %s)", ns, name, job["metadata"]["name"], model.revision
        )
        return created

    async def _write(
        self, bi: dict[str, Any], old: bapi.BatchInferenceStatus, new: bapi.BatchInferenceStatus
    ) -> None:
        if new == old:
            return
        meta = bi["metadata"]
        dump = new.model_dump(by_alias=True, exclude_none=True, mode="json")
        gone = {
            k: None for k in old.model_dump(by_alias=True, exclude_none=True, mode="json") if k not in dump
        }
        written = await self.kube.patch_status(bapi.KIND, meta["namespace"], meta["name"], {**gone, **dump})
        if written.get("metadata"):
            written.setdefault("kind", bapi.KIND)
            self.cache.put(written)
        for ev in events(old, new):
            await self.post_event(dict(bi), *ev)


def events(old: bapi.BatchInferenceStatus, new: bapi.BatchInferenceStatus) -> list[tuple[str, str, str]]:
    """Events on a phase change (and once for each new reason a job waits)."""
    out: list[tuple[str, str, str]] = []
    waiting = _reason(new) or "Waiting"
    quiet = ("Creating", "Starting")
    if new.phase == old.phase:
        if new.phase == bapi.BatchPhase.pending.value and waiting != _reason(old) and waiting not in quiet:
            out.append(("Warning", waiting, new.message or ""))
        return out
    if new.phase == bapi.BatchPhase.running.value:
        out.append(("Normal", "Started", new.message or "worker pods started"))
    elif new.phase == bapi.BatchPhase.succeeded.value:
        out.append(("Normal", "Succeeded", new.message or ""))
    elif new.phase == bapi.BatchPhase.failed.value or (
        new.phase == bapi.BatchPhase.pending.value and waiting not in quiet
    ):
        out.append(("Warning", waiting, new.message or ""))
    return out


def _reason(st: bapi.BatchInferenceStatus) -> str | None:
    for c in st.conditions or []:
        if c.type == status.COMPLETE:
            return c.reason
    return None
