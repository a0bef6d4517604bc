"""What a ModelDeployment becomes: the pure builders of every child object."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from modeldeploy import api
from modeldeploy.api import parse_quantity as _quantity
from modeldeploy.modeldeployment import builders
from modeldeploy.triton import staging

OWNER = builders.Owner(name="resnet50", namespace="ml", uid="0b1c2d3e-0000-4000-8000-000000000001")
REV = "a1b2c3d4e5"
MODEL = {"format": "onnx", "storageUri": "s3://models/repo", "version": 3}
CONFIG = {
    "maxBatchSize": 8,
    "inputs": [{"name": "x", "dataType": "TYPE_FP32", "dims": [3]}],
    "outputs": [{"name": "y", "dataType": "TYPE_FP32", "dims": [1]}],
}


def spec_of(model: dict[str, Any] | None = None, **spec: Any) -> api.ModelDeploymentSpec:
    return api.ModelDeploymentSpec.model_validate({"model": {**MODEL, **(model or {})}, **spec})


def deployment(
    spec: api.ModelDeploymentSpec | None = None, *, replicas: int | None = 2, rev: str = REV
) -> dict[str, Any]:
    return builders.build_deployment(OWNER, spec or spec_of(), rev, revision_number=1, replicas=replicas)


def pod_spec(dep: dict[str, Any]) -> dict[str, Any]:
    return dep["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def triton(dep: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in pod_spec(dep)["containers"] if c["name"] == "triton"]
    return container  # type: ignore[no-any-return]


def volumes(dep: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod_spec(dep)["volumes"]}


def mount_paths(container: dict[str, Any]) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}


def services(
    spec: api.ModelDeploymentSpec, *, stable: str = "stablehash", candidate: str | None = "candhash"
) -> dict[str, dict[str, Any]]:
    return {
        s["metadata"]["name"]: s
        for s in builders.build_services(OWNER, spec, stable=stable, candidate=candidate)
    }


# --------------------------------------------------------------------------- Deployment


def test_triton_ports() -> None:
    ports = {p["name"]: p["containerPort"] for p in triton(deployment())["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}


def test_readiness_probe_checks_the_model_versions_own_ready_endpoint() -> None:
    container = triton(deployment(spec_of({"version": 7})))
    assert container["readinessProbe"]["httpGet"] == {
        "path": "/v2/models/resnet50/versions/7/ready",
        "port": "http",
    }


def test_readiness_probe_uses_the_triton_model_name_when_set() -> None:
    container = triton(deployment(spec_of({"name": "classifier", "version": 2})))
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/models/classifier/versions/2/ready"
    assert "--load-model=classifier" in container["args"]


def test_liveness_and_startup_probes() -> None:
    container = triton(deployment())
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/v2/models/resnet50/versions/3/ready"
    # model loading may take minutes: the startup budget is far larger than the liveness one
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= 300
    assert (
        budget > container["livenessProbe"]["periodSeconds"] * container["livenessProbe"]["failureThreshold"]
    )
    # ...and probed often, so a quickly loaded model is Ready soon after it is
    assert startup["periodSeconds"] <= 2


def test_terminating_pods_drain_before_triton_stops() -> None:
    """A preStop sleep keeps Triton serving while the pod leaves the Services' endpoints; the grace
    period covers the drain and Triton's own 30 s shutdown."""
    default = deployment()
    assert triton(default)["lifecycle"] == {"preStop": {"sleep": {"seconds": builders.DEFAULT_DRAIN_SECONDS}}}
    assert pod_spec(default)["terminationGracePeriodSeconds"] == builders.DEFAULT_DRAIN_SECONDS + 30
    longer = deployment(spec_of(server={"drainSeconds": 45}))
    assert triton(longer)["lifecycle"]["preStop"]["sleep"]["seconds"] == 45
    assert pod_spec(longer)["terminationGracePeriodSeconds"] == 75
    none = deployment(spec_of(server={"drainSeconds": 0}))
    assert "lifecycle" not in triton(none) and pod_spec(none)["terminationGracePeriodSeconds"] == 30


