"""The analysis windows on their own schedule: persisted verdicts, resumption after a restart.

The maths and the verdict rules are tested in test_analysis.py; here the runner's part: one task
per ModelDeployment, results written to status (through a fake ``patch_status`` that applies the
merge patch to an in-memory status), identity of a result, resumption of a persisted window.
Time is a fake clock with a fake ``sleep`` that returns when the test moves the clock; each window
write is awaited with a timeout, nothing sleeps.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from modeldeploy import api
from modeldeploy.kube.client import ApiError
from modeldeploy.modeldeployment.analysis_runner import AnalysisRunner, verdict_for
from modeldeploy.triton.analysis import Counters, MetricsUnavailable, Snapshot, Target, TritonAnalysis

T0 = 1_735_787_045.0  # 2025-01-02T03:04:05Z
TIMEOUT = 5.0
STATE = api.RolloutState(state="Progressing", step=0, started_at="2025-01-02T03:00:00Z")


class FakeTime:
    """A clock in unix seconds and a ``sleep`` that returns once the test has moved the clock far enough."""

    def __init__(self) -> None:
        self.t = T0
        self.sleeps: list[float] = []
        self._moved = asyncio.Condition()

    def clock(self) -> float:
        return self.t

    def wall(self) -> datetime:
        return datetime.fromtimestamp(self.t, UTC)

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        until = self.t + seconds
        async with self._moved:
            await self._moved.wait_for(lambda: self.t >= until)

    async def advance(self, seconds: float) -> None:
        self.t += seconds
        async with self._moved:
            self._moved.notify_all()


class Source:
    """Scripted counters per Triton version, read at the fake clock; ``fail`` makes every read fail."""

    def __init__(self, time: FakeTime) -> None:
        self.time = time
        self.counters: dict[str, Counters] = {}
        self.fail: str | None = None
        self.reads: list[tuple[str, float]] = []

    def _snap(self, target: Target, counters: dict[str, Counters], at: float) -> Snapshot:
        if self.fail:
            raise MetricsUnavailable(self.fail)
        version = target.version or ""
        series = {
            (("version", version), ("url", f"http://{version}:8002/metrics")): counters.get(
                version, Counters()
            )
        }
        return Snapshot(at=at, series=series)

    async def snapshot(self, target: Target) -> Snapshot:
        self.reads.append((target.version or "", self.time.t))
        return self._snap(target, self.counters, self.time.t)


class HistorySource(Source):
    """Like Prometheus: keeps every value it was given, and answers for a past moment too."""

    def __init__(self, time: FakeTime) -> None:
        super().__init__(time)
        self.history: list[tuple[float, dict[str, Counters]]] = []

    def set(self, counters: dict[str, Counters]) -> None:
        self.counters = counters
        self.history.append((self.time.t, dict(counters)))

    async def snapshot_at(self, target: Target, at: float) -> Snapshot:
        self.reads.append((target.version or "", at))
        past = [c for t, c in self.history if t <= at]
        return self._snap(target, past[-1] if past else {}, at)


def apply_merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386, as the API server applies a status merge patch."""
    out = dict(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict):
            out[key] = apply_merge_patch(out.get(key) if isinstance(out.get(key), dict) else {}, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class Store:
    """The ModelDeployment's status as the API server keeps it, and what the runner asked for."""

    def __init__(self) -> None:
        self.status: dict[str, Any] = {
            "history": [{"hash": "stable", "modelVersion": 1}, {"hash": "cand", "modelVersion": 2}]
        }
        self.writes: asyncio.Queue[api.AnalysisResult] = asyncio.Queue()
        self.enqueued: list[tuple[str, str]] = []
        self.errors: list[Exception] = []  # raised by the next writes, in order

    async def patch_status(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        assert (namespace, name) == ("ns", "m") and set(patch) == {"lastAnalysis"}, patch
        if self.errors:
            raise self.errors.pop(0)
        self.status = apply_merge_patch(self.status, patch)
        await self.writes.put(api.AnalysisResult.model_validate(self.status["lastAnalysis"]))
        return self.md()

    def enqueue(self, namespace: str, name: str) -> None:
        self.enqueued.append((namespace, name))

    def md(self) -> dict[str, Any]:
        return {"metadata": {"namespace": "ns", "name": "m"}, "status": copy.deepcopy(self.status)}

    def last(self) -> api.AnalysisResult:
        return api.AnalysisResult.model_validate(self.status["lastAnalysis"])

    async def next_write(self) -> api.AnalysisResult:
        return await asyncio.wait_for(self.writes.get(), TIMEOUT)

    async def no_write(self) -> None:
        for _ in range(20):
            await asyncio.sleep(0)  # let every task run as far as it can
        assert self.writes.empty(), self.writes.get_nowait()


def mdspec(**analysis: Any) -> api.ModelDeploymentSpec:
    return api.ModelDeploymentSpec.model_validate(
        {
            "model": {"format": "python", "storageUri": "pvc://c/repo", "version": 2},
            "rollout": {"analysis": {"interval": "30s", "minRequests": 10, "scrape": True, **analysis}},
        }
    )


def provider(source: Source, time: FakeTime) -> TritonAnalysis:
    ta = TritonAnalysis(pods_for=lambda ns, rev: ["10.0.0.1"], clock=time.clock, wall_clock=time.wall)
    ta.source_for = lambda namespace, analysis: source  # type: ignore[method-assign]
    return ta


def make_runner(source: Source, time: FakeTime, store: Store) -> AnalysisRunner:
    return AnalysisRunner(
        provider(source, time), patch_status=store.patch_status, enqueue=store.enqueue, sleep=time.sleep
    )


def ensure(
    runner: AnalysisRunner, store: Store, spec: api.ModelDeploymentSpec, state: api.RolloutState = STATE
) -> None:
    runner.ensure(store.md(), spec, state, "stable", "cand")


def task_of(runner: AnalysisRunner) -> asyncio.Task[None]:
    task = runner._jobs[("ns", "m")].task
    assert task is not None
    return task


async def ended(task: asyncio.Task[None]) -> None:
    await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), TIMEOUT)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 4 * TIMEOUT))


