"""Model repositories of the real tier: one python-backend model, ``versioned``, whose versions
each behave as a test needs. Every version that answers multiplies its input by its own version
number (read from Triton's ``model_version`` argument, not written into the file), so an answer
says exactly which version directory Triton served.

Behaviours of a version:
  ``answer``  : answers correctly;
  ``fail_load``: ``initialize`` raises (the model never becomes ready);
  ``errors``  : fails every other batch of requests (Triton counts them as failures);
  ``slow``    : answers correctly, half a second late.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODEL = "versioned"

_COMMON = """
import time

import numpy as np
import triton_python_backend_utils as pb_utils


def _answer(request, factor):
    x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
    return pb_utils.InferenceResponse([pb_utils.Tensor("OUT", (x * factor).astype(np.float32))])
"""

SOURCES = {
    "answer": _COMMON
    + """

class TritonPythonModel:
    def initialize(self, args):
        self.factor = float(args["model_version"])

    def execute(self, requests):
        return [_answer(r, self.factor) for r in requests]
""",
    "fail_load": _COMMON
    + """

class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("weights of version " + args["model_version"] + " are corrupt (test)")

    def execute(self, requests):
        return []
""",
    "errors": _COMMON
    + """

class TritonPythonModel:
    def initialize(self, args):
        self.factor = float(args["model_version"])
        self.calls = 0

    def execute(self, requests):
        # Raised, not returned as an error response: Triton 2.51 counts a returned error response
        # as a success in nv_inference_request_success (measured), a raise as a failure.
        self.calls += 1
        if self.calls % 2:
            raise pb_utils.TritonModelException("bad answer (test)")
        return [_answer(r, self.factor) for r in requests]
""",
    "slow": _COMMON
    + """

class TritonPythonModel:
    def initialize(self, args):
        self.factor = float(args["model_version"])

    def execute(self, requests):
        time.sleep(0.5)
        return [_answer(r, self.factor) for r in requests]
""",
}

# The model's own config.pbtxt (for repositories that carry one; otherwise spec.model.config renders it).
CONFIG_PBTXT = f"""name: "{MODEL}"
backend: "python"
max_batch_size: 8
input [{{ name: "X" data_type: TYPE_FP32 dims: [ 3 ] }}]
output [{{ name: "OUT" data_type: TYPE_FP32 dims: [ 3 ] }}]
instance_group [{{ kind: KIND_CPU count: 1 }}]
"""

# The same model as spec.model.config (rendered by the operator into config.pbtxt).
SPEC_CONFIG: dict[str, Any] = {
    "maxBatchSize": 8,
    "inputs": [{"name": "X", "dataType": "TYPE_FP32", "dims": [3]}],
    "outputs": [{"name": "OUT", "dataType": "TYPE_FP32", "dims": [3]}],
    "instanceGroups": [{"kind": "KIND_CPU", "count": 1}],
}


def write_repository(root: Path, versions: dict[int, str], *, with_config: bool = False) -> Path:
    """``root/versioned/<v>/model.py`` for each version with its behaviour; with ``with_config`` the
    repository also holds ``versioned/config.pbtxt``. Returns ``root``."""
    model_dir = root / MODEL
    for version, behaviour in versions.items():
        (model_dir / str(version)).mkdir(parents=True, exist_ok=True)
        (model_dir / str(version) / "model.py").write_text(SOURCES[behaviour])
    if with_config:
        (model_dir / "config.pbtxt").write_text(CONFIG_PBTXT)
    return root