def test_drain_seconds_unset_leaves_the_revision_hash_as_it_was() -> None:
    """An operator upgrade that brings the field must not start a rollout of every ModelDeployment."""
    from modeldeploy.modeldeployment import revision

    unset = revision.revision_hash(spec_of())
    assert "drainSeconds" not in revision.pod_shaping(spec_of())["server"]
    assert revision.revision_hash(spec_of(server={"drainSeconds": 10})) == unset  # the default, written
    assert revision.revision_hash(spec_of(server={"drainSeconds": 20})) != unset


@pytest.mark.parametrize("shm", ["1Gi", "256Mi", "4Gi"])
def test_dev_shm_is_a_memory_emptydir_sized_by_shm_size(shm: str) -> None:
    dep = deployment(spec_of(server={"shmSize": shm}))
    vol_name = mount_paths(triton(dep))["/dev/shm"]
    assert volumes(dep)[vol_name]["emptyDir"] == {"medium": "Memory", "sizeLimit": shm}


def test_restricted_security_context() -> None:
    dep = deployment(spec_of({"storageUri": "pvc://claim/models"}))
    pod = pod_spec(dep)["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod_spec(dep)["containers"] + pod_spec(dep)["initContainers"]:
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, container["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], container["name"]
        assert "add" not in sc["capabilities"]
        assert not sc.get("privileged")


def test_gpu_resources_pass_through() -> None:
    resources = {
        "requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"},
        "limits": {"memory": "16Gi", "nvidia.com/gpu": "1"},
    }
    assert triton(deployment(spec_of(server={"resources": resources})))["resources"] == resources


def test_no_resources_field_when_none_given() -> None:
    assert "resources" not in triton(deployment())


def test_node_selector_and_tolerations() -> None:
    spec = spec_of(
        server={
            "nodeSelector": {"nvidia.com/gpu.product": "A100"},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                {
                    "key": "edge",
                    "operator": "Equal",
                    "value": "true",
                    "effect": "NoExecute",
                    "tolerationSeconds": 60,
                },
            ],
        }
    )
    pod = pod_spec(deployment(spec))
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "A100"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "edge", "operator": "Equal", "value": "true", "effect": "NoExecute", "tolerationSeconds": 60},
    ]


def test_no_node_selector_or_tolerations_by_default() -> None:
    pod = pod_spec(deployment())
    assert "nodeSelector" not in pod and "tolerations" not in pod


