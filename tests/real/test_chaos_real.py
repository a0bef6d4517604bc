"""Chaos on real containers (issue 12, behaviour 6): processes killed with SIGKILL on the real node
in the middle of a canary.

* The ``tritonserver`` of a *stable* pod: the kubelet restarts the container (restartCount + 1),
  the pod leaves the Service's endpoints while it is not Ready and comes back; the rollout neither
  advances nor promotes during that gap (its timed pause runs from the step's persisted
  ``stepReadyAt`` as if nothing happened), and no request is lost beyond what the client's retry
  policy covers.
* The leader of two operator pods installed by the chart (leader election on a Lease): the other
  replica takes the Lease and the rollout resumes where it was: same step, same pause clock, one
  rollout, one candidate revision and Deployment, promoted in the end.

The client's retry policy (:data:`RETRY`), which a client of any Triton Service should have: a
request whose connection failed (refused, reset, closed before an answer, or no answer within
``TIMEOUT``) is sent again on a new connection, up to 5 times, after 0, 0.4, 0.8, 1.6 and 3.2 s
(urllib3's ``Retry(connect=5, read=5, backoff_factor=0.2)``, the library under ``requests``;
POST included, as inference is idempotent). HTTP error statuses are never retried: a model that
answers wrongly is a failure. Why more than one immediate retry: kube-proxy picks a backend per
connection, so until the kubelet, the EndpointSlice controller and kube-proxy have taken a dead
pod out (about a second on this machine, more when it is busy) an immediate retry reaches the same
dead pod again with probability 1/endpoints; the backoff spans that window.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import urllib3
from mdview import Model, describe, serving, settled, wait_status
from models import MODEL, write_repository
from realtier import figure, realnode, unavailable
from test_traffic import manifest
from traffic import TIMEOUT

from hack import s3server
from kube import REPO_ROOT, Cluster, pod_is_ready, wait_for
from operator_proc import OperatorProcess, install_crd

CHART = REPO_ROOT / "charts" / "modeldeploy-operator"
PREFIX = "chaos"
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}

RETRY = urllib3.Retry(
    total=5,
    connect=5,
    read=5,
    status=0,
    other=0,
    redirect=0,
    allowed_methods=None,  # every method: inference is idempotent
    backoff_factor=0.2,
    raise_on_status=False,
    respect_retry_after_header=False,
)
BODY = json.dumps(
    {"inputs": [{"name": "X", "shape": [1, 3], "datatype": "FP32", "data": [1.0, 1.0, 1.0]}]}
).encode()


# --------------------------------------------------------------------------- a client with retries


@dataclass(frozen=True)
class Request:
    start: float  # time.monotonic() when the first attempt was sent
    seconds: float  # until the final answer, retries included
    version: int | None  # the version that answered in the end, None if the request failed
    error: str | None  # why it failed in the end
    failed_attempts: tuple[str, ...]  # the attempts that failed before it was answered (or gave up)

    @property
    def first_attempt_failed(self) -> bool:
        return bool(self.failed_attempts) or self.error is not None


def infer_with_retries(host: str, port: int) -> Request:
    t0 = time.monotonic()
    # A pool per request: every attempt opens its own connection (kube-proxy's draw per connection).
    pool = urllib3.HTTPConnectionPool(host, port, maxsize=1, timeout=urllib3.Timeout(TIMEOUT, TIMEOUT))
    try:
        resp = pool.urlopen(
            "POST",
            f"/v2/models/{MODEL}/infer",
            body=BODY,
            headers={"Content-Type": "application/json", "Connection": "close"},
            retries=RETRY.new(),
        )
    except urllib3.exceptions.MaxRetryError as e:
        return Request(t0, time.monotonic() - t0, None, f"gave up: {e.reason!r}", ("6 attempts",))
    except urllib3.exceptions.HTTPError as e:
        return Request(t0, time.monotonic() - t0, None, f"{type(e).__name__}: {e}", ())
    finally:
        pool.close()
    history = resp.retries.history if resp.retries is not None else ()
    # "NewConnectionError: [Errno 111] Connection refused" (urllib3 prefixes the connection's repr)
    failed = tuple(f"{type(h.error).__name__}: {str(h.error).rsplit(': ', 1)[-1]}" for h in history)
    seconds = time.monotonic() - t0
    if resp.status != 200:
        return Request(t0, seconds, None, f"HTTP {resp.status}: {resp.data[:200]!r}", failed)
    try:
        answer = json.loads(resp.data)["outputs"][0]["data"]
    except (ValueError, KeyError, IndexError) as e:
        return Request(t0, seconds, None, f"malformed answer: {e}", failed)
    if len(set(answer)) != 1 or answer[0] != int(answer[0]):
        return Request(t0, seconds, None, f"malformed answer {answer!r}", failed)
    return Request(t0, seconds, int(answer[0]), None, failed)


class RetryingTraffic:
    """Requests at ``rate`` per second (paced, one at a time) through :func:`infer_with_retries`."""

    def __init__(self, host: str, port: int, rate: float) -> None:
        self.host, self.port, self.rate = host, port, rate
        self._requests: list[Request] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="retrying-traffic", daemon=True)

    def __enter__(self) -> RetryingTraffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> list[Request]:
        self._stop.set()
        self._thread.join(TIMEOUT * 6 + 10)
        return self.requests()

    def _run(self) -> None:
        period = 1.0 / self.rate
        due = time.monotonic()
        while not self._stop.is_set():
            req = infer_with_retries(self.host, self.port)
            with self._lock:
                self._requests.append(req)
            due = max(due + period, time.monotonic() - period)
            self._stop.wait(max(0.0, due - time.monotonic()))

    def requests(self, since: float = 0.0) -> list[Request]:
        with self._lock:
            return [r for r in self._requests if r.start >= since]


def summary(requests: list[Request], origin: float) -> str:
    first = [r for r in requests if r.first_attempt_failed]
    lost = [r for r in requests if r.error is not None]
    answered: dict[int, int] = {}
    for r in requests:
        if r.version is not None:
            answered[r.version] = answered.get(r.version, 0) + 1
    worst = max((len(r.failed_attempts) for r in requests), default=0)
    detail = "; ".join(
        f"+{r.start - origin:.2f}s {r.error or r.failed_attempts[0]} ({len(r.failed_attempts)} failed)"
        for r in (lost or first)[:3]
    )
    return (
        f"{len(requests)} requests, {len(first)} failed on the first attempt (no retry), {len(lost)} "
        f"failed after the retry policy, at most {worst} failed attempts for one request, answered per "
        f"version {answered}" + (f"; {detail}" if detail else "")
    )


# --------------------------------------------------------------------------- the real node's processes


def container_process(cluster: Cluster, container_id: str) -> int:
    """Host PID of a container's init process, from the node's containerd (``ctr task ls``)."""
    assert cluster.control_plane is not None
    node = cluster.control_plane.node
    cid = container_id.split("://", 1)[-1]
    out = subprocess.run(
        [str(node.binaries.ctr), f"--address={node.paths.containerd_socket}", "-n", "k8s.io", "task", "ls"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0] == cid and fields[2] == "RUNNING":
            return int(fields[1])
    raise AssertionError(f"container {cid} has no running task:\n{out}")


def pid_in_container(pid: int) -> int:
    """The process's PID inside its own PID namespace (the last NSpid field)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    raise AssertionError(f"no NSpid for {pid}")


