"""The real node's life cycle through the CLI users run (``make cluster-up`` / ``cluster-down``):
up twice, a pod that leaves mounts, a network namespace and a veth behind it, a crash (containerd
and kubelet killed), down twice, and then nothing of ours on the host.

First in this folder on purpose: one real node per host, and the tier's session cluster
(conftest) starts only when a later test asks for it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from realtier import on_real_node, realnode, unavailable

from kube import REPO_ROOT, wait_for


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hack.localcluster", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=REPO_ROOT,  # where `python -m hack.<module>` finds the package, as make does
    )


def kubectl(workdir: Path, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(workdir / "bin" / "kubectl"), f"--kubeconfig={workdir / 'kubeconfig'}", *args],
        capture_output=True,
        text=True,
        input=input,
        timeout=60,
        check=False,
    )


def test_up_twice_crash_down_twice_leaves_nothing(tmp_path: Path) -> None:
    workdir = tmp_path / "cluster"
    up = cli("up", "--dir", str(workdir), "--real-node", "on")
    if up.returncode != 0:
        unavailable(f"`localcluster.py up --real-node on` failed: {up.stderr.strip()[-2000:]}")
    try:
        again = cli("up", "--dir", str(workdir), "--real-node", "on")
        assert again.returncode == 0, again.stderr
        assert "already running" in again.stdout

        # A pod on the real node: sandbox mounts, a network namespace, a veth, cgroups, a shim.
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "sleeper", "namespace": "default"},
            "spec": on_real_node(
                {
                    "automountServiceAccountToken": True,
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{"name": "pause", "image": realnode_sandbox_ref(workdir)}],
                }
            ),
        }
        applied = kubectl(workdir, "apply", "-f", "-", input=json.dumps(pod))
        assert applied.returncode == 0, applied.stderr
        waited = kubectl(workdir, "wait", "pod/sleeper", "--for=condition=Ready", "--timeout=90s")
        assert waited.returncode == 0, waited.stderr + kubectl(workdir, "describe", "pod/sleeper").stdout

        node_root = realnode.node_root(workdir)
        socket = node_root / "containerd" / "containerd.sock"
        assert realnode.leftovers(node_root, socket), "a running node must show up in leftovers()"

        # Crash: containerd and kubelet die without any clean-up (shims and the pod live on).
        state = json.loads((workdir / "state.json").read_text())
        pids = {p["name"]: p["pid"] for p in state["processes"]}
        for name in ("kubelet", "containerd"):
            os.killpg(pids[name], signal.SIGKILL)
        wait_for(lambda: not Path(f"/proc/{pids['kubelet']}").exists(), 10, message="kubelet gone")
    finally:
        down = cli("down", "--dir", str(workdir))
    assert down.returncode == 0, down.stdout + down.stderr
    node_root = realnode.node_root(workdir)
    socket = node_root / "containerd" / "containerd.sock"
    left = realnode.leftovers(node_root, socket)
    assert left == [], left
    # nothing of the control plane either
    for proc in state["processes"]:
        assert not _alive(proc["pid"], proc["starttime"]), f"{proc['name']} survived down"
    down_again = cli("down", "--dir", str(workdir))
    assert down_again.returncode == 0, down_again.stderr
    assert realnode.leftovers(node_root, socket) == []


def realnode_sandbox_ref(workdir: Path) -> str:
    """The pause image the node was started with (any imported image would do for a sleeper)."""
    config = (realnode.node_root(workdir) / "containerd" / "config.toml").read_text()
    for line in config.splitlines():
        if line.strip().startswith("sandbox ="):
            return str(json.loads(line.split("=", 1)[1].strip()))
    pytest.fail(f"no sandbox image in the containerd config of {workdir}")


def _alive(pid: int, starttime: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0] not in ("Z", "X") and int(fields[19]) == starttime


def test_cluster_up_says_why_without_root() -> None:
    """Where the node cannot run, ``up`` says so plainly and still brings the control plane up."""
    reason = realnode.unavailable_reason({"kubelet": Path("/nonexistent/kubelet")})
    if os.geteuid() == 0:
        assert reason is not None and "missing binaries kubelet (/nonexistent/kubelet)" in reason
        assert "make binaries" in reason
    else:
        assert reason is not None and "root" in reason
