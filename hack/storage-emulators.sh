#!/usr/bin/env bash
# Build (once per machine) the storage emulators the storage tests run against, pinned and cached
# outside the repository, keyed by version:
#
#   $MODELDEPLOY_CACHE/bin/fake-gcs-server-v$FAKE_GCS_VERSION/fake-gcs-server   (Go module, GCS JSON API)
#   $MODELDEPLOY_CACHE/azurite-$AZURITE_VERSION/node_modules/.bin/azurite-blob    (npm package, Azure Blob)
#
# Beside Azurite, Azure's own JavaScript SDK (@azure/storage-blob): tests use it, as a client
# independent of the stager, to create containers, upload blobs and issue SAS tokens.
#
# A directory holding a complete `.stamp` is not rebuilt; each is built in a temporary directory
# and moved into place only when complete. Prints nothing on stdout but, per target, its binary.
#
# Usage: hack/storage-emulators.sh [all|fake-gcs-server|azurite]...
set -euo pipefail

FAKE_GCS_VERSION=1.56.1   # github.com/fsouza/fake-gcs-server
AZURITE_VERSION=3.37.0    # npm azurite
AZURE_BLOB_SDK_VERSION=12.34.0  # npm @azure/storage-blob (test setup client)

CACHE=${MODELDEPLOY_CACHE:-$HOME/.cache/modeldeploy}
mkdir -p "$CACHE/bin"
log() { printf '[storage-emulators %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

exec 9>"$CACHE/.storage-emulators.lock"
flock 9

build_fake_gcs() {
  local dir="$CACHE/bin/fake-gcs-server-v$FAKE_GCS_VERSION" stamp="fake-gcs-server v$FAKE_GCS_VERSION" tmp
  if [ -f "$dir/.stamp" ] && [ "$(cat "$dir/.stamp")" = "$stamp" ]; then
    echo "$dir/fake-gcs-server"; return
  fi
  log "fake-gcs-server v$FAKE_GCS_VERSION: go install (cold: a few minutes)"
  tmp=$(mktemp -d "$CACHE/bin/.fake-gcs-server.XXXX")
  (cd "$tmp" && GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS= GOBIN="$tmp" \
    go install -trimpath -ldflags="-s -w" "github.com/fsouza/fake-gcs-server@v$FAKE_GCS_VERSION") >&2
  echo "$stamp" >"$tmp/.stamp"
  rm -rf "$dir"; mv "$tmp" "$dir"
  echo "$dir/fake-gcs-server"
}

build_azurite() {
  local dir="$CACHE/azurite-$AZURITE_VERSION" stamp="azurite $AZURITE_VERSION sdk $AZURE_BLOB_SDK_VERSION" tmp
  if [ -f "$dir/.stamp" ] && [ "$(cat "$dir/.stamp")" = "$stamp" ]; then
    echo "$dir/node_modules/.bin/azurite-blob"; return
  fi
  command -v npm >/dev/null || { log "azurite: npm not found (Debian: apt-get install npm)"; return 1; }
  log "azurite $AZURITE_VERSION: npm install"
  tmp=$(mktemp -d "$CACHE/.azurite.XXXX")
  (cd "$tmp" && npm install --no-audit --no-fund --loglevel=error --prefix "$tmp" "azurite@$AZURITE_VERSION" "@azure/storage-blob@$AZURE_BLOB_SDK_VERSION") >&2
  echo "$stamp" >"$tmp/.stamp"
  rm -rf "$dir"; mv "$tmp" "$dir"
  echo "$dir/node_modules/.bin/azurite-blob"
}

[ $# -gt 0 ] || set -- all
for target in "$@"; do
  case "$target" in
    all) build_fake_gcs; build_azurite ;;
    fake-gcs-server) build_fake_gcs ;;
    azurite) build_azurite ;;
    *) log "unknown target $target (all|fake-gcs-server|azurite)"; exit 2 ;;
  esac
done