def container_status(pod: Any, name: str) -> Any:
    return next(c for c in pod.status.container_statuses or [] if c.name == name)


def wall(iso: str) -> float:
    return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def md_events(cluster: Cluster, namespace: str, name: str) -> list[dict[str, Any]]:
    items = cluster.core.list_namespaced_event(
        namespace, field_selector=f"involvedObject.kind=ModelDeployment,involvedObject.name={name}"
    ).items
    return sorted(
        (
            {
                "reason": e.reason,
                "message": e.message,
                "at": e.first_timestamp.timestamp(),
                "by": e.reporting_instance,
            }
            for e in items
        ),
        key=lambda e: e["at"],
    )


def reasons(events: list[dict[str, Any]]) -> list[str]:
    return [e["reason"] for e in events]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, cluster: Cluster) -> Iterator[tuple[Any, Any]]:
    """moto on the node IP (pods reach it), bucket ``models``: versions 1 and 2 of ``versioned``."""
    try:
        python = s3server.ensure_moto()
    except s3server.S3ServerUnavailable as err:
        unavailable(f"S3 server (moto): {err}")
    work = tmp_path_factory.mktemp("s3")
    source = write_repository(work / "repo", {1: "answer", 2: "answer"})
    with s3server.S3Server.start(python, work / "server", host=realnode.NODE_IP) as server:
        key = server.setup(bucket="models", upload=source, prefix="repo")
        server.enforce_auth()
        yield server, key


