"""What the watch handlers put into the cache (modeldeploy.handlers.for_cache)."""

from __future__ import annotations

import copy
from typing import Any

from modeldeploy.handlers import for_cache
from modeldeploy.kube.cache import Cache
from modeldeploy.modeldeployment import builders
from modeldeploy.modeldeployment.children import owns_replicas as _owns_replicas


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


def test_for_cache_keeps_only_whether_our_apply_owns_replicas() -> None:
    for managed, owns in (
        ((OURS_WITH_REPLICAS, CONTROLLER), True),
        ((OURS_WITHOUT, CONTROLLER, HPA_OWNS_REPLICAS), False),
        ((CONTROLLER,), False),
        ((), False),
    ):
        body = deployment(*copy.deepcopy(managed))
        original = copy.deepcopy(body)
        obj = for_cache(body, "Deployment")
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
        cache.put(obj)
        cached = cache.get("Deployment", "ns", "d")
        assert cached is not None and _owns_replicas(cached) is owns
        assert cache.owned("Deployment", "ns", "m") == [cached]


def test_for_cache_leaves_an_object_without_managed_fields_as_it_is() -> None:
    body = {"metadata": {"name": "s", "namespace": "ns"}, "spec": {"ports": []}}
    assert for_cache(body, "Service") == {**body, "kind": "Service"}
    assert for_cache({**body, "kind": "Service"}, "Pod")["kind"] == "Service"


def test_for_cache_shares_keys_and_short_strings_across_objects() -> None:
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

    a, b = for_cache(decoded(1), "Service"), for_cache(decoded(2), "Service")
    assert a == {**decoded(1), "kind": "Service"} and b == {**decoded(2), "kind": "Service"}
    assert next(iter(a["spec"]["ports"][0])) is next(iter(b["spec"]["ports"][0]))  # the key "name"
    assert a["spec"]["ports"][0]["protocol"] is b["spec"]["ports"][0]["protocol"]
    assert a["metadata"]["labels"]["tier"] is b["metadata"]["labels"]["tier"]
    assert a["status"]["message"] is not b["status"]["message"]  # long strings are left alone
    pod = {"metadata": {"name": "p"}, "status": {"phase": "Running"}}
    assert for_cache(pod, "Pod")["status"] is pod["status"]  # pods: the cache trims them itself


def test_for_cache_takes_the_deepest_object_the_api_server_accepts() -> None:
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(9_990):
        node["a"] = {}
        node = node["a"]
    body = {"metadata": {"name": "m", "namespace": "ns"}, "spec": {"server": {"affinity": deep}}}
    obj = for_cache(body, "ModelDeployment")
    assert obj["spec"]["server"]["affinity"] == deep
