"""Leader election on a coordination.k8s.io/v1 Lease, for running more than one replica.

Every replica watches (so a standby has a warm cache); only the holder of the Lease
reconciles. The holder renews every ``lease_seconds / 3``; a standby takes the Lease over
once it has not been renewed for ``lease_seconds``. Updates carry the resourceVersion they
read, so two candidates can never both win. A leader that cannot renew in time stops
acting at once (``on_lost``), before any standby may take over.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from .. import timeutil
from .client import ApiError, Kube

log = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(UTC)


def expired(lease: dict[str, Any], now: datetime) -> bool:
    spec = lease.get("spec") or {}
    renewed = timeutil.parse_rfc3339(spec.get("renewTime")) or timeutil.parse_rfc3339(spec.get("acquireTime"))
    if renewed is None:
        return True
    return (now - renewed).total_seconds() > float(spec.get("leaseDurationSeconds") or 15)


class LeaderElector:
    def __init__(
        self,
        kube: Kube,
        *,
        namespace: str,
        name: str,
        identity: str,
        lease_seconds: float = 15.0,
        on_started: Callable[[], None],
        on_lost: Callable[[], None],
    ) -> None:
        self.kube = kube
        self.path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}"
        self.collection = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_seconds = lease_seconds
        self.on_started, self.on_lost = on_started, on_lost
        self.leader = False
        self._last_renew = 0.0

    def _body(self, now: datetime, rv: str | None, transitions: int, acquire: datetime) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if rv:
            meta["resourceVersion"] = rv
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": meta,
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": int(self.lease_seconds),
                "acquireTime": timeutil.rfc3339(acquire, micro=True),  # a Lease's times are MicroTime
                "renewTime": timeutil.rfc3339(now, micro=True),
                "leaseTransitions": transitions,
            },
        }

    async def try_acquire_or_renew(self) -> bool:
        now = _now()
        lease = await self.kube.request("GET", self.path, kind="Lease", ok404=True)
        try:
            if lease is None:
                await self.kube.request(
                    "POST", self.collection, kind="Lease", body=self._body(now, None, 0, now)
                )
                return True
            spec = lease.get("spec") or {}
            mine = spec.get("holderIdentity") == self.identity
            if not mine and not expired(lease, now):
                return False
            transitions = int(spec.get("leaseTransitions") or 0) + (0 if mine else 1)
            acquire = (timeutil.parse_rfc3339(spec.get("acquireTime")) or now) if mine else now
            await self.kube.request(
                "PUT",
                self.path,
                kind="Lease",
                body=self._body(now, lease["metadata"]["resourceVersion"], transitions, acquire),
            )
            return True
        except ApiError as exc:
            if exc.status == 409:  # somebody else updated it first
                return False
            raise

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        period = max(0.5, self.lease_seconds / 3)
        while True:
            try:
                ok = await asyncio.wait_for(self.try_acquire_or_renew(), timeout=period)
            except (ApiError, TimeoutError) as exc:
                log.warning("leader election: %s", exc)
                ok = False
            if ok:
                self._last_renew = loop.time()
                if not self.leader:
                    self.leader = True
                    log.info(
                        "leader election: %s acquired lease %s/%s", self.identity, self.namespace, self.name
                    )
                    self.on_started()
            elif self.leader and loop.time() - self._last_renew > self.lease_seconds * 2 / 3:
                # Stop acting well before a standby may consider the lease expired.
                self.leader = False
                log.error("leader election: %s lost lease %s/%s", self.identity, self.namespace, self.name)
                self.on_lost()
            await asyncio.sleep(period)