def workload_namespace(cluster: Cluster, repo: tuple[Any, Any], prefix: str) -> str:
    server, key = repo
    ns: str = cluster.create_namespace(prefix=prefix)
    cluster.kubectl(
        "create", "secret", "generic", "s3", "-n", ns,
        f"--from-literal=AWS_ACCESS_KEY_ID={key.access_key}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={key.secret_key}",
        f"--from-literal=AWS_ENDPOINT_URL={server.endpoint}",
    )  # fmt: skip
    return ns


def model_deployment(name: str, image: str, replicas: int, steps: list[dict[str, Any]]) -> dict[str, Any]:
    obj = manifest(name, image, {"steps": steps, "scaleDownDelaySeconds": 0, "progressDeadlineSeconds": 300})
    obj["spec"]["replicas"] = replicas
    return obj


# --------------------------------------------------------------------------- 1: Triton killed


STABLE = 2  # pods per revision; at weight 50 the candidate gets 2 as well
PAUSE = 60  # seconds of the 50 % step: longer than the stable pod's gap, which must fall inside it


def test_killed_stable_triton_restarts_and_the_canary_neither_promotes_nor_loses_requests(
    cluster: Cluster, images: dict[str, str], repo: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory
) -> None:
    install_crd(cluster)
    ns = workload_namespace(cluster, repo, f"{PREFIX}-triton")
    op = OperatorProcess(
        tmp_path_factory.mktemp("operator"),
        [ns],
        resync_seconds=10,
        env={"MODELDEPLOY_STAGER_IMAGE": images["operator"]},
    )
    op.start()
    try:
        steps: list[dict[str, Any]] = [{"weight": 50, "pause": {"duration": f"{PAUSE}s"}}, {"weight": 100}]
        cluster.apply(model_deployment("kill", images["triton"], STABLE, steps), namespace=ns)
        md = Model(cluster, ns, "kill")
        serving(md, 1)
        host, port = md.service_address()
        settled(md, {1: STABLE})
        with RetryingTraffic(host, port, rate=40) as traffic:
            origin = time.monotonic()
            md.patch({"spec": {"model": {"version": 2}}})
            st = wait_status(
                md,
                lambda s: (s.get("rollout") or {}).get("stepReadyAt") and (s["rollout"]["step"] == 0),
                240,
                "the 50 % step ready (its pause running)",
            )
            held = {k: st["rollout"][k] for k in ("state", "step", "weight", "stepReadyAt", "startedAt")}
            assert held["state"] == "Progressing" and held["weight"] == 50, held
            settled(md, {1: STABLE, 2: STABLE})

            victim = md.pods_by_revision()[1][0]
            triton = container_status(victim, "triton")
            restarts = triton.restart_count
            pid = container_process(cluster, triton.container_id)
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            assert comm == "tritonserver", f"container init is {comm!r}, not tritonserver"
            ns_pid = pid_in_container(pid)

            os.kill(pid, signal.SIGKILL)
            t_kill, kill_wall = time.monotonic(), time.time()

            # Through the gap: the killed pod goes not-Ready and leaves the endpoints, then comes back
            # restarted; the rollout stays exactly where it was all along.
            seen: dict[str, float] = {}
            timeline: list[tuple[float, dict[str, Any]]] = []
            moved: list[str] = []

            def back() -> bool:
                pod = cluster.core.read_namespaced_pod(victim.metadata.name, ns)
                ro = (md.status().get("rollout")) or {}
                now = time.monotonic() - t_kill
                timeline.append((now, ro))
                if {k: ro.get(k) for k in held} != held:
                    moved.append(f"+{now:.1f}s: {ro}")
                if not pod_is_ready(pod):
                    seen.setdefault("not ready", now)
                if md.endpoints_by_revision().get(1, 0) < STABLE:
                    seen.setdefault("out of endpoints", now)
                restarted = container_status(pod, "triton").restart_count == restarts + 1
                if restarted:
                    seen.setdefault("restarted", now)
                if restarted and pod_is_ready(pod) and md.endpoints_by_revision() == {1: STABLE, 2: STABLE}:
                    seen.setdefault("back in endpoints", now)
                    return True
                return False

            wait_for(
                back,
                120,
                interval=0.2,
                message=lambda: f"the killed pod back; seen {seen}{describe(cluster, ns)}",
            )
            assert not moved, f"the rollout moved during the stable pod's gap: {moved[:3]}"
            assert {"not ready", "out of endpoints", "restarted"} <= set(seen), seen
            back_wall = kill_wall + seen["back in endpoints"]
            pause_end = wall(held["stepReadyAt"]) + PAUSE
            assert back_wall < pause_end - 5, (
                f"the gap ({seen['back in endpoints']:.0f}s) outlasted the step's pause: lengthen PAUSE"
            )

            serving(md, 2)
            settled(md, {2: STABLE})
            t_end = time.monotonic() + 3
            wait_for(lambda: time.monotonic() > t_end, 10)  # a few more requests on v2 alone
            requests = traffic.stop()
        events = md_events(cluster, ns, "kill")
        names = reasons(events)
        assert names.count("RolloutStarted") == 1 and "RolledBack" not in names, events
        promoting = next(e for e in events if e["reason"] == "Promoting")
        # Promoted when the pause ran out (1 s timestamps), not earlier, and after the stable was back.
        assert promoting["at"] >= pause_end - 1, (promoting, held)
        assert promoting["at"] >= back_wall - 1, (promoting, back_wall)
        history = {h["revision"]: h["outcome"] for h in md.status()["history"]}
        assert history == {1: "Superseded", 2: "Serving"}, history
        lost = [r for r in requests if r.error is not None]
        assert not lost, summary(requests, origin)
        assert {r.version for r in requests} == {1, 2}, summary(requests, origin)
        gap = [r for r in requests if t_kill <= r.start <= t_kill + seen["back in endpoints"]]
        figure(
            "stable Triton SIGKILLed mid-canary (50 %, 2+2 pods)",
            f"tritonserver was PID {ns_pid} of its container; not Ready +{seen['not ready']:.1f}s, out of "
            f"endpoints +{seen['out of endpoints']:.1f}s, restarted +{seen['restarted']:.1f}s, back in "
            f"endpoints +{seen['back in endpoints']:.1f}s; rollout unchanged through the gap "
            f"({len(timeline)} polls), promoted {promoting['at'] - pause_end:+.0f}s from the pause's end",
        )
        figure("requests during the gap", summary(gap, t_kill))
        figure("requests, whole canary", summary(requests, origin))
    finally:
        op.stop()
        cluster.delete_namespace(ns)


