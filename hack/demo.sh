#!/usr/bin/env bash
# make demo: the main job on the embedded local cluster.
# Starts the local control plane, installs the CRD and runs the operator. With the real node (real-0:
# root, the node's Debian packages) it serves a real model on real Triton pods and shows what a client
# sees through a canary and an automatic rollback (hack/demo_real.py). Without it, the same story runs
# on kwok's simulated pods (the quickstart example), and says why.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DIR=${CLUSTER_DIR:-.cluster}
export MODELDEPLOY_CACHE=${MODELDEPLOY_CACHE:-$HOME/.cache/modeldeploy}

$PY -m hack.localcluster up --dir "$DIR"
export KUBECONFIG=$PWD/$DIR/kubeconfig
eval "$($PY -m hack.localcluster env --dir "$DIR")"   # our kubectl/helm first on PATH

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "cluster"
kubectl version
kubectl get nodes -o wide

step "install the CRD"
kubectl apply --server-side -f crds/
kubectl wait --for=condition=Established crd/modeldeployments.modeldeploy.io --timeout=60s

real_node=""
if kubectl get node real-0 >/dev/null 2>&1; then
  real_node=yes
  # the stager init container runs the operator image, built and loaded by hack/demo_real.py
  export MODELDEPLOY_STAGER_IMAGE=$($PY -m hack.images ref operator)
fi

step "run the operator (log: $DIR/operator.log)"
if [ -f "$DIR/operator.pid" ] && kill -0 "$(cat "$DIR/operator.pid")" 2>/dev/null; then
  kill "$(cat "$DIR/operator.pid")"; sleep 1
fi
MODELDEPLOY_METRICS_PORT=0 nohup .venv/bin/modeldeploy-operator run --standalone -A \
  >"$DIR/operator.log" 2>&1 &
echo $! >"$DIR/operator.pid"

if [ -n "$real_node" ]; then
  $PY -m hack.demo_real --dir "$DIR"
  echo
  echo "The cluster keeps running: export KUBECONFIG=$PWD/$DIR/kubeconfig; stop it with make cluster-down"
  exit 0
fi
echo "no real node (see 'real node' in the output of cluster-up above): the story runs on kwok's simulated pods"

step "apply examples/quickstart.yaml"
kubectl delete md resnet50 --ignore-not-found --wait=true >/dev/null
kubectl apply -f examples/quickstart.yaml
kubectl wait md/resnet50 --for=condition=Ready --timeout=120s
kubectl get modeldeployments
kubectl get deployments,services,pods -l modeldeploy.io/name=resnet50

# Watch the ModelDeployment until PHASE reaches $1 (or $2 seconds pass), printing each change.
watch_md() {
  local want=$1 limit=$2 last="" row phase start=$SECONDS
  while (( SECONDS - start < limit )); do
    row=$(kubectl get md resnet50 --no-headers -o wide 2>/dev/null || true)
    if [ "$row" != "$last" ]; then printf '  %3ss  %s\n' $((SECONDS - start)) "$row"; last=$row; fi
    phase=$(kubectl get md resnet50 -o jsonpath='{.status.phase}')
    gen=$(kubectl get md resnet50 -o jsonpath='{.metadata.generation}')
    seen=$(kubectl get md resnet50 -o jsonpath='{.status.observedGeneration}')
    [ "$phase" = "$want" ] && [ "$gen" = "$seen" ] && return 0
    sleep 1
  done
  echo "timed out waiting for phase $want" >&2; return 1
}

step "canary rollout: model version 1 -> 2 (steps 25%, 50%, 100%)"
kubectl patch md resnet50 --type=merge -p '{"spec":{"model":{"version":2},
  "rollout":{"steps":[{"weight":25,"pause":{"duration":"5s"}},{"weight":50,"pause":{"duration":"5s"}},{"weight":100}],
             "scaleDownDelaySeconds":3,"progressDeadlineSeconds":20}}}'
kubectl get md resnet50 -o wide
watch_md Ready 180
kubectl get deployments -l modeldeploy.io/name=resnet50

step "a bad version 3 (its pods never become ready): automatic rollback"
kubectl patch md resnet50 --type=merge -p '{"spec":{"model":{"version":3},"server":{"podLabels":{"simulate":"never-ready"}}}}'
watch_md RolledBack 180
kubectl get md resnet50 -o jsonpath='{range .status.conditions[?(@.type=="RolledBack")]}RolledBack: {.reason}: {.message}{"\n"}{end}'
echo "spec still asks for version $(kubectl get md resnet50 -o jsonpath='{.spec.model.version}'); serving version $(kubectl get md resnet50 -o jsonpath='{.status.servingVersion}')"
kubectl get events --field-selector involvedObject.name=resnet50 --sort-by=.lastTimestamp | tail -8

echo
echo "The cluster keeps running: export KUBECONFIG=$PWD/$DIR/kubeconfig; stop it with make cluster-down"
