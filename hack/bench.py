"""make bench: figures, not pass/fail, from one run on the local control plane.

The operator runs as a subprocess with its own client identity, so the API server's audit log
attributes every write to it. Prints:
  - create latency p50/p99 (ModelDeployment applied -> children present and status observed),
    beside the floor: the same writes issued directly by a plain client, in the same run; once back
    to back, once each created when the one before is Ready (one object on a quiet machine);
  - burst: N ModelDeployments applied at once -> all Ready, and each one's own apply -> Ready latency
    (p50/p99) with the stages it waited in, beside the floor: the same children written at once by a
    plain client (each Deployment's apply -> available);
  - steady state: operator API writes per minute with N idle ModelDeployments;
  - operator peak RSS at N;
  - rollback reaction: candidate failure visible in the API -> traffic back on stable;
  - batch inference: the worker against a plain script on local files (``hack.bench_batch``), and a
    BatchInference on the real node against a plain client loop, both with S3 (``hack.bench_batch_cluster``;
    after the local control plane above is down: one cluster at a time).

Usage: python -m hack.bench [--create 100] [--burst 100,500,1000] [--steady-seconds 60]
                            [--batch 50000] [--batch-cluster 200000]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO / "operator")]

from hack import localcluster, procutil, runtimeenv  # noqa: E402
from kube import Cluster  # noqa: E402
from operator_proc import OperatorProcess, install_crd  # noqa: E402

AuditPosition = tuple[int, int]  # (inode, byte offset) in the audit log
GROUP, VERSION, PLURAL = "modeldeploy.io", "v1alpha1", "modeldeployments"
OPERATOR_USER = "modeldeploy-operator"


def md_body(name: str, version: int = 1, **spec: Any) -> dict[str, Any]:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {"format": "onnx", "storageUri": "s3://models/repo", "version": version},
            "replicas": 1,
        },
    }
    body["spec"].update(spec)
    return body


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def owner_label(obj: dict[str, Any]) -> str | None:
    return (obj["metadata"].get("labels") or {}).get("modeldeploy.io/name")


def deployment_available(dep: dict[str, Any]) -> bool:
    return bool((dep.get("status") or {}).get("readyReplicas", 0) >= 1)


def pod_scheduled(pod: dict[str, Any]) -> bool:
    return bool((pod.get("spec") or {}).get("nodeName"))


def pod_ready(pod: dict[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


class Timeline(threading.Thread):
    """One list, then a watch from its resourceVersion (raw JSON), in a thread of its own: the first
    time (this process's monotonic clock) each object, keyed by ``key``, meets each of ``marks``.

    Polling a list of 1000 objects every half second would cost the API server, and this process, more
    than the operator under test; a watch costs one event per change, the same for the operator's
    bursts and the floor's."""

    def __init__(
        self,
        list_fn: Callable[..., Any],
        key: Callable[[dict[str, Any]], str | None],
        marks: dict[str, Callable[[dict[str, Any]], bool]],
    ) -> None:
        super().__init__(daemon=True)
        self.list_fn, self.key, self.marks = list_fn, key, marks
        self.seen: dict[str, dict[str, float]] = {}
        self.counts: Counter[str] = Counter()
        self.changed = threading.Condition()
        self.synced = threading.Event()
        self._stopping = threading.Event()

    def _observe(self, obj: dict[str, Any]) -> None:
        name = self.key(obj)
        if not name:
            return
        now = time.monotonic()
        with self.changed:  # snapshot() copies self.seen from another thread
            seen = self.seen.setdefault(name, {})
        new = [mark for mark, test in self.marks.items() if mark not in seen and test(obj)]
        if new:
            with self.changed:
                for mark in new:
                    seen[mark] = now
                    self.counts[mark] += 1
                self.changed.notify_all()

    def _relist(self) -> str:
        body = json.loads(self.list_fn(_preload_content=False).data)
        for item in body["items"]:
            self._observe(item)
        return str(body["metadata"]["resourceVersion"])

    def run(self) -> None:
        rv = self._relist()
        self.synced.set()
        while not self._stopping.is_set():
            resp = self.list_fn(
                watch=True,
                resource_version=rv,
                allow_watch_bookmarks=True,
                timeout_seconds=2,  # how long stop() may wait
                _preload_content=False,
            )
            try:
                for line in resp:
                    event = json.loads(line)
                    if event["type"] == "ERROR":  # e.g. 410 Gone: list again
                        rv = self._relist()
                        break
                    rv = event["object"]["metadata"]["resourceVersion"]
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self._observe(event["object"])
                    if self._stopping.is_set():
                        break
            finally:
                resp.close()

    def wait_count(self, mark: str, n: int, deadline: float) -> int:
        """How many objects have met ``mark``, once ``n`` have (or at ``deadline``)."""
        with self.changed:
            while self.counts[mark] < n and time.monotonic() < deadline:
                self.changed.wait(max(0.0, min(1.0, deadline - time.monotonic())))
            return self.counts[mark]

    def marks_of(self, name: str) -> dict[str, float]:
        with self.changed:
            return dict(self.seen.get(name, {}))

    def snapshot(self) -> dict[str, dict[str, float]]:
        with self.changed:
            return {name: dict(seen) for name, seen in self.seen.items()}

    def stop(self) -> None:
        self._stopping.set()


#: Where an object of a burst spends its time, in order: (label, from mark, to mark). "applied" is
#: the client's first request for it; the floor has no "md_ready" (its Deployment's "available" is
#: its end).
STAGES = [
    ("apply->Deployment", "applied", "deployment"),
    ("Deployment->pod", "deployment", "pod"),
    ("pod->scheduled", "pod", "scheduled"),
    ("scheduled->pod Ready", "scheduled", "pod_ready"),
    ("pod Ready->available", "pod_ready", "available"),
    ("available->MD Ready", "available", "md_ready"),
]


def object_latency(
    applied: dict[str, float], marks: dict[str, dict[str, float]], final: str
) -> dict[str, Any]:
    """Each object's own apply -> ``final`` latency (p50, p99, max), its time of reaching ``final``
    after the burst's first apply (p50: how long until half of them were ready), and the p50/p99 of
    each stage (:data:`STAGES`) between the marks."""
    t0 = min(applied.values())
    lat, done_at = [], []
    stages: dict[str, list[float]] = {label: [] for label, _, _ in STAGES}
    for name, t_apply in applied.items():
        seen = {"applied": t_apply, **marks.get(name, {})}
        if final in seen:
            lat.append(seen[final] - t_apply)
            done_at.append(seen[final] - t0)
        for label, a, b in STAGES:
            if a in seen and b in seen:
                stages[label].append(seen[b] - seen[a])
    if not lat:
        return {"n": 0}
    return {
        "n": len(lat),
        "p50_s": pct(lat, 50),
        "p99_s": pct(lat, 99),
        "max_s": max(lat),
        "half_ready_at_s": pct(done_at, 50),
        "stages": {
            label: {"p50_s": round(pct(v, 50), 3), "p99_s": round(pct(v, 99), 3)}
            for label, v in stages.items()
            if v
        },
    }


def parse_apiserver_metrics(text: str) -> dict[str, float]:
    """The API server's counters this bench compares, summed per (metric, verb, resource)."""
    wanted = {
        "apiserver_request_total": ("verb", "resource", "subresource"),
        "apiserver_response_sizes_sum": ("verb", "resource", "subresource"),
        "apiserver_watch_events_total": ("resource",),
        "apiserver_watch_events_sizes_sum": ("resource",),
    }
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name not in wanted or "}" not in rest:
            continue
        labels_text, _, value = rest.rpartition("}")
        labels = dict(
            (part.split("=", 1)[0], part.split("=", 1)[1].strip('"'))
            for part in labels_text.split('",')
            if "=" in part
        )
        key = " ".join([name, *(labels.get(lbl, "") for lbl in wanted[name])]).rstrip()
        out[key] = out.get(key, 0.0) + float(value)
    return out


def metrics_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What changed between two scrapes, largest first (request counts and bytes)."""
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    return dict(sorted(((k, v) for k, v in delta.items() if v > 0), key=lambda kv: -kv[1]))


class Bench:
    def __init__(self, workdir: Path) -> None:
        self.cp = localcluster.LocalControlPlane(workdir / "cp")
        self.workdir = workdir

    def start(self) -> None:
        self.cp.start()
        env = self.cp.env()
        os.environ.update({"KUBECONFIG": env["KUBECONFIG"], "PATH": env["PATH"]})
        self.cluster = Cluster(
            self.cp.kubeconfig, env, backend="local", simulated=True, control_plane=self.cp
        )
        install_crd(self.cluster)
        self.custom, self.core, self.apps = self.cluster.custom, self.cluster.core, self.cluster.apps
        # The first namespace exists before the operator starts, so no figure includes its start-up
        # (nor kopf's namespace list-then-watch gap, which modeldeploy.kube.kopfpatch closes).
        self.first_namespace = self.namespace("bench-create")
        op_kubeconfig = self.cp.issue_kubeconfig("operator", OPERATOR_USER)
        self.op = OperatorProcess(
            self.workdir / "operator",
            ["bench-*"],
            env={"KUBECONFIG": str(op_kubeconfig), **runtimeenv.runtime_env()},
            resync_seconds=60,
            verbose=False,  # the chart's default log level: per-event debug lines would be measured too
            # the shipped operator's dependency set: the dev venv's test extras would be measured too
            python=str(runtimeenv.runtime_python()),
        )
        self.op.start()

    def stop(self) -> None:
        self.op.stop()
        self.cp.stop()

    def namespace(self, name: str) -> str:
        return self.cluster.create_namespace(name)

    def delete_namespace(self, name: str) -> None:
        """Delete a namespace and wait until it is gone, so later figures see only what they create."""
        self.cluster.delete_namespace(name, wait=True, timeout=600)

    def operator_write_kinds(self, since: AuditPosition) -> list[str]:
        """The operator's API writes after ``since`` in the audit log, each as
        "verb resource[/subresource]"."""
        out = []
        for ev in self.audit_events(since):
            if ev.get("user", {}).get("username") == OPERATOR_USER:
                ref = ev.get("objectRef") or {}
                sub = f"/{ref['subresource']}" if ref.get("subresource") else ""
                out.append(f"{ev.get('verb')} {ref.get('resource')}{sub}")
        return out

    def operator_rss_mb(self) -> tuple[float, float]:
        assert self.op.proc is not None
        fields = dict(
            line.split(":", 1) for line in Path(f"/proc/{self.op.proc.pid}/status").read_text().splitlines()
        )
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024

    # ------------------------------------------------------------------ figures

    def create_latency(self, n: int, quiet: bool = False) -> dict[str, float]:
        """ModelDeployments created one at a time: create -> its Deployment, 3 Services and a status
        for generation 1 exist. The end is taken from watches (when each was delivered), not by
        polling: a poll loop adds up to one round of requests to every figure, and its requests
        compete with the operator's on a small machine (the floor is timed by its own last write).

        Back to back (``quiet`` False) the next one is created as soon as the last one's writes are
        there, while that one's pod comes up and the operator writes its status as it does (three
        more patches, two Events): the figure holds that contention, the floor's far less of it.
        With ``quiet`` each one is created once the one before is Ready (the floor's: its Deployment
        available), which is one object's create latency on a machine doing nothing else."""
        ns = self.first_namespace if not quiet else self.namespace("bench-create-quiet")
        mds, deps, svcs = timelines = [
            Timeline(
                functools.partial(self.custom.list_namespaced_custom_object, GROUP, VERSION, ns, PLURAL),
                lambda md: md["metadata"]["name"],
                {
                    "seen": bool,
                    "observed": lambda md: (md.get("status") or {}).get("observedGeneration") == 1,
                    "ready": lambda md: (md.get("status") or {}).get("phase") == "Ready",
                },
            ),
            Timeline(
                functools.partial(self.apps.list_namespaced_deployment, ns), owner_label, {"seen": bool}
            ),
            Timeline(
                functools.partial(self.core.list_namespaced_service, ns),
                lambda svc: f"{owner_label(svc)}/{svc['metadata']['name']}" if owner_label(svc) else None,
                {"seen": bool},
            ),
        ]
        for tl in timelines:
            tl.start()
            tl.synced.wait(30)

        def reconciled(name: str) -> float | None:
            """When the last of the operator's first writes for ``name`` was delivered, once all were."""
            observed = mds.marks_of(name).get("observed")
            dep = deps.marks_of(name).get("seen")
            services = [m["seen"] for key, m in svcs.snapshot().items() if key.startswith(f"{name}/")]
            if observed is None or dep is None or len(services) < 3:
                return None
            return max(observed, dep, *services)

        lat, hops = [], []
        try:
            for i in range(n):
                name = f"m{i}"
                t0 = time.monotonic()
                self.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, md_body(name))
                created = time.monotonic()
                while (done := reconciled(name)) is None:
                    if time.monotonic() - t0 > 60:
                        raise RuntimeError(f"{name}: not reconciled within 60 s")
                    time.sleep(0.002)  # reads this process's watch records only; no API request
                lat.append(done - t0)
                hops.append(mds.marks_of(name)["seen"] - created)
                if quiet and mds.wait_count("ready", i + 1, time.monotonic() + 60) < i + 1:
                    raise RuntimeError(f"{name}: not Ready within 60 s")
        finally:
            for tl in timelines:
                tl.stop()
        self.delete_namespace(ns)
        floor = self.direct_floor(n, quiet)
        return {
            "n": n,
            "quiet": quiet,
            "p50_ms": 1000 * pct(lat, 50),
            "p99_ms": 1000 * pct(lat, 99),
            "floor_p50_ms": 1000 * pct(floor, 50),
            "floor_p99_ms": 1000 * pct(floor, 99),
            "ratio_p50": pct(lat, 50) / pct(floor, 50),
            # A controller's figure holds two watch deliveries the floor has none of (the new object
            # reaching the operator, its writes reaching this process): how long one takes here.
            "watch_delivery_p50_ms": 1000 * pct(hops, 50),
        }

    def direct_writes(self, ns: str, name: str) -> None:
        """What the operator writes for a new ModelDeployment, issued by a plain client with no
        decisions in between: the ModelDeployment, its Deployment and 3 Services (server-side apply),
        one status patch."""
        from modeldeploy import api
        from modeldeploy.modeldeployment import builders, revision

        md = self.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, md_body(name))
        spec = api.ModelDeploymentSpec.model_validate(md["spec"])
        owner = builders.Owner(name=name, namespace=ns, uid=md["metadata"]["uid"])
        rev = revision.revision_hash(spec)
        objs = [
            builders.build_deployment(owner, spec, rev, revision_number=1, replicas=1),
            *builders.build_services(owner, spec, stable=rev, candidate=None),
        ]
        for obj in objs:
            patch = (
                self.apps.patch_namespaced_deployment
                if obj["kind"] == "Deployment"
                else self.core.patch_namespaced_service
            )
            patch(
                obj["metadata"]["name"],
                ns,
                obj,
                field_manager="bench",
                force=True,
                _content_type="application/apply-patch+yaml",
            )
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, ns, PLURAL, name, {"status": {"phase": "Pending", "observedGeneration": 1}}
        )

    def direct_floor(self, n: int, quiet: bool = False) -> list[float]:
        """Latency of :meth:`direct_writes`, one ModelDeployment at a time (with ``quiet``, each once
        the Deployment before it is available)."""
        ns = self.namespace("floor-create-quiet" if quiet else "floor-create")
        out = []
        for i in range(n):
            t0 = time.monotonic()
            self.direct_writes(ns, f"d{i}")
            out.append(time.monotonic() - t0)
            if quiet:
                self._wait_available(ns, f"d{i}")
        self.delete_namespace(ns)
        return out

    def _wait_available(self, ns: str, owner: str, timeout: float = 60) -> None:
        """Poll (outside any timed window) until ``owner``'s one Deployment is available."""

        def available() -> bool | None:
            listed = self.apps.list_namespaced_deployment(
                ns, label_selector=f"modeldeploy.io/name={owner}", _preload_content=False
            )
            deps = json.loads(listed.data)["items"]
            return True if deps and deployment_available(deps[0]) else None

        procutil.poll(available, timeout=timeout, interval=0.02, what=f"{ns}/{owner}'s Deployment available")

    def burst(self, n: int, keep: bool = False) -> dict[str, Any]:
        """N ModelDeployments created at once (8 client threads) -> every one Ready. Also each one's own
        apply-to-Ready latency and where it waited (see :class:`Timeline`), where the machine's CPU went
        meanwhile (per process) and who wrote what (audit log)."""
        ns = self.namespace(f"bench-burst-{n}")
        # Another team's namespace, served before the burst starts: its one object is created once the
        # burst's are all applied (the longest queue), and timed to its own Ready.
        lone_ns = self.namespace(f"bench-lone-{n}")
        out = self._burst(
            n,
            ns,
            lambda i: self.custom.create_namespaced_custom_object(
                GROUP, VERSION, ns, PLURAL, md_body(f"b{i}")
            ),
            final="md_ready",
            keep=keep,
            lone_ns=lone_ns,
        )
        self.delete_namespace(lone_ns)
        return out

    def burst_floor(self, n: int) -> dict[str, Any]:
        """The same children for N ModelDeployments written at once by a plain client (outside the
        operator's namespaces) -> every Deployment's pod ready: what the cluster itself needs."""
        ns = self.namespace(f"floor-burst-{n}")
        return self._burst(n, ns, lambda i: self.direct_writes(ns, f"f{i}"), final="available")

    def _md_timeline(self, ns: str) -> Timeline:
        return Timeline(
            functools.partial(self.custom.list_namespaced_custom_object, GROUP, VERSION, ns, PLURAL),
            lambda md: md["metadata"]["name"],
            {"md_ready": lambda md: (md.get("status") or {}).get("phase") == "Ready"},
        )

    def _timelines(self, ns: str, with_mds: bool) -> list[Timeline]:
        """Watches of one burst's namespace: when each ModelDeployment's Deployment and pod appear and
        turn ready (and, for the operator's bursts, when the ModelDeployment turns Ready), all keyed
        by the ModelDeployment's name."""
        out = [
            Timeline(
                functools.partial(self.apps.list_namespaced_deployment, ns),
                owner_label,
                {"deployment": lambda dep: True, "available": deployment_available},
            ),
            Timeline(
                functools.partial(self.core.list_namespaced_pod, ns),
                owner_label,
                {"pod": lambda pod: True, "scheduled": pod_scheduled, "pod_ready": pod_ready},
            ),
        ]
        if with_mds:
            out.append(self._md_timeline(ns))
        return out

    def _burst(
        self,
        n: int,
        ns: str,
        create: Callable[[int], Any],
        final: str,
        keep: bool = False,
        lone_ns: str | None = None,
    ) -> dict[str, Any]:
        """Apply ``n`` objects with ``create`` from 8 threads; wait until ``n`` reach the mark ``final``.
        Each object's apply time is taken just before its first request. With ``lone_ns``, one more
        ModelDeployment is created there once the ``n`` are applied, and timed on its own."""
        timelines = self._timelines(ns, with_mds=final == "md_ready")
        if lone_ns is not None:
            timelines.append(lone_tl := self._md_timeline(lone_ns))
        for tl in timelines:
            tl.start()
        for tl in timelines:
            tl.synced.wait(30)
        cpu0, audit0, metrics0 = self.cpu_seconds(), self.audit_position(), self.apiserver_metrics()
        reconciles0 = self.reconciles()
        applied: dict[str, float] = {}
        prefix = "b" if final == "md_ready" else "f"

        def apply(i: int) -> None:
            applied[f"{prefix}{i}"] = time.monotonic()
            create(i)

        t0 = time.monotonic()
        with cf.ThreadPoolExecutor(8) as pool:
            list(pool.map(apply, range(n)))
        applied_s = time.monotonic() - t0
        if lone_ns is not None:
            lone_applied = time.monotonic()
            self.custom.create_namespaced_custom_object(GROUP, VERSION, lone_ns, PLURAL, md_body("lone"))
        final_tl = next(tl for tl in timelines if final in tl.marks)
        ready = final_tl.wait_count(final, n, t0 + 900)
        elapsed = time.monotonic() - t0
        lone: dict[str, Any] = {}
        if lone_ns is not None:
            lone_tl.wait_count("md_ready", 1, time.monotonic() + 60)
            lone_ready = lone_tl.marks_of("lone").get("md_ready")
            if lone_ready is not None:
                ready_at = [seen[final] for seen in final_tl.snapshot().values() if final in seen]
                lone = {
                    "apply_to_ready_s": lone_ready - lone_applied,
                    "applied_after_first_s": lone_applied - t0,
                    "burst_ready_after_it": sum(1 for t in ready_at if t > lone_ready),
                }
        cpu1, metrics1 = self.cpu_seconds(), self.apiserver_metrics()
        for tl in timelines:
            tl.stop()
        marks: dict[str, dict[str, float]] = {}
        for tl in timelines:
            for name, seen in tl.snapshot().items():
                marks.setdefault(name, {}).update(seen)
        out = {
            "n": n,
            "applied_s": applied_s,
            "all_ready_s": elapsed,
            "ready": ready,
            "latency": object_latency(applied, marks, final),
            "cpu_s": {k: round(cpu1[k] - cpu0.get(k, 0.0), 1) for k in cpu1},
            "writes": self.writes_by_identity(audit0, ns),
            "writes_detail": self.writes_detail(audit0, ns),
            "apiserver": metrics_delta(metrics0, metrics1),
            "reconciles": self.reconciles() - reconciles0,
        }
        if lone_ns is not None:
            out["lone"] = lone or {"ready": False}
        for tl in timelines:
            tl.join(10)
        if not keep:
            self.delete_namespace(ns)
        return out

    def reconciles(self) -> float:
        """Reconciles the operator has run (its own counter), successful or not."""
        return self.op.metric("modeldeploy_reconciles_total") + self.op.metric(
            "modeldeploy_reconcile_errors_total"
        )

    def cpu_seconds(self) -> dict[str, float]:
        """user+system CPU seconds of every control-plane process and of the operator."""
        pids = {name: proc.pid for name, proc in self.cp.processes.items()}
        if self.op.proc is not None and self.op.proc.poll() is None:
            pids["operator"] = self.op.proc.pid
        tick = os.sysconf("SC_CLK_TCK")
        out = {}
        for name, pid in pids.items():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[name] = (int(fields[11]) + int(fields[12])) / tick
        return out

    def audit_position(self) -> AuditPosition:
        """Where the audit log ends now: (inode, size) of the current file."""
        try:
            st = self.cp.audit_log.stat()
        except FileNotFoundError:
            return (0, 0)
        return (st.st_ino, st.st_size)

    def audit_events(self, since: AuditPosition) -> Iterator[dict[str, Any]]:
        """Audit events written after ``since``, across a rotation: the API server's log writer
        (lumberjack) renames the file at 100 MB even with --audit-log-maxsize=0, which a burst of 1000
        passes (its writes went missing from the figures before). The renamed files keep their inode."""
        inode, offset = since
        log = self.cp.audit_log
        files = sorted(log.parent.glob(f"{log.stem}*{log.suffix}"), key=lambda p: p.stat().st_mtime)
        started = inode == 0
        for path in files:
            st = path.stat()
            if not started and st.st_ino != inode:
                continue
            yield from localcluster.iter_audit_events(path, 0 if started else offset)
            started = True

    def writes_by_identity(self, since: AuditPosition, namespace: str) -> dict[str, int]:
        """API writes in ``namespace`` after ``since`` in the audit log, by client identity."""
        counts = Counter(
            ev.get("user", {}).get("username", "?").rsplit(":", 1)[-1]
            for ev in self.audit_events(since)
            if (ev.get("objectRef") or {}).get("namespace") == namespace
        )
        return dict(counts.most_common())

    def writes_detail(self, since: AuditPosition, namespace: str) -> dict[str, dict[str, int]]:
        """The same writes, per identity, as "verb resource[/subresource]"."""
        out: dict[str, Counter[str]] = {}
        for ev in self.audit_events(since):
            ref = ev.get("objectRef") or {}
            if ref.get("namespace") != namespace:
                continue
            user = ev.get("user", {}).get("username", "?").rsplit(":", 1)[-1]
            sub = f"/{ref['subresource']}" if ref.get("subresource") else ""
            out.setdefault(user, Counter())[f"{ev.get('verb')} {ref.get('resource')}{sub}"] += 1
        return {user: dict(c.most_common()) for user, c in out.items()}

    def apiserver_metrics(self) -> dict[str, float]:
        """The API server's request and watch counters (all clients): requests by verb and resource,
        response bytes, watch events sent and their bytes. A delta over a burst shows what reads and
        watches cost, which the audit log (writes only) does not."""
        return parse_apiserver_metrics(self.cluster.kubectl("get", "--raw", "/metrics", check=False).stdout)

    def steady(self, seconds: float, quiet: float = 5, settle_timeout: float = 120) -> dict[str, Any]:
        """Writes per minute once idle. Writes of the burst still in flight when the last pod turned
        Ready (queued Events, a last status patch) are not idle-state writes: first wait until the
        operator has written nothing for ``quiet`` seconds (reported, with what they were), then count
        over ``seconds`` (the bench's resync period is 60 s, so a window of 60 s includes a resync)."""
        t0, settle_from = time.monotonic(), self.audit_position()
        last, last_change = 0, t0
        while time.monotonic() - last_change < quiet and time.monotonic() - t0 < settle_timeout:
            time.sleep(0.5)
            now = len(self.operator_write_kinds(settle_from))
            if now != last:
                last, last_change = now, time.monotonic()
        late = Counter(self.operator_write_kinds(settle_from))
        t1, window_from = time.monotonic(), self.audit_position()
        while time.monotonic() - t1 < seconds:
            time.sleep(1)
        window = Counter(self.operator_write_kinds(window_from))
        writes = sum(window.values())
        return {
            "seconds": seconds,
            "writes": writes,
            "writes_per_min": writes * 60 / seconds,
            "kinds": dict(window),
            "settled_s": round(t1 - t0, 1),
            "late_burst_writes": dict(late),
        }

    def rollback_reaction(self) -> dict[str, float]:
        ns = self.namespace("bench-rollback")
        name = "rb"
        self.custom.create_namespaced_custom_object(
            GROUP,
            VERSION,
            ns,
            PLURAL,
            md_body(name, replicas=2, rollout={"steps": [{"weight": 50}, {"weight": 100}]}),
        )
        self._wait_phase(ns, name, "Ready")
        self.custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            ns,
            PLURAL,
            name,
            {"spec": {"model": {"version": 2}, "server": {"podLabels": {"simulate": "crashloop"}}}},
        )
        t_fail = None
        while True:
            pods = self.core.list_namespaced_pod(
                ns, label_selector=f"modeldeploy.io/name={name},simulate=crashloop"
            )
            for p in pods.items:
                for cs in p.status.container_statuses or []:
                    if cs.state and cs.state.waiting and cs.state.waiting.reason == "CrashLoopBackOff":
                        t_fail = time.monotonic()
            if t_fail:
                break
            time.sleep(0.005)
        while True:
            st = (
                self.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name).get("status") or {}
            )
            deps = self.apps.list_namespaced_deployment(
                ns, label_selector=f"modeldeploy.io/name={name}"
            ).items
            if st.get("phase") == "RolledBack" and len(deps) == 1:
                reaction = time.monotonic() - t_fail
                self.delete_namespace(ns)
                return {"reaction_s": reaction}
            time.sleep(0.005)

    def _wait_phase(self, ns: str, name: str, phase: str, timeout: float = 120) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            st = (
                self.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name).get("status") or {}
            )
            if st.get("phase") == phase:
                return
            time.sleep(0.05)
        raise RuntimeError(f"{name}: not {phase} within {timeout}s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--create", type=int, default=100)
    ap.add_argument("--burst", default="100,500,1000")
    ap.add_argument("--steady-seconds", type=float, default=60)
    ap.add_argument(
        "--no-floor", action="store_true", help="skip the burst floor (plain client, no operator)"
    )
    ap.add_argument(
        "--batch", type=int, default=50_000, help="records for the batch inference figure (0: skip it)"
    )
    ap.add_argument(
        "--batch-cluster",
        type=int,
        default=200_000,
        help="records for the batch figure through a BatchInference on the real node (0: skip it)",
    )
    ap.add_argument(
        "--pairs",
        type=int,
        default=1,
        help="the largest burst and its floor, run alternately this many times (ratios of the same minutes)",
    )
    ap.add_argument("--json", type=Path, help="also write every figure (and the detail behind them) here")
    args = ap.parse_args()
    sizes = [int(x) for x in args.burst.split(",") if x]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="modeldeploy-bench-") as tmp:
        bench = Bench(Path(tmp))
        bench.start()
        try:
            if args.create:
                results["create"] = bench.create_latency(args.create)
                print("create latency:", json.dumps(results["create"]), flush=True)
                results["create_quiet"] = bench.create_latency(args.create, quiet=True)
                print("create latency (quiet):", json.dumps(results["create_quiet"]), flush=True)
            results["rollback"] = bench.rollback_reaction()
            print("rollback reaction:", json.dumps(results["rollback"]), flush=True)
            pairs: list[tuple[dict[str, Any], dict[str, Any]]] = []
            if sizes and not args.no_floor:
                # The machine's cost of the same writes moves by a quarter from one sitting to the next:
                # a ratio is only worth the minutes its two halves share. Earlier pairs go first; the
                # last floor pairs with the regular burst of that size below.
                for _ in range(args.pairs - 1):
                    pair = bench.burst_floor(max(sizes)), bench.burst(max(sizes))
                    pairs.append(pair)
                    print(f"pair {len(pairs)}:", json.dumps(pair_figure(*pair)), flush=True)
                results["floor"] = bench.burst_floor(max(sizes))
                print(f"burst floor {max(sizes)}:", json.dumps(results["floor"]), flush=True)
            # Each burst in a namespace of its own, deleted before the next: the last (largest) one stays
            # for the steady-state and RSS figures, so those are taken at exactly N.
            for i, n in enumerate(sizes):
                results[f"burst_{n}"] = bench.burst(n, keep=i == len(sizes) - 1)
                print(f"burst {n}:", json.dumps(results[f"burst_{n}"]), flush=True)
            if "floor" in results:
                pairs.append((results["floor"], results[f"burst_{max(sizes)}"]))
                results["pairs"] = [pair_figure(*pair) for pair in pairs]
            idle = sizes[-1] if sizes else 0
            results["steady"] = bench.steady(args.steady_seconds)
            results["steady"]["modeldeployments"] = idle
            print("steady state:", json.dumps(results["steady"]), flush=True)
            rss, peak = bench.operator_rss_mb()
            results["operator_rss_mb"] = {"now": rss, "peak": peak, "modeldeployments": idle}
            print("operator RSS:", json.dumps(results["operator_rss_mb"]), flush=True)
        finally:
            bench.stop()
    if args.batch:
        from hack import bench_batch

        results["batch"] = bench_batch.measure(args.batch)
        print("batch inference:", json.dumps(results["batch"]), flush=True)
    if args.batch_cluster:
        from hack import bench_batch_cluster
        from hack.s3server import S3ServerUnavailable
        from kube import ClusterUnavailable

        try:
            results["batch_cluster"] = bench_batch_cluster.measure(args.batch_cluster)
            print("batch inference (BatchInference):", json.dumps(results["batch_cluster"]), flush=True)
        except (ClusterUnavailable, S3ServerUnavailable) as err:
            results["batch_cluster_unavailable"] = str(err)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    report(results)
    return 0


