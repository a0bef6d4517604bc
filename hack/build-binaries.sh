#!/usr/bin/env bash
# Build (once per machine) the Go binaries the local control plane needs, from
# their published Go modules through the Go module proxy, into a cache outside
# the repository keyed by version:
#
#   $MODELDEPLOY_CACHE/bin/kubernetes-v$K8S_VERSION/{kube-apiserver,kube-controller-manager,kube-scheduler,kubectl,
#                                                  kubelet,kube-proxy}
#   $MODELDEPLOY_CACHE/bin/containerd-v$CONTAINERD_VERSION/{containerd,containerd-shim-runc-v2,ctr}
#   $MODELDEPLOY_CACHE/bin/coredns-v$COREDNS_VERSION/coredns
#   $MODELDEPLOY_CACHE/bin/etcd-v$ETCD_VERSION/etcd
#   $MODELDEPLOY_CACHE/bin/kwok-v$KWOK_VERSION/kwok
#   $MODELDEPLOY_CACHE/bin/helm-v$HELM_VERSION/helm
#
# A tool whose directory holds a complete `.stamp` is not rebuilt. Each tool is
# built into a temporary directory and moved into place only when complete, so
# an interrupted build never leaves a half-filled cache behind.
#
# kubelet, kube-proxy, containerd and CoreDNS serve the real node of the local cluster (runc and
# the CNI plugins come from Debian: hack/install-node-deps.sh).
#
# Usage: hack/build-binaries.sh [all|kubernetes|etcd|kwok|helm|containerd|coredns]...
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"

CACHE=${MODELDEPLOY_CACHE:-$HOME/.cache/modeldeploy}
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
mkdir -p "$CACHE/bin"

log() { printf '[build-binaries %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# install_dir TOOL VERSION -> echo the final directory
tool_dir() { echo "$CACHE/bin/$1-v$2"; }

done_already() { # DIR STAMP
  [ -f "$1/.stamp" ] && [ "$(cat "$1/.stamp")" = "$2" ]
}

finish() { # TMP DIR STAMP
  echo "$3" >"$1/.stamp"
  rm -rf "$2"
  mv "$1" "$2"
}

build_kubernetes() {
  local dir stamp tmp ldf p
  dir=$(tool_dir kubernetes "$K8S_VERSION")
  stamp="kubernetes v$K8S_VERSION $(sha256sum "$here/tools/k8s/go.mod" | cut -c1-16)"
  if done_already "$dir" "$stamp"; then log "kubernetes v$K8S_VERSION: cached in $dir"; return; fi
  log "kubernetes v$K8S_VERSION: building kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kubelet, kube-proxy (cold: tens of minutes on 2 cores)"
  tmp=$(mktemp -d "$CACHE/bin/.kubernetes.XXXX")
  local major=${K8S_VERSION%%.*} minor
  minor=${K8S_VERSION#*.}; minor=${minor%%.*}
  ldf="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldf="$ldf -X $p.gitVersion=v$K8S_VERSION -X $p.gitMajor=$major -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
    ldf="$ldf -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  (cd "$here/tools/k8s" && go build -trimpath -tags=selinux,notest,grpcnotrace -ldflags="$ldf" -o "$tmp/" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl \
      k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy)
  finish "$tmp" "$dir" "$stamp"
  log "kubernetes v$K8S_VERSION: done"
}

build_etcd() {
  local dir stamp tmp
  dir=$(tool_dir etcd "$ETCD_VERSION")
  stamp="etcd v$ETCD_VERSION $(sha256sum "$here/tools/etcd/go.mod" | cut -c1-16)"
  if done_already "$dir" "$stamp"; then log "etcd v$ETCD_VERSION: cached in $dir"; return; fi
  log "etcd v$ETCD_VERSION: building"
  tmp=$(mktemp -d "$CACHE/bin/.etcd.XXXX")
  (cd "$here/tools/etcd" && go build -trimpath -ldflags="-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3)
  finish "$tmp" "$dir" "$stamp"
  log "etcd v$ETCD_VERSION: done"
}

build_module() { # NAME VERSION MODULE-DIR TAGS PACKAGE... (a pinned tools module under hack/tools)
  local name=$1 version=$2 moddir=$here/tools/$3 tags=$4 dir stamp tmp
  shift 4
  dir=$(tool_dir "$name" "$version")
  stamp="$name v$version $(find "$moddir" -maxdepth 1 \( -name go.mod -o -name '*.go' \) | sort | xargs cat | sha256sum | cut -c1-16)"
  if done_already "$dir" "$stamp"; then log "$name v$version: cached in $dir"; return; fi
  log "$name v$version: building $*"
  tmp=$(mktemp -d "$CACHE/bin/.$name.XXXX")
  (cd "$moddir" && go build -trimpath -tags="$tags" -ldflags="-s -w" -o "$tmp/" "$@")
  finish "$tmp" "$dir" "$stamp"
  log "$name v$version: done"
}

build_containerd() {
  # cgo off: runc (cgo, libseccomp) is Debian's; the snapshotters needing cgo are left out.
  build_module containerd "$CONTAINERD_VERSION" containerd no_btrfs,no_devmapper,no_zfs \
    github.com/containerd/containerd/v2/cmd/containerd \
    github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2 \
    github.com/containerd/containerd/v2/cmd/ctr
}

build_coredns() {
  build_module coredns "$COREDNS_VERSION" coredns "" .
}

build_goinstall() { # NAME VERSION PACKAGE
  local dir stamp tmp
  dir=$(tool_dir "$1" "$2")
  stamp="$1 v$2"
  if done_already "$dir" "$stamp"; then log "$1 v$2: cached in $dir"; return; fi
  log "$1 v$2: go install $3@v$2"
  tmp=$(mktemp -d "$CACHE/bin/.$1.XXXX")
  local ldf="-s -w"
  [ "$1" = helm ] && ldf="$ldf -X helm.sh/helm/v3/internal/version.version=v$2"
  (cd "$tmp" && GOFLAGS= GOBIN="$tmp" go install -trimpath -ldflags="$ldf" "$3@v$2")
  finish "$tmp" "$dir" "$stamp"
  log "$1 v$2: done"
}

targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(all)
for t in "${targets[@]}"; do
  case "$t" in
    all) build_etcd; build_goinstall kwok "$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok
         build_goinstall helm "$HELM_VERSION" helm.sh/helm/v3/cmd/helm; build_kubernetes
         build_containerd; build_coredns ;;
    kubernetes) build_kubernetes ;;
    etcd) build_etcd ;;
    kwok) build_goinstall kwok "$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok ;;
    helm) build_goinstall helm "$HELM_VERSION" helm.sh/helm/v3/cmd/helm ;;
    containerd) build_containerd ;;
    coredns) build_coredns ;;
    *) echo "unknown target: $t" >&2; exit 2 ;;
  esac
done
