"""Two operator replicas with leader election on a Lease: exactly one acts; killing it hands over."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import MD, model_deployment
from kube import Cluster, hold_for, unique_name, wait_for
from operator_proc import OperatorProcess

LEASE_SECONDS = 4


def _md_writers(cluster: Cluster, namespace: str, users: set[str]) -> dict[str, int]:
    """Writes to anything but the Lease: the acting replica's work."""
    counts = dict.fromkeys(users, 0)
    for ev in cluster.audit_events():
        user = (ev.get("user") or {}).get("username")
        ref = ev.get("objectRef") or {}
        if user in counts and ref.get("namespace") == namespace and ref.get("resource") != "leases":
            counts[user] += 1
    return counts


def test_one_replica_acts_and_killing_it_hands_over(cluster: Cluster, crd: None, tmp_path: Path) -> None:
    cp = cluster.control_plane
    if cp is None:
        pytest.skip("needs the local backend (per-replica identities in the audit log)")
    ns = cluster.create_namespace(unique_name("le"))
    replicas: list[OperatorProcess] = []
    users = {"modeldeploy-replica-a", "modeldeploy-replica-b"}
    try:
        for user in sorted(users):
            kubeconfig = cp.issue_kubeconfig(user, user)
            op = OperatorProcess(
                tmp_path / user,
                [ns],
                env={
                    "KUBECONFIG": str(kubeconfig),
                    "MODELDEPLOY_LEADER_ELECTION": "1",
                    "MODELDEPLOY_LEASE_NAMESPACE": ns,
                    "MODELDEPLOY_LEASE_SECONDS": str(LEASE_SECONDS),
                },
            )
            op.start()
            replicas.append(op)
        by_user = dict(zip(sorted(users), replicas, strict=True))

        def leaders() -> list[str]:
            return [
                u
                for u, op in by_user.items()
                if op.proc and op.proc.poll() is None and op.metric("modeldeploy_leader") == 1
            ]

        wait_for(lambda: len(leaders()) == 1, 30, message=lambda: f"exactly one leader: {leaders()}")
        leader = leaders()[0]
        standby = next(u for u in users if u != leader)

        cluster.apply(
            model_deployment(
                "le",
                replicas=2,
                rollout={"steps": [{"weight": 50}, {"weight": 100}], "scaleDownDelaySeconds": 0},
            ),
            namespace=ns,
        )
        md = MD(cluster, ns, "le")
        md.wait_phase("Ready", timeout=90)
        counts = _md_writers(cluster, ns, users)
        assert counts[leader] > 0 and counts[standby] == 0, counts
        hold_for(lambda: leaders() == [leader], 2 * LEASE_SECONDS, message="leadership is stable")
        assert _md_writers(cluster, ns, users)[standby] == 0

        # Kill the leader: the standby takes the lease over once it expires, and finishes new work.
        by_user[leader].kill()
        wait_for(
            lambda: leaders() == [standby],
            6 * LEASE_SECONDS,
            message=lambda: f"standby {standby} takes over; leaders: {leaders()}",
        )
        before: dict[str, Any] = _md_writers(cluster, ns, users)
        md.patch({"spec": {"model": {"version": 2}}})
        wait_for(
            lambda: md.status().get("servingVersion") == 2 and md.status().get("phase") == "Ready",
            90,
            message=lambda: f"v2 promoted by the new leader: {md.status()}",
        )
        after = _md_writers(cluster, ns, users)
        assert after[standby] > before[standby], "the new leader did the rollout"
        assert after[leader] == before[leader], "the killed replica wrote nothing more"
        assert [h["outcome"] for h in md.status()["history"]] == ["Superseded", "Serving"]
    finally:
        for op in replicas:
            op.stop()
        cluster.delete_namespace(ns)
