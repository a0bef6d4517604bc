"""The Helm chart against the real local control plane.

* every rendered manifest (default, cluster scope, namespaced scope, monitoring on) passes the
  API server's own schema validation (``kubectl apply --dry-run=server --validate=strict``);
* the chart installs (``helm install --wait``: kwok makes the operator pod Ready) and ``helm test``
  passes;
* the chart's RBAC is enough, and no more: the REAL operator runs here under the chart's
  ServiceAccount (a TokenRequest token in its own kubeconfig), with the namespace arguments the
  chart gives it, and takes a ModelDeployment through create -> version bump -> delete with no
  request denied; ``kubectl auth can-i`` shows what it cannot do; both for ``rbac.scope=cluster``
  and ``namespaced``;
* Pod Security ``restricted``: the operator pod, the test hook and the Triton pods the operator
  creates are all admitted in namespaces that enforce it.

Static checks of the same chart (lint, rendered shapes, rule lists) are in
tests/tools/test_chart_render.py.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import MD, model_deployment
from kube import Cluster, unique_name, wait_for
from operator_proc import OperatorProcess

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "modeldeploy-operator"
CRD_NAME = "modeldeployments.modeldeploy.io"
FAST_CANARY = {"steps": [{"weight": 50}, {"weight": 100}], "scaleDownDelaySeconds": 0}
# Kinds whose CRDs (prometheus-operator's) this cluster does not have: checked offline instead.
NOT_SERVED = {"ServiceMonitor", "PrometheusRule"}
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}
# With namespaced RBAC kopf may not list namespaces or watch CRDs. Unless the operator turns kopf's
# cluster scanning off (settings.scanning.disabled, from the env MODELDEPLOY_DISABLE_CLUSTER_SCANNING
# the chart sets in namespaced scope), kopf retries those requests for about a minute, logging each
# 403 at ERROR, then falls back to treating the -n names as existing namespaces. Those refusals
# (and only those) are tolerated while the operator lacks the switch.
SCANNING_SWITCH = "MODELDEPLOY_DISABLE_CLUSTER_SCANNING"
CLUSTER_SCANNING = re.compile(
    r"GET \S+/api/v1/namespaces(\?\S*)? "
    r"|GET \S+/apis/apiextensions\.k8s\.io/v1/customresourcedefinitions(\?\S*)? "
    r"|Not enough permissions to (list namespaces|watch for namespaces|watch for resources)"
)


def operator_has(env_name: str) -> bool:
    """Whether the operator reads this environment variable (the chart may set it before the
    operator has learnt it; the tests then check what it does only once it does)."""
    from modeldeploy import handlers

    return env_name in Path(handlers.__file__).read_text()


def operator_disables_scanning() -> bool:
    return operator_has(SCANNING_SWITCH)


pytestmark = pytest.mark.slow


def set_args(values: dict[str, Any]) -> list[str]:
    return [arg for k, v in values.items() for arg in ("--set-json", f"{k}={json.dumps(v)}")]


def kube_version(cluster: Cluster) -> str:
    """The API server's version (helm renders against it; no default 1.20 capabilities)."""
    info = json.loads(cluster.kubectl("version", "-o", "json").stdout)["serverVersion"]
    return str(info["gitVersion"]).lstrip("v").split("+")[0]


def helm_template(cluster: Cluster, namespace: str, values: dict[str, Any]) -> list[dict[str, Any]]:
    out = cluster.helm(
        "template", "chk", str(CHART), "-n", namespace, "--include-crds",
        "--kube-version", kube_version(cluster), *set_args(values),
    ).stdout  # fmt: skip
    return [d for d in yaml.safe_load_all(out) if d]


def helm_install(cluster: Cluster, release: str, namespace: str, values: dict[str, Any]) -> str:
    proc = cluster.helm(
        "install", release, str(CHART), "-n", namespace, "--wait", "--timeout", "180s",
        *set_args(values), timeout=240,
    )  # fmt: skip
    return proc.stdout


