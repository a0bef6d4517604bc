"""BatchInference sharding: every line of the input lands in exactly one shard, whatever the sizes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modeldeploy.batch import shards
from modeldeploy.batch.shards import InputObject, Shard


def read_all(plan: list[Shard], objects: dict[str, bytes]) -> list[tuple[str, int, bytes | None]]:
    """What the workers read: each shard's lines, from the byte range a reader fetches."""
    out = []
    for shard in plan:
        data = objects[shard.key]
        begin, end = shards.read_range(shard, len(data))
        out.extend(
            (shard.key, off, line) for off, line in shards.lines(shard, data[begin:end], begin, len(data))
        )
    return out


def expected(objects: dict[str, bytes]) -> list[tuple[str, int, bytes | None]]:
    out = []
    for key in sorted(objects):
        pos = 0
        for raw in objects[key].split(b"\n"):
            if raw.strip():
                out.append((key, pos, raw.rstrip(b"\r")))
            pos += len(raw) + 1
    return out


line_text = st.text(alphabet="ab {}\r", min_size=0, max_size=12).map(str.encode)


@settings(max_examples=300, deadline=None)
@given(
    files=st.dictionaries(
        st.sampled_from(["a.jsonl", "b/c.jsonl", "d.jsonl"]),
        st.tuples(st.lists(line_text, max_size=12), st.booleans()),
        min_size=1,
    ),
    shard_bytes=st.integers(1, 40),
)
def test_every_line_is_read_by_exactly_one_shard(
    files: dict[str, tuple[list[bytes], bool]], shard_bytes: int
) -> None:
    objects = {k: b"\n".join(ls) + (b"\n" if trailing and ls else b"") for k, (ls, trailing) in files.items()}
    plan = shards.plan([InputObject(k, len(v)) for k, v in objects.items()], shard_bytes)
    assert [s.index for s in plan] == list(range(len(plan)))
    assert all(0 < s.size <= shard_bytes for s in plan)
    assert read_all(plan, objects) == expected(objects)


def test_plan_is_stable_and_skips_empty_objects() -> None:
    objs = [InputObject("z", 10), InputObject("a", 0), InputObject("m", 25)]
    plan = shards.plan(objs, 10)
    assert plan == [Shard(0, "m", 0, 10), Shard(1, "m", 10, 20), Shard(2, "m", 20, 25), Shard(3, "z", 0, 10)]
    assert shards.plan(list(reversed(objs)), 10) == plan
    with pytest.raises(ValueError, match="at least 1 byte"):
        shards.plan(objs, 0)


def test_workers_share_shards_round_robin() -> None:
    plan = shards.plan([InputObject("x", 50)], 10)
    assert [s.index for s in shards.assigned(plan, 0, 2)] == [0, 2, 4]
    assert [s.index for s in shards.assigned(plan, 1, 2)] == [1, 3]
    with pytest.raises(ValueError, match=r"outside 0\.\.1"):
        shards.assigned(plan, 2, 2)


def test_a_line_longer_than_the_limit_is_reported_once_at_its_offset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shards, "MAX_RECORD_BYTES", 8)
    data = b"ok\n" + b"x" * 40 + b"\nfine\n"
    plan = shards.plan([InputObject("k", len(data))], 10)
    got = read_all(plan, {"k": data})
    assert got == [("k", 0, b"ok"), ("k", 3, None), ("k", 44, b"fine")]


def test_output_names() -> None:
    shard = Shard(7, "in/a.jsonl", 0, 5)
    assert shards.results_key("s3-prefix/run1/", shard) == "s3-prefix/run1/results/part-00007.jsonl"
    assert shards.errors_key("run1", shard) == "run1/errors/part-00007.jsonl"
    assert shards.manifest_key("") == "_manifest.json"
