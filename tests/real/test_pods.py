"""Behaviour 1: a pod on the real node runs and becomes Ready through the kubelet's HTTP readiness
probe; a ClusterIP Service reaches it from the host and, by DNS name, from another pod;
``kubectl logs``, ``exec`` and ``port-forward`` work (the API server reaches the kubelet with its
client certificate and verifies the kubelet's serving certificate)."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from typing import Any

from realtier import RESTRICTED_CONTAINER, on_real_node

from kube import Cluster, wait_for

HTTP_PORT = 8080


def python_pod(name: str, image: str, command: list[str], **container: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": on_real_node(
            {
                "terminationGracePeriodSeconds": 2,
                "securityContext": {"runAsNonRoot": True, "runAsUser": 65532},
                "containers": [
                    {
                        "name": "main",
                        "image": image,
                        "imagePullPolicy": "Never",
                        "command": command,
                        "securityContext": RESTRICTED_CONTAINER,
                        "workingDir": "/tmp",
                        **container,
                    }
                ],
            }
        ),
    }


def test_pod_probe_service_dns_logs_exec(cluster: Cluster, namespace: str, images: dict[str, str]) -> None:
    server = python_pod(
        "web",
        images["operator"],
        ["python3", "-m", "http.server", str(HTTP_PORT), "--bind", "0.0.0.0", "--directory", "/etc"],
        ports=[{"containerPort": HTTP_PORT, "name": "http"}],
        readinessProbe={"httpGet": {"path": "/hostname", "port": "http"}, "periodSeconds": 1},
    )
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]},
    }
    client = python_pod("client", images["operator"], ["python3", "-c", "import time; time.sleep(3600)"])
    for obj in (server, service, client):
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))

    # Ready only through the kubelet's probe of the running server.
    cluster.kubectl(
        "wait", "-n", namespace, "pod/web", "pod/client", "--for=condition=Ready", "--timeout=120s"
    )
    pod = cluster.core.read_namespaced_pod("web", namespace)
    assert pod.spec.node_name == "real-0"
    assert pod.status.pod_ip and pod.status.pod_ip.startswith("10.244.250.")

    # From the host, through kube-proxy's rules for the ClusterIP.
    cluster_ip = cluster.core.read_namespaced_service("web", namespace).spec.cluster_ip
    body = wait_for(
        lambda: _get(f"http://{cluster_ip}/hostname"),
        60,
        message=f"GET http://{cluster_ip}/hostname from the host",
    )
    assert body.strip() == "web"

    # From another pod, by DNS name (CoreDNS) through the Service: kubectl exec.
    fetch = (
        "import urllib.request;"
        f"print(urllib.request.urlopen('http://web.{namespace}.svc/hostname', timeout=5).read().decode())"
    )
    out = wait_for(
        lambda: _exec_ok(cluster, namespace, "client", ["python3", "-c", fetch]),
        60,
        message="GET http://web.NS.svc/hostname from the client pod",
    )
    assert out.strip() == "web"

    # kubectl port-forward: through the API server and the kubelet's streaming to the pod.
    forward = subprocess.Popen(
        [cluster.which("kubectl"), "port-forward", "-n", namespace, "pod/web", f":{HTTP_PORT}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cluster.env,
    )
    try:
        assert forward.stdout is not None
        line = forward.stdout.readline()  # "Forwarding from 127.0.0.1:PORT -> 8080"
        match = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert match, line
        assert _get(f"http://127.0.0.1:{match.group(1)}/hostname") == "web\n"
    finally:
        forward.terminate()
        forward.wait(timeout=10)

    # kubectl logs shows the server's own access log lines for those requests.
    logs = cluster.kubectl("logs", "-n", namespace, "web").stdout
    assert '"GET /hostname HTTP/1.1" 200' in logs


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return str(resp.read().decode())
    except OSError:
        return None


def _exec_ok(cluster: Cluster, namespace: str, pod: str, command: list[str]) -> str | None:
    proc = cluster.kubectl("exec", "-n", namespace, pod, "--", *command, check=False)
    return proc.stdout if proc.returncode == 0 else None
