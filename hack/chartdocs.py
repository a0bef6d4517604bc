"""The Helm chart's values documented from one source: ``values.yaml``.

Each key's ``# --`` comment right above it (the helm-docs convention) is its description and its
value is its default. From them this writes

* ``values.schema.json``: the ``description`` and ``default`` of every documented key (the rest of
  the schema, types, enums, patterns and required keys, is written by hand; tests/tools checks
  it against ``values.yaml`` key by key and type by type);
* ``README.md``: the values table between the ``values-table`` markers.

A row of the table is a key with a ``# --`` comment, or a leaf (a scalar, a list, an empty map); a
map with a comment of its own is one row (``resources``), one without is described by its keys.
Every row must have a comment.

CLI::

    python -m hack.chartdocs            # rewrite the schema's descriptions/defaults and the table
    python -m hack.chartdocs --check    # exit 1 and name the files that are out of date
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[1] / "charts" / "modeldeploy-operator"
BEGIN = (
    "<!-- values-table:begin (generated from values.yaml by `python -m hack.chartdocs`; edit values.yaml) -->"
)
END = "<!-- values-table:end -->"
#: a default longer than this is not inlined in the table (it says "see values.yaml")
INLINE_MAX = 60

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_]+):(?:\s|$)")


class ChartDocsError(ValueError):
    """values.yaml cannot be documented as it is (a row without a comment, a key the schema lacks)."""


@dataclass(frozen=True)
class Row:
    path: tuple[str, ...]
    default: Any
    description: str | None

    @property
    def key(self) -> str:
        return ".".join(self.path)


def _lookup(values: Any, path: tuple[str, ...]) -> tuple[bool, Any]:
    node = values
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def comments(text: str) -> dict[tuple[str, ...], str]:
    """The ``# --`` comment above each key of ``values.yaml`` (keys inside lists are not keys)."""
    values = yaml.safe_load(text)
    docs: dict[tuple[str, ...], str] = {}
    stack: list[tuple[int, str]] = []
    block: list[str] = []  # the comment lines right above the current line
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            block.append(stripped)
            continue
        match = _KEY.match(line)
        if match is None:
            block = []
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = (*(k for _, k in stack), match["key"])
        found, _ = _lookup(values, path)
        if found:
            stack.append((indent, match["key"]))
            starts = [i for i, c in enumerate(block) if c == "# --" or c.startswith("# -- ")]
            if starts:
                lines = [c.removeprefix("#").strip() for c in block[starts[0] :]]
                lines[0] = lines[0].removeprefix("--").strip()
                docs[path] = " ".join(x for x in lines if x)
        block = []
    return docs


def rows(text: str) -> list[Row]:
    values = yaml.safe_load(text)
    docs = comments(text)
    out: list[Row] = []

    def walk(node: dict[str, Any], path: tuple[str, ...]) -> None:
        for key, value in node.items():
            here = (*path, key)
            if isinstance(value, dict) and value and here not in docs:
                walk(value, here)
            else:
                out.append(Row(here, value, docs.get(here)))

    walk(values, ())
    missing = [r.key for r in out if not r.description]
    if missing:
        raise ChartDocsError(f"values.yaml: no `# --` comment above {', '.join(missing)}")
    return out


def _inline(value: Any) -> str | None:
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    text = json.dumps(value, separators=(", ", ": "))
    return f"`{text}`" if len(text) <= INLINE_MAX else None


def _markdown(text: str) -> str:
    """``text`` in a table cell: pipes escaped, and ``<...>`` outside code spans not taken for HTML."""
    parts = text.replace("|", "\\|").split("`")
    for i in range(0, len(parts), 2):  # even parts are outside code spans
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def table(table_rows: list[Row]) -> str:
    lines = ["| key | default | description |", "| --- | --- | --- |"]
    for row in table_rows:
        default = _inline(row.default) or "see [`values.yaml`](values.yaml)"
        description = _markdown(row.description or "")
        lines.append(f"| `{row.key}` | {default} | {description} |")
    return "\n".join(lines)


def _schema_node(schema: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    node = schema
    for part in path:
        props = node.get("properties")
        if not isinstance(props, dict) or part not in props:
            raise ChartDocsError(f"values.schema.json has no property {'.'.join(path)}")
        node = props[part]
    return node


def _with(node: dict[str, Any], key: str, value: Any, after: str) -> dict[str, Any]:
    """``node`` with ``key`` set: in place when present, else right after ``after`` (or first)."""
    if key in node:
        return {k: (value if k == key else v) for k, v in node.items()}
    out: dict[str, Any] = {}
    if after not in node:
        out[key] = value
    for k, v in node.items():
        out[k] = v
        if k == after:
            out[key] = value
    return out


def render_schema(schema_text: str, table_rows: list[Row]) -> str:
    schema = json.loads(schema_text)
    for row in table_rows:
        parent = _schema_node(schema, row.path[:-1])
        node = _schema_node(schema, row.path)
        node = _with(node, "description", row.description, after="type")
        node = _with(node, "default", row.default, after="description")
        parent["properties"][row.path[-1]] = node
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def render_readme(readme_text: str, table_rows: list[Row]) -> str:
    begin, end = readme_text.find(BEGIN), readme_text.find(END)
    if begin < 0 or end < begin:
        raise ChartDocsError(f"README.md has no {BEGIN!r} ... {END!r} block")
    return readme_text[: begin + len(BEGIN)] + "\n" + table(table_rows) + "\n" + readme_text[end:]


def generated(chart: Path = CHART) -> dict[Path, str]:
    """What the schema and the README should contain."""
    table_rows = rows((chart / "values.yaml").read_text())
    return {
        chart / "values.schema.json": render_schema((chart / "values.schema.json").read_text(), table_rows),
        chart / "README.md": render_readme((chart / "README.md").read_text(), table_rows),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only say which files are out of date")
    args = parser.parse_args(argv)
    try:
        wanted = generated()
    except ChartDocsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    stale = [path for path, text in wanted.items() if path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"out of date: {path} (run python -m hack.chartdocs)", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(wanted[path])
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
