"""A real node for the local control plane: containerd + kubelet + kube-proxy + CoreDNS on this host.

kwok plays the kubelets of the fake nodes (scale and timing); this module runs one *real* node,
``real-0``, beside them, so that containers the operator specifies actually run: probes, init
containers, traffic, failures. It is started and stopped by :class:`localcluster.LocalControlPlane`
(``LocalControlPlane(..., real_node=True)``, the default of ``make cluster-up`` where the machine
can run it); see ``../shared/reference/real-node.md`` for what was seen working on this machine
kind and the traps that shaped the choices below.

Pieces (binaries from ``hack/build-binaries.sh`` and Debian via ``hack/install-node-deps.sh``):

* **containerd 2.x** (built from its Go module) with Debian's ``runc`` and CNI plugins; its root,
  state, socket and network namespaces all live under ``<workdir>/node``. The sandbox (pause)
  image is built locally (``hack/images.py``) and imported before kubelet starts: nothing is
  pulled. ``restrict_oom_score_adj``: root lacks CAP_SYS_RESOURCE in this VM.
* **kubelet** with its own identity (``system:node:real-0`` client certificate from the cluster's
  CA; NodeRestriction admission is on), a serving certificate signed by the same CA (so the
  API server verifies it for ``kubectl logs/exec/port-forward``), webhook authn/authz, cgroup v1
  with the cgroupfs driver (``failCgroupV1: false``). It registers labelled
  ``modeldeploy.io/node=real`` and tainted ``modeldeploy.io/real-node=true:NoSchedule``: nothing
  lands on it unless it asks to.
* **kube-proxy** (iptables mode, ``system:kube-proxy``), NodePorts only on the node IP.
* **CoreDNS** (built from its Go module with the plugins it needs) as a host process bound to the
  node IP, serving ``cluster.local`` from the API server; the ``kube-dns`` Service (ClusterIP
  ``10.96.0.10``) points at it with a selector-less EndpointSlice. Other names are refused, so
  no pod query leaves the machine.

Networking stays on this machine: the node IP is a /32 on ``lo`` (this VM has no ``dummy`` links),
pods sit on a bridge with a /24 of their own, a FORWARD guard only lets packets from and to that
bridge stay on it, and blackhole routes swallow kwok's fake pod and node addresses (Services of
fake pods have endpoints that exist nowhere). Service ClusterIPs without a DNAT rule route into a
port-less bridge. The API server listens on the node IP too and advertises it, so
``kubernetes.default`` reaches it from pods as on a real cluster.

Teardown is exact: everything ``up`` creates is recorded in ``<workdir>/node/created.json`` as
it is created (so ``down`` after a crash knows it too), and :meth:`RealNode.stop` undoes it in
the order that leaves nothing behind (pods, kubelet and kube-proxy, containers and shims,
containerd, mounts, cgroups, network). One real node per host at a time (a lock file).

Dependencies: the standard library and ``pyyaml``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hack.procutil import file_lock, poll

HACK_DIR = Path(__file__).resolve().parent

NODE_NAME = "real-0"
NODE_IP = "10.250.0.1"
NODE_LABEL = ("modeldeploy.io/node", "real")
NODE_TAINT = {"key": "modeldeploy.io/real-node", "value": "true", "effect": "NoSchedule"}
POD_SUBNET = "10.244.250.0/24"  # inside the cluster's pod CIDR, apart from the fake nodes' /24s
POD_BRIDGE = "mdpod0"
SERVICE_BRIDGE = "mdsvc0"  # port-less: ClusterIPs without a DNAT rule go nowhere
CLUSTER_DNS_IP = "10.96.0.10"
CLUSTER_DOMAIN = "cluster.local"
CNI_BIN_DIR = Path("/usr/lib/cni")
RUNC = Path("/usr/sbin/runc")
DEBIAN_TOOLS: Mapping[str, str] = {  # command -> Debian package (hack/install-node-deps.sh)
    "runc": "runc",
    "iptables": "iptables",
    "ip6tables": "iptables",
    "iptables-save": "iptables",
    "iptables-restore": "iptables",
    "conntrack": "conntrack",
    "ip": "iproute2",
}
GUARD_CHAIN = "MODELDEPLOY-FORWARD"
# Node state lives under a short path: unix sockets (containerd's, kubelet's pod-resources) must
# fit in 104 bytes, which a pytest tmp dir plus .../containerd.sock.ttrpc does not.
NODE_STATE_BASE = Path("/var/lib/modeldeploy/nodes")
LOCK_FILE = Path("/run/modeldeploy-real-node.lock")
CGROUP_ROOT = Path("/sys/fs/cgroup")
OUR_CHAIN_PREFIXES = ("KUBE-", "MODELDEPLOY-")
SYSCTLS = ("net/ipv4/ip_forward", "net/bridge/bridge-nf-call-iptables")


def on_node(pod_spec: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``pod_spec`` (a ModelDeployment's ``server``, a pod's spec) asking for the real node:
    its label and a toleration of its taint."""
    spec = json.loads(json.dumps(pod_spec))
    key, value = NODE_LABEL
    spec.setdefault("nodeSelector", {})[key] = value
    spec.setdefault("tolerations", []).append({**NODE_TAINT, "operator": "Equal"})
    return spec


