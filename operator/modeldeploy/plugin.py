"""``kubectl modeldeploy``: the kubectl plugin for manual rollout control.

    kubectl modeldeploy status   NAME [-n NS]
    kubectl modeldeploy history  NAME [-n NS]
    kubectl modeldeploy promote  NAME [-n NS]     skip the remaining steps
    kubectl modeldeploy abort    NAME [-n NS]     roll back to stable, reason Aborted
    kubectl modeldeploy pause    NAME [-n NS]     spec.paused: true
    kubectl modeldeploy resume   NAME [-n NS]     spec.paused: false, and continue past a step pause
    kubectl modeldeploy rollback NAME --to-revision N [-n NS]
    kubectl modeldeploy batch    NAME [-n NS]     a BatchInference's progress

Every command is one merge patch of the ModelDeployment, so Kubernetes RBAC governs it
(``patch`` on ``modeldeployments``): promote/resume/abort set the annotations
``modeldeploy.io/promote|resume|abort`` to a fresh nonce that the operator acts on once;
pause/resume set ``spec.paused``; rollback sets ``spec.rollbackTo.revision``. The
operator does the rest. Credentials come from ``--kubeconfig``, else ``KUBECONFIG``,
else ``~/.kube/config`` (or the in-cluster service account). It needs the official Kubernetes
Python client, which the operator does not: ``pip install 'modeldeploy[plugin]'``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from . import api, timeutil
from .api import ABORT_ANNOTATION, PROMOTE_ANNOTATION, RESUME_ANNOTATION

HISTORY_COLUMNS = ("REVISION", "MODEL VERSION", "IMAGE", "CREATED", "OUTCOME", "REASON")


# --------------------------------------------------------------------------- pure parts


def nonce(now: datetime | None = None) -> str:
    """A fresh annotation value: the operator acts once on each distinct value."""
    return timeutil.rfc3339(now or datetime.now(UTC), micro=True)


def patch_for(command: str, *, value: str | None = None, revision: int | None = None) -> dict[str, Any]:
    """The merge patch one command sends. ``value`` is the nonce for annotation commands."""
    if command == "promote":
        return {"metadata": {"annotations": {PROMOTE_ANNOTATION: value or nonce()}}}
    if command == "abort":
        return {"metadata": {"annotations": {ABORT_ANNOTATION: value or nonce()}}}
    if command == "pause":
        return {"spec": {"paused": True}}
    if command == "resume":
        return {"metadata": {"annotations": {RESUME_ANNOTATION: value or nonce()}}, "spec": {"paused": False}}
    if command == "rollback":
        if revision is None or revision < 1:
            raise ValueError("rollback needs --to-revision N (N >= 1)")
        return {"spec": {"rollbackTo": {"revision": revision}}}
    raise ValueError(f"unknown command {command!r}")


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """kubectl-style columns: left-aligned, three spaces apart, no trailing blanks."""
    cells = [[str(c) for c in header], *[["" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines) + "\n"


def format_history(md: dict[str, Any]) -> str:
    st = md.get("status") or {}
    history = st.get("history") or []
    stable = st.get("stableRevision")
    candidate = st.get("candidateRevision")
    rows = []
    for rec in history:
        number = rec.get("revision")
        mark = " (stable)" if number == stable else " (candidate)" if number == candidate else ""
        rows.append(
            (
                f"{number}{mark}",
                rec.get("modelVersion", ""),
                rec.get("image", ""),
                rec.get("created", ""),
                rec.get("outcome", ""),
                rec.get("reason") or "",
            )
        )
    if not rows:
        return "No revisions recorded yet.\n"
    return format_table(HISTORY_COLUMNS, rows)


def _version_of(st: dict[str, Any], number: Any) -> str:
    for rec in st.get("history") or []:
        if rec.get("revision") == number:
            return f" (model version {rec.get('modelVersion')}, {rec.get('image')})"
    return ""


def format_status(md: dict[str, Any]) -> str:
    meta = md.get("metadata") or {}
    spec = md.get("spec") or {}
    st = md.get("status") or {}
    ro = st.get("rollout") or {}
    steps = ((spec.get("rollout") or {}).get("steps")) or []
    strategy = st.get("strategy") or (spec.get("rollout") or {}).get("strategy") or "Canary"
    lines = [
        ("Name", meta.get("name", "")),
        ("Namespace", meta.get("namespace", "")),
        ("Phase", st.get("phase") or "Unknown"),
        ("Message", st.get("message") or ""),
        ("Strategy", strategy),
        ("Ready", st.get("ready") or "-"),
        ("Rollout state", ro.get("state") or "-"),
    ]
    stable = st.get("stableRevision")
    lines.append(("Stable revision", f"{stable}{_version_of(st, stable)}" if stable else "-"))
    cand = st.get("candidateRevision")
    lines.append(("Candidate revision", f"{cand}{_version_of(st, cand)}" if cand else "-"))
    step = st.get("currentStep")
    if step is not None:
        total = len(steps) if steps and steps[-1].get("weight") == 100 else (len(steps) + 1 if steps else 3)
        lines.append(("Step", f"{step + 1}/{total}"))
    else:
        lines.append(("Step", "-"))
    lines.append(("Weight", f"{st.get('canaryWeight') or 0}%"))
    if ro.get("reason"):
        lines.append(("Reason", ro["reason"]))
    if spec.get("paused"):
        lines.append(("Paused", "spec.paused is true"))
    if spec.get("rollbackTo"):
        lines.append(("Rollback to", f"revision {spec['rollbackTo'].get('revision')} (spec.rollbackTo)"))
    analysis = st.get("lastAnalysis")
    if analysis:
        lines.append(("Last analysis", f"{analysis.get('verdict')} {analysis.get('reason', '')}".strip()))
    width = max(len(k) for k, _ in lines) + 2
    out = "".join(f"{(k + ':').ljust(width)}{v}\n" for k, v in lines)
    conditions = st.get("conditions") or []
    if conditions:
        out += "Conditions:\n"
        rows = [
            (
                c.get("type"),
                c.get("status"),
                c.get("reason"),
                c.get("lastTransitionTime", ""),
                c.get("message") or "",
            )
            for c in conditions
        ]
        table = format_table(("TYPE", "STATUS", "REASON", "LAST TRANSITION", "MESSAGE"), rows)
        out += "".join(f"  {line}\n" for line in table.splitlines())
    return out


def format_batch(bi: dict[str, Any]) -> str:
    """A BatchInference's progress: phase, shards, records, throughput, where the manifest is."""
    st = bi.get("status") or {}
    spec = bi.get("spec") or {}
    model = spec.get("model") or {}
    ref = (model.get("modelDeploymentRef") or {}).get("name")
    lines = [
        f"Name:        {bi['metadata']['name']}",
        f"Phase:       {st.get('phase') or 'Pending'}" + (f" ({st['message']})" if st.get("message") else ""),
        f"Model:       {'ModelDeployment ' + ref if ref else 'inline'}"
        + (f", revision {st['modelRevision']}" if st.get("modelRevision") else ""),
        f"Input:       {(spec.get('input') or {}).get('uri', '-')}",
        f"Output:      {(spec.get('output') or {}).get('uri', '-')}",
        f"Shards:      {st.get('progress') or '-'}"
        + (f", {st['shardsFailed']} failed" if st.get("shardsFailed") else ""),
        f"Records:     {st.get('records', 0)} scored, {st.get('recordsFailed', 0)} failed"
        + f" (allowed: {spec.get('maxFailedRecords', '0')})",
        f"Throughput:  {st['recordsPerSecond']} records/s"
        if st.get("recordsPerSecond")
        else "Throughput:  -",
        f"Started:     {st.get('startTime') or '-'}",
        f"Completed:   {st.get('completionTime') or '-'}",
        f"Manifest:    {st.get('manifest') or '-'}",
    ]
    rows = [
        (c.get("type"), c.get("status"), c.get("reason"), c.get("message", ""))
        for c in st.get("conditions") or []
    ]
    if rows:
        lines += ["", format_table(("TYPE", "STATUS", "REASON", "MESSAGE"), rows).rstrip("\n")]
    return "\n".join(lines) + "\n"


