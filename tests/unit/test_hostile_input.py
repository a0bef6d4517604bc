"""Hostile input, unit tier: whatever a user writes into ``spec``, the operator either refuses it
(pydantic ``ValidationError``, which mirrors the CRD schema) or turns it into objects without crashing.

* ``test_any_spec_validates_or_renders``: a property-based generator walks the CRD's own
  openAPIV3Schema (``crdgen``, the schema the API server enforces) and draws specs that mostly
  follow it, with hostile values spliced in at random places: huge strings, deep nesting, wrong
  types, unicode, boundary numbers, oversized lists. Every spec that validates is rendered the
  way the operator renders it (revision hash, Deployment, ConfigMap/config.pbtxt, Services, HPA,
  PDB, endpoints, steps, applied-hash annotations, JSON encoding, the rollbackTo round trip).
* ``test_any_valid_spec_reconciles_without_error_and_goes_quiet``: the same specs through the real
  :class:`Reconciler` against an in-memory API: never an exception, and a few reconciles later a
  reconcile writes nothing (no hot loop).
* Rejections by the API server (a child it refuses, e.g. an invalid pod label passed through
  ``server.podLabels``) become status and an Event, roll a candidate back, and are not re-sent.

Two errors are allowed from rendering a spec that validates, because the API server accepts such
specs too and the reconciler reports them as a status condition (tested below): a
:class:`tritonconfig.ConfigRenderError` (a model config Triton cannot load, e.g. an ensemble without
inputs/outputs) and pydantic's "Maximum serialization depth exceeded" for pass-through fields
(``server.affinity`` ...) nested deeper than 255 levels. Anything else fails the test.

Strings are drawn without lone surrogates: JSON from the API server cannot carry them (Go replaces
them with U+FFFD), so they cannot reach the operator.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pydantic
import pytest
import yaml
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from modeldeploy import api, crdgen
from modeldeploy.kube.cache import Cache
from modeldeploy.kube.client import API_MAX_JSON_DEPTH, ApiError, yaml_safe_json
from modeldeploy.modeldeployment import builders, revision, rollout
from modeldeploy.modeldeployment.children import with_applied_hash
from modeldeploy.modeldeployment.reconcile import Reconciler
from modeldeploy.triton import config as tritonconfig

SPEC_SCHEMA: dict[str, Any] = crdgen.openapi_schema()["properties"]["spec"]
#: Per spec, the chance (percent) that a schema node below the root gets a hostile value instead of a
#: conforming one: clean specs exercise the builders, hostile ones the refusals.
HOSTILE_PERCENTS = [0, 0, 0, 1, 3, 10]

BOUNDARY_NUMBERS: list[Any] = [
    0,
    -1,
    1,
    2**31 - 1,
    2**31,
    -(2**31),
    2**53 + 1,
    2**63 - 1,
    2**63,
    -(2**63),
    2**64,
    10**30,
    0.5,
    -0.0,
    1e-300,
    1e308,
    float("inf"),
    float("-inf"),
    float("nan"),
]
ODD_STRINGS: list[str] = [
    "",
    " ",
    "\x00",
    "\n\r\t",
    "ä",
    "模型",
    "🚀🔥",
    "\u202eevil",  # right-to-left override
    "e\u0301",  # combining accent
    "\ufeff",  # byte order mark
    "\uffff",
    '"; rm -rf / #',
    "{{ .Values }}",
    "${HOME}",
    "../../etc/passwd",
    "a" * 63,
    "a" * 64,
    "a" * 253,
    "a" * 254,
    "A-Za-z0-9_.-",
    "-leading-dash",
    "trailing-dash-",
    "UPPER",
    "s3://",
    "s3://bucket with space/x",
    "pvc://",
    "1e1000",
    "-1",
    "0x10",
    "NaN",
    "true",
    "null",
]


def _nest(depth: int, leaf: Any, as_list: bool) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value] if as_list else {"a": value}
    return value


huge_strings = st.builds(
    lambda ch, n: ch * n,
    st.sampled_from(["x", "é", "😀", "\\", '"']),
    st.sampled_from([4097, 70_000, 1_100_000]),
)
deep_nesting = st.builds(
    _nest, st.sampled_from([20, 254, 300, 3000]), st.sampled_from([1, "x", None, {}]), st.booleans()
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)


def hostile() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from(BOUNDARY_NUMBERS),
        st.sampled_from(ODD_STRINGS),
        st.text(max_size=40),  # arbitrary unicode (no lone surrogates)
        huge_strings,
        deep_nesting,
        st.none(),
        st.booleans(),
        json_values,
    )


_REGEX_CACHE: dict[str, st.SearchStrategy[str]] = {}


def _from_regex(pattern: str) -> st.SearchStrategy[str]:
    if pattern not in _REGEX_CACHE:
        _REGEX_CACHE[pattern] = st.from_regex(re.compile(pattern), fullmatch=True)
    return _REGEX_CACHE[pattern]


@st.composite
def from_schema(draw: st.DrawFn, node: dict[str, Any], depth: int = 0, pct: int = 3) -> Any:
    """A value for ``node`` (a structural-schema node): conforming, or with ``pct`` % chance hostile."""
    if depth > 0 and draw(st.integers(0, 99)) < pct:
        return draw(hostile())
    if node.get("x-kubernetes-preserve-unknown-fields"):
        return draw(
            st.one_of(
                json_values, st.dictionaries(st.text(max_size=6), json_values, max_size=3), deep_nesting
            )
        )
    kind = node.get("type")
    if kind == "object" or "properties" in node:
        props: dict[str, Any] = node.get("properties") or {}
        required = set(node.get("required") or [])
        out: dict[str, Any] = {}
        for key, sub in props.items():
            if key in required:
                if draw(st.integers(0, 99)) < 97:
                    out[key] = draw(from_schema(sub, depth + 1, pct))
            elif draw(st.integers(0, 99)) < 25:
                out[key] = draw(from_schema(sub, depth + 1, pct))
        if "additionalProperties" in node and isinstance(node["additionalProperties"], dict):
            keys = st.one_of(
                st.from_regex(r"\A[a-z0-9]([a-z0-9.-]{0,20}[a-z0-9])?(/[a-z]{1,10})?\Z"),
                st.sampled_from(ODD_STRINGS),
                st.text(max_size=12),
            )
            extra = draw(
                st.dictionaries(keys, from_schema(node["additionalProperties"], depth + 1, pct), max_size=3)
            )
            out.update(extra)
        elif not props:
            out.update(draw(st.dictionaries(st.text(max_size=6), json_values, max_size=3)))
        if draw(st.integers(0, 99)) < pct:
            out[draw(st.sampled_from(["unknownField", "", "spec", "x" * 300]))] = draw(json_values)
        return out
    if kind == "array":
        items = node.get("items") or {}
        lo = int(node.get("minItems", 0))
        hi = int(node.get("maxItems", 4))
        choice = draw(st.integers(0, 99))
        if pct and choice < 3:  # one more than allowed
            size = hi + 1
            return [draw(from_schema(items, depth + 1, pct)) for _ in range(min(size, 70))]
        return draw(st.lists(from_schema(items, depth + 1, pct), min_size=lo, max_size=min(hi, max(lo, 3))))
    if kind == "string":
        if "enum" in node:
            odd = pct and draw(st.integers(0, 99)) < 20
            return draw(st.sampled_from(ODD_STRINGS) if odd else st.sampled_from(node["enum"]))
        max_len = int(node.get("maxLength", 64))
        choice = draw(st.integers(0, 99))
        if choice < 5:
            return "a" * (max_len + 1 if pct else max_len)
        if "pattern" in node and choice < 85:
            return draw(_from_regex(node["pattern"]))
        return draw(st.text(min_size=int(node.get("minLength", 0)), max_size=min(max_len, 24)))
    if kind == "integer":
        lo, hi = node.get("minimum"), node.get("maximum")
        bounds = [b for b in (lo, hi) if b is not None]
        edges = [e for b in bounds for e in ((b - 1, b, b + 1) if pct else (b,))]
        inner = st.integers(
            min_value=int(lo) if lo is not None else -5, max_value=int(hi) if hi is not None else 10_000
        )
        return draw(inner | st.sampled_from(edges or [0, -1, 2**31]))
    if kind == "number":
        lo, hi = node.get("minimum"), node.get("maximum")
        return draw(
            st.floats(
                min_value=lo, max_value=hi if hi is not None else 1e6, allow_nan=False, allow_infinity=False
            )
            | st.sampled_from(BOUNDARY_NUMBERS)
        )
    if kind == "boolean":
        return draw(st.booleans())
    return draw(json_values)


VALID_BASE: dict[str, Any] = {
    "model": {"format": "onnx", "storageUri": "s3://models/repo", "version": 1},
    "replicas": 2,
}


@st.composite
def specs(draw: st.DrawFn) -> Any:
    """Mostly schema-shaped specs; sometimes a valid base with one hostile subtree; rarely anything."""
    choice = draw(st.integers(0, 99))
    pct = draw(st.sampled_from(HOSTILE_PERCENTS))
    if choice < 75:
        return draw(from_schema(SPEC_SCHEMA, 0, pct))
    if choice < 95:
        spec = copy.deepcopy(VALID_BASE)
        section = draw(st.sampled_from(sorted(SPEC_SCHEMA["properties"])))
        spec[section] = draw(from_schema(SPEC_SCHEMA["properties"][section], 1, max(pct, 3)))
        return spec
    return draw(hostile())


@contextmanager
def operator_recursion_limit() -> Iterator[None]:
    """The recursion limit the operator runs with (``modeldeploy.kube.client`` raises it at import, so that
    objects nested as deep as the API server accepts can be decoded, validated and copied).

    Hypothesis runs each example under a limit of its own, the caller's depth + 2000, which is below
    it: a valid spec with a pass-through field nested 3000 deep (``deep_nesting``) then raised
    RecursionError in ``copy.deepcopy`` or an enum's error message, a failure of the test's
    surroundings and not of the operator, and only in runs that happened to draw such a spec."""
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(max(before, 3 * API_MAX_JSON_DEPTH))
    try:
        yield
    finally:
        sys.setrecursionlimit(before)


# --------------------------------------------------------------------------- rendering


def _allowed_render_error(exc: BaseException) -> bool:
    if isinstance(exc, tritonconfig.ConfigRenderError):
        return str(exc).startswith("model.config")
    return isinstance(exc, ValueError) and "serialization depth" in str(exc)


def render_everything(spec: api.ModelDeploymentSpec) -> list[dict[str, Any]]:
    """Every object the operator would build for ``spec``, as the reconciler builds them."""
    owner = builders.Owner(name="hostile", namespace="ns", uid="0000")
    rev = revision.revision_hash(spec)
    objs: list[dict[str, Any]] = []
    for replicas in (spec.effective_replicas, None):
        objs.append(builders.build_deployment(owner, spec, rev, revision_number=1, replicas=replicas))
    objs += builders.build_services(owner, spec, stable=rev, candidate=None)
    objs += builders.build_services(owner, spec, stable=rev, candidate="c" * revision.HASH_LENGTH)
    for obj in (
        builders.build_hpa(owner, spec, target="t"),
        builders.build_hpa(owner, spec, target="t", min_replicas=spec.effective_replicas),
        builders.build_pdb(owner, spec),
        builders.build_config_map(owner, spec, rev),  # renders config.pbtxt
    ):
        if obj is not None:
            objs.append(obj)
    assert builders.endpoints(owner, spec) is not None
    total = spec.effective_replicas
    for step in api.steps_of(spec):
        assert 0 <= rollout.candidate_replicas(total, step.weight) <= max(total, 1) * 100
        if step.pause is not None and step.pause.duration is not None:
            assert api.parse_duration(step.pause.duration) >= 0
    if spec.rollout.analysis is not None:
        assert api.parse_duration(spec.rollout.analysis.interval) >= 0
    assert spec.gpu_count >= 0
    for obj in objs:
        json.dumps(with_applied_hash(obj))  # what goes over the wire
    # rollbackTo rebuilds a spec from the remembered pod-shaping part: it must round-trip.
    again = revision.with_pod_shaping(spec, json.loads(json.dumps(revision.pod_shaping(spec))))
    assert revision.revision_hash(again) == rev
    return objs


#: Specs that validate, each rendered, in a second run that rejects the rest (see RECONCILED_EXAMPLES).
RENDERED_EXAMPLES = 30


def test_any_spec_validates_or_renders() -> None:
    seen = {"invalid": 0, "rendered": 0, "reported": 0}

    def validate_or_render(raw: Any, *, valid_only: bool) -> None:
        with operator_recursion_limit():
            try:
                spec = api.ModelDeploymentSpec.model_validate(raw)
            except pydantic.ValidationError as exc:
                # Refused with messages that name where (pydantic locations) and what.
                assert exc.errors(), exc
                if valid_only:
                    reject()
                seen["invalid"] += 1
                return
            try:
                render_everything(spec)
            except Exception as exc:
                if not _allowed_render_error(exc):
                    raise
                seen["reported"] += 1
                return
            seen["rendered"] += 1

    relaxed = settings(
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        database=None,
    )
    # The generator's own mix: mostly refusals, some valid specs.
    settings(relaxed, max_examples=200)(
        given(raw=specs())(lambda raw: validate_or_render(raw, valid_only=False))
    )()
    mixed = dict(seen)
    assert mixed["invalid"] >= 20, mixed
    # Valid specs, exactly RENDERED_EXAMPLES of them: how many of the 200 above validated is the generator's
    # luck (18 on one run, 48 on another), which a threshold on them turned into a flaky failure.
    settings(relaxed, max_examples=RENDERED_EXAMPLES)(
        given(raw=specs())(lambda raw: validate_or_render(raw, valid_only=True))
    )()
    valid = {k: seen[k] - mixed[k] for k in seen}
    print(f"\nhostile specs: {mixed}; valid only: {valid}")
    assert valid["invalid"] == 0 and valid["rendered"] + valid["reported"] == RENDERED_EXAMPLES, valid


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("not a dict", [1, 2, 3]),
        ("string", "spec"),
        ("null", None),
        ("deep list", _nest(5000, 1, True)),
        ("deep dict", _nest(5000, 1, False)),
        ("huge key", {"x" * 1_000_000: 1}),
        (
            "huge storageUri",
            {**VALID_BASE, "model": {**VALID_BASE["model"], "storageUri": "s3://" + "a" * 3000}},
        ),
        ("version overflow", {**VALID_BASE, "model": {**VALID_BASE["model"], "version": 2**31}}),
        ("version float", {**VALID_BASE, "model": {**VALID_BASE["model"], "version": 1.5}}),
        ("version nan", {**VALID_BASE, "model": {**VALID_BASE["model"], "version": float("nan")}}),
        ("replicas huge", {**VALID_BASE, "replicas": 10**30}),
        ("weights 100 then 100", {**VALID_BASE, "rollout": {"steps": [{"weight": 100}, {"weight": 100}]}}),
        ("unicode format", {**VALID_BASE, "model": {**VALID_BASE["model"], "format": "ónnx"}}),
        ("args not strings", {**VALID_BASE, "server": {"args": [1, None, {}]}}),
        ("env name with NUL", {**VALID_BASE, "server": {"env": [{"name": "A\x00B", "value": "x"}]}}),
        (
            "duration overflow",
            {**VALID_BASE, "rollout": {"steps": [{"weight": 5, "pause": {"duration": "9" * 40 + "h"}}]}},
        ),
    ],
)
def test_curated_hostile_specs_are_refused(name: str, raw: Any) -> None:
    with pytest.raises(pydantic.ValidationError):
        api.ModelDeploymentSpec.model_validate(raw)


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        (
            "unicode everywhere it is free text",
            {
                **VALID_BASE,
                "server": {
                    "podAnnotations": {"note": "模型 🚀 \u202eevil \x00"},
                    "args": ["--log-info=模型", '--x=\\"quoted\\"'],
                    "env": [{"name": "GREETING", "value": "héllo\nwörld"}],
                },
                "service": {"annotations": {"a.b/c": "ü" * 4096}},
            },
        ),
        (
            "max numbers",
            {
                "model": {"format": "onnx", "storageUri": "s3://m/r", "version": 2_147_483_647},
                "replicas": 10_000,
                "revisionHistoryLimit": 100,
                "rollout": {
                    "progressDeadlineSeconds": 86_400,
                    "scaleDownDelaySeconds": 86_400,
                    "maxSurge": 2**62,
                },
            },
        ),
        ("zero replicas", {**VALID_BASE, "replicas": 0}),
        (
            "python config with unicode parameters",
            {
                "model": {
                    "format": "python",
                    "storageUri": "https://example.com/m.tar.gz",
                    "version": 1,
                    "config": {"maxBatchSize": 1_000_000, "parameters": {'k"ey': "vä\\lue\n"}},
                },
            },
        ),
        ("affinity nested 254 deep", {**VALID_BASE, "server": {"affinity": _nest(254, 1, False)}}),
    ],
)
def test_valid_but_odd_specs_render(name: str, raw: Any) -> None:
    spec = api.ModelDeploymentSpec.model_validate(raw)
    objs = render_everything(spec)
    cm = next((o for o in objs if o["kind"] == "ConfigMap"), None)
    if cm is not None:
        text = cm["data"]["config.pbtxt"]
        assert text.isascii(), "non-ASCII is octal-escaped in the protobuf text format"


# --------------------------------------------------------------------------- the reconciler


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386."""
    out = dict(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class FakeKube:
    """An in-memory API server for the calls the reconciler makes. ``reject(obj)`` returns the message
    of a 422 for objects the real API server would refuse."""

    def __init__(self, reject: Callable[[dict[str, Any]], str | None] = lambda obj: None) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.reject = reject
        self.writes = 0
        self.applied: list[tuple[str, str]] = []
        self.rv = 100

    def _next_rv(self) -> str:
        self.rv += 1
        return str(self.rv)

    async def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        obj = self.objects.get((kind, namespace or "", name))
        return copy.deepcopy(obj) if obj is not None else None

    async def exists(self, kind: str, namespace: str, name: str) -> bool:
        return (kind, namespace, name) in self.objects

    exists_recently = exists

    async def list(self, kind: str, namespace: str | None, label_selector: str | None = None) -> list[Any]:
        return [copy.deepcopy(o) for (k, ns, _), o in self.objects.items() if k == kind and ns == namespace]

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.writes += 1
        body = json.loads(json.dumps(obj))  # must be JSON, as over the wire
        meta = body["metadata"]
        self.applied.append((body["kind"], meta["name"]))
        message = self.reject(body)
        if message:
            raise ApiError(422, json.dumps({"kind": "Status", "code": 422, "message": message}), "PATCH")
        key = (body["kind"], meta["namespace"], meta["name"])
        live = _merge(self.objects.get(key, {}), body)
        live["metadata"]["resourceVersion"] = self._next_rv()
        live["metadata"].setdefault("uid", f"uid-{self.rv}")
        live["metadata"]["generation"] = int(live["metadata"].get("generation", 0)) + 1
        self.objects[key] = live
        return copy.deepcopy(live)

    async def patch_status(
        self, kind: str, namespace: str, name: str, status: dict[str, Any]
    ) -> dict[str, Any]:
        self.writes += 1
        json.dumps(status)
        if (kind, namespace, name) not in self.objects:
            raise ApiError(404, json.dumps({"kind": "Status", "code": 404, "reason": "NotFound"}), "PATCH")
        obj = self.objects[(kind, namespace, name)]
        obj["status"] = _merge(obj.get("status") or {}, status)
        obj["metadata"]["resourceVersion"] = self._next_rv()
        return copy.deepcopy(obj)

    async def delete(self, kind: str, namespace: str | None, name: str) -> None:
        self.writes += 1
        self.objects.pop((kind, namespace or "", name), None)

    async def request(self, method: str, path: str, **_: Any) -> Any:
        self.writes += 1
        return {}


class World:
    """A ModelDeployment, the reconciler, and a stand-in for the kubelets (every Deployment ready)."""

    def __init__(self, spec: Any, reject: Callable[[dict[str, Any]], str | None] = lambda obj: None) -> None:
        self.kube = FakeKube(reject)
        self.cache = Cache()
        self.events: list[tuple[str, str, str]] = []

        async def post_event(body: dict[str, Any], type_: str, reason: str, message: str) -> None:
            self.events.append((type_, reason, message))

        self.now = datetime(2030, 1, 1, tzinfo=UTC)
        self.reconciler = Reconciler(
            self.kube,  # type: ignore[arg-type]
            self.cache,
            post_event=post_event,
            clock=lambda: self.now,
        )
        md = {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "metadata": {
                "name": "md",
                "namespace": "ns",
                "uid": "md-uid",
                "generation": 1,
                "resourceVersion": "1",
            },
            "spec": spec,
        }
        self.kube.objects[(api.KIND, "ns", "md")] = md
        self.cache.put(copy.deepcopy(md))

    def md(self) -> dict[str, Any]:
        return self.kube.objects[(api.KIND, "ns", "md")]

    def set_spec(self, spec: dict[str, Any]) -> None:
        md = self.md()
        md["spec"] = spec
        md["metadata"]["generation"] += 1
        md["metadata"]["resourceVersion"] = self.kube._next_rv()
        self.cache.put(copy.deepcopy(md))

    def kubelet(self) -> None:
        """Every Deployment fully rolled out and ready, with its pods, as the watches would show them."""
        for (kind, ns, name), dep in list(self.kube.objects.items()):
            if kind != "Deployment":
                continue
            replicas = dep["spec"].get("replicas", 1)
            dep["status"] = {
                "observedGeneration": dep["metadata"]["generation"],
                "replicas": replicas,
                "readyReplicas": replicas,
                "updatedReplicas": replicas,
            }
            dep["metadata"]["resourceVersion"] = self.kube._next_rv()
            self.cache.put(copy.deepcopy(dep))
            labels = dep["spec"]["template"]["metadata"]["labels"]
            for i in range(replicas):
                self.cache.put(
                    {
                        "kind": "Pod",
                        "metadata": {
                            "name": f"{name}-{i}",
                            "namespace": ns,
                            "labels": labels,
                            "resourceVersion": "1",
                        },
                        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
                    }
                )

    def reconcile(self, times: int = 1) -> list[int]:
        writes = []
        for _ in range(times):
            before = self.kube.writes
            asyncio.run(self.reconciler.reconcile("ns", "md"))
            writes.append(self.kube.writes - before)
            self.kubelet()
            self.now += timedelta(seconds=7)  # time moves on between reconciles (resyncs, requeues)
        return writes

    def status(self) -> dict[str, Any]:
        return dict(self.md().get("status") or {})

    def condition(self, type_: str) -> dict[str, Any]:
        return next(c for c in self.status().get("conditions") or [] if c["type"] == type_)


#: Specs that validate, each reconciled: Hypothesis counts an example only when the test does not reject
#: it, so this many are reconciled whatever share of the drawn specs the schema refuses.
RECONCILED_EXAMPLES = 40


def test_any_valid_spec_reconciles_without_error_and_goes_quiet() -> None:
    seen = {"reconciled": 0, "rejected": 0}

    @settings(
        max_examples=RECONCILED_EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        database=None,
    )
    @given(raw=specs())
    def check(raw: Any) -> None:
        with operator_recursion_limit():
            try:
                spec = api.ModelDeploymentSpec.model_validate(raw)
            except pydantic.ValidationError:
                spec = None
            # Not this test's input (refusals are test_any_spec_validates_or_renders'). Rejected, not passed:
            # a passing return would count toward max_examples, and how many specs got reconciled would
            # depend on how many the generator happened to draw valid (3 of 60 on one run, 25 on another).
            # A stand-in kubelet with more than 50 pods teaches nothing new.
            if spec is None or spec.effective_replicas > 50:
                seen["rejected"] += 1
                reject()
            world = World(raw)
            writes = world.reconcile(6)
            assert writes[-1] == 0, f"still writing after {len(writes)} reconciles: {writes}"
            st_ = world.status()
            assert st_.get("phase") in ("Ready", "Degraded", "Failed", "Pending", "Progressing"), st_
            assert st_.get("observedGeneration") == 1
            if st_.get("phase") == "Failed":
                # Valid for the schema but cannot work: said in status and an Event, with the field.
                assert "model.config" in st_.get("message", "") or "spec" in st_.get("message", ""), st_
                assert any(t == "Warning" for t, _, _ in world.events), world.events
            seen["reconciled"] += 1

    check()
    print(f"\nreconciled: {seen}")
    # Hypothesis stops early only when it gives up on the filter (under ~1% of draws valid): then the
    # generator no longer reaches valid specs, which this test exists to exercise.
    assert seen["reconciled"] == RECONCILED_EXAMPLES, seen


def test_model_config_that_triton_cannot_load_is_reported_not_retried() -> None:
    # Accepted by the schema (CEL asks only for ensembleSteps), but Triton needs inputs/outputs.
    raw = {
        "model": {
            "format": "ensemble",
            "storageUri": "s3://m/r",
            "version": 1,
            "config": {
                "ensembleSteps": [{"modelName": "pre", "inputMap": {"a": "b"}, "outputMap": {"c": "d"}}]
            },
        },
        "replicas": 1,
    }
    world = World(raw)
    writes = world.reconcile(3)
    assert writes[1:] == [0, 0], writes
    st_ = world.status()
    assert st_["phase"] == "Failed"
    cond = world.condition("Progressing")
    assert cond["reason"] == "InvalidModelConfig" and "model.config.inputs" in cond["message"], cond
    assert [r for _, r, _ in world.events] == ["InvalidModelConfig"]
    assert not [k for (k, _, _) in world.kube.objects if k != api.KIND], "nothing created"


def test_pass_through_nested_too_deep_is_reported_and_the_running_revision_kept() -> None:
    world = World(dict(VALID_BASE))
    world.reconcile(4)
    assert world.status()["phase"] == "Ready"
    before = {k: copy.deepcopy(v["spec"]) for k, v in world.kube.objects.items() if k[0] == "Deployment"}
    applied = len(world.kube.applied)
    world.set_spec({**VALID_BASE, "server": {"affinity": _nest(3000, 1, False)}})
    writes = world.reconcile(3)
    assert writes[1:] == [0, 0], writes
    cond = world.condition("Progressing")
    assert cond["reason"] == "InvalidSpec" and "server.affinity" in cond["message"], cond
    assert world.status()["phase"] == "Ready", "the running revision keeps serving"
    assert world.kube.applied[applied:] == [], "nothing applied"
    assert {k: v["spec"] for k, v in world.kube.objects.items() if k[0] == "Deployment"} == before


@pytest.mark.parametrize(
    ("field", "section"),
    [
        # Not pod-shaping: the revision hash never serialised it, and every apply raised (a retry per 5 s).
        ("rollout.gateway.parentRefs", {"rollout": {"gateway": {"parentRefs": [_nest(300, 1, False)]}}}),
        # Just shallow enough for the revision hash (model/server alone), too deep for the whole spec or for
        # status.history, which keeps it a few levels further down: every reconcile raised.
        ("server.affinity", {"server": {"affinity": _nest(254, 1, False)}}),
        (
            "server.topologySpreadConstraints",
            {"server": {"topologySpreadConstraints": [_nest(253, 1, False)]}},
        ),
    ],
    ids=["gateway-300", "affinity-254", "topology-253"],
)
def test_pass_through_nested_just_too_deep_is_reported_not_retried(
    field: str, section: dict[str, Any]
) -> None:
    # Found by test_any_valid_spec_reconciles_without_error_and_goes_quiet.
    world = World({**VALID_BASE, **section})
    writes = world.reconcile(3)
    assert writes[1:] == [0, 0], writes
    assert world.status()["phase"] == "Failed"
    cond = world.condition("Progressing")
    assert cond["reason"] == "InvalidSpec" and field in cond["message"], cond
    assert not [k for (k, _, _) in world.kube.objects if k != api.KIND], "nothing created"


def _bad_label(obj: dict[str, Any]) -> str | None:
    if obj["kind"] != "Deployment":
        return None
    labels = obj["spec"]["template"]["metadata"]["labels"]
    bad = [
        k for k in labels if not re.fullmatch(r"([a-z0-9.-]+/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?", k)
    ]
    if bad:
        return (
            f'Deployment.apps "{obj["metadata"]["name"]}" is invalid: spec.template.labels: Invalid value: '
            f'"{bad[0]}": name part must consist of alphanumeric characters'
        )
    return None


def test_first_revision_refused_by_the_api_server_fails_visibly_without_retrying() -> None:
    world = World({**VALID_BASE, "server": {"podLabels": {"bad key!": "x"}}}, reject=_bad_label)
    writes = world.reconcile(5)
    assert writes[-2:] == [0, 0], f"no retry loop: {writes}"
    st_ = world.status()
    assert st_["phase"] == "Failed", st_
    assert "RejectedByAPIServer" in st_["message"] and "bad key!" in st_["message"], st_
    degraded = world.condition("Degraded")
    assert degraded["status"] == "True" and "name part must consist" in degraded["message"], degraded
    assert [r for _, r, _ in world.events].count("ChildRejected") == 1, world.events
    deployments_sent = [a for a in world.kube.applied if a[0] == "Deployment"]
    assert len(deployments_sent) == 1, (
        f"the refused Deployment is not sent again unchanged: {deployments_sent}"
    )


def test_candidate_refused_by_the_api_server_is_rolled_back_and_stable_untouched() -> None:
    base = {**VALID_BASE, "rollout": {"steps": [{"weight": 50}, {"weight": 100}], "scaleDownDelaySeconds": 0}}
    world = World(base, reject=_bad_label)
    world.reconcile(4)
    assert world.status()["phase"] == "Ready" and world.status()["stableRevision"] == 1
    stable = {k: copy.deepcopy(v) for k, v in world.kube.objects.items() if k[0] == "Deployment"}
    applied_before = len(world.kube.applied)

    world.set_spec(
        {**base, "model": {**base["model"], "version": 2}, "server": {"podLabels": {"bad key!": "x"}}}
    )
    writes = world.reconcile(6)
    assert writes[-2:] == [0, 0], writes
    st_ = world.status()
    assert st_["phase"] == "RolledBack" and st_["stableRevision"] == 1, st_
    assert "RejectedByAPIServer" in st_["rollout"]["reason"], st_["rollout"]
    hist = {h["revision"]: h["outcome"] for h in st_["history"]}
    assert hist == {1: "Serving", 2: "RolledBack"}
    assert world.condition("Degraded")["status"] == "False", "nothing refused any more once rolled back"
    assert {k: v["spec"] for k, v in world.kube.objects.items() if k[0] == "Deployment"} == {
        k: v["spec"] for k, v in stable.items()
    }, "the stable Deployment is untouched"
    assert ("Deployment", next(iter(stable))[2]) not in world.kube.applied[applied_before:]
    reasons = [r for _, r, _ in world.events]
    assert reasons.count("ChildRejected") == 1 and reasons.count("RolledBack") == 1, reasons


def test_api_error_invalid_covers_server_side_apply_schema_errors() -> None:
    assert ApiError(422, "{}", "x").invalid and ApiError(400, "{}", "x").invalid
    body = json.dumps(
        {
            "message": "failed to create typed patch object (ns/x; apps/v1, Kind=Deployment): "
            ".spec.template.spec.affinity.foo: field not declared in schema"
        }
    )
    err = ApiError(500, body, "x")
    assert err.invalid and "affinity.foo" in err.message
    assert not ApiError(500, "etcdserver: leader changed", "x").invalid
    assert not ApiError(409, "{}", "x").invalid and not ApiError(0, "refused", "x").invalid


def test_shared_child_refused_keeps_serving_degraded_and_goes_quiet() -> None:
    def bad_annotation(obj: dict[str, Any]) -> str | None:
        if obj["kind"] == "Service" and "bad key!" in (obj["metadata"].get("annotations") or {}):
            return f'Service "{obj["metadata"]["name"]}" is invalid: metadata.annotations: Invalid value'
        return None

    world = World(dict(VALID_BASE), reject=bad_annotation)
    world.reconcile(4)
    assert world.status()["phase"] == "Ready"
    world.set_spec({**VALID_BASE, "service": {"annotations": {"bad key!": "x"}}})
    writes = world.reconcile(6)
    assert writes[-3:] == [0, 0, 0], f"no flapping condition, no retries: {writes}"
    st_ = world.status()
    assert st_["phase"] == "Degraded" and "Service md" in st_["message"], st_
    degraded = world.condition("Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "ChildRejected", degraded
    # Fixing the spec clears it.
    world.set_spec(dict(VALID_BASE))
    world.reconcile(4)
    assert world.status()["phase"] == "Ready" and world.condition("Degraded")["status"] == "False"


WEIRD_TEXT = [
    "🚀🔥 模型",
    "\u202eevil",
    "a\x85b",
    "a\u2028b\u2029c",
    "\ufeffx",
    "a\x7fb",
    "\x80\x9f",
    "\x00\x01\x1f\t\n\r",
    "\"'\\ \\u0041",
    "\uffff\ufffe",
    "\U0010fffd\U0001f600",
    "key: value\n- item\n&anchor *alias !!tag",
    "\\ud83d\\ude80",
]


@pytest.mark.parametrize("text", WEIRD_TEXT)
def test_apply_bodies_are_yaml_that_reads_back_exactly(text: str) -> None:
    body = {"metadata": {"annotations": {"k": text}}, "data": {text[:5] or "k": text}}
    assert yaml.safe_load(yaml_safe_json(body)) == body
    assert json.loads(yaml_safe_json(body)) == body


@settings(max_examples=200, deadline=None, database=None)
@given(text=st.text())
def test_any_text_survives_the_apply_encoding(text: str) -> None:
    body = {"v": text, "l": [text]}
    encoded = yaml_safe_json(body)
    encoded.encode("utf-8")  # sendable
    assert json.loads(encoded) == body
    assert yaml.safe_load(encoded) == body


def test_deleted_during_its_reconcile_is_not_an_error() -> None:
    """The status write finds no object (deleted after the cache read it): no retry, no traceback.
    A 404 while the object still exists stays an error."""
    world = World(dict(VALID_BASE))
    world.reconcile()
    world.set_spec({**world.md()["spec"], "replicas": 3})  # something to write
    gone = world.kube.objects.pop((api.KIND, "ns", "md"))  # deleted on the server; the cache still has it
    out = asyncio.run(world.reconciler.reconcile("ns", "md"))
    assert out.requeue_after is None

    world.kube.objects[(api.KIND, "ns", "md")] = gone

    async def refused(*_: Any) -> dict[str, Any]:
        raise ApiError(404, "{}", "PATCH")

    world.kube.patch_status = refused  # type: ignore[method-assign]
    world.set_spec({**world.md()["spec"], "replicas": 4})
    with pytest.raises(ApiError):
        asyncio.run(world.reconciler.reconcile("ns", "md"))
