#!/usr/bin/env python3
"""A local Kubernetes control plane for tests and demos, without containers.

Runs real components built from their Go modules by ``hack/build-binaries.sh``
(cached under ``$MODELDEPLOY_CACHE``, default ``~/.cache/modeldeploy``):

    etcd -> kube-apiserver -> kube-controller-manager + kube-scheduler -> kwok

all bound to 127.0.0.1 on free ports, each in its own process group with a log
file under ``<workdir>/logs``. kwok stands in for the kubelets of a fixed set of
fake nodes (``FAKE_NODES``) and drives pods through the Stages in
``hack/kwok/stages.yaml`` (ready / never-ready / crash-loop by pod label
``simulate``).

Choices worth knowing:

* ServiceAccount admission stays ON (as in a real cluster): a pod is rejected
  until its namespace's ``default`` ServiceAccount exists, which the
  controller-manager creates within a moment of the namespace. Wait for it (the
  test fixture does) before creating bare pods. PodSecurity admission is on too
  (namespaces default to ``privileged``).
* Every component has its own client certificate (all in ``system:masters``) so
  the audit log (``<workdir>/logs/audit.log``, one Metadata entry per write
  request at stage ResponseComplete) attributes writes per user:
  ``admin`` (the kubeconfig handed out), ``system:kube-controller-manager``,
  ``system:kube-scheduler`` and ``system:kwok``. ``issue_kubeconfig`` mints more.
* Each ``start()`` begins from an empty etcd. ``stop_apiserver()`` /
  ``start_apiserver()`` restart only the apiserver, on the same etcd and port.

Library use::

    cp = LocalControlPlane(Path("/tmp/cp"))
    cp.start()            # raises BinariesMissing / ControlPlaneError
    subprocess.run(["kubectl", "get", "nodes"], env=cp.env())
    cp.stop()

CLI (processes outlive the command; state in ``<dir>/state.json``)::

    python -m hack.localcluster up --dir .cluster
    python -m hack.localcluster status --dir .cluster
    python -m hack.localcluster down --dir .cluster

Dependencies: the standard library, ``cryptography`` and ``pyyaml``.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import datetime
import http.client
import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hack import realnode
from hack.procutil import cache_dir, free_ports, poll, popen_logged

HACK_DIR = Path(__file__).resolve().parent


VERSIONS_FILE = HACK_DIR / "versions.env"
STAGES_FILE = HACK_DIR / "kwok" / "stages.yaml"

SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"
POD_CIDR = "10.244.0.0/16"
NODE_IP_DEFAULT = "10.0.0.1"
FAKE_NODE_IP_RANGE = "10.0.0.0/24"  # kwok's node IP and the fake nodes' (blackholed beside a real node)
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"
# Client-side rate limits of kube-controller-manager and kube-scheduler (defaults 20/30 and 50/100).
CONTROLLER_THROUGHPUT_FLAGS = ("--kube-api-qps=500", "--kube-api-burst=1000")
FAKE_NODE_ANNOTATION_VALUE = "fake"
CONTEXT_NAME = "modeldeploy-local"

# Controllers the kube-controller-manager runs (names from
# cmd/kube-controller-manager/names). node-lifecycle-controller is needed: the
# TaintNodesByCondition admission plugin creates every node with the
# node.kubernetes.io/not-ready taint, and only that controller lifts it once
# kwok reports the node Ready. The PersistentVolume binder binds claims to volumes
# (pvc:// on the real node), and the two protection controllers remove the
# kubernetes.io/pv[c]-protection finalizers that admission adds (without them a deleted
# claim, and its namespace, never go away). Node IPAM, taint eviction, attach/detach
# (the real node's volumes are local), CSR and quota controllers are left out.
CONTROLLERS: tuple[str, ...] = (
    "node-lifecycle-controller",
    "deployment-controller",
    "replicaset-controller",
    "statefulset-controller",
    "job-controller",
    "garbage-collector-controller",
    "horizontal-pod-autoscaler-controller",
    "disruption-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "clusterrole-aggregation-controller",
    "pod-garbage-collector-controller",
    "endpoints-controller",
    "endpointslice-controller",
    "endpointslice-mirroring-controller",
    "persistentvolume-binder-controller",
    "persistentvolume-protection-controller",
    "persistentvolumeclaim-protection-controller",
)

AUDIT_WRITE_VERBS: tuple[str, ...] = ("create", "update", "patch", "delete", "deletecollection")

# Client identities: (kubeconfig/cert file stem, user name). All are in
# system:masters; distinct names let the audit log tell them apart.
ADMIN_USER = "admin"
FRONT_PROXY_USER = "front-proxy-client"
COMPONENT_USERS: Mapping[str, str] = {
    "kube-controller-manager": "system:kube-controller-manager",
    "kube-scheduler": "system:kube-scheduler",
    "kwok": "system:kwok",
}

STOP_GRACE_SECONDS = 10.0
POLL_INTERVAL = 0.25


class ControlPlaneError(RuntimeError):
    """The control plane could not be started, or a component failed."""


class BinariesMissing(ControlPlaneError):
    """The Go-built binaries are not in the cache (run ``make binaries``)."""


# --------------------------------------------------------------------------------------------------
# Fake nodes


@dataclass(frozen=True)
class Taint:
    key: str
    value: str
    effect: str

    def manifest(self) -> dict[str, str]:
        return {"key": self.key, "value": self.value, "effect": self.effect}


@dataclass(frozen=True)
class FakeNode:
    """A node kwok pretends to run. ``manifest()`` is what gets created."""

    name: str
    pool: str
    cpu: str
    memory: str
    pods: str
    ip: str
    pod_cidr: str
    gpus: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Taint, ...] = ()

    @property
    def capacity(self) -> dict[str, str]:
        cap = {"cpu": self.cpu, "memory": self.memory, "pods": self.pods, "ephemeral-storage": "1Ti"}
        if self.gpus:
            cap["nvidia.com/gpu"] = str(self.gpus)
        return cap

    @property
    def all_labels(self) -> dict[str, str]:
        return {
            "type": "kwok",
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "kubernetes.io/hostname": self.name,
            **self.labels,
        }

    def manifest(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"podCIDR": self.pod_cidr, "podCIDRs": [self.pod_cidr]}
        if self.taints:
            spec["taints"] = [t.manifest() for t in self.taints]
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "annotations": {FAKE_NODE_ANNOTATION: FAKE_NODE_ANNOTATION_VALUE},
                "labels": self.all_labels,
            },
            "spec": spec,
            "status": {
                "capacity": self.capacity,
                "allocatable": self.capacity,
                "addresses": [
                    {"type": "InternalIP", "address": self.ip},
                    {"type": "Hostname", "address": self.name},
                ],
            },
        }


EDGE_TAINT = Taint("modeldeploy.io/edge", "true", "NoSchedule")


def default_nodes() -> tuple[FakeNode, ...]:
    """cpu-0..2, gpu-0..1 (8 nvidia.com/gpu each) and tainted edge-0..1."""
    nodes: list[FakeNode] = []
    index = 0

    def add(name: str, pool: str, cpu: str, memory: str, pods: str, **kw: Any) -> None:
        nonlocal index
        index += 1
        nodes.append(
            FakeNode(
                name=name,
                pool=pool,
                cpu=cpu,
                memory=memory,
                pods=pods,
                ip=f"10.0.0.{10 + index}",
                pod_cidr=f"10.244.{index}.0/24",
                **kw,
            )
        )

    for i in range(3):
        add(f"cpu-{i}", "cpu", "64", "512Gi", "2000")
    for i in range(2):
        add(f"gpu-{i}", "gpu", "64", "512Gi", "2000", gpus=8, labels={"nvidia.com/gpu.present": "true"})
    for i in range(2):
        add(
            f"edge-{i}",
            "edge",
            "8",
            "32Gi",
            "500",
            labels={"modeldeploy.io/pool": "edge"},
            taints=(EDGE_TAINT,),
        )
    return tuple(nodes)


FAKE_NODES: tuple[FakeNode, ...] = default_nodes()


NOT_READY_TAINT = "node.kubernetes.io/not-ready"


def node_schedulable(node: Mapping[str, Any]) -> bool:
    """Ready=True and no longer carrying the not-ready taint (which the scheduler honours)."""
    status = node.get("status") or {}
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
    )
    taints = (node.get("spec") or {}).get("taints") or []
    return ready and not any(t.get("key") == NOT_READY_TAINT for t in taints)


# --------------------------------------------------------------------------------------------------
# Images the real node needs before any pod: the sandbox (pause) image


def sandbox_image() -> tuple[str, Path]:
    """(reference, OCI archive) of the locally built pause image (built once, cached by content)."""
    from hack import images  # needs gcc, not needed without a real node

    built = images.build("pause")
    return built.ref, built.archive


# --------------------------------------------------------------------------------------------------
# Binaries


def read_versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    """Parse ``KEY=VALUE`` lines of hack/versions.env."""
    versions: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        versions[key.strip()] = value.strip().strip("'\"")
    return versions


def default_cache() -> Path:
    """``$MODELDEPLOY_CACHE`` (``~`` expanded), default ``~/.cache/modeldeploy``."""
    return cache_dir()


@dataclass(frozen=True)
class Binaries:
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    kubectl: Path
    etcd: Path
    kwok: Path
    helm: Path

    @classmethod
    def locate(cls, cache: Path | None = None, versions: Mapping[str, str] | None = None) -> Binaries:
        cache = cache or default_cache()
        v = dict(versions) if versions is not None else read_versions()
        kube = cache / "bin" / f"kubernetes-v{v['K8S_VERSION']}"
        paths = {
            "kube_apiserver": kube / "kube-apiserver",
            "kube_controller_manager": kube / "kube-controller-manager",
            "kube_scheduler": kube / "kube-scheduler",
            "kubectl": kube / "kubectl",
            "etcd": cache / "bin" / f"etcd-v{v['ETCD_VERSION']}" / "etcd",
            "kwok": cache / "bin" / f"kwok-v{v['KWOK_VERSION']}" / "kwok",
            "helm": cache / "bin" / f"helm-v{v['HELM_VERSION']}" / "helm",
        }
        missing = [
            str(p)
            for p in paths.values()
            if not (p.is_file() and os.access(p, os.X_OK) and (p.parent / ".stamp").is_file())
        ]
        if missing:
            raise BinariesMissing(
                "control-plane binaries missing: " + ", ".join(missing) + f" -- run `make binaries` "
                f"(hack/build-binaries.sh) to build them into {cache / 'bin'}"
            )
        return cls(**paths)

    def items(self) -> list[tuple[str, Path]]:
        return [(p.name, p) for p in vars(self).values()]


# --------------------------------------------------------------------------------------------------
# PKI and kubeconfigs


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _pem_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


def _name(cn: str, orgs: Sequence[str] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def _certificate(
    subject: x509.Name, issuer: x509.Name, public_key: Any, *, ca: bool
) -> x509.CertificateBuilder:
    """A ten-year certificate: a CA's (signs certificates) or a leaf's (signs, enciphers keys)."""
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=not ca,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )


@dataclass(frozen=True)
class Pki:
    """Files of the local PKI: one CA, an admin cert that also serves the apiserver, an SA key pair."""

    directory: Path

    SERVING_DNS: ClassVar[tuple[str, ...]] = (
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    )
    SERVING_IPS: ClassVar[tuple[str, ...]] = ("127.0.0.1", KUBERNETES_SERVICE_IP, realnode.NODE_IP)

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def admin_cert(self) -> Path:
        return self.directory / "admin.crt"

    @property
    def admin_key(self) -> Path:
        return self.directory / "admin.key"

    @property
    def front_proxy_cert(self) -> Path:
        return self.directory / "front-proxy-client.crt"

    @property
    def front_proxy_key(self) -> Path:
        return self.directory / "front-proxy-client.key"

    @property
    def sa_key(self) -> Path:
        return self.directory / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.directory / "sa.pub"

    @classmethod
    def generate(cls, directory: Path) -> Pki:
        directory.mkdir(parents=True, exist_ok=True)
        pki = cls(directory)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = _name("modeldeploy-local-ca")
        ca = (
            _certificate(ca_name, ca_name, ca_key.public_key(), ca=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        pki.ca_cert.write_bytes(_pem_cert(ca))
        _write_private(pki.ca_key, _pem_key(ca_key))
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in cls.SERVING_DNS]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in cls.SERVING_IPS]
        pki.issue("admin", ADMIN_USER, ("system:masters",), sans=sans)
        # Client cert the apiserver's aggregation layer presents to extension apiservers.
        pki.issue("front-proxy-client", FRONT_PROXY_USER)
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _write_private(pki.sa_key, _pem_key(sa_key))
        pki.sa_pub.write_bytes(
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return pki

    def issue(
        self,
        stem: str,
        common_name: str,
        orgs: Sequence[str] = (),
        sans: Sequence[x509.GeneralName] = (),
    ) -> tuple[Path, Path]:
        """Issue ``<stem>.crt``/``<stem>.key`` signed by the CA (client + server auth)."""
        ca_key = serialization.load_pem_private_key(self.ca_key.read_bytes(), password=None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        ca = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            _certificate(_name(common_name, orgs), ca.subject, key.public_key(), ca=False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        crt_path, key_path = self.directory / f"{stem}.crt", self.directory / f"{stem}.key"
        crt_path.write_bytes(_pem_cert(cert))
        _write_private(key_path, _pem_key(key))
        return crt_path, key_path


def kubeconfig_dict(server: str, ca_cert: Path, cert: Path, key: Path, user: str) -> dict[str, Any]:
    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": CONTEXT_NAME, "cluster": {"server": server, "certificate-authority-data": b64(ca_cert)}}
        ],
        "users": [
            {"name": user, "user": {"client-certificate-data": b64(cert), "client-key-data": b64(key)}}
        ],
        "contexts": [{"name": CONTEXT_NAME, "context": {"cluster": CONTEXT_NAME, "user": user}}],
        "current-context": CONTEXT_NAME,
        "preferences": {},
    }


def audit_policy() -> dict[str, Any]:
    """Metadata-level entries for every write, once per request (ResponseComplete), nothing else."""
    return {
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        "omitStages": ["RequestReceived"],
        "rules": [
            {"level": "Metadata", "verbs": list(AUDIT_WRITE_VERBS)},
            {"level": "None"},
        ],
    }


def load_stages(path: Path = STAGES_FILE) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    for d in docs:
        if d.get("kind") != "Stage":
            raise ValueError(f"{path}: unexpected document kind {d.get('kind')!r}")
    return docs


def kwok_config_documents(stages: Sequence[Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The multi-document kwok --config: a KwokConfiguration followed by the Stages.

    kwok applies no defaults to a KwokConfiguration read from a file (only to
    the built-in one), so every option it needs is spelled out here. The
    command-line flags repeat the ones that matter and win over these.
    """
    options: dict[str, Any] = {
        "cidr": POD_CIDR,
        "nodeIP": NODE_IP_DEFAULT,
        "manageAllNodes": False,
        "manageNodesWithAnnotationSelector": f"{FAKE_NODE_ANNOTATION}={FAKE_NODE_ANNOTATION_VALUE}",
        "nodeLeaseDurationSeconds": 40,
        "nodeLeaseParallelism": 4,
        "podPlayStageParallelism": 4,
        "nodePlayStageParallelism": 4,
        "podsOnNodeSyncParallelism": 1,
        "enablePodsOnNodeSyncListPager": True,
        "enablePodsOnNodeSyncStreamWatch": False,
        "enableDebuggingHandlers": False,
        "enableContentionProfiling": False,
        "enableProfilingHandler": False,
    }
    config: dict[str, Any] = {
        "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
        "kind": "KwokConfiguration",
        "metadata": {"name": "modeldeploy-local"},
        "options": options,
    }
    return [config, *[dict(s) for s in (stages if stages is not None else load_stages())]]


