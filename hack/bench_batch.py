"""The batch figure of ``make bench``: records per second through the BatchInference worker against
a plain client loop sending the same records to the same tritonserver build (the floor), in one run.

The floor is the same work done by a plain script (read each file, parse each line, send batches,
write the answers); how fast Triton answers the same records already in memory is printed beside it.
The worker does what a BatchInference pod's worker does (``modeldeploy.batch.run``): list and shard
the input, read each shard from storage (obstore's local-filesystem store here), parse every line,
score in batches through tritonclient's asyncio HTTP client, write results, errors and markers. Both
send batches of the same size with the same number of requests in flight. With two workers, each is a
process of its own with a tritonserver of its own, as each pod has its worker and Triton sidecar:
the scaling figure (on 2 cores, two workers and two tritonservers share what one pair already uses,
so it cannot be linear here).

Not measured here: storage over the network (the real-node tier runs the same worker in pods against
an S3 server, with a deliberately slow model, for behaviour, not speed).
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "operator")]

from hack import triton as launcher  # noqa: E402

DIMS = 16
MAX_BATCH = 64
CONFIG = f"""name: "scaler"
backend: "python"
max_batch_size: {MAX_BATCH}
input [{{ name: "X" data_type: TYPE_FP32 dims: [{DIMS}] }}]
output [{{ name: "Y" data_type: TYPE_FP32 dims: [{DIMS}] }}]
instance_group [{{ kind: KIND_CPU count: 1 }}]
version_policy: {{ specific: {{ versions: [1] }} }}
"""


def _records(n: int, root: Path) -> np.ndarray:
    rng = np.random.default_rng(11)
    xs = rng.normal(size=(n, DIMS)).astype(np.float32)
    half = n // 2
    for part, rows in enumerate((xs[:half], xs[half:])):
        (root / f"part-{part}.jsonl").write_text("".join(json.dumps({"X": r.tolist()}) + "\n" for r in rows))
    return xs


async def _floor(address: str, xs: np.ndarray, batch: int, concurrency: int) -> float:
    from tritonclient.http import InferInput, InferRequestedOutput
    from tritonclient.http.aio import InferenceServerClient

    client = InferenceServerClient(address)
    gate = asyncio.Semaphore(concurrency)
    answers: list[Any] = []

    async def send(chunk: np.ndarray) -> None:
        tensor = InferInput("X", list(chunk.shape), "FP32")
        tensor.set_data_from_numpy(chunk, binary_data=True)
        async with gate:
            result = await client.infer(
                "scaler", [tensor], model_version="1", outputs=[InferRequestedOutput("Y", binary_data=True)]
            )
        answers.append(result.as_numpy("Y"))

    t0 = time.monotonic()
    try:
        await asyncio.gather(*(send(xs[i : i + batch]) for i in range(0, len(xs), batch)))
    finally:
        await client.close()
    elapsed = time.monotonic() - t0
    assert sum(len(a) for a in answers) == len(xs)
    return elapsed


async def _plain_script(address: str, source: Any, sink: Any, batch: int, concurrency: int) -> float:
    """The same work as the worker, as a plain script would do it: read each input object (obstore:
    a local folder or S3), parse each line, send batches (same size, same requests in flight), write
    the answers as JSON Lines, one output object per input object. No sharding, no checks, no error
    handling."""
    import obstore
    from tritonclient.http import InferInput, InferRequestedOutput
    from tritonclient.http.aio import InferenceServerClient

    client = InferenceServerClient(address)
    gate = asyncio.Semaphore(concurrency)

    async def send(chunk: np.ndarray) -> np.ndarray:
        tensor = InferInput("X", list(chunk.shape), "FP32")
        tensor.set_data_from_numpy(chunk, binary_data=True)
        async with gate:
            result = await client.infer(
                "scaler", [tensor], model_version="1", outputs=[InferRequestedOutput("Y", binary_data=True)]
            )
        return result.as_numpy("Y")  # type: ignore[no-any-return]

    t0 = time.monotonic()
    try:
        keys = sorted(meta["path"] for metas in obstore.list(source) for meta in metas)
        for key in keys:
            data = bytes(await (await obstore.get_async(source, key)).bytes_async())
            xs = np.array([json.loads(line)["X"] for line in data.splitlines()], dtype=np.float32)
            answers = await asyncio.gather(*(send(xs[i : i + batch]) for i in range(0, len(xs), batch)))
            rows = (json.dumps({"Y": y.tolist()}) + "\n" for ys in answers for y in ys)
            await obstore.put_async(sink, key, "".join(rows).encode())
    finally:
        await client.close()
    return time.monotonic() - t0


def _worker_process(
    address: str,
    index: int,
    workers: int,
    source: str,
    sink: str,
    shard_bytes: int,
    batch: int,
    concurrency: int,
) -> int:
    """One worker, as a pod's worker process runs it: records scored."""
    from obstore.store import LocalStore

    from modeldeploy.batch import run as batch_run

    outcomes = asyncio.run(
        batch_run.run_with_triton(
            f"http://{address}",
            "scaler",
            "1",
            source=LocalStore(source),
            sink=LocalStore(sink),
            shard_bytes=shard_bytes,
            index=index,
            workers=workers,
            concurrency=concurrency,
            batch_size=batch,
            retries=0,
        )
    )
    return sum(o.records for o in outcomes)


