"""The one level-triggered reconcile, in three phases.

``Reconciler.reconcile(namespace, name)`` runs for every event of a ModelDeployment or of one of its
children, and on a periodic resync:

1. **observe** (:meth:`Reconciler.observe`): the ModelDeployment, its children and pods from the watch
   cache (no API reads), the existence of what its spec refers to, the candidate's analysis verdict;
2. **decide** (:func:`.decide.decide`, pure): the next rollout state, status, Events and the
   desired children;
3. **act** (:meth:`Reconciler.act`): the status is written *before* anything is done on the new state
   (an operator killed at any moment resumes from the last persisted step), then Events, then the
   children that differ from what is live are applied, and those no longer wanted deleted.

A reconcile that changes nothing writes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import KW_ONLY, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import pydantic

from .. import api
from ..kube.cache import Cache, owns_replicas
from ..kube.client import ApiError, Kube, path_for
from . import builders, children, decide, rollout, status
from .analysis_runner import AnalysisRunner
from .children import APPLIED_ANNOTATION, HANDOVER_MANAGER, needs_apply, with_applied_hash
from .observe import Observation, Refusals, references

log = logging.getLogger(__name__)

#: A child the API server refused is sent again when it changes, or after this long (admission can change).
REJECTED_RETRY_SECONDS = 300.0
#: Applied before the rest: other children refer to them (a Deployment's pods mount the ConfigMap).
_FIRST_KINDS = ("ConfigMap",)


@dataclass
class Outcome:
    writes: int = 0
    requeue_after: float | None = None
    events: list[tuple[str, str, str]] = field(default_factory=list)


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(eq=False)
class Reconciler:
    kube: Kube
    cache: Cache
    _: KW_ONLY
    post_event: Callable[[dict[str, Any], str, str, str], Awaitable[None]]
    #: The analysis windows, run beside the reconcile; None: no analysis gate (tests, `render`).
    analysis: AnalysisRunner | None = None
    stager_image: str = builders.DEFAULT_STAGER_IMAGE
    clock: Callable[[], datetime] = _now
    _primed: set[str] = field(default_factory=set, init=False)
    _priming: dict[str, asyncio.Lock] = field(default_factory=dict, init=False)
    #: Children the API server refused, per ModelDeployment.
    _rejected: dict[tuple[str, str], Refusals] = field(default_factory=dict, init=False)

    async def reconcile(self, namespace: str, name: str) -> Outcome:
        md = self.cache.get(api.KIND, namespace, name)
        if md is None or md["metadata"].get("deletionTimestamp"):
            self._rejected.pop((namespace, name), None)
            return Outcome()
        if namespace not in self._primed:
            await self._prime(namespace)
        writes_before = self.kube.writes
        try:
            obs = await self.observe(md)
            out = await self.act(obs, decide.decide(obs, stager_image=self.stager_image))
        except ApiError as e:
            if e.status == 404 and not await self.kube.exists(api.KIND, namespace, name):
                # Deleted while it was being reconciled (the status write found no object; the cache had
                # not seen the deletion yet): the watch brings it; nothing to retry, nothing to report.
                log.info("%s/%s was deleted during its reconcile", namespace, name)
                return Outcome(writes=self.kube.writes - writes_before)
            raise
        out.writes = self.kube.writes - writes_before
        return out

    # ------------------------------------------------------------------ observe

    async def observe(self, md: dict[str, Any]) -> Observation:
        meta = md["metadata"]
        ns, name = meta["namespace"], meta["name"]
        try:
            old_status = api.ModelDeploymentStatus.model_validate(md.get("status") or {})
        except pydantic.ValidationError:
            old_status = api.ModelDeploymentStatus()
        spec, spec_error = None, None
        try:
            spec = api.ModelDeploymentSpec.model_validate(md.get("spec") or {})
        except pydantic.ValidationError as exc:
            spec_error = "; ".join(
                f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]
            )
        obs = Observation(
            md=md,
            now=self.clock(),
            spec=spec,
            spec_error=spec_error,
            old_status=old_status,
            deployments={d["metadata"]["name"]: d for d in self.cache.owned("Deployment", ns, name)},
            pods=self.cache.owned("Pod", ns, name),
            refused=self._rejected.get((ns, name), {}),
        )
        if spec is None:
            return obs
        exists = {
            key: await self.kube.exists_recently(*key) for key in self._referenced(ns, spec, old_status)
        }
        return replace(obs, exists=exists, analysed=self._analysed(obs, spec))

    @staticmethod
    def _referenced(
        ns: str, spec: api.ModelDeploymentSpec, old_status: api.ModelDeploymentStatus
    ) -> list[tuple[str, str, str]]:
        """What the spec (and the revision rollbackTo names) needs to exist, and the route CRDs."""
        specs = [spec]
        target = decide.target_spec(spec, list(old_status.history or []))
        if isinstance(target, api.ModelDeploymentSpec) and target is not spec:
            specs.append(target)
        keys = [(kind, ns, ref) for s in specs for kind, ref in references(s)]
        return list(dict.fromkeys(keys + decide.route_crd_keys(spec)))

    def _analysed(self, obs: Observation, spec: api.ModelDeploymentSpec) -> tuple[str, str] | None:
        """(stable hash, candidate hash) while the analysis gate holds: the rollout progressing with
        analysis (not fast-tracked by rollbackTo) and the candidate's pods at this step ready. The
        verdict is what its windows persisted in status (:func:`.analysis_runner.verdict_for`)."""
        state = obs.old_status.rollout
        if (
            self.analysis is None
            or spec.rollout.analysis is None
            or spec.rollback_to is not None
            or state is None
            or state.state != rollout.PROGRESSING
            or state.candidate_revision is None
            or state.stable_revision is None
        ):
            return None
        by_number = {r.revision: r for r in obs.old_status.history or []}
        stable, cand = by_number.get(state.stable_revision), by_number.get(state.candidate_revision)
        if stable is None or cand is None:
            return None
        strategy = spec.rollout.strategy
        revs = {n: obs.revision(by_number.get(n), strategy) for n in decide.live_revisions(state)}
        want = rollout.replicas_for(state, strategy, obs.total(spec, state, revs)).get(cand.revision, 0)
        return (stable.hash, cand.hash) if revs[cand.revision].ready >= want > 0 else None

    async def _prime(self, namespace: str) -> None:
        """Fill the cache with the namespace's children once, before the first reconcile there:
        right after a start the watches may not have listed everything yet, and a reconcile
        working from a partial view would write what is already there."""
        async with self._priming.setdefault(namespace, asyncio.Lock()):  # one listing, not one per worker
            if namespace in self._primed:
                return
            selector = f"app.kubernetes.io/managed-by={api.MANAGER}"
            for kind in children.WATCHED_KINDS:
                for obj in await self.kube.list(kind, namespace, selector):
                    obj.setdefault("kind", kind)
                    self.cache.put(obj)
            self._primed.add(namespace)

    # ------------------------------------------------------------------ act

    async def act(self, obs: Observation, decision: decide.Decision) -> Outcome:
        meta = obs.md["metadata"]
        ns, name = meta["namespace"], meta["name"]
        old, new = obs.old_status, decision.status
        # The status goes first: it persists the rollout step taken, which the applies carry out. Before
        # any step was persisted (a new ModelDeployment's first revision, decided from the spec alone)
        # there is nothing to resume from, and the two go together.
        write_status = self._write_status(ns, name, old, new) if new != old else None
        if write_status is not None and (old.rollout is not None or decision.children is None):
            await write_status
            write_status = None
        events = list(decision.events)
        if self.analysis is not None:
            # Directed on the state just persisted: a window never writes after a rollback.
            state = obs.old_status.rollout
            if decision.analyse and obs.analysed and obs.spec and state:
                self.analysis.ensure(dict(obs.md), obs.spec, state, *obs.analysed)
            else:
                self.analysis.stop(ns, name)
        if decision.children is None:
            await self._post_events(obs, events)
            return Outcome(requeue_after=decision.requeue_after, events=events)
        persisted = write_status is None  # the step the Events tell of
        try:
            if write_status is None:
                rejected = await self._apply_children(obs, decision.children)
            else:
                wrote, applied = await asyncio.gather(
                    write_status, self._apply_children(obs, decision.children), return_exceptions=True
                )
                persisted = not isinstance(wrote, BaseException)
                for result in (wrote, applied):
                    if isinstance(result, BaseException):
                        raise result
                assert not isinstance(applied, BaseException)
                rejected = applied
        finally:
            # After the writes they tell of (posted in the background, they would compete with them
            # for the API server); also when an apply failed, once the step they tell of is persisted.
            if persisted:
                await self._post_events(obs, events)
        if rejected == obs.refused:
            return Outcome(requeue_after=decision.requeue_after, events=events)
        if rejected:
            self._rejected[(ns, name)] = rejected
        else:
            self._rejected.pop((ns, name), None)
        for key, (_, message, _) in sorted(rejected.items()):
            if key not in obs.refused:
                ev = ("Warning", "ChildRejected", f"the API server refused {key[0]} {key[1]}: {message}")
                events.append(ev)
                await self.post_event(dict(obs.md), *ev)
        # once more, so that status (and the rollout) reflect what was refused
        return Outcome(requeue_after=0.5, events=events)

    async def _post_events(self, obs: Observation, events: list[tuple[str, str, str]]) -> None:
        for ev in events:
            await self.post_event(dict(obs.md), *ev)

    async def _write_status(
        self, ns: str, name: str, old: api.ModelDeploymentStatus, new: api.ModelDeploymentStatus
    ) -> None:
        changed = [k for k in type(new).model_fields if getattr(new, k) != getattr(old, k)]
        log.debug("%s/%s: status changes: %s", ns, name, ", ".join(changed))
        patch = status.status_patch(decide.dump_status(old), decide.dump_status(new))
        self._remember_own_write(await self.kube.patch_status(api.KIND, ns, name, patch))

    def _remember_own_write(self, obj: dict[str, Any] | None) -> None:
        """Put the object our status write returned into the cache at once. Until the watch delivers it,
        a reconcile (e.g. triggered by a child's event) would otherwise start from the previous status and
        could take the same transition twice (a second promotion, a second Event)."""
        if obj and obj.get("metadata"):
            obj.setdefault("kind", api.KIND)
            self.cache.put(obj)

    async def _apply_children(self, obs: Observation, desired: list[dict[str, Any]]) -> Refusals:
        """Apply what differs from what is live, delete what is no longer wanted; returns the children
        the API server refused (see ``ApiError.invalid``). One revision's children do not depend on each
        other's writes: they are sent together (ConfigMaps first, which pods mount)."""
        ns = obs.owner.namespace
        rejected: dict[tuple[str, str], tuple[str, str, float]] = {}
        todo: list[tuple[dict[str, Any], dict[str, Any] | None]] = []
        for obj in map(with_applied_hash, desired):
            key = (obj["kind"], obj["metadata"]["name"])
            before = obs.refused.get(key)
            intent = obj["metadata"]["annotations"][APPLIED_ANNOTATION]
            if before and before[0] == intent and time.monotonic() - before[2] < REJECTED_RETRY_SECONDS:
                rejected[key] = before  # refused as it is: sent again only once it changes (or after a while)
                continue
            # The namespace was primed (listed) before its first reconcile, and every write's response
            # goes into the cache: a miss means the child does not exist (or lacks our labels).
            live = self.cache.get(key[0], ns, key[1])
            # A version found to hold this intent keeps holding it: another's edit makes a new version.
            if live is not None and self.cache.noted(key[0], ns, key[1]) == intent:
                continue
            if needs_apply(live, obj):
                todo.append((obj, live))
            elif live is not None:
                self.cache.note(key[0], ns, key[1], intent)
        first = [t for t in todo if t[0]["kind"] in _FIRST_KINDS]
        for wave in (first, [t for t in todo if t[0]["kind"] not in _FIRST_KINDS]):
            if not await self._apply_wave(obs, wave, rejected):
                return rejected  # the namespace is going away, and everything in it
        wanted = {(o["kind"], o["metadata"]["name"]) for o in desired}
        await self._delete_unwanted(obs.owner, wanted)
        return rejected

    async def _apply_wave(
        self,
        obs: Observation,
        wave: list[tuple[dict[str, Any], dict[str, Any] | None]],
        rejected: dict[tuple[str, str], tuple[str, str, float]],
    ) -> bool:
        """Apply objects concurrently; False if the namespace is being terminated."""
        results = await asyncio.gather(
            *(self._apply(obj, live) for obj, live in wave), return_exceptions=True
        )
        failure: BaseException | None = None
        terminating = False
        for (obj, _), result in zip(wave, results, strict=True):
            if not isinstance(result, BaseException):
                self.cache.put(result)
            elif isinstance(result, ApiError) and result.status == 403 and "being terminated" in result.body:
                terminating = True
            elif isinstance(result, ApiError) and result.invalid:
                key = (obj["kind"], obj["metadata"]["name"])
                log.warning(
                    "%s/%s: the API server refused %s %s: %s",
                    obs.owner.namespace,
                    obs.owner.name,
                    *key,
                    result.message,
                )
                intent = obj["metadata"]["annotations"][APPLIED_ANNOTATION]
                rejected[key] = (intent, result.message, time.monotonic())
            else:
                failure = failure or result
        if failure is not None:
            raise failure
        return not terminating

    async def _apply(self, obj: dict[str, Any], live: dict[str, Any] | None) -> dict[str, Any]:
        if obj["kind"] == "Deployment" and "replicas" not in obj["spec"] and live and owns_replicas(live):
            await self._hand_over_replicas(live)
        return await self.kube.apply(obj)

    async def _delete_unwanted(self, owner: builders.Owner, wanted: set[tuple[str, str]]) -> None:
        """Children we own that are no longer wanted (superseded revisions, disabled HPA/PDB)."""
        for kind in children.APPLY_ORDER:
            for live in self.cache.owned(kind, owner.namespace, owner.name):
                lmeta = live["metadata"]
                if (kind, lmeta["name"]) in wanted or lmeta.get("deletionTimestamp"):
                    continue
                if not any(ref.get("uid") == owner.uid for ref in lmeta.get("ownerReferences") or []):
                    continue
                try:
                    await self.kube.delete(kind, owner.namespace, lmeta["name"])
                except ApiError as exc:
                    if exc.status != 409:
                        raise
                self.cache.delete(kind, owner.namespace, lmeta["name"])

    async def _hand_over_replicas(self, live: dict[str, Any]) -> None:
        """A Deployment whose replicas we wrote becomes the HPA's (a promoted candidate, or the first
        revision). Applying without ``replicas`` would *remove* the field, and the API server would
        default it to 1: capacity would collapse until the HPA noticed. So first the current value is
        applied under a second field manager (the documented server-side-apply hand-over); our apply then
        drops our claim, the value stays, and the HPA's next scale takes the field over."""
        meta = live["metadata"]
        replicas = (live.get("spec") or {}).get("replicas")
        if replicas is None:
            return
        body = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
            "spec": {"replicas": replicas},
        }
        await self.kube.request(
            "PATCH",
            path_for("Deployment", meta["namespace"], meta["name"]),
            kind="Deployment",
            params={"fieldManager": HANDOVER_MANAGER, "force": "true"},
            body=body,
            content_type="application/apply-patch+yaml",
        )
