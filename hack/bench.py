"""make bench: figures, not pass/fail, from one run on the local control plane.

The operator runs as a subprocess with its own client identity, so the API server's audit log
attributes every write to it. Prints:
  - create latency p50/p99 (ModelDeployment applied -> children present and status observed),
    beside the floor: the same writes issued directly by a plain client, in the same run;
  - burst: N ModelDeployments applied at once -> all Ready;
  - steady state: operator API writes per minute with N idle ModelDeployments;
  - operator peak RSS at N;
  - rollback reaction: candidate failure visible in the API -> traffic back on stable.

Usage: python -m hack.bench [--create 100] [--burst 100,500,1000] [--steady-seconds 60]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO / "operator")]

from hack import localcluster, runtimeenv  # noqa: E402
from kube import Cluster  # noqa: E402
from operator_proc import OperatorProcess, install_crd  # noqa: E402

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
        # (nor kopf's namespace list-then-watch gap, which modeldeploy.kopfpatch closes).
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

    def operator_write_kinds(self, since: int) -> list[str]:
        """The operator's API writes after byte offset ``since`` of the audit log, each as
        "verb resource[/subresource]"."""
        out = []
        for ev in localcluster.iter_audit_events(self.cp.audit_log, since):
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

    def create_latency(self, n: int) -> dict[str, float]:
        ns = self.first_namespace
        lat = []
        for i in range(n):
            name = f"m{i}"
            t0 = time.monotonic()
            self.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, md_body(name))
            while True:
                md = self.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
                st = md.get("status") or {}
                if st.get("observedGeneration") == 1 and st.get("phase"):
                    svcs = self.core.list_namespaced_service(ns, label_selector=f"modeldeploy.io/name={name}")
                    deps = self.apps.list_namespaced_deployment(
                        ns, label_selector=f"modeldeploy.io/name={name}"
                    )
                    if len(svcs.items) == 3 and len(deps.items) == 1:
                        break
                if time.monotonic() - t0 > 60:
                    raise RuntimeError(f"{name}: not reconciled within 60 s")
                time.sleep(0.005)
            lat.append(time.monotonic() - t0)
        self.delete_namespace(ns)
        floor = self.direct_floor(n)
        return {
            "n": n,
            "p50_ms": 1000 * pct(lat, 50),
            "p99_ms": 1000 * pct(lat, 99),
            "floor_p50_ms": 1000 * pct(floor, 50),
            "floor_p99_ms": 1000 * pct(floor, 99),
            "ratio_p50": pct(lat, 50) / pct(floor, 50),
        }

    def direct_writes(self, ns: str, name: str) -> None:
        """What the operator writes for a new ModelDeployment, issued by a plain client with no
        decisions in between: the ModelDeployment, its Deployment and 3 Services (server-side apply),
        one status patch."""
        from modeldeploy import api, builders, revision

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

    def direct_floor(self, n: int) -> list[float]:
        """Latency of :meth:`direct_writes`, one ModelDeployment at a time."""
        ns = self.namespace("floor-create")
        out = []
        for i in range(n):
            t0 = time.monotonic()
            self.direct_writes(ns, f"d{i}")
            out.append(time.monotonic() - t0)
        self.delete_namespace(ns)
        return out

    def burst(self, n: int, keep: bool = False) -> dict[str, Any]:
        """N ModelDeployments created at once (8 client threads) -> every one Ready. Also where the
        machine's CPU went meanwhile (per process) and who wrote what (audit log)."""
        ns = self.namespace(f"bench-burst-{n}")
        return self._burst(
            n,
            ns,
            lambda i: self.custom.create_namespaced_custom_object(
                GROUP, VERSION, ns, PLURAL, md_body(f"b{i}")
            ),
            self._mds_ready,
            keep,
        )

    def burst_floor(self, n: int) -> dict[str, Any]:
        """The same children for N ModelDeployments written at once by a plain client (outside the
        operator's namespaces) -> every Deployment's pod ready: what the cluster itself needs."""
        ns = self.namespace(f"floor-burst-{n}")
        return self._burst(n, ns, lambda i: self.direct_writes(ns, f"f{i}"), self._deployments_ready)

    def _mds_ready(self, ns: str, n: int, deadline: float) -> int:
        return self._watch_ready(
            functools.partial(self.custom.list_namespaced_custom_object, GROUP, VERSION, ns, PLURAL),
            lambda md: (md.get("status") or {}).get("phase") == "Ready",
            n,
            deadline,
        )

    def _deployments_ready(self, ns: str, n: int, deadline: float) -> int:
        return self._watch_ready(
            functools.partial(self.apps.list_namespaced_deployment, ns),
            lambda dep: (dep.get("status") or {}).get("readyReplicas", 0) >= 1,
            n,
            deadline,
        )

    @staticmethod
    def _watch_ready(list_fn: Any, ready: Any, n: int, deadline: float) -> int:
        """How many objects are ready, once ``n`` are (or at ``deadline``): one list, then a watch from
        its resourceVersion, raw JSON. (Polling a list of 1000 objects every half second costs the API
        server, and this process, more than the operator under test.)"""

        def relist() -> tuple[dict[str, bool], str]:
            body = json.loads(list_fn(_preload_content=False).data)
            return {it["metadata"]["name"]: bool(ready(it)) for it in body["items"]}, body["metadata"][
                "resourceVersion"
            ]

        state, rv = relist()
        while sum(state.values()) < n and time.monotonic() < deadline:
            resp = list_fn(
                watch=True,
                resource_version=rv,
                allow_watch_bookmarks=True,
                timeout_seconds=max(1, min(30, int(deadline - time.monotonic()))),
                _preload_content=False,
            )
            try:
                for line in resp:
                    event = json.loads(line)
                    obj = event["object"]
                    if event["type"] == "ERROR":  # e.g. 410 Gone: list again
                        state, rv = relist()
                        break
                    rv = obj["metadata"]["resourceVersion"]
                    if event["type"] == "DELETED":
                        state.pop(obj["metadata"]["name"], None)
                    elif event["type"] in ("ADDED", "MODIFIED"):
                        state[obj["metadata"]["name"]] = bool(ready(obj))
                    if sum(state.values()) >= n:
                        break
            finally:
                resp.close()
        return sum(state.values())

    def _burst(self, n: int, ns: str, create: Any, count_ready: Any, keep: bool = False) -> dict[str, Any]:
        cpu0, audit0 = self.cpu_seconds(), self.audit_position()
        t0 = time.monotonic()
        with cf.ThreadPoolExecutor(8) as pool:
            list(pool.map(create, range(n)))
        applied = time.monotonic() - t0
        ready = count_ready(ns, n, t0 + 900)
        elapsed = time.monotonic() - t0
        cpu1 = self.cpu_seconds()
        out = {
            "n": n,
            "applied_s": applied,
            "all_ready_s": elapsed,
            "ready": ready,
            "cpu_s": {k: round(cpu1[k] - cpu0.get(k, 0.0), 1) for k in cpu1},
            "writes": self.writes_by_identity(audit0, ns),
        }
        if not keep:
            self.delete_namespace(ns)
        return out

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

    def audit_position(self) -> int:
        return self.cp.audit_log.stat().st_size if self.cp.audit_log.exists() else 0

    def writes_by_identity(self, since: int, namespace: str) -> dict[str, int]:
        """API writes in ``namespace`` after byte offset ``since`` of the audit log, by client identity."""
        counts = Counter(
            ev.get("user", {}).get("username", "?").rsplit(":", 1)[-1]
            for ev in localcluster.iter_audit_events(self.cp.audit_log, since)
            if (ev.get("objectRef") or {}).get("namespace") == namespace
        )
        return dict(counts.most_common())

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
    args = ap.parse_args()
    sizes = [int(x) for x in args.burst.split(",") if x]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="modeldeploy-bench-") as tmp:
        bench = Bench(Path(tmp))
        bench.start()
        try:
            results["create"] = bench.create_latency(args.create)
            print("create latency:", json.dumps(results["create"]), flush=True)
            results["rollback"] = bench.rollback_reaction()
            print("rollback reaction:", json.dumps(results["rollback"]), flush=True)
            if sizes and not args.no_floor:
                results["floor"] = bench.burst_floor(max(sizes))
                print(f"burst floor {max(sizes)}:", json.dumps(results["floor"]), flush=True)
            # Each burst in a namespace of its own, deleted before the next: the last (largest) one stays
            # for the steady-state and RSS figures, so those are taken at exactly N.
            for i, n in enumerate(sizes):
                results[f"burst_{n}"] = bench.burst(n, keep=i == len(sizes) - 1)
                print(f"burst {n}:", json.dumps(results[f"burst_{n}"]), flush=True)
            idle = sizes[-1] if sizes else 0
            results["steady"] = bench.steady(args.steady_seconds)
            results["steady"]["modeldeployments"] = idle
            print("steady state:", json.dumps(results["steady"]), flush=True)
            rss, peak = bench.operator_rss_mb()
            results["operator_rss_mb"] = {"now": rss, "peak": peak, "modeldeployments": idle}
            print("operator RSS:", json.dumps(results["operator_rss_mb"]), flush=True)
        finally:
            bench.stop()
    report(results)
    return 0


