"""The operator's own Prometheus metrics (served on MODELDEPLOY_METRICS_PORT, default 8383)."""

from __future__ import annotations

import contextlib
import os
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECONCILES = Counter("modeldeploy_reconciles_total", "Reconciles run")
RECONCILE_ERRORS = Counter("modeldeploy_reconcile_errors_total", "Reconciles that raised")
RECONCILE_SECONDS = Histogram("modeldeploy_reconcile_duration_seconds", "Reconcile latency")
PHASES = ("Pending", "Progressing", "Ready", "Paused", "Degraded", "RolledBack", "Failed")
PHASE = Gauge(
    "modeldeploy_phase", "1 for the ModelDeployment's current phase", ["namespace", "name", "phase"]
)
WEIGHT = Gauge("modeldeploy_canary_weight", "Percent of traffic on the candidate", ["namespace", "name"])
ANALYSIS = Gauge("modeldeploy_analysis_value", "Last analysis values", ["namespace", "name", "metric"])
LEADER = Gauge("modeldeploy_leader", "1 while this process holds the leader lease (or runs without election)")
LEADER.set(1)
ROLLBACKS = Counter(
    "modeldeploy_rollbacks_total", "Automatic rollbacks and aborts", ["namespace", "name", "reason"]
)


def start_server() -> None:
    port = int(os.environ.get("MODELDEPLOY_METRICS_PORT", "8383"))
    if port:
        start_http_server(port, addr=os.environ.get("MODELDEPLOY_METRICS_ADDR", "0.0.0.0"))


def observe_status(md: dict[str, Any]) -> None:
    meta, st = md["metadata"], md.get("status") or {}
    ns, name = meta["namespace"], meta["name"]
    for phase in PHASES:
        PHASE.labels(ns, name, phase).set(1 if st.get("phase") == phase else 0)
    WEIGHT.labels(ns, name).set(st.get("canaryWeight") or 0)
    for metric, value in ((st.get("lastAnalysis") or {}).get("values") or {}).items():
        ANALYSIS.labels(ns, name, metric).set(value)


def observe_event(md: dict[str, Any], reason: str) -> None:
    if reason in ("RolledBack", "Aborted"):
        meta = md["metadata"]
        ROLLBACKS.labels(meta["namespace"], meta["name"], reason).inc()


def forget(namespace: str, name: str) -> None:
    for phase in PHASES:
        with contextlib.suppress(KeyError):
            PHASE.remove(namespace, name, phase)
    with contextlib.suppress(KeyError):
        WEIGHT.remove(namespace, name)


BATCH_PHASES = ("Pending", "Running", "Succeeded", "Failed")
BATCH_PHASE = Gauge(
    "modeldeploy_batch_phase", "1 for the BatchInference's current phase", ["namespace", "name", "phase"]
)
BATCH_RECORDS = Gauge("modeldeploy_batch_records", "Records scored", ["namespace", "name"])
BATCH_RECORDS_FAILED = Gauge("modeldeploy_batch_records_failed", "Records failed", ["namespace", "name"])
BATCH_SHARDS_DONE = Gauge(
    "modeldeploy_batch_shards_done", "Shards whose results are written", ["namespace", "name"]
)
BATCH_SHARDS = Gauge("modeldeploy_batch_shards", "Shards in the plan", ["namespace", "name"])


def observe_batch(bi: dict[str, Any]) -> None:
    meta, st = bi["metadata"], bi.get("status") or {}
    ns, name = meta["namespace"], meta["name"]
    for phase in BATCH_PHASES:
        BATCH_PHASE.labels(ns, name, phase).set(1 if st.get("phase") == phase else 0)
    for gauge, key in (
        (BATCH_RECORDS, "records"),
        (BATCH_RECORDS_FAILED, "recordsFailed"),
        (BATCH_SHARDS_DONE, "shardsSucceeded"),
        (BATCH_SHARDS, "shards"),
    ):
        gauge.labels(ns, name).set(st.get(key) or 0)


def forget_batch(namespace: str, name: str) -> None:
    for phase in BATCH_PHASES:
        with contextlib.suppress(KeyError):
            BATCH_PHASE.remove(namespace, name, phase)
    for gauge in (BATCH_RECORDS, BATCH_RECORDS_FAILED, BATCH_SHARDS_DONE, BATCH_SHARDS):
        with contextlib.suppress(KeyError):
            gauge.remove(namespace, name)
