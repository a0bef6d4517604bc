"""The Helm chart, offline: CRD copy, lint, rendered objects, least-privilege RBAC, monitoring,
Prometheus Adapter rules, and the Dockerfile. Needs our helm binary (``make binaries``); promtool
(Debian package ``prometheus``) for the PromQL checks. The cluster-side checks (server-side schema
validation, RBAC exercised by the real operator, Pod Security admission) are in
tests/cluster/test_chart.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from modeldeploy import __version__, api, handlers, metrics
from modeldeploy.modeldeployment import builders

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "modeldeploy-operator"
CRD_DIR = ROOT / "crds"
KUBE_VERSION = "1.35.4"
RELEASE, NAMESPACE = "md", "modeldeploy-system"


def _helm() -> str:
    from hack import localcluster

    try:
        return str(localcluster.Binaries.locate().helm)
    except localcluster.BinariesMissing:
        found = shutil.which("helm")
        if found is None:
            pytest.skip("helm not built: run `make binaries`")
        return found


@pytest.fixture(scope="module")
def helm() -> str:
    return _helm()


def run_helm(helm: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([helm, *args], capture_output=True, text=True, timeout=120, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}{proc.stdout}")
    return proc


def set_args(values: dict[str, Any] | None) -> list[str]:
    """``--set-json key=<json>`` for each value (keys are dotted paths)."""
    return [arg for k, v in (values or {}).items() for arg in ("--set-json", f"{k}={json.dumps(v)}")]


def render(
    helm: str, values: dict[str, Any] | None = None, namespace: str = NAMESPACE
) -> list[dict[str, Any]]:
    """``helm template`` (hooks included) parsed into objects."""
    out = run_helm(
        helm,
        "template",
        RELEASE,
        str(CHART),
        "-n",
        namespace,
        "--kube-version",
        KUBE_VERSION,
        *set_args(values),
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def only(objs: Sequence[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def kinds(objs: Sequence[dict[str, Any]]) -> list[str]:
    return sorted(o["kind"] for o in objs)


CLUSTER = {"rbac.scope": "cluster"}
NAMESPACED = {"rbac.scope": "namespaced", "rbac.watchNamespaces": ["team-a", "team-b"]}
MONITORING = {
    "monitoring.serviceMonitor.enabled": True,
    "monitoring.prometheusRule.enabled": True,
    "prometheusAdapterRules.enabled": True,
}
HA = {"leaderElection.enabled": True}
VALUE_SETS = {
    "default": {},
    "cluster": CLUSTER,
    "namespaced": NAMESPACED,
    "monitoring": {**NAMESPACED, **MONITORING},
    "ha": {**CLUSTER, **HA},
}


# --------------------------------------------------------------------------- chart metadata and CRD


def test_chart_crds_are_the_generated_crds() -> None:
    repo = sorted(p.name for p in CRD_DIR.glob("*.yaml"))
    chart = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert chart == repo, f"chart crds/ holds {chart}, crds/ holds {repo}: run `make chart-crds`"
    for name in repo:
        assert (CHART / "crds" / name).read_bytes() == (CRD_DIR / name).read_bytes(), (
            f"charts/modeldeploy-operator/crds/{name} differs from crds/{name}: run `make chart-crds`"
        )


def test_chart_metadata_matches_the_package() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["kubeVersion"] == ">=1.30.0-0"
    assert chart["appVersion"] == __version__
    # The operator's built-in stager image default is the chart's default operator image.
    assert f"{values['image']['repository']}:{chart['appVersion']}" == builders.DEFAULT_STAGER_IMAGE


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_lint_strict(helm: str, name: str) -> None:
    out = run_helm(
        helm, "lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION, *set_args(VALUE_SETS[name])
    )
    assert "0 chart(s) failed" in out.stdout


# --------------------------------------------------------------------------- the operator Deployment


def test_default_render_objects(helm: str) -> None:
    objs = render(helm)
    assert kinds(objs) == [
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Job",
        "Service",
        "ServiceAccount",
    ]
    for obj in objs:
        labels = obj["metadata"]["labels"]
        assert (
            labels["app.kubernetes.io/instance"] == RELEASE
            and labels["app.kubernetes.io/managed-by"] == "Helm"
        )
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == NAMESPACE


def test_operator_deployment(helm: str) -> None:
    objs = render(helm)
    dep = only(objs, "Deployment")
    spec = dep["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == only(objs, "ServiceAccount")["metadata"]["name"]
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "fsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    (c,) = pod["containers"]
    assert c["command"] == ["modeldeploy-operator"]
    assert c["args"] == ["run", "--standalone", "--all-namespaces", "--liveness=http://0.0.0.0:8080/healthz"]
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["MODELDEPLOY_STAGER_IMAGE"] == c["image"] == f"ghcr.io/modeldeploy/operator:{__version__}"
    assert env["MODELDEPLOY_METRICS_PORT"] == "8383"
    assert "MODELDEPLOY_DISABLE_CLUSTER_SCANNING" not in env and "MODELDEPLOY_PROMETHEUS_URL" not in env
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"health": 8080, "metrics": 8383}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}, probe
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert {v["name"]: v for v in pod["volumes"]}["tmp"]["emptyDir"]

    svc = only(objs, "Service")
    assert svc["spec"]["ports"] == [
        {"name": "metrics", "port": 8383, "targetPort": "metrics", "protocol": "TCP"}
    ]
    pod_labels = spec["template"]["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()


def test_image_digest_stager_and_knobs(helm: str) -> None:
    digest = "sha256:" + "a" * 64
    values = {
        "image.digest": digest,
        "stagerImage": "registry.example/stager:1",
        "operator.logLevel": "debug",
        "operator.extraArgs": ["--peering-timeout=1"],
        "metrics.port": 9100,
        "operator.prometheusUrl": "http://prometheus.monitoring.svc:9090",
        "operator.extraEnv": [{"name": "X", "value": "1"}],
        "fullnameOverride": "mdop",
    }
    dep = only(render(helm, values), "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["image"] == f"ghcr.io/modeldeploy/operator@{digest}"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["MODELDEPLOY_STAGER_IMAGE"] == "registry.example/stager:1"
    assert env["MODELDEPLOY_METRICS_PORT"] == "9100" and env["X"] == "1"
    assert env["MODELDEPLOY_PROMETHEUS_URL"] == "http://prometheus.monitoring.svc:9090"
    assert c["args"][-2:] == ["--debug", "--peering-timeout=1"]
    assert dep["metadata"]["name"] == "mdop"


def test_namespaced_scope(helm: str) -> None:
    objs = render(helm, NAMESPACED)
    assert not [o for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    roles = {o["metadata"]["namespace"]: o for o in objs if o["kind"] == "Role"}
    bindings = {o["metadata"]["namespace"]: o for o in objs if o["kind"] == "RoleBinding"}
    assert set(roles) == set(bindings) == {"team-a", "team-b"}
    sa = only(objs, "ServiceAccount")["metadata"]
    for ns, rb in bindings.items():
        assert rb["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": roles[ns]["metadata"]["name"],
        }
        assert rb["subjects"] == [{"kind": "ServiceAccount", "name": sa["name"], "namespace": NAMESPACE}]
    (c,) = only(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert c["args"][:4] == ["run", "--standalone", "--namespace=team-a", "--namespace=team-b"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["MODELDEPLOY_DISABLE_CLUSTER_SCANNING"] == "true"

    # Without a list: the release namespace only.
    objs = render(helm, {"rbac.scope": "namespaced"})
    assert [o["metadata"]["namespace"] for o in objs if o["kind"] == "Role"] == [NAMESPACE]
    (c,) = only(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert f"--namespace={NAMESPACE}" in c["args"] and "--all-namespaces" not in c["args"]


def test_leader_election(helm: str) -> None:
    off = render(helm)
    (c,) = only(off, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert not [e for e in c["env"] if "LEADER" in e["name"] or "LEASE" in e["name"]]
    assert not [o for o in off if "leader-election" in o["metadata"]["name"]]

    objs = render(helm, {**HA, "leaderElection.replicas": 3, "leaderElection.leaseSeconds": 20})
    dep = only(objs, "Deployment")
    assert dep["spec"]["replicas"] == 3
    assert dep["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    lease = dep["metadata"]["name"]
    assert env["MODELDEPLOY_LEADER_ELECTION"] == "true"
    assert env["MODELDEPLOY_LEASE_NAMESPACE"] == NAMESPACE and env["MODELDEPLOY_LEASE_NAME"] == lease
    assert env["MODELDEPLOY_LEASE_SECONDS"] == "20"
    assert "--standalone" in c["args"], "our own leader election, never kopf peering"
    roles = [o for o in objs if o["kind"] == "Role"]
    (role,) = roles
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": [lease],
            "verbs": ["get", "update"],
        },
    ]
    (rb,) = [o for o in objs if o["kind"] == "RoleBinding"]
    assert rb["roleRef"]["name"] == role["metadata"]["name"]
    assert rb["subjects"][0]["name"] == only(objs, "ServiceAccount")["metadata"]["name"]


def test_rbac_create_false_and_existing_service_account(helm: str) -> None:
    objs = render(helm, {"rbac.create": False, "serviceAccount.create": False, "serviceAccount.name": "ops"})
    assert kinds(objs) == ["Deployment", "Job", "Service"]
    assert only(objs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "ops"
    bad = run_helm(
        helm,
        "template",
        RELEASE,
        str(CHART),
        "--kube-version",
        KUBE_VERSION,
        "--set",
        "serviceAccount.create=false",
        check=False,
    )
    assert bad.returncode != 0 and "serviceAccount.name is required" in bad.stderr


# --------------------------------------------------------------------------- least privilege

WRITE_VERBS = {
    "create",
    "update",
    "patch",
    "delete",
    "deletecollection",
    "escalate",
    "bind",
    "impersonate",
    "approve",
}
# What the operator may write, and how (everything else is read-only or absent).
ALLOWED_WRITES: dict[tuple[str, str], set[str]] = {
    ("apps", "deployments"): {"create", "patch", "delete"},
    ("", "services"): {"create", "patch", "delete"},
    ("", "configmaps"): {"create", "patch", "delete"},
    ("autoscaling", "horizontalpodautoscalers"): {"create", "patch", "delete"},
    ("policy", "poddisruptionbudgets"): {"create", "patch", "delete"},
    ("modeldeploy.io", "modeldeployments/status"): {"patch"},
    ("modeldeploy.io", "modeldeployments/finalizers"): {"update"},
    ("modeldeploy.io", "batchinferences/status"): {"patch"},
    ("modeldeploy.io", "batchinferences/finalizers"): {"update"},
    ("batch", "jobs"): {"create", "patch"},  # created once; removed by garbage collection, not by us
    ("", "events"): {"create"},
    ("coordination.k8s.io", "leases"): {"create", "update"},  # leader election only
}


NEVER_GRANTED = [
    ("", "namespaces"),
    ("", "nodes"),
    ("", "pods/exec"),
    ("", "serviceaccounts"),
    ("", "serviceaccounts/token"),
    ("rbac.authorization.k8s.io", "roles"),
    ("rbac.authorization.k8s.io", "clusterroles"),
]


def grants(rules: Sequence[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        assert not rule.get("nonResourceURLs"), rule
        # Names only pin the Lease; no other rule is (or needs to be) limited by name.
        assert not rule.get("resourceNames") or rule["resources"] == ["leases"], rule
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                out.setdefault((group, res), set()).update(rule["verbs"])
    return out


def role_rules(objs: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The operator's rule sets (the leader-election Role is checked on its own)."""
    return [
        o["rules"]
        for o in objs
        if o["kind"] in ("ClusterRole", "Role") and not o["metadata"]["name"].endswith("-leader-election")
    ]


