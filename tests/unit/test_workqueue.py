"""The work queue: per-key serialisation, coalescing, delays, errors."""

from __future__ import annotations

import asyncio
from typing import Any

from modeldeploy.workqueue import WorkQueue


class Recorder:
    """A handler that records runs and concurrency per key, and can be held open."""

    def __init__(self) -> None:
        self.runs: list[tuple[str, str]] = []
        self.active: dict[tuple[str, str], int] = {}
        self.max_active: dict[tuple[str, str], int] = {}
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()
        self.ran: dict[tuple[str, str], asyncio.Event] = {}

    async def __call__(self, ns: str, name: str) -> None:
        key = (ns, name)
        self.active[key] = self.active.get(key, 0) + 1
        self.max_active[key] = max(self.max_active.get(key, 0), self.active[key])
        self.runs.append(key)
        self.started.set()
        self.ran.setdefault(key, asyncio.Event()).set()
        try:
            await self.gate.wait()
            await asyncio.sleep(0.001)
        finally:
            self.active[key] -= 1


async def until_idle(queue: WorkQueue) -> None:
    """Poll (the queue has no idle event) until nothing is queued or running, twice in a row."""
    settled = 0
    for _ in range(2000):
        settled = settled + 1 if queue.idle() else 0
        if settled >= 10:
            return
        await asyncio.sleep(0.001)
    raise AssertionError("work queue did not go idle")


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 5))


def test_workqueue_coalesces_adds_before_a_run() -> None:
    async def main() -> list[tuple[str, str]]:
        rec = Recorder()
        q = WorkQueue(rec, workers=4)
        for _ in range(5):
            q.add(("ns", "a"))
        q.start()
        await until_idle(q)
        await q.stop()
        return rec.runs

    assert run(main()) == [("ns", "a")]


def test_workqueue_add_during_a_run_causes_exactly_one_rerun() -> None:
    async def main() -> Recorder:
        rec = Recorder()
        rec.gate.clear()
        q = WorkQueue(rec, workers=4)
        q.start()
        q.add(("ns", "a"))
        await asyncio.wait_for(rec.started.wait(), 1)
        for _ in range(3):
            q.add(("ns", "a"))  # while it runs
        await asyncio.sleep(0.02)
        assert rec.runs == [("ns", "a")]  # the rerun waits for the running one
        rec.gate.set()
        await until_idle(q)
        await q.stop()
        return rec

    rec = run(main())
    assert rec.runs == [("ns", "a"), ("ns", "a")]
    assert rec.max_active[("ns", "a")] == 1


def test_workqueue_never_runs_one_key_concurrently() -> None:
    async def main() -> Recorder:
        rec = Recorder()
        q = WorkQueue(rec, workers=8)
        q.start()
        for i in range(200):
            q.add(("ns", f"k{i % 3}"))
            if i % 7 == 0:
                await asyncio.sleep(0)
        await until_idle(q)
        await q.stop()
        return rec

    rec = run(main())
    assert set(rec.max_active) == {("ns", "k0"), ("ns", "k1"), ("ns", "k2")}
    assert all(v == 1 for v in rec.max_active.values()), rec.max_active


def test_workqueue_runs_different_keys_in_parallel() -> None:
    async def main() -> Recorder:
        rec = Recorder()
        rec.gate.clear()
        q = WorkQueue(rec, workers=4)
        q.start()
        for k in ("a", "b", "c"):
            q.add(("ns", k))
        for _ in range(100):
            if len(rec.runs) == 3:
                break
            await asyncio.sleep(0.001)
        started = list(rec.runs)
        rec.gate.set()
        await until_idle(q)
        await q.stop()
        assert sorted(started) == [("ns", "a"), ("ns", "b"), ("ns", "c")]
        return rec

    run(main())


def test_workqueue_delayed_add_keeps_the_earliest_timer() -> None:
    async def main() -> list[tuple[str, str]]:
        rec = Recorder()
        q = WorkQueue(rec, workers=2)
        q.start()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for key in (("ns", "a"), ("ns", "b")):
            rec.ran[key] = asyncio.Event()
        q.add(("ns", "a"), delay=0.05)
        q.add(("ns", "a"), delay=30)  # later: ignored
        await asyncio.wait_for(rec.ran[("ns", "a")].wait(), 1)
        assert 0.04 <= loop.time() - t0 < 1.0
        q.add(("ns", "b"), delay=30)
        q.add(("ns", "b"), delay=0.02)  # earlier: replaces
        await asyncio.wait_for(rec.ran[("ns", "b")].wait(), 1)
        await q.stop()
        return rec.runs

    assert run(main()) == [("ns", "a"), ("ns", "b")]


def test_workqueue_keeps_running_after_a_handler_error() -> None:
    async def main() -> list[str]:
        seen: list[str] = []

        async def handler(ns: str, name: str) -> None:
            seen.append(name)
            if name == "bad":
                raise RuntimeError("boom")

        q = WorkQueue(handler, workers=1)
        q.start()
        q.add(("ns", "bad"))
        q.add(("ns", "good"))
        await until_idle(q)
        await q.stop()  # also cancels the 5 s retry timer of "bad"
        return seen

    assert run(main()) == ["bad", "good"]


# --------------------------------------------------------------------------- annotation commands
