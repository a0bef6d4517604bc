"""The BatchInference worker against a real tritonserver: every record's answer is the model's own
answer to that record alone, malformed records land in the errors file, two workers split the shards
between them, and a second pass over a finished output sends nothing.

Storage here is obstore's local-filesystem store (the same interface as S3; the real-node tier runs
the worker against an S3 server)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import obstore
import tritonclient.http as httpclient
from obstore.store import LocalStore

from modeldeploy import api
from modeldeploy.batch import run as batch_run
from modeldeploy.batch import shards
from modeldeploy.triton.config import render_config_pbtxt
from tritonmodels import scaler_py

RECORDS = 1000


def write_records(path: Path) -> tuple[list[np.ndarray], set[int]]:
    """RECORDS lines over two files; every 97th line malformed in one of three ways."""
    rng = np.random.default_rng(7)
    xs, bad = [], set()
    for part in range(2):
        lines = []
        for i in range(part * RECORDS // 2, (part + 1) * RECORDS // 2):
            x = rng.normal(size=4).astype(np.float32)
            xs.append(x)
            if i % 97 == 13:
                bad.add(i)
                lines.append(['{"X": [1, 2', '{"X": [1, 2, 3]}', '{"Z": [1, 2, 3, 4]}'][i % 3])
            elif i % 2:
                lines.append(json.dumps({"X": x.tolist()}))
            else:
                t = {"name": "X", "datatype": "FP32", "shape": [1, 4], "data": x.tolist()}
                lines.append(json.dumps({"inputs": [t]}))
        (path / f"part-{part}.jsonl").write_text("\n".join(lines) + "\n")
    return xs, bad


def direct(server: Any, x: np.ndarray) -> list[float]:
    client = httpclient.InferenceServerClient(server.http_address)
    try:
        tensor = httpclient.InferInput("X", [1, 4], "FP32")
        tensor.set_data_from_numpy(x.reshape(1, 4))
        return client.infer("scaler", [tensor], model_version="1").as_numpy("Y")[0].tolist()  # type: ignore[no-any-return]
    finally:
        client.close()


def scaler(triton_server: Any, model_repo: Path, write_model: Any, tmp_path: Path) -> Any:
    """A tritonserver serving ``scaler`` (Y = 3 X, X and Y FP32 [4], batches up to 16); empty
    ``in/`` and ``out/`` under ``tmp_path``."""
    spec = api.ModelSpec.model_validate(
        {
            "format": "python",
            "storageUri": "pvc://models/repository",
            "version": 1,
            "config": {
                "maxBatchSize": 16,
                "inputs": [{"name": "X", "dataType": "TYPE_FP32", "dims": [4]}],
                "outputs": [{"name": "Y", "dataType": "TYPE_FP32", "dims": [4]}],
            },
        }
    )
    write_model("scaler", render_config_pbtxt("scaler", spec), {1: scaler_py(3)})
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    return triton_server(model_repo)


def test_worker_scores_every_record_once_like_the_model_itself(
    triton_server: Any, model_repo: Path, write_model: Any, tmp_path: Path
) -> None:
    server = scaler(triton_server, model_repo, write_model, tmp_path)
    xs, bad = write_records(tmp_path / "in")
    source, sink = LocalStore(str(tmp_path / "in")), LocalStore(str(tmp_path / "out"))

    async def worker(index: int) -> list[Any]:
        return await batch_run.run_with_triton(
            f"http://{server.http_address}",
            "scaler",
            "1",
            source=source,
            sink=sink,
            shard_bytes=20_000,
            index=index,
            workers=2,
            concurrency=4,
            batch_size=32,
            retries=0,
            max_failed="100",
        )

    async def both() -> list[list[Any]]:
        return list(await asyncio.gather(worker(0), worker(1)))

    first, second = asyncio.run(both())
    plan = shards.plan(list(batch_run.input_objects(source)), 20_000)
    assert len(plan) >= 4
    assert sorted(o.index for o in first + second) == [s.index for s in plan]
    assert {o.index % 2 for o in first} == {0} and {o.index % 2 for o in second} == {1}

    results = [
        json.loads(line)
        for s in plan
        for line in bytes(obstore.get(sink, shards.results_key("", s)).bytes()).splitlines()
    ]
    errors = [
        json.loads(line)
        for s in plan
        for line in bytes(obstore.get(sink, shards.errors_key("", s)).bytes()).splitlines()
    ]
    assert len(results) == RECORDS - len(bad) and len(errors) == len(bad)
    assert sum(o.records for o in first + second) == len(results)
    # Results in input order; each the model's answer (Y = 3 X) to that record alone.
    good = [i for i in range(RECORDS) if i not in bad]
    got = np.array([r["outputs"]["Y"]["data"] for r in results], dtype=np.float32)
    np.testing.assert_allclose(got, 3 * np.stack([xs[i] for i in good]), rtol=1e-6)
    for i in (good[0], good[len(good) // 2], good[-1]):
        np.testing.assert_allclose(got[good.index(i)], direct(server, xs[i]), rtol=1e-6)
    assert {r["outputs"]["Y"]["datatype"] for r in results} == {"FP32"}
    reasons = sorted({e["reason"].split(":")[0] for e in errors})
    assert reasons == ["input X", "no model input named Z (inputs", "not JSON"], reasons

    # Again over the finished output: every shard is skipped, nothing is sent.
    again = asyncio.run(worker(0))
    assert all(o.skipped for o in again)


def test_worker_scores_npy_rows_like_the_model_itself(
    triton_server: Any, model_repo: Path, write_model: Any, tmp_path: Path
) -> None:
    """The .npy format: every row of each array one record, answered as the model answers it alone."""
    server = scaler(triton_server, model_repo, write_model, tmp_path)
    rng = np.random.default_rng(3)
    arrays = [rng.normal(size=(n, 4)).astype(np.float32) for n in (700, 1, 299)]
    for i, a in enumerate(arrays):
        np.save(tmp_path / "in" / f"part-{i}.npy", a)
    source, sink = LocalStore(str(tmp_path / "in")), LocalStore(str(tmp_path / "out"))
    report = batch_run.Report(0)
    asyncio.run(
        batch_run.run_with_triton(
            f"http://{server.http_address}",
            "scaler",
            "1",
            source=source,
            sink=sink,
            shard_bytes=4096,
            index=0,
            workers=1,
            concurrency=4,
            batch_size=32,
            retries=0,
            report=report,
            fmt="npy",
        )
    )
    assert report.totals == {"shards": report.plan, "records": 1000, "failed": 0}
    results = [
        json.loads(line)
        for s in range(report.plan)
        for line in bytes(obstore.get(sink, f"results/part-{s:05d}.jsonl").bytes()).splitlines()
    ]
    xs = np.concatenate(arrays)
    got = np.array([r["outputs"]["Y"]["data"] for r in results], dtype=np.float32)
    np.testing.assert_allclose(got, 3 * xs, rtol=1e-6)
    assert [r["row"] for r in results] == [*range(700), 0, *range(299)]
    np.testing.assert_allclose(got[700], direct(server, xs[700]), rtol=1e-6)