@pytest.mark.parametrize("scope", ["cluster", "namespaced"])
def test_rbac_is_least_privilege(helm: str, scope: str) -> None:
    objs = render(helm, {**(CLUSTER if scope == "cluster" else NAMESPACED), **HA})
    all_rules = [o["rules"] for o in objs if o["kind"] in ("ClusterRole", "Role")]
    assert len(all_rules) == (2 if scope == "cluster" else 3)
    for rules in all_rules:
        for rule in rules:
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[key] and not any("*" in v for v in rule[key]), rule
        g = grants(rules)
        for key, verbs in g.items():
            writes = verbs & WRITE_VERBS
            assert writes <= ALLOWED_WRITES.get(key, set()), f"unexpected write verbs {writes} on {key}"
    for rules in role_rules(objs):
        g = grants(rules)
        assert g[("", "secrets")] == {"get"}, "Secrets: existence checks only (no list/watch/write)"
        assert g[("", "persistentvolumeclaims")] == {"get"}
        assert g[("", "pods")] == {"list", "watch"}, "pods are created by Deployments, never by the operator"
        assert ("coordination.k8s.io", "leases") not in g, "Leases only in the leader-election Role"
        for forbidden in NEVER_GRANTED:
            assert forbidden not in g
        crd = g.get(("apiextensions.k8s.io", "customresourcedefinitions"))
        if scope == "cluster":
            assert crd == {"list", "watch"}
        else:
            assert crd is None and not any(res for (_, res) in g if res == "namespaces")


