"""The generated CRD: no drift from the typed API, a structural schema, the expected surface."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from modeldeploy import api, crdgen

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "modeldeploy.io_modeldeployments.yaml"
# JSONSchemaProps keywords a structural CRD schema may use (apiextensions.k8s.io/v1); anything else
# (propertyNames, const, $defs, ...) is rejected or silently dropped by the API server.
ALLOWED_KEYWORDS = {
    "description", "type", "format", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum",
    "maxLength", "minLength", "pattern", "maxItems", "minItems", "uniqueItems", "multipleOf", "enum",
    "maxProperties", "minProperties", "required", "items", "properties", "additionalProperties", "nullable",
    "example", "externalDocs", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-embedded-resource",
    "x-kubernetes-int-or-string", "x-kubernetes-list-map-keys", "x-kubernetes-list-type",
    "x-kubernetes-map-type", "x-kubernetes-validations",
}  # fmt: skip
FORBIDDEN = ("$ref", "anyOf", "allOf", "oneOf", "not", "title", "default", "$defs", "definitions")


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return crdgen.crd()


@pytest.fixture(scope="module")
def version(crd: dict[str, Any]) -> dict[str, Any]:
    (v,) = crd["spec"]["versions"]
    return v  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def schema(version: dict[str, Any]) -> dict[str, Any]:
    return version["schema"]["openAPIV3Schema"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module", params=crdgen.RESOURCES, ids=lambda r: r.kind)
def resource(request: pytest.FixtureRequest) -> crdgen.Resource:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def every_schema(resource: crdgen.Resource) -> dict[str, Any]:
    """Each CRD's schema in turn, for the checks every structural schema must pass."""
    return crdgen.crd(resource)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]  # type: ignore[no-any-return]


def nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node of the tree, with a readable path."""
    yield path or "<root>", node
    for name, child in (node.get("properties") or {}).items():
        yield from nodes(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from nodes(node["additionalProperties"], f"{path}{{}}")


def test_committed_crd_matches_the_generator(resource: crdgen.Resource) -> None:
    path = ROOT / "crds" / resource.file
    assert path.read_text() == crdgen.render_crd_yaml(resource), (
        f"{path.relative_to(ROOT)} drifted from {resource.source}: run `make crds` and commit the result"
    )


def test_rendered_yaml_parses_back_to_the_crd(crd: dict[str, Any]) -> None:
    assert yaml.safe_load(crdgen.render_crd_yaml()) == crd


def test_walk_covers_the_whole_tree(schema: dict[str, Any]) -> None:
    paths = {p for p, _ in nodes(schema)}
    # deep nodes from spec and status are reached (guards the walker used by the checks below)
    assert ".spec.model.config.ensembleSteps[].inputMap{}" in paths
    assert ".spec.rollout.steps[].pause.duration" in paths
    assert ".status.history[].spec" in paths
    assert ".status.lastAnalysis.values{}" in paths
    assert len(paths) > 150


def test_schema_has_no_non_structural_keywords(
    every_schema: dict[str, Any], resource: crdgen.Resource
) -> None:
    bad = [f"{path}: {key}" for path, node in nodes(every_schema) for key in FORBIDDEN if key in node]
    assert not bad, bad
    # and nowhere in the raw document either (e.g. inside items of passthrough nodes)
    text = (ROOT / "crds" / resource.file).read_text()
    assert not re.search(r"^\s*(\$ref|anyOf|allOf|oneOf|title|default):", text, re.M)


def test_only_kubernetes_schema_keywords(every_schema: dict[str, Any]) -> None:
    unknown = [
        f"{path}: {k}" for path, node in nodes(every_schema) for k in node if k not in ALLOWED_KEYWORDS
    ]
    assert not unknown, unknown
    for path, node in nodes(every_schema):
        # OpenAPI v3.0 (what the API server speaks): exclusive bounds are booleans, not numbers
        for key in ("exclusiveMinimum", "exclusiveMaximum"):
            assert isinstance(node.get(key, False), bool), f"{path}: {key} must be a boolean"
        assert node.get("uniqueItems") is not True, f"{path}: uniqueItems: true is refused in CRDs"


def test_every_node_has_a_type(every_schema: dict[str, Any]) -> None:
    untyped = [path for path, node in nodes(every_schema) if "type" not in node]
    assert not untyped, untyped


def test_object_nodes_with_properties_are_objects(every_schema: dict[str, Any]) -> None:
    wrong = [
        path
        for path, node in nodes(every_schema)
        if ("properties" in node or "additionalProperties" in node) and node.get("type") != "object"
    ]
    assert not wrong, wrong


def test_arrays_have_items_and_maps_do_not_mix_properties(every_schema: dict[str, Any]) -> None:
    no_items = [
        p for p, n in nodes(every_schema) if n.get("type") == "array" and not isinstance(n.get("items"), dict)
    ]
    mixed = [p for p, n in nodes(every_schema) if "properties" in n and "additionalProperties" in n]
    assert not no_items, no_items
    assert not mixed, mixed


def test_every_property_has_a_description(every_schema: dict[str, Any]) -> None:
    assert every_schema.get("description")
    missing = []
    for path, node in nodes(every_schema):
        for name, child in (node.get("properties") or {}).items():
            # The API server publishes ObjectMeta's own documentation for the root metadata.
            if path == "<root>" and name == "metadata":
                continue
            if not child.get("description"):
                missing.append(f"{path}.{name}" if path != "<root>" else name)
    assert not missing, missing


def test_names_scope_and_short_name(crd: dict[str, Any]) -> None:
    assert crd["metadata"]["name"] == "modeldeployments.modeldeploy.io"
    assert crd["spec"]["group"] == "modeldeploy.io"
    assert crd["spec"]["scope"] == "Namespaced"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["singular"]) == (
        "ModelDeployment",
        "modeldeployments",
        "modeldeployment",
    )
    assert "md" in names["shortNames"]


def test_single_served_storage_version(version: dict[str, Any]) -> None:
    assert version["name"] == "v1alpha1"
    assert version["served"] is True and version["storage"] is True


def test_status_and_scale_subresources(version: dict[str, Any], schema: dict[str, Any]) -> None:
    sub = version["subresources"]
    assert sub["status"] == {}
    scale = sub["scale"]
    assert scale["specReplicasPath"] == ".spec.replicas"
    assert scale["statusReplicasPath"] == ".status.replicas"
    assert scale["labelSelectorPath"] == ".status.selector"
    # the paths point at fields that exist in the schema
    assert schema["properties"]["spec"]["properties"]["replicas"]["type"] == "integer"
    assert schema["properties"]["status"]["properties"]["replicas"]["type"] == "integer"
    assert schema["properties"]["status"]["properties"]["selector"]["type"] == "string"


def test_printer_columns(version: dict[str, Any], schema: dict[str, Any]) -> None:
    cols = version["additionalPrinterColumns"]
    default_cols = [c for c in cols if not c.get("priority")]
    assert [c["name"] for c in default_cols] == ["Ready", "Version", "Strategy", "Phase", "Weight", "Age"]
    by_name = {c["name"]: c for c in cols}
    assert by_name["Age"] == {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    status_props = schema["properties"]["status"]["properties"]
    for col in cols:
        if col["jsonPath"].startswith(".status."):
            field = col["jsonPath"].split(".")[2]
            assert field in status_props, f"column {col['name']} reads missing status field {field}"
            expected = {"string": "string", "integer": "integer"}[col["type"]]
            assert status_props[field]["type"] == expected, col


def _rules(node: dict[str, Any]) -> list[str]:
    return [v["rule"] for v in node.get("x-kubernetes-validations") or []]


def test_cel_replicas_xor_autoscaling(schema: dict[str, Any]) -> None:
    rules = _rules(schema["properties"]["spec"])
    assert any("has(self.replicas)" in r and "has(self.autoscaling)" in r for r in rules), rules


def test_cel_min_replicas_at_most_max(schema: dict[str, Any]) -> None:
    rules = _rules(schema["properties"]["spec"]["properties"]["autoscaling"])
    assert any("self.minReplicas <= self.maxReplicas" in r for r in rules), rules


def test_cel_weights_rise(schema: dict[str, Any]) -> None:
    rollout = schema["properties"]["spec"]["properties"]["rollout"]
    rules = _rules(rollout)
    assert any("self.steps" in r and "weight" in r and "isSorted()" in r for r in rules), rules
    weight = rollout["properties"]["steps"]["items"]["properties"]["weight"]
    assert (weight["minimum"], weight["maximum"]) == (1, 100)


def test_cel_rules_carry_messages(schema: dict[str, Any]) -> None:
    for path, node in nodes(schema):
        for v in node.get("x-kubernetes-validations") or []:
            assert v.get("message"), f"{path}: rule {v['rule']!r} has no message"


def test_cel_rules_reference_existing_fields(schema: dict[str, Any]) -> None:
    """Cheap sanity check: every ``self.a.b`` chain and every fieldPath of a rule names
    properties of the node that carries it (a typo'd field would make CEL fail at admission)."""
    checked = 0
    for path, node in nodes(schema):
        for v in node.get("x-kubernetes-validations") or []:
            chains = [m.split(".")[1:] for m in re.findall(r"\bself(?:\.[A-Za-z_]\w*)+", v["rule"])]
            if v.get("fieldPath"):
                chains.append(v["fieldPath"].split(".")[1:])
            for chain in chains:
                cur = node
                for part in chain:
                    props = cur.get("properties")
                    if props is None:  # passthrough or metadata: nothing to check below
                        break
                    assert part in props, f"{path}: rule {v['rule']!r} references unknown field {part!r}"
                    cur = props[part]
                    checked += 1
    assert checked >= 10


def test_cel_name_length_fits_derived_service_names(schema: dict[str, Any]) -> None:
    assert any("size(self.metadata.name)" in r for r in _rules(schema))
    assert len(f"{'x' * crdgen.MAX_NAME_LENGTH}-preview") <= 63
    assert len(f"{'x' * crdgen.MAX_NAME_LENGTH}-canary") <= 63


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("resnet", True),
        ("a", True),
        ("a-1", True),
        ("odd.dots", False),
        ("1abc", False),
        ("abc-", False),
        ("Bad", False),
        ("a_b", False),
    ],
)
def test_cel_name_is_a_dns_1035_label(schema: dict[str, Any], name: str, ok: bool) -> None:
    rule = next(r for r in _rules(schema) if "self.metadata.name.matches" in r)
    assert crdgen.DNS_1035_LABEL in rule
    # The pattern is plain RE2 and means the same in Python's re.
    assert bool(re.match(crdgen.DNS_1035_LABEL, name)) is ok