def can_i(cluster: Cluster, sa: str, verb: str, resource: str, *extra: str) -> bool:
    proc = cluster.kubectl("auth", "can-i", verb, resource, f"--as={sa}", *extra, check=False)
    answer = proc.stdout.strip()
    assert answer in ("yes", "no"), f"kubectl auth can-i {verb} {resource}: {proc.stdout}{proc.stderr}"
    return answer == "yes"


def service_account_kubeconfig(cluster: Cluster, namespace: str, sa: str, path: Path) -> Path:
    """A kubeconfig that authenticates as the ServiceAccount (a bound token, as in-cluster)."""
    token = cluster.kubectl("create", "token", sa, "-n", namespace, "--duration=1h").stdout.strip()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    context = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])["context"]
    server = next(c for c in admin["clusters"] if c["name"] == context["cluster"])["cluster"]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": server}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": sa, "namespace": namespace}}],
        "current-context": "sa",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    # The token really is the ServiceAccount's.
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert claims["sub"] == f"system:serviceaccount:{namespace}:{sa}"
    return path


def operator_container(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    dep = json.loads(cluster.kubectl("get", "deployment", name, "-n", namespace, "-o", "json").stdout)
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    return dict(container)


def run_operator_as_chart(
    cluster: Cluster, namespace: str, name: str, sa: str, workdir: Path
) -> OperatorProcess:
    """The real operator, here, with the installed Deployment's namespace arguments and env,
    authenticated as the chart's ServiceAccount."""
    container = operator_container(cluster, namespace, name)
    args = container["args"]
    namespaces = [a.split("=", 1)[1] for a in args if a.startswith("--namespace=")]
    extra = ["--all-namespaces"] if "--all-namespaces" in args else []
    assert bool(namespaces) != bool(extra), args
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env.pop("MODELDEPLOY_METRICS_PORT")  # OperatorProcess picks free ports
    env["KUBECONFIG"] = str(service_account_kubeconfig(cluster, namespace, sa, workdir / "sa.kubeconfig"))
    op = OperatorProcess(workdir / "operator", namespaces, env=env, resync_seconds=10, extra_args=extra)
    op.start(timeout=90)
    return op


def children(cluster: Cluster, namespace: str, name: str) -> list[str]:
    sel = f"modeldeploy.io/name={name}"
    out = cluster.kubectl(
        "get", "deployments,services,configmaps,horizontalpodautoscalers,poddisruptionbudgets,pods",
        "-n", namespace, "-l", sel, "-o", "name",
    ).stdout  # fmt: skip
    return out.split()


def create_bump_delete(cluster: Cluster, namespace: str, name: str = "chartmd") -> list[str]:
    """A ModelDeployment through create -> Ready -> version bump -> Ready -> delete -> gone.
    Returns the Triton pod names seen while it ran."""
    cluster.apply(model_deployment(name, replicas=1, rollout=FAST_CANARY), namespace=namespace)
    md = MD(cluster, namespace, name)
    st = md.wait_phase("Ready", timeout=120)
    assert st["history"][0]["outcome"] == "Serving" and st["ready"] == "1/1"
    pods = [p.metadata.name for p in md.pods()]
    assert pods, "Triton pods exist"

    md.patch({"spec": {"model": {"version": 2}}})

    def rolled() -> dict[str, Any] | None:
        st = md.status()
        hist = st.get("history") or []
        ok = st.get("phase") == "Ready" and len(hist) == 2 and st.get("servingVersion") == 2
        return st if ok else None

    st = wait_for(rolled, 180, interval=0.5, message=lambda: f"rollout to version 2; status: {md.status()}")
    assert [h["outcome"] for h in st["history"]] == ["Superseded", "Serving"]
    assert st["history"][1]["modelVersion"] == 2
    pods += [p.metadata.name for p in md.pods()]

    cluster.kubectl("delete", "modeldeployment", name, "-n", namespace, "--wait=true", "--timeout=60s")
    wait_for(
        lambda: not children(cluster, namespace, name),
        120,
        interval=0.5,
        message=lambda: f"children of {name} gone: {children(cluster, namespace, name)}",
    )
    return pods


# How a refused request shows in the log: kopf's APIForbiddenError/APIUnauthorizedError (status=403),
# our client's ApiError ("HTTP 403"), the Status body, kopf's scanning fallback warnings.
REFUSED = re.compile(r"(status=|http |'code': )40[13]\b|forbidden|unauthorized|not enough permissions")


def denials(
    op: OperatorProcess, cluster: Cluster, username: str, tolerate: re.Pattern[str] | None = None
) -> list[str]:
    """Requests of the operator the API server refused: its log (reads and writes) and, on the
    local backend, the audit log (writes). Log lines matching ``tolerate`` are left out."""
    text = op.log_path.read_text(errors="replace") if op.log_path.exists() else ""
    found = []
    for line in text.splitlines():
        low = line.lower()
        if "being terminated" in low:  # a namespace going away (another test's), not RBAC
            continue
        if tolerate is not None and tolerate.search(line):
            continue
        if REFUSED.search(low):
            found.append(line)
    if cluster.control_plane is not None:
        for ev in cluster.audit_events():
            user = (ev.get("user") or {}).get("username")
            status = ev.get("responseStatus") or {}
            causes = (status.get("details") or {}).get("causes") or []
            if any(c.get("reason") == "NamespaceTerminating" for c in causes):
                continue  # an earlier test's namespace going away: admission, not RBAC (as above)
            if user == username and status.get("code") == 403:
                found.append(f"audit: {ev.get('verb')} {ev.get('requestURI')}")
    return found


def assert_not_refused(
    op: OperatorProcess, cluster: Cluster, username: str, tolerate: re.Pattern[str] | None = None
) -> None:
    """Only refusals count here (other operator errors are the reconcile tests' business): the
    create/bump/delete cycle having succeeded shows the operator worked."""
    refused = denials(op, cluster, username, tolerate)
    assert not refused, "requests refused:\n" + "\n".join(refused) + f"\n--- log tail:\n{op.tail(40)}"


def no_pod_security_rejections(cluster: Cluster, namespace: str) -> None:
    events = cluster.core.list_namespaced_event(namespace).items
    bad = [
        f"{e.involved_object.kind}/{e.involved_object.name}: {e.message}"
        for e in events
        if e.reason == "FailedCreate" and "PodSecurity" in (e.message or "")
    ]
    assert not bad, bad


@pytest.fixture
def namespaces(cluster: Cluster) -> Iterator[list[str]]:
    """Namespaces a test creates (appended by the test); deleted afterwards."""
    made: list[str] = []
    try:
        yield made
    finally:
        for ns in made:
            cluster.delete_namespace(ns)


def new_namespace(
    cluster: Cluster, made: list[str], prefix: str, labels: dict[str, str] | None = None
) -> str:
    ns = cluster.create_namespace(prefix=prefix, labels=labels)
    made.append(ns)
    return ns


# --------------------------------------------------------------------------- server-side validation


VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "cluster": {"rbac.scope": "cluster", "operator.logLevel": "verbose"},
    "ha": {"rbac.scope": "cluster", "leaderElection.enabled": True},
    "namespaced": {"rbac.scope": "namespaced"},  # watchNamespaces filled in below
    "monitoring": {
        "rbac.scope": "namespaced",
        "monitoring.serviceMonitor.enabled": True,
        "monitoring.prometheusRule.enabled": True,
        "prometheusAdapterRules.enabled": True,
    },
}