# --------------------------------------------------------------------------------------------------
# Processes


def _proc_starttime(pid: int) -> int | None:
    """Start time (clock ticks since boot) of ``pid``; None if it does not exist or is a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


@dataclass
class ManagedProcess:
    """One component process, in its own process group (pgid == pid)."""

    name: str
    argv: list[str]
    log: Path
    pid: int = 0
    starttime: int = 0
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def spawn(self, cwd: Path, env: Mapping[str, str], die_with_parent: bool) -> None:
        # PR_SET_PDEATHSIG fires when the forking *thread* exits: only from the main thread
        die_with_parent = die_with_parent and threading.current_thread() is threading.main_thread()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as logf:
            logf.write(
                f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {' '.join(self.argv)}\n".encode()
            )
            logf.flush()
            self.popen = popen_logged(self.argv, logf, cwd=cwd, env=env, die_with_parent=die_with_parent)
        self.pid = self.popen.pid
        self.starttime = _proc_starttime(self.pid) or 0

    def alive(self) -> bool:
        if not self.pid:
            return False
        if self.popen is not None:
            return self.popen.poll() is None
        st = _proc_starttime(self.pid)
        return st is not None and st == self.starttime

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode if self.popen is not None else None

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """SIGTERM the process group, SIGKILL after ``grace`` seconds; returns once it is gone."""
        if not self.alive():
            self._reap()
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGTERM)
        if not self._wait_gone(grace):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            if not self._wait_gone(grace):
                raise ControlPlaneError(f"{self.name} (pid {self.pid}) survived SIGKILL")
        # Leftover members of the group (none expected): the group id was verified as ours above.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    def _wait_gone(self, timeout: float) -> bool:
        if self.popen is not None:
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        try:
            poll(
                lambda: None if self.alive() else True,
                timeout=timeout,
                interval=0.05,
                what=f"{self.name} gone",
            )
        except TimeoutError:
            return False
        return True

    def _reap(self) -> None:
        if self.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=0)

    def state(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pid": self.pid,
            "starttime": self.starttime,
            "argv": self.argv,
            "log": str(self.log),
        }

    @classmethod
    def from_state(cls, data: Mapping[str, Any]) -> ManagedProcess:
        return cls(
            name=data["name"],
            argv=list(data["argv"]),
            log=Path(data["log"]),
            pid=int(data["pid"]),
            starttime=int(data["starttime"]),
        )


def _http(
    url_host: str,
    port: int,
    path: str,
    *,
    context: ssl.SSLContext | None,
    method: str = "GET",
    body: bytes | None = None,
    timeout: float = 5.0,
) -> tuple[int, bytes]:
    conn: http.client.HTTPConnection
    if context is None:
        conn = http.client.HTTPConnection(url_host, port, timeout=timeout)
    else:
        conn = http.client.HTTPSConnection(url_host, port, timeout=timeout, context=context)
    try:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


_TRANSIENT = (OSError, http.client.HTTPException, ssl.SSLError, ValueError)


# --------------------------------------------------------------------------------------------------
# The control plane


class LocalControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler + kwok on loopback."""

    ORDER: tuple[str, ...] = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
    PORT_NAMES: tuple[str, ...] = (
        "etcd",
        "etcd-peer",
        "apiserver",
        "controller-manager",
        "scheduler",
        "kwok",
    )

    def __init__(
        self,
        workdir: Path,
        cache: Path | None = None,
        *,
        nodes: Sequence[FakeNode] = FAKE_NODES,
        stop_at_exit: bool = True,
        detached: bool = False,
        timeout: float = 180.0,
        real_node: bool = False,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.real_node = real_node
        self.cache = cache
        self.nodes: tuple[FakeNode, ...] = tuple(nodes)
        self.stop_at_exit = stop_at_exit
        self.detached = detached
        self.timeout = timeout
        self.ports: dict[str, int] = {}
        self.timings: dict[str, float] = {}
        self.processes: dict[str, ManagedProcess] = {}
        self._binaries: Binaries | None = None
        self._sampler: threading.Thread | None = None
        self._sampler_stop = threading.Event()
        self.peak_rss_total = 0
        self.peak_rss: dict[str, int] = {}
        self._atexit_registered = False
        self._node: realnode.RealNode | None = None
        self.context_name = CONTEXT_NAME

    @property
    def components(self) -> tuple[str, ...]:
        """The processes of this control plane in start order (the real node's last)."""
        return self.ORDER + (realnode.RealNode.PROCESSES if self.real_node else ())

    @property
    def node(self) -> realnode.RealNode:
        """The real node (``real_node=True``)."""
        if self._node is None:
            versions = read_versions()
            bins = realnode.NodeBinaries.locate(self.cache or default_cache(), versions)
            self._node = realnode.RealNode(self, bins)
        return self._node

    # ---- paths -----------------------------------------------------------------------------------

    @property
    def pki(self) -> Pki:
        return Pki(self.workdir / "pki")

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    @property
    def logs_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def audit_log(self) -> Path:
        return self.logs_dir / "audit.log"

    @property
    def state_file(self) -> Path:
        return self.workdir / "state.json"

    @property
    def bin_path(self) -> Path:
        """Directory of links to our kubectl, helm, ... (put it first on PATH: see ``env``)."""
        return self.workdir / "bin"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """An environment whose KUBECONFIG is this cluster and whose PATH starts with ``bin_path``."""
        env = dict(os.environ if base is None else base)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PATH"] = os.pathsep.join([str(self.bin_path), env.get("PATH", os.defpath)])
        env["KUBECACHEDIR"] = str(self.workdir / "cache" / "kube")
        for kind in ("CACHE", "CONFIG", "DATA"):
            env[f"HELM_{kind}_HOME"] = str(self.workdir / "helm" / kind.lower())
        return env

    # ---- lifecycle -------------------------------------------------------------------------------

    @property
    def binaries(self) -> Binaries:
        if self._binaries is None:
            self._binaries = Binaries.locate(self.cache)
        return self._binaries

    def start(self) -> None:
        """Start everything and wait until all fake nodes are Ready. Cleans up on failure."""
        if any(p.alive() for p in self.processes.values()):
            raise ControlPlaneError(f"control plane in {self.workdir} is already running")
        binaries = self.binaries  # fail early, before touching anything
        if self.real_node:
            reason = realnode.unavailable_reason(self.node.binaries.as_dict())
            if reason:
                raise realnode.RealNodeUnavailable(reason)
        self._prepare_workdir(binaries)
        self.timings = {}
        t0 = time.monotonic()
        try:
            self._spawn("etcd", self._etcd_argv())
            self._wait("etcd /health", self._etcd_healthy, ["etcd"])
            self.timings["etcd ready"] = time.monotonic() - t0
            self._spawn("kube-apiserver", self._apiserver_argv())
            self._wait("kube-apiserver /readyz", self._apiserver_ready, ["etcd", "kube-apiserver"])
            self.timings["apiserver ready"] = time.monotonic() - t0
            self._start_controllers("")
            self.timings["controllers ready"] = time.monotonic() - t0
            self._start_kwok("")
            self.timings["kwok ready"] = time.monotonic() - t0
            self._create_nodes()
            self._wait("fake nodes Ready", self._nodes_ready, list(self.ORDER))
            self.timings["nodes ready"] = time.monotonic() - t0
            self._wait("serviceaccount default/default", self._default_sa_exists, list(self.ORDER))
            self.timings["default serviceaccount"] = time.monotonic() - t0
            if self.real_node:
                node_t0 = time.monotonic() - t0
                self.node.start(
                    pod_cidr=POD_CIDR,
                    service_cidr=SERVICE_CLUSTER_IP_RANGE,
                    fake_node_cidr=FAKE_NODE_IP_RANGE,
                    sandbox_image=sandbox_image,
                )
                for name, secs in self.node.timings.items():
                    self.timings[f"real node {name}"] = node_t0 + secs
        except BaseException:
            self.stop()
            raise
        if self.stop_at_exit and not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        if not self.detached:
            self._start_sampler()
        self.save_state()  # lets `localcluster.py down --dir <workdir>` clean up after a crashed caller

    def stop(self) -> None:
        """Stop every process (reverse start order); SIGKILL after 10 s. Idempotent."""
        self._sampler_stop.set()
        if self._sampler is not None:
            self._sampler.join(timeout=5)
            self._sampler = None
        errors: list[str] = []
        if self.real_node or realnode.created_file(self.workdir).exists():
            try:
                self.node.stop()
            except (realnode.RealNodeError, ControlPlaneError) as e:
                errors.append(f"real node: {e}")
        for name in reversed(self.components):
            proc = self.processes.get(name)
            if proc is None:
                continue
            try:
                proc.stop()
            except ControlPlaneError as e:
                errors.append(str(e))
        self.processes.clear()
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()
        if self._atexit_registered:
            atexit.unregister(self.stop)
            self._atexit_registered = False
        if errors:
            raise ControlPlaneError("; ".join(errors))

    def stop_apiserver(self) -> None:
        """Stop only kube-apiserver (etcd keeps the data; the port stays reserved for a restart)."""
        proc = self.processes.get("kube-apiserver")
        if proc is None or not proc.alive():
            raise ControlPlaneError("kube-apiserver is not running")
        proc.stop()

    def start_apiserver(self) -> float:
        """Start kube-apiserver again on the same etcd and port; returns seconds until /readyz ok."""
        proc = self.processes.get("kube-apiserver")
        if proc is not None and proc.alive():
            raise ControlPlaneError("kube-apiserver is already running")
        t0 = time.monotonic()
        self._spawn("kube-apiserver", self._apiserver_argv())
        self._wait("kube-apiserver /readyz after restart", self._apiserver_ready, ["etcd", "kube-apiserver"])
        elapsed = time.monotonic() - t0
        self.timings["apiserver restart"] = elapsed
        if self.state_file.exists():
            self.save_state()
        return elapsed

    def restart_controllers(self) -> float:
        """Stop and start kube-controller-manager, kube-scheduler and kwok; seconds until healthy.

        After a long API server outage their informers keep client-go's reflector backoff (up to 30 s,
        doubled by jitter, reset only after 2 minutes without a failure), so even a short outage soon
        after takes them a minute to notice. A real control plane runs them leader-elected: they exit
        when they cannot renew their lease during such an outage and are started anew. Here they run
        without leader election, and a test that takes the API away restarts them itself."""
        t0 = time.monotonic()
        for name in ("kwok", "kube-scheduler", "kube-controller-manager"):
            proc = self.processes.get(name)
            if proc is not None:
                proc.stop()
        self._start_controllers(" after restart")
        self._start_kwok(" after restart")
        self._wait("fake nodes Ready after restart", self._nodes_ready, list(self.ORDER))
        if self.state_file.exists():
            self.save_state()
        return time.monotonic() - t0

    def _start_controllers(self, when: str) -> None:
        self._spawn("kube-controller-manager", self._controller_manager_argv())
        self._spawn("kube-scheduler", self._scheduler_argv())
        self._wait(
            f"kube-controller-manager and kube-scheduler /healthz{when}",
            lambda: (
                self._healthz_https(self.ports["controller-manager"])
                and self._healthz_https(self.ports["scheduler"])
            ),
            list(self.ORDER[:4]),
        )

    def _start_kwok(self, when: str) -> None:
        self._spawn("kwok", self._kwok_argv())
        self._wait(f"kwok /healthz{when}", self._kwok_healthy, list(self.ORDER))

    def is_running(self) -> bool:
        return bool(self.processes) and all(
            name in self.processes and self.processes[name].alive() for name in self.components
        )

    def __enter__(self) -> LocalControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- state (for the detached CLI) -----------------------------------------------------------

    def save_state(self) -> None:
        state = {
            "workdir": str(self.workdir),
            "kubeconfig": str(self.kubeconfig),
            "bin_path": str(self.bin_path),
            "server": self.server,
            "ports": self.ports,
            "timings": self.timings,
            "real_node": self.real_node,
            "processes": [self.processes[n].state() for n in self.components if n in self.processes],
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_file)

    @classmethod
    def attach(cls, workdir: Path, cache: Path | None = None) -> LocalControlPlane:
        """A handle on a control plane started earlier (e.g. by ``up``) from its state.json."""
        cp = cls(workdir, cache, stop_at_exit=False, detached=True)
        try:
            state = json.loads(cp.state_file.read_text())
        except FileNotFoundError:
            return cp
        cp.ports = {k: int(v) for k, v in state.get("ports", {}).items()}
        cp.timings = {k: float(v) for k, v in state.get("timings", {}).items()}
        cp.real_node = bool(state.get("real_node"))
        for data in state.get("processes", []):
            proc = ManagedProcess.from_state(data)
            cp.processes[proc.name] = proc
        return cp

    # ---- reporting -------------------------------------------------------------------------------

    @property
    def api_ready_seconds(self) -> float | None:
        """Seconds from the first process start (etcd) until kube-apiserver /readyz said ok."""
        return self.timings.get("apiserver ready")

    @property
    def nodes_ready_seconds(self) -> float | None:
        """Seconds from the first process start until every fake node was Ready and schedulable."""
        return self.timings.get("nodes ready")

    def format_timings(self) -> str:
        if not self.timings:
            return "no timings recorded"
        parts = [f"{name} {secs:.1f}s" for name, secs in self.timings.items()]
        return "since first process start: " + ", ".join(parts)

    def rss_bytes(self) -> dict[str, int]:
        """Current resident memory of each running component."""
        return {n: _rss_bytes(p.pid) for n, p in self.processes.items() if p.alive()}

    def format_memory(self) -> str:
        now = self.rss_bytes()
        mib = 1024 * 1024
        current = ", ".join(f"{n} {b / mib:.0f}" for n, b in now.items())
        text = f"RSS now {sum(now.values()) / mib:.0f} MiB ({current})"
        if self.peak_rss_total:
            peaks = ", ".join(f"{n} {b / mib:.0f}" for n, b in self.peak_rss.items())
            text += f"; peak sum {self.peak_rss_total / mib:.0f} MiB (per-process peaks MiB: {peaks})"
        return text

    def _start_sampler(self, interval: float = 1.0) -> None:
        self._sampler_stop.clear()

        def run() -> None:
            while not self._sampler_stop.is_set():
                sample = self.rss_bytes()
                self.peak_rss_total = max(self.peak_rss_total, sum(sample.values()))
                for n, b in sample.items():
                    self.peak_rss[n] = max(self.peak_rss.get(n, 0), b)
                self._sampler_stop.wait(interval)

        self._sampler = threading.Thread(target=run, name="controlplane-rss", daemon=True)
        self._sampler.start()

    # ---- extra identities -----------------------------------------------------------------------

    def issue_kubeconfig(self, name: str, user: str, groups: Sequence[str] = ("system:masters",)) -> Path:
        """Write ``<workdir>/<name>.kubeconfig`` for a new client-cert identity (audit logs show ``user``)."""
        crt, key = self.pki.issue(f"user-{name}", user, groups)
        path = self.workdir / f"{name}.kubeconfig"
        path.write_text(yaml.safe_dump(kubeconfig_dict(self.server, self.pki.ca_cert, crt, key, user)))
        path.chmod(0o600)
        return path

    # ---- internals -------------------------------------------------------------------------------

    def _prepare_workdir(self, binaries: Binaries) -> None:
        wd = self.workdir
        wd.mkdir(parents=True, exist_ok=True)
        for sub in ("etcd", "logs", "pki", "bin", "cache", "helm"):
            shutil.rmtree(wd / sub, ignore_errors=True)
        for sub in ("logs", "bin", "run/apiserver", "run/controller-manager", "run/scheduler"):
            (wd / sub).mkdir(parents=True, exist_ok=True)
        (wd / "etcd").mkdir(mode=0o700)
        for name, path in binaries.items():
            (self.bin_path / name).symlink_to(path)
        self.ports = dict(zip(self.PORT_NAMES, free_ports(len(self.PORT_NAMES)), strict=True))
        if self.real_node:
            self.ports.update(realnode.RealNode.PORTS)
        pki = Pki.generate(wd / "pki")
        if self.real_node:
            self.node.issue_credentials(pki, self.server, kubeconfig_dict)
        self.kubeconfig.write_text(
            yaml.safe_dump(
                kubeconfig_dict(self.server, pki.ca_cert, pki.admin_cert, pki.admin_key, ADMIN_USER)
            )
        )
        self.kubeconfig.chmod(0o600)
        for component, user in COMPONENT_USERS.items():
            crt, key = pki.issue(component, user, ("system:masters",))
            path = wd / f"{component}.kubeconfig"
            path.write_text(yaml.safe_dump(kubeconfig_dict(self.server, pki.ca_cert, crt, key, user)))
            path.chmod(0o600)
        (wd / "audit-policy.yaml").write_text(yaml.safe_dump(audit_policy(), sort_keys=False))
        (wd / "kwok.yaml").write_text(yaml.safe_dump_all(kwok_config_documents(), sort_keys=False))

    def component_argv(self, name: str) -> list[str]:
        """The command line of component ``name`` (one of ``ORDER``), given ``ports`` and binaries."""
        builders: dict[str, Callable[[], list[str]]] = {
            "etcd": self._etcd_argv,
            "kube-apiserver": self._apiserver_argv,
            "kube-controller-manager": self._controller_manager_argv,
            "kube-scheduler": self._scheduler_argv,
            "kwok": self._kwok_argv,
        }
        return builders[name]()

    def _etcd_argv(self) -> list[str]:
        client = f"http://127.0.0.1:{self.ports['etcd']}"
        peer = f"http://127.0.0.1:{self.ports['etcd-peer']}"
        return [
            str(self.binaries.etcd),
            "--name=local",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=local={peer}",
            "--initial-cluster-state=new",
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ]

    def _apiserver_argv(self) -> list[str]:
        pki, wd = self.pki, self.workdir
        return [
            str(self.binaries.kube_apiserver),
            f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
            f"--secure-port={self.ports['apiserver']}",
            *(
                realnode.RealNode.apiserver_flags(pki.directory)
                if self.real_node
                else [
                    "--bind-address=127.0.0.1",
                    "--advertise-address=127.0.0.1",
                    "--endpoint-reconciler-type=none",
                    "--authorization-mode=RBAC",
                ]
            ),
            f"--cert-dir={wd / 'run' / 'apiserver'}",
            f"--tls-cert-file={pki.admin_cert}",
            f"--tls-private-key-file={pki.admin_key}",
            f"--client-ca-file={pki.ca_cert}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--allow-privileged=true",
            # Aggregation layer / request-header authentication (also read by KCM and scheduler).
            f"--requestheader-client-ca-file={pki.ca_cert}",
            f"--requestheader-allowed-names={FRONT_PROXY_USER}",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki.front_proxy_cert}",
            f"--proxy-client-key-file={pki.front_proxy_key}",
            f"--audit-policy-file={wd / 'audit-policy.yaml'}",
            f"--audit-log-path={self.audit_log}",
            "--audit-log-format=json",
            "--audit-log-mode=blocking",
            "--audit-log-maxsize=0",
            "--profiling=false",
        ]

    def _controller_manager_argv(self) -> list[str]:
        kc = self.workdir / "kube-controller-manager.kubeconfig"
        return [
            str(self.binaries.kube_controller_manager),
            f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.ports['controller-manager']}",
            f"--cert-dir={self.workdir / 'run' / 'controller-manager'}",
            "--leader-elect=false",
            "--use-service-account-credentials=false",
            f"--controllers={','.join(CONTROLLERS)}",
            f"--service-account-private-key-file={self.pki.sa_key}",
            f"--root-ca-file={self.pki.ca_cert}",
            "--profiling=false",
            # The client-side rate limit (default 20 QPS) bounds how fast a burst of Deployments
            # becomes pods: 1000 Deployments need ~4000 controller writes. This control plane serves
            # one machine's tests, so the controllers may use what the apiserver can take.
            *CONTROLLER_THROUGHPUT_FLAGS,
            "--concurrent-deployment-syncs=10",
            "--concurrent-replicaset-syncs=10",
        ]

    def _scheduler_argv(self) -> list[str]:
        kc = self.workdir / "kube-scheduler.kubeconfig"
        return [
            str(self.binaries.kube_scheduler),
            f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.ports['scheduler']}",
            f"--cert-dir={self.workdir / 'run' / 'scheduler'}",
            "--leader-elect=false",
            "--profiling=false",
            *CONTROLLER_THROUGHPUT_FLAGS,  # deprecated in favour of --config, still honoured without one
        ]

    def _kwok_argv(self) -> list[str]:
        return [
            str(self.binaries.kwok),
            f"--kubeconfig={self.workdir / 'kwok.kubeconfig'}",
            f"--config={self.workdir / 'kwok.yaml'}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={FAKE_NODE_ANNOTATION}={FAKE_NODE_ANNOTATION_VALUE}",
            f"--cidr={POD_CIDR}",
            f"--node-ip={NODE_IP_DEFAULT}",
            "--node-lease-duration-seconds=40",
            f"--server-address=127.0.0.1:{self.ports['kwok']}",
        ]

    def _spawn(self, name: str, argv: list[str], extra_env: Mapping[str, str] | None = None) -> None:
        proc = ManagedProcess(name=name, argv=argv, log=self.logs_dir / f"{name}.log")
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        env.update(extra_env or {})
        proc.spawn(self.workdir, env, die_with_parent=not self.detached)
        self.processes[name] = proc
        if self.detached:  # `down` finds what a start that died half-way had spawned
            self.save_state()

    def _wait(self, what: str, check: Callable[[], bool], watch: Sequence[str]) -> None:
        last_error: BaseException | None = None

        def once() -> bool | None:
            nonlocal last_error
            for name in watch:  # a watched process that died fails the wait at once
                proc = self.processes.get(name)
                if proc is not None and not proc.alive():
                    raise ControlPlaneError(
                        f"{name} exited (code {proc.returncode}) while waiting for {what}; "
                        f"log {proc.log}:\n{proc.log_tail()}"
                    )
            try:
                return True if check() else None
            except _TRANSIENT as e:
                last_error = e
                return None

        try:
            poll(once, timeout=self.timeout, interval=POLL_INTERVAL, what=what)
        except TimeoutError:
            logs = ", ".join(str(self.processes[n].log) for n in watch if n in self.processes)
            raise ControlPlaneError(
                f"timed out after {self.timeout:.0f}s waiting for {what} (last error: {last_error!r}); "
                f"logs: {logs}"
            ) from None

    def _client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        ctx.load_cert_chain(str(self.pki.admin_cert), str(self.pki.admin_key))
        return ctx

    def api(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> tuple[int, Any]:
        """A tiny admin REST call against the apiserver: (status, decoded JSON or text)."""
        data = json.dumps(body).encode() if body is not None else None
        status, raw = _http(
            "127.0.0.1",
            self.ports["apiserver"],
            path,
            context=self._client_context(),
            method=method,
            body=data,
        )
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def _etcd_healthy(self) -> bool:
        status, body = _http("127.0.0.1", self.ports["etcd"], "/health", context=None, timeout=2)
        return status == 200 and json.loads(body).get("health") == "true"

    def _apiserver_ready(self) -> bool:
        status, body = _http(
            "127.0.0.1", self.ports["apiserver"], "/readyz", context=self._client_context(), timeout=5
        )
        return status == 200 and body.strip() == b"ok"

    @staticmethod
    def _healthz_https(port: int) -> bool:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # self-signed serving certs of KCM and scheduler
        status, body = _http("127.0.0.1", port, "/healthz", context=ctx, timeout=2)
        return status == 200 and body.strip() == b"ok"

    def _kwok_healthy(self) -> bool:
        status, _ = _http("127.0.0.1", self.ports["kwok"], "/healthz", context=None, timeout=2)
        return status == 200

    def _create_nodes(self) -> None:
        for node in self.nodes:
            status, body = self.api("POST", "/api/v1/nodes", node.manifest())
            if status not in (201, 409):
                raise ControlPlaneError(f"creating node {node.name} failed: HTTP {status}: {body}")

    def _nodes_ready(self) -> bool:
        status, body = self.api("GET", "/api/v1/nodes")
        if status != 200:
            return False
        ready = {item["metadata"]["name"] for item in body.get("items", []) if node_schedulable(item)}
        return all(n.name in ready for n in self.nodes)

    def _default_sa_exists(self) -> bool:
        status, _ = self.api("GET", "/api/v1/namespaces/default/serviceaccounts/default")
        return status == 200


# --------------------------------------------------------------------------------------------------
# CLI


def _print_env(cp: LocalControlPlane, out: IO[str]) -> None:
    print(f"export KUBECONFIG={cp.kubeconfig}", file=out)
    print(f'export PATH="{cp.bin_path}:$PATH"', file=out)


def _cmd_up(args: argparse.Namespace) -> int:
    workdir = Path(args.dir)
    existing = LocalControlPlane.attach(workdir)
    if existing.is_running():
        print(f"control plane already running in {existing.workdir} (api {existing.server})")
        _print_env(existing, sys.stdout)
        return 0
    if existing.processes:
        print("cleaning up a partly stopped control plane", file=sys.stderr)
        existing.stop()
    cache = Path(args.cache) if args.cache else None
    real_node = args.real_node != "off"
    if args.real_node == "auto":
        probe = LocalControlPlane(workdir, cache, stop_at_exit=False, detached=True, real_node=True)
        reason = realnode.unavailable_reason(probe.node.binaries.as_dict())
        if reason:
            print(
                f"real node: not started on this machine: {reason}; kwok's fake nodes only", file=sys.stderr
            )
            real_node = False
    cp = LocalControlPlane(
        workdir, cache, stop_at_exit=False, detached=True, timeout=args.timeout, real_node=real_node
    )
    try:
        cp.start()
    except (ControlPlaneError, realnode.RealNodeError, realnode.RealNodeUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    cp.save_state()
    pids = ", ".join(f"{n}={p.pid}" for n, p in cp.processes.items())
    print(f"control plane up in {cp.workdir} (api {cp.server}; {pids})")
    print(f"timings {cp.format_timings()}")
    print(f"memory: {cp.format_memory()}")
    _print_env(cp, sys.stdout)
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    cp = LocalControlPlane.attach(Path(args.dir))
    node_left = realnode.created_file(cp.workdir).exists()
    if not cp.processes and not node_left:
        print(f"no control plane recorded in {cp.workdir}")
        return 0
    running = [n for n, p in cp.processes.items() if p.alive()]
    try:
        cp.stop()
    except ControlPlaneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"stopped {', '.join(running) if running else 'nothing (all were already gone)'}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    cp = LocalControlPlane.attach(Path(args.dir))
    if not cp.processes:
        print(f"no control plane recorded in {cp.workdir}")
        return 3
    for name in cp.components:
        proc = cp.processes.get(name)
        state = "missing" if proc is None else ("running" if proc.alive() else "dead")
        pid = proc.pid if proc else "-"
        print(f"{name:25} {state:8} pid {pid}")
    print(f"api {cp.server}, kubeconfig {cp.kubeconfig}")
    if cp.timings:
        print(f"timings {cp.format_timings()}")
    if cp.is_running():
        print(f"memory: {cp.format_memory()}")
        return 0
    return 1


def _cmd_env(args: argparse.Namespace) -> int:
    cp = LocalControlPlane.attach(Path(args.dir))
    _print_env(cp, sys.stdout)
    return 0 if cp.is_running() else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="localcluster", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_ in (
        ("up", _cmd_up, "start the control plane in the background"),
        ("down", _cmd_down, "stop it (idempotent)"),
        ("status", _cmd_status, "show its processes"),
        ("env", _cmd_env, "print export lines for KUBECONFIG and PATH"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--dir", default=".cluster", help="state directory (default .cluster)")
        p.set_defaults(func=func)
        if name == "up":
            p.add_argument("--cache", default=None, help="binary cache (default $MODELDEPLOY_CACHE)")
            p.add_argument("--timeout", type=float, default=180.0, help="seconds allowed per start phase")
            p.add_argument(
                "--real-node",
                choices=("auto", "on", "off"),
                default="auto",
                help="a real node (kubelet, containerd) beside the fake ones: auto = where this machine can",
            )
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


def iter_audit_events(path: Path, since: int = 0) -> Iterator[dict[str, Any]]:
    """Events of an apiserver JSON audit log (one per line), from byte offset ``since`` (a size the
    file had earlier: the apiserver writes whole lines)."""
    with path.open() as f:
        f.seek(since)
        for line in f:
            if line.strip():
                yield json.loads(line)


if __name__ == "__main__":
    sys.exit(main())
