"""What one worker pod of a BatchInference does with one shard: read its records, score them in
batches with a bounded number of requests in flight, write its results and errors.

A shard's outputs are written whole, errors first, results second, and a small commit marker
(``done/part-NNNNN.json``: its record counts) last. Each is one PUT, which an object store makes
visible complete or not at all; a shard is done once its marker exists, and a worker that starts
again (the pod killed, the node lost) skips done shards and redoes the others from the beginning,
overwriting whatever half of them was written. Every record is then answered exactly once.

Inference goes through ``infer``: one request for a batch of records, one output dict per record.
It raises :class:`Rejected` when the server refused the request's data (an HTTP 400: a record the
model cannot take); the batch is then split in halves until the records it refuses are found, and
those go to the errors file. Any other exception (the server unreachable, a timeout) fails the
shard, to be tried again.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import obstore

from .. import api
from . import records, shards

#: One inference request: a batch of parsed records -> one {output name: tensor} per record.
Infer = Callable[[list[dict[str, records.Tensor]]], Awaitable[list[dict[str, Any]]]]

DONE_DIR = "done"


class EncodedOutputs(str):
    """A record's outputs already encoded as a JSON object (``infer`` may answer with these): written
    into its result line as they are."""


class Rejected(Exception):
    """The inference server refused the request's data (not a failure of the server)."""


@dataclass(frozen=True)
class ShardOutcome:
    index: int
    records: int
    failed: int
    skipped: bool = False  # done before: nothing was read or sent


def done_key(prefix: str, shard: shards.Shard) -> str:
    return shards._join(prefix, DONE_DIR, f"part-{shard.index:05d}.json")


async def run_shard(
    shard: shards.Shard,
    *,
    source: Any,
    sink: Any,
    inputs: list[api.TensorSpec],
    infer: Infer,
    batch_size: int,
    concurrency: int,
    out_prefix: str = "",
    fmt: str = "jsonl",
    gate: asyncio.Semaphore | None = None,
) -> ShardOutcome:
    """Score one shard from ``source`` (an obstore store holding the input objects) into ``sink``
    (one rooted at the output location), unless it is done already."""
    marker = done_key(out_prefix, shard)
    if await _exists(sink, marker):
        counts = json.loads(bytes(await (await obstore.get_async(sink, marker)).bytes_async()))
        return ShardOutcome(shard.index, counts["records"], counts["failed"], skipped=True)
    rows: Callable[[int], int] | None = None  # .npy: the row of a byte offset, for the results
    if fmt == "npy":
        parsed, errors, rows = await _read_npy(shard, source, inputs)
    else:
        parsed, errors = await _read_jsonl(shard, source, inputs)
    results: dict[int, dict[str, Any]] = {}
    gate = gate or asyncio.Semaphore(concurrency)  # shared by the shards under way at once

    async def score(batch: list[tuple[int, dict[str, records.Tensor]]]) -> None:
        try:
            async with gate:
                outputs = await infer([r for _, r in batch])
        except Rejected as exc:
            if len(batch) == 1:
                errors.append(_error(shard, batch[0][0], f"refused by the inference server: {exc}"))
                return
            half = len(batch) // 2
            await asyncio.gather(score(batch[:half]), score(batch[half:]))
            return
        if len(outputs) != len(batch):
            raise RuntimeError(f"{len(batch)} records sent, {len(outputs)} answers")
        for (offset, _), out in zip(batch, outputs, strict=True):
            results[offset] = {"key": shard.key, "offset": offset, "outputs": out}
            if rows is not None:
                results[offset]["row"] = rows(offset)

    await asyncio.gather(*(score(parsed[i : i + batch_size]) for i in range(0, len(parsed), batch_size)))

    errors.sort(key=lambda e: int(e["offset"]))
    await obstore.put_async(sink, shards.errors_key(out_prefix, shard), _jsonl(errors))
    await obstore.put_async(
        sink,
        shards.results_key(out_prefix, shard),
        b"".join(_result_line(results[o]) for o in sorted(results)),
    )
    counts = {"shard": shard.index, "key": shard.key, "records": len(results), "failed": len(errors)}
    await obstore.put_async(sink, marker, json.dumps(counts).encode())
    return ShardOutcome(shard.index, len(results), len(errors))