def test_map_key_lengths_of_the_model_are_cel_rules(schema: dict[str, Any]) -> None:
    """A structural schema cannot say how long a map's keys may be (no propertyNames), so every map
    whose keys the model bounds carries the bound as a CEL rule, and admission refuses what the
    operator's model would."""
    maps = {
        path: node
        for path, node in nodes(schema)
        if isinstance(node.get("additionalProperties"), dict) and not path.startswith(".status")
    }
    bounded = {path: _rules(node) for path, node in maps.items() if node.get("maxProperties")}
    assert bounded[".spec.server.podLabels"] == ["self.all(k, size(k) <= 317)"]
    assert bounded[".spec.model.config.parameters"] == ["self.all(k, size(k) <= 128)"]
    assert bounded[".spec.server.resources.requests"] == ["self.all(k, size(k) <= 253)"]
    missing = [
        path for path, rules in bounded.items() if not any("self.all(k, size(k) <=" in r for r in rules)
    ]
    assert not missing, missing
    assert len(bounded) >= 9


def test_enums_come_from_the_api(schema: dict[str, Any]) -> None:
    spec = schema["properties"]["spec"]["properties"]
    assert set(spec["model"]["properties"]["format"]["enum"]) == {f.value for f in api.ModelFormat}
    assert set(spec["rollout"]["properties"]["strategy"]["enum"]) == {s.value for s in api.Strategy}
    assert set(spec["model"]["required"]) == {"format", "storageUri", "version"}


def test_rollout_phases_and_pause_reasons_are_enums_described_by_the_code(schema: dict[str, Any]) -> None:
    rollout = schema["properties"]["status"]["properties"]["rollout"]["properties"]
    for field, enum, meanings in (
        ("state", api.RolloutPhase, api.ROLLOUT_PHASES),
        ("pauseReason", api.PauseReason, api.PAUSE_REASONS),
    ):
        assert rollout[field]["enum"] == [v.value for v in enum]
        assert set(meanings) == set(enum), f"{field}: every value has its meaning"
        for value, meaning in meanings.items():
            assert f"{value.value}: {meaning}" in rollout[field]["description"]


def test_api_reference_matches_the_schema() -> None:
    docs = Path(__file__).resolve().parents[2] / "docs" / "api-reference.md"
    assert docs.read_text() == crdgen.render_api_reference(), (
        "docs/api-reference.md is stale: run `make crds`"
    )
    batch = docs.parent / "batchinference-api.md"
    assert batch.read_text() == crdgen.render_api_reference(crdgen.BATCH_INFERENCE), (
        "docs/batchinference-api.md is stale: run `make crds`"
    )
