#!/usr/bin/env bash
# Offline checks of charts/modeldeploy-operator: the CRD copy matches crds/, and `helm lint --strict`
# plus `helm template` pass for every supported values layout. The full checks (rendered objects,
# RBAC rules, PromQL, server-side validation, install, RBAC exercised by the operator) are
# tests/tools/test_chart_render.py and tests/cluster/test_chart.py.
#   hack/chart-check.sh            (HELM=/path/to/helm to use another helm)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source hack/versions.env
CHART=charts/modeldeploy-operator
HELM=${HELM:-${MODELDEPLOY_CACHE:-$HOME/.cache/modeldeploy}/bin/helm-v${HELM_VERSION}/helm}
[[ -x $HELM ]] || HELM=$(command -v helm) || { echo "helm not found: run make binaries" >&2; exit 1; }
KUBE_VERSION=${K8S_VERSION}

status=0
for crd in crds/*.yaml; do
  if ! cmp -s "$crd" "$CHART/crds/$(basename "$crd")"; then
    echo "FAIL: $CHART/crds/$(basename "$crd") differs from $crd: run \`make chart-crds\`" >&2
    status=1
  fi
done

layouts=(
  ""
  "--set rbac.scope=cluster"
  "--set leaderElection.enabled=true"
  "--set rbac.scope=namespaced --set-json rbac.watchNamespaces=[\"team-a\",\"team-b\"]"
  "--set rbac.scope=namespaced --set monitoring.serviceMonitor.enabled=true --set monitoring.prometheusRule.enabled=true --set prometheusAdapterRules.enabled=true"
)
for layout in "${layouts[@]}"; do
  # shellcheck disable=SC2086
  if "$HELM" lint --strict "$CHART" --kube-version "$KUBE_VERSION" $layout >/dev/null \
     && "$HELM" template chk "$CHART" --kube-version "$KUBE_VERSION" $layout >/dev/null; then
    echo "ok: lint + template ${layout:-(defaults)}"
  else
    echo "FAIL: lint/template ${layout:-(defaults)}" >&2
    "$HELM" lint --strict "$CHART" --kube-version "$KUBE_VERSION" $layout >&2 || true
    status=1
  fi
done
exit $status