def pair_figure(floor: dict[str, Any], burst: dict[str, Any]) -> dict[str, Any]:
    """One burst beside the floor run just before it: all Ready, and the API server's CPU for each."""
    return {
        "n": burst["n"],
        "floor_s": floor["all_ready_s"],
        "burst_s": burst["all_ready_s"],
        "ratio": burst["all_ready_s"] / floor["all_ready_s"],
        "apiserver_cpu_s": burst["cpu_s"].get("kube-apiserver"),
        "floor_apiserver_cpu_s": floor["cpu_s"].get("kube-apiserver"),
    }


def latency_line(lat: dict[str, Any], floor: dict[str, Any] | None) -> str:
    """Each object's own apply -> Ready latency, beside the floor's (apply -> Deployment available)."""
    if not lat.get("n"):
        return "per object: none ready"
    text = (
        f"per object apply->Ready p50 {lat['p50_s']:.1f} s  p99 {lat['p99_s']:.1f} s  "
        f"(half Ready {lat['half_ready_at_s']:.1f} s after the first apply)"
    )
    if floor and floor.get("n"):
        text += f"; floor p50 {floor['p50_s']:.1f} s  p99 {floor['p99_s']:.1f} s"
    return text


def lone_line(lone: dict[str, Any], n: int) -> str:
    """Another namespace's one object, created once the burst was applied."""
    if "apply_to_ready_s" not in lone:
        return "another namespace's one ModelDeployment: not Ready within 60 s of the burst's end"
    return (
        f"another namespace's one ModelDeployment, created {lone['applied_after_first_s']:.1f} s after "
        f"the first apply: Ready in {lone['apply_to_ready_s']:.1f} s, "
        f"ahead of {lone['burst_ready_after_it']} of the burst's {n}"
    )


