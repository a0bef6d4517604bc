"""The one rule for when a local server of ``hack/`` (triton, prometheus, s3server, the storage
emulators) cannot be had. The tests import those as the package they are: ``from hack import triton``
(pyproject's pytest ``pythonpath`` puts the repository root on ``sys.path``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def unavailable(reason: str, required_by: tuple[str, ...] = ("MODELDEPLOY_REQUIRE_TRITON",)) -> NoReturn:
    """Skip with ``reason``, or fail with it where one of ``required_by`` is set (CI sets them): a
    required tier that cannot run is a failure, not a skip."""
    required = [env for env in required_by if os.environ.get(env, "").strip().lower() in ("1", "true", "yes")]
    if required:
        pytest.fail(f"required ({', '.join(required)}) but unavailable: {reason}", pytrace=False)
    pytest.skip(reason)