# --------------------------------------------------------------------------- verdict_for


def result(**kw: Any) -> api.AnalysisResult:
    base: dict[str, Any] = {
        "verdict": "Pass",
        "time": "2025-01-02T03:04:05Z",
        "candidate_hash": "cand",
        "step": 0,
        "attempt": STATE.started_at,
    }
    return api.AnalysisResult(**{**base, **kw})


def test_verdict_for_counts_only_the_current_candidate_step_and_attempt() -> None:
    current = result()
    assert verdict_for(current, STATE, "cand") is current
    assert verdict_for(None, STATE, "cand") is None
    assert verdict_for(current, STATE, "other") is None  # another candidate
    assert verdict_for(current, STATE.model_copy(update={"step": 1}), "cand") is None  # an earlier step
    retried = STATE.model_copy(update={"started_at": "2025-01-02T04:00:00Z"})
    assert verdict_for(current, retried, "cand") is None  # the same candidate's earlier attempt
    unstamped = api.AnalysisResult(verdict="Fail", time="2025-01-02T03:04:05Z")
    assert verdict_for(unstamped, STATE, "cand") is None  # written before results said what they judge


# --------------------------------------------------------------------------- windows persisted


def test_windows_run_on_their_own_and_persist_verdict_and_values() -> None:
    async def scenario() -> None:
        time, store = FakeTime(), Store()
        source = Source(time)
        source.counters = {"2": Counters(10, 0), "1": Counters(100, 0)}
        runner = make_runner(source, time, store)
        ensure(runner, store, mdspec(thresholds={"maxErrorRate": 0.1}))

        first = await store.next_write()
        assert first.verdict == "Pending" and first.reason == "window started: collecting 30s of metrics"
        assert (first.candidate_hash, first.step, first.attempt) == ("cand", 0, STATE.started_at)
        assert first.window_start == "2025-01-02T03:04:05.000Z" and first.values == {}
        counters = first.window_counters
        assert counters is not None and counters.stable is not None
        assert [(s.labels, s.success) for s in counters.candidate] == [
            ({"url": "http://2:8002/metrics", "version": "2"}, 10)
        ]
        assert [s.success for s in counters.stable] == [100]
        assert store.enqueued == [("ns", "m")]  # the reconcile is asked to read it
        assert time.sleeps == [30]

        source.counters = {"2": Counters(105, 5), "1": Counters(600, 0)}
        await time.advance(30)
        res = await store.next_write()
        assert res.verdict == "Pass" and res.reason.startswith("within limits: 100 requests, errorRate 5%")
        assert (
            res.values["requests"] == 100
            and res.values["failures"] == 5
            and res.values["windowSeconds"] == 30
        )
        assert res.values["stableRequests"] == 500
        assert res.window_start == "2025-01-02T03:04:35.000Z"  # the next window started where this ended
        assert store.last() == res and verdict_for(store.last(), STATE, "cand") == res
        assert store.enqueued == [("ns", "m")] * 2

        source.counters = {"2": Counters(155, 55), "1": Counters(700, 0)}
        await time.advance(30)
        res = await store.next_write()
        assert res.verdict == "Fail" and res.reason.startswith("errorRate 50% > maxErrorRate 10%")
        assert res.window_start is None and res.window_counters is None  # no window follows a Fail
        await ended(task_of(runner))  # a Fail is final for the step: the task ends
        assert time.sleeps == [30, 30]
        assert "windowStart" not in store.status["lastAnalysis"]

    run(scenario)


