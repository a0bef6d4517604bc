"""The .npy input format: an array's rows split by byte ranges like lines (each row in exactly one
shard, whatever the shard size), its layout read from the header, and a worker scoring the rows of a
one-input model; what cannot be model input said plainly."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import numpy as np
import obstore
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from obstore.store import MemoryStore

from modeldeploy import api
from modeldeploy.batch import records, run, shards

SPEC = api.TensorSpec(name="X", data_type="TYPE_FP32", dims=[3])


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(0, 60), cols=st.integers(1, 5), shard_bytes=st.integers(1, 400))
def test_every_row_belongs_to_exactly_one_shard(rows: int, cols: int, shard_bytes: int) -> None:
    body = npy(np.zeros((rows, cols), dtype=np.int16))
    layout = records.npy_layout(body)
    plan = shards.plan([shards.InputObject("a.npy", len(body))], shard_bytes)
    got = [r for s in plan for r in range(*shards.npy_rows(s, layout.header, layout.row_bytes, layout.rows))]
    assert got == list(range(rows))


def test_layout_of_arrays_and_what_is_refused() -> None:
    layout = records.npy_layout(npy(np.ones((7, 2, 3), dtype=">f4")))
    assert (layout.rows, layout.row_shape, layout.datatype, layout.row_bytes) == (7, (2, 3), "FP32", 24)
    for array, why in (
        (np.asfortranarray(np.ones((4, 3), dtype=np.float32)), "Fortran-ordered"),
        (np.array(["a", "b"]), "cannot be model input"),
        (np.float32(1.0), "0-d"),
    ):
        with pytest.raises(records.RecordError, match=why):
            records.npy_layout(npy(np.asarray(array)))
    with pytest.raises(records.RecordError, match=r"not an \.npy array"):
        records.npy_layout(b'{"X": [1, 2, 3]}\n')
    with pytest.raises(records.RecordError, match="an array of FP64, the model takes FP32"):
        records.npy_fits(records.npy_layout(npy(np.ones((2, 3)))), SPEC)
    with pytest.raises(records.RecordError, match=r"shape \[4\], the model takes \[3\]"):
        records.npy_fits(records.npy_layout(npy(np.ones((2, 4), dtype=np.float32))), SPEC)


class Triple:
    inputs = [SPEC]
    max_batch = 8

    async def load_signature(self) -> None:
        pass

    async def infer(self, batch: list[dict[str, records.Tensor]]) -> list[dict[str, Any]]:
        return [{"Y": {"datatype": "FP32", "shape": [3], "data": (r["X"].data * 3).tolist()}} for r in batch]


def score(source: Any, sink: Any, shard_bytes: int) -> run.Report:
    report = run.Report(0)

    async def go() -> None:
        await run.run(
            source=source, sink=sink, triton=Triple(), shard_bytes=shard_bytes, index=0, workers=1,  # type: ignore[arg-type]
            concurrency=3, batch_size=5, retries=0, max_failed="1", report=report, fmt="npy",
        )  # fmt: skip

    asyncio.run(go())
    return report


def test_a_worker_scores_every_row_once_and_names_its_row() -> None:
    xs = [np.arange(i * 30, (i + 1) * 30, dtype=np.float32).reshape(10, 3) for i in range(3)]
    source, sink = MemoryStore(), MemoryStore()
    for i, x in enumerate(xs):
        obstore.put(source, f"part-{i}.npy", npy(x.astype(">f4") if i == 1 else x))  # a big-endian one too
    report = score(source, sink, shard_bytes=100)
    assert report.totals == {"shards": report.plan, "records": 30, "failed": 0} and report.plan > 3
    got = [
        json.loads(line)
        for s in range(report.plan)
        for line in bytes(obstore.get(sink, f"results/part-{s:05d}.jsonl").bytes()).splitlines()
    ]
    assert [(r["key"], r["row"]) for r in got] == [(f"part-{i}.npy", r) for i in range(3) for r in range(10)]
    np.testing.assert_array_equal([r["outputs"]["Y"]["data"] for r in got], np.concatenate(xs) * 3)


def test_an_object_that_is_not_an_array_is_one_error_and_a_wrong_first_array_stops_the_job() -> None:
    source, sink = MemoryStore(), MemoryStore()
    obstore.put(source, "a.npy", npy(np.zeros((4, 3), dtype=np.float32)))
    obstore.put(source, "b.npy", b"not numpy at all")
    report = score(source, sink, shard_bytes=1 << 20)
    assert report.totals == {"shards": 2, "records": 4, "failed": 1}
    [error] = [
        json.loads(x) for x in bytes(obstore.get(sink, "errors/part-00001.jsonl").bytes()).splitlines()
    ]
    assert error["key"] == "b.npy" and "not an .npy array" in error["reason"]

    wrong = MemoryStore()
    obstore.put(wrong, "a.npy", npy(np.zeros((4, 3), dtype=np.int64)))
    with pytest.raises(run.Stop) as stop:
        score(wrong, MemoryStore(), shard_bytes=1 << 20)
    assert stop.value.reason == "SchemaMismatch" and "an array of INT64, the model takes FP32" in str(
        stop.value
    )
