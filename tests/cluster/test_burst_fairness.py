"""One team's burst does not hold up another team's model (the work queue's namespaces take turns),
against the real local cluster with the session operator."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from typing import Any

from conftest import GROUP, MD, PLURAL, VERSION, fresh_namespace, model_deployment
from kube import Cluster, wait_for
from operator_proc import OperatorProcess

BURST = 40


class ReadyTimes(threading.Thread):
    """Lists the ModelDeployments of some namespaces every 0.1 s: when each was first seen Ready."""

    def __init__(self, cluster: Cluster, namespaces: list[str]) -> None:
        super().__init__(daemon=True)
        self.cluster, self.namespaces = cluster, namespaces
        self.ready_at: dict[tuple[str, str], float] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.1):
            for ns in self.namespaces:
                items = self.cluster.custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
                now = time.monotonic()
                for md in items:
                    if (md.get("status") or {}).get("phase") == "Ready":
                        self.ready_at.setdefault((ns, md["metadata"]["name"]), now)


def test_one_model_in_another_namespace_is_not_held_up_by_a_burst(
    cluster: Cluster, operator: OperatorProcess, md_ns: str
) -> None:
    with fresh_namespace(cluster, "md-", "other-team") as other:
        # Both namespaces served (kopf watches them, the cache is primed) before the clock starts.
        for ns in (md_ns, other):
            cluster.apply(model_deployment("first", replicas=1), namespace=ns)
        for ns in (md_ns, other):
            MD(cluster, ns, "first").wait_phase("Ready", timeout=90)
        times = ReadyTimes(cluster, [md_ns, other])
        times.start()
        try:

            def create(i: int) -> Any:
                return cluster.custom.create_namespaced_custom_object(
                    GROUP, VERSION, md_ns, PLURAL, model_deployment(f"burst{i}", replicas=1)
                )

            with cf.ThreadPoolExecutor(8) as pool:
                list(pool.map(create, range(BURST)))
            cluster.custom.create_namespaced_custom_object(
                GROUP, VERSION, other, PLURAL, model_deployment("lone", replicas=1)
            )
            wait_for(
                lambda: len(times.ready_at) >= BURST + 3,
                180,
                message=lambda: f"all Ready; seen so far: {len(times.ready_at)}",
            )
        finally:
            times.stopping.set()
            times.join(5)
    lone = times.ready_at[(other, "lone")]
    burst = sorted(t for (ns, name), t in times.ready_at.items() if ns == md_ns and name != "first")
    ahead = sum(1 for t in burst if t < lone)
    # Created after all 40, it waits for one key of the burst's namespace per turn, not for the burst:
    # without turns it came after every one of the 40 first reconciles, when most were Ready.
    assert ahead < BURST // 2, f"{ahead} of the burst's {BURST} were Ready before the other namespace's one"