@pytest.mark.parametrize("scope", ["cluster", "namespaced"])
def test_rbac_covers_what_the_operator_does(helm: str, scope: str) -> None:
    """Derived from the operator's code, so a new child kind without a rule fails here."""
    (rules, *_) = role_rules(render(helm, CLUSTER if scope == "cluster" else NAMESPACED))
    g = grants(rules)
    for group, _version, plural in handlers.CHILD_RESOURCES:  # kopf watches these, labelled managed-by
        assert {"list", "watch"} <= g[(group, plural)], plural
    for group, _v, plural in handlers.CHILD_RESOURCES:
        if plural not in ("pods", "jobs"):  # applied, read on a cache miss, deleted when stale
            assert {"get", "create", "patch", "delete"} <= g[(group, plural)], plural
    assert {"get", "create", "patch"} <= g[("batch", "jobs")]  # a BatchInference's Job: created once
    assert {"list", "watch"} <= g[(api.GROUP, "batchinferences")]
    assert "patch" in g[(api.GROUP, "batchinferences/status")]
    assert {"list", "watch"} <= g[(api.GROUP, api.PLURAL)]
    assert "patch" in g[(api.GROUP, f"{api.PLURAL}/status")]
    assert "create" in g[("", "events")]
    assert "get" in g[("", "secrets")] and "get" in g[("", "persistentvolumeclaims")]


