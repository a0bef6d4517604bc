"""What a BatchInference becomes: one Indexed Job whose pods each run the model's Triton as a native
sidecar (the ModelDeployment's own stager and Triton containers) and the worker beside it.

Each of ``parallelism`` completion indexes is one worker: it runs every ``parallelism``-th shard of
the plan (:func:`.shards.assigned`), so the Job's completions are the workers, not the shards, and
Triton loads the model once per worker, not once per shard. The worker starts only once Triton's
startup probe (the model version ready) has passed: that is how a native sidecar gates the main
containers.
"""

from __future__ import annotations

import json
from typing import Any

from .. import api
from ..modeldeployment import builders as md_builders
from . import api as bapi

LABEL_BATCH = api.LABEL_BATCH
COMPONENT_WORKER = "batch-worker"
WORKER_CONTAINER = "worker"
PREFLIGHT_CONTAINER = "preflight"
WORKER_CREDENTIALS_DIR = "/var/run/modeldeploy/data-credentials"


#: The worker's exit codes for "the job cannot succeed" (:data:`.run.EXIT_INVALID`,
#: :data:`.run.EXIT_TOO_MANY_FAILED`; run.py is not imported here: it needs the worker's libraries).
FAIL_JOB_EXIT_CODES = (2, 3)
#: The worker's report so far (:data:`.run.PROGRESS_PORT`), which the operator reads while it runs.
PROGRESS_PORT = 8090


def job_name(name: str) -> str:
    return name


def labels(name: str) -> dict[str, str]:
    """A batch pod's labels: never those of a ModelDeployment's pods (its Services select by them)."""
    return {
        "app.kubernetes.io/managed-by": api.MANAGER,
        "app.kubernetes.io/component": COMPONENT_WORKER,
        LABEL_BATCH: name,
    }


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": bapi.KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def build_job(
    name: str,
    namespace: str,
    uid: str,
    spec: bapi.BatchInferenceSpec,
    model: api.ModelDeploymentSpec,
    *,
    revision: str,
    stager_image: str,
    worker_image: str,
) -> dict[str, Any]:
    """The Indexed Job. ``model`` is what scores: the referenced ModelDeployment's stable revision
    (``revision`` its hash) or the inline spec wrapped as a ModelDeploymentSpec."""
    owner = md_builders.Owner(name=name, namespace=namespace, uid=uid)
    template = md_builders.build_pod_template(owner, model, revision, stager_image=stager_image)
    pod = template["spec"]
    [triton] = pod.pop("containers")
    # Native sidecar: an init container that keeps running; the worker starts once its startup probe
    # (the model version ready) has passed, and the pod completes when the worker exits.
    triton = {**triton, "restartPolicy": "Always"}
    triton.pop("lifecycle", None)  # no drain: nothing routes traffic to a batch pod
    worker = _worker(name, spec, model, worker_image, owner)
    # First of all, before the model is staged and Triton started: the checks that need no model
    # server (input, output, and the records against the model's inputs when the spec has its config).
    pod["initContainers"] = [_preflight(worker, model), *pod["initContainers"], triton]
    pod["containers"] = [worker]
    pod["restartPolicy"] = "Never"
    pod["terminationGracePeriodSeconds"] = md_builders.TRITON_SHUTDOWN_SECONDS
    pod["volumes"] = [*pod["volumes"], *_data_volumes(spec)]
    if spec.node_selector:
        pod["nodeSelector"] = {**pod.get("nodeSelector", {}), **spec.node_selector}
    pod_labels = labels(name)
    template["metadata"]["labels"] = {**(model.server.pod_labels or {}), **pod_labels}
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": spec.parallelism,
        "parallelism": spec.parallelism,
        # a worker pod lost (killed, evicted, its node gone) is started again for its index, which
        # skips the shards it finished; each shard has its own retries inside the worker
        "backoffLimitPerIndex": 3,
        "maxFailedIndexes": 0,
        "podReplacementPolicy": "Failed",
        # a worker that found the job cannot succeed (input missing or not matching the model, output
        # not writable, too many failed records) says so by its exit code: no retry helps
        "podFailurePolicy": {
            "rules": [
                *(
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": container,
                            "operator": "In",
                            "values": list(FAIL_JOB_EXIT_CODES),
                        },
                    }
                    for container in (PREFLIGHT_CONTAINER, WORKER_CONTAINER)
                ),
                # evicted or preempted (a node drained, a pod deleted): not the worker's failure
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]
        },
        "template": template,
    }
    if spec.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(name),
            "namespace": namespace,
            "labels": pod_labels,
            "ownerReferences": [owner_reference(name, uid)],
        },
        "spec": job_spec,
    }


