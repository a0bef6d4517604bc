"""The work queue between watch events and reconciles (controller-runtime's semantics)."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Key = tuple[str, str]

#: What a handler returns when the key's object does not exist: the queue forgets the key, as
#: :meth:`WorkQueue.forget` does, instead of counting the run as a success of that object.
GONE = object()


class Backoff:
    """Per-key exponential delay after failures, forgotten on success (client-go's
    ItemExponentialFailureRateLimiter): ``base`` after the first failure, doubling up to ``cap``."""

    def __init__(self, base: float = 0.5, cap: float = 300.0) -> None:
        self.base, self.cap = base, cap
        self._failures: dict[Key, int] = {}

    def failed(self, key: Key) -> tuple[int, float]:
        """Count one more failure of ``key``: (failures in a row, delay before the next try)."""
        n = self._failures.get(key, 0) + 1
        self._failures[key] = n
        # 2**(n-1) is exact and unbounded in Python; stop doubling once past the cap.
        return n, self.cap if n > 64 else min(self.cap, self.base * 2 ** (n - 1))

    def forget(self, key: Key) -> None:
        self._failures.pop(key, None)

    def failures(self, key: Key) -> int:
        return self._failures.get(key, 0)


class FairLane:
    """First in, first out within a namespace; namespaces take turns (one key each, round robin).

    One team's burst of a thousand objects then does not hold up another team's one object: it waits
    for one key of each namespace with work queued ahead of it, not for the whole burst."""

    def __init__(self) -> None:
        self._by_ns: dict[str, deque[Key]] = {}
        self._turns: deque[str] = deque()  # namespaces with keys queued, the next to serve first

    def __bool__(self) -> bool:
        return bool(self._turns)

    def append(self, key: Key) -> None:
        keys = self._by_ns.get(key[0])
        if keys is None:
            keys = self._by_ns[key[0]] = deque()
            self._turns.append(key[0])
        keys.append(key)

    def popleft(self) -> Key:
        ns = self._turns.popleft()
        keys = self._by_ns[ns]
        key = keys.popleft()
        if keys:
            self._turns.append(ns)  # its next key after one of every other namespace's
        else:
            del self._by_ns[ns]
        return key


class WorkQueue:
    """Per-key serialised, coalescing work queue (the controller-runtime semantics):
    a key is never reconciled twice at once; events arriving meanwhile cause one rerun.

    Two lanes, each first in first out within a namespace with namespaces taking turns
    (:class:`FairLane`): keys that have had a successful run come before keys that have not. In a
    burst of creations each object's later events (its pod turned ready: one status write and it is
    Ready) then do not wait behind every first-time creation queued after it, which made nearly
    every object of a burst turn Ready only at the end. At most ``new_at_once`` keys of the second
    lane run at once: the machine's share then goes to finishing the objects already started (their
    pods, their Ready) instead of starting every new one at the same time, and in a burst they turn
    Ready in the order they came, one after another; another namespace's objects take turns with the
    burst's instead of waiting for all of it.
    A key whose handler raised is retried after :class:`Backoff`'s delay (a watch event for it
    still runs it at once, as in client-go); its stack trace is logged on the first failure in a
    row only, later ones as one line with the count and the next delay."""

    def __init__(
        self,
        handler: Callable[[str, str], Any],
        *,
        workers: int = 8,
        new_at_once: int | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self._handler = handler
        self._wake = asyncio.Event()  # set when a key may be takeable; workers re-check
        self._lanes = (FairLane(), FairLane())  # (succeeded before, not yet)
        self._new_at_once = new_at_once or workers
        self._running_new = 0
        self._succeeded: set[Key] = set()
        self._queued: set[Key] = set()
        self._running: set[Key] = set()
        self._dirty: set[Key] = set()
        self._timers: dict[Key, asyncio.TimerHandle] = {}
        self._workers = workers
        self._tasks: list[asyncio.Task[None]] = []
        self.backoff = backoff or Backoff()

    def add(self, key: Key, delay: float | None = None) -> None:
        if delay:
            loop = asyncio.get_running_loop()
            timer = self._timers.get(key)
            due = loop.time() + delay
            if timer is not None and timer.when() <= due:
                return
            if timer is not None:
                timer.cancel()
            self._timers[key] = loop.call_at(due, self._fire, key)
            return
        if key in self._running:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._lanes[0 if key in self._succeeded else 1].append(key)
            self._wake.set()

    def forget(self, key: Key) -> None:
        """The object is gone: drop what the queue remembers of it (its failures, its lane)."""
        self.backoff.forget(key)
        self._succeeded.discard(key)

    def due_in(self, key: Key) -> float | None:
        """Seconds until a delayed add of ``key`` fires (None: no timer)."""
        timer = self._timers.get(key)
        return None if timer is None else timer.when() - asyncio.get_running_loop().time()

    def _fire(self, key: Key) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work()) for _ in range(self._workers)]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for timer in self._timers.values():
            timer.cancel()

    def idle(self) -> bool:
        return not self._queued and not self._running

    def _take(self) -> tuple[Key, bool] | None:
        """The next key to run, and whether it is new (second lane); None: nothing may run now."""
        if self._lanes[0]:
            return self._lanes[0].popleft(), False
        if self._lanes[1] and self._running_new < self._new_at_once:
            self._running_new += 1
            return self._lanes[1].popleft(), True
        return None

    async def _work(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                self._wake.clear()  # no await since _take: an add() from now on sets it again
                await self._wake.wait()
                continue
            key, new = taken
            self._queued.discard(key)
            self._running.add(key)
            try:
                result = await self._handler(*key)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures, delay = self.backoff.failed(key)
                if failures == 1:
                    log.exception("reconcile of %s/%s failed; retrying in %.1f s", *key, delay)
                else:
                    log.error(
                        "reconcile of %s/%s failed again (%d in a row): %s: %s; retrying in %.1f s",
                        *key,
                        failures,
                        type(exc).__name__,
                        exc,
                        delay,
                    )
                self.add(key, delay=delay)
            else:
                if result is GONE:
                    # A run for an object already deleted (its children's deletions wake it): remembered
                    # as succeeded, the same name created again would skip the new lane.
                    self.forget(key)
                else:
                    self.backoff.forget(key)
                    self._succeeded.add(key)
            finally:
                self._running.discard(key)
                if new:
                    self._running_new -= 1
                    self._wake.set()
                if key in self._dirty:
                    self._dirty.discard(key)
                    self.add(key)
