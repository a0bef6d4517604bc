"""What a ModelDeployment becomes: pure builders of every child object.

Each builder takes the parsed spec plus the facts it needs (revision, replicas,
which revision is stable) and returns a plain dict ready for server-side apply.
Nothing here talks to the cluster; ``modeldeploy render`` prints these objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import api
from ..api import LABEL_NAME, MANAGER
from ..triton import config as tritonconfig

LABEL_REVISION = "modeldeploy.io/revision"
PROM_LABEL_NAME = "modeldeploy_io_name"  # LABEL_NAME as Prometheus relabels pod labels
ANNOTATION_REVISION_NUMBER = "modeldeploy.io/revision-number"
COMPONENT_SERVER = "triton-server"

HTTP_PORT, GRPC_PORT, METRICS_PORT = 8000, 8001, 8002
MODEL_REPO_DIR = "/models"
CREDENTIALS_DIR = "/var/run/secrets/modeldeploy/storage"
CONFIG_DIR = "/etc/modeldeploy/config"
PVC_MOUNT_DIR = "/mnt/model-pvc"
# Schemes Triton is left to read itself: none. The stager fetches every scheme (measured reasons in
# docs/storage.md: Triton's as:// cannot use any endpoint but *.blob.core.windows.net and aborts when
# that fails; its s3:// ignores AWS_ENDPOINT_URL; and credentials would sit in the container that runs
# the model's code).
DEFAULT_STAGER_IMAGE = "ghcr.io/modeldeploy/operator:0.1.0"
# A terminating pod leaves the Services' endpoints a beat after it is marked (EndpointSlice controller,
# then every kube-proxy or load balancer). Until then new connections still reach it: Triton keeps
# serving that long (preStop sleep), then gets SIGTERM and finishes what is in flight.
DEFAULT_DRAIN_SECONDS = api.DEFAULT_DRAIN_SECONDS
TRITON_SHUTDOWN_SECONDS = 30  # tritonserver's --exit-timeout-secs default


@dataclass(frozen=True)
class Owner:
    """The ModelDeployment that owns the children."""

    name: str
    namespace: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def model_name(owner: Owner, spec: api.ModelDeploymentSpec) -> str:
    return spec.model.name or owner.name


def common_labels(owner: Owner, spec: api.ModelDeploymentSpec, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "triton-inference-server",
        "app.kubernetes.io/instance": owner.name,
        "app.kubernetes.io/version": str(spec.model.version),
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGER,
        LABEL_NAME: owner.name,
    }


def revision_labels(owner: Owner, spec: api.ModelDeploymentSpec, rev: str) -> dict[str, str]:
    return {**common_labels(owner, spec, COMPONENT_SERVER), LABEL_REVISION: rev}


def _meta(
    owner: Owner, name: str, labels: dict[str, str], annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels,
        "ownerReferences": [owner.reference()],
    }
    if annotations:
        meta["annotations"] = annotations
    return meta


# --------------------------------------------------------------------------- names


def deployment_name(owner: Owner, rev: str, strategy: api.Strategy) -> str:
    """Rolling updates one Deployment in place; the others get one per revision."""
    return owner.name if strategy == api.Strategy.rolling else f"{owner.name}-{rev}"


def config_map_name(owner: Owner, rev: str) -> str:
    return f"{owner.name}-{rev}-config"


def service_names(owner: Owner, strategy: api.Strategy) -> dict[str, str]:
    """Role -> Service name. ``main`` carries the serving traffic."""
    if strategy == api.Strategy.blue_green:
        return {"main": owner.name, "preview": f"{owner.name}-preview"}
    return {"main": owner.name, "stable": f"{owner.name}-stable", "canary": f"{owner.name}-canary"}


# --------------------------------------------------------------------------- pods


def repository_path(spec: api.ModelDeploymentSpec) -> str:
    """Where Triton finds the repository: every scheme is staged there by the init container (Triton's
    own cloud storage cannot be given a CA or a private endpoint per model; see docs/storage.md)."""
    return MODEL_REPO_DIR


def pvc_claim(spec: api.ModelDeploymentSpec) -> tuple[str, str] | None:
    """('claim', 'sub/path') for pvc:// URIs."""
    if spec.model.scheme != "pvc":
        return None
    rest = spec.model.storage_uri.split("://", 1)[1]
    claim, _, path = rest.partition("/")
    return claim, path


