"""Command line: ``modeldeploy render|crd|stage`` and ``modeldeploy-operator run``."""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
from typing import Any

import pydantic
import yaml

from . import __version__, api, crdgen
from .modeldeployment import builders, children


def render(doc: dict[str, Any], namespace: str | None = None) -> list[dict[str, Any]]:
    """Every object the operator creates for a new ModelDeployment (first revision), offline: the same
    :func:`~modeldeploy.modeldeployment.children.desired_children` the reconcile applies."""
    meta = doc.get("metadata") or {}
    if doc.get("kind") != api.KIND:
        raise SystemExit(f"error: kind must be {api.KIND}, got {doc.get('kind')!r}")
    if not meta.get("name"):
        raise SystemExit("error: metadata.name is required")
    spec = api.ModelDeploymentSpec.model_validate(doc.get("spec") or {})
    owner = builders.Owner(
        name=meta["name"],
        namespace=namespace or meta.get("namespace") or "default",
        uid="00000000-0000-0000-0000-000000000000",
    )
    state, by_number = children.first_revision(owner, spec)
    # What the operator keeps applying once revision 1 serves (Gateway routes: as where their CRDs exist).
    return children.desired_children(owner, spec, state, by_number, spec.effective_replicas)


def _cmd_render(args: argparse.Namespace) -> int:
    with open(args.filename) if args.filename != "-" else sys.stdin as fh:
        docs = [d for d in yaml.safe_load_all(fh) if d]
    out: list[dict[str, Any]] = []
    try:
        for doc in docs:
            out.extend(render(doc, args.namespace))
    except pydantic.ValidationError as exc:
        for err in exc.errors():
            print(f"error: spec.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}", file=sys.stderr)
        return 1
    sys.stdout.write(yaml.safe_dump_all(out, sort_keys=False))
    if args.show_config:
        for obj in out:
            if obj["kind"] == "ConfigMap":
                print(
                    f"# config.pbtxt of {obj['metadata']['name']}:\n{obj['data']['config.pbtxt']}",
                    file=sys.stderr,
                )
    return 0


def main(argv: list[str] | None = None) -> int:
    # The operator first: the other commands' modules (the stager's and the worker's storage clients)
    # are not imported into the operator's process.
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:  # python -m modeldeploy run ...  ==  modeldeploy-operator run ...
        return operator_main(argv)
    if argv[:1] == ["operator"]:
        return operator_main(["run", *argv[1:]])
    parser = argparse.ArgumentParser(prog="modeldeploy", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render", help="print every object the operator would create (no cluster needed)")
    r.add_argument("-f", "--filename", required=True, help="ModelDeployment manifest, or - for stdin")
    r.add_argument("-n", "--namespace", default=None)
    r.add_argument("--show-config", action="store_true", help="also print config.pbtxt to stderr")
    r.set_defaults(fn=_cmd_render)
    kinds = {r.singular: r for r in crdgen.RESOURCES}
    c = sub.add_parser("crd", help="print a CRD generated from the typed API")
    c.add_argument("--kind", choices=sorted(kinds), default=api.SINGULAR)
    c.set_defaults(fn=lambda a: sys.stdout.write(crdgen.render_crd_yaml(kinds[a.kind])) and 0)
    d = sub.add_parser("api-docs", help="print an API reference (markdown) generated from the CRD schema")
    d.add_argument("--kind", choices=sorted(kinds), default=api.SINGULAR)
    d.set_defaults(fn=lambda a: sys.stdout.write(crdgen.render_api_reference(kinds[a.kind])) and 0)
    s = sub.add_parser("stage", help="init container: fetch a model repository into a directory")
    from .triton import staging

    staging.add_arguments(s)
    s.set_defaults(fn=staging.main)
    b = sub.add_parser("batch-worker", help="a BatchInference pod's worker: score this worker's shards")
    from .batch import run as batch_run

    batch_run.add_arguments(b)
    b.set_defaults(fn=batch_run.main)
    sub.add_parser("operator", help="run the operator: modeldeploy operator [kopf run options]")
    args = parser.parse_args(argv)
    return int(args.fn(args) or 0)


#: glibc's mallopt parameter, and the threshold: its default, made fixed.
_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES = -3, 128 * 1024


def fixed_mmap_threshold() -> bool:
    """Keep glibc's mmap threshold at its 128 KiB default instead of letting it rise.

    glibc raises the threshold to the size of each mmapped block freed (up to 32 MiB), so after the
    first large buffer is released (an SSL connection's 256 KiB read buffer, a LIST response) the
    next ones come from the heap, where freed space between long-lived objects is never given back:
    the operator kept its burst-time peak for good. Fixed, large buffers are mmapped and returned
    when freed. ``make bench``'s measure, 1000 ModelDeployments created at once: peak RSS 154 -> 130
    MiB, 120 MiB after. ``MALLOC_MMAP_THRESHOLD_`` in the environment still wins; elsewhere than
    glibc this does nothing. Returns whether it was set."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        return bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # not glibc
        return False


def operator_main(argv: list[str] | None = None) -> int:
    """``modeldeploy-operator run [kopf run options]``: kopf with our handlers module.
    Without -n/--namespace it watches all namespaces."""
    # kopf imports whichever Kubernetes client libraries are installed, to offer logging in through
    # them (the official client: 10 MiB more RSS at start, measured with kopf 1.45 and kubernetes 37,
    # and more once its models load). The package depends on none (handlers.login uses kopf's own
    # functions), so the operator as shipped has none; only the plugin's and the tests' extras do.
    import kopf.cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "run":
        print(
            "usage: modeldeploy-operator run [-n NS ...|-A] [--standalone|--peering NAME] "
            "[--liveness URL] [-v]",
            file=sys.stderr,
        )
        return 2
    rest = argv[1:]
    fixed_mmap_threshold()
    if not any(a in ("-A", "--all-namespaces") or a.startswith(("-n", "--namespace")) for a in rest):
        rest.append("--all-namespaces")
    kopf.cli.main(["run", "-m", "modeldeploy.handlers", *rest], standalone_mode=False)
    return 0