def _workers(
    addresses: list[str], source: Path, sink: Path, shard_bytes: int, batch: int, concurrency: int
) -> tuple[float, int]:
    """Worker i of len(addresses) against tritonserver i, each in a process of its own (started
    before the clock starts: a pod's process is up before it scores)."""
    import concurrent.futures
    import multiprocessing

    n = len(addresses)
    with concurrent.futures.ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_warm, range(n)))  # the processes up and the package imported
        t0 = time.monotonic()
        futures = [
            pool.submit(_worker_process, a, i, n, str(source), str(sink), shard_bytes, batch, concurrency)
            for i, a in enumerate(addresses)
        ]
        scored = sum(f.result() for f in futures)
        return time.monotonic() - t0, scored


def _warm(_: int) -> None:
    import tritonclient.http.aio  # noqa: F401

    import modeldeploy.batch.run  # noqa: F401


def measure(n: int = 50_000, batch: int = 32, concurrency: int = 4) -> dict[str, Any]:
    """The floor and the worker with one and with two tritonservers, each once after a warm-up."""
    from obstore.store import LocalStore

    from tritonmodels import scaler_py

    dist = launcher.prepare()

    with tempfile.TemporaryDirectory(prefix="modeldeploy-bench-batch-") as tmp:
        root = Path(tmp)
        repo = root / "models"
        (repo / "scaler" / "1").mkdir(parents=True)
        (repo / "scaler" / "config.pbtxt").write_text(CONFIG)
        (repo / "scaler" / "1" / "model.py").write_text(scaler_py(2))
        (root / "in").mkdir()
        xs = _records(n, root / "in")
        shard_bytes = max(1, sum(p.stat().st_size for p in (root / "in").iterdir()) // 8)
        servers = [
            launcher.TritonServer.start(dist, repo, log_path=root / f"triton-{i}.log", ready_timeout=120)
            for i in range(2)
        ]
        try:
            addresses = [s.http_address for s in servers]
            asyncio.run(_floor(addresses[0], xs[: batch * 8], batch, concurrency))  # warm-up
            floor_s = asyncio.run(_floor(addresses[0], xs, batch, concurrency))
            (root / "plain").mkdir()
            plain_s = asyncio.run(
                _plain_script(
                    addresses[0], LocalStore(root / "in"), LocalStore(root / "plain"), batch, concurrency
                )
            )
            out: dict[str, Any] = {
                "records": n,
                "batch_size": batch,
                "concurrency": concurrency,
                "shards": 8,
                "floor_records_per_s": n / plain_s,
                "triton_alone_records_per_s": n / floor_s,
            }
            for k in (1, 2):
                sink = root / f"out-{k}"
                sink.mkdir()
                seconds, scored = _workers(addresses[:k], root / "in", sink, shard_bytes, batch, concurrency)
                assert scored == n, f"{scored} of {n} records scored"
                out[f"workers_{k}_records_per_s"] = n / seconds
                out[f"workers_{k}_ratio"] = (n / seconds) / out["floor_records_per_s"]
        finally:
            for s in servers:
                s.stop()
    return out


def line(b: dict[str, Any]) -> str:
    return (
        f"batch inference     {b['records']} records, batch {b['batch_size']}, {b['concurrency']} in flight, "
        f"{b['shards']} shards: floor (a plain script: read, parse, infer, write) "
        f"{b['floor_records_per_s']:.0f} records/s (Triton alone, arrays in memory: "
        f"{b['triton_alone_records_per_s']:.0f}/s); "
        f"worker {b['workers_1_records_per_s']:.0f}/s ({b['workers_1_ratio']:.2f}x); "
        f"2 workers (processes), a tritonserver each {b['workers_2_records_per_s']:.0f}/s "
        f"({b['workers_2_ratio']:.2f}x; "
        f"{b['workers_2_records_per_s'] / b['workers_1_records_per_s']:.2f}x of one worker, on 2 cores)"
    )


if __name__ == "__main__":
    result = measure()
    print(json.dumps(result))
    print(line(result))
