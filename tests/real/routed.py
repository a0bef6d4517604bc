"""Wait until a ModelDeployment's main Service really routes to what its endpoints say (helper of
``test_real_pod_analysis.py`` and ``test_versions.py``).

The endpoints being right is not enough: kube-proxy writes its rules after it sees the
EndpointSlices, and until then new connections go where they went before (or are refused). Where
one version alone should answer, this asks the data plane itself instead of kube-proxy's sync
metrics: requests through the Service, one new connection each, until a run of them is answered by
that version.
"""

from __future__ import annotations

from typing import Any

from models import MODEL
from traffic import infer_once

from kube import wait_for


def routed(md: Any, expected: dict[int, int], version: int, streak: int = 20, timeout: float = 90) -> None:
    """The main Service's ready endpoints are ``expected`` (revision -> count), and ``streak``
    requests in a row through it (one new connection each) are answered by model ``version``."""
    wait_for(
        lambda: md.endpoints_by_revision() == expected,
        timeout,
        interval=0.2,
        message=lambda: f"endpoints {expected}, have {md.endpoints_by_revision()}",
    )
    host, port = md.service_address()
    run: list[Any] = []

    def answered() -> bool:
        outcome = infer_once(host, port, MODEL)
        if outcome.version != version:
            run.clear()
        run.append(outcome)
        return outcome.version == version and len(run) >= streak

    wait_for(
        answered,
        timeout,
        interval=0.05,
        message=lambda: f"{streak} answers in a row by version {version}; last: {run[-1] if run else None}",
    )