def test_same_results_as_the_provider_called_in_place() -> None:
    """The runner judges exactly as TritonAnalysis called by a caller each interval: same verdicts,
    reasons, values and inconclusive counting, errors included."""
    steps: list[tuple[dict[str, Counters], str | None]] = [
        ({"2": Counters(0, 0)}, None),  # window started
        ({"2": Counters(3, 0)}, None),  # 3 requests: Inconclusive 1
        ({"2": Counters(3, 0)}, "connection refused"),  # metrics unavailable: Inconclusive 2
        ({"2": Counters(60, 1)}, None),  # window started again (no start counters)
        ({"2": Counters(90, 1)}, None),  # Pass: the tally resets
        ({"2": Counters(91, 1)}, None),  # Inconclusive 1
        ({"2": Counters(91, 1)}, "timeout"),  # Inconclusive 2
        ({"2": Counters(91, 1)}, "timeout"),  # Fail: 3 > maxInconclusive 2
    ]
    spec = mdspec(maxInconclusive=2, thresholds={"maxErrorRate": 0.1})

    def shown(res: api.AnalysisResult) -> tuple[str, str, int, dict[str, float]]:
        return (res.verdict, res.reason, res.inconclusive_count, res.values)

    async def in_place() -> list[tuple[str, str, int, dict[str, float]]]:
        time = FakeTime()
        source = Source(time)
        ta = provider(source, time)
        out = []
        md = Store().md()
        for counters, fail in steps:
            source.counters, source.fail = counters, fail
            res = await ta(md, spec, STATE, "stable", "cand")
            assert res is not None
            out.append(shown(res))
            await time.advance(30)
        return out

    async def runner() -> list[tuple[str, str, int, dict[str, float]]]:
        time, store = FakeTime(), Store()
        source = Source(time)
        r = make_runner(source, time, store)
        out = []
        for i, (counters, fail) in enumerate(steps):
            source.counters, source.fail = counters, fail
            if i == 0:
                ensure(r, store, spec)
            else:
                await time.advance(30)
            out.append(shown(await store.next_write()))
        await ended(task_of(r))
        return out

    expected = asyncio.run(in_place())
    assert [v for v, *_ in expected] == [
        "Pending",
        "Inconclusive",
        "Inconclusive",
        "Pending",
        "Pass",
        "Inconclusive",
        "Inconclusive",
        "Fail",
    ]
    assert expected[2][1] == "metrics unavailable: connection refused"
    assert expected[-1][1].startswith(
        "insufficient data: 3 inconclusive windows in a row (maxInconclusive 2)"
    )
    assert asyncio.run(asyncio.wait_for(runner(), 4 * TIMEOUT)) == expected


