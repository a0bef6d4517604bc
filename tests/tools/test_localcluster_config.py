"""Unit tests: the pure parts of hack/localcluster.py and the helpers of tests/kube.py."""

from __future__ import annotations

import ipaddress
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import kube
from hack import localcluster as lc
from hack.procutil import free_ports

# --------------------------------------------------------------------------------------------------
# Fake nodes


def test_fake_node_pools_match_the_documented_layout() -> None:
    by_name = {n.name: n for n in lc.FAKE_NODES}
    assert sorted(by_name) == ["cpu-0", "cpu-1", "cpu-2", "edge-0", "edge-1", "gpu-0", "gpu-1"]
    for name, node in by_name.items():
        m = node.manifest()
        assert m["metadata"]["annotations"] == {"kwok.x-k8s.io/node": "fake"}
        labels = m["metadata"]["labels"]
        assert labels["type"] == "kwok"
        assert labels["kubernetes.io/os"] == "linux"
        assert labels["kubernetes.io/hostname"] == name
        assert m["status"]["capacity"] == m["status"]["allocatable"]
        cap = m["status"]["capacity"]
        if name.startswith("gpu-"):
            assert cap["nvidia.com/gpu"] == "8"
            assert labels["nvidia.com/gpu.present"] == "true"
        else:
            assert "nvidia.com/gpu" not in cap
            assert "nvidia.com/gpu.present" not in labels
        if name.startswith("edge-"):
            assert (cap["cpu"], cap["memory"], cap["pods"]) == ("8", "32Gi", "500")
            assert labels["modeldeploy.io/pool"] == "edge"
            assert m["spec"]["taints"] == [
                {"key": "modeldeploy.io/edge", "value": "true", "effect": "NoSchedule"}
            ]
        else:
            assert (cap["cpu"], cap["memory"], cap["pods"]) == ("64", "512Gi", "2000")
            assert "taints" not in m["spec"]


def test_fake_nodes_have_distinct_addresses_inside_the_pod_cidr() -> None:
    ips = [n.ip for n in lc.FAKE_NODES]
    cidrs = [ipaddress.IPv4Network(n.pod_cidr) for n in lc.FAKE_NODES]
    assert len(set(ips)) == len(ips)
    assert all(not a.overlaps(b) for i, a in enumerate(cidrs) for b in cidrs[i + 1 :])
    pool = ipaddress.IPv4Network(lc.POD_CIDR)
    assert all(c.subnet_of(pool) for c in cidrs)


# --------------------------------------------------------------------------------------------------
# kwok stages: a tiny evaluator for the selector forms we use, to prove the pod stages are exclusive.

_SELECT = re.compile(r'^(\.[\w.]+)\.\[\] \| select\(\.type == "(\w+)"\) \| \.(\w+)$')


def _path(obj: Any, dotted: str) -> list[Any]:
    values = [obj]
    for part in [p for p in dotted.split(".") if p]:
        nxt: list[Any] = []
        for v in values:
            if part == "[]":
                nxt.extend(v or [])
            elif isinstance(v, dict):
                nxt.append(v.get(part))
        values = nxt
    return [v for v in values if v is not None]


def _query(obj: dict[str, Any], key: str) -> list[Any]:
    m = _SELECT.match(key)
    if m:
        items = _path(obj, m.group(1) + ".[]")
        return [i.get(m.group(3)) for i in items if i.get("type") == m.group(2)]
    return _path(obj, key)


def _matches(stage: dict[str, Any], obj: dict[str, Any]) -> bool:
    for expr in stage["spec"]["selector"]["matchExpressions"]:
        data = _query(obj, expr["key"])
        op, values = expr["operator"], [str(v) for v in expr.get("values", [])]
        hit = any(str(d) in values for d in data)
        ok = {"In": hit, "NotIn": not hit, "Exists": bool(data), "DoesNotExist": not data}[op]
        if not ok:
            return False
    return True


