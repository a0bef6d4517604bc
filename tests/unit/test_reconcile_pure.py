"""The reconciler's pure helpers: comparison, apply decisions, observation, cache."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from modeldeploy import api
from modeldeploy.kube.cache import Cache, slim
from modeldeploy.modeldeployment import builders, rollout
from modeldeploy.modeldeployment.children import APPLIED_ANNOTATION, contains, needs_apply, with_applied_hash
from modeldeploy.modeldeployment.observe import observe_revision

# --------------------------------------------------------------------------- contains


def test_contains_dict_subset() -> None:
    live = {"a": 1, "b": {"c": 2, "d": 3}, "defaulted": "x"}
    assert contains(live, {"a": 1})
    assert contains(live, {"b": {"c": 2}})
    assert contains(live, {})
    assert not contains(live, {"b": {"c": 9}})
    assert not contains(live, {"missing": 1})
    assert not contains(live, {"b": {"e": 1}})
    assert not contains({"a": 1}, {"a": {"x": 1}})


def test_contains_lists_must_match_in_length_and_order() -> None:
    assert contains({"l": [{"n": 1, "extra": 0}, {"n": 2}]}, {"l": [{"n": 1}, {"n": 2}]})
    assert not contains({"l": [1, 2, 3]}, {"l": [1, 2]})
    assert not contains({"l": [1]}, {"l": [1, 2]})
    assert not contains({"l": [2, 1]}, {"l": [1, 2]})
    assert not contains({"l": "12"}, {"l": ["1", "2"]})


@pytest.mark.parametrize(
    ("live", "desired"),
    [
        ("1", "1000m"),
        ("1000m", "1"),
        ("500m", "0.5"),
        ("1Gi", "1024Mi"),
        (1073741824, "1Gi"),
        ("1Gi", 1073741824),
        ("4", 4),
        (4, "4"),
        ("1k", "1000"),
        ("1e3", "1k"),
        ("2", 2.0),
    ],
)
def test_contains_quantity_equivalence(live: Any, desired: Any) -> None:
    # Under resource-like keys the API server canonicalises quantities.
    assert contains({"requests": {"q": live}}, {"requests": {"q": desired}})
    assert contains({"q": live}, {"q": desired}, quantity=True)


@pytest.mark.parametrize(
    ("live", "desired"),
    [
        ("1", "2"),
        ("1Gi", "1G"),
        ("1000m", "2"),
        (1, "1Ki"),
        ("http", "grpc"),
        ("abc", 1),
        (None, "1"),
        ("1", None),
    ],
)
def test_contains_quantity_differences(live: Any, desired: Any) -> None:
    assert not contains({"q": live}, {"q": desired})
    assert not contains({"limits": {"q": live}}, {"limits": {"q": desired}})


def test_contains_quantity_equivalence_only_for_quantities() -> None:
    desired = {"env": [{"name": "MODEL_SCHEMA", "value": "1.10"}]}
    assert not contains({"env": [{"name": "MODEL_SCHEMA", "value": "1.1"}]}, desired)


def test_contains_on_a_real_deployment_shape() -> None:
    spec = api.ModelDeploymentSpec.model_validate(
        {
            "model": {"format": "onnx", "storageUri": "s3://b/r", "version": 1},
            "server": {"resources": {"requests": {"cpu": "1000m", "memory": "1Gi"}}},
        }
    )
    owner = builders.Owner("m", "ns", "uid")
    desired = builders.build_deployment(owner, spec, "abc", revision_number=1, replicas=2)
    live = copy.deepcopy(desired)
    live["metadata"].update({"uid": "x", "resourceVersion": "7", "generation": 3})
    container = live["spec"]["template"]["spec"]["containers"][0]
    container["resources"]["requests"] = {"cpu": "1", "memory": "1073741824"}  # the server's canonical form
    container["terminationMessagePath"] = "/dev/termination-log"  # defaulted by the server
    live["status"] = {"readyReplicas": 2}
    assert contains(live, desired)
    container["image"] = "edited-by-hand"
    assert not contains(live, desired)


# --------------------------------------------------------------------------- needs_apply


def _desired() -> dict[str, Any]:
    return with_applied_hash(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "s", "namespace": "ns", "labels": {"a": "b"}},
            "spec": {"selector": {"x": "y"}, "ports": [{"port": 8000}]},
        }
    )


def test_with_applied_hash_is_deterministic_and_tracks_intent() -> None:
    a, b = _desired(), _desired()
    assert (
        a["metadata"]["annotations"][APPLIED_ANNOTATION] == b["metadata"]["annotations"][APPLIED_ANNOTATION]
    )
    other = with_applied_hash(
        {
            **{k: v for k, v in a.items() if k != "metadata"},
            "metadata": {"name": "s", "namespace": "ns", "labels": {"a": "c"}},
        }
    )
    assert (
        other["metadata"]["annotations"][APPLIED_ANNOTATION]
        != a["metadata"]["annotations"][APPLIED_ANNOTATION]
    )


def test_with_applied_hash_keeps_existing_annotations_and_does_not_mutate() -> None:
    obj = {"kind": "X", "metadata": {"name": "n", "annotations": {"keep": "me"}}, "spec": {}}
    out = with_applied_hash(obj)
    assert out["metadata"]["annotations"]["keep"] == "me"
    assert APPLIED_ANNOTATION in out["metadata"]["annotations"]
    assert APPLIED_ANNOTATION not in obj["metadata"]["annotations"]


def test_needs_apply_when_missing() -> None:
    assert needs_apply(None, _desired())


def test_no_apply_when_live_matches_with_server_defaults() -> None:
    desired = _desired()
    live = copy.deepcopy(desired)
    live["metadata"]["resourceVersion"] = "42"
    live["spec"]["ports"][0].update({"protocol": "TCP", "targetPort": 8000})
    live["spec"]["clusterIP"] = "10.0.0.1"
    assert not needs_apply(live, desired)


def test_apply_when_our_intent_changed() -> None:
    desired = _desired()
    live = copy.deepcopy(desired)
    live["metadata"]["annotations"][APPLIED_ANNOTATION] = "0000000000000000"
    assert needs_apply(live, desired)
    del live["metadata"]["annotations"]
    assert needs_apply(live, desired)


def test_apply_when_edited_by_hand() -> None:
    desired = _desired()
    live = copy.deepcopy(desired)
    live["spec"]["selector"] = {"x": "hijacked"}
    assert needs_apply(live, desired)


def test_apply_when_a_field_was_removed_by_hand() -> None:
    desired = _desired()
    live = copy.deepcopy(desired)
    del live["metadata"]["labels"]["a"]
    assert needs_apply(live, desired)


# --------------------------------------------------------------------------- observe_revision


def dep(
    replicas: int = 3,
    *,
    ready: int | None = None,
    updated: int | None = None,
    generation: int = 2,
    observed: int = 2,
    conditions: list[dict[str, Any]] | None = None,
    pods: int | None = None,
) -> dict[str, Any]:
    status: dict[str, Any] = {"observedGeneration": observed, "conditions": conditions or []}
    if pods is not None:
        status["replicas"] = pods
    if ready is not None:
        status["readyReplicas"] = ready
    if updated is not None:
        status["updatedReplicas"] = updated
    return {
        "metadata": {"name": "d", "generation": generation},
        "spec": {"replicas": replicas},
        "status": status,
    }


def pod(
    name: str, *, ready: bool = True, restarts: int = 0, waiting: str | None = None, deleting: bool = False
) -> dict[str, Any]:
    cs: dict[str, Any] = {"name": "triton", "ready": ready, "restartCount": restarts, "state": {}}
    if waiting:
        cs["state"] = {"waiting": {"reason": waiting}}
    meta: dict[str, Any] = {"name": name}
    if deleting:
        meta["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    return {
        "metadata": meta,
        "status": {
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "containerStatuses": [cs],
        },
    }


def test_observe_missing_deployment() -> None:
    assert observe_revision(None, []) == rollout.RevisionObservation()


def test_observe_counts_ready_pods() -> None:
    obs = observe_revision(dep(3, ready=2, updated=3), [pod("a"), pod("b"), pod("c", ready=False)])
    assert obs == rollout.RevisionObservation(desired=3, ready=2, updated=3, failure=None)


def test_observe_ready_never_exceeds_the_deployments_count_while_older_pods_remain() -> None:
    # 3 pods, 1 of the current template: which of the ready ones are current only the controller knows.
    obs = observe_revision(dep(3, ready=1, updated=1, pods=3), [pod("a"), pod("b"), pod("c")])
    assert (obs.ready, obs.updated) == (1, 1)


def test_observe_counts_the_pods_when_the_deployment_status_lags_them() -> None:
    # The controller saw this template with no older pod left, then created the pods; kwok made them
    # Ready, and its next status write has not come yet (after an API server restart on a busy machine:
    # over a minute, while the rollout step waited for it).
    obs = observe_revision(dep(2, ready=0, updated=0, pods=0), [pod("a"), pod("b")])
    assert (obs.ready, obs.updated) == (2, 2)
    assert observe_revision(dep(2, pods=0), [pod("a"), pod("b", ready=False)]).ready == 1


def test_observe_a_template_the_controller_has_not_seen_is_not_updated() -> None:
    obs = observe_revision(dep(2, ready=2, updated=2, pods=2, generation=3, observed=2), [pod("a"), pod("b")])
    assert obs.updated == 0


def test_observe_a_new_deployment_without_status_vouches_for_no_ready_pod() -> None:
    # Created a moment ago: kwok made its pod ready before the controller's first status write. Until
    # that write nothing says the pod is of the current template, so none counts; the ready count then
    # comes with the promotion in one status write instead of one write each.
    new = {"metadata": {"name": "d", "generation": 1}, "spec": {"replicas": 1}, "status": {}}
    assert observe_revision(new, [pod("a")]) == rollout.RevisionObservation(desired=1, ready=0, updated=0)
    # Once it has looked (generation 1 seen, no older pod), the pods count at once.
    new["status"] = {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1}
    assert observe_revision(new, [pod("a")]) == rollout.RevisionObservation(desired=1, ready=1, updated=1)


def test_observe_ignores_terminating_pods() -> None:
    obs = observe_revision(dep(2, ready=2, updated=2), [pod("a"), pod("b", deleting=True)])
    assert obs.ready == 1


def test_observe_zero_ready_when_status_omits_the_field() -> None:
    obs = observe_revision(dep(2, updated=2), [pod("a", ready=False), pod("b", ready=False)])
    assert obs.ready == 0


def test_observe_updated_only_once_the_generation_is_seen() -> None:
    assert (
        observe_revision(dep(2, ready=2, updated=2, generation=3, observed=2), [pod("a"), pod("b")]).updated
        == 0
    )
    assert (
        observe_revision(dep(2, ready=2, updated=2, generation=3, observed=3), [pod("a"), pod("b")]).updated
        == 2
    )


def test_observe_crashloopbackoff() -> None:
    obs = observe_revision(
        dep(2, updated=2), [pod("a"), pod("b", ready=False, restarts=1, waiting="CrashLoopBackOff")]
    )
    assert obs.failure is not None and obs.failure.startswith("CrashLoopBackOff")
    assert "pod b" in obs.failure


def test_observe_repeated_restarts_count_as_crashloop() -> None:
    obs = observe_revision(dep(1, updated=1), [pod("a", ready=False, restarts=rollout.CRASHLOOP_RESTARTS)])
    assert obs.failure is not None and "CrashLoopBackOff" in obs.failure


def test_observe_a_few_restarts_of_a_ready_pod_are_fine() -> None:
    assert observe_revision(dep(1, ready=1, updated=1), [pod("a", restarts=5)]).failure is None
    assert observe_revision(dep(1, updated=1), [pod("a", ready=False, restarts=1)]).failure is None
    assert (
        observe_revision(dep(1, updated=1), [pod("a", ready=False, waiting="ContainerCreating")]).failure
        is None
    )


def test_observe_progress_deadline_exceeded() -> None:
    cond = {
        "type": "Progressing",
        "status": "False",
        "reason": "ProgressDeadlineExceeded",
        "message": 'ReplicaSet "d-1" has timed out progressing.',
    }
    obs = observe_revision(dep(2, updated=2, conditions=[cond]), [pod("a", ready=False)])
    assert obs.failure is not None and obs.failure.startswith("ProgressDeadlineExceeded")
    assert "timed out" in obs.failure


def test_observe_healthy_progressing_condition_is_not_a_failure() -> None:
    cond = {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}
    assert observe_revision(dep(1, ready=1, updated=1, conditions=[cond]), [pod("a")]).failure is None


# --------------------------------------------------------------------------- Cache


def obj(
    kind: str, name: str, rv: str | int, *, owner: str = "md1", ns: str = "ns", **extra: Any
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": ns,
        "resourceVersion": str(rv),
        "labels": {builders.LABEL_NAME: owner},
    }
    return {"kind": kind, "metadata": meta, **extra}


def test_cache_put_get_and_owned() -> None:
    cache = Cache()
    cache.put(obj("Deployment", "b", 1))
    cache.put(obj("Deployment", "a", 1))
    cache.put(obj("Deployment", "c", 1, owner="md2"))
    cache.put(obj("Service", "a", 1))
    cache.put(obj("Deployment", "a", 1, ns="other"))
    assert [d["metadata"]["name"] for d in cache.owned("Deployment", "ns", "md1")] == ["a", "b"]
    assert [d["metadata"]["name"] for d in cache.owned("Deployment", "ns", "md2")] == ["c"]
    assert [d["metadata"]["name"] for d in cache.owned("Service", "ns", "md1")] == ["a"]
    assert cache.owned("Deployment", "ns", "nobody") == []
    got = cache.get("Service", "ns", "a")
    assert got is not None and got["kind"] == "Service"
    assert cache.get("Service", "ns", "zzz") is None
    assert len(cache) == 5


def test_cache_model_deployment_owns_itself_by_name() -> None:
    cache = Cache()
    md = {"kind": api.KIND, "metadata": {"name": "md1", "namespace": "ns", "resourceVersion": "3"}}
    cache.put(md)
    assert cache.get(api.KIND, "ns", "md1") == md
    assert cache.keys(api.KIND) == [("ns", "md1")]


def test_cache_newer_replaces_older() -> None:
    cache = Cache()
    assert cache.put(obj("Deployment", "a", 5, spec={"v": 1}))
    assert cache.put(obj("Deployment", "a", 6, spec={"v": 2}))
    got = cache.get("Deployment", "ns", "a")
    assert got is not None and got["spec"] == {"v": 2}


def test_cache_ignores_a_stale_resource_version() -> None:
    cache = Cache()
    cache.put(obj("Deployment", "a", 10, spec={"v": "new"}))
    # an older watch event after our write's response
    assert not cache.put(obj("Deployment", "a", 9, spec={"v": "old"}))
    got = cache.get("Deployment", "ns", "a")
    assert got is not None and got["spec"] == {"v": "new"}


def test_cache_reports_the_echo_of_a_version_it_holds_as_no_change() -> None:
    # The watch brings back our own write after its response went into the cache: nothing changed, and
    # the caller (the child watch handler) wakes no reconcile for it.
    cache = Cache()
    assert cache.put(obj("Service", "a", 7, spec={"v": 1}))
    held = cache.get("Service", "ns", "a")
    assert not cache.put(obj("Service", "a", 7, spec={"v": 1}))
    assert cache.get("Service", "ns", "a") is held
    # Objects without a resourceVersion (never from the API server) always replace.
    assert cache.put(obj("Service", "b", 0, spec={"v": 1}))
    assert cache.put(obj("Service", "b", 0, spec={"v": 2}))


def test_cache_note_lasts_as_long_as_the_version_it_was_made_on() -> None:
    cache = Cache()
    cache.note("Service", "ns", "a", "intent-1")  # nothing held: nothing to note
    assert cache.noted("Service", "ns", "a") is None
    cache.put(obj("Service", "a", 7))
    cache.note("Service", "ns", "a", "intent-1")
    assert not cache.put(obj("Service", "a", 7))  # the echo: the same version, the note stays
    assert cache.noted("Service", "ns", "a") == "intent-1"
    cache.put(obj("Service", "a", 8))  # someone else's edit
    assert cache.noted("Service", "ns", "a") is None
    cache.note("Service", "ns", "a", "intent-1")
    cache.delete("Service", "ns", "a")
    cache.put(obj("Service", "a", 9))  # created again
    assert cache.noted("Service", "ns", "a") is None


def test_cache_delete() -> None:
    cache = Cache()
    cache.put(obj("Deployment", "a", 1))
    cache.put(obj("Deployment", "b", 1))
    cache.delete("Deployment", "ns", "a")
    cache.delete("Deployment", "ns", "never-there")
    assert cache.get("Deployment", "ns", "a") is None
    assert [d["metadata"]["name"] for d in cache.owned("Deployment", "ns", "md1")] == ["b"]
    assert len(cache) == 1


def test_cache_reindexes_when_the_owner_label_changes() -> None:
    cache = Cache()
    cache.put(obj("Pod", "p", 1, owner="md1"))
    cache.put(obj("Pod", "p", 2, owner="md2"))
    assert cache.owned("Pod", "ns", "md1") == []
    assert [p["metadata"]["name"] for p in cache.owned("Pod", "ns", "md2")] == ["p"]


def test_cache_keeps_only_our_own_apply_entry_of_managed_fields() -> None:
    ours = {"manager": builders.MANAGER, "operation": "Apply", "fieldsV1": {"f:spec": {"f:replicas": {}}}}
    managed = [
        ours,
        {"manager": "kube-controller-manager", "operation": "Update", "fieldsV1": {"f:status": {}}},
        {"manager": builders.MANAGER, "operation": "Update", "fieldsV1": {"f:status": {}}},
    ]
    dep = obj("Deployment", "a", 1, spec={"replicas": 2})
    dep["metadata"]["managedFields"] = managed
    cache = Cache()
    cache.put(dep)
    got = cache.get("Deployment", "ns", "a")
    assert got is not None
    assert got["metadata"]["managedFields"] == [ours]
    assert got["spec"] == {"replicas": 2} and got["metadata"]["labels"] == dep["metadata"]["labels"]
    assert dep["metadata"]["managedFields"] == managed  # the caller's object is left as it was


def test_cache_keeps_of_a_pod_what_the_reconcile_reads() -> None:
    pod = obj(
        "Pod",
        "p",
        4,
        spec={"containers": [{"name": "triton", "image": "x" * 1000}]},
        status={
            "phase": "Running",
            "podIP": "10.0.0.7",
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": "triton", "restartCount": 0, "ready": True}],
            "hostIP": "192.0.2.1",
            "qosClass": "BestEffort",
        },
    )
    pod["metadata"].update(
        {"uid": "u1", "annotations": {"big": "y" * 1000}, "managedFields": [{}], "generateName": "p-"}
    )
    slimmed = slim(pod)
    assert "spec" not in slimmed
    assert set(slimmed["metadata"]) == {"name", "namespace", "uid", "resourceVersion", "labels"}
    assert set(slimmed["status"]) == {"phase", "podIP", "conditions", "containerStatuses"}
    # What observe_revision derives is the same from the slim copy as from the whole Pod.
    dep = {
        "metadata": {"generation": 1},
        "status": {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1},
    }
    assert observe_revision(dep, [slimmed]) == observe_revision(dep, [pod])
    assert observe_revision(dep, [slimmed]).ready == 1
    pod["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert slim(pod)["metadata"]["deletionTimestamp"] == "2026-01-01T00:00:00Z"


def test_cache_keeps_an_object_without_managed_fields_as_it_is() -> None:
    svc = obj("Service", "s", 1, spec={"ports": []})
    assert slim(svc) == svc and slim(svc) is not svc  # a copy: its keys and short strings shared


def test_annotation_command_counts_once_per_value() -> None:
    from modeldeploy.api import PROMOTE_ANNOTATION
    from modeldeploy.modeldeployment.decide import fresh as _fresh
    from modeldeploy.modeldeployment.decide import remember_nonces as _remember_nonces

    state = api.RolloutState(state=rollout.PROGRESSING, stable_revision=1, candidate_revision=2)
    ann = {PROMOTE_ANNOTATION: "2025-01-01T00:00:00Z"}
    assert _fresh(ann, PROMOTE_ANNOTATION, state)
    assert not _fresh({}, PROMOTE_ANNOTATION, state)
    assert not _fresh(ann, PROMOTE_ANNOTATION, None)
    remembered = _remember_nonces(state, ann)
    assert remembered.handled_promote == "2025-01-01T00:00:00Z"
    assert not _fresh(ann, PROMOTE_ANNOTATION, remembered)
    assert _fresh({PROMOTE_ANNOTATION: "again"}, PROMOTE_ANNOTATION, remembered)
    assert _remember_nonces(state, {}) is state
