"""The pure parts of the kubectl plugin: patch bodies, argument parsing, table formatting."""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime
from typing import Any

import pytest

from modeldeploy import plugin


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("promote", {"metadata": {"annotations": {"modeldeploy.io/promote": "N"}}}),
        ("abort", {"metadata": {"annotations": {"modeldeploy.io/abort": "N"}}}),
        ("pause", {"spec": {"paused": True}}),
        ("resume", {"metadata": {"annotations": {"modeldeploy.io/resume": "N"}}, "spec": {"paused": False}}),
    ],
)
def test_patch_bodies(command: str, expected: dict[str, Any]) -> None:
    assert plugin.patch_for(command, value="N") == expected


def test_rollback_patch_sets_rollback_to() -> None:
    assert plugin.patch_for("rollback", revision=3) == {"spec": {"rollbackTo": {"revision": 3}}}
    with pytest.raises(ValueError, match="to-revision"):
        plugin.patch_for("rollback", revision=None)
    with pytest.raises(ValueError, match="to-revision"):
        plugin.patch_for("rollback", revision=0)
    with pytest.raises(ValueError, match="unknown"):
        plugin.patch_for("explode")


def test_nonces_are_fresh_and_valid_annotation_values() -> None:
    a = plugin.nonce(datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC))
    assert a == "2025-01-02T03:04:05.678901Z"
    first = plugin.patch_for("promote")["metadata"]["annotations"]["modeldeploy.io/promote"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", first)
    b = plugin.nonce(datetime(2025, 1, 2, 3, 4, 5, 678902, tzinfo=UTC))
    assert a != b and len(a) <= 63


@pytest.mark.parametrize(
    "argv",
    [
        ["status", "m", "-n", "ns1"],
        ["-n", "ns1", "status", "m"],
        ["--namespace=ns1", "status", "m"],
        ["status", "--namespace", "ns1", "m"],
    ],
)
def test_namespace_flag_anywhere(argv: list[str]) -> None:
    args = plugin.build_parser().parse_args(argv)
    assert (args.command, args.name, args.namespace) == ("status", "m", "ns1")


def test_namespace_defaults_to_the_context() -> None:
    args = plugin.build_parser().parse_args(["history", "m"])
    assert getattr(args, "namespace", None) is None


def test_rollback_needs_a_revision() -> None:
    parser = plugin.build_parser()
    assert parser.parse_args(["rollback", "m", "--to-revision", "2"]).to_revision == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["rollback", "m"])
    with pytest.raises(SystemExit):
        parser.parse_args(["rollback", "m", "--to-revision", "two"])
    with pytest.raises(SystemExit):
        parser.parse_args(["frobnicate", "m"])


def test_format_table_aligns_columns() -> None:
    out = plugin.format_table(("A", "LONGER"), [("x", 1), ("yyyyy", None)])
    assert out.splitlines() == ["A       LONGER", "x       1", "yyyyy"]


MD: dict[str, Any] = {
    "metadata": {"name": "resnet", "namespace": "ml"},
    "spec": {"rollout": {"steps": [{"weight": 25}, {"weight": 50}, {"weight": 100}]}, "paused": False},
    "status": {
        "phase": "Progressing",
        "message": "rolling out revision 2 (step 2, weight 50%)",
        "strategy": "Canary",
        "ready": "3/3",
        "stableRevision": 1,
        "candidateRevision": 2,
        "currentStep": 1,
        "canaryWeight": 50,
        "rollout": {"state": "Progressing", "stableRevision": 1, "candidateRevision": 2, "step": 1},
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "AllReplicasReady",
                "message": "3/3 ready",
                "lastTransitionTime": "2025-01-01T00:00:00Z",
            },
            {
                "type": "RolledBack",
                "status": "False",
                "reason": "NotRolledBack",
                "message": "",
                "lastTransitionTime": "2025-01-01T00:00:00Z",
            },
        ],
        "history": [
            {
                "revision": 1,
                "hash": "a",
                "modelVersion": 1,
                "image": "triton:1",
                "created": "2025-01-01T00:00:00Z",
                "outcome": "Serving",
            },
            {
                "revision": 2,
                "hash": "b",
                "modelVersion": 2,
                "image": "triton:1",
                "created": "2025-01-01T00:01:00Z",
                "outcome": "Progressing",
            },
            {
                "revision": 3,
                "hash": "c",
                "modelVersion": 3,
                "image": "triton:2",
                "created": "2025-01-01T00:02:00Z",
                "outcome": "RolledBack",
                "reason": "CrashLoopBackOff: container triton restarted 3 times",
            },
        ],
    },
}


