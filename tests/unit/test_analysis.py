"""The analysis maths: counters -> window stats -> verdict, and the provider's window state."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from modeldeploy import api
from modeldeploy.triton.analysis import (
    Counters,
    MetricsUnavailable,
    PrometheusSource,
    Snapshot,
    Target,
    TritonAnalysis,
    WindowStats,
    evaluate,
    metrics_url,
    parse_exposition,
    snapshot_from_rows,
    window,
)

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def spec(**kw: Any) -> api.AnalysisSpec:
    thresholds = kw.pop("thresholds", {})
    return api.AnalysisSpec.model_validate({"minRequests": 20, **kw, "thresholds": thresholds})


def stats(
    succ: float, fail: float = 0, *, lat_ms: float = 5.0, queue_ms: float = 0.1, p99_ms: float | None = None
) -> WindowStats:
    return WindowStats(
        successes=succ,
        failures=fail,
        inferences=succ,
        request_us=succ * lat_ms * 1000,
        queue_us=succ * queue_ms * 1000,
        p99_ms=p99_ms,
        seconds=30,
    )


def snap(at: float, **series: Counters) -> Snapshot:
    return Snapshot(at=at, series={(("pod", k),): v for k, v in series.items()})


# --------------------------------------------------------------------------- window


def test_window_sums_increases_over_pods() -> None:
    start = snap(0, a=Counters(10, 1, 10, 10_000, 100), b=Counters(5, 0, 5, 5_000, 50))
    end = snap(30, a=Counters(110, 3, 120, 210_000, 1100), b=Counters(55, 2, 55, 55_000, 250))
    w = window(start, end)
    assert (w.successes, w.failures, w.inferences) == (150, 4, 160)
    assert w.requests == 154
    assert w.error_rate == pytest.approx(4 / 154)
    # durations cover successful requests only (Triton adds nothing to them for a failure)
    assert w.latency_ms == pytest.approx((200_000 + 50_000) / 150 / 1000)
    assert w.queue_ms == pytest.approx((1000 + 200) / 150 / 1000)
    assert w.seconds == 30 and w.series == 2 and w.resets == 0
    assert w.p99_ms is None


def test_counter_reset_counts_the_end_values() -> None:
    """A pod restarted in the window: its counters went down, so all its end values are new."""
    start = snap(0, a=Counters(1000, 10, 1000, 9e6, 9e3))
    end = snap(30, a=Counters(40, 2, 40, 80_000, 400))
    w = window(start, end)
    assert (w.successes, w.failures, w.request_us, w.resets) == (40, 2, 80_000, 1)


def test_reset_detected_when_only_one_counter_went_down() -> None:
    start = snap(0, a=Counters(10, 5, 10, 1000, 10))
    end = snap(30, a=Counters(50, 0, 50, 5000, 50))  # failures 5 -> 0: restarted
    w = window(start, end)
    assert (w.successes, w.failures, w.request_us) == (50, 0, 5000)


def test_new_pod_counts_from_zero_and_gone_pod_counts_nothing() -> None:
    start = snap(0, old=Counters(100, 0, 100, 1e5, 0))
    end = snap(30, new=Counters(7, 1, 7, 7000, 0))
    w = window(start, end)
    assert (w.successes, w.failures) == (7, 1)


def test_p99_is_the_largest_of_pods_that_served() -> None:
    start = snap(0, a=Counters(0, 0), b=Counters(0, 0), idle=Counters(5, 0))
    end = snap(
        30, a=Counters(10, 0, p99_us=4000), b=Counters(10, 0, p99_us=9000), idle=Counters(5, 0, p99_us=99_000)
    )
    assert window(start, end).p99_ms == 9.0


def test_values_are_camel_case_and_prefixed() -> None:
    v = stats(100, 0, p99_ms=3).values("stable")
    assert v["stableRequests"] == 100 and v["stableErrorRate"] == 0 and v["stableP99Ms"] == 3
    assert "stableLatencyMs" in v and "stableQueueMs" in v
    assert "latencyMs" not in stats(0).values()


# --------------------------------------------------------------------------- evaluate


def test_too_little_traffic_is_inconclusive_naming_count_and_minimum() -> None:
    res = evaluate(stats(7), None, spec(thresholds={"maxErrorRate": 0.1}), now=NOW)
    assert res.verdict == "Inconclusive"
    assert "7 requests" in res.reason and "minRequests 20" in res.reason
    assert res.values["requests"] == 7
    assert res.time == "2025-01-02T03:04:05Z"


def test_no_traffic_is_inconclusive_not_a_pass() -> None:
    assert evaluate(stats(0), None, spec(), now=NOW).verdict == "Inconclusive"


def test_zero_min_requests_and_no_traffic_says_nothing_was_checked() -> None:
    res = evaluate(stats(0), None, spec(minRequests=0), now=NOW)
    assert res.verdict == "Pass" and "nothing was checked" in res.reason


def test_certain_error_rate_failure_below_min_requests_fails() -> None:
    """10 failures out of 12 with minRequests 20 and maxErrorRate 10%: even 8 more successes
    could not bring it under the limit."""
    res = evaluate(stats(2, 10), None, spec(thresholds={"maxErrorRate": 0.1}), now=NOW)
    assert res.verdict == "Fail" and "maxErrorRate" in res.reason


def test_error_rate_over_limit_fails_naming_value_and_limit() -> None:
    res = evaluate(stats(90, 10), None, spec(thresholds={"maxErrorRate": 0.05}), now=NOW)
    assert res.verdict == "Fail"
    assert res.reason.startswith("errorRate 10% > maxErrorRate 5%")
    assert "10 of 100 requests failed" in res.reason
    assert res.values["errorRate"] == pytest.approx(0.1)


def test_p99_used_when_exported_else_average_and_says_which() -> None:
    th = {"maxP99LatencyMs": 50}
    res = evaluate(stats(100, lat_ms=10, p99_ms=80), None, spec(thresholds=th), now=NOW)
    assert res.verdict == "Fail" and res.reason.startswith("p99 latency 80ms > maxP99LatencyMs 50")
    res = evaluate(stats(100, lat_ms=60), None, spec(thresholds=th), now=NOW)
    assert res.verdict == "Fail" and res.reason.startswith("avg latency 60ms > maxP99LatencyMs 50")
    assert "summary_latencies=true" in res.reason
    assert evaluate(stats(100, lat_ms=10, p99_ms=40), None, spec(thresholds=th), now=NOW).verdict == "Pass"


def test_queue_time_over_limit_fails() -> None:
    res = evaluate(stats(100, queue_ms=7.5), None, spec(thresholds={"maxQueueTimeMs": 5}), now=NOW)
    assert res.verdict == "Fail" and "avg queue time 7.5ms > maxQueueTimeMs 5" in res.reason


def test_every_exceeded_limit_is_named() -> None:
    res = evaluate(
        stats(50, 50, lat_ms=200, queue_ms=20),
        None,
        spec(thresholds={"maxErrorRate": 0.1, "maxP99LatencyMs": 100, "maxQueueTimeMs": 10}),
        now=NOW,
    )
    assert res.verdict == "Fail"
    assert "maxErrorRate" in res.reason and "maxP99LatencyMs" in res.reason and "maxQueueTimeMs" in res.reason


def test_within_limits_passes_with_a_summary() -> None:
    res = evaluate(
        stats(100, 1, lat_ms=3, p99_ms=9),
        None,
        spec(thresholds={"maxErrorRate": 0.05, "maxP99LatencyMs": 100}),
        now=NOW,
    )
    assert res.verdict == "Pass"
    assert "101 requests" in res.reason and "p99 latency 9ms" in res.reason
    assert res.values["p99Ms"] == 9


def test_error_rate_vs_stable() -> None:
    th = spec(thresholds={"maxErrorRateVsStable": 2})
    # stable 2%, candidate 5% > 2 x 2%
    res = evaluate(stats(95, 5), stats(980, 20), th, now=NOW)
    assert res.verdict == "Fail" and "maxErrorRateVsStable" in res.reason
    assert res.values["stableErrorRate"] == pytest.approx(0.02)
    # candidate 3% <= 4%
    assert evaluate(stats(97, 3), stats(980, 20), th, now=NOW).verdict == "Pass"


def test_error_rate_vs_clean_stable_uses_one_failure_floor() -> None:
    """Stable had no errors: the candidate fails once it has more than `ratio` failed requests."""
    th = spec(thresholds={"maxErrorRateVsStable": 2})
    assert evaluate(stats(98, 2), stats(1000), th, now=NOW).verdict == "Pass"  # 2 <= 2 x 1 failure
    res = evaluate(stats(97, 3), stats(1000), th, now=NOW)
    assert res.verdict == "Fail" and "one failed request of 100" in res.reason


def test_latency_vs_stable_prefers_p99_and_floors_at_one_ms() -> None:
    th = spec(thresholds={"maxLatencyVsStable": 1.5})
    res = evaluate(stats(100, lat_ms=5, p99_ms=40), stats(100, lat_ms=5, p99_ms=20), th, now=NOW)
    assert res.verdict == "Fail" and res.reason.startswith("p99 latency 40ms > 1.5 x stable 20ms")
    # averages when stable has no p99
    res = evaluate(stats(100, lat_ms=8, p99_ms=40), stats(100, lat_ms=5), th, now=NOW)
    assert res.verdict == "Fail" and "avg latency 8ms" in res.reason
    # 0.2ms vs 0.1ms is jitter: compared with 1ms
    assert evaluate(stats(100, lat_ms=0.2), stats(100, lat_ms=0.1), th, now=NOW).verdict == "Pass"


def test_relative_limits_without_stable_traffic() -> None:
    only_relative = spec(thresholds={"maxErrorRateVsStable": 2})
    res = evaluate(stats(100, 50), stats(3), only_relative, now=NOW)
    assert res.verdict == "Inconclusive" and "relative limits not checked" in res.reason
    res = evaluate(stats(100, 50), None, only_relative, now=NOW)
    assert res.verdict == "Inconclusive" and "stable served 0 requests" in res.reason
    mixed = spec(thresholds={"maxErrorRateVsStable": 2, "maxErrorRate": 0.9})
    res = evaluate(stats(100, 5), None, mixed, now=NOW)
    assert res.verdict == "Pass" and "relative limits not checked" in res.reason


# --------------------------------------------------------------------------- parsing and selection

TRITON_TEXT = """\
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="m",version="2"} 7
nv_inference_request_success{model="m",version="1"} 30
nv_inference_request_success{model="other",version="1"} 999
# TYPE nv_inference_request_failure counter
nv_inference_request_failure{model="m",reason="BACKEND",version="2"} 3
nv_inference_request_failure{model="m",reason="CANCELED",version="2"} 100
nv_inference_request_failure{model="m",reason="REJECTED",version="2"} 1
nv_inference_request_failure{model="m",reason="OTHER",version="1"} 0
# TYPE nv_inference_count counter
nv_inference_count{model="m",version="2"} 14
# TYPE nv_inference_request_duration_us counter
nv_inference_request_duration_us{model="m",version="2"} 70000
# TYPE nv_inference_queue_duration_us counter
nv_inference_queue_duration_us{model="m",version="2"} 700
# TYPE nv_inference_request_summary_us summary
nv_inference_request_summary_us_count{model="m",version="2"} 7
nv_inference_request_summary_us_sum{model="m",version="2"} 70000
nv_inference_request_summary_us{model="m",version="2",quantile="0.5"} 9000
nv_inference_request_summary_us{model="m",version="2",quantile="0.99"} 25000
"""


def test_parse_triton_exposition_by_model_and_version() -> None:
    rows = parse_exposition(TRITON_TEXT)
    assert any(name.endswith("_total") for name, _, _ in rows)  # the parser's counter naming
    s = snapshot_from_rows(rows, Target("m", "2"), at=1.0, series_labels=("model", "version"))
    (c,) = s.series.values()
    assert c == Counters(success=7, failure=4, inferences=14, request_us=70000, queue_us=700, p99_us=25000)
    both = snapshot_from_rows(rows, Target("m"), at=1.0, series_labels=("model", "version"))
    assert len(both.series) == 2


def test_prometheus_rows_keep_series_apart_and_sum_reasons() -> None:
    rows = [
        ("nv_inference_request_success", {"model": "m", "version": "1", "pod": "a"}, 10.0),
        ("nv_inference_request_success", {"model": "m", "version": "1", "pod": "b"}, 20.0),
        (
            "nv_inference_request_failure",
            {"model": "m", "version": "1", "pod": "a", "reason": "BACKEND"},
            2.0,
        ),
        ("nv_inference_request_failure", {"model": "m", "version": "1", "pod": "a", "reason": "OTHER"}, 1.0),
        (
            "nv_inference_request_failure_total",
            {"model": "m", "version": "1", "pod": "b", "reason": "OTHER"},
            4.0,
        ),
    ]
    s = snapshot_from_rows(rows, Target("m", "1"), at=0)
    assert {dict(k)["pod"]: (c.success, c.failure) for k, c in s.series.items()} == {
        "a": (10, 3),
        "b": (20, 4),
    }


def test_promql_selects_model_version_revision_namespace() -> None:
    src = PrometheusSource("http://prom:9090/")
    q = src.query_for(Target("my-model", "3", revision="abc123", namespace="team-a"))
    assert 'model="my-model"' in q and 'version="3"' in q
    assert 'modeldeploy_io_revision="abc123"' in q and 'namespace="team-a"' in q
    assert "nv_inference_(request_success|" in q and "(_total)?" in q
    plain = PrometheusSource("http://prom", revision_label=None, namespace_label=None)
    q = plain.query_for(Target('we"ird', None, revision="abc", namespace="ns"))
    assert 'model="we\\"ird"' in q and "revision" not in q and "namespace" not in q and "version" not in q


@pytest.mark.parametrize(
    ("pod", "url"),
    [
        ("10.1.2.3", "http://10.1.2.3:8002/metrics"),
        ("fd00::1", "http://[fd00::1]:8002/metrics"),
        ("127.0.0.1:9999", "http://127.0.0.1:9999/metrics"),
        ("http://x:1/m", "http://x:1/m"),
    ],
)
def test_metrics_url(pod: str, url: str) -> None:
    assert metrics_url(pod) == url


# --------------------------------------------------------------------------- the provider's windows


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class ListSource:
    """A scripted metric source (the provider's state handling is what is tested here;
    the real sources are tested against real Triton and Prometheus in tests/triton)."""

    def __init__(self) -> None:
        self.counters: dict[str, Counters] = {}
        self.fail: str | None = None
        self.calls = 0

    async def snapshot(self, target: Target) -> Snapshot:
        self.calls += 1
        if self.fail:
            raise MetricsUnavailable(self.fail)
        c = self.counters.get(target.version or "", Counters())
        return Snapshot(at=0, series={(("v", target.version or ""),): c})


def md(step_versions: tuple[int, int] = (1, 2)) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "ns", "name": "m"},
        "status": {
            "history": [
                {"hash": "stable", "modelVersion": step_versions[0]},
                {"hash": "cand", "modelVersion": step_versions[1]},
            ]
        },
    }


def mdspec(**analysis: Any) -> api.ModelDeploymentSpec:
    return api.ModelDeploymentSpec.model_validate(
        {
            "model": {"format": "python", "storageUri": "pvc://c/repo", "version": 2},
            "rollout": {"analysis": {"interval": "30s", "minRequests": 10, "scrape": True, **analysis}},
        }
    )


def provider(source: ListSource, clock: FakeClock) -> TritonAnalysis:
    ta = TritonAnalysis(pods_for=lambda ns, rev: ["10.0.0.1"], clock=clock, wall_clock=lambda: NOW)
    ta.source_for = lambda namespace, analysis: source  # type: ignore[method-assign]
    return ta


STATE = api.RolloutState(state="Progressing", step=0)


def run(
    ta: TritonAnalysis, sp: api.ModelDeploymentSpec, state: api.RolloutState = STATE
) -> api.AnalysisResult:
    res = asyncio.run(ta(md(), sp, state, "stable", "cand"))
    assert res is not None
    return res


def test_window_pending_then_verdict_then_next_window() -> None:
    src, clock = ListSource(), FakeClock()
    ta = provider(src, clock)
    sp = mdspec(thresholds={"maxErrorRate": 0.1})
    first = run(ta, sp)
    assert first.verdict == "Pending" and first.reason.startswith("window started")
    clock.t += 10
    assert run(ta, sp) is first  # unchanged object: nothing new to write
    assert src.calls == 2  # candidate + stable at the start only
    src.counters = {"2": Counters(95, 5), "1": Counters(500, 0)}
    clock.t += 20
    res = run(ta, sp)
    assert res.verdict == "Pass" and res.values["requests"] == 100 and res.values["stableRequests"] == 500
    # the next window started at once; Pass stands while it runs
    clock.t += 5
    assert run(ta, sp) is res
    src.counters = {"2": Counters(95 + 50, 5 + 50), "1": Counters(600, 0)}
    clock.t += 30
    res = run(ta, sp)
    assert res.verdict == "Fail" and "errorRate 50%" in res.reason
    clock.t += 300
    assert run(ta, sp) is res  # Fail is final for the step


def test_inconclusive_windows_then_fail_after_max_inconclusive() -> None:
    src, clock = ListSource(), FakeClock()
    ta = provider(src, clock)
    sp = mdspec(maxInconclusive=2)
    assert run(ta, sp).verdict == "Pending"
    verdicts = []
    for _ in range(3):
        clock.t += 30
        res = run(ta, sp)
        verdicts.append((res.verdict, res.inconclusive_count))
    assert verdicts == [("Inconclusive", 1), ("Inconclusive", 2), ("Fail", 3)]
    assert res.reason.startswith("insufficient traffic: 3 inconclusive windows in a row (maxInconclusive 2)")
    assert "fewer than minRequests 10" in res.reason


def test_pass_resets_the_inconclusive_tally() -> None:
    src, clock = ListSource(), FakeClock()
    ta = provider(src, clock)
    sp = mdspec(maxInconclusive=1)
    run(ta, sp)
    clock.t += 30
    assert run(ta, sp).inconclusive_count == 1
    src.counters = {"2": Counters(50, 0)}
    clock.t += 30
    assert (run(ta, sp).verdict, run(ta, sp).inconclusive_count) == ("Pass", 0)
    clock.t += 30
    assert run(ta, sp).verdict == "Inconclusive"  # no new traffic: 1 is tolerated


def test_new_step_starts_a_new_window() -> None:
    src, clock = ListSource(), FakeClock()
    ta = provider(src, clock)
    sp = mdspec()
    run(ta, sp)
    src.counters = {"2": Counters(50, 0)}
    clock.t += 30
    assert run(ta, sp).verdict == "Pass"
    nxt = run(ta, sp, STATE.model_copy(update={"step": 1}))
    assert nxt.verdict == "Pending"
    assert len(ta._windows) == 1  # the earlier step's window is dropped


def test_unavailable_metrics_count_as_inconclusive_and_retry_after_an_interval() -> None:
    src, clock = ListSource(), FakeClock()
    ta = provider(src, clock)
    sp = mdspec(maxInconclusive=1)
    src.fail = "connection refused"
    res = run(ta, sp)
    assert res.verdict == "Inconclusive" and "metrics unavailable: connection refused" in res.reason
    calls = src.calls
    clock.t += 5
    assert run(ta, sp) is res and src.calls == calls  # no hammering
    clock.t += 30
    res = run(ta, sp)
    assert res.verdict == "Fail" and res.reason.startswith("insufficient data: 2 inconclusive windows")


def test_no_analysis_spec_means_no_result() -> None:
    ta = TritonAnalysis()
    sp = api.ModelDeploymentSpec.model_validate(
        {"model": {"format": "python", "storageUri": "pvc://c/repo", "version": 2}}
    )
    assert asyncio.run(ta(md(), sp, STATE, "stable", "cand")) is None


def test_source_choice() -> None:
    ta = TritonAnalysis(pods_for=lambda ns, rev: [], default_prometheus_url="http://prom:9090")
    assert isinstance(ta.source_for("ns", api.AnalysisSpec(prometheus_url="http://p:1")), PrometheusSource)
    assert isinstance(ta.source_for("ns", api.AnalysisSpec()), PrometheusSource)
    assert not isinstance(ta.source_for("ns", api.AnalysisSpec(scrape=True)), PrometheusSource)
    assert TritonAnalysis().source_for("ns", api.AnalysisSpec()) is None


def test_no_source_is_inconclusive_not_a_silent_pass() -> None:
    ta = TritonAnalysis(clock=FakeClock(), wall_clock=lambda: NOW)
    sp = mdspec(scrape=False)
    res = asyncio.run(ta(md(), sp, STATE, "stable", "cand"))
    assert res is not None and res.verdict == "Inconclusive" and "no metrics source" in res.reason


def test_targets_use_model_name_and_versions_from_history() -> None:
    ta = TritonAnalysis()
    sp = mdspec()
    assert ta.target(md(), sp, "cand") == Target("m", "2", revision="cand", namespace="ns")
    assert ta.target(md(), sp, "stable") == Target("m", "1", revision="stable", namespace="ns")
    named = sp.model_copy(update={"model": sp.model.model_copy(update={"name": "resnet"})})
    assert ta.target(md(), named, "unknown", fallback_version=7).model == "resnet"
    assert ta.target(md(), named, "unknown", fallback_version=7).version == "7"


def test_no_matching_series_is_named_in_the_reason() -> None:
    class Empty(ListSource):
        async def snapshot(self, target: Target) -> Snapshot:
            return Snapshot(at=0)

    clock = FakeClock()
    ta = provider(Empty(), clock)
    sp = mdspec()
    run(ta, sp)
    clock.t += 30
    res = run(ta, sp)
    assert res.verdict == "Inconclusive" and "(no Triton series matched model 'm' version 2)" in res.reason
