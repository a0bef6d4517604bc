"""The real node's configuration documents and its iptables clean-up filter (pure functions of
hack/realnode.py; the node itself is exercised by tests/real)."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import pytest

from hack import realnode


def paths(tmp_path: Path) -> object:
    return realnode.NodePaths(tmp_path / "node")


def test_containerd_config_is_valid_toml_with_the_settings_this_vm_needs(tmp_path: Path) -> None:
    p = paths(tmp_path)
    doc = tomllib.loads(realnode.containerd_config(p, "modeldeploy.local/pause:abc"))
    assert doc["version"] == 3 and doc["grpc"]["address"].startswith(str(tmp_path))
    runtime = doc["plugins"]["io.containerd.cri.v1.runtime"]
    assert runtime["restrict_oom_score_adj"] is True  # no CAP_SYS_RESOURCE for root here
    assert runtime["netns_mounts_under_state_dir"] is True  # network namespaces under our dir
    runc = runtime["containerd"]["runtimes"]["runc"]["options"]
    assert runc["SystemdCgroup"] is False and runc["Root"].startswith(str(tmp_path))
    assert doc["plugins"]["io.containerd.cri.v1.images"]["pinned_images"]["sandbox"].endswith(":abc")


def test_kubelet_config_cgroup_v1_identity_and_placement(tmp_path: Path) -> None:
    cfg = realnode.kubelet_config(
        paths(tmp_path),
        ca_file=tmp_path / "ca.crt",
        serving_cert=tmp_path / "s.crt",
        serving_key=tmp_path / "s.key",
        port=1,
        healthz_port=2,
    )
    assert cfg["failCgroupV1"] is False and cfg["cgroupDriver"] == "cgroupfs"
    assert cfg["authentication"]["anonymous"]["enabled"] is False
    assert cfg["authorization"]["mode"] == "Webhook" and cfg["readOnlyPort"] == 0
    assert cfg["registerWithTaints"] == [realnode.NODE_TAINT]
    assert cfg["clusterDNS"] == [realnode.CLUSTER_DNS_IP]
    assert cfg["imageGCHighThresholdPercent"] == 100  # imported images are never collected


def test_cni_config_keeps_pods_on_their_bridge(tmp_path: Path) -> None:
    bridge = realnode.cni_config(paths(tmp_path))["plugins"][0]
    assert bridge["bridge"] == realnode.POD_BRIDGE and bridge["ipMasq"] is False
    assert bridge["ipam"]["ranges"] == [[{"subnet": realnode.POD_SUBNET}]]
    assert bridge["ipam"]["dataDir"].startswith(str(tmp_path))


def test_corefile_serves_cluster_names_only() -> None:
    text = realnode.corefile(Path("/k"), "ctx", 1, 2)
    assert text.startswith("cluster.local:53 ")
    assert f"bind {realnode.NODE_IP}" in text and "forward" not in text


def test_iptables_filter_takes_our_chains_and_jumps_only() -> None:
    ours = [
        ":KUBE-SERVICES - [0:0]",
        ":MODELDEPLOY-FORWARD - [0:0]",
        "-A FORWARD -j MODELDEPLOY-FORWARD",
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        "-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -j KUBE-SVC-NPX46M4PTMTKRN6Y",
        "-A INPUT -j KUBE-FIREWALL",
    ]
    theirs = [
        "*filter",
        ":INPUT ACCEPT [0:0]",
        "-A INPUT -i lo -j ACCEPT",
        "-A FORWARD -o docker0 -j DOCKER",
        '-A INPUT -m comment --comment "KUBE-like words in a comment" -j ACCEPT',
        "COMMIT",
    ]
    assert [line for line in ours if not realnode.mentions_our_chain(line)] == []
    assert [line for line in theirs if realnode.mentions_our_chain(line)] == []


def test_kube_dns_points_at_the_node() -> None:
    (svc_path, svc), (slice_path, endpoint_slice) = realnode.kube_dns_objects()
    assert svc["spec"]["clusterIP"] == realnode.CLUSTER_DNS_IP and "selector" not in svc["spec"]
    assert endpoint_slice["endpoints"][0]["addresses"] == [realnode.NODE_IP]
    assert endpoint_slice["metadata"]["labels"]["kubernetes.io/service-name"] == "kube-dns"
    assert svc_path.endswith("/services") and slice_path.endswith("/endpointslices")


def test_cgroup_walk_skips_a_cgroup_removed_while_walking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A container's cgroup can vanish between listing its parent and reading it (seen in
    make cluster-down); the walk leaves it out instead of raising."""
    root = tmp_path / "kubepods"
    (root / "pod1" / "ctr1").mkdir(parents=True)
    (root / "pod1" / "cgroup.procs").write_text("11\n12\n")
    (root / "pod2" / "ctr2").mkdir(parents=True)
    (root / "pod2" / "ctr2" / "cgroup.procs").write_text("21\n")
    real_scandir = os.scandir

    def vanishing(path: Any) -> Any:
        if str(path).endswith("pod2"):
            raise FileNotFoundError(path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", vanishing)
    assert sorted(realnode.cgroup_pids(root)) == [11, 12]
    assert realnode.cgroup_tree(root)[0] == root