def test_format_status() -> None:
    out = plugin.format_status(MD)
    fields = dict(
        re.match(r"^([^:]+):\s+(.*)$", line).groups()
        for line in out.splitlines()  # type: ignore[union-attr]
        if not line.startswith(" ") and not line.startswith("Conditions")
    )
    assert fields["Phase"] == "Progressing"
    assert fields["Stable revision"] == "1 (model version 1, triton:1)"
    assert fields["Candidate revision"] == "2 (model version 2, triton:1)"
    assert fields["Step"] == "2/3"
    assert fields["Weight"] == "50%"
    assert fields["Strategy"] == "Canary"
    cond = [line.split() for line in out.split("Conditions:\n", 1)[1].splitlines()]
    assert cond[0][:3] == ["TYPE", "STATUS", "REASON"]
    assert cond[1][:3] == ["Ready", "True", "AllReplicasReady"]
    assert cond[2][:3] == ["RolledBack", "False", "NotRolledBack"]


def test_format_status_of_a_fresh_object() -> None:
    out = plugin.format_status({"metadata": {"name": "x", "namespace": "d"}, "spec": {}})
    assert "Phase:" in out and "Unknown" in out and "Conditions" not in out


def test_format_status_default_steps_and_extra_step() -> None:
    md = {
        **MD,
        "spec": {"rollout": {"steps": [{"weight": 10}]}, "paused": True, "rollbackTo": {"revision": 1}},
    }
    out = plugin.format_status(md)
    assert re.search(r"^Step:\s+2/2$", out, re.M)  # the implicit 100% step counts
    assert "spec.paused is true" in out and "revision 1 (spec.rollbackTo)" in out
    md = {**MD, "spec": {}}
    assert re.search(r"^Step:\s+2/3$", plugin.format_status(md), re.M)  # default steps 20/50/100


def test_format_history() -> None:
    lines = plugin.format_history(MD).splitlines()
    header = re.split(r"\s{3,}", lines[0])
    assert header == list(plugin.HISTORY_COLUMNS)
    starts = [lines[0].index(col) for col in plugin.HISTORY_COLUMNS]
    rows = [
        [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)] for line in lines[1:]
    ]
    assert rows[0] == ["1 (stable)", "1", "triton:1", "2025-01-01T00:00:00Z", "Serving", ""]
    assert rows[1][:1] == ["2 (candidate)"] and rows[1][4] == "Progressing"
    assert rows[2][4:] == ["RolledBack", "CrashLoopBackOff: container triton restarted 3 times"]
    assert plugin.format_history({"status": {}}) == "No revisions recorded yet.\n"


def test_describe_patch() -> None:
    assert "revision 2" in plugin.describe_patch("rollback", "m", "ns", 2)
    assert plugin.describe_patch("promote", "m", "ns").startswith(
        "modeldeployment.modeldeploy.io/m promotion"
    )


def test_without_the_kubernetes_client_the_plugin_says_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The operator's runtime set leaves the official client out; a None entry makes its import fail
    # as it does where it is not installed.
    for name in [m for m in sys.modules if m == "kubernetes" or m.startswith("kubernetes.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "kubernetes", None)
    with pytest.raises(SystemExit) as exc:
        plugin.main(["status", "m", "-n", "ns1"])
    assert exc.value.code == "error: kubectl modeldeploy needs the Kubernetes Python client: " + (
        "pip install 'modeldeploy[plugin]'"
    )
    # Parsing comes first: a wrong command line is answered as such, client or not.
    with pytest.raises(SystemExit) as bad:
        plugin.main(["explode"])
    assert bad.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_format_batch_shows_progress_records_and_the_reason() -> None:
    bi = {
        "metadata": {"name": "nightly"},
        "spec": {
            "model": {"modelDeploymentRef": {"name": "ranker"}},
            "input": {"uri": "s3://d/in/"},
            "output": {"uri": "s3://d/out/"},
            "maxFailedRecords": "1%",
        },
        "status": {
            "phase": "Running",
            "message": "2 of 2 worker pods scoring",
            "progress": "5/12",
            "records": 5000,
            "recordsFailed": 3,
            "recordsPerSecond": 812.5,
            "modelRevision": "abc123",
            "conditions": [{"type": "Complete", "status": "False", "reason": "Running", "message": "m"}],
        },
    }
    out = plugin.format_batch(bi)
    assert "Phase:       Running (2 of 2 worker pods scoring)" in out
    assert "Model:       ModelDeployment ranker, revision abc123" in out
    assert "Shards:      5/12" in out
    assert "Records:     5000 scored, 3 failed (allowed: 1%)" in out
    assert "Throughput:  812.5 records/s" in out
    assert "Complete   False    Running" in out
    fresh = plugin.format_batch({"metadata": {"name": "new"}, "spec": {}})
    assert "Phase:       Pending" in fresh and "Shards:      -" in fresh
