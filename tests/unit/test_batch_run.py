"""A worker's whole run: the checks before any shard (each stopping with its reason), the manifest
written by whichever worker finds every shard done, the failed-record budget across workers.

Stores are obstore's in-memory store; the model is a plain function behind the small interface the
worker uses of its Triton client (the tier with a real Triton is tests/triton)."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import obstore
import pytest
from obstore.store import MemoryStore

from modeldeploy import api
from modeldeploy.batch import records, run, shards
from tests.unit.test_batch_worker import data_set


class FakeTriton:
    """What run.run() uses of run.Triton: the signature, and infer() doubling X."""

    def __init__(self) -> None:
        self.inputs: list[api.TensorSpec] = []
        self.max_batch = 8

    async def load_signature(self) -> None:
        self.inputs = [api.TensorSpec(name="X", data_type="TYPE_INT32", dims=[2])]

    async def infer(self, batch: list[dict[str, records.Tensor]]) -> list[dict[str, Any]]:
        doubled = ([2 * int(v) for v in r["X"].data] for r in batch)
        return [{"Y": {"datatype": "INT32", "shape": [2], "data": d}} for d in doubled]


def go(source: Any, sink: Any, *, index: int = 0, workers: int = 1, max_failed: str = "0", **kw: Any) -> Any:
    report = run.Report(index)

    async def main() -> Any:
        return await run.run(
            source=source,
            sink=sink,
            triton=FakeTriton(),  # type: ignore[arg-type]
            shard_bytes=kw.get("shard_bytes", 200),
            index=index,
            workers=workers,
            concurrency=2,
            batch_size=4,
            retries=0,
            max_failed=max_failed,
            report=report,
        )

    asyncio.run(main())
    return report


def stores(body: bytes) -> tuple[MemoryStore, MemoryStore]:
    source, sink = MemoryStore(), MemoryStore()
    obstore.put(source, "in/a.jsonl", body)
    return source, sink


def test_two_workers_share_the_plan_and_the_last_one_writes_the_manifest() -> None:
    source, sink = stores(data_set(60, {}))
    first = go(source, sink, index=0, workers=2)
    assert first.manifest is None and first.totals == {}  # worker 1's shards are not done yet
    assert not list(obstore.list(sink, prefix=shards.MANIFEST).collect())
    second = go(source, sink, index=1, workers=2)
    assert first.plan == second.plan > 2 and first.shards + second.shards == first.plan
    assert second.totals == {"shards": first.plan, "records": 60, "failed": 0}
    manifest = json.loads(bytes(obstore.get(sink, shards.MANIFEST).bytes()))
    assert manifest["records"] == 60 and manifest["succeeded"] is True
    assert [p["shard"] for p in manifest["parts"]] == list(range(first.plan))
    assert sum(p["records"] for p in manifest["parts"]) == 60
    # the report the operator reads is one JSON line, well under a termination message's 4 KiB
    assert json.loads(second.dump())["totals"]["records"] == 60


def test_an_empty_input_stops_before_any_shard() -> None:
    with pytest.raises(run.Stop) as stop:
        go(MemoryStore(), MemoryStore())
    assert (stop.value.reason, stop.value.code) == ("InputEmpty", run.EXIT_INVALID)


def test_records_that_do_not_fit_the_model_stop_the_job_with_the_expected_inputs() -> None:
    body = b"".join(json.dumps({"Z": [i]}).encode() + b"\n" for i in range(40))
    source, sink = stores(body)
    with pytest.raises(run.Stop) as stop:
        go(source, sink)
    assert stop.value.reason == "SchemaMismatch"
    assert "X (TYPE_INT32, dims [2])" in str(stop.value)
    assert not list(obstore.list(sink).collect()), "nothing written before the check"


def test_one_bad_record_among_good_ones_is_not_a_schema_mismatch() -> None:
    source, sink = stores(data_set(30, {0: b'{"Z": 1}'}))
    report = go(source, sink, max_failed="1")
    assert report.totals == {"shards": report.plan, "records": 29, "failed": 1}


def test_an_output_that_cannot_be_written_stops_the_job(tmp_path: Path) -> None:
    source, _ = stores(data_set(10, {}))
    # a directory where the write check's object would go (root may write anywhere else)
    (tmp_path / ".modeldeploy-write-check-0" / "x").mkdir(parents=True)
    sink = obstore.store.LocalStore(str(tmp_path))
    with pytest.raises(run.Stop) as stop:
        go(source, sink)
    assert stop.value.reason == "OutputNotWritable"


def test_more_failed_records_than_the_count_allowed_fails_with_the_reason() -> None:
    bad = {i: b"{oops" for i in range(5, 60, 10)}  # 6 malformed records
    source, sink = stores(data_set(60, bad))
    with pytest.raises(run.Stop) as stop:
        go(source, sink, max_failed="3")
    assert (stop.value.reason, stop.value.code) == ("TooManyFailedRecords", run.EXIT_TOO_MANY_FAILED)
    assert "more than maxFailedRecords 3" in str(stop.value)


def test_a_share_of_failed_records_is_judged_on_the_whole_job() -> None:
    bad = {i: b"{oops" for i in range(5, 60, 10)}  # 6 of 60: 10 %
    source, sink = stores(data_set(60, bad))
    assert go(source, sink, max_failed="10%").totals["failed"] == 6
    source, sink = stores(data_set(60, bad))
    with pytest.raises(run.Stop) as stop:
        go(source, sink, max_failed="9.9%")
    assert stop.value.reason == "TooManyFailedRecords"
    manifest = json.loads(bytes(obstore.get(sink, shards.MANIFEST).bytes()))
    assert manifest["succeeded"] is False and manifest["failed"] == 6


def test_the_preflight_checks_without_a_model_server() -> None:
    """``batch-worker --check`` (the pod's first init container): the same stops, with the model's
    inputs from its config instead of from Triton."""
    inputs = [api.TensorSpec(name="X", data_type="TYPE_INT32", dims=[2])]

    def check(source: Any, sink: Any, given: list[api.TensorSpec] | None) -> list[shards.Shard]:
        async def go() -> list[shards.Shard]:
            return await run.preflight(
                source=source, sink=sink, shard_bytes=100, index=0, inputs=given, fmt="jsonl"
            )

        return asyncio.run(go())

    source, sink = stores(data_set(30, {}))
    assert len(check(source, sink, inputs)) > 1
    assert not list(obstore.list(sink).collect()), "the write check leaves nothing behind"
    alien, _ = stores(b'{"Z": 1}\n' * 20)
    with pytest.raises(run.Stop) as stop:
        check(alien, sink, inputs)
    assert stop.value.reason == "SchemaMismatch"
    check(alien, sink, None)  # without the inputs, only storage is checked
    with pytest.raises(run.Stop) as stop:
        check(MemoryStore(), sink, inputs)
    assert stop.value.reason == "InputEmpty"


def test_a_shard_failing_every_try_is_named_in_the_report() -> None:
    class Down(FakeTriton):
        async def infer(self, batch: list[dict[str, records.Tensor]]) -> list[dict[str, Any]]:
            raise ConnectionError("triton went away")

    source, sink = stores(data_set(4, {}))
    report = run.Report(0)

    async def main() -> Any:
        return await run.run(
            source=source, sink=sink, triton=Down(),  # type: ignore[arg-type]
            shard_bytes=10_000, index=0, workers=1, concurrency=1, batch_size=4, retries=0, report=report,
        )  # fmt: skip

    with pytest.raises(ConnectionError):
        asyncio.run(main())
    assert report.failed_shards == [0]
    assert json.loads(report.dump())["failed_shards"] == [0]
    assert "failed_shards" not in json.loads(run.Report(1).dump())


def test_a_preflight_that_cannot_reach_storage_says_why_and_asks_to_be_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Storage unreachable past the client's retries is no verdict on the job: the preflight exits 1
    (the Job starts the index again; 2 and 3 fail the Job) with the reason in its termination message,
    not a traceback."""

    async def unreachable(**_: Any) -> list[shards.Shard]:
        raise ConnectionError("connection refused by 10.0.0.1:9000")

    monkeypatch.setattr(run, "preflight", unreachable)
    parser = argparse.ArgumentParser()
    run.add_arguments(parser)
    log = tmp_path / "termination-log"
    args = parser.parse_args(
        [
            *("--check", "--input=s3://in/x", "--output=s3://out/y", "--shard-bytes=100", "--workers=1"),
            *("--model=-", "--version=-", "--progress-port=0", f"--termination-log={log}"),
        ]
    )
    assert run.main(args) == 1
    report = json.loads(log.read_text())
    assert report["reason"] == "PreflightError"
    assert "ConnectionError: connection refused" in report["message"]
