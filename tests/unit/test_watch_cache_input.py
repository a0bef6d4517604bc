"""What the watch cache keeps of what the watches deliver (``handlers.for_cache`` then
``Cache.put``, which slims) and of our own writes' responses (``Cache.put`` alone)."""

from __future__ import annotations

import copy
from typing import Any

from modeldeploy.handlers import for_cache
from modeldeploy.kube.cache import Cache
from modeldeploy.kube.cache import owns_replicas as _owns_replicas
from modeldeploy.modeldeployment import builders


def cached(body: dict[str, Any], kind: str) -> dict[str, Any]:
    """``body`` as a watch event delivers it, after the cache took it."""
    cache = Cache()
    cache.put(for_cache(body, kind))
    meta = body["metadata"]
    obj = cache.get(kind, meta.get("namespace", ""), meta["name"])
    assert obj is not None
    return obj


def deployment(*managed: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "metadata": {
            "name": "d",
            "namespace": "ns",
            "resourceVersion": "7",
            "labels": {builders.LABEL_NAME: "m"},
            "managedFields": list(managed),
        },
        "spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "c"}]}}},
        "status": {"readyReplicas": 2},
    }


OURS_WITH_REPLICAS = {
    "manager": builders.MANAGER,
    "operation": "Apply",
    "fieldsV1": {"f:spec": {"f:replicas": {}, "f:template": {"f:spec": {"f:containers": {}}}}},
}
OURS_WITHOUT = {
    "manager": builders.MANAGER,
    "operation": "Apply",
    "fieldsV1": {"f:spec": {"f:template": {"f:spec": {"f:containers": {}}}}},
}
CONTROLLER = {
    "manager": "kube-controller-manager",
    "operation": "Update",
    "subresource": "status",
    "fieldsV1": {"f:status": {"f:readyReplicas": {}}},
}
HPA_OWNS_REPLICAS = {"manager": "hpa", "operation": "Update", "fieldsV1": {"f:spec": {"f:replicas": {}}}}


def test_the_cache_keeps_only_whether_our_apply_owns_replicas() -> None:
    for managed, owns in (
        ((OURS_WITH_REPLICAS, CONTROLLER), True),
        ((OURS_WITHOUT, CONTROLLER, HPA_OWNS_REPLICAS), False),
        ((CONTROLLER,), False),
        ((), False),
    ):
        body = deployment(*copy.deepcopy(managed))
        original = copy.deepcopy(body)
        obj = cached(body, "Deployment")
        assert body == original  # the watch event's body is not modified
        assert obj["kind"] == "Deployment"
        assert _owns_replicas(obj) is owns is _owns_replicas(body)
        assert len(obj["metadata"]["managedFields"]) == int(owns)
        assert {k: v for k, v in obj.items() if k not in ("kind", "metadata")} == {
            k: v for k, v in body.items() if k != "metadata"
        }
        assert {k: v for k, v in obj["metadata"].items() if k != "managedFields"} == {
            k: v for k, v in body["metadata"].items() if k != "managedFields"
        }
        cache = Cache()
        cache.put(for_cache(body, "Deployment"))
        assert cache.owned("Deployment", "ns", "m") == [obj]
        # the response to our own apply (a whole object, kind included) is kept the same way
        response = Cache()
        response.put({**copy.deepcopy(body), "kind": "Deployment"})
        assert response.get("Deployment", "ns", "d") == obj


def test_the_cache_keeps_an_object_without_managed_fields_as_it_is() -> None:
    body = {"metadata": {"name": "s", "namespace": "ns"}, "spec": {"ports": []}}
    assert cached(body, "Service") == {**body, "kind": "Service"}
    assert for_cache({**body, "kind": "Service"}, "Pod")["kind"] == "Service"


def test_the_cache_shares_keys_and_short_strings_across_objects() -> None:
    import json

    def decoded(i: int) -> dict[str, Any]:  # each event is decoded on its own, as kopf does
        return dict(
            json.loads(
                json.dumps(
                    {
                        "metadata": {"name": f"svc-{i}", "namespace": "ns", "labels": {"tier": "serving"}},
                        "spec": {"ports": [{"name": "http", "protocol": "TCP", "port": 8000}]},
                        "status": {"message": "x" * 100},
                    }
                )
            )
        )

    cache = Cache()
    cache.put(for_cache(decoded(1), "Service"))
    cache.put({**decoded(2), "kind": "Service"})  # the response to our own write
    a, b = cache.get("Service", "ns", "svc-1"), cache.get("Service", "ns", "svc-2")
    assert a is not None and b is not None
    assert a == {**decoded(1), "kind": "Service"} and b == {**decoded(2), "kind": "Service"}
    assert next(iter(a["spec"]["ports"][0])) is next(iter(b["spec"]["ports"][0]))  # the key "name"
    assert a["spec"]["ports"][0]["protocol"] is b["spec"]["ports"][0]["protocol"]
    assert a["metadata"]["labels"]["tier"] is b["metadata"]["labels"]["tier"]
    assert a["status"]["message"] is not b["status"]["message"]  # long strings are left alone
    pod = {"metadata": {"name": "p"}, "status": {"phase": "Running"}}
    assert cached(pod, "Pod")["status"] == pod["status"]  # pods: trimmed to what a reconcile reads


def test_the_cache_takes_the_deepest_object_the_api_server_accepts() -> None:
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(9_990):
        node["a"] = {}
        node = node["a"]
    body = {"metadata": {"name": "m", "namespace": "ns"}, "spec": {"server": {"affinity": deep}}}
    obj = cached(body, "ModelDeployment")
    assert obj["spec"]["server"]["affinity"] == deep


def test_the_child_watches_ask_the_api_server_for_our_objects_only() -> None:
    import kopf
    from kopf import Resource

    from modeldeploy import api
    from modeldeploy.handlers import CHILD_RESOURCES, select_children_on_the_server

    settings = kopf.OperatorSettings()
    select_children_on_the_server(settings)
    ours = f"app.kubernetes.io/managed-by={api.MANAGER}"
    for group, version, plural in CHILD_RESOURCES:
        resource = Resource(group, version, plural, namespaced=True)
        assert settings.watching.label_selectors.collect(resource) == [ours], plural
    # Not the ModelDeployments themselves (nobody labels them), nor anything else kopf watches.
    for group, version, plural in [(api.GROUP, api.VERSION, api.PLURAL), ("", "v1", "namespaces")]:
        assert settings.watching.label_selectors.collect(Resource(group, version, plural)) == []
