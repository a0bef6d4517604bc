"""Generate the CRDs (ModelDeployment, BatchInference) from the typed API models (the one source of
truth).

pydantic's JSON schema is turned into a Kubernetes *structural* openAPIV3Schema:
``$ref``s are inlined, ``Optional`` unions collapsed, titles and defaults dropped
(the operator applies defaults when it parses, so ``has()`` in CEL rules sees what the
user wrote), free-form objects marked ``x-kubernetes-preserve-unknown-fields``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.config import JsonDict

from . import api
from .batch import api as bapi

MAX_NAME_LENGTH = 55  # NAME-preview, NAME-canary must stay DNS-1035 labels (<= 63)
#: Services are named after the ModelDeployment, so its name must be a DNS-1035 label (no dots, no
#: leading digit), which is stricter than the DNS-1123 subdomain the API server checks for any object.
DNS_1035_LABEL = "^[a-z]([-a-z0-9]*[a-z0-9])?$"

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Ready", "type": "string", "jsonPath": ".status.ready", "description": "Ready/desired pods."},
    {
        "name": "Version",
        "type": "integer",
        "jsonPath": ".status.servingVersion",
        "description": "Model version serving stable traffic.",
    },
    {
        "name": "Strategy",
        "type": "string",
        "jsonPath": ".status.strategy",
        "description": "Rollout strategy.",
    },
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Lifecycle phase."},
    {
        "name": "Weight",
        "type": "integer",
        "jsonPath": ".status.canaryWeight",
        "description": "Percent of traffic on the candidate.",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {
        "name": "Stable",
        "type": "integer",
        "jsonPath": ".status.stableRevision",
        "priority": 1,
        "description": "Stable revision.",
    },
    {
        "name": "Candidate",
        "type": "integer",
        "jsonPath": ".status.candidateRevision",
        "priority": 1,
        "description": "Candidate revision.",
    },
    {
        "name": "Step",
        "type": "integer",
        "jsonPath": ".status.currentStep",
        "priority": 1,
        "description": "Canary step index.",
    },
]

_DROP = {"title", "default", "examples", "propertyNames"}


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_structural(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = copy.deepcopy(defs[node.pop("$ref").rsplit("/", 1)[-1]])
        target.update({k: v for k, v in node.items() if k == "description"})
        node = {**{k: v for k, v in node.items() if k != "description"}, **target}
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"union types are not structural: {options}")
        merged = dict(options[0])
        merged.update(node)
        node = merged
        if "$ref" in node:
            return _structural(node, defs)
    if "allOf" in node and len(node["allOf"]) == 1:
        merged = dict(node.pop("allOf")[0])
        merged.update(node)
        return _structural(merged, defs)
    if "const" in node:
        node["enum"] = [node.pop("const")]
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "additionalProperties":
            if value is False:
                continue
            if value is True or value == {}:
                out["x-kubernetes-preserve-unknown-fields"] = True
                continue
            out[key] = _structural(value, defs)
        elif key == "properties":
            out[key] = {k: _structural(v, defs) for k, v in value.items()}
        elif key == "items":
            out[key] = _structural(value, defs)
        else:
            out[key] = value
    key_max = (node.get("propertyNames") or {}).get("maxLength")
    if key_max is not None:
        # A structural schema has no propertyNames: a map's key length is checked by CEL instead.
        rule = api.cel(
            f"self.all(k, size(k) <= {key_max})", f"every key must be at most {key_max} characters"
        )
        out["x-kubernetes-validations"] = [*out.get("x-kubernetes-validations", []), rule]
    if out.get("type") == "object" and "properties" in out and "additionalProperties" in out:
        del out["additionalProperties"]
    if out.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" in out:
        del out["additionalProperties"]
    return out


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _structural(raw, defs)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Resource:
    """One custom resource of the group: its names, typed models, columns and CRD extras."""

    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    spec: type[BaseModel]
    status: type[BaseModel]
    description: str
    printer_columns: list[dict[str, Any]]
    source: str
    metadata_rules: list[JsonDict] = field(default_factory=list)
    subresources: dict[str, Any] = field(default_factory=lambda: {"status": {}})

    @property
    def file(self) -> str:
        return f"{api.GROUP}_{self.plural}.yaml"


MODEL_DEPLOYMENT = Resource(
    kind=api.KIND,
    plural=api.PLURAL,
    singular=api.SINGULAR,
    short_names=tuple(api.SHORT_NAMES),
    spec=api.ModelDeploymentSpec,
    status=api.ModelDeploymentStatus,
    description="ModelDeployment serves one model on NVIDIA Triton Inference Server and rolls new "
    "versions out progressively (canary, blue-green, rolling), gated on model health and Triton "
    "metrics, with automatic rollback.",
    printer_columns=PRINTER_COLUMNS,
    source="operator/modeldeploy/api.py",
    metadata_rules=[
        api.cel(
            f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
            f"metadata.name must be at most {MAX_NAME_LENGTH} characters "
            "(Services NAME-canary and NAME-preview are derived from it)",
        ),
        api.cel(
            f"self.metadata.name.matches('{DNS_1035_LABEL}')",
            "metadata.name must be a DNS-1035 label: lowercase letters, digits and '-', starting with "
            "a letter (no dots), because the Services are named after it",
        ),
    ],
    subresources={
        "status": {},
        "scale": {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        },
    },
)

#: The Job, and the job-name label on its pods, are named after the BatchInference: a label value
#: is at most 63 characters, and the Job controller adds "-<index>-<suffix>" to pod names.
BATCH_MAX_NAME_LENGTH = 52

BATCH_INFERENCE = Resource(
    kind=bapi.KIND,
    plural=bapi.PLURAL,
    singular=bapi.SINGULAR,
    short_names=bapi.SHORT_NAMES,
    spec=bapi.BatchInferenceSpec,
    status=bapi.BatchInferenceStatus,
    description="BatchInference scores every record under an input location with a model on Triton, "
    "in parallel worker pods (an Indexed Job), and writes one results file per input shard, an errors "
    "file per shard and a manifest; a pod or operator restarted redoes only unfinished shards.",
    printer_columns=[
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Phase."},
        {
            "name": "Progress",
            "type": "string",
            "jsonPath": ".status.progress",
            "description": "Shards done/total.",
        },
        {
            "name": "Records",
            "type": "integer",
            "jsonPath": ".status.records",
            "description": "Records scored.",
        },
        {
            "name": "Failed",
            "type": "integer",
            "jsonPath": ".status.recordsFailed",
            "description": "Records in the errors files.",
        },
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        {
            "name": "Reason",
            "type": "string",
            "jsonPath": '.status.conditions[?(@.type=="Failed")].reason',
            "priority": 1,
            "description": "Why it failed.",
        },
    ],
    source="operator/modeldeploy/batch/api.py",
    metadata_rules=[
        api.cel(
            f"size(self.metadata.name) <= {BATCH_MAX_NAME_LENGTH}",
            f"metadata.name must be at most {BATCH_MAX_NAME_LENGTH} characters "
            "(the Job and its pods' job-name label are named after it)",
        ),
        api.cel(
            f"self.metadata.name.matches('{DNS_1035_LABEL}')",
            "metadata.name must be a DNS-1035 label: lowercase letters, digits and '-', starting with "
            "a letter (no dots), because the Job and its pods are named after it",
        ),
    ],
)

RESOURCES = (MODEL_DEPLOYMENT, BATCH_INFERENCE)


def openapi_schema(res: Resource = MODEL_DEPLOYMENT) -> dict[str, Any]:
    return {
        "type": "object",
        "description": res.description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": f"{api.GROUP}/{api.VERSION}"},
            "kind": {"type": "string", "description": res.kind},
            "metadata": {"type": "object"},
            "spec": schema_of(res.spec),
            "status": schema_of(res.status),
        },
        "x-kubernetes-validations": list(res.metadata_rules),
    }


def crd(res: Resource = MODEL_DEPLOYMENT) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{res.plural}.{api.GROUP}",
            "labels": {"app.kubernetes.io/name": "modeldeploy", "app.kubernetes.io/part-of": "modeldeploy"},
        },
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": res.kind,
                "listKind": f"{res.kind}List",
                "plural": res.plural,
                "singular": res.singular,
                "shortNames": list(res.short_names),
                "categories": ["all", "modeldeploy"],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": openapi_schema(res)},
                    "subresources": res.subresources,
                    "additionalPrinterColumns": res.printer_columns,
                }
            ],
        },
    }


def render_crd_yaml(res: Resource = MODEL_DEPLOYMENT) -> str:
    header = f"# Generated by `make crds` from {res.source}. Do not edit by hand.\n"
    return header + yaml.safe_dump(crd(res), sort_keys=False, width=120)


def _type_of(node: dict[str, Any]) -> str:
    kind = str(node.get("type", "object"))
    if kind == "array":
        return f"[]{_type_of(node.get('items', {}))}"
    if kind == "object" and "additionalProperties" in node:
        return f"map[string]{_type_of(node['additionalProperties'])}"
    return kind


def _constraints(node: dict[str, Any]) -> str:
    parts = []
    if "enum" in node:
        parts.append("one of " + ", ".join(f"`{v}`" for v in node["enum"]))
    for key, label in (
        ("minimum", ">="),
        ("maximum", "<="),
        ("minItems", "min items"),
        ("maxItems", "max items"),
        ("maxLength", "max length"),
        ("pattern", "pattern"),
    ):
        if key in node:
            value = f"`{node[key]}`" if key == "pattern" else node[key]
            parts.append(f"{label} {value}")
    return "; ".join(parts)


def _rows(node: dict[str, Any], path: str, out: list[str]) -> None:
    required = set(node.get("required", []))
    for name, child in (node.get("properties") or {}).items():
        here = f"{path}.{name}"
        desc = str(child.get("description", "")).replace("|", "\\|").replace("\n", " ")
        extra = _constraints(child).replace("|", "\\|")
        req = "yes" if name in required else ""
        out.append(f"| `{here}` | {_type_of(child)} | {req} | {desc} | {extra} |")
        for rule in child.get("x-kubernetes-validations", []):
            out.append(f"| | | | rule: {rule['message']} | |")
        target = child.get("items", child) if child.get("type") == "array" else child
        if target.get("properties"):
            _rows(target, here + ("[]" if child.get("type") == "array" else ""), out)


def render_api_reference(res: Resource = MODEL_DEPLOYMENT) -> str:
    """The API reference (docs/api-reference.md, docs/batchinference-api.md), generated from the same
    schema as the CRD."""
    schema = openapi_schema(res)
    out = [
        f"# {res.kind} API reference (`{api.GROUP}/{api.VERSION}`)",
        "",
        f"Generated by `make crds` from `{res.source}`; a test fails when it drifts. "
        f"`kubectl explain {res.singular}.spec` shows the same descriptions.",
        "",
        schema["description"],
        "",
        "## metadata",
        "",
        *(f"- rule: {rule['message']}" for rule in schema.get("x-kubernetes-validations", [])),
        "",
    ]
    for section in ("spec", "status"):
        node = schema["properties"][section]
        out += [f"## {section}", "", str(node.get("description", "")), ""]
        for rule in node.get("x-kubernetes-validations", []):
            out.append(f"- rule: {rule['message']}")
        out += [
            "",
            "| field | type | required | description | constraints |",
            "| --- | --- | --- | --- | --- |",
        ]
        _rows(node, section, out)
        out.append("")
    out += ["## Printer columns", "", "| column | from | shown |", "| --- | --- | --- |"]
    for col in res.printer_columns:
        out.append(
            f"| {col['name']} | `{col['jsonPath']}` | {'-o wide' if col.get('priority') else 'always'} |"
        )
    return "\n".join(out) + "\n"