def _pod(
    simulate: str | None = None, phase: str = "Pending", deleting: bool = False, job: bool = False
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "p", "labels": {"app": "x"}}
    if simulate is not None:
        meta["labels"]["simulate"] = simulate
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    if job:
        meta["ownerReferences"] = [{"kind": "Job", "name": "j"}]
    return {
        "metadata": meta,
        "status": {"phase": phase, "conditions": [{"type": "PodScheduled", "status": "True"}]},
    }


@pytest.fixture(scope="module")
def pod_stages() -> list[dict[str, Any]]:
    return [s for s in lc.load_stages() if s["spec"]["resourceRef"]["kind"] == "Pod"]


@pytest.mark.parametrize(
    ("pod", "expected"),
    [
        (_pod(), "pod-ready"),
        (_pod("something-else"), "pod-ready"),
        (_pod("never-ready"), "pod-never-ready"),
        (_pod("crashloop"), "pod-crashloop"),
        (_pod(deleting=True), "pod-delete"),
        (_pod("crashloop", phase="Running", deleting=True), "pod-delete"),
        (_pod(phase="Running", job=True), "pod-complete"),
        (_pod("never-ready", phase="Running", job=True), None),
        (_pod("job-fails"), "pod-ready"),
        (_pod("job-fails", phase="Running", job=True), "pod-job-fails"),
        (_pod(phase="Running"), None),
        (_pod("crashloop", phase="Running"), None),
    ],
)
def test_exactly_one_pod_stage_applies(
    pod_stages: list[dict[str, Any]], pod: dict[str, Any], expected: str | None
) -> None:
    matching = [s["metadata"]["name"] for s in pod_stages if _matches(s, pod)]
    assert matching == ([expected] if expected else [])


def test_every_pod_stage_but_delete_skips_terminating_pods(pod_stages: list[dict[str, Any]]) -> None:
    for stage in pod_stages:
        keys = {(e["key"], e["operator"]) for e in stage["spec"]["selector"]["matchExpressions"]}
        expected = "Exists" if stage["metadata"]["name"] == "pod-delete" else "DoesNotExist"
        assert (".metadata.deletionTimestamp", expected) in keys, stage["metadata"]["name"]


def test_stage_names_and_simulated_statuses() -> None:
    stages = {s["metadata"]["name"]: s for s in lc.load_stages()}
    assert set(stages) == {
        "node-initialize",
        "node-heartbeat-with-lease",
        "pod-ready",
        "pod-never-ready",
        "pod-crashloop",
        "pod-complete",
        "pod-job-fails",
        "pod-delete",
    }
    assert stages["pod-delete"]["spec"]["next"] == {"delete": True}
    crash = stages["pod-crashloop"]["spec"]["next"]["statusTemplate"]
    for needle in ("phase: Running", "CrashLoopBackOff", "exitCode: 1", "reason: Error", "restartCount: 3"):
        assert needle in crash
    never = stages["pod-never-ready"]["spec"]["next"]["statusTemplate"]
    assert (
        "phase: Running" in never
        and "running:" in never
        and 'status: "True"\n' not in never.split("type: ContainersReady")[1]
    )
    for name in ("pod-ready", "pod-never-ready", "pod-crashloop"):
        assert "podIP:" in stages[name]["spec"]["next"]["statusTemplate"], name


def test_kwok_config_is_a_configuration_followed_by_the_stages() -> None:
    docs = lc.kwok_config_documents()
    assert docs[0]["apiVersion"] == "config.kwok.x-k8s.io/v1alpha1"
    assert docs[0]["kind"] == "KwokConfiguration"
    assert [d["kind"] for d in docs[1:]] == ["Stage"] * (len(docs) - 1)
    # Round-trips as one multi-document file.
    again = list(yaml.safe_load_all(yaml.safe_dump_all(docs)))
    assert again == docs


# --------------------------------------------------------------------------------------------------
# PKI, kubeconfig, audit policy