def triton_args(owner: Owner, spec: api.ModelDeploymentSpec) -> list[str]:
    return [
        "tritonserver",
        f"--model-repository={repository_path(spec)}",
        "--model-control-mode=explicit",
        f"--load-model={model_name(owner, spec)}",
        "--strict-readiness=true",
        "--exit-on-error=true",
        f"--http-port={HTTP_PORT}",
        f"--grpc-port={GRPC_PORT}",
        f"--metrics-port={METRICS_PORT}",
        "--allow-metrics=true",
        *spec.server.args,
    ]


def _env(items: list[api.EnvVar]) -> list[dict[str, Any]]:
    return [e.model_dump(by_alias=True, exclude_none=True) for e in items]


def _probe(path: str, *, period: int, failures: int, initial: int = 0, timeout: int = 5) -> dict[str, Any]:
    probe: dict[str, Any] = {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": timeout,
    }
    if initial:
        probe["initialDelaySeconds"] = initial
    return probe


RESTRICTED_CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
RESTRICTED_POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 1000,
    "fsGroup": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def build_pod_template(
    owner: Owner, spec: api.ModelDeploymentSpec, rev: str, *, stager_image: str = DEFAULT_STAGER_IMAGE
) -> dict[str, Any]:
    """The pod of one revision: the stager (init container) fills an emptyDir with the one model
    version asked for, then Triton serves it from there."""
    server = spec.server
    drain = DEFAULT_DRAIN_SECONDS if server.drain_seconds is None else server.drain_seconds
    stager = _stager_container(owner, spec, rev, stager_image)
    pod_spec: dict[str, Any] = {
        "containers": [_triton_container(owner, spec, drain)],
        "volumes": _volumes(owner, spec, rev),
        "securityContext": RESTRICTED_POD_SECURITY,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": drain + TRITON_SHUTDOWN_SECONDS,
        "initContainers": [stager],
    }
    if server.node_selector:
        pod_spec["nodeSelector"] = dict(server.node_selector)
    if server.tolerations:
        pod_spec["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in server.tolerations]
    if server.affinity:
        pod_spec["affinity"] = server.affinity
    if server.topology_spread_constraints:
        pod_spec["topologySpreadConstraints"] = server.topology_spread_constraints
    if server.service_account_name:
        pod_spec["serviceAccountName"] = server.service_account_name
    if server.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in server.image_pull_secrets]
    labels = {**(server.pod_labels or {}), **revision_labels(owner, spec, rev)}
    annotations = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(METRICS_PORT),
        **(server.pod_annotations or {}),
    }
    return {"metadata": {"labels": labels, "annotations": annotations}, "spec": pod_spec}


def _volumes(owner: Owner, spec: api.ModelDeploymentSpec, rev: str) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.server.shm_size}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if spec.model.credentials_secret:
        volumes.append(
            {"name": "storage-credentials", "secret": {"secretName": spec.model.credentials_secret}}
        )
    claim = pvc_claim(spec)
    if claim:
        volumes.append(
            {"name": "model-pvc", "persistentVolumeClaim": {"claimName": claim[0], "readOnly": True}}
        )
    volumes.append({"name": "models", "emptyDir": {}})
    if spec.model.config is not None:
        volumes.append({"name": "model-config", "configMap": {"name": config_map_name(owner, rev)}})
    return volumes