# --------------------------------------------------------------------------- monitoring


def test_monitoring_off_by_default_and_on_when_enabled(helm: str) -> None:
    assert not {"ServiceMonitor", "PrometheusRule", "ConfigMap"} & set(kinds(render(helm)))
    objs = render(helm, MONITORING)
    sm, svc = only(objs, "ServiceMonitor"), only(objs, "Service")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    bad = run_helm(
        helm,
        "template",
        RELEASE,
        str(CHART),
        "--kube-version",
        KUBE_VERSION,
        "--set",
        "monitoring.serviceMonitor.enabled=true",
        "--set",
        "metrics.service.enabled=false",
        check=False,
    )
    assert bad.returncode != 0 and "needs metrics.service.enabled" in bad.stderr


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    return found


def _check_rules(tmp_path: Path, groups: list[dict[str, Any]]) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    proc = subprocess.run(
        [_promtool(), "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def exported_metric_names() -> set[str]:
    """Series names the operator process exports (its module-level prometheus_client metrics)."""
    from prometheus_client import REGISTRY

    assert metrics.RECONCILES is not None  # imported: registered
    names: set[str] = set()
    for family in REGISTRY.collect():
        if family.name.startswith("modeldeploy_"):
            names.add(family.name)
            names.add(f"{family.name}_total" if family.type == "counter" else family.name)
    return names


def test_prometheus_rule(helm: str, tmp_path: Path) -> None:
    values = {**MONITORING, "monitoring.prometheusRule.additionalRules": [{"record": "x:y", "expr": "up"}]}
    pr = only(render(helm, values), "PrometheusRule")
    (group,) = pr["spec"]["groups"]
    alerts = {r["alert"]: r for r in group["rules"] if "alert" in r}
    assert set(alerts) == {
        "ModelDeploymentRolledBack", "ModelDeploymentFailed", "ModelDeploymentDegraded",
        "ModelDeployReconcileErrors", "ModelDeployOperatorDown",
    }  # fmt: skip
    assert "modeldeploy_rollbacks_total" in alerts["ModelDeploymentRolledBack"]["expr"]
    assert 'phase="Failed"' in alerts["ModelDeploymentFailed"]["expr"]
    assert 'phase="Degraded"' in alerts["ModelDeploymentDegraded"]["expr"]
    assert group["rules"][-1] == {"record": "x:y", "expr": "up"}
    # Every series the alerts use is one the operator exports.
    exported = exported_metric_names()
    used = set(
        re.findall(r"modeldeploy_[a-z_]+", " ".join(r["expr"] for r in group["rules"] if "alert" in r))
    )
    assert used and used <= exported, used - exported
    assert all(r["labels"]["severity"] for r in alerts.values())
    _check_rules(tmp_path, pr["spec"]["groups"])


def test_prometheus_adapter_rules(helm: str, tmp_path: Path) -> None:
    objs = render(
        helm, {"prometheusAdapterRules.enabled": True, "prometheusAdapterRules.namespace": "monitoring"}
    )
    cm = only(objs, "ConfigMap")
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["name"] == f"{RELEASE}-modeldeploy-operator-prometheus-adapter-rules"
    config = yaml.safe_load(cm["data"]["config.yaml"])
    served = {r["name"]["as"]: r for r in config["rules"]}

    # The names are exactly the Pods metrics the operator's HPAs ask for.
    spec = api.ModelDeploymentSpec.model_validate(
        {
            "model": {"format": "onnx", "storageUri": "s3://b/m", "version": 1},
            "autoscaling": {
                "minReplicas": 1,
                "maxReplicas": 3,
                "queueTimeMicroseconds": 500,
                "pendingRequests": 4,
            },
        }
    )
    hpa = builders.build_hpa(builders.Owner(name="m", namespace="ns", uid="u"), spec, target="m-x")
    assert hpa is not None
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert wanted == {"avg_time_queue_us", "nv_inference_pending_request_count"} == set(served)
    for rule in served.values():
        assert rule["resources"]["overrides"] == {
            "namespace": {"resource": "namespace"},
            "pod": {"resource": "pod"},
        }
        assert re.fullmatch(rule["name"]["matches"], rule["seriesQuery"].split("{")[0])
    assert "nv_inference_request_success" in served["avg_time_queue_us"]["metricsQuery"]

    # The queries are valid PromQL once the adapter fills its template in.
    def fill(q: str) -> str:
        return q.replace("<<.LabelMatchers>>", 'namespace="ns",pod=~"a|b"').replace("<<.GroupBy>>", "pod")

    _check_rules(
        tmp_path,
        [{"name": "adapter", "rules": [
            {"record": f"check:{name}", "expr": fill(r["metricsQuery"])} for name, r in served.items()
        ] + [{"record": f"series:{name}", "expr": r["seriesQuery"]} for name, r in served.items()]}],
    )  # fmt: skip


# --------------------------------------------------------------------------- test hook and schema


def test_helm_test_hook(helm: str) -> None:
    objs = render(helm)
    job, svc, dep = only(objs, "Job"), only(objs, "Service"), only(objs, "Deployment")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "test"
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert pod["securityContext"] == dep["spec"]["template"]["spec"]["securityContext"]
    (c,) = pod["containers"]
    assert c["securityContext"] == dep["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    assert c["image"] == dep["spec"]["template"]["spec"]["containers"][0]["image"]
    script = c["args"][0]
    assert f"http://{svc['metadata']['name']}.{NAMESPACE}.svc:8383/metrics" in script
    compile(script, "<helm-test>", "exec")  # the script the Job runs is valid Python
    assert "Job" not in kinds(render(helm, {"tests.enabled": False}))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"bogus": 1}, "additional properties 'bogus' not allowed"),
        ({"rbac.scope": "everything"}, "value must be one of"),
        ({"rbac.watchNamespaces": ["Not_A_Namespace"]}, "/rbac/watchNamespaces/0"),
        ({"image.digest": "latest"}, "/image/digest"),
        ({"operator.logLevel": "loud"}, "/operator/logLevel"),
        ({"monitoring.serviceMonitor.interval": "often"}, "/monitoring/serviceMonitor/interval"),
        ({"prometheusAdapterRules.rules": [{"seriesQuery": "x"}]}, "metricsQuery"),
    ],
)
def test_schema_rejects_bad_values(helm: str, values: dict[str, Any], message: str) -> None:
    proc = run_helm(
        helm, "template", RELEASE, str(CHART), "--kube-version", KUBE_VERSION, *set_args(values), check=False
    )
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_values_yaml_is_documented() -> None:
    """Every top-level key in values.yaml has a comment right above it or is a documented group."""
    text = (CHART / "values.yaml").read_text().splitlines()
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load("\n".join(text))
    assert set(values) == set(schema["properties"]), "values.yaml and values.schema.json disagree on keys"
    for key, prop in schema["properties"].items():
        if prop.get("type") != "object" or "properties" not in prop:
            assert prop.get("description"), f"schema property {key} has no description"