def test_pki_admin_cert_serves_and_authenticates(tmp_path: Path) -> None:
    pki = lc.Pki.generate(tmp_path / "pki")
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    admin = x509.load_pem_x509_certificate(pki.admin_cert.read_bytes())
    admin.verify_directly_issued_by(ca)
    assert admin.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "admin"
    assert admin.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "system:masters"
    san = admin.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "kubernetes.default.svc"} <= set(san.get_values_for_type(x509.DNSName))
    assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.96.0.1")} <= set(
        san.get_values_for_type(x509.IPAddress)
    )
    eku = admin.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(eku)
    assert pki.sa_key.stat().st_mode & 0o077 == 0
    assert b"PUBLIC KEY" in pki.sa_pub.read_bytes()

    crt, _key = pki.issue("operator", "system:serviceaccount:x:op", ("team",))
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "system:serviceaccount:x:op"


def test_kubeconfig_embeds_credentials(tmp_path: Path) -> None:
    pki = lc.Pki.generate(tmp_path)
    cfg = lc.kubeconfig_dict("https://127.0.0.1:1234", pki.ca_cert, pki.admin_cert, pki.admin_key, "admin")
    assert cfg["current-context"] == lc.CONTEXT_NAME
    (cluster,) = cfg["clusters"]
    assert cluster["cluster"]["server"] == "https://127.0.0.1:1234"
    (user,) = cfg["users"]
    assert set(user["user"]) == {"client-certificate-data", "client-key-data"}


def test_audit_policy_logs_writes_once_at_metadata_level() -> None:
    policy = lc.audit_policy()
    assert policy["omitStages"] == ["RequestReceived"]
    first, last = policy["rules"]
    assert first == {
        "level": "Metadata",
        "verbs": ["create", "update", "patch", "delete", "deletecollection"],
    }
    assert last == {"level": "None"}


# --------------------------------------------------------------------------------------------------
# Binaries, flags, env


def _fake_cache(root: Path, versions: dict[str, str]) -> Path:
    layout = {
        f"kubernetes-v{versions['K8S_VERSION']}": [
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kubectl",
        ],
        f"etcd-v{versions['ETCD_VERSION']}": ["etcd"],
        f"kwok-v{versions['KWOK_VERSION']}": ["kwok"],
        f"helm-v{versions['HELM_VERSION']}": ["helm"],
    }
    for d, names in layout.items():
        (root / "bin" / d).mkdir(parents=True)
        (root / "bin" / d / ".stamp").write_text("x\n")
        for n in names:
            p = root / "bin" / d / n
            p.write_text("#!/bin/sh\n")
            p.chmod(0o755)
    return root


def test_versions_file_pins_every_tool() -> None:
    versions = lc.read_versions()
    assert set(versions) >= {"K8S_VERSION", "ETCD_VERSION", "KWOK_VERSION", "HELM_VERSION"}
    assert all(re.fullmatch(r"\d+\.\d+\.\d+", v) for v in versions.values())


def test_missing_binaries_name_make_binaries(tmp_path: Path) -> None:
    with pytest.raises(lc.BinariesMissing, match="make binaries"):
        lc.Binaries.locate(tmp_path)