def describe_patch(command: str, name: str, namespace: str, revision: int | None = None) -> str:
    what = {
        "promote": "promotion requested (remaining steps skipped)",
        "abort": "abort requested (traffic goes back to the stable revision)",
        "pause": "paused",
        "resume": "resumed",
        "rollback": f"rollback to revision {revision} requested (spec.rollbackTo)",
    }[command]
    return f"modeldeployment.{api.GROUP}/{name} {what} in namespace {namespace}\n"


# --------------------------------------------------------------------------- cluster access


#: What a user without the official client is told: the operator does not need it, so the plain
#: package leaves it out and the plugin's extra brings it.
MISSING_CLIENT = (
    "error: kubectl modeldeploy needs the Kubernetes Python client: pip install 'modeldeploy[plugin]'"
)


def _require_kubernetes() -> None:
    try:
        import kubernetes  # noqa: F401
    except ImportError:
        raise SystemExit(MISSING_CLIENT) from None


def _client(kubeconfig: str | None, context: str | None) -> tuple[Any, str]:
    """(CustomObjectsApi, the context's namespace or 'default')."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    namespace = "default"
    try:
        config.load_kube_config(config_file=kubeconfig, context=context)  # type: ignore[no-untyped-call,unused-ignore]
        _, active = config.list_kube_config_contexts(config_file=kubeconfig)  # type: ignore[no-untyped-call,unused-ignore]
        if context:
            contexts, _ = config.list_kube_config_contexts(config_file=kubeconfig)  # type: ignore[no-untyped-call,unused-ignore]
            active = next((c for c in contexts if c.get("name") == context), active)
        namespace = ((active or {}).get("context") or {}).get("namespace") or "default"
    except (ConfigException, FileNotFoundError, TypeError):
        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call,unused-ignore]
        except ConfigException as exc:
            raise SystemExit(f"error: no Kubernetes credentials: {exc}") from exc
        try:
            with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as fh:
                namespace = fh.read().strip() or "default"
        except OSError:
            pass
    return client.CustomObjectsApi(), namespace


def _api_error(exc: Any, name: str, namespace: str) -> SystemExit:
    if exc.status == 404:
        return SystemExit(f'error: modeldeployments.{api.GROUP} "{name}" not found in namespace {namespace}')
    reason = exc.reason
    try:
        import json

        reason = json.loads(exc.body).get("message") or reason
    except (ValueError, TypeError, AttributeError):
        pass
    return SystemExit(f"error: {reason}")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a flag given after the subcommand is not overwritten by the subparser's default.
    common.add_argument(
        "-n", "--namespace", default=argparse.SUPPRESS, help="namespace (default: the context's)"
    )
    common.add_argument(
        "--kubeconfig", default=argparse.SUPPRESS, help="kubeconfig file (default: $KUBECONFIG)"
    )
    common.add_argument("--context", default=argparse.SUPPRESS, help="kubeconfig context")
    parser = argparse.ArgumentParser(
        prog="kubectl modeldeploy",
        parents=[common],
        description="Inspect and steer ModelDeployment rollouts.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {
        "status": "phase, stable/candidate revision, step, weight, conditions",
        "history": "revisions with model version, image, outcome",
        "promote": "skip the remaining steps and promote the candidate",
        "abort": "stop the rollout; traffic back to the stable revision (reason Aborted)",
        "pause": "pause the rollout where it is (spec.paused: true)",
        "resume": "resume a paused rollout, also past a step pause without duration",
        "rollback": "serve an earlier revision (spec.rollbackTo.revision)",
        "batch": "a BatchInference's phase, shards done, records scored and failed, manifest",
    }
    for command, text in helps.items():
        p = sub.add_parser(command, parents=[common], help=text, description=text)
        p.add_argument(
            "name", metavar="NAME", help="the BatchInference" if command == "batch" else "the ModelDeployment"
        )
        if command == "rollback":
            p.add_argument(
                "--to-revision",
                dest="to_revision",
                type=int,
                required=True,
                metavar="N",
                help="revision number from `kubectl modeldeploy history`",
            )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    _require_kubernetes()
    from kubernetes.client.exceptions import ApiException

    custom, default_ns = _client(getattr(args, "kubeconfig", None), getattr(args, "context", None))
    namespace = getattr(args, "namespace", None) or default_ns
    name = args.name
    try:
        if args.command == "batch":
            bi = custom.get_namespaced_custom_object(
                api.GROUP, api.VERSION, namespace, "batchinferences", name
            )
            sys.stdout.write(format_batch(bi))
            return 0
        if args.command in ("status", "history"):
            md = custom.get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, name)
            sys.stdout.write(format_status(md) if args.command == "status" else format_history(md))
            return 0
        revision = getattr(args, "to_revision", None)
        try:
            body = patch_for(args.command, revision=revision)
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from exc
        custom.patch_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, name, body)
    except ApiException as exc:
        raise _api_error(exc, name, namespace) from None
    sys.stdout.write(describe_patch(args.command, name, namespace, revision))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