def test_an_unreadable_window_persists_no_window_and_drops_the_old_values() -> None:
    async def scenario() -> None:
        time, store = FakeTime(), Store()
        source = Source(time)
        runner = make_runner(source, time, store)
        ensure(runner, store, mdspec())
        await store.next_write()
        source.counters = {"2": Counters(50, 0), "1": Counters(50, 0)}
        await time.advance(30)
        assert (await store.next_write()).values["stableRequests"] == 50
        source.fail = "connection refused"
        await time.advance(30)
        res = await store.next_write()
        assert res.verdict == "Inconclusive" and res.reason == "metrics unavailable: connection refused"
        assert res.inconclusive_count == 1 and res.window_start is None
        persisted = store.status["lastAnalysis"]
        assert persisted["values"] == {} and "windowCounters" not in persisted  # nothing of the Pass left
        runner.stop_all()

    run(scenario)


# --------------------------------------------------------------------------- restart


def test_a_new_runner_resumes_the_persisted_window_at_its_original_end() -> None:
    """The operator restarts 10 s into a 30 s window: the window still ends 30 s after it started,
    measured from the counters persisted at its start (direct scraping keeps them in status)."""

    async def scenario() -> None:
        time, store = FakeTime(), Store()
        source = Source(time)
        source.counters = {"2": Counters(10, 0), "1": Counters(100, 0)}
        before = make_runner(source, time, store)
        ensure(before, store, mdspec())
        started = await store.next_write()
        assert started.verdict == "Pending"
        before.stop_all()  # the process ends
        await ended(task_of_stopped(before))

        await time.advance(10)
        source.counters = {"2": Counters(60, 0), "1": Counters(400, 0)}  # traffic went on meanwhile
        reads = len(source.reads)
        after = make_runner(source, time, store)
        ensure(after, store, mdspec())
        await store.no_write()
        assert time.sleeps[-1] == 20  # the rest of the window, not a new one
        assert len(source.reads) == reads  # nothing read at the resumption: the start is in status

        source.counters = {"2": Counters(80, 0), "1": Counters(500, 0)}
        await time.advance(20)
        res = await store.next_write()
        assert res.verdict == "Pass" and res.values["windowSeconds"] == 30
        assert (
            res.values["requests"] == 70 and res.values["stableRequests"] == 400
        )  # since the window's start
        assert res.window_start == "2025-01-02T03:04:35.000Z"
        after.stop_all()

    run(scenario)


def test_a_resumed_prometheus_window_reads_its_start_at_the_persisted_time() -> None:
    async def scenario() -> None:
        time, store = FakeTime(), Store()
        source = HistorySource(time)
        source.set({"2": Counters(10, 0), "1": Counters(100, 0)})
        before = make_runner(source, time, store)
        ensure(before, store, mdspec())
        started = await store.next_write()
        assert started.window_start == "2025-01-02T03:04:05.000Z"
        assert started.window_counters is None  # Prometheus keeps them: status does not
        before.stop_all()

        await time.advance(5)
        source.set({"2": Counters(40, 0), "1": Counters(200, 0)})
        await time.advance(20)
        after = make_runner(source, time, store)
        ensure(after, store, mdspec())
        await store.no_write()
        assert time.sleeps[-1] == 5
        source.set({"2": Counters(60, 0), "1": Counters(300, 0)})
        await time.advance(5)
        res = await store.next_write()
        assert res.verdict == "Pass" and res.values["requests"] == 50 and res.values["stableRequests"] == 200
        # the start read at the persisted window start, the end now
        assert source.reads[-4:] == [("2", T0), ("1", T0), ("2", T0 + 30), ("1", T0 + 30)]
        after.stop_all()

    run(scenario)


def test_a_failed_step_stays_failed_across_a_restart() -> None:
    async def scenario() -> None:
        time, store = FakeTime(), Store()
        source = Source(time)
        store.status["lastAnalysis"] = result(
            verdict="Fail", reason="errorRate 50% > maxErrorRate 10%"
        ).model_dump(by_alias=True, mode="json", exclude_none=True)
        runner = make_runner(source, time, store)
        ensure(runner, store, mdspec())
        await ended(task_of(runner))
        assert source.reads == [] and store.writes.empty() and time.sleeps == []

    run(scenario)


# --------------------------------------------------------------------------- ensure / stop


