"""One worker's shard: results in input order, bad records in the errors file, outputs written whole,
a done shard skipped, a shard interrupted half-way redone without duplicates.

The stores are obstore's in-memory store (the same interface the worker uses on S3); inference is a
plain function here (the tier with a real Triton server is separate)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import obstore
import pytest
from obstore.store import MemoryStore

from modeldeploy import api
from modeldeploy.batch import records, shards, worker

INPUTS = [api.TensorSpec(name="X", data_type="TYPE_INT32", dims=[2])]


class Model:
    """Doubles X; refuses (as a 400 would) any batch holding X == [13, 13]; can fail like a lost
    server after ``fail_after`` requests."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.requests: list[int] = []
        self.fail_after = fail_after

    async def __call__(self, batch: list[dict[str, records.Tensor]]) -> list[dict[str, Any]]:
        if self.fail_after is not None and len(self.requests) >= self.fail_after:
            raise ConnectionError("inference server went away")
        self.requests.append(len(batch))
        await asyncio.sleep(0)
        if any(list(r["X"].data) == [13, 13] for r in batch):
            raise worker.Rejected("unlucky input")
        return [
            {"Y": {"datatype": "INT32", "shape": [2], "data": [int(2 * v) for v in r["X"].data]}}
            for r in batch
        ]


def data_set(n: int, bad: dict[int, bytes]) -> bytes:
    return b"".join(bad.get(i, json.dumps({"X": [i, i]}).encode()) + b"\n" for i in range(n))


def read_jsonl(store: Any, key: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in bytes(obstore.get(store, key).bytes()).splitlines()]


def run(
    shard: shards.Shard, source: Any, sink: Any, model: Model, batch_size: int = 4
) -> worker.ShardOutcome:
    return asyncio.run(
        worker.run_shard(
            shard,
            source=source,
            sink=sink,
            inputs=INPUTS,
            infer=model,
            batch_size=batch_size,
            concurrency=3,
            out_prefix="run",
        )
    )


def test_a_shard_scores_good_records_in_order_and_reports_bad_ones() -> None:
    bad = {3: b"{oops", 7: b'{"X": [1]}', 13: b'{"X": [13, 13]}'}
    body = data_set(20, bad)
    source, sink = MemoryStore(), MemoryStore()
    obstore.put(source, "in/a.jsonl", body)
    [shard] = shards.plan([shards.InputObject("in/a.jsonl", len(body))], 1 << 20)

    out = run(shard, source, sink, Model())

    assert (out.records, out.failed, out.skipped) == (17, 3, False)
    results = read_jsonl(sink, "run/results/part-00000.jsonl")
    assert [r["outputs"]["Y"]["data"][0] for r in results] == [2 * i for i in range(20) if i not in bad]
    offsets = [body.index(bad[i] + b"\n") for i in sorted(bad)]
    errors = read_jsonl(sink, "run/errors/part-00000.jsonl")
    assert [e["offset"] for e in errors] == offsets
    assert "not JSON" in errors[0]["reason"]
    assert "input X: shape [1], the model takes [2]" in errors[1]["reason"]
    assert "refused by the inference server: unlucky input" in errors[2]["reason"]
    assert read_jsonl(sink, "run/done/part-00000.json") == [
        {"shard": 0, "key": "in/a.jsonl", "records": 17, "failed": 3}
    ]


def test_a_done_shard_is_skipped_without_reading_or_sending() -> None:
    body = data_set(10, {})
    source, sink = MemoryStore(), MemoryStore()
    obstore.put(source, "a.jsonl", body)
    [shard] = shards.plan([shards.InputObject("a.jsonl", len(body))], 1 << 20)
    run(shard, source, sink, Model())
    again = Model()
    assert run(shard, source, sink, again) == worker.ShardOutcome(0, 10, 0, skipped=True)
    assert again.requests == []


def test_a_shard_interrupted_half_way_leaves_nothing_and_is_redone_exactly_once() -> None:
    body = data_set(40, {})
    source, sink = MemoryStore(), MemoryStore()
    obstore.put(source, "a.jsonl", body)
    plan = shards.plan([shards.InputObject("a.jsonl", len(body))], len(body) // 3)
    assert len(plan) == 4
    # Shard 0 completes; shard 1's server goes away after two requests.
    run(plan[0], source, sink, Model())
    with pytest.raises(ConnectionError):
        run(plan[1], source, sink, Model(fail_after=2), batch_size=2)
    # (a list prefix is a whole path segment: ask for the objects themselves)
    for key in ("run/results/part-00001.jsonl", "run/done/part-00001.json"):
        with pytest.raises(FileNotFoundError):
            obstore.head(sink, key)
    obstore.head(sink, "run/done/part-00000.json")  # shard 0's marker is there
    # A new worker goes over every shard: 0 is skipped, the others are scored.
    outcomes = [run(s, source, sink, Model()) for s in plan]
    assert [o.skipped for o in outcomes] == [True, False, False, False]
    got = [r["outputs"]["Y"]["data"][0] for s in plan for r in read_jsonl(sink, shards.results_key("run", s))]
    assert got == [2 * i for i in range(40) if i != 13]  # every record once, in order (13 is refused)