# --------------------------------------------------------------------------- 2: operator leader killed


LEASE_SECONDS = 15  # the chart's default
OP_PAUSE = 60  # the 50 % step's pause: the takeover (lease + a renew period) falls inside it


def lease(cluster: Cluster, namespace: str, name: str) -> Any:
    """The Lease's spec (holder_identity, lease_transitions, renew_time...)."""
    return kubernetes.client.CoordinationV1Api(cluster.api_client).read_namespaced_lease(name, namespace).spec


def test_killed_operator_leader_is_replaced_and_the_rollout_resumes_where_it_was(
    cluster: Cluster, images: dict[str, str], repo: tuple[Any, Any]
) -> None:
    release_ns = cluster.create_namespace(prefix=f"{PREFIX}-op", labels=RESTRICTED)
    ns = workload_namespace(cluster, repo, f"{PREFIX}-op-wl")
    repository, tag = images["operator"].rsplit(":", 1)
    values: dict[str, Any] = {
        "image.repository": repository,
        "image.tag": tag,
        "image.pullPolicy": "Never",
        "fullnameOverride": "mdop",
        "leaderElection.enabled": True,
        "leaderElection.replicas": 2,
        "leaderElection.leaseSeconds": LEASE_SECONDS,
        "rbac.scope": "namespaced",
        "rbac.watchNamespaces": [ns],
        "operator.resyncSeconds": 10,
        "nodeSelector": {realnode.NODE_LABEL[0]: realnode.NODE_LABEL[1]},
        "tolerations": [{**realnode.NODE_TAINT, "operator": "Equal"}],
    }
    args = [arg for k, v in values.items() for arg in ("--set-json", f"{k}={json.dumps(v)}")]

    def operator_pods() -> list[Any]:
        return [
            p
            for p in cluster.core.list_namespaced_pod(
                release_ns, label_selector="app.kubernetes.io/component=operator"
            ).items
            if p.metadata.deletion_timestamp is None
        ]

    def logs() -> str:
        out = cluster.kubectl(
            "logs", "-n", release_ns, "-l", "app.kubernetes.io/component=operator", "--tail=30", "--prefix",
            check=False,
        )  # fmt: skip
        return out.stdout + out.stderr

    try:
        cluster.helm(
            "install", "mdop", str(CHART), "-n", release_ns, "--wait", "--timeout", "180s", *args, timeout=240
        )
        wait_for(
            lambda: lease(cluster, release_ns, "mdop").holder_identity,
            60,
            message=lambda: f"a leader; logs:\n{logs()}",
        )
        steps: list[dict[str, Any]] = [
            {"weight": 25, "pause": {"duration": "1s"}},
            {"weight": 50, "pause": {"duration": f"{OP_PAUSE}s"}},
            {"weight": 100},
        ]
        cluster.apply(model_deployment("leader", images["triton"], 1, steps), namespace=ns)
        md = Model(cluster, ns, "leader")
        serving(md, 1)
        md.patch({"spec": {"model": {"version": 2}}})
        st = wait_status(
            md,
            lambda s: (
                (s.get("rollout") or {}).get("step") == 1 and (s.get("rollout") or {}).get("stepReadyAt")
            ),
            240,
            "the 50 % step ready (its pause running)",
        )
        held = {k: st["rollout"][k] for k in ("state", "step", "weight", "stepReadyAt", "startedAt")}
        deployments = {
            d.metadata.name: d.metadata.uid
            for d in cluster.apps.list_namespaced_deployment(
                ns, label_selector="modeldeploy.io/name=leader"
            ).items
        }
        assert len(deployments) == 2, deployments
        before = lease(cluster, release_ns, "mdop")
        leader = next(p for p in operator_pods() if before.holder_identity.startswith(p.metadata.name + "-"))
        standby = [p.metadata.name for p in operator_pods() if p.metadata.name != leader.metadata.name]

        # A crash: SIGKILL the leader's process (no cleanup, the Lease is not released), and the pod
        # gone from the API at once, so that it is not simply restarted in place.
        pid = container_process(cluster, leader.status.container_statuses[0].container_id)
        os.kill(pid, signal.SIGKILL)
        t_kill = time.monotonic()
        cluster.kubectl(
            "delete", "pod", "-n", release_ns, leader.metadata.name, "--grace-period=0", "--force"
        )
        last = lease(cluster, release_ns, "mdop")  # the dead leader's last renewal
        assert last.holder_identity == before.holder_identity, (before, last)

        moved: list[dict[str, Any]] = []

        def taken_over() -> Any:
            spec = lease(cluster, release_ns, "mdop")
            ro = md.status().get("rollout") or {}
            if {k: ro.get(k) for k in held} != held:
                moved.append(ro)
            return spec if spec.holder_identity != before.holder_identity else None

        after = wait_for(
            taken_over, LEASE_SECONDS * 4, interval=0.2, message=lambda: f"a new leader; {logs()}"
        )
        takeover = time.monotonic() - t_kill
        # No leader: nothing may have moved (the pause outlasts the takeover).
        assert not moved, f"the rollout moved while no operator held the Lease: {moved[:3]}"
        assert not after.holder_identity.startswith(leader.metadata.name + "-"), after
        assert after.lease_transitions == before.lease_transitions + 1, (before, after)
        # Never two leaders: taken over only once the dead leader's Lease had expired, and soon after
        # (a standby tries every leaseSeconds / 3).
        unheld = (after.acquire_time - last.renew_time).total_seconds()
        assert LEASE_SECONDS <= unheld <= LEASE_SECONDS * 4 / 3 + 5, (last, after)
        ro = md.status()["rollout"]
        assert {k: ro.get(k) for k in held} == held, (ro, held)

        serving(md, 2)
        events = md_events(cluster, ns, "leader")
        names = reasons(events)
        # One rollout, resumed: started once, each step once, promoted once.
        assert names.count("RolloutStarted") == 1, events
        assert names.count("StepAdvanced") == 1 and names.count("Promoting") == 1, events
        assert names.count("Promoted") == 2, events  # revision 1 ready, then revision 2 promoted
        promoting = next(e for e in events if e["reason"] == "Promoting")
        pause_end = wall(held["stepReadyAt"]) + OP_PAUSE
        assert promoting["at"] >= pause_end - 1, (promoting, held)
        new_leader = after.holder_identity.rsplit("-", 1)[0]
        assert promoting["by"] == new_leader, (promoting, after)
        status = md.status()
        history = [(h["revision"], h["modelVersion"], h["outcome"]) for h in status["history"]]
        assert history == [(1, 1, "Superseded"), (2, 2, "Serving")], history
        now_deployed = {
            d.metadata.name: d.metadata.uid
            for d in cluster.apps.list_namespaced_deployment(
                ns, label_selector="modeldeploy.io/name=leader"
            ).items
        }
        assert now_deployed.items() <= deployments.items(), "a Deployment was recreated or added"
        figure(
            "operator leader SIGKILLed mid-canary (2 replicas, Lease 15 s)",
            f"Lease taken by {'the standby' if new_leader in standby else 'the replacement pod'} "
            f"{takeover:.1f}s after the kill, {unheld:.1f}s after the dead leader's last renewal (expiry "
            f"{LEASE_SECONDS}s, standbys try every {LEASE_SECONDS / 3:.0f}s); the rollout stayed at step 2 "
            f"with its pause clock "
            f"(stepReadyAt {held['stepReadyAt']}), promoted {promoting['at'] - pause_end:+.0f}s from the "
            f"pause's end by {new_leader}",
        )
    finally:
        cluster.helm("uninstall", "mdop", "-n", release_ns, "--wait", "--timeout", "60s", check=False)
        for name in (ns, release_ns):
            cluster.delete_namespace(name)