class RealNodeUnavailable(RuntimeError):
    """This machine cannot run the real node (not root, no cgroups, a missing package or binary)."""


class RealNodeError(RuntimeError):
    """The real node failed to start or stop."""


# --------------------------------------------------------------------------------------------------
# Can this machine run it?


def unavailable_reason(binaries: Mapping[str, Path]) -> str | None:
    """Why the real node cannot run here, or None. ``binaries``: name -> path of the Go-built ones."""
    if os.geteuid() != 0:
        return "the real node needs root (network, mounts, cgroups)"
    if not (CGROUP_ROOT / "memory").is_dir() and not (CGROUP_ROOT / "cgroup.controllers").is_file():
        return f"no cgroup hierarchy under {CGROUP_ROOT}"
    missing = [f"{cmd} (Debian package {pkg})" for cmd, pkg in DEBIAN_TOOLS.items() if not shutil.which(cmd)]
    missing += [
        f"CNI plugin {p} (Debian containernetworking-plugins)"
        for p in ("bridge", "host-local", "loopback", "portmap")
        if not (CNI_BIN_DIR / p).is_file()
    ]
    if missing:
        return "missing " + ", ".join(missing) + " -- run hack/install-node-deps.sh as root"
    absent = [f"{name} ({path})" for name, path in binaries.items() if not path.is_file()]
    if absent:
        return "missing binaries " + ", ".join(absent) + " -- run `make binaries`"
    if not Path("/proc/sys/net/bridge").is_dir():
        return "the kernel has no br_netfilter (/proc/sys/net/bridge)"
    return None


# --------------------------------------------------------------------------------------------------
# Small system helpers


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RealNodeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def read_sysctl(name: str) -> str | None:
    try:
        return (Path("/proc/sys") / name).read_text().strip()
    except OSError:
        return None


def write_sysctl(name: str, value: str) -> None:
    (Path("/proc/sys") / name).write_text(value + "\n")


def mounts_under(prefix: Path) -> list[str]:
    """Mount points at or under ``prefix`` (deepest first), from /proc/self/mountinfo."""
    base = str(prefix)
    points: list[str] = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == base or point.startswith(base + "/"):
            points.append(point)
    return sorted(points, key=lambda p: (p.count("/"), p), reverse=True)


def unmount_all(prefix: Path, max_rounds: int = 50) -> list[str]:
    """Unmount everything under ``prefix``; bounded (kubelet bind-mounts its root onto itself, and a
    stacked mount needs one umount per layer). Returns what is still mounted."""
    for _ in range(max_rounds):
        points = mounts_under(prefix)
        if not points:
            return []
        for point in points:
            run(["umount", "-l", point], check=False, timeout=20)
    return mounts_under(prefix)


