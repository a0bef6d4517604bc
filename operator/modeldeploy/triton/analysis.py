"""Metric analysis of a canary: Triton counters in, a verdict out.

Three layers, each usable alone:

* **Pure maths** (:func:`window`, :func:`evaluate`). Two cumulative snapshots of a
  revision's Triton counters (window start and end, one :class:`Counters` per series,
  i.e. per pod x model x version) become one :class:`WindowStats`:

  - ``requests``   = Δ``nv_inference_request_success`` + Δ``nv_inference_request_failure``
    (failure summed over every ``reason`` except ``CANCELED``: a client hanging up is not
    the model's fault);
  - ``errorRate``  = Δfailure / requests;
  - ``latencyMs``  = Δ``nv_inference_request_duration_us`` / Δsuccess / 1000 and
    ``queueMs`` likewise from ``nv_inference_queue_duration_us``. The denominator is the
    number of *successful* requests because Triton adds to its duration counters for
    successful requests only (a failed request increments the failure counter and
    nothing else; verified against tritonserver 2.5x);
  - ``p99Ms`` from ``nv_inference_request_summary_us{quantile="0.99"}`` when Triton runs
    with ``--metrics-config summary_latencies=true``. Quantiles cannot be merged across
    pods, so the largest p99 of the series that served requests in the window is used
    (conservative). The summary is Triton's own sliding window, not exactly ours.

  A counter that went down between the snapshots means the process restarted: that
  series' end values are taken as its increase (as Prometheus' ``increase()`` does).
  A series only present at the end (a new pod) counts from zero; one only present at
  the start (a pod gone) contributes nothing.

  :func:`evaluate` judges a candidate window, optionally against the stable revision's
  window of the same period, under ``spec.rollout.analysis``. Verdicts: ``Inconclusive``
  (too little traffic: never a silent pass), ``Fail`` (naming every metric over its limit,
  its value and the limit), ``Pass``.

* **Metric sources**, both async and real: :class:`PrometheusSource` (Prometheus HTTP API,
  instant queries of the raw counters at window start and end, per series) and
  :class:`ScrapeSource` (``GET http://<pod>:8002/metrics`` of each pod, parsed with
  prometheus_client). Both select a revision by :class:`Target`: model name plus Triton's
  ``version`` label and/or the pods' ``modeldeploy.io/revision`` label (Prometheus: the
  ``modeldeploy_io_revision`` target label that Kubernetes service discovery relabelling
  produces; scraping: the pod set itself).

* **The windows**, :class:`TritonAnalysis`: the first measurement of a step records the start
  snapshot and answers ``Pending``; one ``analysis.interval`` later the next takes the end
  snapshot, judges, and starts the next window right away (analysis continues through a step's
  pause, and a later failing window still fails the step). A ``Fail`` is final for the step. The
  operator runs them on their own schedule, out of the reconcile, with
  :class:`modeldeploy.modeldeployment.analysis_runner.AnalysisRunner`, which persists each result in status.

Relative-to-stable limits (``maxErrorRateVsStable``, ``maxLatencyVsStable``):

* the stable window must itself hold at least ``minRequests`` requests, else the relative
  limits are reported as *not checked* in the reason (the absolute limits still apply;
  when only relative limits are configured the verdict is ``Inconclusive``);
* error rate: Fail when ``candidate > ratio x max(stable, 1 / candidate requests)``. The
  floor is one failed request's worth of the candidate window, so a stable revision with
  no errors does not make a single candidate error a 'infinitely worse' verdict: with a
  clean stable the candidate fails once it has more than ``ratio`` failed requests;
* latency (p99 when both revisions export it, else the average): Fail when
  ``candidate > ratio x max(stable, 1 ms)``: sub-millisecond latencies are jitter, not a
  signal.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from .. import api, timeutil

log = logging.getLogger(__name__)

SUCCESS = "nv_inference_request_success"
FAILURE = "nv_inference_request_failure"
COUNT = "nv_inference_count"
REQUEST_DURATION = "nv_inference_request_duration_us"
QUEUE_DURATION = "nv_inference_queue_duration_us"
REQUEST_SUMMARY = "nv_inference_request_summary_us"
METRIC_NAMES = (SUCCESS, FAILURE, COUNT, REQUEST_DURATION, QUEUE_DURATION, REQUEST_SUMMARY)
IGNORED_FAILURE_REASONS = frozenset({"CANCELED"})
P99 = 0.99

#: Label the pods' ``modeldeploy.io/revision`` becomes in Prometheus (Kubernetes SD + labelmap).
REVISION_LABEL = "modeldeploy_io_revision"
#: Label carrying the pod's namespace in Prometheus (Kubernetes SD convention).
NAMESPACE_LABEL = "namespace"
METRICS_PORT = 8002
#: Latency below this is jitter: relative latency limits compare against at least this much.
LATENCY_FLOOR_MS = 1.0

PENDING, PASS, FAIL, INCONCLUSIVE = "Pending", "Pass", "Fail", "Inconclusive"
REASON_MAX = 1024

SeriesKey = tuple[tuple[str, str], ...]


class MetricsUnavailable(RuntimeError):
    """No metrics could be read (Prometheus down, every pod unreachable, bad answer)."""


# --------------------------------------------------------------------------- pure maths


@dataclass(frozen=True)
class Counters:
    """Cumulative Triton counters of one series (one pod's model version) at one moment."""

    success: float = 0.0
    failure: float = 0.0  # every reason except CANCELED
    inferences: float = 0.0  # nv_inference_count (batch items)
    request_us: float = 0.0
    queue_us: float = 0.0
    p99_us: float | None = None  # a quantile of Triton's sliding window, not cumulative

    def cumulative(self) -> tuple[float, float, float, float, float]:
        return (self.success, self.failure, self.inferences, self.request_us, self.queue_us)


@dataclass(frozen=True)
class Snapshot:
    """Every series of one revision at one moment (``at``: unix seconds)."""

    at: float
    series: Mapping[SeriesKey, Counters] = field(default_factory=dict)
    errors: tuple[str, ...] = ()  # pods that could not be read (partial snapshot)


@dataclass(frozen=True)
class WindowStats:
    """What one revision did during one window."""

    successes: float = 0.0
    failures: float = 0.0
    inferences: float = 0.0
    request_us: float = 0.0
    queue_us: float = 0.0
    p99_ms: float | None = None
    seconds: float = 0.0
    series: int = 0
    resets: int = 0

    @property
    def requests(self) -> float:
        return self.successes + self.failures

    @property
    def error_rate(self) -> float | None:
        return self.failures / self.requests if self.requests > 0 else None

    @property
    def latency_ms(self) -> float | None:
        return self.request_us / self.successes / 1000.0 if self.successes > 0 else None

    @property
    def queue_ms(self) -> float | None:
        return self.queue_us / self.successes / 1000.0 if self.successes > 0 else None

    def values(self, prefix: str = "") -> dict[str, float]:
        """The measured numbers, camelCase (``stable`` prefix: ``stableErrorRate``)."""
        raw: dict[str, float | None] = {
            "requests": self.requests,
            "successes": self.successes,
            "failures": self.failures,
            "inferences": self.inferences,
            "errorRate": self.error_rate,
            "latencyMs": self.latency_ms,
            "queueMs": self.queue_ms,
            "p99Ms": self.p99_ms,
            "windowSeconds": self.seconds,
        }
        out: dict[str, float] = {}
        for key, value in raw.items():
            if value is None or math.isnan(value):
                continue
            name = prefix + key[0].upper() + key[1:] if prefix else key
            out[name] = round(float(value), 6)
        return out


def window(start: Snapshot, end: Snapshot) -> WindowStats:
    """Sum over the revision's series of each counter's increase from ``start`` to ``end``."""
    succ = fail = inf = req = queue = 0.0
    resets = 0
    p99s: list[float] = []
    for key, e in end.series.items():
        s = start.series.get(key)
        if s is not None and all(b >= a for a, b in zip(s.cumulative(), e.cumulative(), strict=True)):
            d = tuple(b - a for a, b in zip(s.cumulative(), e.cumulative(), strict=True))
        else:
            if s is not None:
                resets += 1  # a counter went down: the process restarted; all of the end counts
            d = e.cumulative()
        succ, fail, inf, req, queue = succ + d[0], fail + d[1], inf + d[2], req + d[3], queue + d[4]
        if e.p99_us is not None and not math.isnan(e.p99_us) and d[0] + d[1] > 0:
            p99s.append(e.p99_us)
    return WindowStats(
        successes=succ,
        failures=fail,
        inferences=inf,
        request_us=req,
        queue_us=queue,
        p99_ms=max(p99s) / 1000.0 if p99s else None,
        seconds=max(0.0, end.at - start.at),
        series=len(end.series),
        resets=resets,
    )


def _num(value: float) -> str:
    """Short, readable number for reasons: 0.25, 12.3, 1500."""
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.4g}" if abs(value) < 1 else f"{value:.1f}"