def test_component_flags(tmp_path: Path) -> None:
    cache = _fake_cache(tmp_path / "cache", lc.read_versions())
    cp = lc.LocalControlPlane(tmp_path / "wd", cache)
    cp.ports = dict(zip(cp.PORT_NAMES, range(20000, 20000 + len(cp.PORT_NAMES)), strict=True))
    api = cp.component_argv("kube-apiserver")
    for flag in (
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        "--endpoint-reconciler-type=none",
        "--authorization-mode=RBAC",
        "--service-cluster-ip-range=10.96.0.0/16",
        "--allow-privileged=true",
        f"--audit-log-path={cp.audit_log}",
        f"--secure-port={cp.ports['apiserver']}",
    ):
        assert flag in api
    assert not any(a.startswith(("--disable-admission-plugins", "--admission-control")) for a in api)
    kcm = cp.component_argv("kube-controller-manager")
    assert "--leader-elect=false" in kcm
    (controllers,) = [a.split("=", 1)[1].split(",") for a in kcm if a.startswith("--controllers=")]
    for needed in (
        "deployment-controller",
        "replicaset-controller",
        "garbage-collector-controller",
        "horizontal-pod-autoscaler-controller",
        "namespace-controller",
        "serviceaccount-controller",
        "serviceaccount-token-controller",
        "root-ca-certificate-publisher-controller",
        "pod-garbage-collector-controller",
        "endpoints-controller",
        "endpointslice-controller",
        "endpointslice-mirroring-controller",
        "disruption-controller",
    ):
        assert needed in controllers
    kwok = cp.component_argv("kwok")
    assert "--manage-all-nodes=false" in kwok
    assert "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake" in kwok
    assert any(a.startswith("--cidr=") for a in kwok)
    assert all(str(cache) in cp.component_argv(n)[0] for n in cp.ORDER)

    env = cp.env({"PATH": "/usr/bin"})
    assert env["PATH"].split(":")[0] == str(cp.bin_path)
    assert env["KUBECONFIG"] == str(cp.kubeconfig)


def test_free_ports_are_distinct() -> None:
    ports = free_ports(6)
    assert len(set(ports)) == 6


# --------------------------------------------------------------------------------------------------
# tests/kube.py helpers


def test_wait_for_returns_the_value_and_times_out_clearly() -> None:
    calls = iter([0, None, "done"])
    assert kube.wait_for(lambda: next(calls), 2, interval=0.01) == "done"
    start = time.monotonic()
    with pytest.raises(AssertionError, match=r"timed out after 0.1s waiting for the thing.*boom"):
        kube.wait_for(lambda: 1 / 0 if True else None, 0.1, interval=0.01, message="the thing boom")
    assert time.monotonic() - start < 1


def test_hold_for_fails_as_soon_as_the_condition_breaks() -> None:
    values = iter([True, True, False, True])
    with pytest.raises(AssertionError, match="stopped holding after 3 polls"):
        kube.hold_for(lambda: next(values), 5, interval=0.01)
    assert kube.hold_for(lambda: True, 0.05, interval=0.01) >= 2


def test_unique_name_is_a_dns_label() -> None:
    name = kube.unique_name("test_something[param-1]" + "x" * 80)
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name)
    assert len(name) <= 63
    assert kube.unique_name("a") != kube.unique_name("a")


def test_backend_selection() -> None:
    assert kube.select_backend({}) == "local"
    assert kube.select_backend({"MODELDEPLOY_K8S_BACKEND": "Existing"}) == "existing"
    with pytest.raises(kube.ClusterUnavailable):
        kube.select_backend({"MODELDEPLOY_K8S_BACKEND": "minikube"})
    assert kube.cluster_required({"MODELDEPLOY_REQUIRE_CLUSTER": "1"})
    assert not kube.cluster_required({})


def test_audit_events_are_read_incrementally(tmp_path: Path) -> None:
    class FakePlane:
        audit_log = tmp_path / "audit.log"

    cluster = kube.Cluster(tmp_path / "kubeconfig", {}, backend="local", simulated=True)
    cluster.control_plane = FakePlane()  # type: ignore[assignment]
    assert cluster.audit_events() == []
    FakePlane.audit_log.write_text('{"verb": "create"}\n{"verb": "pa')  # second line half-written
    assert [e["verb"] for e in cluster.audit_events()] == ["create"]
    with FakePlane.audit_log.open("a") as f:
        f.write('tch"}\n')
    assert [e["verb"] for e in cluster.audit_events()] == ["create", "patch"]
    FakePlane.audit_log.write_text('{"verb": "delete"}\n')  # replaced by a shorter, new log
    assert [e["verb"] for e in cluster.audit_events()] == ["delete"]