def test_pod_passthroughs() -> None:
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
                ]
            }
        }
    }
    tsc = [{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule"}]
    spec = spec_of(
        server={
            "affinity": affinity,
            "topologySpreadConstraints": tsc,
            "serviceAccountName": "triton",
            "imagePullSecrets": ["regcred"],
            "env": [{"name": "LOG", "value": "1"}],
            "args": ["--log-verbose=1"],
            "podLabels": {"team": "ml"},
            "podAnnotations": {"a": "b"},
        }
    )
    dep = deployment(spec)
    pod = pod_spec(dep)
    assert pod["affinity"] == affinity
    assert pod["topologySpreadConstraints"] == tsc
    assert pod["serviceAccountName"] == "triton"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert {"name": "LOG", "value": "1"} in triton(dep)["env"]
    assert triton(dep)["args"][-1] == "--log-verbose=1"
    meta = dep["spec"]["template"]["metadata"]
    assert meta["labels"]["team"] == "ml"
    assert meta["annotations"]["a"] == "b"


def test_pod_labels_cannot_override_the_operators_labels() -> None:
    spec = spec_of(server={"podLabels": {builders.LABEL_REVISION: "evil", builders.LABEL_NAME: "other"}})
    labels = deployment(spec)["spec"]["template"]["metadata"]["labels"]
    assert labels[builders.LABEL_REVISION] == REV
    assert labels[builders.LABEL_NAME] == "resnet50"


def test_labels_on_deployment_and_pods() -> None:
    dep = deployment(spec_of({"version": 5}))
    expected = {
        "app.kubernetes.io/name": "triton-inference-server",
        "app.kubernetes.io/instance": "resnet50",
        "app.kubernetes.io/version": "5",
        "app.kubernetes.io/component": builders.COMPONENT_SERVER,
        "app.kubernetes.io/managed-by": builders.MANAGER,
        "modeldeploy.io/name": "resnet50",
        "modeldeploy.io/revision": REV,
    }
    assert dep["metadata"]["labels"] == expected
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert expected.items() <= pod_labels.items()
    # the selector matches the pod template
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_owner_reference_is_the_controller() -> None:
    dep = deployment()
    assert dep["metadata"]["namespace"] == "ml"
    assert dep["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "modeldeploy.io/v1alpha1",
            "kind": "ModelDeployment",
            "name": "resnet50",
            "uid": OWNER.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def test_every_child_is_owned_and_labelled() -> None:
    spec = spec_of(
        {"config": CONFIG},
        autoscaling={"maxReplicas": 4, "targetCPUUtilization": 60},
        podDisruptionBudget={"maxUnavailable": 1},
    )
    objs = [
        deployment(spec, replicas=None),
        builders.build_config_map(OWNER, spec, REV),
        *builders.build_services(OWNER, spec, stable=REV, candidate=None),
        builders.build_hpa(OWNER, spec, target="resnet50-" + REV),
        builders.build_pdb(OWNER, spec),
    ]
    for obj in objs:
        assert obj is not None
        meta = obj["metadata"]
        assert meta["ownerReferences"][0]["controller"] is True, obj["kind"]
        assert meta["ownerReferences"][0]["uid"] == OWNER.uid
        for key in (
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/version",
            "app.kubernetes.io/component",
            "app.kubernetes.io/managed-by",
            "modeldeploy.io/name",
        ):
            assert key in meta["labels"], (obj["kind"], key)


def test_deployment_name_is_deterministic_per_revision() -> None:
    a, b = deployment(rev="aaaaaaaaaa"), deployment(rev="bbbbbbbbbb")
    assert a["metadata"]["name"] == "resnet50-aaaaaaaaaa"
    assert b["metadata"]["name"] == "resnet50-bbbbbbbbbb"
    assert deployment(rev="aaaaaaaaaa") == a
    assert a["metadata"]["annotations"][builders.ANNOTATION_REVISION_NUMBER] == "1"


def test_replicas_written_when_given() -> None:
    assert deployment(replicas=3)["spec"]["replicas"] == 3
    assert deployment(replicas=0)["spec"]["replicas"] == 0


def test_replicas_omitted_when_the_hpa_owns_them() -> None:
    assert "replicas" not in deployment(replicas=None)["spec"]


def test_deployment_progress_deadline_follows_the_rollout() -> None:
    dep = deployment(spec_of(rollout={"progressDeadlineSeconds": 120}))
    assert dep["spec"]["progressDeadlineSeconds"] == 120


def test_output_is_json_serialisable() -> None:
    spec = spec_of({"config": CONFIG, "credentialsSecret": "creds"})
    json.dumps(deployment(spec))
    json.dumps(builders.build_services(OWNER, spec, stable=REV, candidate=None))


# --------------------------------------------------------------------------- storage


@pytest.mark.parametrize(
    "uri",
    [
        "s3://models/repo",
        "s3://minio.local:9000/models/repo",
        "gs://bucket/repo",
        "as://account/container/repo",
        "pvc://claim/repo",
        "https://host/repo.tar.gz",
    ],
)
def test_every_scheme_is_staged_with_credentials_as_mounted_files(uri: str) -> None:
    dep = deployment(spec_of({"storageUri": uri, "credentialsSecret": "creds"}))
    init = _staged(dep)
    assert f"--uri={uri}" in init["args"]
    assert f"--credentials-dir={builders.CREDENTIALS_DIR}" in init["args"]
    vol = volumes(dep)[mount_paths(init)[builders.CREDENTIALS_DIR]]
    assert vol["secret"] == {"secretName": "creds"}  # referenced by name, never copied
    assert {"name": "storage-credentials", "mountPath": builders.CREDENTIALS_DIR, "readOnly": True} in init[
        "volumeMounts"
    ]
    # the Secret is neither in any container's environment nor visible to Triton (the model's code)
    for container in (init, triton(dep)):
        assert "envFrom" not in container
        assert all("valueFrom" not in e for e in container.get("env", []))
    assert builders.CREDENTIALS_DIR not in mount_paths(triton(dep))
    assert init["securityContext"] == builders.RESTRICTED_CONTAINER_SECURITY
    # a read-only root filesystem: scratch space for archives is the tmp emptyDir
    assert "emptyDir" in volumes(dep)[mount_paths(init)["/tmp"]]
    assert pod_spec(dep)["securityContext"] == builders.RESTRICTED_POD_SECURITY
    assert pod_spec(dep)["automountServiceAccountToken"] is False


def test_without_a_secret_nothing_is_mounted() -> None:
    dep = deployment(spec_of({"storageUri": "gs://bucket/repo"}))
    init = _staged(dep)
    assert not any(a.startswith("--credentials-dir") for a in init["args"])
    assert "storage-credentials" not in volumes(dep)


def test_server_env_reaches_the_stager() -> None:
    env = [{"name": "AWS_REGION", "value": "eu-west-1"}]
    dep = deployment(spec_of({"storageUri": "s3://models/repo"}, server={"env": env}))
    init = _staged(dep)
    assert init["env"] == env and triton(dep)["env"] == env


def test_s3_without_config_is_staged_too() -> None:
    dep = deployment()
    init = _staged(dep)
    assert "--uri=s3://models/repo" in init["args"]
    assert not any(a.startswith("--config=") for a in init["args"])
    args = triton(dep)["args"]
    assert "--model-control-mode=explicit" in args
    assert "--load-model=resnet50" in args


def _staged(dep: dict[str, Any]) -> dict[str, Any]:
    (init,) = pod_spec(dep)["initContainers"]
    repo = [a for a in triton(dep)["args"] if a.startswith("--model-repository=")]
    assert repo == [f"--model-repository={builders.MODEL_REPO_DIR}"]
    # the init container fills the very volume Triton reads
    init_mounts, triton_mounts = mount_paths(init), mount_paths(triton(dep))
    assert init_mounts[builders.MODEL_REPO_DIR] == triton_mounts[builders.MODEL_REPO_DIR]
    assert "emptyDir" in volumes(dep)[triton_mounts[builders.MODEL_REPO_DIR]]
    return init  # type: ignore[no-any-return]


def test_pvc_is_staged_from_the_claim() -> None:
    dep = deployment(spec_of({"storageUri": "pvc://model-store/triton/repo"}))
    init = _staged(dep)
    vol = volumes(dep)[mount_paths(init)[builders.PVC_MOUNT_DIR]]
    assert vol["persistentVolumeClaim"] == {"claimName": "model-store", "readOnly": True}
    assert "--uri=pvc://model-store/triton/repo" in init["args"]
    assert f"--pvc-root={builders.PVC_MOUNT_DIR}" in init["args"]
    assert "--version=3" in init["args"] and "--model=resnet50" in init["args"]


@pytest.mark.parametrize("uri", ["http://host/repo.tar.gz", "https://host/repo.tar.gz"])
def test_http_archives_are_staged(uri: str) -> None:
    init = _staged(deployment(spec_of({"storageUri": uri})))
    assert f"--uri={uri}" in init["args"]
    assert not any(a.startswith("--config=") for a in init["args"])


def test_model_config_is_staged_from_its_config_map() -> None:
    spec = spec_of({"config": CONFIG})
    dep = deployment(spec)
    init = _staged(dep)
    cm = builders.build_config_map(OWNER, spec, REV)
    assert cm is not None and "config.pbtxt" in cm["data"]
    vol = volumes(dep)[mount_paths(init)[builders.CONFIG_DIR]]
    assert vol["configMap"]["name"] == cm["metadata"]["name"] == f"resnet50-{REV}-config"
    assert f"--config={builders.CONFIG_DIR}/config.pbtxt" in init["args"]


def test_no_config_map_without_model_config() -> None:
    assert builders.build_config_map(OWNER, spec_of(), REV) is None


def test_every_scheme_the_api_accepts_is_one_the_stager_supports() -> None:
    # the CRD's storageUri pattern lists the schemes; each one reaches the stager
    schemes = set(api.STORAGE_URI_PATTERN.split("(", 1)[1].split(")", 1)[0].replace("s?", "s").split("|"))
    schemes |= {"http"}
    assert schemes == staging.SUPPORTED_SCHEMES
    for uri in ("s3://b/r", "gs://b/r", "as://a/c/r", "pvc://claim/r", "https://h/r.tar.gz"):
        pod = builders.build_pod_template(OWNER, spec_of({"storageUri": uri}), REV)["spec"]
        assert [c["name"] for c in pod["initContainers"]] == ["stage-model"], uri
        assert f"--model-repository={builders.MODEL_REPO_DIR}" in pod["containers"][0]["args"], uri


# --------------------------------------------------------------------------- Services


def test_canary_services_and_selectors() -> None:
    svcs = services(spec_of())
    assert set(svcs) == {"resnet50", "resnet50-stable", "resnet50-canary"}
    base = {builders.LABEL_NAME: "resnet50", "app.kubernetes.io/component": builders.COMPONENT_SERVER}
    assert svcs["resnet50"]["spec"]["selector"] == base  # every ready revision: replica-ratio split
    assert svcs["resnet50-stable"]["spec"]["selector"] == {**base, builders.LABEL_REVISION: "stablehash"}
    assert svcs["resnet50-canary"]["spec"]["selector"] == {**base, builders.LABEL_REVISION: "candhash"}


def test_canary_service_points_at_stable_when_no_rollout() -> None:
    svcs = services(spec_of(), candidate=None)
    assert svcs["resnet50-canary"]["spec"]["selector"][builders.LABEL_REVISION] == "stablehash"
    # No split under way: the main Service serves the stable revision alone (a revision waiting out its
    # scale-down delay gets no traffic).
    assert svcs["resnet50"]["spec"]["selector"][builders.LABEL_REVISION] == "stablehash"


def test_rolling_main_service_never_pins_a_revision() -> None:
    svcs = services(spec_of(rollout={"strategy": "Rolling"}), candidate=None)
    assert builders.LABEL_REVISION not in svcs["resnet50"]["spec"]["selector"]


def test_service_selectors_match_the_pods() -> None:
    spec = spec_of()
    pod_labels = deployment(spec, rev="stablehash")["spec"]["template"]["metadata"]["labels"]
    for svc in services(spec, candidate=None).values():
        assert svc["spec"]["selector"].items() <= pod_labels.items(), svc["metadata"]["name"]


def test_blue_green_services_main_selects_stable_only() -> None:
    svcs = services(spec_of(rollout={"strategy": "BlueGreen"}))
    assert set(svcs) == {"resnet50", "resnet50-preview"}
    assert svcs["resnet50"]["spec"]["selector"][builders.LABEL_REVISION] == "stablehash"
    assert svcs["resnet50-preview"]["spec"]["selector"][builders.LABEL_REVISION] == "candhash"


def test_service_ports_type_and_annotations() -> None:
    spec = spec_of(
        service={"type": "LoadBalancer", "annotations": {"lb": "internal"}, "ports": {"metrics": False}}
    )
    svcs = services(spec)
    main = svcs["resnet50"]
    assert main["spec"]["type"] == "LoadBalancer"
    assert main["metadata"]["annotations"] == {"lb": "internal"}
    assert [(p["name"], p["port"]) for p in main["spec"]["ports"]] == [("http", 8000), ("grpc", 8001)]
    assert "type" not in svcs["resnet50-canary"]["spec"]  # direct-access Services stay ClusterIP
    assert "annotations" not in svcs["resnet50-canary"]["metadata"]


def test_all_three_ports_by_default() -> None:
    ports = services(spec_of())["resnet50"]["spec"]["ports"]
    assert [(p["name"], p["port"], p["targetPort"]) for p in ports] == [
        ("http", 8000, "http"),
        ("grpc", 8001, "grpc"),
        ("metrics", 8002, "metrics"),
    ]


def test_endpoints() -> None:
    assert builders.endpoints(OWNER, spec_of()) == {
        "http": "http://resnet50.ml.svc:8000",
        "grpc": "resnet50.ml.svc:8001",
        "metrics": "http://resnet50.ml.svc:8002/metrics",
    }


# --------------------------------------------------------------------------- HPA, PDB


def hpa_metrics(**autoscaling: Any) -> list[dict[str, Any]]:
    spec = spec_of(autoscaling={"maxReplicas": 8, **autoscaling})
    hpa = builders.build_hpa(OWNER, spec, target="resnet50-x")
    assert hpa is not None
    return hpa["spec"]["metrics"]  # type: ignore[no-any-return]


def test_no_hpa_without_autoscaling() -> None:
    assert builders.build_hpa(OWNER, spec_of(replicas=2), target="x") is None


def test_hpa_targets_the_given_deployment() -> None:
    spec = spec_of(
        autoscaling={
            "minReplicas": 2,
            "maxReplicas": 8,
            "targetCPUUtilization": 60,
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 600}},
        }
    )
    hpa = builders.build_hpa(OWNER, spec, target="resnet50-abc")
    assert hpa is not None
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "resnet50-abc",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    assert hpa["spec"]["behavior"] == {"scaleDown": {"stabilizationWindowSeconds": 600}}


def test_hpa_cpu_metric() -> None:
    assert hpa_metrics(targetCPUUtilization=70) == [
        {
            "type": "Resource",
            "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
        }
    ]


def test_hpa_queue_time_metric() -> None:
    (metric,) = hpa_metrics(queueTimeMicroseconds=5000)
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "avg_time_queue_us"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "5000"}


