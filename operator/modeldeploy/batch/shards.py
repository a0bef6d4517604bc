"""How a BatchInference splits its input into shards, and where each shard's results go.

Line-oriented input (JSON Lines) is split by byte ranges, as Hadoop and Spark split text: a shard
``[start, end)`` of one object holds every line that *starts* inside it. A reader begins at
``start - 1``, drops everything up to and including the first newline (the tail of a line that
started in the shard before), and reads lines while they start before ``end``. Every line then
belongs to exactly one shard, whatever the shard size, and the operator plans shards from object
sizes alone, without reading the data set.

A shard's outputs are one object each (results and errors), written whole: an object store's PUT
makes it appear complete or not at all, so "the results object exists" is "the shard is done" and a
restarted worker skips it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

#: Names under the output prefix.
MANIFEST = "_manifest.json"
RESULTS_DIR = "results"
ERRORS_DIR = "errors"


@dataclass(frozen=True)
class InputObject:
    key: str
    size: int


@dataclass(frozen=True)
class Shard:
    index: int
    key: str
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


def plan(objects: list[InputObject], shard_bytes: int) -> list[Shard]:
    """Shards of at most ``shard_bytes`` bytes each, objects in key order, numbered from 0. Empty
    objects get no shard. The same input and size always give the same plan (a restarted operator
    or worker finds the same shard numbers)."""
    if shard_bytes < 1:
        raise ValueError("shard size must be at least 1 byte")
    out: list[Shard] = []
    for obj in sorted(objects, key=lambda o: o.key):
        for start in range(0, obj.size, shard_bytes):
            out.append(Shard(len(out), obj.key, start, min(obj.size, start + shard_bytes)))
    return out


def assigned(shards: list[Shard], worker: int, workers: int) -> list[Shard]:
    """The shards worker ``worker`` of ``workers`` (an Indexed Job's completion index) runs:
    every ``workers``-th one, so that each pod gets a share from the start of the input."""
    if not 0 <= worker < workers:
        raise ValueError(f"worker index {worker} outside 0..{workers - 1}")
    return shards[worker::workers]


#: The longest record (line) a reader accepts; a longer one goes to the errors file.
MAX_RECORD_BYTES = 16 * 1024 * 1024


def read_range(shard: Shard, object_size: int) -> tuple[int, int]:
    """The byte range ``[begin, end)`` of its object a reader fetches for ``shard``: from one byte
    before its start (does a line start at its first byte?) to past its end by the longest record
    (the last line that starts inside it may end beyond it)."""
    return max(0, shard.start - 1), min(object_size, shard.end + MAX_RECORD_BYTES)


def lines(shard: Shard, data: bytes, data_start: int, object_size: int) -> Iterator[tuple[int, bytes | None]]:
    """(byte offset in the object, line without its newline) of every non-blank line that starts
    inside ``shard``, from ``data``: the object's bytes from ``data_start`` as :func:`read_range`
    gives them. A line that does not end within ``data`` although the object goes on is longer than
    :data:`MAX_RECORD_BYTES`: it comes as ``(offset, None)``, and is the shard's last."""
    pos = shard.start - data_start
    if shard.start > 0 and data[pos - 1 : pos] != b"\n":
        # The byte before the shard does not end a line: its first bytes are the tail of a line that
        # started in the shard before.
        nl = data.find(b"\n", pos)
        if nl < 0:
            return
        pos = nl + 1
    reaches_end = data_start + len(data) >= object_size
    while pos < len(data) and data_start + pos < shard.end:
        nl = data.find(b"\n", pos)
        if nl < 0 and not reaches_end:
            yield data_start + pos, None
            return
        line = (data[pos:] if nl < 0 else data[pos:nl]).rstrip(b"\r")
        if line.strip():
            yield data_start + pos, line
        if nl < 0:
            return
        pos = nl + 1


def npy_rows(shard: Shard, header: int, row_bytes: int, rows: int) -> tuple[int, int]:
    """The rows ``[first, end)`` of an .npy object whose first byte lies inside ``shard`` (rows are
    split by byte ranges like lines: each belongs to exactly one shard, whatever the shard size)."""
    if row_bytes <= 0:
        return 0, 0

    def first_at_or_after(byte: int) -> int:
        return min(rows, max(0, -(-(byte - header) // row_bytes)))

    return first_at_or_after(shard.start), first_at_or_after(shard.end)


def results_key(prefix: str, shard: Shard) -> str:
    return _join(prefix, RESULTS_DIR, f"part-{shard.index:05d}.jsonl")


def errors_key(prefix: str, shard: Shard) -> str:
    return _join(prefix, ERRORS_DIR, f"part-{shard.index:05d}.jsonl")


def manifest_key(prefix: str) -> str:
    return _join(prefix, MANIFEST)


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))
