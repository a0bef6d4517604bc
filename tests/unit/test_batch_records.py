"""BatchInference records: a JSON Lines line as the model's input tensors, or a reason it is not one."""

from __future__ import annotations

import json

import pytest

from modeldeploy import api
from modeldeploy.batch import records
from modeldeploy.batch.records import RecordError, Tensor, parse

INPUTS = [
    api.TensorSpec(name="INPUT0", data_type="TYPE_FP32", dims=[2, 2]),
    api.TensorSpec(name="TEXT", data_type="TYPE_STRING", dims=[-1]),
]


TEXT = {"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["a"]}


def line(obj: object) -> bytes:
    return json.dumps(obj).encode()


def plain(t: Tensor) -> Tensor:
    """Numbers come as a numpy array (checked by numpy at once), strings as a list."""
    return Tensor(t.name, t.datatype, t.shape, [v.item() if hasattr(v, "item") else v for v in t.data])


def test_fields_by_input_name() -> None:
    got = parse(line({"INPUT0": [[1, 2.5], [3, 4]], "TEXT": ["a", "b", "c"]}), INPUTS)
    assert {k: plain(v) for k, v in got.items()} == {
        "INPUT0": Tensor("INPUT0", "FP32", (2, 2), [1, 2.5, 3, 4]),
        "TEXT": Tensor("TEXT", "BYTES", (3,), ["a", "b", "c"]),
    }


def test_v2_tensors_with_or_without_a_batch_of_one() -> None:
    record = {
        "inputs": [
            {"name": "INPUT0", "datatype": "FP32", "shape": [1, 2, 2], "data": [1, 2, 3, 4]},
            {"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["x"]},
        ]
    }
    got = {k: plain(v) for k, v in parse(line(record), INPUTS).items()}
    assert got["INPUT0"] == Tensor("INPUT0", "FP32", (2, 2), [1, 2, 3, 4])
    assert got["TEXT"] == Tensor("TEXT", "BYTES", (1,), ["x"])


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "a record is a JSON object, not list"),
        (line({"INPUT0": [[1, 2], [3, 4]]}), "input TEXT missing"),
        (line({"INPUT0": [[1, 2], [3, 4]], "TEXT": ["a"], "EXTRA": 1}), "no model input named EXTRA"),
        (line({"INPUT0": [[1, 2], [3]], "TEXT": ["a"]}), "input INPUT0: ragged nesting"),
        (line({"INPUT0": [1, 2, 3, 4], "TEXT": ["a"]}), "input INPUT0: shape [4], the model takes [2, 2]"),
        (line({"INPUT0": [[1, "2"], [3, 4]], "TEXT": ["a"]}), 'input INPUT0: "2" is not a FP32 value'),
        (b'{"INPUT0": [[1, NaN], [3, 4]], "TEXT": ["a"]}', "input INPUT0: NaN is not a FP32 value"),
        (line({"INPUT0": [[1, 2], [3, 4]], "TEXT": [1]}), "input TEXT: 1 is not a BYTES value"),
        (
            line(
                {
                    "inputs": [
                        {"name": "INPUT0", "datatype": "INT32", "shape": [2, 2], "data": [1, 2, 3, 4]},
                        TEXT,
                    ]
                }
            ),
            "input INPUT0: datatype INT32, the model takes FP32",
        ),
        (
            line(
                {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3]}, TEXT]}
            ),
            "input INPUT0: shape [2, 2] holds 4 values, data has 3",
        ),
        (line({"inputs": {"INPUT0": 1}}), '"inputs" is a list of tensors'),
        (line({"inputs": [{"name": "INPUT0"}]}), "inputs[0] needs a name and data"),
    ],
)
def test_a_record_that_does_not_fit_says_which_input_and_why(record: bytes, reason: str) -> None:
    with pytest.raises(RecordError) as err:
        parse(record, INPUTS)
    assert reason in str(err.value)


def test_integer_inputs_are_range_checked_and_refuse_bools() -> None:
    spec = [api.TensorSpec(name="X", data_type="TYPE_UINT8", dims=[3])]
    assert list(parse(line({"X": [0, 255, 7]}), spec)["X"].data) == [0, 255, 7]
    for bad in ([0, 256, 1], [0, -1, 1], [0, True, 1], [0, 1.5, 1]):
        with pytest.raises(RecordError, match="is not a UINT8 value"):
            parse(line({"X": bad}), spec)


@pytest.mark.parametrize(
    ("data_type", "values"),
    [
        ("TYPE_FP32", [[0.5, -1], [3, 1e30]]),
        ("TYPE_INT64", [[-(2**63), 2**63 - 1], [0, 7]]),
        ("TYPE_INT8", [[-128, 127], [0, 1]]),
    ],
)
def test_numpy_reads_numbers_as_the_value_by_value_check_does(
    data_type: str, values: list[list[float]]
) -> None:
    spec = api.TensorSpec(name="X", data_type=data_type, dims=[2, 2])  # type: ignore[arg-type]
    fast = records._checked(spec, None, None, values, True)
    slow = records._checked(spec, None, None, values, False)
    assert (fast.shape, [v.item() for v in fast.data]) == (slow.shape, slow.data)
    assert hasattr(fast.data, "dtype") and isinstance(slow.data, list)


def test_numbers_numpy_would_read_lossily_take_the_value_by_value_path() -> None:
    spec = api.TensorSpec(name="X", data_type="TYPE_UINT64", dims=[2])
    t = records._checked(spec, None, None, [2**64 - 1, 0], True)  # numpy: float64
    assert t.data == [2**64 - 1, 0]