# --------------------------------------------------------------------------- Dockerfile


def _dockerfile() -> list[tuple[str, str]]:
    lines, buf = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        if raw.lstrip().startswith("#") and not buf:
            continue
        buf += raw.rstrip("\\").strip() + " " if raw.rstrip().endswith("\\") else raw.strip()
        if not raw.rstrip().endswith("\\"):
            if buf.strip():
                instr, _, rest = buf.strip().partition(" ")
                lines.append((instr.upper(), rest.strip()))
            buf = ""
    return lines


def test_dockerfile() -> None:
    instrs = _dockerfile()
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[1] for i, rest in instrs if i == "ARG" and "=" in rest}
    bases = [rest.split()[0] for i, rest in instrs if i == "FROM"]
    assert bases, "no FROM"
    for base in bases:
        image = args.get(base.strip("${}"), base) if base.startswith("$") else base
        # A pinned patch release of a slim Debian image (no :latest, no floating 3.11).
        assert re.fullmatch(r"python:3\.\d+\.\d+-slim-[a-z]+", image), image
    users = [rest for i, rest in instrs if i == "USER"]
    assert users, "the image must not run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) == 65532, "numeric non-root uid (runAsNonRoot can check it)"
    assert [i for i, _ in instrs].index("USER") > max(n for n, (i, _) in enumerate(instrs) if i == "FROM")
    (entrypoint,) = [json.loads(rest) for i, rest in instrs if i == "ENTRYPOINT"]
    (cmd,) = [json.loads(rest) for i, rest in instrs if i == "CMD"]
    # The stager init container runs the operator image with args `stage ...` and no command, so the
    # entrypoint must be the CLI that has the `stage` subcommand; CMD runs the operator.
    assert entrypoint == ["modeldeploy"]
    spec = api.ModelDeploymentSpec.model_validate(
        {"model": {"format": "onnx", "storageUri": "pvc://claim/repo", "version": 1}}
    )
    dep = builders.build_deployment(
        builders.Owner(name="m", namespace="ns", uid="u"), spec, "r", revision_number=1, replicas=1
    )
    (init,) = dep["spec"]["template"]["spec"]["initContainers"]
    assert "command" not in init and init["args"][0] == "stage"
    assert cmd[:3] == ["run", "--standalone", "--all-namespaces"]  # `modeldeploy run` == the operator
    assert "modeldeploy-operator" in (ROOT / "pyproject.toml").read_text()
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") :] and {"!pyproject.toml", "!README.md", "!operator/"} <= set(ignore)
