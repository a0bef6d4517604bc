"""RFC 3339 timestamps, the one home for writing and reading them.

Kubernetes writes two forms: ``metav1.Time`` with whole seconds (``2025-01-01T12:00:00Z``, what
the operator persists in status and Events) and ``metav1.MicroTime`` with six fractional digits
(Lease renewals, command nonces). Both are written in UTC with a ``Z``.
"""

from __future__ import annotations

from datetime import UTC, datetime

_SECONDS = "%Y-%m-%dT%H:%M:%SZ"
_MICROSECONDS = "%Y-%m-%dT%H:%M:%S.%fZ"


def rfc3339(dt: datetime, *, micro: bool = False) -> str:
    """``dt`` in UTC as RFC 3339: whole seconds (``metav1.Time``), or microseconds with ``micro``."""
    return dt.astimezone(UTC).strftime(_MICROSECONDS if micro else _SECONDS)


def parse_rfc3339(value: str | None) -> datetime | None:
    """An RFC 3339 timestamp as an aware UTC datetime.

    None for None, an empty string, a value that is no timestamp, or one without a time offset
    (``Z`` or ``+hh:mm``): a local time cannot be compared with the operator's clock. Any number
    of fractional-second digits is read (a MicroTime has six; digits past the sixth are dropped),
    and so are a lowercase ``t`` and ``z``, which RFC 3339 allows.
    """
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.upper())
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    return parsed.astimezone(UTC)
