#!/usr/bin/env python3
"""``make demo`` on the real node: real Triton pods answering real requests while versions change.

Run by ``hack/demo.sh`` once the local control plane is up with its real node (``real-0``), with the
operator already running. It:

1. builds the Triton and operator images (cached) and loads them into the node's containerd;
2. serves a model repository from a real S3 server (moto) on the node IP: the ``versioned`` python
   model, whose every answer is its own version number (versions 1 and 2 answer, version 3's
   ``initialize`` raises: a broken release);
3. applies a ModelDeployment of version 1 and sends it an inference request through its Service;
4. starts a client sending requests through the main Service the whole time (one connection per
   request, no retries), rolls out version 2 as a canary (25 %, 50 %, 100 %) printing the share of
   answers version 2 gave at each step, then version 3, which never becomes ready and is rolled back
   by the operator on its own;
5. prints the client's count of failed requests.

The client and the model are the ones the real-tier tests measure with (``tests/real/traffic.py``,
``tests/real/models.py``). The S3 server stops when this script ends; the ModelDeployment stays.
"""

from __future__ import annotations

import argparse
import calendar
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "real"))  # the real tier's model and traffic (tests/ is no package)

from models import MODEL, SPEC_CONFIG, write_repository  # noqa: E402
from traffic import Traffic, describe_failures, failures, kube_proxy_caught_up, versions  # noqa: E402

from hack import images, localcluster, realnode, s3server  # noqa: E402
from hack.procutil import poll  # noqa: E402

NAME = "versioned"
KUBE_PROXY_METRICS = f"http://{realnode.NODE_IP}:{realnode.RealNode.PORTS['kube-proxy-metrics']}/metrics"
NAMESPACE = "demo"
REPLICAS = 3