def task_of_stopped(runner: AnalysisRunner) -> asyncio.Task[None]:
    task = runner._ending[("ns", "m")].task
    assert task is not None
    return task


def test_ensure_is_idempotent_and_a_new_step_replaces_the_window() -> None:
    async def scenario() -> None:
        time, store = FakeTime(), Store()
        source = Source(time)
        runner = make_runner(source, time, store)
        spec = mdspec()
        ensure(runner, store, spec)
        first = task_of(runner)
        assert (await store.next_write()).step == 0
        ensure(runner, store, spec)
        ensure(runner, store, spec)
        assert task_of(runner) is first and not first.done()
        await store.no_write()

        ensure(runner, store, spec, STATE.model_copy(update={"step": 1}))
        res = await store.next_write()
        assert first.cancelled()
        assert (res.verdict, res.step) == ("Pending", 1) and res.reason.startswith("window started")
        assert verdict_for(store.last(), STATE, "cand") is None  # step 0 reads no verdict from it
        runner.stop_all()

    run(scenario)


def test_a_replacing_window_clears_what_the_last_write_showed_though_md_was_read_before_it() -> None:
    async def scenario() -> None:
        time, store = FakeTime(), Store()
        source = Source(time)
        runner = make_runner(source, time, store)
        ensure(runner, store, mdspec())
        await store.next_write()
        stale = store.md()  # read by a reconcile before the next write landed
        source.counters = {"2": Counters(50, 0), "1": Counters(50, 0)}
        await time.advance(30)
        assert (await store.next_write()).values["stableRequests"] == 50
        runner.ensure(stale, mdspec(), STATE.model_copy(update={"step": 1}), "stable", "cand")
        res = await store.next_write()
        assert (res.verdict, res.step) == ("Pending", 1)
        assert store.status["lastAnalysis"]["values"] == {}  # nothing of step 0's Pass left
        runner.stop_all()

    run(scenario)


def test_stop_cancels_and_a_later_ensure_resumes_the_window() -> None:
    async def scenario() -> None:
        time, store = FakeTime(), Store()
        source = Source(time)
        source.counters = {"2": Counters(10, 0)}
        runner = make_runner(source, time, store)
        ensure(runner, store, mdspec())
        await store.next_write()
        task = task_of(runner)
        runner.stop("ns", "m")  # e.g. the candidate's pods are not all ready
        await ended(task)
        assert task.cancelled() and ("ns", "m") not in runner._jobs
        reads = len(source.reads)
        await time.advance(60)
        await store.no_write()
        assert len(source.reads) == reads  # nothing measured while stopped

        source.counters = {"2": Counters(40, 0)}
        ensure(runner, store, mdspec())  # ready again, 60 s after the window started: it ends at once
        res = await store.next_write()
        assert res.verdict == "Pass" and res.values["requests"] == 30 and res.values["windowSeconds"] == 60
        runner.stop_all()

    run(scenario)


def test_a_failed_write_is_retried_and_a_deleted_object_ends_the_task() -> None:
    async def scenario() -> None:
        time, store = FakeTime(), Store()
        source = Source(time)
        runner = make_runner(source, time, store)
        store.errors = [ApiError(500, "etcd timeout", "PATCH"), ConnectionResetError("reset")]
        ensure(runner, store, mdspec())
        await store.no_write()
        assert time.sleeps == [1.0]
        await time.advance(1)
        await store.no_write()
        assert time.sleeps == [1.0, 2.0]  # backing off
        await time.advance(2)
        assert (await store.next_write()).verdict == "Pending"
        assert store.enqueued == [("ns", "m")]  # once, after the write that landed

        store.errors = [ApiError(404, "not found", "PATCH")]
        await time.advance(30)
        await ended(task_of(runner))
        assert store.enqueued == [("ns", "m")]

    run(scenario)


def test_a_zero_interval_still_waits_a_second_between_windows() -> None:
    async def scenario() -> None:
        time, store = FakeTime(), Store()
        runner = make_runner(Source(time), time, store)
        ensure(runner, store, mdspec(interval="0s"))
        assert (await store.next_write()).verdict == "Pending"
        await store.no_write()
        assert time.sleeps == [1.0]  # not a loop of status writes
        await time.advance(1)
        assert (await store.next_write()).verdict == "Inconclusive"
        runner.stop_all()

    run(scenario)