def test_hpa_pending_requests_metric() -> None:
    (metric,) = hpa_metrics(pendingRequests=10)
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "nv_inference_pending_request_count"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "10"}


def test_hpa_gpu_metric_is_external_and_scoped_to_the_model() -> None:
    (metric,) = hpa_metrics(gpuUtilization=80)
    assert metric["type"] == "External"
    assert metric["external"]["metric"]["name"] == "nv_gpu_utilization"
    assert metric["external"]["metric"]["selector"] == {"matchLabels": {builders.PROM_LABEL_NAME: "resnet50"}}


def test_hpa_gpu_target_is_in_tritons_unit() -> None:
    (metric,) = hpa_metrics(gpuUtilization=80)
    target = metric["external"]["target"]
    assert _quantity(target.get("averageValue", target.get("value"))) == Decimal("0.8")


def test_hpa_gpu_target_is_averaged_per_pod() -> None:
    (metric,) = hpa_metrics(gpuUtilization=80)
    assert metric["external"]["target"]["type"] == "AverageValue"


def test_hpa_all_metrics_together() -> None:
    kinds = [
        m["type"]
        for m in hpa_metrics(
            targetCPUUtilization=50, queueTimeMicroseconds=1, pendingRequests=1, gpuUtilization=50
        )
    ]
    assert kinds == ["Resource", "Pods", "Pods", "External"]


