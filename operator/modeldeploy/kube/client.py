"""A small async Kubernetes client for the operator's own reads and writes.

kopf watches and posts Events; children are written here with server-side apply under
one field manager. The client is deliberately thin (aiohttp, which kopf already uses):
it knows the few resource kinds the operator owns, retries throttling and transient
errors with backoff, and counts every write so "steady state writes nothing" is
measurable (``modeldeploy_api_writes_total``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import ssl
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import kopf
from prometheus_client import Counter

from .. import timeutil
from ..api import MANAGER

log = logging.getLogger(__name__)

#: The API server accepts JSON nested up to 10000 levels, and pass-through fields (spec.server.affinity,
#: autoscaling.behavior, ...) carry whatever a user writes. kopf decodes watch events with json.loads, and so
#: do we: at Python's default recursion limit (1000) one such object raises RecursionError in kopf's watcher,
#: which stops the whole operator, for every ModelDeployment, at every restart. Allow the API server's depth.
API_MAX_JSON_DEPTH = 10_000
if sys.getrecursionlimit() < 3 * API_MAX_JSON_DEPTH:
    sys.setrecursionlimit(3 * API_MAX_JSON_DEPTH)

WRITES = Counter("modeldeploy_api_writes_total", "Write requests sent to the API server", ["verb", "kind"])
ERRORS = Counter("modeldeploy_api_errors_total", "API requests that failed", ["verb", "kind", "code"])

# kind -> (api prefix, plural, namespaced)
RESOURCES: dict[str, tuple[str, str, bool]] = {
    "Deployment": ("/apis/apps/v1", "deployments", True),
    "Service": ("/api/v1", "services", True),
    "ConfigMap": ("/api/v1", "configmaps", True),
    "Secret": ("/api/v1", "secrets", True),
    "Pod": ("/api/v1", "pods", True),
    "PersistentVolumeClaim": ("/api/v1", "persistentvolumeclaims", True),
    "EndpointSlice": ("/apis/discovery.k8s.io/v1", "endpointslices", True),
    "HorizontalPodAutoscaler": ("/apis/autoscaling/v2", "horizontalpodautoscalers", True),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets", True),
    "Event": ("/api/v1", "events", True),
    "ModelDeployment": ("/apis/modeldeploy.io/v1alpha1", "modeldeployments", True),
    "BatchInference": ("/apis/modeldeploy.io/v1alpha1", "batchinferences", True),
    "Job": ("/apis/batch/v1", "jobs", True),
    "HTTPRoute": ("/apis/gateway.networking.k8s.io/v1", "httproutes", True),
    "GRPCRoute": ("/apis/gateway.networking.k8s.io/v1", "grpcroutes", True),
    "ServiceMonitor": ("/apis/monitoring.coreos.com/v1", "servicemonitors", True),
    "CustomResourceDefinition": ("/apis/apiextensions.k8s.io/v1", "customresourcedefinitions", False),
}


# Characters that JSON may carry raw (with ensure_ascii=False) but a YAML parser refuses or reads as line
# breaks; and lone surrogates. BMP code points only: \uXXXX is a valid escape in both JSON and YAML.
_YAML_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\ufeff\ufffe\uffff\ud800-\udfff]")


#: How long the existence of a referenced object (a Secret, a claim, a CRD) is remembered.
EXISTS_TTL_SECONDS = 10.0


def yaml_safe_json(body: Any) -> str:
    """JSON that is also valid YAML, for ``application/apply-patch+yaml`` bodies.

    ``json.dumps`` escapes a character outside the BMP (an emoji in an annotation) as a UTF-16 surrogate
    pair, ``"\\ud83d\\ude80"``, which YAML refuses ("found invalid Unicode character escape code"): the
    API server would reject the whole object. So non-ASCII goes out as UTF-8, and only what YAML cannot
    take raw is escaped, as BMP escapes both understand.
    """
    text = json.dumps(body, ensure_ascii=False)
    return _YAML_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


class ApiError(Exception):
    def __init__(self, status: int, body: str, what: str) -> None:
        super().__init__(f"{what}: HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body

    @property
    def invalid(self) -> bool:
        """The API server refused the object itself: sending it again cannot succeed.

        Besides 400/422, server-side apply answers some invalid bodies with a 500: a field its schema
        does not know (garbage passed through ``spec.server.affinity``: "failed to create typed patch
        object") or a value its Go type cannot hold (``rollout.maxSurge: 2**62``: "failed to convert new
        object").
        """
        return self.status in (400, 422) or (
            self.status == 500
            and any(
                m in self.body
                for m in ("failed to create typed patch object", "failed to convert new object")
            )
        )

    @property
    def message(self) -> str:
        """The API server's own message (from its Status body), for status conditions and Events."""
        try:
            text = str(json.loads(self.body).get("message") or "")
        except (ValueError, AttributeError):
            text = ""
        return (text or self.body or f"HTTP {self.status}")[:512]


def path_for(kind: str, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
    prefix, plural, namespaced = RESOURCES[kind]
    path = prefix
    if namespaced and namespace:
        path += f"/namespaces/{namespace}"
    path += f"/{plural}"
    if name:
        path += f"/{name}"
    if sub:
        path += f"/{sub}"
    return path


def _write_temp(data: str | bytes) -> str:
    raw = data if isinstance(data, bytes) else data.encode()
    if not raw.lstrip().startswith(b"-----"):
        raw = base64.b64decode(raw)
    fd, path = tempfile.mkstemp(prefix="modeldeploy-", suffix=".pem")
    with os.fdopen(fd, "wb") as fh:
        fh.write(raw)
    return path


def ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if info.insecure:
        return False
    ctx = ssl.create_default_context()
    if info.ca_path:
        ctx.load_verify_locations(cafile=os.fsdecode(info.ca_path))
    elif info.ca_data:
        ca = info.ca_data.decode() if isinstance(info.ca_data, bytes) else info.ca_data
        if not ca.lstrip().startswith("-----"):
            ca = base64.b64decode(ca).decode()
        ctx.load_verify_locations(cadata=ca)
    cert = os.fsdecode(info.certificate_path) if info.certificate_path else None
    key = os.fsdecode(info.private_key_path) if info.private_key_path else None
    if cert is None and info.certificate_data:
        cert = _write_temp(info.certificate_data)
    if key is None and info.private_key_data:
        key = _write_temp(info.private_key_data)
    if cert and key:
        ctx.load_cert_chain(cert, key)
    return ctx


class Kube:
    """Async API client bound to one set of credentials."""

    def __init__(
        self,
        info: kopf.ConnectionInfo,
        *,
        relogin: Callable[[], Awaitable[kopf.ConnectionInfo]] | None = None,
        request_timeout: float = 30.0,
    ) -> None:
        self._info = info
        self._relogin = relogin
        self._timeout = aiohttp.ClientTimeout(total=request_timeout)
        self._session: aiohttp.ClientSession | None = None
        self.writes = 0
        #: Existence of referenced objects: key -> (monotonic time seen, exists).
        self._seen: dict[tuple[str, str, str], tuple[float, bool]] = {}

    def _headers(self) -> dict[str, str]:
        h = {"Accept": "application/json", "User-Agent": f"{MANAGER}/0.1"}
        if self._info.token:
            h["Authorization"] = f"Bearer {self._info.token}"
        elif self._info.username and self._info.password:
            auth = base64.b64encode(f"{self._info.username}:{self._info.password}".encode()).decode()
            h["Authorization"] = f"Basic {auth}"
        return h

    async def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=ssl_context(self._info), limit=32)
            self._session = aiohttp.ClientSession(
                self._info.server.rstrip("/"), connector=connector, timeout=self._timeout
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        kind: str = "",
        params: dict[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        ok404: bool = False,
    ) -> Any:
        if body is None:
            data = None
        elif content_type == "application/apply-patch+yaml":
            data = yaml_safe_json(body).encode()
        else:
            data = json.dumps(body).encode()
        write = method in ("POST", "PUT", "PATCH", "DELETE")
        delay = 0.2
        for attempt in range(8):
            session = await self.session()
            headers = self._headers()
            if data is not None:
                headers["Content-Type"] = content_type
            try:
                if write:
                    self.writes += 1
                    WRITES.labels(method.lower(), kind).inc()
                async with session.request(method, path, params=params, data=data, headers=headers) as resp:
                    text = await resp.text()
                    if resp.status < 300:
                        return json.loads(text) if text else None
                    if resp.status == 404 and ok404:
                        return None
                    ERRORS.labels(method.lower(), kind, str(resp.status)).inc()
                    if resp.status == 401 and self._relogin is not None and attempt == 0:
                        self._info = await self._relogin()
                        await self.close()
                        continue
                    if resp.status in (429, 500, 502, 503, 504) and attempt < 7:
                        if ApiError(resp.status, text, "").invalid:
                            raise ApiError(resp.status, text, f"{method} {path}")
                        retry_after = resp.headers.get("Retry-After")
                        await asyncio.sleep(float(retry_after) if retry_after else delay)
                        delay = min(delay * 2, 5.0)
                        continue
                    raise ApiError(resp.status, text, f"{method} {path}")
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                ERRORS.labels(method.lower(), kind, "connection").inc()
                if attempt >= 7:
                    raise ApiError(0, str(exc), f"{method} {path}") from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        raise ApiError(0, "retries exhausted", f"{method} {path}")

    # ---------------------------------------------------------------- typed helpers

    async def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = await self.request(
            "GET", path_for(kind, namespace, name), kind=kind, ok404=True
        )
        return result

    async def exists(self, kind: str, namespace: str, name: str) -> bool:
        """Existence only; the object's data (e.g. a Secret's) is not kept."""
        return await self.get(kind, namespace, name) is not None

    async def exists_recently(self, kind: str, namespace: str, name: str) -> bool:
        """:meth:`exists`, remembered for :data:`EXISTS_TTL_SECONDS` (a spec's references are checked
        on every reconcile; Secrets are not watched: the operator never lists or caches them)."""
        key = (kind, namespace, name)
        seen = self._seen.get(key)
        if seen and time.monotonic() - seen[0] < EXISTS_TTL_SECONDS:
            return seen[1]
        exists = await self.exists(kind, namespace, name)
        self._seen[key] = (time.monotonic(), exists)
        return exists

    async def list(
        self, kind: str, namespace: str | None, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        params = {"labelSelector": label_selector} if label_selector else None
        result = await self.request("GET", path_for(kind, namespace), kind=kind, params=params, ok404=True)
        return list(result.get("items", [])) if result else []

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply under our single field manager (force: we own our fields)."""
        meta = obj["metadata"]
        result: dict[str, Any] = await self.request(
            "PATCH",
            path_for(obj["kind"], meta.get("namespace"), meta["name"]),
            kind=obj["kind"],
            params={"fieldManager": MANAGER, "force": "true"},
            body=obj,
            content_type="application/apply-patch+yaml",
        )
        return result

    async def patch_status(
        self, kind: str, namespace: str, name: str, status: dict[str, Any]
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self.request(
            "PATCH",
            path_for(kind, namespace, name, "status"),
            kind=kind,
            body={"status": status},
            content_type="application/merge-patch+json",
        )
        return result

    async def delete(self, kind: str, namespace: str | None, name: str) -> None:
        await self.request(
            "DELETE",
            path_for(kind, namespace, name),
            kind=kind,
            ok404=True,
            body={"propagationPolicy": "Background"},
        )

    async def post_event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """A core/v1 Event about ``obj`` (a milestone; never carries secrets)."""
        meta = obj["metadata"]
        now = timeutil.rfc3339(datetime.now(UTC))
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion"),
                "kind": obj.get("kind"),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": MANAGER},
            "reportingComponent": f"modeldeploy.io/{MANAGER}",
            "reportingInstance": os.environ.get("HOSTNAME", MANAGER),
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self.request("POST", path_for("Event", meta["namespace"]), kind="Event", body=event)


class EventSink:
    """Posts Events in the background, so a reconcile does not wait for them (two of the eight
    requests of a new ModelDeployment's first reconcile were its Events). An object's Events keep their
    order (one lane per object, by hash); a failed post is logged and dropped (Events are best-effort;
    status carries the same facts). ``close`` waits for what is queued, up to a timeout."""

    def __init__(
        self,
        post: Callable[[dict[str, Any], str, str, str], Awaitable[None]],
        *,
        lanes: int = 4,
        drain_seconds: float = 10.0,
    ) -> None:
        self._post = post
        self._drain_seconds = drain_seconds
        self._queues: list[asyncio.Queue[tuple[dict[str, Any], str, str, str]]] = [
            asyncio.Queue() for _ in range(lanes)
        ]
        self._tasks = [asyncio.create_task(self._run(q)) for q in self._queues]

    def post(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        meta = obj["metadata"]
        lane = hash((meta.get("namespace"), meta.get("name"))) % len(self._queues)
        self._queues[lane].put_nowait((obj, type_, reason, message))

    def pending(self) -> int:
        return sum(q.qsize() for q in self._queues)

    async def _run(self, queue: asyncio.Queue[tuple[dict[str, Any], str, str, str]]) -> None:
        while True:
            obj, type_, reason, message = await queue.get()
            try:
                await self._post(obj, type_, reason, message)
            except Exception as exc:  # best-effort
                log.warning("could not post event %s for %s: %s", reason, obj["metadata"].get("name"), exc)
            finally:
                queue.task_done()

    async def close(self) -> None:
        try:
            async with asyncio.timeout(self._drain_seconds):
                await asyncio.gather(*(q.join() for q in self._queues))
        except TimeoutError:
            log.warning("%d events not posted at shutdown", self.pending())
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