@pytest.mark.parametrize("unit", ["ms", "s"])
def test_window_start_is_persisted_to_the_millisecond(unit: str) -> None:
    async def scenario() -> None:
        time, store = FakeTime(), Store()
        time.t += 0.25
        runner = make_runner(Source(time), time, store)
        ensure(runner, store, mdspec(interval="1500ms" if unit == "ms" else "2s"))
        res = await store.next_write()
        assert res.window_start == "2025-01-02T03:04:05.250Z"
        assert time.sleeps == [1.5 if unit == "ms" else 2.0]
        runner.stop_all()

    run(scenario)


# --------------------------------------------------------------------------- the reconcile's side


class Directions:
    """Stands in for the runner: records what the reconcile asks of the windows."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def ensure(
        self,
        md: dict[str, Any],
        spec: api.ModelDeploymentSpec,
        state: api.RolloutState,
        stable_hash: str,
        candidate_hash: str,
    ) -> None:
        self.calls.append(("ensure", state.step, stable_hash, candidate_hash))

    def stop(self, namespace: str, name: str) -> None:
        self.calls.append(("stop", namespace, name))


def test_the_reconcile_reads_the_persisted_verdict_and_never_writes_it() -> None:
    from test_hostile_input import VALID_BASE, World  # the reconciler over an in-memory API server

    analysis = {"scrape": True, "interval": "30s"}
    steps = [{"weight": 25}, {"weight": 50}, {"weight": 100}]
    rollout_spec = {"strategy": "Canary", "steps": steps, "analysis": analysis}
    world = World({**VALID_BASE, "rollout": rollout_spec})
    directions = Directions()
    world.reconciler.analysis = directions
    patches: list[dict[str, Any]] = []
    patch_status = world.kube.patch_status

    async def recorded(kind: str, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        patches.append(status)
        return await patch_status(kind, namespace, name, status)

    world.kube.patch_status = recorded  # type: ignore[method-assign]

    def persist(verdict: str, step: int) -> dict[str, Any]:
        """What the runner writes (its patch, then the object into the cache)."""
        st = world.status()
        la = result(
            verdict=verdict, reason=f"{verdict} (test)", candidate_hash=cand, step=step, attempt=attempt
        ).model_dump(by_alias=True, mode="json", exclude_none=True)
        world.md()["status"] = {**st, "lastAnalysis": la}
        world.md()["metadata"]["resourceVersion"] = world.kube._next_rv()
        world.cache.put(copy.deepcopy(world.md()))
        return la

    world.reconcile(4)
    assert world.status()["phase"] == "Ready"
    assert {c[0] for c in directions.calls} == {"stop"}  # no rollout: no window

    world.set_spec({**VALID_BASE, "model": {**VALID_BASE["model"], "version": 2}, "rollout": rollout_spec})
    world.reconcile(4)
    ro = world.status()["rollout"]
    by_rev = {r["revision"]: r["hash"] for r in world.status()["history"]}
    stable, cand, attempt = by_rev[1], by_rev[2], ro["startedAt"]
    assert (ro["state"], ro["step"]) == ("Progressing", 0)  # no verdict yet: Pending holds the step
    assert directions.calls[-1] == ("ensure", 0, stable, cand)

    persisted = persist("Pass", 0)
    world.reconcile(4)
    ro = world.status()["rollout"]
    assert (ro["state"], ro["step"]) == ("Progressing", 1)  # passed step 0; step 0's Pass is no verdict for 1
    assert ("stop", "ns", "md") in directions.calls[-4:]  # the step changed: step 0's window ends
    assert directions.calls[-1] == ("ensure", 1, stable, cand)
    assert world.status()["lastAnalysis"] == persisted  # left as the runner wrote it

    persist("Fail", 1)
    world.reconcile(2)
    st = world.status()
    assert (
        st["rollout"]["state"] == "RolledBack" and st["rollout"]["reason"] == "analysis failed: Fail (test)"
    )
    assert directions.calls[-1] == ("stop", "ns", "md")
    assert patches and not [p for p in patches if "lastAnalysis" in p]  # the runner is its only writer