def _stager_container(owner: Owner, spec: api.ModelDeploymentSpec, rev: str, image: str) -> dict[str, Any]:
    """The init container that stages the model version (the operator image's ``stage`` command)."""
    # /tmp: scratch space (a downloaded archive before it is unpacked); the root filesystem is read-only
    mounts: list[dict[str, Any]] = [
        {"name": "models", "mountPath": MODEL_REPO_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    args = [
        "stage",
        f"--uri={spec.model.storage_uri}",
        f"--dest={MODEL_REPO_DIR}",
        f"--model={model_name(owner, spec)}",
        f"--version={spec.model.version}",
    ]
    if spec.model.config is not None:
        mounts.append({"name": "model-config", "mountPath": CONFIG_DIR, "readOnly": True})
        args.append(f"--config={CONFIG_DIR}/config.pbtxt")
    if pvc_claim(spec):
        mounts.append({"name": "model-pvc", "mountPath": PVC_MOUNT_DIR, "readOnly": True})
        args.append(f"--pvc-root={PVC_MOUNT_DIR}")
    if spec.model.credentials_secret:
        mounts.append({"name": "storage-credentials", "mountPath": CREDENTIALS_DIR, "readOnly": True})
        args.append(f"--credentials-dir={CREDENTIALS_DIR}")
    stager: dict[str, Any] = {
        "name": "stage-model",
        "image": image,
        "args": args,
        "volumeMounts": mounts,
        "securityContext": RESTRICTED_CONTAINER_SECURITY,
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
        # the stager's error line becomes the termination message the operator reports
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if spec.server.env:
        # storage settings given as server env (AWS_REGION, an endpoint...) reach the stager too
        stager["env"] = _env(spec.server.env)
    return stager


def _triton_container(owner: Owner, spec: api.ModelDeploymentSpec, drain: int) -> dict[str, Any]:
    server = spec.server
    ready_path = f"/v2/models/{model_name(owner, spec)}/versions/{spec.model.version}/ready"
    container: dict[str, Any] = {
        "name": "triton",
        "image": server.image,
        "args": triton_args(owner, spec),
        "ports": [
            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        # A 2 s period: a model loaded in 1 s is Ready ~1 s later, not up to 10 s later (measured on the
        # real node: the pod's readiness trailed Triton's start by the whole probe period); the same
        # 600 s budget for slow loads.
        "startupProbe": _probe(ready_path, period=2, failures=300),
        "readinessProbe": _probe(ready_path, period=5, failures=3),
        "livenessProbe": _probe("/v2/health/live", period=10, failures=3),
        "volumeMounts": [
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "models", "mountPath": MODEL_REPO_DIR, "readOnly": True},
        ],
        "securityContext": RESTRICTED_CONTAINER_SECURITY,
        # Triton's last log lines (e.g. why a model failed to load) become the termination message
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if drain:
        container["lifecycle"] = {"preStop": {"sleep": {"seconds": drain}}}
    if server.image_pull_policy:
        container["imagePullPolicy"] = server.image_pull_policy
    if server.env:
        container["env"] = _env(server.env)
    if server.resources is not None:
        container["resources"] = server.resources.model_dump(by_alias=True, exclude_none=True)
    return container


def build_deployment(
    owner: Owner,
    spec: api.ModelDeploymentSpec,
    rev: str,
    *,
    revision_number: int,
    replicas: int | None,
    stager_image: str = DEFAULT_STAGER_IMAGE,
) -> dict[str, Any]:
    """The Triton Deployment of one revision. ``replicas=None`` leaves the field to the HPA."""
    strategy = spec.rollout.strategy
    selector = {LABEL_NAME: owner.name}
    if strategy != api.Strategy.rolling:
        selector[LABEL_REVISION] = rev
    max_unavailable = spec.rollout.max_unavailable
    if max_unavailable is None:
        max_unavailable = 0 if spec.gpu_count or strategy != api.Strategy.rolling else 1
    max_surge = spec.rollout.max_surge if spec.rollout.max_surge is not None else 1
    if max_surge == 0 and max_unavailable == 0:
        max_surge = 1
    dep_spec: dict[str, Any] = {
        "selector": {"matchLabels": selector},
        "strategy": {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": max_surge, "maxUnavailable": max_unavailable},
        },
        "progressDeadlineSeconds": spec.rollout.progress_deadline_seconds,
        "revisionHistoryLimit": 2,
        "template": build_pod_template(owner, spec, rev, stager_image=stager_image),
    }
    if replicas is not None:
        dep_spec["replicas"] = replicas
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(
            owner,
            deployment_name(owner, rev, strategy),
            revision_labels(owner, spec, rev),
            {ANNOTATION_REVISION_NUMBER: str(revision_number)},
        ),
        "spec": dep_spec,
    }


def build_config_map(owner: Owner, spec: api.ModelDeploymentSpec, rev: str) -> dict[str, Any] | None:
    """The rendered config.pbtxt of one revision, when the spec gives a model config."""
    if spec.model.config is None:
        return None
    text = tritonconfig.render_config_pbtxt(model_name(owner, spec), spec.model)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(owner, config_map_name(owner, rev), revision_labels(owner, spec, rev)),
        "data": {"config.pbtxt": text},
    }


# --------------------------------------------------------------------------- services


def _service_ports(spec: api.ModelDeploymentSpec) -> list[dict[str, Any]]:
    ports: list[dict[str, Any]] = []
    if spec.service.ports.http:
        ports.append({"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"})
    if spec.service.ports.grpc:
        ports.append(
            {
                "name": "grpc",
                "port": GRPC_PORT,
                "targetPort": "grpc",
                "protocol": "TCP",
                "appProtocol": "grpc",
            }
        )
    if spec.service.ports.metrics:
        ports.append({"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"})
    return ports


def build_services(
    owner: Owner, spec: api.ModelDeploymentSpec, *, stable: str, candidate: str | None
) -> list[dict[str, Any]]:
    """The main Service plus direct-access Services.

    Canary during a rollout and Rolling: the main Service selects every ready pod of the model,
    so traffic splits by replica ratio. BlueGreen: the main Service selects the active revision only;
    promotion flips it. ``NAME-stable``/``NAME-canary`` (``NAME-preview``) give direct access.
    """
    strategy = spec.rollout.strategy
    base = {LABEL_NAME: owner.name, "app.kubernetes.io/component": COMPONENT_SERVER}
    names = service_names(owner, strategy)
    selectors: dict[str, dict[str, str]] = {}
    if strategy == api.Strategy.blue_green:
        selectors["main"] = {**base, LABEL_REVISION: stable}
        selectors["preview"] = {**base, LABEL_REVISION: candidate or stable}
    else:
        # Canary with a candidate: every ready pod of the model, so traffic splits by replica ratio.
        # Otherwise the stable revision alone: a superseded revision kept for scaleDownDelaySeconds, or a
        # rolled-back candidate still terminating, gets no traffic. Rolling keeps one Deployment whose
        # pods change revision as it rolls, so its main Service never pins one.
        pin = strategy == api.Strategy.canary and candidate is None
        selectors["main"] = {**base, LABEL_REVISION: stable} if pin else base
        selectors["stable"] = {**base, LABEL_REVISION: stable}
        selectors["canary"] = {**base, LABEL_REVISION: candidate or stable}
    out = []
    for role, name in names.items():
        svc_spec: dict[str, Any] = {"selector": selectors[role], "ports": _service_ports(spec)}
        annotations = None
        if role == "main":
            svc_spec["type"] = spec.service.type
            annotations = dict(spec.service.annotations) if spec.service.annotations else None
        labels = {**common_labels(owner, spec, "service"), "modeldeploy.io/role": role}
        out.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": _meta(owner, name, labels, annotations),
                "spec": svc_spec,
            }
        )
    return out


