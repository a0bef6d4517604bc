"""The local servers of ``hack/`` (triton, prometheus, s3server), imported by the tests that need them,
and the one rule for when such a server cannot be had."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_hack(name: str) -> ModuleType:
    """``hack/<name>.py`` under a private module name (``triton`` is also a PyPI package); one module
    object per session, whichever test imports it first."""
    mod_name = f"modeldeploy_hack_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, REPO_ROOT / "hack" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    return module


def unavailable(reason: str, required_by: tuple[str, ...] = ("MODELDEPLOY_REQUIRE_TRITON",)) -> NoReturn:
    """Skip with ``reason``, or fail with it where one of ``required_by`` is set (CI sets them): a
    required tier that cannot run is a failure, not a skip."""
    required = [env for env in required_by if os.environ.get(env, "").strip().lower() in ("1", "true", "yes")]
    if required:
        pytest.fail(f"required ({', '.join(required)}) but unavailable: {reason}", pytrace=False)
    pytest.skip(reason)
