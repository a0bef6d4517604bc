"""The batch figure of ``make bench`` through a BatchInference: records per second scored by the
worker pods of a BatchInference on the real node (the operator's Indexed Job: a worker and a Triton
sidecar per pod, input and output in a real S3 server), against the floor of the same run: a plain
client loop sending the same records to the same tritonserver build on this machine (a host
process, the same model and the same config.pbtxt, rendered from the same spec), reading the input
from and writing the answers to the same S3 server.

Figures, per pod count (1 and 2):

- scoring: records / (last worker's end - first worker's start), from the workers' reports (their
  termination messages: Unix start time and duration, from before the input is listed until the
  manifest is written): what a BatchInference's data plane does against what the plain loop does;
- end to end: records / (apply -> ``Complete``), pod start, model staging and Triton's start
  included (the plain loop's Triton was started before its clock).

Needs the real node (root, its packages; ``make node-deps``); without it prints why and measures
nothing. Not run beside the test suite or another cluster: one real node per host.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "operator")]

from hack import bench_batch, realnode, s3server  # noqa: E402
from hack import images as builder  # noqa: E402
from hack import triton as launcher  # noqa: E402
from hack.procutil import poll  # noqa: E402

NAMESPACE = "bench-batch"
GROUP, VERSION, PLURAL = "modeldeploy.io", "v1alpha1", "batchinferences"
MODEL = "scaler"
SHARDS = 8


def model_spec(image: str) -> dict[str, Any]:
    """The inline model and server of the BatchInference (the floor's Triton gets the same config)."""
    from tritonmodels import inline_python_model

    return {
        "model": inline_python_model(MODEL, dims=bench_batch.DIMS, max_batch=bench_batch.MAX_BATCH),
        "server": realnode.on_node({"image": image, "imagePullPolicy": "Never", "shmSize": "64Mi"}),
    }


def rendered_config(spec: dict[str, Any]) -> str:
    from modeldeploy import api
    from modeldeploy.triton.config import render_config_pbtxt

    return render_config_pbtxt(MODEL, api.ModelSpec.model_validate(spec["model"]))


def _worker_window(cluster: Any, name: str) -> tuple[float, list[dict[str, Any]], list[str]]:
    """Seconds from the first worker's start to the last one's end (every worker that wrote a
    report, a failed one included: its shards are part of the work), the reports, and a line for
    each pod that did not succeed (a retried index: what happened to it)."""
    pods = cluster.core.list_namespaced_pod(NAMESPACE, label_selector=f"modeldeploy.io/batch={name}").items
    reports, unsucceeded = [], []
    for p in pods:
        states = []
        for cs in [*(p.status.init_container_statuses or []), *(p.status.container_statuses or [])]:
            term = cs.state.terminated if cs.state else None
            if term is None:
                continue
            states.append(f"{cs.name} exit {term.exit_code} {term.reason or ''}".strip())
            if cs.name == "worker" and term.message:
                try:
                    report = json.loads(term.message.strip().splitlines()[-1])
                except ValueError:
                    continue
                if "started" in report and "seconds" in report:
                    reports.append(report)
        if p.status.phase != "Succeeded":
            conditions = [c.type for c in p.status.conditions or [] if c.status == "True"]
            unsucceeded.append(
                f"{p.metadata.name}: {p.status.phase} {p.status.reason or ''} {p.status.message or ''} "
                f"conditions {conditions} containers {states}"
            )
    start = min(r["started"] for r in reports)
    end = max(r["started"] + r["seconds"] for r in reports)
    return end - start, reports, unsucceeded


def _batch_inference(
    cluster: Any,
    name: str,
    spec: dict[str, Any],
    pods: int,
    shard_bytes: int,
    batch: int,
    concurrency: int,
    n: int,
) -> dict[str, Any]:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "BatchInference",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "model": {"inline": spec},
            "input": {"uri": "s3://data/in", "credentialsSecret": "s3"},
            "output": {"uri": f"s3://data/{name}", "credentialsSecret": "s3"},
            "parallelism": pods,
            "shardSize": str(shard_bytes),
            "batchSize": batch,
            "concurrency": concurrency,
        },
    }
    t0 = time.monotonic()
    cluster.apply(json.dumps(body), namespace=NAMESPACE)  # JSON: YAML 1.1 reads a bare Y as true

    def ended() -> dict[str, Any] | None:
        obj = cluster.custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)
        st: dict[str, Any] = obj.get("status") or {}
        return st if st.get("phase") in ("Succeeded", "Failed") else None

    st = poll(ended, timeout=600, interval=0.2, what=f"BatchInference {name} ended")
    end_to_end = time.monotonic() - t0
    if st["phase"] != "Succeeded" or st.get("records") != n:
        raise RuntimeError(f"BatchInference {name}: {st}")
    window, reports, unsucceeded = _worker_window(cluster, name)
    return {
        "pods_not_succeeded": unsucceeded,
        "pods": pods,
        "records_per_s": n / window,
        "end_to_end_s": end_to_end,
        "end_to_end_records_per_s": n / end_to_end,
        "worker_seconds": [r["seconds"] for r in reports],
        "status_records_per_s": st.get("recordsPerSecond"),
    }


