"""What a BatchInference becomes: an Indexed Job, Triton a native sidecar, the worker beside it."""

from __future__ import annotations

from typing import Any

from modeldeploy import api
from modeldeploy.batch import api as bapi
from modeldeploy.batch import builders
from modeldeploy.modeldeployment import builders as md_builders


def bi_spec(**over: object) -> bapi.BatchInferenceSpec:
    return bapi.BatchInferenceSpec.model_validate(
        {
            "model": {"inline": {"model": {"format": "python", "storageUri": "s3://models/m", "version": 3}}},
            "input": {"uri": "s3://data/in/", "credentialsSecret": "data-creds"},
            "output": {"uri": "s3://data/out/"},
            "parallelism": 2,
            "shardSize": "1Mi",
            "activeDeadlineSeconds": 600,
            **over,
        }
    )


def job(spec: bapi.BatchInferenceSpec) -> Any:
    assert spec.model.inline is not None
    return builders.build_job(
        "score",
        "ns",
        "uid-1",
        spec,
        builders.scoring_spec(spec.model.inline),
        revision="abc123",
        stager_image="op:1",
        worker_image="op:1",
    )


def test_an_indexed_job_of_one_completion_per_worker() -> None:
    j = job(bi_spec())
    s = j["spec"]
    assert isinstance(s, dict)
    assert (s["completionMode"], s["completions"], s["parallelism"]) == ("Indexed", 2, 2)
    assert s["activeDeadlineSeconds"] == 600 and s["maxFailedIndexes"] == 0
    assert j["metadata"]["ownerReferences"][0]["kind"] == "BatchInference"


def test_triton_is_a_native_sidecar_after_the_stager_and_gates_the_worker() -> None:
    pod = job(bi_spec())["spec"]["template"]["spec"]
    preflight, stager, triton = pod["initContainers"]
    assert stager["name"] == "stage-model" and triton["name"] == "triton"
    assert preflight["name"] == "preflight" and preflight["args"][:2] == ["batch-worker", "--check"]
    assert triton["restartPolicy"] == "Always"
    assert triton["startupProbe"]["httpGet"]["path"] == "/v2/models/score/versions/3/ready"
    assert "lifecycle" not in triton  # no drain for pods no Service routes to
    [worker] = pod["containers"]
    assert pod["restartPolicy"] == "Never"
    assert worker["securityContext"] == md_builders.RESTRICTED_CONTAINER_SECURITY
    args = dict(a.removeprefix("--").split("=", 1) for a in worker["args"][1:])
    assert worker["args"][0] == "batch-worker"
    assert args["shard-bytes"] == str(1 << 20) and args["workers"] == "2" and args["version"] == "3"
    assert args["triton"] == "http://127.0.0.1:8000"
    assert args["input-credentials-dir"] == f"{builders.WORKER_CREDENTIALS_DIR}/input"
    assert "output-credentials-dir" not in args
    assert {"name": "input-credentials", "secret": {"secretName": "data-creds"}} in pod["volumes"]


def test_batch_pods_never_carry_a_model_deployments_labels() -> None:
    """A ModelDeployment's Services select its pods by name and component: a BatchInference of the
    same name must not be selected."""
    template = job(bi_spec())["spec"]["template"]
    labels = template["metadata"]["labels"]
    assert labels[builders.LABEL_BATCH] == "score"
    assert api.LABEL_NAME not in labels
    assert labels["app.kubernetes.io/component"] == builders.COMPONENT_WORKER


def test_a_preflight_checks_storage_and_records_before_the_model_is_staged() -> None:
    spec = bi_spec(
        model={
            "inline": {
                "model": {
                    "format": "python",
                    "storageUri": "s3://models/m",
                    "version": 3,
                    "config": {
                        "maxBatchSize": 8,
                        "inputs": [{"name": "X", "dataType": "TYPE_FP32", "dims": [4]}],
                        "outputs": [{"name": "Y", "dataType": "TYPE_FP32", "dims": [4]}],
                    },
                }
            }
        }
    )
    j = job(spec)
    pod = j["spec"]["template"]["spec"]
    preflight = pod["initContainers"][0]
    [worker] = pod["containers"]
    args = dict(a.removeprefix("--").split("=", 1) for a in preflight["args"][2:])
    assert args["input"] == "s3://data/in/" and args["output"] == "s3://data/out/"
    assert args["input-credentials-dir"] == f"{builders.WORKER_CREDENTIALS_DIR}/input"
    assert args["inputs"] == '[{"name":"X","dataType":"TYPE_FP32","dims":[4]}]'
    assert preflight["image"] == worker["image"] and preflight["volumeMounts"] == worker["volumeMounts"]
    assert preflight["securityContext"] == md_builders.RESTRICTED_CONTAINER_SECURITY
    assert "restartPolicy" not in preflight  # a plain init container: the pod waits for it
    rules = j["spec"]["podFailurePolicy"]["rules"]
    failing = {r["onExitCodes"]["containerName"] for r in rules if r["action"] == "FailJob"}
    assert failing == {"preflight", "worker"}
    # without a config in the spec the record check waits for Triton's (the worker does it)
    assert not any(
        a.startswith("--inputs=")
        for a in job(bi_spec())["spec"]["template"]["spec"]["initContainers"][0]["args"]
    )