def _secs(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"


def _pct(rate: float) -> str:
    return f"{rate * 100:.3g}%"


def _latency(stats: WindowStats, use_p99: bool) -> tuple[float | None, str]:
    if use_p99 and stats.p99_ms is not None:
        return stats.p99_ms, "p99 latency"
    return stats.latency_ms, "avg latency"


def evaluate(
    candidate: WindowStats,
    stable: WindowStats | None,
    spec: api.AnalysisSpec,
    *,
    now: datetime | None = None,
    inconclusive_count: int = 0,
) -> api.AnalysisResult:
    """Judge one candidate window (see the module docstring for the rules).

    ``inconclusive_count`` is stored as given; :class:`TritonAnalysis` keeps the tally.
    """
    th = spec.thresholds
    values = candidate.values()
    if stable is not None:
        values.update(stable.values("stable"))

    def result(verdict: str, reason: str) -> api.AnalysisResult:
        if len(reason) > REASON_MAX:
            reason = reason[: REASON_MAX - 3] + "..."
        return api.AnalysisResult(
            verdict=verdict,
            reason=reason,
            time=timeutil.rfc3339(now or datetime.now(UTC)),
            values=values,
            inconclusive_count=inconclusive_count,
        )

    n = candidate.requests
    if n < spec.min_requests:
        # Too little traffic to judge a rate; but failures that exceed maxErrorRate even if every
        # request still missing to reach minRequests had succeeded are a certain failure.
        limit = th.max_error_rate
        if limit is not None and candidate.failures > limit * max(spec.min_requests, n):
            rate = candidate.error_rate or 0.0
            return result(
                FAIL,
                f"errorRate {_pct(rate)} > maxErrorRate {_pct(limit)} "
                f"({_num(candidate.failures)} of {_num(n)} requests failed; more than the limit allows "
                f"even over minRequests {spec.min_requests})",
            )
        return result(
            INCONCLUSIVE,
            f"{_num(n)} requests in the {_secs(candidate.seconds)} window, fewer than minRequests "
            f"{spec.min_requests}: send more traffic to the candidate or lower analysis.minRequests",
        )
    if n <= 0:
        return result(PASS, "no requests in the window and analysis.minRequests is 0: nothing was checked")

    failures: list[str] = []
    notes: list[str] = []
    rate = candidate.error_rate or 0.0
    if th.max_error_rate is not None and rate > th.max_error_rate:
        failures.append(
            f"errorRate {_pct(rate)} > maxErrorRate {_pct(th.max_error_rate)} "
            f"({_num(candidate.failures)} of {_num(n)} requests failed)"
        )
    if th.max_p99_latency_ms is not None:
        lat, what = _latency(candidate, use_p99=True)
        if lat is None:
            notes.append("latency not checked: no successful request")
        elif lat > th.max_p99_latency_ms:
            hint = (
                ""
                if candidate.p99_ms is not None
                else " (p99 not exported: run Triton with --metrics-config summary_latencies=true)"
            )
            failures.append(f"{what} {_num(lat)}ms > maxP99LatencyMs {_num(th.max_p99_latency_ms)}{hint}")
    if th.max_queue_time_ms is not None:
        q = candidate.queue_ms
        if q is not None and q > th.max_queue_time_ms:
            failures.append(f"avg queue time {_num(q)}ms > maxQueueTimeMs {_num(th.max_queue_time_ms)}")

    relative = th.max_error_rate_vs_stable is not None or th.max_latency_vs_stable is not None
    absolute = any(v is not None for v in (th.max_error_rate, th.max_p99_latency_ms, th.max_queue_time_ms))
    relative_checked = False
    if relative:
        stable_n = stable.requests if stable is not None else 0.0
        if stable is None or stable_n < max(spec.min_requests, 1):
            notes.append(
                f"relative limits not checked: stable served {_num(stable_n)} requests "
                f"(fewer than minRequests {spec.min_requests})"
            )
        else:
            relative_checked = True
            if th.max_error_rate_vs_stable is not None:
                base = max(stable.error_rate or 0.0, 1.0 / n)
                if rate > th.max_error_rate_vs_stable * base:
                    failures.append(
                        f"errorRate {_pct(rate)} > {_num(th.max_error_rate_vs_stable)} x stable "
                        f"{_pct(stable.error_rate or 0.0)} (maxErrorRateVsStable; compared with "
                        f"at least {_pct(base)}, one failed request of {_num(n)})"
                    )
            if th.max_latency_vs_stable is not None:
                both_p99 = candidate.p99_ms is not None and stable.p99_ms is not None
                c_lat, what = _latency(candidate, use_p99=both_p99)
                s_lat, _ = _latency(stable, use_p99=both_p99)
                if c_lat is not None and s_lat is not None:
                    base = max(s_lat, LATENCY_FLOOR_MS)
                    if c_lat > th.max_latency_vs_stable * base:
                        failures.append(
                            f"{what} {_num(c_lat)}ms > {_num(th.max_latency_vs_stable)} x stable "
                            f"{_num(s_lat)}ms (maxLatencyVsStable)"
                        )

    if failures:
        return result(FAIL, "; ".join(failures))
    if relative and not absolute and not relative_checked:
        return result(INCONCLUSIVE, "; ".join(notes))
    summary = f"{_num(n)} requests, errorRate {_pct(rate)}"
    lat, what = _latency(candidate, use_p99=True)
    if lat is not None:
        summary += f", {what} {_num(lat)}ms"
    if candidate.queue_ms is not None:
        summary += f", avg queue time {_num(candidate.queue_ms)}ms"
    return result(PASS, "; ".join([f"within limits: {summary}", *notes]))


# --------------------------------------------------------------------------- sample rows -> snapshot


@dataclass(frozen=True)
class Target:
    """Which series make up one revision.

    ``version`` matches Triton's ``version`` label; ``revision`` the pods'
    ``modeldeploy.io/revision`` label (Prometheus only: for scraping, the pod set is the
    selection); ``namespace`` the pods' namespace (Prometheus only).
    """

    model: str
    version: str | None = None
    revision: str | None = None
    namespace: str | None = None


_NOT_SERIES_LABELS = frozenset({"__name__", "reason", "quantile"})


def _base_name(name: str) -> str:
    """prometheus_client's parser names counter samples ``<name>_total``; Triton does not."""
    return name.removesuffix("_total")


def snapshot_from_rows(
    rows: Iterable[tuple[str, Mapping[str, str], float]],
    target: Target,
    *,
    at: float,
    series_labels: Sequence[str] | None = None,
    extra_key: tuple[tuple[str, str], ...] = (),
    errors: tuple[str, ...] = (),
) -> Snapshot:
    """Fold (metric name, labels, value) rows into per-series :class:`Counters`.

    Rows of other models/versions are ignored. A series is identified by its labels minus
    ``reason``/``quantile`` (or only ``series_labels`` when given), plus ``extra_key``
    (e.g. the scraped URL).
    """
    acc: dict[SeriesKey, dict[str, float]] = {}
    for raw_name, labels, value in rows:
        name = _base_name(raw_name)
        if name not in METRIC_NAMES:
            continue
        if labels.get("model") != target.model:
            continue
        if target.version is not None and labels.get("version") != target.version:
            continue
        if name == FAILURE and labels.get("reason") in IGNORED_FAILURE_REASONS:
            continue
        if name == REQUEST_SUMMARY:
            try:
                if abs(float(labels.get("quantile", "nan")) - P99) > 1e-9:
                    continue
            except ValueError:
                continue
        if series_labels is None:
            ident = tuple(sorted((k, v) for k, v in labels.items() if k not in _NOT_SERIES_LABELS))
        else:
            ident = tuple((k, labels.get(k, "")) for k in series_labels)
        key = extra_key + ident
        slot = acc.setdefault(key, {})
        if math.isnan(value):
            continue
        slot[name] = slot.get(name, 0.0) + value if name != REQUEST_SUMMARY else value
    series = {
        key: Counters(
            success=v.get(SUCCESS, 0.0),
            failure=v.get(FAILURE, 0.0),
            inferences=v.get(COUNT, 0.0),
            request_us=v.get(REQUEST_DURATION, 0.0),
            queue_us=v.get(QUEUE_DURATION, 0.0),
            p99_us=v.get(REQUEST_SUMMARY),
        )
        for key, v in acc.items()
    }
    return Snapshot(at=at, series=series, errors=errors)


def parse_exposition(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Rows of a Prometheus text exposition (Triton's /metrics)."""
    return [
        (sample.name, dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


# --------------------------------------------------------------------------- sources


class MetricSource(Protocol):
    async def snapshot(self, target: Target) -> Snapshot:
        """The target's cumulative counters now. Raises :class:`MetricsUnavailable`."""
        ...


@runtime_checkable
class HistorySource(MetricSource, Protocol):
    """A source that can also read the counters of a past moment (Prometheus)."""

    async def snapshot_at(self, target: Target, at: float) -> Snapshot:
        """The target's cumulative counters at ``at`` (unix seconds). Raises :class:`MetricsUnavailable`."""
        ...


def _promql_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class PrometheusSource:
    """Instant queries of the raw Triton counters through the Prometheus HTTP API.

    One query per snapshot selects every needed series of the target; series stay apart
    (per pod/instance) so counter resets are handled per series by :func:`window`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        revision_label: str | None = REVISION_LABEL,
        namespace_label: str | None = NAMESPACE_LABEL,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.revision_label = revision_label
        self.namespace_label = namespace_label
        self.timeout = timeout
        self.clock = clock

    def query_for(self, target: Target) -> str:
        names = "|".join(n.removeprefix("nv_inference_") for n in METRIC_NAMES)
        matchers = [f'__name__=~"nv_inference_({names})(_total)?"', f"model={_promql_string(target.model)}"]
        if target.version is not None:
            matchers.append(f"version={_promql_string(target.version)}")
        if target.revision is not None and self.revision_label:
            matchers.append(f"{self.revision_label}={_promql_string(target.revision)}")
        if target.namespace is not None and self.namespace_label:
            matchers.append(f"{self.namespace_label}={_promql_string(target.namespace)}")
        return "{" + ",".join(matchers) + "}"

    async def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        url = f"{self.base_url}/api/v1/query"
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout)) as session,
                session.get(url, params=params) as resp,
            ):
                body = await resp.json(content_type=None)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise MetricsUnavailable(f"Prometheus {self.base_url}: {type(exc).__name__}: {exc}") from exc
        if status != 200 or not isinstance(body, dict) or body.get("status") != "success":
            err = body.get("error") if isinstance(body, dict) else None
            raise MetricsUnavailable(f"Prometheus {self.base_url} answered {status}: {err or body!r:.200}")
        data = body.get("data") or {}
        if data.get("resultType") != "vector":
            kind = data.get("resultType")
            raise MetricsUnavailable(f"Prometheus {self.base_url}: expected a vector, got {kind}")
        result: list[dict[str, Any]] = data.get("result") or []
        return result

    async def snapshot(self, target: Target) -> Snapshot:
        return await self.snapshot_at(target, self.clock())

    async def snapshot_at(self, target: Target, at: float) -> Snapshot:
        """The counters as Prometheus had them at ``at`` (unix seconds), e.g. a window's start
        after an operator restart: Prometheus keeps the history, so nothing else is persisted."""
        result = await self.query(self.query_for(target), at)
        rows = []
        for item in result:
            labels = dict(item.get("metric") or {})
            name = labels.get("__name__", "")
            try:
                value = float(item["value"][1])
            except (KeyError, IndexError, TypeError, ValueError):
                continue
            rows.append((name, labels, value))
        return snapshot_from_rows(rows, target, at=at)


def metrics_url(pod: str, port: int = METRICS_PORT) -> str:
    """``10.1.2.3`` -> ``http://10.1.2.3:8002/metrics``; ``fd00::1`` is bracketed; a
    ``host:port`` or a full ``http(s)://`` URL is used as given."""
    if pod.startswith(("http://", "https://")):
        return pod
    try:
        ip = ipaddress.ip_address(pod)
    except ValueError:
        host = pod if ":" in pod else f"{pod}:{port}"
        return f"http://{host}/metrics"
    host = f"[{ip}]" if ip.version == 6 else str(ip)
    return f"http://{host}:{port}/metrics"


class ScrapeSource:
    """Scrape each pod's Triton metrics endpoint directly (no Prometheus).

    ``pods`` is a list of pod IPs / ``host:port`` / URLs, or a callable giving them per
    target. Unreachable pods are left out of the snapshot (and named in ``errors``); when
    none answers :class:`MetricsUnavailable` is raised.
    """

    def __init__(
        self,
        pods: Sequence[str] | Callable[[Target], Sequence[str]],
        *,
        port: int = METRICS_PORT,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.pods = pods
        self.port = port
        self.timeout = timeout
        self.clock = clock

    async def _scrape(self, session: aiohttp.ClientSession, url: str) -> str:
        async with session.get(url) as resp:
            if resp.status != 200:
                raise MetricsUnavailable(f"{url} answered {resp.status}")
            return await resp.text()

    async def snapshot(self, target: Target) -> Snapshot:
        pods = self.pods(target) if callable(self.pods) else self.pods
        urls = sorted({metrics_url(p, self.port) for p in pods})
        if not urls:
            raise MetricsUnavailable(f"no pods to scrape for model {target.model}")
        at = self.clock()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout)) as session:
            texts = await asyncio.gather(*(self._scrape(session, u) for u in urls), return_exceptions=True)
        series: dict[SeriesKey, Counters] = {}
        errors: list[str] = []
        for url, text in zip(urls, texts, strict=True):
            if isinstance(text, BaseException):
                if not isinstance(text, Exception):
                    raise text
                errors.append(f"{url}: {type(text).__name__}: {text}")
                continue
            try:
                rows = parse_exposition(text)
            except ValueError as exc:
                errors.append(f"{url}: unparsable metrics: {exc}")
                continue
            snap = snapshot_from_rows(
                rows, target, at=at, series_labels=("model", "version"), extra_key=(("url", url),)
            )
            series.update(snap.series)
        if len(errors) == len(urls):
            raise MetricsUnavailable("; ".join(errors))
        return Snapshot(at=at, series=series, errors=tuple(errors))


# --------------------------------------------------------------------------- the provider


PodsFor = Callable[[str, str], Sequence[str]]


def canonical(snap: Snapshot) -> Snapshot:
    """The same snapshot with each series key's labels in name order. A window's start read back from
    status (where label maps come back sorted) then matches its end as the source reads it."""
    return Snapshot(
        at=snap.at, series={tuple(sorted(k)): v for k, v in snap.series.items()}, errors=snap.errors
    )


@dataclass(frozen=True)
class Window:
    """Where the analysis of one step stands: the window in progress and the last result.

    ``started`` is on the provider's clock; ``start_cand``/``start_stable`` are the counters read
    then (None after an attempt that could not read any: the next attempt starts a new window).
    ``from_source``: the start counters are not held but can be read from a :class:`HistorySource`
    at ``started`` (a window resumed after a restart; needs a provider clock in unix seconds).
    """

    started: float
    start_cand: Snapshot | None
    start_stable: Snapshot | None
    inconclusive: int
    last: api.AnalysisResult
    attempt: str | None = None  # RolloutState.startedAt: the rollout this window belongs to
    from_source: bool = False


class TritonAnalysis:
    """Reads and judges a candidate's windows: metric sources, targets, and :meth:`measure`.

    Metric source per ModelDeployment: ``analysis.prometheusUrl`` -> Prometheus;
    ``analysis.scrape: true`` -> direct scraping of the revision's pods (``pods_for``);
    neither -> ``default_prometheus_url`` when the operator has one, else scraping.

    The operator drives :meth:`measure` from
    :class:`modeldeploy.modeldeployment.analysis_runner.AnalysisRunner`, on the windows' own
    schedule, with the windows persisted in status. Calling the provider (``await ta(md, spec,
    state, stable, candidate)``) drives the same windows from the caller's calls instead, kept in
    memory per (namespace, name, candidate hash, step).
    """

    def __init__(
        self,
        *,
        pods_for: PodsFor | None = None,
        default_prometheus_url: str | None = None,
        metrics_port: int = METRICS_PORT,
        revision_label: str | None = REVISION_LABEL,
        namespace_label: str | None = NAMESPACE_LABEL,
        select_by_revision: bool = True,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.pods_for = pods_for
        self.default_prometheus_url = default_prometheus_url
        self.metrics_port = metrics_port
        self.revision_label = revision_label
        self.namespace_label = namespace_label
        self.select_by_revision = select_by_revision
        self.timeout = timeout
        self.clock = clock
        self.wall_clock = wall_clock
        self._windows: dict[tuple[str, str, str, int], Window] = {}

    # ---------------------------------------------------------------- sources

    def source_for(self, namespace: str, analysis: api.AnalysisSpec) -> MetricSource | None:
        url = analysis.prometheus_url or (None if analysis.scrape else self.default_prometheus_url)
        if url:
            return PrometheusSource(
                url,
                revision_label=self.revision_label if self.select_by_revision else None,
                namespace_label=self.namespace_label if self.select_by_revision else None,
                timeout=self.timeout,
            )
        if self.pods_for is None:
            return None
        pods_for = self.pods_for

        def pods(target: Target) -> Sequence[str]:
            return list(pods_for(namespace, target.revision or ""))

        return ScrapeSource(pods, port=self.metrics_port, timeout=self.timeout)

    @staticmethod
    def model_version(md: Mapping[str, Any], rev_hash: str) -> str | None:
        for rec in (md.get("status") or {}).get("history") or []:
            if rec.get("hash") == rev_hash and rec.get("modelVersion") is not None:
                return str(rec["modelVersion"])
        return None

    def target(
        self,
        md: Mapping[str, Any],
        spec: api.ModelDeploymentSpec,
        rev_hash: str,
        fallback_version: int | None = None,
    ) -> Target:
        meta = md["metadata"]
        version = self.model_version(md, rev_hash)
        if version is None and fallback_version is not None:
            version = str(fallback_version)
        return Target(
            model=spec.model.name or meta["name"],
            version=version,
            revision=rev_hash,
            namespace=meta.get("namespace"),
        )

    # ---------------------------------------------------------------- windows

    @staticmethod
    def seconds_left(win: Window, analysis: api.AnalysisSpec, now: float) -> float | None:
        """Time until ``win`` ends and the next measurement is due (None: never, the step failed)."""
        if win.last.verdict == FAIL:
            return None
        return max(0.0, win.started + api.parse_duration(analysis.interval) - now)

    def _result(
        self, verdict: str, reason: str, count: int, values: dict[str, float] | None = None
    ) -> api.AnalysisResult:
        if len(reason) > REASON_MAX:
            reason = reason[: REASON_MAX - 3] + "..."
        return api.AnalysisResult(
            verdict=verdict,
            reason=reason,
            time=timeutil.rfc3339(self.wall_clock()),
            values=values or {},
            inconclusive_count=count,
        )

    async def _snapshots(
        self, source: MetricSource, cand: Target, stable: Target | None, at: float | None = None
    ) -> tuple[Snapshot, Snapshot | None]:
        """Both revisions' counters now, or at ``at`` (a :class:`HistorySource` only)."""

        async def read(target: Target) -> Snapshot:
            if at is None:
                return await source.snapshot(target)
            assert isinstance(source, HistorySource)
            return await source.snapshot_at(target, at)

        if stable is None:
            return canonical(await read(cand)), None
        c, s = await asyncio.gather(read(cand), read(stable), return_exceptions=True)
        if isinstance(c, BaseException):
            raise c
        if isinstance(s, MetricsUnavailable):
            log.info("stable metrics unavailable: %s", s)
            return canonical(c), None
        if isinstance(s, BaseException):
            raise s
        return canonical(c), canonical(s)

    # ---------------------------------------------------------------- the call

    async def __call__(
        self,
        md: dict[str, Any],
        spec: api.ModelDeploymentSpec,
        state: api.RolloutState,
        stable: str,
        candidate: str,
    ) -> api.AnalysisResult | None:
        """The current result of the step, measuring when a window is due (never waits for one)."""
        analysis = spec.rollout.analysis
        if analysis is None:
            return None
        meta = md["metadata"]
        ns, name = meta.get("namespace", ""), meta["name"]
        key = (ns, name, candidate, state.step)
        for other in [k for k in self._windows if k[:2] == (ns, name) and k != key]:
            del self._windows[other]  # an earlier step or candidate: done with
        now = self.clock()
        win = self._windows.get(key)
        if win is not None and win.attempt != state.started_at:
            win = None  # an earlier rollout of this candidate (retried after a rollback): measure afresh
        if win is not None and self.seconds_left(win, analysis, now) != 0.0:
            return win.last
        win = await self.measure(md, spec, analysis, state, stable, candidate, win, now)
        self._windows[key] = win
        return win.last

    async def measure(
        self,
        md: Mapping[str, Any],
        spec: api.ModelDeploymentSpec,
        analysis: api.AnalysisSpec,
        state: api.RolloutState,
        stable: str,
        candidate: str,
        win: Window | None,
        now: float,
    ) -> Window:
        """End the window ``win`` at ``now`` and judge it (with no window: start the first one).

        Returns the next window, which starts where this one ended, carrying the result. An attempt
        that cannot read the counters counts as an inconclusive window; the next attempt, one
        interval later, starts a new window.
        """
        count = win.inconclusive if win is not None else 0
        source = self.source_for(md["metadata"].get("namespace", ""), analysis)
        if source is None:
            return self._unmeasured(
                now,
                count + 1,
                analysis,
                "no metrics source: set analysis.prometheusUrl or analysis.scrape: true",
                state.started_at,
            )
        cand_t = self.target(md, spec, candidate, fallback_version=spec.model.version)
        stable_t: Target | None = self.target(md, spec, stable)
        if stable_t is not None and stable_t.version is None and not self.select_by_revision:
            stable_t = None  # neither its version nor its pods would single it out
        try:
            if (
                win is not None
                and win.start_cand is None
                and win.from_source
                and isinstance(source, HistorySource)
            ):
                start_c, start_s = await self._snapshots(source, cand_t, stable_t, at=win.started)
                win = replace(win, start_cand=start_c, start_stable=start_s)
            end_c, end_s = await self._snapshots(source, cand_t, stable_t)
        except MetricsUnavailable as exc:
            return self._unmeasured(now, count + 1, analysis, f"metrics unavailable: {exc}", state.started_at)

        if win is None or win.start_cand is None:
            res = self._result(PENDING, f"window started: collecting {analysis.interval} of metrics", count)
            return Window(now, end_c, end_s, count, res, state.started_at)

        cand_stats = window(win.start_cand, end_c)
        stable_stats = (
            window(win.start_stable, end_s) if win.start_stable is not None and end_s is not None else None
        )
        res = evaluate(cand_stats, stable_stats, analysis, now=self.wall_clock(), inconclusive_count=count)
        note = ""
        if not end_c.series:
            picked = f"model {cand_t.model!r}" + (f" version {cand_t.version}" if cand_t.version else "")
            if isinstance(source, PrometheusSource) and source.revision_label:
                picked += f" {source.revision_label}={cand_t.revision!r}"
            note = f" (no Triton series matched {picked})"
        if end_c.errors:
            note += f" ({len(end_c.errors)} pod(s) unreachable: {end_c.errors[0]})"
        if note:
            res = res.model_copy(update={"reason": (res.reason + note)[:REASON_MAX]})
        if res.verdict == INCONCLUSIVE:
            count += 1
            res = res.model_copy(update={"inconclusive_count": count})
            if count > analysis.max_inconclusive:
                res = res.model_copy(
                    update={
                        "verdict": FAIL,
                        "reason": (
                            f"insufficient traffic: {count} inconclusive windows in a row "
                            f"(maxInconclusive {analysis.max_inconclusive}): {res.reason}"
                        )[:REASON_MAX],
                    }
                )
        elif res.verdict == PASS:
            count = 0
            res = res.model_copy(update={"inconclusive_count": 0})
        # the next window starts where this one ended
        return Window(now, end_c, end_s, count, res, state.started_at)

    def _unmeasured(
        self, now: float, count: int, analysis: api.AnalysisSpec, reason: str, attempt: str | None
    ) -> Window:
        """An attempt that could not measure: an inconclusive window (a failure past maxInconclusive)
        and no start counters, so the next attempt, one interval later, starts a fresh window."""
        if count > analysis.max_inconclusive:
            res = self._result(
                FAIL,
                f"insufficient data: {count} inconclusive windows in a row "
                f"(maxInconclusive {analysis.max_inconclusive}): {reason}",
                count,
            )
        else:
            res = self._result(INCONCLUSIVE, reason, count)
        return Window(now, None, None, count, res, attempt)


__all__ = [
    "Counters",
    "HistorySource",
    "MetricSource",
    "MetricsUnavailable",
    "PrometheusSource",
    "ScrapeSource",
    "Snapshot",
    "Target",
    "TritonAnalysis",
    "Window",
    "WindowStats",
    "canonical",
    "evaluate",
    "metrics_url",
    "parse_exposition",
    "snapshot_from_rows",
    "window",
]