def test_rendered_manifests_pass_server_side_validation(cluster: Cluster, namespaces: list[str]) -> None:
    """``helm lint --strict``, then the API server of the target version validates every rendered
    object with strict field validation (unknown or duplicate fields fail). ServiceMonitor and
    PrometheusRule have no CRDs here: the unit tests check their shape and promtool their rules."""
    release_ns = new_namespace(cluster, namespaces, "chart-validate")
    watched = new_namespace(cluster, namespaces, "chart-validate-w")
    for name, values in VALUE_SETS.items():
        values = dict(values)
        if values.get("rbac.scope") == "namespaced":
            values["rbac.watchNamespaces"] = [release_ns, watched]
        lint = cluster.helm(
            "lint", "--strict", str(CHART), "--kube-version", kube_version(cluster), *set_args(values)
        )
        assert "0 chart(s) failed" in lint.stdout, lint.stdout
        objs = helm_template(cluster, release_ns, {**values, "fullnameOverride": f"chk-{name}"})
        served = [o for o in objs if o["kind"] not in NOT_SERVED]
        skipped = {o["kind"] for o in objs} & NOT_SERVED
        assert skipped == (NOT_SERVED if name == "monitoring" else set()), name
        assert {"CustomResourceDefinition", "Deployment", "ServiceAccount"} <= {o["kind"] for o in served}
        proc = cluster.kubectl(
            "apply", "--dry-run=server", "--validate=strict", "-f", "-",
            input=yaml.safe_dump_all(served), check=False,
        )  # fmt: skip
        assert proc.returncode == 0, f"{name}: {proc.stderr}{proc.stdout}"
        assert proc.stdout.count("(server dry run)") == len(served), proc.stdout