def report(results: dict[str, Any]) -> None:
    print("\n== modeldeploy bench (local control plane, operator as subprocess) ==")
    c = results.get("create") or {}
    if c:
        print(
            f"create latency      p50 {c['p50_ms']:.0f} ms  p99 {c['p99_ms']:.0f} ms   "
            f"(direct-write floor p50 {c['floor_p50_ms']:.0f} ms  p99 {c['floor_p99_ms']:.0f} ms; "
            f"ratio {c['ratio_p50']:.2f}x)  n={c['n']}"
        )
    if "watch_delivery_p50_ms" in c:
        print(
            f"{'':<20}one watch delivery (create response -> its watch event here; the figure holds "
            f"two, the floor none) p50 {c['watch_delivery_p50_ms']:.0f} ms"
        )
    q = results.get("create_quiet")
    if q:
        print(
            f"{'':<20}each created once the one before is Ready (its floor: once its Deployment is "
            f"available): p50 {q['p50_ms']:.0f} ms  p99 {q['p99_ms']:.0f} ms (floor p50 "
            f"{q['floor_p50_ms']:.0f} ms  p99 {q['floor_p99_ms']:.0f} ms; ratio {q['ratio_p50']:.2f}x)"
        )
    floor = results.get("floor")
    for key, b in results.items():
        if key.startswith("burst_") or key == "floor":
            what = "burst floor" if key == "floor" else "burst"
            beside = ""
            if key != "floor" and floor is not None and floor["n"] == b["n"]:
                ratio = b["all_ready_s"] / floor["all_ready_s"]
                beside = f"; {ratio:.2f}x the floor's {floor['all_ready_s']:.1f} s"
            print(
                f"{what:<12}{b['n']:>5}    all Ready in {b['all_ready_s']:.1f} s "
                f"(applied in {b['applied_s']:.1f} s; ready {b['ready']}/{b['n']}{beside})"
            )
            floor_latency = floor["latency"] if floor and key != "floor" else None
            print(f"{'':<21}{latency_line(b['latency'], floor_latency)}")
            if "lone" in b:
                print(f"{'':<21}{lone_line(b['lone'], b['n'])}")
            stages = ", ".join(
                f"{label} {v['p50_s']:.2f}/{v['p99_s']:.2f}"
                for label, v in b["latency"].get("stages", {}).items()
            )
            print(f"{'':<21}stages p50/p99 s: {stages}")
            cpu = ", ".join(f"{k} {v:.0f}" for k, v in sorted(b["cpu_s"].items(), key=lambda kv: -kv[1]))
            writes = ", ".join(f"{k} {v}" for k, v in b["writes"].items())
            print(f"{'':<21}CPU seconds: {cpu}; operator reconciles: {b['reconciles']:.0f}")
            print(f"{'':<21}API writes: {writes}")
            api = b.get("apiserver", {})
            watch = ", ".join(
                f"{k.split()[-1]} {v:.0f}"
                for k, v in api.items()
                if k.startswith("apiserver_watch_events_total")
            )
            print(f"{'':<21}watch events sent (all watchers): {watch}")
    pairs = results.get("pairs") or []
    if len(pairs) > 1:
        median = statistics.median(p["ratio"] for p in pairs)
        each = ", ".join(
            f"{p['ratio']:.2f}x ({p['burst_s']:.0f} / {p['floor_s']:.0f} s; kube-apiserver "
            f"{p['apiserver_cpu_s']:.0f} / {p['floor_apiserver_cpu_s']:.0f} CPU-s)"
            for p in pairs
        )
        print(
            f"burst {pairs[0]['n']} and its floor, run alternately: median {median:.2f}x; each pair: {each}"
        )
    s = results["steady"]
    kinds = ", ".join(f"{k} {v}" for k, v in s["kinds"].items())
    late = ", ".join(f"{k} {v}" for k, v in s["late_burst_writes"].items()) or "none"
    print(
        f"steady state        {s['writes_per_min']:.1f} operator writes/min with "
        f"{s['modeldeployments']} idle ModelDeployments ({s['writes']} in {s['seconds']:.0f} s"
        f"{': ' + kinds if kinds else ''})"
    )
    print(
        f"{'':<20}counted once the operator was quiet for 5 s ({s['settled_s']} s after the last pod was "
        f"Ready); burst writes still landing until then: {late}"
    )
    r = results["operator_rss_mb"]
    print(
        f"operator RSS        {r['now']:.0f} MiB now, {r['peak']:.0f} MiB peak "
        f"(with {r['modeldeployments']} ModelDeployments at the end)"
    )
    print(f"rollback reaction   {results['rollback']['reaction_s']:.2f} s (failure seen -> stable only)")
    if "batch" in results:
        from hack import bench_batch

        print(bench_batch.line(results["batch"]))
    if "batch_cluster" in results:
        from hack import bench_batch_cluster

        print(bench_batch_cluster.line(results["batch_cluster"]))
    elif "batch_cluster_unavailable" in results:
        print(
            f"batch inference through a BatchInference: not measured ({results['batch_cluster_unavailable']})"
        )


if __name__ == "__main__":
    raise SystemExit(main())