def measure(n: int = 100_000, batch: int = 32, concurrency: int = 4) -> dict[str, Any]:
    """The floor, then a BatchInference with one pod and one with two, each over all ``n`` records."""
    import obstore

    from kube import start_local
    from operator_proc import OperatorProcess, install_crd
    from tritonmodels import scaler_py

    dist = launcher.prepare()
    python = s3server.ensure_moto()
    with tempfile.TemporaryDirectory(prefix="modeldeploy-bench-batch-cluster-") as tmp:
        root = Path(tmp)
        cluster = start_local(root / "cluster", real_node=True)
        restore_env = cluster.export_env()
        try:
            refs = {}
            for image in ("operator", "triton"):
                built = builder.build(image)
                assert cluster.control_plane is not None
                cluster.control_plane.node.import_image(built.archive)
                refs[image] = built.ref
            install_crd(cluster)
            spec = model_spec(refs["triton"])
            repo = root / "repo"
            (repo / MODEL / "1").mkdir(parents=True)
            (repo / MODEL / "1" / "model.py").write_text(scaler_py(2))
            (root / "in").mkdir()
            xs = bench_batch._records(n, root / "in")
            total = sum(p.stat().st_size for p in (root / "in").iterdir())
            shard_bytes = -(-total // SHARDS)
            with s3server.S3Server.start(python, root / "s3", host=realnode.NODE_IP) as server:
                key = server.setup(bucket="models", upload=repo, prefix="repo")
                server.setup(bucket="data", user="batch")
                server.enforce_auth()
                for path in sorted((root / "in").iterdir()):
                    obstore.put(server.store(key, "data", "in"), path.name, path.read_bytes())
                cluster.create_namespace(NAMESPACE)
                cluster.kubectl(
                    "create", "secret", "generic", "s3", "-n", NAMESPACE,
                    f"--from-literal=AWS_ACCESS_KEY_ID={key.access_key}",
                    f"--from-literal=AWS_SECRET_ACCESS_KEY={key.secret_key}",
                    f"--from-literal=AWS_ENDPOINT_URL={server.endpoint}",
                )  # fmt: skip

                # the floor: the same model and config on a host tritonserver of the same build
                (repo / MODEL / "config.pbtxt").write_text(rendered_config(spec))
                triton = launcher.TritonServer.start(
                    dist, repo, log_path=root / "triton.log", ready_timeout=120
                )
                try:
                    asyncio.run(bench_batch._floor(triton.http_address, xs[: batch * 8], batch, concurrency))
                    floor_s = asyncio.run(
                        bench_batch._plain_script(
                            triton.http_address,
                            server.store(key, "data", "in"),
                            server.store(key, "data", "plain"),
                            batch,
                            concurrency,
                        )
                    )
                finally:
                    triton.stop()
                out: dict[str, Any] = {
                    "records": n,
                    "batch_size": batch,
                    "concurrency": concurrency,
                    "shards": SHARDS,
                    "shard_bytes": shard_bytes,
                    "floor_records_per_s": n / floor_s,
                }
                op = OperatorProcess(
                    root / "operator", [NAMESPACE], resync_seconds=10,
                    env={"MODELDEPLOY_STAGER_IMAGE": refs["operator"]},
                )  # fmt: skip
                op.start()
                try:
                    for pods in (1, 2):
                        run = _batch_inference(
                            cluster, f"pods-{pods}", spec, pods, shard_bytes, batch, concurrency, n
                        )
                        run["ratio"] = run["records_per_s"] / out["floor_records_per_s"]
                        out[f"pods_{pods}"] = run
                finally:
                    op.stop()
        finally:
            restore_env()
            cluster.close()
            assert cluster.control_plane is not None
            cluster.control_plane.stop()
    return out


def line(b: dict[str, Any]) -> str:
    one, two = b["pods_1"], b["pods_2"]
    retried = [p for run in (one, two) for p in run.get("pods_not_succeeded") or []]
    return (
        f"batch inference (BatchInference on the real node, S3) {b['records']} records, batch "
        f"{b['batch_size']}, {b['concurrency']} in flight per pod, {b['shards']} shards: floor (plain client "
        f"loop, host tritonserver, same S3) {b['floor_records_per_s']:.0f} records/s; "
        f"1 pod {one['records_per_s']:.0f}/s ({one['ratio']:.2f}x of the floor; "
        f"end to end {one['end_to_end_s']:.1f}s from apply, {one['end_to_end_records_per_s']:.0f}/s); "
        f"2 pods {two['records_per_s']:.0f}/s ({two['ratio']:.2f}x; "
        f"{two['records_per_s'] / one['records_per_s']:.2f}x of 1 pod, on 2 cores; "
        f"end to end {two['end_to_end_s']:.1f}s)" + (f"; pods tried again: {retried}" if retried else "")
    )


if __name__ == "__main__":
    from kube import ClusterUnavailable

    try:
        result = measure(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
    except (ClusterUnavailable, s3server.S3ServerUnavailable) as err:
        print(f"batch inference through a BatchInference: not measured ({err})")
        raise SystemExit(0) from None
    print(json.dumps(result))
    print(line(result))