# --------------------------------------------------------------------------- RBAC, proven both ways


def test_cluster_scope_rbac_runs_the_real_operator(
    cluster: Cluster, namespaces: list[str], tmp_path: Path
) -> None:
    release_ns = new_namespace(cluster, namespaces, "chart-cluster")
    workload_ns = new_namespace(cluster, namespaces, "chart-cluster-wl")  # another namespace: -A at work
    name = unique_name("mdop-cluster")
    release = "mdop"
    # With leader election (2 replicas, a Lease): the operator below then also proves the Lease Role.
    values = {"rbac.scope": "cluster", "fullnameOverride": name, "leaderElection.enabled": True}
    try:
        notes = helm_install(cluster, release, release_ns, values)
        assert "NOTES:" in notes and "watches ModelDeployments in every namespace" in notes
        cluster.kubectl("rollout", "status", f"deployment/{name}", "-n", release_ns, "--timeout=60s")
        assert cluster.apiextensions.read_custom_resource_definition(CRD_NAME)
        test = cluster.helm("test", release, "-n", release_ns, "--timeout", "120s", timeout=180)
        assert "Phase:          Succeeded" in test.stdout, test.stdout

        sa = f"system:serviceaccount:{release_ns}:{name}"
        ns = ("-n", workload_ns)
        assert can_i(cluster, sa, "patch", "deployments.apps", *ns)
        assert can_i(cluster, sa, "create", "services", *ns)
        assert can_i(cluster, sa, "patch", "modeldeployments.modeldeploy.io", "--subresource=status", *ns)
        assert can_i(cluster, sa, "watch", "modeldeployments.modeldeploy.io", "--all-namespaces")
        assert can_i(cluster, sa, "get", "secrets", *ns)
        assert can_i(cluster, sa, "list", "customresourcedefinitions.apiextensions.k8s.io")
        assert not can_i(cluster, sa, "list", "secrets", *ns)
        assert not can_i(cluster, sa, "list", "secrets", "--all-namespaces")
        assert not can_i(cluster, sa, "delete", "namespaces")
        assert not can_i(cluster, sa, "create", "pods", *ns)
        assert not can_i(cluster, sa, "delete", "pods", *ns)
        assert not can_i(cluster, sa, "update", "modeldeployments.modeldeploy.io", *ns)
        assert not can_i(cluster, sa, "delete", "modeldeployments.modeldeploy.io", *ns)
        assert not can_i(cluster, sa, "create", "clusterrolebindings.rbac.authorization.k8s.io")
        assert not can_i(cluster, sa, "create", "customresourcedefinitions.apiextensions.k8s.io")
        home = ("-n", release_ns)
        assert can_i(cluster, sa, "create", "leases.coordination.k8s.io", *home)
        assert can_i(cluster, sa, "update", f"leases.coordination.k8s.io/{name}", *home)
        assert not can_i(
            cluster, sa, "update", "leases.coordination.k8s.io/kube-scheduler", "-n", "kube-system"
        )
        assert not can_i(cluster, sa, "update", "leases.coordination.k8s.io/other", *home)
        assert not can_i(cluster, sa, "delete", f"leases.coordination.k8s.io/{name}", *home)

        op = run_operator_as_chart(cluster, release_ns, name, name, tmp_path)
        try:
            create_bump_delete(cluster, workload_ns)
            if operator_has("MODELDEPLOY_LEADER_ELECTION"):  # it acted, so it held the chart's Lease
                lease = cluster.kubectl("get", "lease", name, "-n", release_ns, "-o", "json").stdout
                assert json.loads(lease)["spec"]["holderIdentity"]
        finally:
            op.stop()
        assert_not_refused(op, cluster, sa)
    finally:
        cluster.helm("uninstall", release, "-n", release_ns, "--wait", "--timeout", "60s", check=False)
    # Uninstall keeps the CRD (and so every ModelDeployment); the cluster-scoped RBAC goes.
    assert cluster.apiextensions.read_custom_resource_definition(CRD_NAME)
    gone = cluster.kubectl("get", "clusterrole", name, check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr


def test_namespaced_scope_rbac_and_restricted_pod_security(
    cluster: Cluster, namespaces: list[str], tmp_path: Path
) -> None:
    """Release in one namespace, watching another; both enforce Pod Security `restricted`."""
    release_ns = new_namespace(cluster, namespaces, "chart-ns", labels=RESTRICTED)
    workload_ns = new_namespace(cluster, namespaces, "chart-ns-wl", labels=RESTRICTED)
    other_ns = new_namespace(cluster, namespaces, "chart-ns-other")
    name, release = unique_name("mdop-ns"), "mdop"
    values = {"rbac.scope": "namespaced", "rbac.watchNamespaces": [workload_ns], "fullnameOverride": name}
    try:
        notes = helm_install(cluster, release, release_ns, values)
        assert f"only in: {workload_ns}" in notes
        # Admitted under `restricted` (a rejected pod would leave the Deployment with no pods).
        pods = cluster.core.list_namespaced_pod(
            release_ns, label_selector=f"app.kubernetes.io/instance={release}"
        )
        assert len(pods.items) == 1 and pods.items[0].status.phase == "Running"
        no_pod_security_rejections(cluster, release_ns)
        test = cluster.helm("test", release, "-n", release_ns, "--timeout", "120s", timeout=180)
        assert "Phase:          Succeeded" in test.stdout, test.stdout
        no_pod_security_rejections(cluster, release_ns)
        selector = f"app.kubernetes.io/instance={release}"
        cluster_scoped = cluster.kubectl(
            "get", "clusterroles,clusterrolebindings", "-l", selector, "-o", "name"
        )
        assert not cluster_scoped.stdout.strip(), "namespaced scope creates nothing cluster-scoped"

        sa = f"system:serviceaccount:{release_ns}:{name}"
        ns = ("-n", workload_ns)
        assert can_i(cluster, sa, "patch", "deployments.apps", *ns)
        assert can_i(cluster, sa, "patch", "modeldeployments.modeldeploy.io", "--subresource=status", *ns)
        assert can_i(cluster, sa, "get", "secrets", *ns)
        assert not can_i(cluster, sa, "list", "secrets", *ns)
        assert not can_i(cluster, sa, "create", "pods", *ns)
        assert not can_i(cluster, sa, "delete", "namespaces")
        assert not can_i(cluster, sa, "list", "namespaces")
        assert not can_i(cluster, sa, "watch", "customresourcedefinitions.apiextensions.k8s.io")
        for elsewhere in (release_ns, other_ns, "default"):
            assert not can_i(cluster, sa, "patch", "deployments.apps", "-n", elsewhere), elsewhere
            assert not can_i(cluster, sa, "list", "modeldeployments.modeldeploy.io", "-n", elsewhere), (
                elsewhere
            )

        op = run_operator_as_chart(cluster, release_ns, name, name, tmp_path)
        try:
            triton_pods = create_bump_delete(cluster, workload_ns)
        finally:
            op.stop()
        assert triton_pods, "the Triton pods were admitted under restricted"
        no_pod_security_rejections(cluster, workload_ns)
        assert_not_refused(op, cluster, sa, None if operator_disables_scanning() else CLUSTER_SCANNING)
    finally:
        cluster.helm("uninstall", release, "-n", release_ns, "--wait", "--timeout", "60s", check=False)
