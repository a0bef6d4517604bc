"""The python-backend models the Triton, cluster and real tiers write into model repositories, one
source each. Every function returns the text of a ``model.py``; the caller writes it into
``<repo>/<model>/<version>/model.py``. (The real tier's versioned model, whose versions each
behave differently, is tests/real/models.py.)"""

from __future__ import annotations

from typing import Any

_SCALER = """
import numpy as np
import triton_python_backend_utils as pb_utils

FACTOR = {factor!r}


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "{input}").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("{output}", x * FACTOR)]))
        return responses
"""


def inline_python_model(name: str, *, dims: int, max_batch: int, secret: str = "s3") -> dict[str, Any]:
    """A BatchInference's or ModelDeployment's ``model``: version 1 of python-backend model ``name``
    under s3://models/repo, FP32 input ``X`` and output ``Y`` of ``dims`` values, one CPU instance."""
    return {
        "name": name,
        "format": "python",
        "storageUri": "s3://models/repo",
        "version": 1,
        "credentialsSecret": secret,
        "config": {
            "maxBatchSize": max_batch,
            "inputs": [{"name": "X", "dataType": "TYPE_FP32", "dims": [dims]}],
            "outputs": [{"name": "Y", "dataType": "TYPE_FP32", "dims": [dims]}],
            "instanceGroups": [{"kind": "KIND_CPU", "count": 1}],
        },
    }


def scaler_py(factor: float, *, input: str = "X", output: str = "Y") -> str:
    """``output = input * factor`` (an FP32 input stays FP32: the factor is a Python scalar)."""
    return _SCALER.format(factor=factor, input=input, output=output)


_FLAKY = """
import time

import triton_python_backend_utils as pb_utils

FAIL_EVERY = {fail_every!r}
SLEEP = {sleep!r}


class TritonPythonModel:
    def initialize(self, args):
        self.n = 0

    def execute(self, requests):
        responses = []
        for request in requests:
            self.n += 1
            if SLEEP:
                time.sleep(SLEEP)
            if FAIL_EVERY and self.n % FAIL_EVERY == 0:
                # Raised, not returned as an error response: Triton 2.51 counts a returned error
                # response as a success in nv_inference_request_success, a raise as a failure.
                raise pb_utils.TritonModelException(f"request {{self.n}} fails on purpose")
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", x * 2)]))
        return responses
"""


def flaky_py(*, fail_every: int = 0, sleep: float = 0) -> str:
    """``Y = X * 2``; every ``fail_every``-th request fails (0: none), each waits ``sleep`` seconds."""
    return _FLAKY.format(fail_every=fail_every, sleep=sleep)


_BROKEN = """
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError({message!r})

    def execute(self, requests):
        return []
"""


def broken_py(message: str = "weights file is corrupt (test)") -> str:
    """A model that never loads: ``initialize`` raises ``RuntimeError(message)``."""
    return _BROKEN.format(message=message)
