"""A ModelDeployment on the real node seen through the API and its Service: status, pods per
revision, the main Service's ready endpoints per revision and whether kube-proxy routes them yet;
shared by the real tier's rollout tests."""

from __future__ import annotations

import time
import uuid
from typing import Any

from realtier import realnode
from traffic import Traffic, kube_proxy_caught_up

from kube import Cluster, wait_for

GROUP, VERSION, PLURAL = "modeldeploy.io", "v1alpha1", "modeldeployments"
KUBE_PROXY_METRICS = f"http://{realnode.NODE_IP}:{realnode.RealNode.PORTS['kube-proxy-metrics']}/metrics"
MD_EVENTS = "involvedObject.kind=ModelDeployment"
EVENT_LINES = "jsonpath={range .items[*]}{.reason}: {.message}{'\\n'}{end}"


class Model:
    """A ModelDeployment seen through the API: its status, its pods, its Service."""

    def __init__(self, cluster: Cluster, namespace: str, name: str) -> None:
        self.cluster, self.namespace, self.name = cluster, namespace, name

    def get(self) -> dict[str, Any]:
        obj: dict[str, Any] = self.cluster.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, self.name
        )
        return obj

    def status(self) -> dict[str, Any]:
        return self.get().get("status") or {}

    def patch(self, body: dict[str, Any]) -> None:
        self.cluster.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, self.name, body
        )

    def resume(self) -> None:
        self.patch({"metadata": {"annotations": {"modeldeploy.io/resume": uuid.uuid4().hex[:8]}}})

    def revision_of_hash(self) -> dict[str, int]:
        return {h["hash"]: h["revision"] for h in self.status().get("history") or []}

    def pods_by_revision(self) -> dict[int, list[Any]]:
        """Live (not terminating) pods per revision number."""
        numbers = self.revision_of_hash()
        out: dict[int, list[Any]] = {}
        for p in self.cluster.core.list_namespaced_pod(
            self.namespace, label_selector=f"modeldeploy.io/name={self.name}"
        ).items:
            rev = numbers.get((p.metadata.labels or {}).get("modeldeploy.io/revision", ""))
            if rev is not None and p.metadata.deletion_timestamp is None:
                out.setdefault(rev, []).append(p)
        return out

    def endpoints_by_revision(self, service: str | None = None) -> dict[int, int]:
        """Ready endpoints of the Service (the main one by default) per revision number."""
        numbers = self.revision_of_hash()
        pods = {
            p.metadata.name: numbers.get((p.metadata.labels or {}).get("modeldeploy.io/revision", ""))
            for p in self.cluster.core.list_namespaced_pod(
                self.namespace, label_selector=f"modeldeploy.io/name={self.name}"
            ).items
        }
        slices = self.cluster.discovery.list_namespaced_endpoint_slice(
            self.namespace, label_selector=f"kubernetes.io/service-name={service or self.name}"
        ).items
        out: dict[int, int] = {}
        for s in slices:
            for ep in s.endpoints or []:
                if ep.conditions and ep.conditions.ready and ep.target_ref is not None:
                    rev = pods.get(ep.target_ref.name)
                    if rev is not None:
                        out[rev] = out.get(rev, 0) + 1
        return out

    def endpoints_changed_at(self, service: str | None = None) -> float:
        """When the Service's EndpointSlices last changed (epoch seconds, whole seconds: the
        resolution of managedFields)."""
        slices = self.cluster.discovery.list_namespaced_endpoint_slice(
            self.namespace, label_selector=f"kubernetes.io/service-name={service or self.name}"
        ).items
        return max(f.time.timestamp() for s in slices for f in s.metadata.managed_fields or [] if f.time)

    def service_address(self) -> tuple[str, int]:
        svc = self.cluster.core.read_namespaced_service(self.name, self.namespace)
        return svc.spec.cluster_ip, next(p.port for p in svc.spec.ports if p.name == "http")


def describe(cluster: Cluster, namespace: str) -> str:
    out = cluster.kubectl("get", "md,deploy,pods,endpointslices", "-n", namespace, "-o", "wide", check=False)
    ev = cluster.kubectl("get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False).stdout
    return f"\n{out.stdout}\n{ev[-4000:]}"


def wait_status(md: Model, pred: Any, timeout: float, what: str) -> dict[str, Any]:
    return wait_for(
        lambda: st if pred(st := md.status()) else None,
        timeout,
        interval=0.25,
        message=lambda: f"{what}; status: {md.status()}{describe(md.cluster, md.namespace)}",
    )


def serving(md: Model, revision: int, *, after_rollback: bool = False) -> dict[str, Any]:
    """``revision`` stable and alone: every other revision's pods gone (scale-down done); Ready and
    idle, or (``after_rollback``) RolledBack, as the status says until the spec changes."""
    phase, state = ("RolledBack", "RolledBack") if after_rollback else ("Ready", "Idle")

    def done(st: dict[str, Any]) -> bool:
        ro = st.get("rollout") or {}
        return (
            st.get("phase") == phase
            and st.get("stableRevision") == revision
            and ro.get("state") == state
            and set(md.pods_by_revision()) == {revision}
        )

    return wait_status(md, done, 240, f"revision {revision} serving alone")


def settled(md: Model, expected: dict[int, int], timeout: float = 60) -> None:
    """Wait until the main Service's ready endpoints are ``expected`` (revision -> count) and
    kube-proxy has written its rules since: new connections follow that split from here on."""
    wait_for(
        lambda: md.endpoints_by_revision() == expected,
        timeout,
        interval=0.2,
        message=lambda: f"endpoints {expected}, have {md.endpoints_by_revision()}",
    )
    seen = time.time()
    # The slices changed at or before ``seen``, and before the end of the whole second managedFields
    # records: a rules sync queued at or after the earlier of the two follows the change. (The whole
    # second itself is too early: a sync queued for an earlier change in that second passed for it.)
    changed = min(md.endpoints_changed_at() + 1, seen)
    wait_for(
        lambda: kube_proxy_caught_up(KUBE_PROXY_METRICS, changed), 30, interval=0.2, message="kube-proxy sync"
    )


def measure(traffic: Traffic, n: int) -> tuple[float, float]:
    """The next ``n`` requests' window (monotonic start, end)."""
    t0 = time.monotonic()
    wait_for(
        lambda: traffic.count_since(t0) >= n, n / traffic.rate * 4 + 30, interval=0.2, message=f"{n} requests"
    )
    return t0, time.monotonic()