# --------------------------------------------------------------------------- scaling


def build_hpa(
    owner: Owner, spec: api.ModelDeploymentSpec, *, target: str, min_replicas: int | None = None
) -> dict[str, Any] | None:
    """HPA on the stable Deployment. ``min_replicas`` can freeze the floor during a rollout."""
    auto = spec.autoscaling
    if auto is None:
        return None
    metrics = _hpa_metrics(owner, auto)
    floor = max(auto.min_replicas, min(min_replicas or 0, auto.max_replicas))
    hpa_spec: dict[str, Any] = {
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
        "minReplicas": floor,
        "maxReplicas": auto.max_replicas,
        "metrics": metrics,
    }
    if auto.behavior:
        hpa_spec["behavior"] = auto.behavior
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(owner, owner.name, common_labels(owner, spec, "autoscaler")),
        "spec": hpa_spec,
    }


def _pods_metric(name: str, average: int) -> dict[str, Any]:
    """A per-pod Triton metric (served to the HPA by prometheus-adapter) and its average target."""
    target = {"type": "AverageValue", "averageValue": str(average)}
    return {"type": "Pods", "pods": {"metric": {"name": name}, "target": target}}


def _hpa_metrics(owner: Owner, auto: api.AutoscalingSpec) -> list[dict[str, Any]]:
    metrics: list[dict[str, Any]] = []
    if auto.target_cpu_utilization is not None:
        target = {"type": "Utilization", "averageUtilization": auto.target_cpu_utilization}
        metrics.append({"type": "Resource", "resource": {"name": "cpu", "target": target}})
    if auto.queue_time_microseconds is not None:
        metrics.append(_pods_metric("avg_time_queue_us", auto.queue_time_microseconds))
    if auto.pending_requests is not None:
        metrics.append(_pods_metric("nv_inference_pending_request_count", auto.pending_requests))
    if auto.gpu_utilization is not None:
        selector = {"matchLabels": {PROM_LABEL_NAME: owner.name}}
        metrics.append(
            {
                "type": "External",
                "external": {
                    "metric": {"name": "nv_gpu_utilization", "selector": selector},
                    # Triton exports utilisation as 0.0-1.0 per GPU; averaged per pod.
                    "target": {"type": "AverageValue", "averageValue": f"{auto.gpu_utilization * 10}m"},
                },
            }
        )
    return metrics


