"""A Python environment with the operator's runtime dependencies only, for measuring the operator.

The development venv has the test and plugin extras too (the official Kubernetes client among
them), and kopf imports whichever Kubernetes client libraries are installed: an operator started
from it carries the official client's modules (10 MiB of RSS at start, measured), which the
shipped operator (``pip install .``, no extras: the Dockerfile and ``hack/images.py``) never
loads. ``make bench`` therefore starts the operator from this environment: a venv with exactly
the versions of the project's runtime requirements (and theirs) that the development venv has
(:func:`images.pinned_requirements`, the set the operator image gets), and the package from the
source tree on ``PYTHONPATH``, so the code measured is the code checked out.

The venv is cached under ``$MODELDEPLOY_CACHE/runtime-venv-<hash16>``, the hash over the pins and
the Python version; it is built once (``pip install`` of the pins, which needs PyPI or a pip
cache) and marked complete only when the install succeeded.

CLI::

    python -m hack.runtimeenv        # builds it if needed, prints its python
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from hack.images import pinned_requirements
from hack.procutil import cache_dir, file_lock

REPO = Path(__file__).resolve().parents[1]
COMPLETE = ".modeldeploy-complete"


def runtime_key(pins: list[str]) -> str:
    text = "\n".join([sys.version, *pins])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def runtime_python(project: Path = REPO) -> Path:
    """The interpreter of the runtime-only venv, built on first use."""
    pins = pinned_requirements(project)
    venv = cache_dir() / f"runtime-venv-{runtime_key(pins)}"
    python = venv / "bin" / "python"
    if (venv / COMPLETE).exists():
        return python
    cache_dir().mkdir(parents=True, exist_ok=True)
    with file_lock(cache_dir() / "runtime-venv.lock"):
        if (venv / COMPLETE).exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)  # an earlier attempt that did not finish
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *pins],
            check=True,
            timeout=1800,
            env=env,
        )
        (venv / COMPLETE).write_text("\n".join(pins) + "\n")
    return python


def runtime_env(project: Path = REPO) -> dict[str, str]:
    """Environment additions that make the runtime venv run the checked-out package."""
    return {"PYTHONPATH": str(project / "operator")}


if __name__ == "__main__":
    print(runtime_python())
