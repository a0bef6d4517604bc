"""RFC 3339 timestamps: what the operator writes, and what it reads back from the API server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from modeldeploy import timeutil

T0 = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)


def test_whole_seconds_as_kubernetes_writes_a_time() -> None:
    assert timeutil.rfc3339(T0) == "2025-01-01T12:00:00Z"
    # cut, not rounded: a persisted time is never later than the moment it records
    assert timeutil.rfc3339(T0 + timedelta(microseconds=999_999)) == "2025-01-01T12:00:00Z"


def test_micro_as_kubernetes_writes_a_micro_time() -> None:
    assert timeutil.rfc3339(T0 + timedelta(microseconds=42), micro=True) == "2025-01-01T12:00:00.000042Z"


def test_another_offset_is_written_in_utc() -> None:
    berlin = T0.astimezone(timezone(timedelta(hours=1)))
    assert timeutil.rfc3339(berlin) == "2025-01-01T12:00:00Z"


@pytest.mark.parametrize("micro", [False, True])
def test_round_trip(micro: bool) -> None:
    t = T0 + timedelta(seconds=90, microseconds=123_456 if micro else 0)
    assert timeutil.parse_rfc3339(timeutil.rfc3339(t, micro=micro)) == t


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-01-01T12:00:00Z", T0),
        ("2025-01-01T12:00:00.123456Z", T0 + timedelta(microseconds=123_456)),  # a MicroTime
        ("2025-01-01T12:00:00.5Z", T0 + timedelta(microseconds=500_000)),
        ("2025-01-01T12:00:00.123456789Z", T0 + timedelta(microseconds=123_456)),  # RFC3339Nano: cut to micro
        ("2025-01-01T13:30:00+01:30", T0),
        ("2025-01-01t12:00:00z", T0),  # RFC 3339 allows lowercase
    ],
)
def test_parse(text: str, expected: datetime) -> None:
    parsed = timeutil.parse_rfc3339(text)
    assert parsed == expected and parsed is not None and parsed.tzinfo == UTC


@pytest.mark.parametrize("text", [None, "", "yesterday", "2025-13-01T12:00:00Z", "2025-01-01T12:00:00"])
def test_no_time_or_no_offset_is_none(text: str | None) -> None:
    assert timeutil.parse_rfc3339(text) is None