def build_pdb(owner: Owner, spec: api.ModelDeploymentSpec) -> dict[str, Any] | None:
    pdb = spec.pod_disruption_budget
    if pdb is None or not pdb.enabled:
        return None
    pdb_spec: dict[str, Any] = {
        "selector": {
            "matchLabels": {LABEL_NAME: owner.name, "app.kubernetes.io/component": COMPONENT_SERVER}
        },
    }
    if pdb.min_available is not None:
        pdb_spec["minAvailable"] = pdb.min_available
    else:
        pdb_spec["maxUnavailable"] = pdb.max_unavailable if pdb.max_unavailable is not None else 1
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(owner, owner.name, common_labels(owner, spec, "disruption-budget")),
        "spec": pdb_spec,
    }


def endpoints(owner: Owner, spec: api.ModelDeploymentSpec) -> dict[str, str]:
    host = f"{owner.name}.{owner.namespace}.svc"
    out = {}
    if spec.service.ports.http:
        out["http"] = f"http://{host}:{HTTP_PORT}"
    if spec.service.ports.grpc:
        out["grpc"] = f"{host}:{GRPC_PORT}"
    if spec.service.ports.metrics:
        out["metrics"] = f"http://{host}:{METRICS_PORT}/metrics"
    return out


# --------------------------------------------------------------------------- Gateway API

ROUTE_CRDS = {
    "HTTPRoute": "httproutes.gateway.networking.k8s.io",
    "GRPCRoute": "grpcroutes.gateway.networking.k8s.io",
}


def build_routes(owner: Owner, spec: api.ModelDeploymentSpec, *, weight: int) -> list[dict[str, Any]]:
    """Exact traffic weights (Gateway API) when ``spec.rollout.gateway`` asks for them:
    ``NAME-stable`` gets ``100 - weight``, ``NAME-canary`` gets ``weight``."""
    gw = spec.rollout.gateway
    if gw is None or spec.rollout.strategy != api.Strategy.canary:
        return []
    names = service_names(owner, spec.rollout.strategy)
    weight = max(0, min(100, weight))

    def backends(port: int) -> list[dict[str, Any]]:
        return [
            {"name": names["stable"], "port": port, "weight": 100 - weight},
            {"name": names["canary"], "port": port, "weight": weight},
        ]

    route_spec: dict[str, Any] = {"parentRefs": gw.parent_refs}
    if gw.hostnames:
        route_spec["hostnames"] = list(gw.hostnames)
    labels = common_labels(owner, spec, "route")
    routes = [
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": _meta(owner, owner.name, labels),
            "spec": {**route_spec, "rules": [{"backendRefs": backends(HTTP_PORT)}]},
        }
    ]
    if gw.grpc:
        routes.append(
            {
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "GRPCRoute",
                "metadata": _meta(owner, f"{owner.name}-grpc", labels),
                "spec": {**route_spec, "rules": [{"backendRefs": backends(GRPC_PORT)}]},
            }
        )
    return routes
