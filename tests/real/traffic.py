"""A client that sends inference requests through a Service the whole time a test runs, and says
what each one got: which model version answered, or how it failed.

One new TCP connection per request (``Connection: close``): kube-proxy picks a backend per
connection, so each request is one draw of the Service's split (a keep-alive client would measure
the split of its connections instead), and a request never rides a connection to a pod that is
already gone. No retries: every failure is counted as it happened.

The model (``models.py``) multiplies its input by its own version number, so ``X = [1, 1, 1]``
comes back as ``[v, v, v]``: the answer names the version that served it.
"""

from __future__ import annotations

import http.client
import json
import math
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import urllib3

TIMEOUT = 5.0  # seconds per request: a request slower than this counts as failed (timeout)


@dataclass(frozen=True)
class Outcome:
    start: float  # time.monotonic() when the request was sent
    seconds: float
    version: int | None  # the version that answered, None if it failed
    error: str | None  # connection refused/reset, timeout, HTTP status and body, malformed answer


def infer_once(host: str, port: int, model: str, timeout: float = TIMEOUT) -> Outcome:
    body = json.dumps(
        {"inputs": [{"name": "X", "shape": [1, 3], "datatype": "FP32", "data": [1.0, 1.0, 1.0]}]}
    ).encode()
    t0 = time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(
            "POST",
            f"/v2/models/{model}/infer",
            body=body,
            headers={"Content-Type": "application/json", "Connection": "close"},
        )
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            return Outcome(t0, time.monotonic() - t0, None, f"HTTP {resp.status}: {data[:200]!r}")
        answer = json.loads(data)["outputs"][0]["data"]
        if len(set(answer)) != 1 or answer[0] != int(answer[0]):
            return Outcome(t0, time.monotonic() - t0, None, f"malformed answer {answer!r}")
        return Outcome(t0, time.monotonic() - t0, int(answer[0]), None)
    except TimeoutError:
        return Outcome(t0, time.monotonic() - t0, None, "timeout")
    except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError) as e:
        return Outcome(t0, time.monotonic() - t0, None, f"{type(e).__name__}: {e}")
    finally:
        conn.close()


class Traffic:
    """Requests at ``rate`` per second (paced, one at a time) from ``start()`` until ``stop()``."""

    def __init__(self, host: str, port: int, model: str, rate: float = 50.0) -> None:
        self.host, self.port, self.model, self.rate = host, port, model, rate
        self._outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Traffic:
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[Outcome]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(TIMEOUT + 5)
        return self.outcomes()

    def __enter__(self) -> Traffic:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        period = 1.0 / self.rate
        due = time.monotonic()
        while not self._stop.is_set():
            outcome = infer_once(self.host, self.port, self.model)
            with self._lock:
                self._outcomes.append(outcome)
            due = max(due + period, time.monotonic() - period)  # no burst to catch up after a stall
            self._stop.wait(max(0.0, due - time.monotonic()))

    def outcomes(self, since: float = 0.0, until: float = math.inf) -> list[Outcome]:
        with self._lock:
            return [o for o in self._outcomes if since <= o.start < until]

    def count_since(self, since: float) -> int:
        return len(self.outcomes(since))


def failures(outcomes: Iterable[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.error is not None]


def versions(outcomes: Iterable[Outcome]) -> Counter[int]:
    return Counter(o.version for o in outcomes if o.version is not None)


def describe_failures(outcomes: Iterable[Outcome], origin: float) -> str:
    bad = failures(outcomes)
    kinds = Counter((o.error or "").split(":")[0] for o in bad)
    first = [f"+{o.start - origin:.2f}s {o.error}" for o in bad[:10]]
    return f"{len(bad)} failed ({dict(kinds)}): " + "; ".join(first)


def split_tolerance(share: float, n: int, sigmas: float = 5.0) -> float:
    """Half-width of the band a measured share of ``n`` independent draws stays within, ``sigmas``
    binomial standard deviations around ``share`` (5: a correct split falls outside about once in
    1.7 million measurements). kube-proxy's iptables rules pick a backend per connection with
    probability 1/endpoints, so a request lands on the canary with probability canary/(all pods)."""
    return sigmas * math.sqrt(share * (1 - share) / n)


QUIET_SECONDS = 5.0  # an EndpointSlice change kube-proxy has not queued by then is none it routes by


def kube_proxy_caught_up(metrics_url: str, changed: float) -> bool:
    """Whether kube-proxy has written every rules sync it queued, with no endpoint change pending,
    and has queued one at or after ``changed`` (epoch seconds, the EndpointSlices' last change), or,
    ``QUIET_SECONDS`` after it, none was due (a slice rewrite that changes nothing kube-proxy routes
    by queues no sync): new connections then follow the endpoints as they were at ``changed``."""
    try:
        resp = urllib3.request("GET", metrics_url, timeout=2.0)
    except urllib3.exceptions.HTTPError:
        return False
    values: dict[str, float] = {}
    for line in resp.data.decode().splitlines():
        series, _, value = line.rpartition(" ")
        name, _, labels = series.partition("{")
        # the IPv4 series (kube-proxy writes one per IP family), or the unlabelled gauge
        if name.startswith("kubeproxy_sync_proxy_rules_") and (not labels or 'ip_family="IPv4"' in labels):
            values[name] = float(value)
    last = values.get("kubeproxy_sync_proxy_rules_last_timestamp_seconds")
    queued = values.get("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds")
    pending = values.get("kubeproxy_sync_proxy_rules_endpoint_changes_pending")
    if last is None or queued is None or pending != 0 or last < queued:
        return False
    return queued >= changed or time.time() >= changed + QUIET_SECONDS
