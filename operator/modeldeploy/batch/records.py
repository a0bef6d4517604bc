"""One input record (a JSON Lines line) as the model's input tensors, checked against its inputs.

A record names its tensors after the model's inputs, in either of two shapes:

* KServe v2 / Triton JSON tensors, as in an inference request:
  ``{"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [4], "data": [1, 2, 3, 4]}]}``
  (a leading batch dimension of 1 is accepted and dropped);
* one field per input, its value nested lists (or a scalar) of the input's shape:
  ``{"INPUT0": [1, 2, 3, 4]}``.

Either way the result is one flat tensor per input with the shape the model declares (no batch
dimension): the worker batches records itself. A record that does not fit raises
:class:`RecordError` saying which input and why; it goes to the errors file, the job goes on.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from .. import api

#: Triton config data type -> KServe v2 datatype.
V2_TYPE = {
    "TYPE_BOOL": "BOOL",
    "TYPE_UINT8": "UINT8",
    "TYPE_UINT16": "UINT16",
    "TYPE_UINT32": "UINT32",
    "TYPE_UINT64": "UINT64",
    "TYPE_INT8": "INT8",
    "TYPE_INT16": "INT16",
    "TYPE_INT32": "INT32",
    "TYPE_INT64": "INT64",
    "TYPE_FP16": "FP16",
    "TYPE_FP32": "FP32",
    "TYPE_FP64": "FP64",
    "TYPE_STRING": "BYTES",
    "TYPE_BF16": "BF16",
}

_INT_RANGE = {
    "UINT8": (0, 2**8 - 1),
    "UINT16": (0, 2**16 - 1),
    "UINT32": (0, 2**32 - 1),
    "UINT64": (0, 2**64 - 1),
    "INT8": (-(2**7), 2**7 - 1),
    "INT16": (-(2**15), 2**15 - 1),
    "INT32": (-(2**31), 2**31 - 1),
    "INT64": (-(2**63), 2**63 - 1),
}


class RecordError(ValueError):
    """A record the model cannot take; the message names the input and the reason."""


class Tensor(NamedTuple):
    """One input of one record (a tuple: made once per record and input, as cheaply as can be)."""

    name: str
    datatype: str  # KServe v2
    shape: tuple[int, ...]
    data: Any  # flat, row-major: a list, or a 1-D numpy array for numbers


def parse(line: bytes, inputs: list[api.TensorSpec]) -> dict[str, Tensor]:
    """The record on ``line`` as one tensor per model input, by name."""
    try:
        body = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError(f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RecordError(f"a record is a JSON object, not {type(body).__name__}")
    given = _v2_tensors(body) if "inputs" in body else _fields(body)
    wanted = {spec.name: spec for spec in inputs}
    unknown = sorted(given.keys() - wanted.keys())
    if unknown:
        raise RecordError(f"no model input named {', '.join(unknown)} (inputs: {', '.join(sorted(wanted))})")
    missing = sorted(wanted.keys() - given.keys())
    if missing:
        raise RecordError(f"input {', '.join(missing)} missing")
    fast = b"true" not in line and b"false" not in line  # see _numeric
    return {name: _checked(wanted[name], *given[name], fast) for name in wanted}


def parse_many(lines: list[bytes], inputs: list[api.TensorSpec]) -> list[dict[str, Tensor]] | None:
    """All of ``lines`` at once, when every one is a record of one field per input holding numbers
    that numpy checks in one go (one JSON decode for all, one array per input); None when any line
    is not like that (or is wrong), and :func:`parse` then takes them one by one and finds which.
    The same records as :func:`parse` gives, without its per-record work (most of the worker's CPU
    per record, measured with cProfile: 0.43 of 1.26 s for 10,000 records)."""
    if not lines or not inputs:
        return None
    blob = b",".join(lines)
    if b"true" in blob or b"false" in blob:  # JSON booleans would pass numpy's checks as 1 and 0
        return None
    wanted = {spec.name: spec for spec in inputs}
    if any(V2_TYPE[spec.data_type] in ("BYTES", "BOOL") for spec in inputs):
        return None
    try:
        bodies = json.loads(b"[" + blob + b"]")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if len(bodies) != len(lines) or not all(type(b) is dict and b.keys() == wanted.keys() for b in bodies):
        return None
    columns: dict[str, tuple[str, tuple[int, ...], Any]] = {}
    for name, spec in wanted.items():
        want_type = V2_TYPE[spec.data_type]
        array = _numeric(want_type, [b[name] for b in bodies])
        if array is None or array.ndim < 1:
            return None
        try:
            fitted = _fitted(spec, list(array.shape[1:]) or [1])
        except RecordError:
            return None
        columns[name] = (want_type, fitted, array.reshape(len(bodies), -1))
    return [
        {name: Tensor(name, t, shape, rows[i]) for name, (t, shape, rows) in columns.items()}
        for i in range(len(bodies))
    ]


def _v2_tensors(body: dict[str, Any]) -> dict[str, tuple[str | None, list[int] | None, Any]]:
    tensors = body["inputs"]
    if not isinstance(tensors, list):
        raise RecordError('"inputs" is a list of tensors ({"name", "datatype", "shape", "data"})')
    out: dict[str, tuple[str | None, list[int] | None, Any]] = {}
    for i, t in enumerate(tensors):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or "data" not in t:
            raise RecordError(f"inputs[{i}] needs a name and data")
        shape = t.get("shape")
        if shape is not None and not (isinstance(shape, list) and all(type(d) is int for d in shape)):
            raise RecordError(f"input {t['name']}: shape is a list of integers")
        out[t["name"]] = (t.get("datatype"), shape, t["data"])
    return out


def _fields(body: dict[str, Any]) -> dict[str, tuple[str | None, list[int] | None, Any]]:
    return {name: (None, None, value) for name, value in body.items()}


def _checked(
    spec: api.TensorSpec, datatype: str | None, shape: list[int] | None, data: Any, fast: bool
) -> Tensor:
    want_type = V2_TYPE[spec.data_type]
    if datatype is not None and datatype != want_type:
        raise RecordError(f"input {spec.name}: datatype {datatype}, the model takes {want_type}")
    array = _numeric(want_type, data) if fast else None
    if array is not None:
        # numpy checked the values; only the shape is left
        given = list(array.shape) if shape is None else shape
        if shape is not None and math.prod(shape) != array.size:
            raise RecordError(
                f"input {spec.name}: shape {shape} holds {math.prod(shape)} values, data has {array.size}"
            )
        return Tensor(spec.name, want_type, _fitted(spec, given), array.reshape(-1))
    if shape is None:
        shape, flat = _nested_shape(spec.name, data), _flatten(data)
    else:
        flat = _flatten(data)
        if math.prod(shape) != len(flat):
            raise RecordError(
                f"input {spec.name}: shape {shape} holds {math.prod(shape)} values, data has {len(flat)}"
            )
    fitted = _fitted(spec, shape)
    for value in flat:
        _check_value(spec.name, want_type, value)
    return Tensor(spec.name, want_type, fitted, flat)


def _fitted(spec: api.TensorSpec, shape: list[int]) -> tuple[int, ...]:
    if len(shape) == len(spec.dims) + 1 and shape[:1] == [1]:
        shape = shape[1:]  # a batch of one
    if len(shape) != len(spec.dims) or any(w != -1 and w != g for w, g in zip(spec.dims, shape, strict=True)):
        raise RecordError(f"input {spec.name}: shape {shape}, the model takes {spec.dims} (-1: any size)")
    return tuple(shape)


def _numeric(datatype: str, data: Any) -> Any:
    """The values as a numpy array when numpy can check them at once (numbers of the right kind,
    finite, in range), else None: the value-by-value path then finds what is wrong and says so.
    Only for records without JSON booleans (the caller checks): numpy would read true as 1."""
    if datatype in ("BYTES", "BOOL"):
        return None
    import numpy as np

    try:
        array = np.asarray(data)
    except (ValueError, OverflowError):  # ragged, or an integer past 64 bits
        return None
    kind = array.dtype.kind
    if datatype in _INT_RANGE:
        low, high = _INT_RANGE[datatype]
        ok = kind in "iu" and (array.size == 0 or (low <= array.min() and array.max() <= high))
    else:
        ok = kind in "iu" or (kind == "f" and bool(np.isfinite(array).all()))
    return array if ok else None


def _nested_shape(name: str, data: Any) -> list[int]:
    shape: list[int] = []
    level = data
    while isinstance(level, list):
        shape.append(len(level))
        if not level:
            break
        level = level[0]

    def check(node: Any, depth: int) -> None:
        if depth == len(shape):
            if isinstance(node, list):
                raise RecordError(f"input {name}: ragged nesting (not a rectangular array)")
            return
        if not isinstance(node, list) or len(node) != shape[depth]:
            raise RecordError(f"input {name}: ragged nesting (not a rectangular array)")
        for child in node:
            check(child, depth + 1)

    check(data, 0)
    return shape


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    for item in data:
        out.extend(_flatten(item))
    return out


def _check_value(name: str, datatype: str, value: Any) -> None:
    ok: bool
    if datatype == "BOOL":
        ok = isinstance(value, bool)
    elif datatype == "BYTES":
        ok = isinstance(value, str)
    elif datatype in _INT_RANGE:
        low, high = _INT_RANGE[datatype]
        ok = type(value) is int and low <= value <= high
    else:  # FP16, FP32, FP64, BF16
        ok = type(value) in (int, float) and math.isfinite(value)
    if not ok:
        raise RecordError(f"input {name}: {json.dumps(value)[:64]} is not a {datatype} value")


# --------------------------------------------------------------------------- .npy input

#: The longest .npy header (format 1.0: 10 + 65535 bytes; 2.0 allows more, which no writer of
#: ordinary arrays produces): what is fetched to read an object's layout.
NPY_HEAD_BYTES = 65_545
_NPY_V2 = {
    "b": "BOOL",
    "u1": "UINT8",
    "u2": "UINT16",
    "u4": "UINT32",
    "u8": "UINT64",
    "i1": "INT8",
    "i2": "INT16",
    "i4": "INT32",
    "i8": "INT64",
    "f2": "FP16",
    "f4": "FP32",
    "f8": "FP64",
}


@dataclass(frozen=True)
class NpyLayout:
    """Where the rows of a C-ordered .npy array are: row ``r`` is bytes
    ``[header + r * row_bytes, header + (r + 1) * row_bytes)`` of the object."""

    header: int
    dtype: Any  # numpy dtype as stored (byte order included)
    datatype: str  # KServe v2
    row_shape: tuple[int, ...]
    rows: int

    @property
    def row_bytes(self) -> int:
        size = int(self.dtype.itemsize)
        for d in self.row_shape:
            size *= d
        return size


def npy_layout(head: bytes) -> NpyLayout:
    """The layout of an .npy object from its first bytes (:data:`NPY_HEAD_BYTES` or all of it).
    Raises :class:`RecordError` for what is not a C-ordered array of numbers."""
    import io

    from numpy.lib import format as npy

    f = io.BytesIO(head)
    try:
        version = npy.read_magic(f)  # type: ignore[no-untyped-call]
        reader = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran, dtype = reader(f)  # type: ignore[no-untyped-call]
    except (ValueError, EOFError) as exc:
        raise RecordError(f"not an .npy array: {exc}") from None
    datatype = _NPY_V2.get(f"{dtype.kind}{dtype.itemsize}" if dtype.kind != "b" else "b")
    if datatype is None or dtype.fields is not None:
        raise RecordError(f"an .npy array of {dtype} cannot be model input (numbers or booleans only)")
    if fortran:
        raise RecordError("a Fortran-ordered .npy array: write it C-ordered (numpy.ascontiguousarray)")
    if not shape:
        raise RecordError("a 0-d .npy array holds no rows")
    return NpyLayout(f.tell(), dtype, datatype, tuple(int(d) for d in shape[1:]), int(shape[0]))


def npy_fits(layout: NpyLayout, spec: api.TensorSpec) -> tuple[int, ...]:
    """The row shape as the model input ``spec`` takes it; raises :class:`RecordError` if it does not."""
    want = V2_TYPE[spec.data_type]
    if layout.datatype != want:
        raise RecordError(f"input {spec.name}: an array of {layout.datatype}, the model takes {want}")
    return _fitted(spec, list(layout.row_shape) or [1])


def npy_records(data: bytes, layout: NpyLayout, spec: api.TensorSpec) -> list[dict[str, Tensor]]:
    """Whole rows (``data``) as records of the one input ``spec``, in native byte order."""
    import numpy as np

    shape = npy_fits(layout, spec)
    rows = np.frombuffer(data, dtype=layout.dtype).astype(layout.dtype.newbyteorder("="), copy=False)
    rows = rows.reshape(-1, max(1, layout.row_bytes // layout.dtype.itemsize))
    return [{spec.name: Tensor(spec.name, layout.datatype, shape, row)} for row in rows]