async def done_counts(sink: Any, shards_in_plan: int, out_prefix: str = "") -> dict[int, dict[str, Any]]:
    """The counts of every done shard (its marker), by shard index; markers of shards past the plan
    (an output location reused with another plan) are not counted."""
    prefix = shards._join(out_prefix, DONE_DIR)
    keys = [
        m["path"]
        for batch in obstore.list(sink, prefix=prefix or None)
        for m in batch
        if m["path"].rsplit("/", 1)[-1].startswith("part-")
    ]

    async def read(key: str) -> dict[str, Any]:
        return dict(json.loads(bytes(await (await obstore.get_async(sink, key)).bytes_async())))

    counts = await asyncio.gather(*(read(k) for k in keys))
    return {int(c["shard"]): c for c in counts if 0 <= int(c["shard"]) < shards_in_plan}


Parsed = list[tuple[int, dict[str, records.Tensor]]]


async def _read_jsonl(
    shard: shards.Shard, source: Any, inputs: list[api.TensorSpec]
) -> tuple[Parsed, list[dict[str, Any]]]:
    """The shard's lines, each parsed as a record (or an error at its byte offset)."""
    size = (await obstore.head_async(source, shard.key))["size"]
    begin, end = shards.read_range(shard, size)
    data = (
        bytes(await obstore.get_range_async(source, shard.key, start=begin, end=end)) if end > begin else b""
    )
    found = list(shards.lines(shard, data, begin, size))
    if all(line is not None for _, line in found):
        many = records.parse_many([line for _, line in found if line is not None], inputs)
        if many is not None:
            return [(offset, r) for (offset, _), r in zip(found, many, strict=True)], []
    parsed: Parsed = []
    errors: list[dict[str, Any]] = []
    for offset, line in found:
        if line is None:
            errors.append(_error(shard, offset, f"record longer than {shards.MAX_RECORD_BYTES} bytes"))
            continue
        try:
            parsed.append((offset, records.parse(line, inputs)))
        except records.RecordError as exc:
            errors.append(_error(shard, offset, str(exc)))
    return parsed, errors


async def npy_layout(source: Any, key: str) -> records.NpyLayout:
    size = (await obstore.head_async(source, key))["size"]
    head = await obstore.get_range_async(source, key, start=0, end=min(size, records.NPY_HEAD_BYTES))
    layout = records.npy_layout(bytes(head))
    if layout.header + layout.rows * layout.row_bytes > size:
        raise records.RecordError(f"the .npy object is cut short: {size} bytes for {layout.rows} rows")
    return layout


async def _read_npy(
    shard: shards.Shard, source: Any, inputs: list[api.TensorSpec]
) -> tuple[Parsed, list[dict[str, Any]], Callable[[int], int]]:
    """The shard's rows of an .npy object as records of the model's one input. An object that is not
    a fitting array is one error (at the shard's start): its rows cannot be told apart."""
    try:
        layout = await npy_layout(source, shard.key)
        if len(inputs) != 1:
            raise records.RecordError(
                f".npy input needs a model with one input, this one takes {len(inputs)}"
            )
        records.npy_fits(layout, inputs[0])
    except records.RecordError as exc:
        return [], [_error(shard, shard.start, str(exc))], lambda offset: 0
    first, end = shards.npy_rows(shard, layout.header, layout.row_bytes, layout.rows)

    def offset_of(row: int) -> int:
        return layout.header + row * layout.row_bytes

    data = b""
    if end > first:
        data = bytes(
            await obstore.get_range_async(source, shard.key, start=offset_of(first), end=offset_of(end))
        )
    rows = records.npy_records(data, layout, inputs[0])
    parsed = [(offset_of(first + i), r) for i, r in enumerate(rows)]
    return parsed, [], lambda offset: (offset - layout.header) // layout.row_bytes


def _error(shard: shards.Shard, offset: int, reason: str) -> dict[str, Any]:
    return {"key": shard.key, "offset": offset, "reason": reason}


def _result_line(r: dict[str, Any]) -> bytes:
    out = r["outputs"]
    if not isinstance(out, EncodedOutputs):
        return json.dumps(r, separators=(",", ":")).encode() + b"\n"
    row = f',"row":{r["row"]}' if "row" in r else ""
    return f'{{"key":{json.dumps(r["key"])},"offset":{r["offset"]},"outputs":{out}{row}}}\n'.encode()


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in rows)


async def _exists(store: Any, key: str) -> bool:
    try:
        await obstore.head_async(store, key)
    except FileNotFoundError:
        return False
    return True
