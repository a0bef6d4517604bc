"""A fix for a kopf race we cannot configure away, applied when the operator's handlers load.

With namespace patterns (``--namespace 'team-*'``), kopf lists the namespaces once, then starts a
namespace watch, which begins with a listing of its own; kopf ignores the objects of that second
listing (they "were already noticed"). A namespace created between the two listings is in neither
the first listing nor the watch's events: kopf never serves it until the operator restarts.
On the local cluster, 1-2 of the namespaces created back to back around a start were never served
in each of 7 runs (tests/cluster/test_reliability.py, test_namespaces_created_during_startup_...).

The fix: take the watch's own listing into account too. Adding a namespace kopf already serves is a
no-op, so nothing changes for the namespaces of the first listing. Only kopf's private module is
touched, and only if it has the shape this was written against; otherwise the race stays and a
warning says so.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

log = logging.getLogger("modeldeploy")

_MARK = "_modeldeploy_serves_initial_listing"
_STAYS = "namespaces created during start-up may be missed until a restart"


def serve_namespaces_of_initial_listing() -> bool:
    """Install the fix (idempotent). Returns whether it is in place."""
    try:
        from kopf._core.reactor import observation
    except ImportError:  # a kopf without this module: nothing to fix here, or a layout we do not know
        log.warning("kopf's namespace observation was not found: %s", _STAYS)
        return False
    current = observation.process_discovered_namespace_event
    if getattr(current, _MARK, False):
        return True
    revise = getattr(observation, "revise_namespaces", None)
    wanted = {"raw_events", "insights", "namespaces"}
    if revise is None or not wanted <= set(inspect.signature(revise).parameters):
        log.warning("kopf's namespace observation changed shape: %s", _STAYS)
        return False

    async def process_discovered_namespace_event(
        *, raw_event: Any, namespaces: Any, insights: Any, **_: Any
    ) -> None:
        # Unlike kopf's: the events of the watch's initial listing (type None) count too. Those of them
        # kopf already serves change nothing and wake nobody (kopf re-plans its watches on every wake-up).
        name = raw_event["object"]["metadata"]["name"]
        async with insights.revised:
            served = name in insights.namespaces  # an event only ever adds or removes its own namespace
            revise(raw_events=[raw_event], insights=insights, namespaces=namespaces)
            if raw_event["type"] is not None or (name in insights.namespaces) != served:
                insights.revised.notify_all()

    setattr(process_discovered_namespace_event, _MARK, True)
    observation.process_discovered_namespace_event = process_discovered_namespace_event
    return True
