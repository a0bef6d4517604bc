"""``modeldeploy batch-worker``: the main container of a BatchInference pod.

It plans the shards from the input listing (the operator's plan, recomputed: same objects, same
size, same numbers), takes every ``--workers``-th one from its Indexed Job completion index
(``JOB_COMPLETION_INDEX``), and scores each with the Triton beside it in the pod, through
tritonclient's asyncio HTTP client. The model's inputs and batch limit come from Triton's own
metadata and config of the loaded model: what is loaded is what the records must fit.

The last line it prints is its summary (shards, records, failed records), or why it stopped; the
pod's termination message carries it to the operator.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import obstore

from .. import api
from ..triton import staging
from . import records, shards, worker

#: Triton (KServe v2) datatype -> the config data type of api.TensorSpec.
_CONFIG_TYPE = {v: k for k, v in records.V2_TYPE.items()}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="s3://bucket/prefix of the records")
    p.add_argument("--output", required=True, help="s3://bucket/prefix for results, errors, markers")
    p.add_argument("--format", default="jsonl", choices=["jsonl"])
    p.add_argument("--shard-bytes", type=int, required=True)
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--index", type=int, default=None, help="default: $JOB_COMPLETION_INDEX")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--retries", type=int, default=3, help="tries of a shard after its first")
    p.add_argument("--model", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--triton", default="http://127.0.0.1:8000")
    p.add_argument("--input-credentials-dir", type=Path, default=None)
    p.add_argument("--output-credentials-dir", type=Path, default=None)


class Triton:
    """One Triton model version through tritonclient's asyncio HTTP client."""

    def __init__(self, url: str, model: str, version: str) -> None:
        from tritonclient.http.aio import InferenceServerClient

        self.client = InferenceServerClient(url.removeprefix("http://"))
        self.model, self.version = model, version
        self.inputs: list[api.TensorSpec] = []
        self.outputs: list[str] = []
        self.max_batch = 0

    async def load_signature(self) -> None:
        meta = await self.client.get_model_metadata(self.model, self.version)
        config = await self.client.get_model_config(self.model, self.version)
        self.max_batch = int(config.get("max_batch_size", 0))
        skip = 1 if self.max_batch > 0 else 0  # metadata shapes carry the batch dimension first
        self.inputs = [
            api.TensorSpec.model_validate(
                {"name": t["name"], "dataType": _CONFIG_TYPE[t["datatype"]], "dims": t["shape"][skip:] or [1]}
            )
            for t in meta["inputs"]
        ]
        self.outputs = [t["name"] for t in meta["outputs"]]

    async def infer(self, batch: list[dict[str, records.Tensor]]) -> list[dict[str, Any]]:
        """One request for records of the same shapes (a model without batching: one record)."""
        import numpy as np
        from tritonclient.http import InferInput, InferRequestedOutput
        from tritonclient.utils import InferenceServerException

        if self.max_batch <= 0 and len(batch) > 1:
            return [out for r in batch for out in await self.infer([r])]
        if len({tuple(t.shape for t in r.values()) for r in batch}) > 1:  # variable dims differ
            return [out for r in batch for out in await self.infer([r])]
        request = []
        for spec in self.inputs:
            first = batch[0][spec.name]
            dtype = object if first.datatype == "BYTES" else _numpy_type(first.datatype)
            array = np.array([r[spec.name].data for r in batch], dtype=dtype).reshape(
                ((len(batch),) if self.max_batch > 0 else ()) + first.shape
            )
            tensor = InferInput(spec.name, list(array.shape), first.datatype)
            tensor.set_data_from_numpy(array, binary_data=True)
            request.append(tensor)
        wanted = [InferRequestedOutput(name, binary_data=True) for name in self.outputs]
        try:
            result = await self.client.infer(self.model, request, model_version=self.version, outputs=wanted)
        except InferenceServerException as exc:
            if str(exc.status()) == "400":
                raise worker.Rejected(exc.message()) from None
            raise
        arrays = {name: result.as_numpy(name) for name in self.outputs}
        types = {name: result.get_output(name)["datatype"] for name in self.outputs}
        per_record = []
        for i in range(len(batch)):
            out = {}
            for name, arr in arrays.items():
                value = arr[i] if self.max_batch > 0 else arr
                out[name] = {"datatype": types[name], "shape": list(value.shape), "data": _plain(value)}
            per_record.append(out)
        return per_record

    async def close(self) -> None:
        await self.client.close()