def report(results: dict[str, Any]) -> None:
    c = results["create"]
    print("\n== modeldeploy bench (local control plane, operator as subprocess) ==")
    print(
        f"create latency      p50 {c['p50_ms']:.0f} ms  p99 {c['p99_ms']:.0f} ms   "
        f"(direct-write floor p50 {c['floor_p50_ms']:.0f} ms  p99 {c['floor_p99_ms']:.0f} ms; "
        f"ratio {c['ratio_p50']:.2f}x)  n={c['n']}"
    )
    for key, b in results.items():
        if key.startswith("burst_") or key == "floor":
            what = "burst floor" if key == "floor" else "burst"
            print(
                f"{what:<12}{b['n']:>5}    all Ready in {b['all_ready_s']:.1f} s "
                f"(applied in {b['applied_s']:.1f} s; ready {b['ready']}/{b['n']})"
            )
            cpu = ", ".join(f"{k} {v:.0f}" for k, v in sorted(b["cpu_s"].items(), key=lambda kv: -kv[1]))
            writes = ", ".join(f"{k} {v}" for k, v in b["writes"].items())
            print(f"{'':<21}CPU seconds: {cpu}")
            print(f"{'':<21}API writes: {writes}")
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


if __name__ == "__main__":
    raise SystemExit(main())
