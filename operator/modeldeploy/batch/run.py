"""``modeldeploy batch-worker``: the main container of a BatchInference pod.

It plans the shards from the input listing (the operator's plan, recomputed: same objects, same
size, same numbers), takes every ``--workers``-th one from its Indexed Job completion index
(``JOB_COMPLETION_INDEX``), and scores each with the Triton beside it in the pod, through
tritonclient's asyncio HTTP client. The model's inputs and batch limit come from Triton's own
metadata and config of the loaded model: what is loaded is what the records must fit.

Before any shard it checks what would make every shard fail: the input lists and is not empty, the
output takes a write, and the first records fit the loaded model's inputs. Any of those failing is not
worth a retry: it exits with :data:`EXIT_INVALID`. A job over its failed-record budget exits with
:data:`EXIT_TOO_MANY_FAILED`. The Job's pod failure policy fails the whole Job on either; any other
failure (Triton or storage gone for a while) exits 1 and the pod is tried again, skipping done shards.

Its summary, or why it stopped, is one JSON object (:class:`Report`) written to the termination
message file: the operator reads it from the pod's status (it has no storage credentials itself).
The worker that finds every shard of the plan done writes the manifest (any worker may: it is made
from the done markers alone, so two writing it at once write the same bytes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import obstore

from .. import api
from ..triton import staging
from . import api as bapi
from . import records, shards, worker

#: Exit codes the Job's pod failure policy fails the whole Job on (no retry helps).
EXIT_INVALID = 2
EXIT_TOO_MANY_FAILED = 3
#: How many of the first records are parsed before any shard: none fitting the model stops the job.
SCHEMA_SAMPLE_RECORDS = 16
SCHEMA_SAMPLE_BYTES = 256 * 1024
TERMINATION_LOG = "/dev/termination-log"
#: Shards a worker has under way at once (the next one read and parsed while this one is answered).
SHARDS_AHEAD = 2
#: Where a running worker serves its report so far (the operator reads it for status.progress).
PROGRESS_PORT = 8090

#: Triton (KServe v2) datatype -> the config data type of api.TensorSpec.
_CONFIG_TYPE = {v: k for k, v in records.V2_TYPE.items()}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="s3://bucket/prefix of the records")
    p.add_argument("--output", required=True, help="s3://bucket/prefix for results, errors, markers")
    p.add_argument("--format", default="jsonl", choices=["jsonl", "npy"])
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
    p.add_argument("--max-failed", default="0", help='failed records before the job fails: "100" or "0.5%%"')
    p.add_argument("--termination-log", type=Path, default=Path(TERMINATION_LOG))
    p.add_argument(
        "--check",
        action="store_true",
        help="preflight (an init container, before Triton starts): input, output and, with --inputs, "
        "the first records against the model's inputs; nothing is scored",
    )
    p.add_argument("--inputs", default=None, help="the model's inputs (JSON list of TensorSpec), for --check")
    p.add_argument(
        "--progress-port", type=int, default=PROGRESS_PORT, help="serve the report so far on GET / (0: off)"
    )


class Stop(Exception):
    """The job cannot succeed: ``reason`` (a CamelCase word for the status) and why."""

    def __init__(self, reason: str, message: str, code: int = EXIT_INVALID) -> None:
        super().__init__(message)
        self.reason, self.code = reason, code


@dataclass
class Report:
    """What a worker tells the operator through its termination message (kept under 4 KiB)."""

    worker: int
    plan: int = 0  # shards in the whole plan
    shards: int = 0  # this worker's shards done (including those done before it started)
    assigned: int = 0
    records: int = 0
    failed: int = 0
    started: float = 0.0  # Unix time the worker began (listing, checks, shards, manifest)
    seconds: float = 0.0  # how long that took
    manifest: str | None = None
    reason: str | None = None
    message: str | None = None
    totals: dict[str, int] = field(default_factory=dict)  # the manifest's, once all shards are done
    #: Shards that failed every try in this worker (it then exits 1 and the Job tries the index again).
    failed_shards: list[int] = field(default_factory=list)

    def dump(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v not in (None, {}, [])})[:4000]


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
        variable = any(-1 in spec.dims for spec in self.inputs)  # else every record has the dims
        if variable and len({tuple(t.shape for t in r.values()) for r in batch}) > 1:
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
        columns = []
        for name in self.outputs:
            arr = result.as_numpy(name)
            if self.max_batch <= 0:
                arr = arr[None]  # one record
            columns.append(
                (name, result.get_output(name)["datatype"], arr.reshape(len(arr), -1), arr.shape[1:])
            )
        if all(rows.dtype.kind in "biuf" for _, _, rows, _ in columns):
            return _encoded(columns, len(batch))  # type: ignore[return-value]
        out = []
        for i in range(len(batch)):
            out.append(
                {
                    name: {"datatype": t, "shape": list(shape), "data": _plain(rows[i])}
                    for name, t, rows, shape in columns
                }
            )
        return out

    async def close(self) -> None:
        await self.client.close()


def _encoded(columns: list[tuple[str, str, Any, tuple[int, ...]]], n: int) -> list[worker.EncodedOutputs]:
    """Each record's outputs as JSON text, from one encoding per output and batch: numbers only, so
    the rows of ``[[...],[...]]`` are split at ``],[`` (the per-record encoding was the worker's
    largest cost per record after decoding; cProfile)."""
    parts: list[list[str]] = [[] for _ in range(n)]
    for name, datatype, rows, shape in columns:
        text = json.dumps(rows.tolist(), separators=(",", ":"))
        head = f'{json.dumps(name)}:{{"datatype":"{datatype}","shape":{json.dumps(list(shape))},"data":['
        for i, row in enumerate(text[2:-2].split("],[") if n else []):
            parts[i].append(head + row + "]}")
    return [worker.EncodedOutputs("{" + ",".join(p) + "}") for p in parts]


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


async def preflight(
    *, source: Any, sink: Any, shard_bytes: int, index: int, inputs: list[api.TensorSpec] | None, fmt: str
) -> list[shards.Shard]:
    """What :func:`run` checks before any shard, without Triton (the model's inputs from its config
    in the spec, when it has one): raises :class:`Stop`; returns the plan."""
    plan = shards.plan(await _listing(source), shard_bytes)
    if not plan:
        raise Stop("InputEmpty", "no records: the input location holds no objects, or only empty ones")
    await _check_writable(sink, index)
    if inputs:
        await (_check_npy if fmt == "npy" else _check_schema)(source, plan[0], inputs)
    return plan


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
    max_failed: str = "0",
    report: Report | None = None,
    fmt: str = "jsonl",
) -> list[worker.ShardOutcome]:
    """Every shard of this worker, each tried up to ``retries`` more times. Raises :class:`Stop`
    when the job cannot succeed (checked before the first shard, and after each shard with failed
    records against ``max_failed``)."""
    report = report if report is not None else Report(index)
    plan = await preflight(
        source=source, sink=sink, shard_bytes=shard_bytes, index=index, inputs=None, fmt=fmt
    )
    await triton.load_signature()  # the inputs of the model as loaded: what the records must fit
    await (_check_npy if fmt == "npy" else _check_schema)(source, plan[0], triton.inputs)
    mine = shards.assigned(plan, index, workers)
    report.plan, report.assigned = len(plan), len(mine)
    out: list[worker.ShardOutcome] = []
    # Requests in flight are bounded across shards; the next shard is read and parsed while the
    # current one's last requests are answered (Triton and the worker each keep a core busy).
    gate, ahead = asyncio.Semaphore(concurrency), asyncio.Semaphore(SHARDS_AHEAD)

    async def one(shard: shards.Shard) -> None:
        async with ahead:
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
                        gate=gate,
                        fmt=fmt,
                    )
                except Exception as exc:
                    if attempt == retries:
                        report.failed_shards.append(shard.index)
                        raise
                    print(f"shard {shard.index}: try {attempt + 1} failed ({exc}); trying again", flush=True)
                    await asyncio.sleep(min(30.0, 2.0**attempt))
                else:
                    break
        out.append(outcome)
        report.shards, report.records, report.failed = (
            len(out),
            sum(o.records for o in out),
            sum(o.failed for o in out),
        )
        if outcome.failed and not max_failed.endswith("%"):
            done = await worker.done_counts(sink, len(plan))
            failed = sum(c["failed"] for c in done.values())
            if failed > int(max_failed):
                raise Stop(
                    "TooManyFailedRecords",
                    f"{failed} records failed so far, more than maxFailedRecords {max_failed}; "
                    "see the errors files",
                    EXIT_TOO_MANY_FAILED,
                )

    await asyncio.gather(*(one(shard) for shard in mine))
    out.sort(key=lambda o: o.index)
    await _finish(sink, plan, max_failed, report)
    return out


async def _listing(source: Any) -> list[shards.InputObject]:
    try:
        return list(input_objects(source))
    except Exception as exc:
        raise Stop("InputUnreadable", f"cannot list the input: {exc}") from None


async def _check_writable(sink: Any, index: int) -> None:
    probe = f".modeldeploy-write-check-{index}"
    try:
        await obstore.put_async(sink, probe, b"")
        await obstore.delete_async(sink, probe)
    except Exception as exc:
        raise Stop("OutputNotWritable", f"cannot write to the output location: {exc}") from None


async def _check_schema(source: Any, first: shards.Shard, inputs: list[api.TensorSpec]) -> None:
    """The first records of the input against the model's inputs: none of them fitting is a schema
    that does not match (one malformed record among good ones goes to the errors file instead)."""
    size = (await obstore.head_async(source, first.key))["size"]
    end = min(size, first.start + SCHEMA_SAMPLE_BYTES)
    data = bytes(await obstore.get_range_async(source, first.key, start=first.start, end=end))
    sample = shards.Shard(first.index, first.key, first.start, end)
    errors = []
    for n, (_, line) in enumerate(shards.lines(sample, data, first.start, end)):
        if n >= SCHEMA_SAMPLE_RECORDS or line is None:
            break
        try:
            records.parse(line, inputs)
        except records.RecordError as exc:
            errors.append(str(exc))
        else:
            return
    if errors:
        wanted = ", ".join(f"{t.name} ({t.data_type}, dims {t.dims})" for t in inputs)
        raise Stop(
            "SchemaMismatch",
            f"none of the first {len(errors)} records fits the model's inputs [{wanted}]: {errors[0]}",
        )


async def _check_npy(source: Any, first: shards.Shard, inputs: list[api.TensorSpec]) -> None:
    """The first .npy object against the model: one input, of the array's type and row shape."""
    try:
        if len(inputs) != 1:
            raise records.RecordError(
                f".npy input needs a model with one input; this one takes {len(inputs)}"
            )
        records.npy_fits(await worker.npy_layout(source, first.key), inputs[0])
    except records.RecordError as exc:
        raise Stop("SchemaMismatch", f"{first.key}: {exc}") from None


async def _finish(sink: Any, plan: list[shards.Shard], max_failed: str, report: Report) -> None:
    """If every shard of the plan is done: the manifest, and the failed-record budget on the whole."""
    done = await worker.done_counts(sink, len(plan))
    if len(done) < len(plan):
        return  # other workers still have shards: the last one to finish writes it
    records_ = sum(c["records"] for c in done.values())
    failed = sum(c["failed"] for c in done.values())
    budget = bapi.failure_budget(max_failed, records_ + failed)
    manifest = {
        "shards": len(plan),
        "records": records_,
        "failed": failed,
        "maxFailedRecords": max_failed,
        "succeeded": failed <= budget,
        "parts": [
            {
                "shard": s.index,
                "input": s.key,
                "range": [s.start, s.end],
                "results": shards.results_key("", s),
                "errors": shards.errors_key("", s),
                "records": done[s.index]["records"],
                "failed": done[s.index]["failed"],
            }
            for s in plan
        ],
    }
    await obstore.put_async(
        sink, shards.manifest_key(""), json.dumps(manifest, indent=1, sort_keys=True).encode()
    )
    report.manifest = shards.MANIFEST
    report.totals = {"shards": len(plan), "records": records_, "failed": failed}
    if failed > budget:
        raise Stop(
            "TooManyFailedRecords",
            f"{failed} of {records_ + failed} records failed, more than maxFailedRecords {max_failed}; "
            "see the errors files",
            EXIT_TOO_MANY_FAILED,
        )


async def run_with_triton(url: str, model: str, version: str, **kwargs: Any) -> list[worker.ShardOutcome]:
    """:func:`run` with a client of the Triton at ``url``, closed afterwards."""
    triton = Triton(url, model, version)
    try:
        return await run(triton=triton, **kwargs)
    finally:
        await triton.close()


async def serve_progress(report: Report, port: int, host: str = "0.0.0.0") -> asyncio.Server:
    """A minimal HTTP server answering every request with the report so far (JSON). By hand: one
    read-only answer, where an HTTP framework would add a dependency and a thread to the worker."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            body = report.dump().encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(answer, host, port)


def main(args: argparse.Namespace) -> int:
    index = args.index if args.index is not None else int(os.environ.get("JOB_COMPLETION_INDEX", "0"))
    source_settings = staging.Settings(credentials_dir=args.input_credentials_dir, environ=os.environ)
    sink_settings = staging.Settings(credentials_dir=args.output_credentials_dir, environ=os.environ)
    report = Report(index)

    def scrub(text: str) -> str:
        return source_settings.scrub(sink_settings.scrub(text))

    def finish(code: int) -> int:
        line = report.dump()
        print(line, flush=True)
        # not in a pod (a developer running it by hand): the line printed is the report
        with contextlib.suppress(OSError):
            args.termination_log.write_text(line)
        return code

    def ended(exc: Exception, unexpected: str) -> int:
        """What ended the run into the report; the exit code: a Stop's own, 1 for anything else
        (storage or Triton gone for a while: the Job tries the pod again)."""
        if isinstance(exc, Stop):
            report.reason, report.message = exc.reason, scrub(str(exc))
            return exc.code
        report.reason, report.message = unexpected, scrub(f"{type(exc).__name__}: {exc}")
        return 1

    try:
        source = staging.open_store(args.input, source_settings).store
        sink = staging.open_store(args.output, sink_settings).store
    except staging.StageError as exc:
        report.reason, report.message = "StorageUnusable", scrub(str(exc))
        return finish(EXIT_INVALID)

    if args.check:
        inputs = None
        if args.inputs:
            inputs = [api.TensorSpec.model_validate(t) for t in json.loads(args.inputs)]

        async def check() -> None:
            report.plan = len(
                await preflight(
                    source=source,
                    sink=sink,
                    shard_bytes=args.shard_bytes,
                    index=index,
                    inputs=inputs,
                    fmt=args.format,
                )
            )

        try:
            asyncio.run(check())
        except Exception as exc:
            return finish(ended(exc, "PreflightError"))
        return finish(0)

    async def go() -> list[worker.ShardOutcome]:
        server = await serve_progress(report, args.progress_port) if args.progress_port else None
        try:
            return await _go()
        finally:
            if server is not None:
                server.close()

    async def _go() -> list[worker.ShardOutcome]:
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
            max_failed=args.max_failed,
            report=report,
            fmt=args.format,
        )

    t0 = time.monotonic()
    report.started = round(time.time(), 3)
    code = 0
    try:
        asyncio.run(go())
    except Exception as exc:
        code = ended(exc, "WorkerError")
    report.seconds = round(time.monotonic() - t0, 3)
    return finish(code)