def step(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def kubectl(*args: str, input: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(["kubectl", *args], input=input, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def status() -> dict[str, Any]:
    out = kubectl("get", "md", NAME, "-n", NAMESPACE, "-o", "json")
    st: dict[str, Any] = json.loads(out).get("status") or {}
    return st


def wait(pred: Any, what: str, timeout: float = 300) -> dict[str, Any]:
    last = ""

    def ready() -> dict[str, Any] | None:
        nonlocal last
        st = status()
        row = kubectl("get", "md", NAME, "-n", NAMESPACE, "--no-headers", check=False).strip()
        if row != last:
            print(f"  {row}", flush=True)
            last = row
        return st if pred(st) else None

    try:
        return poll(ready, timeout=timeout, interval=0.5, what=what)
    except TimeoutError as exc:
        raise SystemExit(f"{exc}: {status()}") from None


def ready_on(revision: int) -> Any:
    def check(st: dict[str, Any]) -> bool:
        ro = st.get("rollout") or {}
        return (
            st.get("phase") == "Ready" and st.get("stableRevision") == revision and ro.get("state") == "Idle"
        )

    return check


def manifest(image: str, version: int) -> str:
    md = {
        "apiVersion": "modeldeploy.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": NAME, "namespace": NAMESPACE},
        "spec": {
            "model": {
                "name": MODEL,
                "format": "python",
                "storageUri": "s3://models/repo",
                "version": version,
                "credentialsSecret": "s3",
                "config": SPEC_CONFIG,
            },
            "replicas": REPLICAS,
            "server": realnode.on_node({"image": image, "imagePullPolicy": "Never", "shmSize": "64Mi"}),
            "rollout": {
                "steps": [{"weight": 25, "pause": {}}, {"weight": 50, "pause": {}}, {"weight": 100}],
                "scaleDownDelaySeconds": 0,
                "progressDeadlineSeconds": 60,
            },
        },
    }
    return json.dumps(md)


def routed(ready: int, timeout: float = 60) -> None:
    """Wait until the main Service has ``ready`` ready endpoints and kube-proxy has written them."""
    count, stamps = 0, []

    def caught_up() -> bool | None:
        nonlocal count, stamps
        slices = json.loads(
            kubectl(
                "get",
                "endpointslices",
                "-n",
                NAMESPACE,
                "-l",
                f"kubernetes.io/service-name={NAME}",
                "-o",
                "json",
                "--show-managed-fields",  # their times say when the slices last changed
            )
        )["items"]
        count = sum(
            1 for s in slices for e in s.get("endpoints") or [] if (e.get("conditions") or {}).get("ready")
        )
        stamps = [
            f["time"] for s in slices for f in s["metadata"].get("managedFields") or [] if f.get("time")
        ]
        if count == ready and stamps:
            changed = max(calendar.timegm(time.strptime(t, "%Y-%m-%dT%H:%M:%SZ")) for t in stamps)
            if kube_proxy_caught_up(KUBE_PROXY_METRICS, changed):
                return True
        return None

    try:
        poll(caught_up, timeout=timeout, interval=0.2, what=f"{ready} ready endpoints routed")
    except TimeoutError:
        raise SystemExit(
            f"the Service never had {ready} ready endpoints routed: {count} ready, slices changed {stamps}"
        ) from None


def share_of(traffic: Traffic, version: int, n: int = 300) -> str:
    t0 = time.monotonic()
    while traffic.count_since(t0) < n:
        time.sleep(0.2)
    window = traffic.outcomes(t0)
    got = versions(window)
    return f"{got[version] / max(1, sum(got.values())):.0%} of {len(window)} requests answered by v{version}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=ROOT / ".cluster")
    args = parser.parse_args()
    workdir = args.dir.resolve()
    cache = Path(os.environ.get("MODELDEPLOY_CACHE", Path.home() / ".cache" / "modeldeploy"))
    bins = realnode.NodeBinaries.locate(cache, localcluster.read_versions())
    socket = realnode.NodePaths(realnode.node_root(workdir)).containerd_socket

    step("images: Triton (tritonserver of the nvidia-pytriton wheel) and the operator (its stager)")
    refs = {}
    for name in ("triton", "operator"):
        built = images.build(name, progress=lambda m: print(f"  [images] {m}", flush=True))
        images.import_into(bins.ctr, socket, built.archive)
        refs[name] = built.ref
        print(f"  {built.describe()}, loaded into real-0's containerd", flush=True)

    step("model repository in a real S3 server (moto) on the node IP")
    python = s3server.ensure_moto()
    work = workdir / "demo"
    source = write_repository(
        work / f"repo-{uuid.uuid4().hex[:6]}", {1: "answer", 2: "answer", 3: "fail_load"}
    )
    with s3server.S3Server.start(python, work / "s3", host=realnode.NODE_IP) as server:
        key = server.setup(bucket="models", upload=source, prefix="repo")
        server.enforce_auth()
        print(f"  {server.endpoint}/models/repo: {MODEL} versions 1, 2 (answer) and 3 (fails to load)")
        kubectl("delete", "namespace", NAMESPACE, "--ignore-not-found", "--wait=true", "--timeout=120s")
        kubectl("create", "namespace", NAMESPACE)
        kubectl(
            "create", "secret", "generic", "s3", "-n", NAMESPACE,
            f"--from-literal=AWS_ACCESS_KEY_ID={key.access_key}",
            f"--from-literal=AWS_SECRET_ACCESS_KEY={key.secret_key}",
            f"--from-literal=AWS_ENDPOINT_URL={server.endpoint}",
        )  # fmt: skip
        return story(refs)


def story(refs: dict[str, str]) -> int:
    step(f"ModelDeployment {NAMESPACE}/{NAME}: version 1, {REPLICAS} Triton pods on real-0")
    kubectl("apply", "-f", "-", input=manifest(refs["triton"], 1))
    wait(ready_on(1), "version 1 Ready")
    print(kubectl("get", "pods", "-n", NAMESPACE, "-o", "wide"))
    svc = json.loads(kubectl("get", "svc", NAME, "-n", NAMESPACE, "-o", "json"))
    host = svc["spec"]["clusterIP"]
    port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "http")
    routed(REPLICAS)
    step(f"inference through the Service {host}:{port}")
    print(
        '  $ curl -d \'{"inputs":[{"name":"X","shape":[1,3],"datatype":"FP32","data":[1,1,1]}]}\' '
        f"http://{host}:{port}/v2/models/{MODEL}/infer"
    )
    with Traffic(host, port, MODEL, rate=40) as traffic:
        origin = time.monotonic()
        print(f"  {share_of(traffic, 1, 20)}")

        step("canary: version 2 at 25 %, then 50 %, then promoted (a client sends 40 requests/s throughout)")
        kubectl(
            "patch", "md", NAME, "-n", NAMESPACE, "--type=merge", "-p", '{"spec":{"model":{"version":2}}}'
        )
        for index, weight in enumerate((25, 50)):
            wait(
                lambda st, i=index: (
                    (st.get("rollout") or {}).get("state") == "Paused"
                    and (st.get("rollout") or {}).get("step") == i
                ),
                f"step {index + 1} held",
            )
            routed(REPLICAS + (1 if weight == 25 else REPLICAS))
            print(f"  weight {weight} %: {share_of(traffic, 2)}", flush=True)
            kubectl(
                "annotate",
                "md",
                NAME,
                "-n",
                NAMESPACE,
                "--overwrite",
                f"modeldeploy.io/resume={uuid.uuid4().hex[:8]}",
            )
        wait(ready_on(2), "version 2 promoted")
        print(f"  promoted: {share_of(traffic, 2, 100)}")

        step("version 3: its model fails to load; the operator rolls back by itself")
        kubectl(
            "patch", "md", NAME, "-n", NAMESPACE, "--type=merge", "-p", '{"spec":{"model":{"version":3}}}'
        )
        st = wait(lambda st: (st.get("rollout") or {}).get("state") == "RolledBack", "the rollback")
        print(f"  status.message: {st.get('message')}")
        print(
            kubectl(
                "get",
                "events",
                "-n",
                NAMESPACE,
                "--field-selector",
                "type=Warning,involvedObject.kind=ModelDeployment",
            )
        )
        print(f"  after the rollback: {share_of(traffic, 2, 100)}")
        outcomes = traffic.stop()

    step("what the client saw")
    print(f"  {len(outcomes)} requests, {dict(versions(outcomes))} answered per version")
    print(f"  failed requests: {len(failures(outcomes))}")
    if failures(outcomes):
        print(f"  {describe_failures(outcomes, origin)}")
    print(kubectl("get", "md", "-n", NAMESPACE, "-o", "wide"))
    return 1 if failures(outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
