"""The chart's values documented from one source: values.yaml's keys, types and ``# --`` comments
against values.schema.json and the chart README's table (hack/chartdocs.py generates the
schema's descriptions and defaults and the table; these tests fail on drift)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from hack import chartdocs

CHART = Path(__file__).resolve().parents[2] / "charts" / "modeldeploy-operator"
JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}


def _values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return values


def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
    return schema


def _json_type(value: Any) -> str:
    return "null" if value is None else JSON_TYPES[type(value)]


def _allows(node: dict[str, Any], value: Any) -> bool:
    declared = node.get("type")
    if declared is None:  # free-form (e.g. affinity's content)
        return True
    allowed = set(declared) if isinstance(declared, list) else {declared}
    actual = _json_type(value)
    return actual in allowed or (actual == "integer" and "number" in allowed)


def _check(value: Any, node: dict[str, Any], path: str, problems: list[str]) -> None:
    """``value`` (from values.yaml) against schema ``node``: its type, and its keys/items recursively."""
    if not _allows(node, value):
        problems.append(f"{path}: values.yaml has {_json_type(value)} {value!r}, schema {node.get('type')}")
        return
    if isinstance(value, dict):
        props = node.get("properties")
        extra = node.get("additionalProperties", True)
        for key, sub in value.items():
            if isinstance(props, dict) and key in props:
                _check(sub, props[key], f"{path}.{key}", problems)
            elif isinstance(extra, dict):
                _check(sub, extra, f"{path}.{key}", problems)
            elif extra is False:
                problems.append(f"{path}.{key}: in values.yaml, not in the schema (which forbids other keys)")
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for i, item in enumerate(value):
            _check(item, node["items"], f"{path}[{i}]", problems)


def test_every_values_key_is_in_the_schema_with_its_type() -> None:
    problems: list[str] = []
    _check(_values(), _schema(), "values", problems)
    assert not problems, "\n".join(problems)


def test_every_schema_property_is_in_values_yaml() -> None:
    missing: list[str] = []

    def walk(node: dict[str, Any], value: Any, path: str) -> None:
        for key, sub in (node.get("properties") or {}).items():
            if not isinstance(value, dict) or key not in value:
                missing.append(f"{path}{key}")
            else:
                walk(sub, value[key], f"{path}{key}.")

    walk(_schema(), _values(), "")
    assert not missing, f"schema properties without a default in values.yaml: {missing}"


def test_schema_and_readme_table_are_generated_from_values_yaml() -> None:
    stale = [path.name for path, text in chartdocs.generated(CHART).items() if path.read_text() != text]
    assert not stale, f"{stale} out of date with values.yaml: run `python -m hack.chartdocs`"


def test_every_row_has_the_comment_type_and_default_of_values_yaml() -> None:
    # What the generator wrote, read back: each documented key's schema node carries values.yaml's
    # comment and value, and the README has its row.
    schema, readme = _schema(), (CHART / "README.md").read_text()
    rows = chartdocs.rows((CHART / "values.yaml").read_text())
    assert {r.path[0] for r in rows} == set(_values()), "every top-level key is documented"
    for row in rows:
        node = schema
        for part in row.path:
            node = node["properties"][part]
        assert node["description"] == row.description, row.key
        assert node["default"] == row.default, row.key
        assert _allows(node, row.default), row.key
        assert f"| `{row.key}` | " in readme, row.key


def test_comments_are_the_helm_docs_ones() -> None:
    text = """\
# A heading, not a key's comment.

# -- Documented,
# over two lines.
a: 1
# - a commented-out example below a key is not the next key's comment

b:
  # -- Nested.
  c: ""
  list:
    # -- inside a list: not a key of the values
    - d: 1
"""
    docs = chartdocs.comments(text)
    assert docs == {("a",): "Documented, over two lines.", ("b", "c"): "Nested."}
    with pytest.raises(chartdocs.ChartDocsError, match=r"no `# --` comment above b\.list"):
        chartdocs.rows(text)


def test_table_cells_stay_one_cell_and_plain_text() -> None:
    rows = [chartdocs.Row(("k",), {"big": "x" * 80}, "a | b, <release> but `<kept>`")]
    assert chartdocs.table(rows).splitlines()[-1] == (
        "| `k` | see [`values.yaml`](values.yaml) | a \\| b, &lt;release&gt; but `<kept>` |"
    )