def pids_with(pred: Callable[[list[str]], bool]) -> list[int]:
    """Processes whose argv satisfies ``pred``."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv if a]
        if words and pred(words):
            found.append(int(entry.name))
    return found


def kill_and_wait(pids: Iterable[int], timeout: float = 10) -> None:
    pids = [p for p in pids if p != os.getpid()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def gone() -> bool | None:
        if not any(Path(f"/proc/{p}").exists() for p in pids):
            return True
        for pid in pids:  # reap our own children, or they stay as zombies under /proc
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
        return None

    with contextlib.suppress(TimeoutError):  # what outlives SIGKILL is the caller's to report
        poll(gone, timeout=timeout, interval=0.05, what="killed processes gone")


def cgroup_dirs(name: str) -> list[Path]:
    """``<hierarchy>/<name>`` in every cgroup v1 hierarchy (and the v2 one) that has it."""
    dirs: list[Path] = []
    for hierarchy in [CGROUP_ROOT, *sorted(CGROUP_ROOT.iterdir())] if CGROUP_ROOT.is_dir() else []:
        candidate = hierarchy / name
        if candidate.is_dir():
            dirs.append(candidate)
    return dirs


def cgroup_tree(directory: Path) -> list[Path]:
    """``directory`` and the cgroups below it. One removed while we walk (a container's cgroup going
    away as it stops) is left out, not an error: os.walk skips what it cannot list, where
    Path.rglob raised FileNotFoundError (seen: make cluster-down failed on it)."""
    return [Path(root) for root, _dirs, _files in os.walk(directory)]


def cgroup_pids(directory: Path) -> list[int]:
    pids: list[int] = []
    for cgroup in cgroup_tree(directory):
        with contextlib.suppress(OSError):
            pids += [int(x) for x in (cgroup / "cgroup.procs").read_text().split()]
    return pids


def remove_cgroup_tree(directory: Path) -> bool:
    """rmdir a cgroup and its children, deepest first; True when gone."""
    for sub in sorted(cgroup_tree(directory)[1:], key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        directory.rmdir()
    return not directory.exists()


def strip_our_iptables(binary_prefix: str) -> None:
    """Remove every chain and rule of ours (``KUBE-*``, ``MODELDEPLOY-*``) from every table of
    ``iptables`` or ``ip6tables``: kube-proxy --cleanup leaves kubelet's own chains behind."""
    saved = run([f"{binary_prefix}-save"], check=False)
    if saved.returncode != 0 or not any(p in saved.stdout for p in OUR_CHAIN_PREFIXES):
        return
    kept = [line for line in saved.stdout.splitlines() if not mentions_our_chain(line)]
    proc = subprocess.run(
        [f"{binary_prefix}-restore"], input="\n".join(kept) + "\n", capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0:
        raise RealNodeError(f"{binary_prefix}-restore failed: {proc.stderr.strip()}")


_CHAIN_WORD = re.compile(r"(?:^:|\s-[jgA]\s|^-A\s|\s--jump\s)(KUBE-|MODELDEPLOY-)")


def mentions_our_chain(line: str) -> bool:
    """An iptables-save line that declares, fills or jumps to one of our chains."""
    return bool(_CHAIN_WORD.search(" " + line if line.startswith("-A") else line)) or (
        line.startswith(":") and line[1:].startswith(OUR_CHAIN_PREFIXES)
    )


def our_iptables_lines() -> list[str]:
    lines: list[str] = []
    for prefix in ("iptables", "ip6tables"):
        saved = run([f"{prefix}-save"], check=False)
        lines += [f"{prefix}: {line}" for line in saved.stdout.splitlines() if mentions_our_chain(line)]
    return lines


# --------------------------------------------------------------------------------------------------
# Configuration documents (pure: unit-tested)


def node_root(workdir: Path) -> Path:
    """Where the real node of the cluster in ``workdir`` keeps its state (short: see NODE_STATE_BASE)."""
    digest = hashlib.sha256(str(Path(workdir).resolve()).encode()).hexdigest()[:12]
    return NODE_STATE_BASE / digest


def created_file(workdir: Path) -> Path:
    """The record of what the real node of ``workdir`` created on the host (``down`` reads it)."""
    return Path(workdir) / "node" / "created.json"


@dataclass(frozen=True)
class NodePaths:
    """Where the real node keeps its state: everything under ``<workdir>/node``."""

    root: Path

    @property
    def containerd_root(self) -> Path:
        return self.root / "containerd" / "root"

    @property
    def containerd_state(self) -> Path:
        return self.root / "containerd" / "state"

    @property
    def containerd_config(self) -> Path:
        return self.root / "containerd" / "config.toml"

    @property
    def containerd_socket(self) -> Path:
        return self.root / "containerd" / "containerd.sock"

    @property
    def cni_conf_dir(self) -> Path:
        return self.root / "cni" / "net.d"

    @property
    def cni_data_dir(self) -> Path:
        return self.root / "cni" / "ipam"

    @property
    def kubelet_root(self) -> Path:
        return self.root / "kubelet"

    @property
    def kubelet_config(self) -> Path:
        return self.root / "kubelet-config.yaml"

    @property
    def pod_logs(self) -> Path:
        return self.root / "pod-logs"

    @property
    def resolv_conf(self) -> Path:
        return self.root / "resolv.conf"

    @property
    def kube_proxy_config(self) -> Path:
        return self.root / "kube-proxy-config.yaml"

    @property
    def corefile(self) -> Path:
        return self.root / "Corefile"


def containerd_config(paths: NodePaths, sandbox_image: str) -> str:
    """containerd 2.x (config version 3): CRI with runc, cgroupfs, our CNI dirs, the local pause image."""
    q = json.dumps
    return f"""version = 3
root = {q(str(paths.containerd_root))}
state = {q(str(paths.containerd_state))}
disabled_plugins = ["io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = {q(str(paths.containerd_socket))}

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = {q(sandbox_image)}

[plugins."io.containerd.cri.v1.runtime"]
  enable_selinux = false
  # root has no CAP_SYS_RESOURCE in this VM: a negative oom_score_adj makes runc fail
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = {q(str(RUNC))}
        Root = {q(str(paths.containerd_state / "runc"))}
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = [{q(str(CNI_BIN_DIR))}]
    conf_dir = {q(str(paths.cni_conf_dir))}
    max_conf_num = 1

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"""


def cni_config(paths: NodePaths) -> dict[str, Any]:
    """A bridge with host-local IPAM (state under the node's dir) and portmap for hostPorts."""
    return {
        "cniVersion": "1.0.0",
        "name": "modeldeploy-pods",
        "plugins": [
            {
                "type": "bridge",
                "bridge": POD_BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(paths.cni_data_dir),
                    "ranges": [[{"subnet": POD_SUBNET}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(
    paths: NodePaths, *, ca_file: Path, serving_cert: Path, serving_key: Path, port: int, healthz_port: int
) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP,
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": NODE_IP,
        "healthzPort": healthz_port,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca_file)},
        },
        "authorization": {"mode": "Webhook"},
        "tlsCertFile": str(serving_cert),
        "tlsPrivateKeyFile": str(serving_key),
        # cgroup v1 (hybrid) host: kubelet 1.35 refuses v1 unless told, and there is no systemd here
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "failSwapOn": False,
        "containerRuntimeEndpoint": f"unix://{paths.containerd_socket}",
        "imageServiceEndpoint": f"unix://{paths.containerd_socket}",
        "podLogsDir": str(paths.pod_logs),
        "clusterDNS": [CLUSTER_DNS_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": str(paths.resolv_conf),
        # images are imported, never pulled: never collect them
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1%",
        },
        "registerWithTaints": [NODE_TAINT],
        "serializeImagePulls": False,
        "maxPods": 110,
        "syncFrequency": "10s",
        "nodeStatusUpdateFrequency": "5s",
        "volumePluginDir": str(paths.root / "volume-plugins"),
        "makeIPTablesUtilChains": True,
        "protectKernelDefaults": False,
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        "shutdownGracePeriod": "0s",
        "localStorageCapacityIsolation": True,
    }


def kube_proxy_config(
    kubeconfig: Path, *, cluster_cidr: str, healthz_port: int, metrics_port: int
) -> dict[str, Any]:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",
        "hostnameOverride": NODE_NAME,
        "bindAddress": NODE_IP,
        "clusterCIDR": cluster_cidr,
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "healthzBindAddress": f"{NODE_IP}:{healthz_port}",
        "metricsBindAddress": f"{NODE_IP}:{metrics_port}",
        "nodePortAddresses": [f"{NODE_IP}/32"],
        "iptables": {"localhostNodePorts": False, "syncPeriod": "30s", "minSyncPeriod": "0s"},
        # leave the host's conntrack sysctls alone
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
    }


def corefile(kubeconfig: Path, context: str, health_port: int, ready_port: int) -> str:
    """Cluster names only; anything else is refused (no server block), so nothing leaves the machine."""
    return f"""{CLUSTER_DOMAIN}:53 in-addr.arpa:53 ip6.arpa:53 {{
    bind {NODE_IP}
    errors
    health {NODE_IP}:{health_port}
    ready {NODE_IP}:{ready_port}
    cache 5
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig} {context}
        pods insecure
        ttl 5
    }}
}}
"""


def kube_dns_objects() -> list[tuple[str, dict[str, Any]]]:
    """(API path, body) of the kube-dns Service and its selector-less EndpointSlice -> CoreDNS."""
    labels = {"k8s-app": "kube-dns", "kubernetes.io/name": "CoreDNS"}
    ports = [("dns", "UDP"), ("dns-tcp", "TCP")]
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": labels},
        "spec": {
            "clusterIP": CLUSTER_DNS_IP,
            "ports": [{"name": n, "protocol": p, "port": 53, "targetPort": 53} for n, p in ports],
        },
    }
    slice_ = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "kube-dns-host",
            "namespace": "kube-system",
            "labels": {
                "kubernetes.io/service-name": "kube-dns",
                "endpointslice.kubernetes.io/managed-by": "modeldeploy-localcluster",
            },
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [NODE_IP], "conditions": {"ready": True}}],
        "ports": [{"name": n, "protocol": p, "port": 53} for n, p in ports],
    }
    return [
        ("/api/v1/namespaces/kube-system/services", service),
        ("/apis/discovery.k8s.io/v1/namespaces/kube-system/endpointslices", slice_),
    ]