def _worker(
    name: str,
    spec: bapi.BatchInferenceSpec,
    model: api.ModelDeploymentSpec,
    image: str,
    owner: md_builders.Owner,
) -> dict[str, Any]:
    args = [
        "batch-worker",
        f"--input={spec.input.uri}",
        f"--output={spec.output.uri}",
        f"--format={spec.input.format.value}",
        f"--shard-bytes={int(api.parse_quantity(spec.shard_size) or 0)}",
        f"--workers={spec.parallelism}",
        f"--concurrency={spec.concurrency}",
        f"--batch-size={spec.batch_size}",
        f"--retries={spec.retries_per_shard}",
        f"--max-failed={spec.max_failed_records}",
        f"--model={md_builders.model_name(owner, model)}",
        f"--version={model.model.version}",
        f"--triton=http://127.0.0.1:{md_builders.HTTP_PORT}",
    ]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    for role, loc in (("input", spec.input), ("output", spec.output)):
        if loc.credentials_secret:
            args.append(f"--{role}-credentials-dir={WORKER_CREDENTIALS_DIR}/{role}")
            mounts.append(
                {
                    "name": f"{role}-credentials",
                    "mountPath": f"{WORKER_CREDENTIALS_DIR}/{role}",
                    "readOnly": True,
                }
            )
    container: dict[str, Any] = {
        "name": WORKER_CONTAINER,
        "image": image,
        "args": [*args, f"--progress-port={PROGRESS_PORT}"],
        "ports": [{"name": "progress", "containerPort": PROGRESS_PORT, "protocol": "TCP"}],
        "volumeMounts": mounts,
        "securityContext": md_builders.RESTRICTED_CONTAINER_SECURITY,
        "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}, "limits": {"memory": "2Gi"}},
        # the worker's last line (why it stopped) becomes the termination message the operator reports
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if model.server.env:
        container["env"] = md_builders._env(model.server.env)
    return container


def _preflight(worker: dict[str, Any], model: api.ModelDeploymentSpec) -> dict[str, Any]:
    """The worker's image and storage arguments, run with ``--check``; small and quick."""
    keep = ("--input", "--output", "--format", "--shard-bytes", "--workers", "--input-cred", "--output-cred")
    args = ["batch-worker", "--check", *(a for a in worker["args"][1:] if a.startswith(keep))]
    args.append("--progress-port=0")
    args += ["--model=-", "--version=-"]  # required by the parser, unused by --check
    config = model.model.config
    if config is not None and config.inputs:
        inputs = [t.model_dump(by_alias=True, exclude_none=True, mode="json") for t in config.inputs]
        args.append(f"--inputs={json.dumps(inputs, separators=(',', ':'))}")
    return {
        **{k: v for k, v in worker.items() if k not in ("ports", "args", "resources", "env")},
        "name": PREFLIGHT_CONTAINER,
        "args": args,
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
    }


def _data_volumes(spec: bapi.BatchInferenceSpec) -> list[dict[str, Any]]:
    return [
        {"name": f"{role}-credentials", "secret": {"secretName": loc.credentials_secret}}
        for role, loc in (("input", spec.input), ("output", spec.output))
        if loc.credentials_secret
    ]


def scoring_spec(inline: bapi.InlineModel) -> api.ModelDeploymentSpec:
    """An inline model as the ModelDeploymentSpec the pod builders take (one replica, defaults)."""
    return api.ModelDeploymentSpec(model=inline.model, server=inline.server)
