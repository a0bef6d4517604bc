#!/usr/bin/env bash
# make demo: the main job on the embedded local cluster.
# Starts the local control plane, installs the CRD, runs the operator, applies the quickstart
# example and shows it becoming Ready.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DIR=${CLUSTER_DIR:-.cluster}
export MODELDEPLOY_CACHE=${MODELDEPLOY_CACHE:-$HOME/.cache/modeldeploy}

$PY hack/localcluster.py up --dir "$DIR"
export KUBECONFIG=$PWD/$DIR/kubeconfig
eval "$($PY hack/localcluster.py env --dir "$DIR")"   # our kubectl/helm first on PATH

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "cluster"
kubectl version
kubectl get nodes -o wide

step "install the CRD"
kubectl apply --server-side -f crds/modeldeploy.io_modeldeployments.yaml
kubectl wait --for=condition=Established crd/modeldeployments.modeldeploy.io --timeout=60s

step "run the operator (log: $DIR/operator.log)"
if [ -f "$DIR/operator.pid" ] && kill -0 "$(cat "$DIR/operator.pid")" 2>/dev/null; then
  kill "$(cat "$DIR/operator.pid")"; sleep 1
fi
MODELDEPLOY_METRICS_PORT=0 nohup .venv/bin/modeldeploy-operator run --standalone -A \
  >"$DIR/operator.log" 2>&1 &
echo $! >"$DIR/operator.pid"

step "apply examples/quickstart.yaml"
kubectl delete md resnet50 --ignore-not-found --wait=true >/dev/null
kubectl apply -f examples/quickstart.yaml
kubectl wait md/resnet50 --for=condition=Ready --timeout=120s
kubectl get modeldeployments
kubectl get deployments,services,pods -l modeldeploy.io/name=resnet50

echo
echo "The cluster keeps running: export KUBECONFIG=$PWD/$DIR/kubeconfig; stop it with make cluster-down"
