"""Measurements the tests take while they assert (timings, counts), shown once in pytest's terminal
summary (tests/conftest.py) and at once with ``pytest -s``. Recording one proves nothing by itself:
the test that measures it asserts what it must."""

from __future__ import annotations

#: section -> name -> value, in the order recorded
FIGURES: dict[str, dict[str, str]] = {}


def figure(section: str, name: str, value: str) -> None:
    FIGURES.setdefault(section, {})[name] = value
    print(f"\n[{section}] {name}: {value}", flush=True)


def summary_lines() -> list[str]:
    lines: list[str] = []
    for section, values in FIGURES.items():
        lines.append(f"{section}:")
        lines.extend(f"  {name}: {value}" for name, value in values.items())
    return lines
