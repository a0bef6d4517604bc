"""The fix for kopf's namespace list-then-watch gap (modeldeploy.kube.kopfpatch), on kopf's own objects.
The race itself is shown on the cluster: test_reliability's
test_namespaces_created_during_startup_are_all_served."""

from __future__ import annotations

import asyncio
from typing import Any

from kopf._cogs.structs import references
from kopf._core.reactor import observation

from modeldeploy.kube import kopfpatch


def _event(name: str, type_: str | None, **meta: Any) -> Any:
    return {"type": type_, "object": {"metadata": {"name": name, **meta}}}


def _process(insights: references.Insights, *events: Any) -> None:
    async def run() -> None:
        for ev in events:
            await observation.process_discovered_namespace_event(
                raw_event=ev, namespaces=["team-*"], insights=insights
            )

    asyncio.run(run())


def test_installed_by_the_handlers_module_and_idempotent() -> None:
    import modeldeploy.handlers  # noqa: F401  (installs it on import)

    installed = observation.process_discovered_namespace_event
    assert getattr(installed, "_modeldeploy_serves_initial_listing", False)
    assert kopfpatch.serve_namespaces_of_initial_listing()
    assert observation.process_discovered_namespace_event is installed


def test_the_watch_listing_adds_matching_namespaces() -> None:
    assert kopfpatch.serve_namespaces_of_initial_listing()
    insights = references.Insights()
    # type None: an object of the watch's own initial listing (kopf's original ignores these)
    _process(insights, _event("team-a", None), _event("other", None))
    assert insights.namespaces == {"team-a"}


def test_watch_events_still_add_and_remove() -> None:
    assert kopfpatch.serve_namespaces_of_initial_listing()
    insights = references.Insights()
    _process(insights, _event("team-a", "ADDED"), _event("team-b", None))
    assert insights.namespaces == {"team-a", "team-b"}
    _process(insights, _event("team-a", "DELETED"))
    assert insights.namespaces == {"team-b"}
    # Terminating with finalizers pending: still served until it is gone.
    _process(
        insights,
        _event("team-b", "MODIFIED", deletionTimestamp="2026-01-01T00:00:00Z", finalizers=["x"]),
    )
    assert insights.namespaces == {"team-b"}


def test_listing_of_already_served_namespaces_wakes_nobody() -> None:
    """kopf re-plans its watches on every wake-up: the watch's initial listing repeats the namespaces of
    the first listing (all of them, on a big cluster), and those must not each wake it."""
    assert kopfpatch.serve_namespaces_of_initial_listing()

    async def run() -> list[str]:
        insights = references.Insights()
        insights.namespaces.update({"team-a", "team-b"})
        wakeups: list[str] = []
        ready = asyncio.Event()

        async def waiter() -> None:
            async with insights.revised:
                while True:
                    ready.set()
                    await insights.revised.wait()
                    wakeups.append(",".join(sorted(n for n in insights.namespaces if n)))

        task = asyncio.create_task(waiter())
        await ready.wait()
        for ev in (_event("team-a", None), _event("team-b", None), _event("other", None)):
            await observation.process_discovered_namespace_event(
                raw_event=ev, namespaces=["team-*"], insights=insights
            )
            await asyncio.sleep(0)  # let a woken waiter run
        await observation.process_discovered_namespace_event(
            raw_event=_event("team-c", None), namespaces=["team-*"], insights=insights
        )
        for _ in range(3):
            await asyncio.sleep(0)
        task.cancel()
        return wakeups

    assert asyncio.run(run()) == ["team-a,team-b,team-c"]