# --------------------------------------------------------------------------------------------------
# The node


@dataclass(frozen=True)
class NodeBinaries:
    kubelet: Path
    kube_proxy: Path
    containerd: Path
    containerd_shim: Path
    ctr: Path
    coredns: Path

    @classmethod
    def locate(cls, cache: Path, versions: Mapping[str, str]) -> NodeBinaries:
        kube = cache / "bin" / f"kubernetes-v{versions['K8S_VERSION']}"
        ctrd = cache / "bin" / f"containerd-v{versions['CONTAINERD_VERSION']}"
        return cls(
            kubelet=kube / "kubelet",
            kube_proxy=kube / "kube-proxy",
            containerd=ctrd / "containerd",
            containerd_shim=ctrd / "containerd-shim-runc-v2",
            ctr=ctrd / "ctr",
            coredns=cache / "bin" / f"coredns-v{versions['COREDNS_VERSION']}" / "coredns",
        )

    def as_dict(self) -> dict[str, Path]:
        return dict(vars(self))


class Created:
    """What ``up`` created on the host, persisted as it happens (``down`` after a crash reads it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {}
        with contextlib.suppress(FileNotFoundError, ValueError):
            self.data = json.loads(path.read_text())

    def add(self, key: str, value: Any) -> None:
        items = self.data.setdefault(key, [])
        if value not in items:
            items.append(value)
        self._save()

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        self._save()

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        tmp.replace(self.path)

    def clear(self) -> None:
        self.data = {}
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def host_lock() -> contextlib.AbstractContextManager[None]:
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    return file_lock(LOCK_FILE.with_suffix(".flock"))


def claim_host(node_root: Path, workdir: Path) -> None:
    """Record that the real node of ``node_root`` owns this host's node network. Another node that
    still runs (a process of it is alive) keeps the host: refused. One whose processes are all gone
    (its cluster crashed, or was killed before ``down``) is torn down first, from its record."""
    for _ in range(2):
        with host_lock():
            try:
                owner_root, _, owner_dir = LOCK_FILE.read_text().strip().partition("\t")
            except FileNotFoundError:
                owner_root, owner_dir = "", ""
            stale = bool(owner_root) and Path(owner_root) != node_root and Path(owner_root).exists()
            if not stale:
                LOCK_FILE.write_text(f"{node_root}\t{workdir}\n")
                return
            if pids_with(lambda argv, root=owner_root: any(root in word for word in argv)):
                raise RealNodeError(
                    f"another real node (cluster {owner_dir}) runs on this host; stop it first "
                    f"(python -m hack.localcluster down --dir {owner_dir})"
                )
        old = NodePaths(Path(owner_root))
        teardown_node(old, created_file(Path(owner_dir)) if owner_dir else old.root / "created.json")
    raise RealNodeError(f"could not take this host over from the stale real node in {owner_root}")


def release_host(node_root: Path) -> None:
    with host_lock(), contextlib.suppress(FileNotFoundError):
        if Path(LOCK_FILE.read_text().strip().partition("\t")[0]) == node_root:
            LOCK_FILE.unlink()


def setup_network(created: Created, blackholes: Sequence[str], service_cidr: str) -> None:
    """Node IP, routes, bridges, FORWARD guard and sysctls, each recorded before the next."""
    sysctls = created.get("sysctls") or {}
    for name in SYSCTLS:
        if name not in sysctls:
            sysctls[name] = read_sysctl(name)
            created.set("sysctls", sysctls)
    write_sysctl("net/ipv4/ip_forward", "1")
    write_sysctl("net/bridge/bridge-nf-call-iptables", "1")
    created.set("lo_address", True)
    if NODE_IP not in run(["ip", "-4", "addr", "show", "dev", "lo"]).stdout:
        run(["ip", "addr", "add", f"{NODE_IP}/32", "dev", "lo"])
    for bridge in (POD_BRIDGE, SERVICE_BRIDGE):
        created.add("links", bridge)
    if run(["ip", "link", "show", SERVICE_BRIDGE], check=False).returncode != 0:
        run(["ip", "link", "add", SERVICE_BRIDGE, "type", "bridge"])
    run(["ip", "link", "set", SERVICE_BRIDGE, "up"])
    created.add("routes", ["ip", "route", "replace", service_cidr, "dev", SERVICE_BRIDGE])
    run(["ip", "route", "replace", service_cidr, "dev", SERVICE_BRIDGE])
    for cidr in blackholes:
        created.add("routes", ["ip", "route", "replace", "blackhole", cidr])
        run(["ip", "route", "replace", "blackhole", cidr])
    # FORWARD guard: packets from the pod bridge stay on it; nothing from elsewhere is forwarded in.
    created.set("guard", True)
    run(["iptables", "-N", GUARD_CHAIN], check=False)
    run(["iptables", "-F", GUARD_CHAIN])
    run(["iptables", "-A", GUARD_CHAIN, "-i", POD_BRIDGE, "-o", POD_BRIDGE, "-j", "ACCEPT"])
    run(["iptables", "-A", GUARD_CHAIN, "-i", POD_BRIDGE, "-j", "DROP"])
    run(["iptables", "-A", GUARD_CHAIN, "-o", POD_BRIDGE, "-j", "DROP"])
    if run(["iptables", "-C", "FORWARD", "-j", GUARD_CHAIN], check=False).returncode != 0:
        run(["iptables", "-I", "FORWARD", "1", "-j", GUARD_CHAIN])


def teardown_network(created: Created) -> None:
    """Undo :func:`setup_network` and what CNI, kubelet and kube-proxy added (veths, chains)."""
    for link in run(["ip", "-o", "link", "show", "master", POD_BRIDGE], check=False).stdout.splitlines():
        name = link.split(":")[1].strip().split("@")[0]
        run(["ip", "link", "del", name], check=False)
    for bridge in created.get("links") or []:
        run(["ip", "link", "del", bridge], check=False)
    for route in created.get("routes") or []:
        run(["ip", "route", "del", *route[3:]], check=False)
    if created.get("lo_address"):
        run(["ip", "addr", "del", f"{NODE_IP}/32", "dev", "lo"], check=False)
    strip_our_iptables("iptables")
    strip_our_iptables("ip6tables")
    for name, value in (created.get("sysctls") or {}).items():
        if value is not None:
            with contextlib.suppress(OSError):
                write_sysctl(name, value)
    run(["conntrack", "-D", "-s", POD_SUBNET], check=False)
    run(["conntrack", "-D", "-d", POD_SUBNET], check=False)


def leftovers(node_root: Path, socket: Path) -> list[str]:
    """What of a real node is still on this host (empty after a clean ``down``)."""
    found: list[str] = []
    sock = str(socket)
    procs = pids_with(lambda a: any(sock in w for w in a) or any(str(node_root) in w for w in a))
    found += [f"process {p}: {' '.join(_argv(p))[:120]}" for p in procs]
    found += [f"cgroup {d}" for d in cgroup_dirs("kubepods")]
    found += [f"mount {m}" for m in mounts_under(node_root)]
    if node_root.exists():
        found.append(f"directory {node_root}")
    for bridge in (POD_BRIDGE, SERVICE_BRIDGE):
        if run(["ip", "link", "show", bridge], check=False).returncode == 0:
            found.append(f"link {bridge}")
    veths = run(["ip", "-o", "link", "show", "type", "veth"], check=False).stdout.strip()
    found += [f"veth {line.split(':')[1].strip()}" for line in veths.splitlines() if line]
    if NODE_IP in run(["ip", "-4", "addr", "show", "dev", "lo"], check=False).stdout:
        found.append(f"address {NODE_IP} on lo")
    routes = run(["ip", "route", "show"], check=False).stdout
    found += [f"route {r}" for r in routes.splitlines() if SERVICE_BRIDGE in r or r.startswith("blackhole")]
    found += our_iptables_lines()
    return found


def _argv(pid: int) -> list[str]:
    try:
        return [
            a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a
        ]
    except OSError:
        return []


def kill_node_processes(node_root: Path, socket: Path) -> None:
    """SIGKILL container processes (kubepods cgroups), shims of our containerd and anything else
    started with our paths; waits until they are gone."""
    for directory in cgroup_dirs("kubepods"):
        kill_and_wait(cgroup_pids(directory))
    sock = str(socket)
    kill_and_wait(pids_with(lambda a: any(sock in w for w in a) or any(str(node_root) in w for w in a)))


def remove_cgroups() -> list[str]:
    stuck: list[str] = []
    for directory in cgroup_dirs("kubepods"):
        for _ in range(3):
            kill_and_wait(cgroup_pids(directory), timeout=5)
            if remove_cgroup_tree(directory):
                break
        else:
            stuck.append(str(directory))
    return stuck


def remove_log_links(pod_logs: Path) -> None:
    """kubelet links container logs into /var/log/containers; drop the links into our pod logs."""
    links = Path("/var/log/containers")
    if not links.is_dir():
        return
    for link in links.iterdir():
        with contextlib.suppress(OSError):
            if link.is_symlink() and os.readlink(link).startswith(str(pod_logs)):
                link.unlink()


class RealNode:
    """The real node of one :class:`localcluster.LocalControlPlane` (passed as ``cp``: the node spawns
    its processes through it, so they are saved, sampled and stopped like the other components)."""

    PROCESSES: tuple[str, ...] = ("containerd", "kubelet", "kube-proxy", "coredns")
    # Fixed, on the node IP (ours alone: one real node per host), so no other process can take one
    # between choosing and binding it (a free 127.0.0.1 port picked at start-up was, once, by then).
    PORTS: Mapping[str, int] = {
        "kubelet": 10250,
        "kubelet-healthz": 10248,
        "kube-proxy-healthz": 10256,
        "kube-proxy-metrics": 10249,
        "coredns-health": 10254,
        "coredns-ready": 10253,
    }

    def __init__(self, cp: Any, binaries: NodeBinaries) -> None:
        self.cp = cp
        self.binaries = binaries
        self.paths = NodePaths(node_root(Path(cp.workdir)))
        self.created_file = created_file(Path(cp.workdir))
        self.timings: dict[str, float] = {}

    # ---- PKI (before the API server starts: it needs the kubelet client certificate) -------------

    def issue_credentials(
        self, pki: Any, server: str, kubeconfig_dict: Callable[..., dict[str, Any]]
    ) -> None:
        """Node, kube-proxy and CoreDNS identities and the kubelet's serving certificate."""
        import ipaddress

        from cryptography import x509  # the control plane's PKI dependency

        wd = Path(self.cp.workdir)
        identities = {
            "kubelet": (f"system:node:{NODE_NAME}", ("system:nodes",)),
            "kube-proxy": ("system:kube-proxy", ()),
            "coredns": ("system:coredns", ("system:masters",)),
        }
        for stem, (user, groups) in identities.items():
            crt, key = pki.issue(stem, user, groups)
            path = wd / f"{stem}.kubeconfig"
            path.write_text(yaml.safe_dump(kubeconfig_dict(server, pki.ca_cert, crt, key, user)))
            path.chmod(0o600)
        sans = [x509.DNSName(NODE_NAME), x509.IPAddress(ipaddress.ip_address(NODE_IP))]
        pki.issue("kubelet-serving", f"system:node:{NODE_NAME}", ("system:nodes",), sans=sans)
        pki.issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client", ("system:masters",))

    @staticmethod
    def apiserver_flags(pki_dir: Path) -> list[str]:
        """What the API server needs for a real node: listen on and advertise the node IP (so the
        ``kubernetes`` Service has an endpoint pods reach), Node authorization, NodeRestriction, and
        a client certificate for kubelet's API (logs, exec, port-forward)."""
        return [
            "--bind-address=0.0.0.0",
            f"--advertise-address={NODE_IP}",
            "--endpoint-reconciler-type=lease",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            f"--kubelet-client-certificate={pki_dir / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki_dir / 'apiserver-kubelet-client.key'}",
            f"--kubelet-certificate-authority={pki_dir / 'ca.crt'}",
            "--kubelet-preferred-address-types=InternalIP",
        ]

    # ---- start ------------------------------------------------------------------------------------

    def start(
        self,
        *,
        pod_cidr: str,
        service_cidr: str,
        fake_node_cidr: str,
        sandbox_image: Callable[[], tuple[str, Path]],
    ) -> None:
        """Network, containerd (+ the pause image), kubelet until the node is Ready, kube-proxy, DNS."""
        t0 = time.monotonic()
        paths, cp = self.paths, self.cp
        for sub in (
            paths.root / "containerd",
            paths.cni_conf_dir,
            paths.cni_data_dir,
            paths.pod_logs,
            paths.kubelet_root,
        ):
            sub.mkdir(parents=True, exist_ok=True)
        claim_host(paths.root, Path(cp.workdir))
        created = Created(self.created_file)
        created.set("node_root", str(paths.root))
        setup_network(created, blackholes=[pod_cidr, fake_node_cidr], service_cidr=service_cidr)
        self.timings["network"] = time.monotonic() - t0

        image, archive = sandbox_image()
        paths.containerd_config.write_text(containerd_config(paths, image))
        (paths.cni_conf_dir / "10-modeldeploy.conflist").write_text(json.dumps(cni_config(paths), indent=2))
        paths.resolv_conf.write_text("# pods resolve cluster names only (kube-dns); nothing upstream\n")
        env_path = os.pathsep.join([str(self.binaries.containerd.parent), os.environ.get("PATH", os.defpath)])
        cp._spawn(
            "containerd",
            [str(self.binaries.containerd), f"--config={paths.containerd_config}"],
            extra_env={"PATH": env_path},
        )
        cp._wait("containerd", self._containerd_ready, ["containerd"])
        self.import_image(archive)
        self.timings["containerd"] = time.monotonic() - t0

        pki = cp.pki
        paths.kubelet_config.write_text(
            yaml.safe_dump(
                kubelet_config(
                    paths,
                    ca_file=pki.ca_cert,
                    serving_cert=pki.directory / "kubelet-serving.crt",
                    serving_key=pki.directory / "kubelet-serving.key",
                    port=cp.ports["kubelet"],
                    healthz_port=cp.ports["kubelet-healthz"],
                )
            )
        )
        cp._spawn(
            "kubelet",
            [
                str(self.binaries.kubelet),
                f"--config={paths.kubelet_config}",
                f"--kubeconfig={cp.workdir / 'kubelet.kubeconfig'}",
                f"--root-dir={paths.kubelet_root}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_IP}",
                f"--node-labels={NODE_LABEL[0]}={NODE_LABEL[1]}",
                "--v=1",
            ],
            extra_env={"PATH": env_path},
        )
        cp._wait(f"node {NODE_NAME} Ready", self._node_ready, ["containerd", "kubelet"])
        self.timings["node ready"] = time.monotonic() - t0

        paths.kube_proxy_config.write_text(
            yaml.safe_dump(
                kube_proxy_config(
                    cp.workdir / "kube-proxy.kubeconfig",
                    cluster_cidr=pod_cidr,
                    healthz_port=cp.ports["kube-proxy-healthz"],
                    metrics_port=cp.ports["kube-proxy-metrics"],
                )
            )
        )
        cp._spawn("kube-proxy", [str(self.binaries.kube_proxy), f"--config={paths.kube_proxy_config}"])
        created.set("dns", True)
        for api_path, body in kube_dns_objects():
            status, answer = cp.api("POST", api_path, body)
            if status not in (201, 409):
                raise RealNodeError(f"creating {body['kind']} kube-dns failed: HTTP {status}: {answer}")
        paths.corefile.write_text(
            corefile(
                cp.workdir / "coredns.kubeconfig",
                cp.context_name,
                cp.ports["coredns-health"],
                cp.ports["coredns-ready"],
            )
        )
        cp._spawn("coredns", [str(self.binaries.coredns), f"-conf={paths.corefile}"])
        cp._wait(
            "kube-proxy /healthz and CoreDNS /ready",
            lambda: (
                _http_ok(cp.ports["kube-proxy-healthz"], "/healthz")
                and _http_ok(cp.ports["coredns-ready"], "/ready")
            ),
            list(self.PROCESSES),
        )
        self.timings["dns and proxy ready"] = time.monotonic() - t0

    def import_image(self, archive: Path) -> None:
        """Load an OCI archive (``hack/images.py``) into the node's containerd, unpacked for the CRI."""
        from hack import images

        images.import_into(self.binaries.ctr, self.paths.containerd_socket, archive)

    def _containerd_ready(self) -> bool:
        if not self.paths.containerd_socket.exists():
            return False
        return (
            run(
                [str(self.binaries.ctr), f"--address={self.paths.containerd_socket}", "version"],
                check=False,
                timeout=10,
            ).returncode
            == 0
        )

    def _node_ready(self) -> bool:
        status, node = self.cp.api("GET", f"/api/v1/nodes/{NODE_NAME}")
        if status != 200:
            return False
        conditions = (node.get("status") or {}).get("conditions") or []
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)

    # ---- stop -------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Undo everything (idempotent; works from ``created.json`` after a crash). kubelet and
        kube-proxy go first so nothing restarts containers, then the containers and their shims,
        containerd, mounts, cgroups, and last the network."""
        paths, cp = self.paths, self.cp
        for name in ("kubelet", "kube-proxy", "coredns"):
            proc = cp.processes.pop(name, None)
            if proc is not None:
                proc.stop()
        kill_node_processes(paths.root, paths.containerd_socket)  # containers, then anything left
        proc = cp.processes.pop("containerd", None)
        if proc is not None:
            proc.stop()
        teardown_node(paths, self.created_file)


def teardown_node(paths: NodePaths, created_file: Path) -> None:
    """Everything after the node's own processes are stopped: what is left of containers and shims,
    mounts, cgroups, kubelet's log links, the network, the node's state and the host claim."""
    errors: list[str] = []
    kill_node_processes(paths.root, paths.containerd_socket)  # shims that outlived containerd
    still = unmount_all(paths.root)
    if still:
        errors.append(f"still mounted: {still}")
    errors += [f"cgroup not removable: {d}" for d in remove_cgroups()]
    remove_log_links(paths.pod_logs)
    created = Created(created_file)
    teardown_network(created)
    if not still:
        shutil.rmtree(paths.root, ignore_errors=True)
        with contextlib.suppress(OSError):
            NODE_STATE_BASE.rmdir()
            NODE_STATE_BASE.parent.rmdir()
    if not errors:
        created.clear()
        release_host(paths.root)
    if errors:
        raise RealNodeError("; ".join(errors))


def _http_ok(port: int, path: str) -> bool:
    import http.client

    conn = http.client.HTTPConnection(NODE_IP, port, timeout=2)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()