def _numpy_type(datatype: str) -> Any:
    import numpy as np

    return {"BOOL": np.bool_, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}.get(
        datatype, getattr(np, datatype.lower(), None)
    )


def _plain(value: Any) -> Any:
    flat = value.reshape(-1).tolist()
    if value.dtype.kind != "O":  # numbers: tolist() gave Python numbers already
        return flat
    return [v.decode() if isinstance(v, bytes) else v for v in flat]


def input_objects(store: Any) -> Iterator[shards.InputObject]:
    for batch in obstore.list(store):
        for meta in batch:
            yield shards.InputObject(meta["path"], int(meta["size"]))


async def run(
    *,
    source: Any,
    sink: Any,
    triton: Triton,
    shard_bytes: int,
    index: int,
    workers: int,
    concurrency: int,
    batch_size: int,
    retries: int,
) -> list[worker.ShardOutcome]:
    """Every shard of this worker, each tried up to ``retries`` more times."""
    plan = shards.plan(list(input_objects(source)), shard_bytes)
    await triton.load_signature()
    out = []
    for shard in shards.assigned(plan, index, workers):
        for attempt in range(retries + 1):
            try:
                outcome = await worker.run_shard(
                    shard,
                    source=source,
                    sink=sink,
                    inputs=triton.inputs,
                    infer=triton.infer,
                    batch_size=batch_size if triton.max_batch <= 0 else min(batch_size, triton.max_batch),
                    concurrency=concurrency,
                )
            except Exception as exc:
                if attempt == retries:
                    raise
                print(f"shard {shard.index}: try {attempt + 1} failed ({exc}); trying again", flush=True)
                await asyncio.sleep(min(30.0, 2.0**attempt))
            else:
                out.append(outcome)
                break
    return out


async def run_with_triton(url: str, model: str, version: str, **kwargs: Any) -> list[worker.ShardOutcome]:
    """:func:`run` with a client of the Triton at ``url``, closed afterwards."""
    triton = Triton(url, model, version)
    try:
        return await run(triton=triton, **kwargs)
    finally:
        await triton.close()


def main(args: argparse.Namespace) -> int:
    index = args.index if args.index is not None else int(os.environ.get("JOB_COMPLETION_INDEX", "0"))
    source_settings = staging.Settings(credentials_dir=args.input_credentials_dir, environ=os.environ)
    sink_settings = staging.Settings(credentials_dir=args.output_credentials_dir, environ=os.environ)
    try:
        source = staging.open_store(args.input, source_settings).store
        sink = staging.open_store(args.output, sink_settings).store
    except staging.StageError as exc:
        print(f"batch-worker: {source_settings.scrub(sink_settings.scrub(str(exc)))}", file=sys.stderr)
        return 2

    async def go() -> list[worker.ShardOutcome]:
        return await run_with_triton(
            args.triton,
            args.model,
            args.version,
            source=source,
            sink=sink,
            shard_bytes=args.shard_bytes,
            index=index,
            workers=args.workers,
            concurrency=args.concurrency,
            batch_size=args.batch_size,
            retries=args.retries,
        )

    t0 = time.monotonic()
    try:
        outcomes = asyncio.run(go())
    except Exception as exc:
        message = source_settings.scrub(sink_settings.scrub(f"{type(exc).__name__}: {exc}"))
        print(f"batch-worker {index}: stopped: {message}", file=sys.stderr)
        return 1
    summary = {
        "worker": index,
        "shards": len(outcomes),
        "records": sum(o.records for o in outcomes),
        "failed": sum(o.failed for o in outcomes),
        "skipped": sum(o.skipped for o in outcomes),
        "seconds": round(time.monotonic() - t0, 3),
    }
    print(json.dumps(summary), flush=True)
    return 0
