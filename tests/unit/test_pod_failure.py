"""Why a revision cannot become ready, read from its pods' statuses as a real kubelet writes them
(shapes taken from the real node: a stager that exits 1, a Triton that exits because its model
failed to load, an image that is not on the node)."""

from __future__ import annotations

from typing import Any

from modeldeploy import api
from modeldeploy.modeldeployment import builders
from modeldeploy.modeldeployment.observe import observe_revision, pod_failure

STAGER_LOG = (
    "staging s3://models/repo into /models\n"
    "error: s3://models/repo: GET http://10.250.0.1:5000/models?list-type=2: 403 SignatureDoesNotMatch\n"
)
TRITON_LOG = (
    "I1202 12:00:00.000 server.cc:1] Started\n"
    "E1202 12:00:01.000 model_lifecycle.cc:654] failed to load 'doubler' version 1: Internal: "
    "RuntimeError: boom in initialize\n"
    "error: creating server: Internal - failed to load all models\n"
)


def pod(init: list[dict[str, Any]] | None = None, main: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": "Pending", "conditions": [{"type": "Ready", "status": "False"}]}
    if init is not None:
        status["initContainerStatuses"] = init
    if main is not None:
        status["containerStatuses"] = main
    return {"metadata": {"name": "md-abc-1"}, "status": status}


def terminated(code: int, message: str) -> dict[str, Any]:
    return {"terminated": {"exitCode": code, "reason": "Error", "message": message}}


def test_stager_crashloop_reports_its_own_error_line() -> None:
    p = pod(
        init=[
            {
                "name": "stage-model",
                "ready": False,
                "restartCount": 2,
                "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 20s"}},
                "lastState": terminated(1, STAGER_LOG),
            }
        ],
        main=[
            {
                "name": "triton",
                "ready": False,
                "restartCount": 0,
                "state": {"waiting": {"reason": "PodInitializing"}},
            }
        ],
    )
    failure = pod_failure(p)
    assert failure is not None
    assert failure.startswith(
        "CrashLoopBackOff: init container stage-model of pod md-abc-1 restarted 2 times"
    )
    assert "(exit code 1)" in failure and "403 SignatureDoesNotMatch" in failure


def test_triton_exit_reports_why_the_model_did_not_load() -> None:
    p = pod(
        main=[
            {
                "name": "triton",
                "ready": False,
                "restartCount": 3,
                "state": {"running": {}},
                "lastState": terminated(1, TRITON_LOG),
            }
        ]
    )
    failure = pod_failure(p)
    assert failure is not None and "container triton" in failure
    assert "failed to load 'doubler' version 1" in failure and "boom in initialize" in failure
    assert len(failure) < 600


def test_image_not_on_node_fails_at_once() -> None:
    p = pod(
        main=[
            {
                "name": "triton",
                "ready": False,
                "restartCount": 0,
                "state": {
                    "waiting": {
                        "reason": "ErrImageNeverPull",
                        "message": 'Container image "x:1" is not present',
                    }
                },
            }
        ]
    )
    assert pod_failure(p) == (
        'ErrImageNeverPull: container triton of pod md-abc-1: Container image "x:1" is not present'
    )


def test_starting_pods_are_not_failures() -> None:
    first_failure = pod(
        init=[{"name": "stage-model", "ready": False, "restartCount": 0, "state": terminated(1, STAGER_LOG)}]
    )
    assert pod_failure(first_failure) is None  # one failed attempt: the kubelet retries it
    assert (
        pod_failure(
            pod(main=[{"name": "triton", "ready": False, "restartCount": 0, "state": {"running": {}}}])
        )
        is None
    )


def test_observe_revision_carries_the_pod_failure() -> None:
    dep = {"metadata": {"generation": 1}, "spec": {"replicas": 1}, "status": {"observedGeneration": 1}}
    p = pod(
        main=[
            {
                "name": "triton",
                "ready": False,
                "restartCount": 4,
                "state": {},
                "lastState": terminated(1, TRITON_LOG),
            }
        ]
    )
    obs = observe_revision(dep, [p])
    assert obs.failure is not None and "failed to load all models" in obs.failure


def test_generated_containers_keep_their_log_tail_as_termination_message() -> None:
    spec = api.ModelDeploymentSpec.model_validate(
        {
            "model": {
                "format": "python",
                "storageUri": "s3://models/repo",
                "version": 1,
                "config": {
                    "inputs": [{"name": "X", "dataType": "TYPE_FP32", "dims": [1]}],
                    "outputs": [{"name": "Y", "dataType": "TYPE_FP32", "dims": [1]}],
                },
            }
        }
    )
    template = builders.build_pod_template(builders.Owner(name="md", namespace="ns", uid="u"), spec, "abc")
    containers = template["spec"]["initContainers"] + template["spec"]["containers"]
    assert [c["terminationMessagePolicy"] for c in containers] == ["FallbackToLogsOnError"] * 2