@pytest.mark.parametrize(("floor", "expected"), [(None, 2), (0, 2), (1, 2), (5, 5), (8, 8), (50, 8)])
def test_hpa_min_floor_during_rollout(floor: int | None, expected: int) -> None:
    """The floor can be raised (frozen during a rollout), never below minReplicas nor above maxReplicas."""
    spec = spec_of(autoscaling={"minReplicas": 2, "maxReplicas": 8, "targetCPUUtilization": 50})
    hpa = builders.build_hpa(OWNER, spec, target="t", min_replicas=floor)
    assert hpa is not None and hpa["spec"]["minReplicas"] == expected
    assert hpa["spec"]["maxReplicas"] == 8


def test_pdb() -> None:
    assert builders.build_pdb(OWNER, spec_of()) is None
    assert builders.build_pdb(OWNER, spec_of(podDisruptionBudget={"enabled": False})) is None
    default = builders.build_pdb(OWNER, spec_of(podDisruptionBudget={}))
    assert default is not None
    assert default["apiVersion"] == "policy/v1"
    assert default["spec"]["maxUnavailable"] == 1
    assert default["spec"]["selector"]["matchLabels"] == {
        builders.LABEL_NAME: "resnet50",
        "app.kubernetes.io/component": builders.COMPONENT_SERVER,
    }
    min_av = builders.build_pdb(OWNER, spec_of(podDisruptionBudget={"minAvailable": 2}))
    assert (
        min_av is not None and min_av["spec"]["minAvailable"] == 2 and "maxUnavailable" not in min_av["spec"]
    )


# --------------------------------------------------------------------------- Rolling


def test_rolling_uses_one_deployment_named_after_the_model_deployment() -> None:
    spec = spec_of(rollout={"strategy": "Rolling"})
    a, b = deployment(spec, rev="aaaaaaaaaa"), deployment(spec, rev="bbbbbbbbbb")
    assert a["metadata"]["name"] == b["metadata"]["name"] == "resnet50"
    # the selector is immutable: it must not carry the revision, so the Deployment is updated in place
    assert (
        a["spec"]["selector"] == b["spec"]["selector"] == {"matchLabels": {builders.LABEL_NAME: "resnet50"}}
    )
    assert a["spec"]["template"] != b["spec"]["template"]


def test_rolling_with_gpus_never_drops_a_pod() -> None:
    spec = spec_of(rollout={"strategy": "Rolling"}, server={"resources": {"limits": {"nvidia.com/gpu": "1"}}})
    strategy = deployment(spec)["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0
    assert strategy["rollingUpdate"]["maxSurge"] >= 1


def test_rolling_honours_explicit_surge_and_unavailable() -> None:
    spec = spec_of(
        rollout={"strategy": "Rolling", "maxSurge": 2, "maxUnavailable": 1},
        server={"resources": {"limits": {"nvidia.com/gpu": "1"}}},
    )
    assert deployment(spec)["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 2, "maxUnavailable": 1}


def test_rolling_never_gets_a_deadlocked_strategy() -> None:
    spec = spec_of(rollout={"strategy": "Rolling", "maxSurge": 0, "maxUnavailable": 0})
    ru = deployment(spec)["spec"]["strategy"]["rollingUpdate"]
    assert ru["maxSurge"] + ru["maxUnavailable"] > 0  # the API server refuses 0/0


def test_canary_deployment_selector_carries_the_revision() -> None:
    dep = deployment()
    assert dep["spec"]["selector"]["matchLabels"] == {
        builders.LABEL_NAME: "resnet50",
        builders.LABEL_REVISION: REV,
    }


def test_routes_split_exact_weights_between_stable_and_canary_services() -> None:
    spec = spec_of(rollout={"gateway": {"parentRefs": [{"name": "gw"}], "grpc": True}})
    http, grpc = builders.build_routes(OWNER, spec, weight=30)
    assert http["kind"] == "HTTPRoute" and grpc["kind"] == "GRPCRoute"
    assert http["spec"]["rules"][0]["backendRefs"] == [
        {"name": "resnet50-stable", "port": 8000, "weight": 70},
        {"name": "resnet50-canary", "port": 8000, "weight": 30},
    ]
    assert [b["port"] for b in grpc["spec"]["rules"][0]["backendRefs"]] == [8001, 8001]
    assert http["metadata"]["ownerReferences"][0]["controller"] is True
    assert builders.build_routes(OWNER, spec_of(), weight=30) == []
